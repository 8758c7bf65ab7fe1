//! A server for trying tower-keepalive by hand and from scripts.
//!
//! ```text
//! cargo run --release --example server -- --addr 127.0.0.1:0 --idle-timeout 2 --max-requests 5 [--max-age 30] [--max-age-grace 10] [--no-advertise] [--max-connections N] [--lame-duck 5] [--behind-lb 60]
//! cargo run --release --example server --features axum -- --axum-serve [--idle-timeout 2 ...]
//! ```
//!
//! The first line on stdout is `listening on http://ADDR`. HTTP/1.x and h2c (prior knowledge) on the
//! same port. Routes:
//!
//! - `/`: a short text body; a POST to it is answered with the length of its body;
//! - `/slow?ms=N`: answers after N ms;
//! - `/stream?chunks=N&ms=M`: a streaming body of N chunks, M ms apart;
//! - `/big?bytes=N`: a body of N bytes (default 1 MiB, at most 1 GiB) with its `Content-Length`,
//!   streamed in 64 KiB chunks, for slow-reader and send-timeout tests;
//! - `/ws`: a WebSocket echo.
//!
//! `--max-connections N` sets the connection budget (soft limit at three quarters of N; `0`: no budget);
//! by default it comes from the file-descriptor limit.
//!
//! `--axum-serve` serves the same routes through `axum::serve`, with `tower_keepalive::axum`'s
//! `KeepAliveListener` and `into_make_service` (needs the `axum` feature). `--drain-timeout` and
//! `--max-connections` do not apply there: `axum::serve` waits for every connection when it shuts down,
//! and has no connection budget; closes are not logged either.
//!
//! `--lame-duck SECS`: on the shutdown signal, keep accepting and serving for that long, keeping no
//! connection alive, before the drain (for a load balancer to take the server out of rotation); with
//! `--axum-serve` too (`KeepAliveListener::lame_duck`).
//! `--behind-lb SECS`: the policy for a server behind a balancer whose idle timeout is SECS
//! (`KeepAliveLayer::behind_load_balancer`; give it before the other policy flags, which then apply on top).
//! `--max-age-grace SECS`: streams still open at the maximum age get that long, then are cut.
//! `--header-timeout SECS`: the request head timeout (`Serve::header_timeout`); `--h2-ping-interval SECS`:
//! HTTP/2 PING keep-alive (through `Serve::http_builder`); `--tls-cert PEM --tls-key PEM` (feature `tls`):
//! HTTPS, and the first line says `listening on https://ADDR`. Route `/peer` answers the client's address
//! as a handler sees it (`ConnectInfo<SocketAddr>`, `IP:PORT`). `--tcp-keepalive SECS`: TCP keepalive
//! probes after SECS of silence from the peer (`Serve::tcp_keepalive`; `KeepAliveListener::tcp_keepalive`
//! with `--axum-serve`), at the system's interval and count.
//! `--send-timeout SECS`: the send timeout (`KeepAliveLayer::send_timeout`, 60 s by default; `0`: none).
//! `--hibernate-after SECS`: an idle HTTP/1 connection gives back hyper's state after SECS
//! (`Serve::hibernate_after`, 1 s by default; `0`: never, `Serve::no_hibernation`; serve path only).
//!
//! On SIGINT or SIGTERM it drains (after the lame-duck period, if any) and exits 0. Each connection's close reason is logged (set `RUST_LOG`
//! to change the level; `info` by default).

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::Query;
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use futures_util::stream;
use tower_keepalive::serve::TcpKeepalive;
use tower_keepalive::KeepAliveLayer;

struct Args {
    addr: SocketAddr,
    layer: KeepAliveLayer,
    drain_timeout: Duration,
    lame_duck: Option<Duration>,
    max_connections: Option<usize>,
    axum_serve: bool,
    header_timeout: Option<Duration>,
    h2_ping_interval: Option<Duration>,
    tcp_keepalive: Option<Duration>,
    hibernate_after: Option<Duration>,
    tls_cert: Option<String>,
    tls_key: Option<String>,
}

