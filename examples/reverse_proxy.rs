//! A reverse proxy that strips hop-by-hop fields before forwarding, with hyper-util's pooled client.
//!
//! ```text
//! cargo run --example axum -- --addr 127.0.0.1:3001                         # an upstream
//! cargo run --example reverse_proxy -- --upstream http://127.0.0.1:3001     # the proxy, on :3000
//! curl -s -H 'Connection: x-secret' -H 'X-Secret: 1' -H 'Keep-Alive: 300' http://127.0.0.1:3000/headers
//! ```
//!
//! The upstream's `/headers` prints what reached it: no `Connection`, no `Keep-Alive`, no `X-Secret`
//! (named in `Connection`, so meant for the proxy alone), and an `X-Forwarded-For` with the client's
//! address.
//!
//! Connection-specific fields describe one hop, not the message (RFC 9110 section 7.6.1), so a proxy must
//! not forward them, either way:
//!
//! - requests: `KeepAliveLayer::strip_request_hop_by_hop(true)` removes them before the handler runs.
//!   Fields an app bases trust on (`Host`, `Authorization`, `X-Forwarded-For`, ...) are protected: a
//!   client cannot get them removed by naming them in `Connection`. `X-Forwarded-For` is added by the
//!   handler, after the strip.
//! - responses: the handler removes them from the upstream's response. Otherwise an upstream's
//!   `Connection: close`, which only ends the proxy's connection to the upstream, would close the
//!   client's connection too (the keep-alive layer honours a `close` from the service it wraps).
//!
//! Upgrades (WebSocket) are not proxied: `Upgrade` is one of the fields stripped. Ctrl-C drains and exits.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{PathAndQuery, Uri};
use http::{Request, Response, StatusCode, Version};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tower::ServiceBuilder;
use tower_keepalive::serve::Drain;
use tower_keepalive::KeepAliveLayer;

type UpstreamClient = Client<HttpConnector, Incoming>;
/// The upstream's body, or the proxy's own error page.
type ProxyBody = Either<Incoming, Full<Bytes>>;

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let (addr, upstream) = args();

    let keep_alive = KeepAliveLayer::new()
        .idle_timeout(Duration::from_secs(60))
        .max_requests(1000)
        .strip_request_hop_by_hop(true);
    // One pooled client for all connections: the proxy keeps its own connections to the upstream alive.
    let client: UpstreamClient = Client::builder(TokioExecutor::new()).build_http();

    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().header_read_timeout(None);

    let listener = tokio::net::TcpListener::bind(addr).await?;
    println!(
        "listening on http://{}, forwarding to {upstream}",
        listener.local_addr()?
    );

    let drain = Drain::new();
    let mut ctrl_c = std::pin::pin!(tokio::signal::ctrl_c());
    loop {
        let (io, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut ctrl_c => break,
        };
        let handle = keep_alive.connection();
        let (client, upstream) = (client.clone(), upstream.clone());
        let svc = ServiceBuilder::new()
            .layer(keep_alive.bind(handle.clone()))
            .service_fn(move |req| proxy(client.clone(), upstream.clone(), peer, req));
        let conn = builder
            .serve_connection_with_upgrades(TokioIo::new(io), TowerToHyperService::new(svc))
            .into_owned();
        let watcher = drain.watcher();
        tokio::spawn(async move {
            watcher.drive(handle, conn).await;
        });
    }

    drop(listener);
    drain.drain(Some(Duration::from_secs(30))).await;
    println!("drained; bye");
    Ok(())
}

async fn proxy(
    client: UpstreamClient,
    upstream: Uri,
    peer: SocketAddr,
    mut req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    // The keep-alive layer has already removed the request's hop-by-hop fields. Whatever is added from
    // here on is the proxy's own and reaches the upstream.
    let forwarded = match req.headers().get(&X_FORWARDED_FOR) {
        Some(earlier) => format!("{}, {}", earlier.to_str().unwrap_or_default(), peer.ip()),
        None => peer.ip().to_string(),
    };
    if let Ok(value) = HeaderValue::from_str(&forwarded) {
        req.headers_mut().insert(&X_FORWARDED_FOR, value);
    }

    // An HTTP/2 request carries its host in the URI, not in a `Host` field: keep it for the upstream.
    if !req.headers().contains_key(header::HOST) {
        if let Some(value) = req
            .uri()
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        {
            req.headers_mut().insert(header::HOST, value);
        }
    }
    let path = req
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let mut target = upstream.into_parts();
    target.path_and_query = Some(path);
    *req.uri_mut() = Uri::from_parts(target).expect("scheme and authority from a valid URI");
    // This proxy speaks HTTP/1.1 to the upstream, whatever the client spoke to it.
    *req.version_mut() = Version::HTTP_11;

    match client.request(req).await {
        Ok(res) => {
            let (mut parts, body) = res.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            // The client's hop has its own version; the keep-alive layer sets what it needs.
            parts.version = Version::HTTP_11;
            Ok(Response::from_parts(parts, Either::Left(body)))
        }
        Err(err) => {
            eprintln!("upstream error: {err}");
            let mut res = Response::new(Either::Right(Full::from("bad gateway\n")));
            *res.status_mut() = StatusCode::BAD_GATEWAY;
            Ok(res)
        }
    }
}

/// Removes the connection-specific fields of a message (RFC 9110 section 7.6.1): every field named in
/// `Connection`, then `Connection` itself and the fields that are always hop-by-hop.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "transfer-encoding",
        "upgrade",
    ] {
        headers.remove(name);
    }
}

/// `--upstream URL` (required) and `--addr HOST:PORT` (127.0.0.1:3000 by default).
fn args() -> (SocketAddr, Uri) {
    let mut addr = SocketAddr::from(([127, 0, 0, 1], 3000));
    let mut upstream = None;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().unwrap_or_else(|| usage());
        match flag.as_str() {
            "--addr" => addr = value.parse().unwrap_or_else(|_| usage()),
            "--upstream" => upstream = Some(value.parse::<Uri>().unwrap_or_else(|_| usage())),
            _ => usage(),
        }
    }
    match upstream {
        Some(uri) if uri.scheme_str() == Some("http") && uri.authority().is_some() => (addr, uri),
        _ => usage(),
    }
}

fn usage() -> ! {
    eprintln!("usage: reverse_proxy --upstream http://HOST:PORT [--addr HOST:PORT]");
    std::process::exit(2)
}
