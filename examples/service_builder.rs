//! A `ServiceBuilder` stack: tower-http's compression, trace and timeout layers beside `KeepAliveLayer`,
//! bound to each connection in a hyper-util accept loop.
//!
//! ```text
//! cargo run --example service_builder
//! cargo run --example service_builder -- --addr 127.0.0.1:0
//! ```
//!
//! Try:
//!
//! ```text
//! curl -sv --compressed http://127.0.0.1:3000/ http://127.0.0.1:3000/   # gzip, keep-alive, `max=` counting down
//! curl -sv http://127.0.0.1:3000/slow                                     # 408 from the timeout layer, still kept alive
//! ```
//!
//! The order matters. `ServiceBuilder` applies its layers outside in: the first one sees the request first
//! and the response last. The keep-alive layer goes first (outermost), so that:
//!
//! - its `Connection` / `Keep-Alive` fields go on the final response, whatever the layers inside did
//!   (a 408 from the timeout, a compressed body);
//! - a request counts as done only when the final, compressed body has been fully sent: the connection is
//!   not idle while the compressor is still streaming.
//!
//! Then trace (one span per request, inside the connection's span), compression, and the timeout
//! innermost, so that it bounds the handler alone.
//!
//! This loop uses `ConnectionHandle::drive` without a drain: Ctrl-C ends the process at once. See
//! `examples/hyper_util.rs` for a graceful drain.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tower::ServiceBuilder;
use tower_http::compression::CompressionLayer;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;
use tower_keepalive::KeepAliveLayer;
use tracing::Instrument;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,tower_http=debug".into()),
        )
        .init();

    let keep_alive = KeepAliveLayer::new()
        .idle_timeout(Duration::from_secs(5))
        .max_requests(100);

    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().header_read_timeout(None);

    let listener = tokio::net::TcpListener::bind(addr_from_args()).await?;
    println!("listening on http://{}", listener.local_addr()?);

    let accept_loop = async {
        loop {
            let (io, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(err) => {
                    tracing::warn!(%err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let handle = keep_alive.connection();
            let svc = ServiceBuilder::new()
                // Outermost: sees the final response and the final body.
                .layer(keep_alive.bind(handle.clone()))
                .layer(TraceLayer::new_for_http())
                .layer(CompressionLayer::new())
                // Innermost: bounds the handler; answers 408 when it takes too long.
                .layer(TimeoutLayer::with_status_code(
                    StatusCode::REQUEST_TIMEOUT,
                    Duration::from_secs(1),
                ))
                .service_fn(handler);
            let conn = builder
                .serve_connection_with_upgrades(TokioIo::new(io), TowerToHyperService::new(svc))
                .into_owned();
            tokio::spawn(
                async move {
                    let reason = handle.clone().drive(conn).await;
                    tracing::info!(%reason, requests = handle.requests(), "closed");
                }
                .instrument(tracing::info_span!("connection", %peer)),
            );
        }
    };

    tokio::select! {
        () = accept_loop => {}
        _ = tokio::signal::ctrl_c() => println!("Ctrl-C: bye"),
    }
    Ok(())
}

async fn handler(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.uri().path() == "/slow" {
        // Longer than the timeout layer allows.
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    // Long and repetitive enough to be worth compressing.
    let body = "hello from a ServiceBuilder stack\n".repeat(50);
    Ok(Response::builder()
        .header(http::header::CONTENT_TYPE, "text/plain")
        .body(Full::new(Bytes::from(body)))
        .expect("a valid response"))
}

/// `--addr HOST:PORT`, 127.0.0.1:3000 by default.
fn addr_from_args() -> SocketAddr {
    let mut args = std::env::args().skip(1);
    let mut addr = SocketAddr::from(([127, 0, 0, 1], 3000));
    while let Some(arg) = args.next() {
        match (arg.as_str(), args.next().map(|v| v.parse())) {
            ("--addr", Some(Ok(a))) => addr = a,
            _ => {
                eprintln!("usage: service_builder [--addr HOST:PORT]");
                std::process::exit(2);
            }
        }
    }
    addr
}