fn usage() -> ! {
    eprintln!(
        "usage: server [--addr ADDR] [--idle-timeout SECS] [--max-requests N] [--max-age SECS] \
         [--max-age-grace SECS] [--no-advertise] [--drain-timeout SECS] [--max-connections N] \
         [--lame-duck SECS] [--behind-lb SECS] [--header-timeout SECS] [--h2-ping-interval SECS] \
         [--tcp-keepalive SECS] [--send-timeout SECS] [--hibernate-after SECS] \
         [--tls-cert PEM --tls-key PEM] [--axum-serve]"
    );
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut args = Args {
        addr: SocketAddr::from(([127, 0, 0, 1], 3000)),
        layer: KeepAliveLayer::new(),
        drain_timeout: Duration::from_secs(30),
        lame_duck: None,
        max_connections: None,
        axum_serve: false,
        header_timeout: None,
        h2_ping_interval: None,
        tcp_keepalive: None,
        hibernate_after: None,
        tls_cert: None,
        tls_key: None,
    };
    let mut it = std::env::args().skip(1);
    let secs = |v: Option<String>| -> Duration {
        match v.as_deref().map(str::parse::<f64>) {
            Some(Ok(s)) if s.is_finite() && s >= 0.0 => Duration::from_secs_f64(s),
            _ => usage(),
        }
    };
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "--addr" => {
                args.addr = it
                    .next()
                    .and_then(|a| a.parse().ok())
                    .unwrap_or_else(|| usage())
            }
            "--idle-timeout" => args.layer = args.layer.idle_timeout(secs(it.next())),
            "--max-requests" => {
                let n: u64 = it
                    .next()
                    .and_then(|n| n.parse().ok())
                    .unwrap_or_else(|| usage());
                args.layer = if n == 0 {
                    args.layer.unlimited_requests()
                } else {
                    args.layer.max_requests(n)
                };
            }
            "--max-age" => args.layer = args.layer.max_age(secs(it.next())),
            "--max-age-grace" => args.layer = args.layer.max_age_grace(secs(it.next())),
            "--lame-duck" => args.lame_duck = Some(secs(it.next())),
            "--behind-lb" => args.layer = KeepAliveLayer::behind_load_balancer(secs(it.next())),
            "--no-advertise" => args.layer = args.layer.advertise(false),
            "--drain-timeout" => args.drain_timeout = secs(it.next()),
            "--max-connections" => {
                args.max_connections = Some(
                    it.next()
                        .and_then(|n| n.parse().ok())
                        .unwrap_or_else(|| usage()),
                );
            }
            "--axum-serve" => args.axum_serve = true,
            "--header-timeout" => args.header_timeout = Some(secs(it.next())),
            "--h2-ping-interval" => args.h2_ping_interval = Some(secs(it.next())),
            "--tcp-keepalive" => args.tcp_keepalive = Some(secs(it.next())),
            "--hibernate-after" => args.hibernate_after = Some(secs(it.next())),
            "--send-timeout" => {
                let timeout = secs(it.next());
                args.layer = if timeout.is_zero() {
                    args.layer.no_send_timeout()
                } else {
                    args.layer.send_timeout(timeout)
                };
            }
            "--tls-cert" => args.tls_cert = Some(it.next().unwrap_or_else(|| usage())),
            "--tls-key" => args.tls_key = Some(it.next().unwrap_or_else(|| usage())),
            "-h" | "--help" => usage(),
            _ => usage(),
        }
    }
    args
}

fn app() -> Router {
    Router::new()
        .route(
            "/",
            get(|| async { "hello from tower-keepalive\n" })
                .post(|body: Bytes| async move { format!("received {} bytes\n", body.len()) }),
        )
        .route("/slow", get(slow))
        .route("/stream", get(stream_body))
        .route("/big", get(big))
        .route("/ws", get(ws))
        .route("/peer", get(peer))
}

/// The peer address as a handler sees it: axum's `ConnectInfo` (feature `axum`), else the serve path's
/// `PeerAddr`.
async fn peer(req: axum::extract::Request) -> String {
    #[cfg(feature = "axum")]
    if let Some(axum::extract::ConnectInfo(addr)) = req
        .extensions()
        .get::<axum::extract::ConnectInfo<SocketAddr>>()
    {
        return format!("{addr}\n");
    }
    match req.extensions().get::<tower_keepalive::serve::PeerAddr>() {
        Some(tower_keepalive::serve::PeerAddr(addr)) => format!("{addr}\n"),
        None => "unknown\n".to_string(),
    }
}

fn param(q: &HashMap<String, String>, name: &str, default: u64) -> u64 {
    q.get(name).and_then(|v| v.parse().ok()).unwrap_or(default)
}

async fn slow(Query(q): Query<HashMap<String, String>>) -> String {
    let ms = param(&q, "ms", 1000).min(600_000);
    tokio::time::sleep(Duration::from_millis(ms)).await;
    format!("slept {ms} ms\n")
}

async fn stream_body(Query(q): Query<HashMap<String, String>>) -> Response {
    let chunks = param(&q, "chunks", 5).min(100_000);
    let ms = param(&q, "ms", 200).min(60_000);
    let body = stream::unfold(0, move |i| async move {
        if i == chunks {
            return None;
        }
        if i > 0 {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        Some((
            Ok::<_, Infallible>(Bytes::from(format!("chunk {i}\n"))),
            i + 1,
        ))
    });
    Response::new(Body::from_stream(body))
}

/// `/big`'s chunks: one static buffer, so a large body costs no memory of its own.
static CHUNK: [u8; 64 * 1024] = [b'x'; 64 * 1024];

async fn big(Query(q): Query<HashMap<String, String>>) -> Response {
    let bytes = param(&q, "bytes", 1 << 20).min(1 << 30);
    let body = stream::unfold(bytes, |left| async move {
        if left == 0 {
            return None;
        }
        // At most 64 KiB: fits in usize everywhere.
        let n = left.min(CHUNK.len() as u64) as usize;
        Some((
            Ok::<_, Infallible>(Bytes::from_static(&CHUNK[..n])),
            left - n as u64,
        ))
    });
    let mut res = Response::new(Body::from_stream(body));
    res.headers_mut()
        .insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(bytes));
    res
}

