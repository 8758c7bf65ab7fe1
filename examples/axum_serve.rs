//! Keeping `axum::serve`: the same keep-alive lifecycle through axum's own server loop.
//!
//! ```text
//! cargo run --example axum_serve --features axum
//! cargo run --example axum_serve --features axum -- --addr 127.0.0.1:0
//! ```
//!
//! `axum::serve` sets no timer on hyper, so on its own an idle connection stays open until the client
//! leaves. Two pieces from `tower_keepalive::axum` fix that without leaving axum's server:
//!
//! - `KeepAliveListener` wraps the TCP listener: every accepted connection carries its own
//!   `ConnectionHandle` and one idle timer, which ends the connection once it has been idle for the
//!   timeout;
//! - `into_make_service` replaces `Router::into_make_service`: the keep-alive layer is bound to each
//!   connection's handle and applied to the whole router, so every request is counted.
//!
//! Try `curl -sv http://127.0.0.1:3000/ http://127.0.0.1:3000/` (`max=` counts down on one connection),
//! or `nc 127.0.0.1 3000` and wait: the server closes the silent connection after the idle timeout.
//! Ctrl-C stops accepting, lets requests in flight finish with `Connection: close`, and exits.
//!
//! Prefer `tower_keepalive::serve` (see `examples/axum.rs`) where you can: it takes the same `Router`,
//! and it closes idle HTTP/2 connections with GOAWAY, which a listener cannot send.

use std::net::SocketAddr;
use std::time::Duration;

use axum::routing::get;
use axum::Router;
use tower_keepalive::axum::{into_make_service, KeepAliveListener};
use tower_keepalive::KeepAliveLayer;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let app = Router::new().route("/", get(|| async { "hello from axum::serve\n" }));

    let keep_alive = KeepAliveLayer::new()
        .idle_timeout(Duration::from_secs(5))
        .max_requests(100);
    // Read the counters from the finished layer: the listener shares them.
    let stats = keep_alive.stats();

    let tcp = tokio::net::TcpListener::bind(addr_from_args()).await?;
    println!("listening on http://{}", tcp.local_addr()?);
    let listener = KeepAliveListener::new(tcp, keep_alive);

    // From the signal on, responses say `Connection: close` instead of advertising keep-alive; axum's
    // graceful shutdown then waits for the connections to finish.
    let shutdown = listener.on_shutdown(async {
        let _ = tokio::signal::ctrl_c().await;
        println!("Ctrl-C: shutting down");
    });

    axum::serve(listener, into_make_service(app))
        .with_graceful_shutdown(shutdown)
        .await?;

    let s = stats.snapshot();
    println!(
        "bye: {} connections, {} requests; closed idle: {}, at max requests: {}",
        s.connections_opened(),
        s.requests(),
        s.closed(tower_keepalive::CloseReason::Idle),
        s.closed(tower_keepalive::CloseReason::MaxRequests),
    );
    Ok(())
}

/// `--addr HOST:PORT`, 127.0.0.1:3000 by default.
fn addr_from_args() -> SocketAddr {
    let mut args = std::env::args().skip(1);
    let mut addr = SocketAddr::from(([127, 0, 0, 1], 3000));
    while let Some(arg) = args.next() {
        match (arg.as_str(), args.next().map(|v| v.parse())) {
            ("--addr", Some(Ok(a))) => addr = a,
            _ => {
                eprintln!("usage: axum_serve [--addr HOST:PORT]");
                std::process::exit(2);
            }
        }
    }
    addr
}
