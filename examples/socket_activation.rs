//! Socket activation: serve on a listening socket bound by someone else (systemd, `systemfd`), and
//! bind one yourself when run without it.
//!
//! ```text
//! # by hand: binds 127.0.0.1:3000 itself
//! cargo run --example socket_activation
//! # with systemfd (cargo install systemfd): the socket outlives restarts of the server
//! systemfd --no-pid -s http::3000 -- cargo run --example socket_activation
//! ```
//!
//! Under systemd, a `.socket` unit holds the socket and starts the service on the first connection:
//!
//! ```text
//! # app.socket                     # app.service
//! [Socket]                         [Service]
//! ListenStream=0.0.0.0:8080        ExecStart=/usr/local/bin/app
//! [Install]
//! WantedBy=sockets.target
//! ```
//!
//! systemd and `systemfd` pass the socket as descriptor 3 with `LISTEN_FDS=1` and `LISTEN_PID` set;
//! the `listenfd` crate reads them. Two things to get right:
//!
//! - the socket arrives in blocking mode, and `tokio::net::TcpListener::from_std` does not change
//!   that: without `set_nonblocking(true)` the first `accept` with no client waiting blocks a runtime
//!   thread (and the whole server on a current-thread runtime);
//! - the socket is not the server's to close: when the server drains and drops its listener, systemd
//!   still holds the socket, so clients connecting meanwhile wait in its backlog for the next instance
//!   instead of being refused. The serve path's drain works as usual.

use std::time::Duration;

use axum::routing::get;
use axum::Router;
use tower_keepalive::KeepAliveLayer;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let listener = match listenfd::ListenFd::from_env().take_tcp_listener(0)? {
        Some(listener) => {
            // Blocking as passed in: tokio needs it non-blocking.
            listener.set_nonblocking(true)?;
            tokio::net::TcpListener::from_std(listener)?
        }
        None => tokio::net::TcpListener::bind("127.0.0.1:3000").await?,
    };
    println!("listening on http://{}", listener.local_addr()?);

    let app = Router::new().route("/", get(|| async { "hello" }));
    tower_keepalive::serve(listener, app)
        .keep_alive(KeepAliveLayer::new().idle_timeout(Duration::from_secs(30)))
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .drain_timeout(Duration::from_secs(10))
        .await
}