async fn ws(upgrade: WebSocketUpgrade) -> Response {
    upgrade.on_upgrade(echo)
}

async fn echo(mut socket: WebSocket) {
    while let Some(Ok(msg)) = socket.recv().await {
        let reply = match msg {
            Message::Text(_) | Message::Binary(_) => msg,
            Message::Close(_) => break,
            _ => continue,
        };
        if socket.send(reply).await.is_err() {
            break;
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
    tracing::info!("shutdown signal received");
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = parse_args();
    let listener = tokio::net::TcpListener::bind(args.addr).await?;
    let tls = tls_config(&args)?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    println!("listening on {scheme}://{}", listener.local_addr()?);
    tracing::info!(policy = ?args.layer, "serving");
    let tcp_keepalive = args.tcp_keepalive.map(TcpKeepalive::new);
    if args.axum_serve {
        return serve_with_axum(listener, args.layer, tcp_keepalive, args.lame_duck).await;
    }

    let mut server = tower_keepalive::serve(listener, app()).keep_alive(args.layer);
    if let Some(timeout) = args.header_timeout {
        server = server.header_timeout(timeout);
    }
    if let Some(interval) = args.h2_ping_interval {
        server = server.http_builder(|builder| {
            builder.http2().keep_alive_interval(Some(interval));
        });
    }
    if let Some(keepalive) = tcp_keepalive {
        server = server.tcp_keepalive(keepalive);
    }
    match args.hibernate_after {
        Some(Duration::ZERO) => server = server.no_hibernation(),
        Some(after) => server = server.hibernate_after(after),
        None => {}
    }
    #[cfg(feature = "tls")]
    if let Some(config) = tls {
        server = server.tls(config);
    }
    match args.max_connections {
        // No budget at all: every connection is accepted (until the process runs out of descriptors).
        Some(0) => server = server.unlimited_connections(),
        // Soft limit at three quarters: above it idle connections yield to new clients.
        Some(max) => server = server.max_connections(max),
        // The default budget, from the file-descriptor limit.
        None => {}
    }
    let mut server = server
        .with_graceful_shutdown(shutdown_signal())
        .drain_timeout(args.drain_timeout);
    if let Some(period) = args.lame_duck {
        server = server.lame_duck(period);
    }
    server
        .on_close(|conn, reason| {
            tracing::info!(
                reason = reason.as_str(),
                requests = conn.requests(),
                age_ms = conn.opened_at().elapsed().as_millis() as u64,
                "connection closed"
            );
        })
        .await?;
    tracing::info!("drained; bye");
    Ok(())
}

/// The TLS configuration from `--tls-cert` and `--tls-key`, if given.
#[cfg(feature = "tls")]
fn tls_config(args: &Args) -> std::io::Result<Option<rustls::ServerConfig>> {
    match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => {
            tower_keepalive::serve::tls::config_from_pem(cert, key).map(Some)
        }
        (None, None) => Ok(None),
        _ => usage(),
    }
}

#[cfg(not(feature = "tls"))]
fn tls_config(args: &Args) -> std::io::Result<Option<()>> {
    if args.tls_cert.is_some() || args.tls_key.is_some() {
        eprintln!("--tls-cert and --tls-key need the tls feature: cargo run --example server --features tls");
        std::process::exit(2)
    }
    Ok(None)
}

/// The same app through `axum::serve`: the listener gives each connection its handle and idle timer, the
/// make-service binds the layer to it.
#[cfg(feature = "axum")]
async fn serve_with_axum(
    listener: tokio::net::TcpListener,
    layer: KeepAliveLayer,
    tcp_keepalive: Option<TcpKeepalive>,
    lame_duck: Option<Duration>,
) -> std::io::Result<()> {
    use std::future::Future;
    use std::pin::Pin;
    use tower_keepalive::axum::{into_make_service, KeepAliveListener};

    let mut listener = KeepAliveListener::new(listener, layer);
    if let Some(keepalive) = tcp_keepalive {
        listener = listener.tcp_keepalive(keepalive);
    }
    let shutdown: Pin<Box<dyn Future<Output = ()> + Send>> = match lame_duck {
        Some(period) => Box::pin(listener.lame_duck(shutdown_signal(), period)),
        None => Box::pin(listener.on_shutdown(shutdown_signal())),
    };
    axum::serve(listener, into_make_service(app()))
        .with_graceful_shutdown(shutdown)
        .await?;
    tracing::info!("drained; bye");
    Ok(())
}

#[cfg(not(feature = "axum"))]
async fn serve_with_axum(
    _: tokio::net::TcpListener,
    _: KeepAliveLayer,
    _: Option<TcpKeepalive>,
    _: Option<Duration>,
) -> std::io::Result<()> {
    eprintln!("--axum-serve needs the axum feature: cargo run --example server --features axum");
    std::process::exit(2)
}
