//! An axum `Router` served with `tower_keepalive::serve`: the crate's serve path.
//!
//! ```text
//! cargo run --example axum                          # 127.0.0.1:3000
//! cargo run --example axum -- --addr 127.0.0.1:0    # any free port
//! ```
//!
//! Then, from another terminal:
//!
//! ```text
//! curl -sv http://127.0.0.1:3000/ http://127.0.0.1:3000/        # one connection, `max=` counting down
//! curl -sv --http2-prior-knowledge http://127.0.0.1:3000/        # h2c: no connection fields at all
//! curl -s -H 'Connection: x-secret' -H 'X-Secret: 1' http://127.0.0.1:3000/headers
//! ```
//!
//! The serve path applies the keep-alive layer to the whole router itself (do not add it with
//! `Router::layer` as well), gives every connection its own handle, and closes connections that stay idle
//! for 10 s, that have served 100 requests, or that are older than 5 minutes (give or take 10 %).
//! Ctrl-C drains: idle connections close at once, requests in flight finish with `Connection: close`.
//! Set `RUST_LOG=tower_keepalive=debug` to see each connection's tracing span and close event.

use std::net::SocketAddr;
use std::time::Duration;

use axum::http::HeaderMap;
use axum::routing::get;
use axum::Router;
use tower_keepalive::KeepAliveLayer;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,tower_keepalive=debug".into()),
        )
        .init();

    let app = Router::new()
        .route("/", get(|| async { "hello from tower-keepalive\n" }))
        // Shows what reached the handler; compare with what curl sent.
        .route("/headers", get(echo_headers))
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(3)).await;
                "slow, but never cut by the idle timeout\n"
            }),
        );

    let keep_alive = KeepAliveLayer::new()
        .idle_timeout(Duration::from_secs(10))
        .max_requests(100)
        .max_age(Duration::from_secs(300));

    let listener = tokio::net::TcpListener::bind(addr_from_args()).await?;
    println!("listening on http://{}", listener.local_addr()?);

    tower_keepalive::serve(listener, app)
        .keep_alive(keep_alive)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
            println!("Ctrl-C: draining");
        })
        // Requests still running 30 s after Ctrl-C are dropped.
        .drain_timeout(Duration::from_secs(30))
        .on_close(|conn, reason| {
            println!(
                "connection closed: {reason}, {} requests, open {:?}",
                conn.requests(),
                conn.opened_at().elapsed()
            );
        })
        .await?;
    println!("drained; bye");
    Ok(())
}

async fn echo_headers(headers: HeaderMap) -> String {
    headers
        .iter()
        .map(|(name, value)| format!("{name}: {}\n", String::from_utf8_lossy(value.as_bytes())))
        .collect()
}

/// `--addr HOST:PORT`, 127.0.0.1:3000 by default.
fn addr_from_args() -> SocketAddr {
    let mut args = std::env::args().skip(1);
    let mut addr = SocketAddr::from(([127, 0, 0, 1], 3000));
    while let Some(arg) = args.next() {
        match (arg.as_str(), args.next().map(|v| v.parse())) {
            ("--addr", Some(Ok(a))) => addr = a,
            _ => {
                eprintln!("usage: axum [--addr HOST:PORT]");
                std::process::exit(2);
            }
        }
    }
    addr
}
