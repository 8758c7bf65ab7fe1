//! A hand-written hyper-util accept loop with the keep-alive lifecycle and a graceful drain.
//!
//! ```text
//! cargo run --example hyper_util
//! cargo run --example hyper_util -- --addr 127.0.0.1:0
//! ```
//!
//! What `tower_keepalive::serve` does for you, written out: one `ConnectionHandle` per accepted
//! connection, the layer bound to that connection's service, the connection driven by a `DrainWatcher`
//! (idle timeout, maximum age, GOAWAY, drain), a tracing span per connection, and a `Drain` that closes
//! everything gracefully on Ctrl-C. HTTP/1.x and h2c on one port.
//!
//! Try `curl -sv http://127.0.0.1:3000/ http://127.0.0.1:3000/`, or start
//! `curl http://127.0.0.1:3000/slow` and press Ctrl-C while it runs: the slow response still arrives,
//! with `Connection: close`, and then the server exits.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tower::ServiceBuilder;
use tower_keepalive::serve::Drain;
use tower_keepalive::KeepAliveLayer;
use tracing::Instrument;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();

    let keep_alive = KeepAliveLayer::new()
        .idle_timeout(Duration::from_secs(5))
        .max_requests(100);

    // One builder for every connection. hyper's own HTTP/1 header timer would close idle connections
    // on its own schedule (and only with a `Timer` set): leave idle connections to the lifecycle.
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().header_read_timeout(None);

    let listener = tokio::net::TcpListener::bind(addr_from_args()).await?;
    println!("listening on http://{}", listener.local_addr()?);

    let drain = Drain::new();
    let mut ctrl_c = std::pin::pin!(tokio::signal::ctrl_c());
    loop {
        let (io, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // EMFILE and the like: back off rather than spin.
                    tracing::warn!(%err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut ctrl_c => break,
        };

        // The state of this connection: its request count, what is in flight, why it closed.
        let handle = keep_alive.connection();
        let svc = ServiceBuilder::new()
            .layer(keep_alive.bind(handle.clone()))
            .service_fn(handler);
        let conn = builder
            .serve_connection_with_upgrades(TokioIo::new(io), TowerToHyperService::new(svc))
            // The connection future borrows the builder; own it so the task can be spawned.
            .into_owned();
        // Counts as live until `drive` returns; `drain.drain()` waits for it.
        let watcher = drain.watcher();
        let span = tracing::info_span!("connection", %peer);
        tokio::spawn(
            async move {
                let reason = watcher.drive(handle.clone(), conn).await;
                tracing::info!(%reason, requests = handle.requests(), "closed");
            }
            .instrument(span),
        );
    }

    // Stop accepting, then close every connection gracefully: idle ones at once, busy ones after their
    // response (HTTP/1 `Connection: close`, HTTP/2 GOAWAY). Give up on stragglers after 30 s.
    drop(listener);
    println!("Ctrl-C: draining {} connections", drain.connections());
    let dropped = drain.drain(Some(Duration::from_secs(30))).await;
    println!("drained ({dropped} dropped at the deadline); bye");
    Ok(())
}

async fn handler(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let body = match req.uri().path() {
        "/slow" => {
            tokio::time::sleep(Duration::from_secs(3)).await;
            "slow, but finished\n"
        }
        _ => "hello from a hyper-util accept loop\n",
    };
    Ok(Response::new(Full::new(Bytes::from_static(
        body.as_bytes(),
    ))))
}

/// `--addr HOST:PORT`, 127.0.0.1:3000 by default.
fn addr_from_args() -> SocketAddr {
    let mut args = std::env::args().skip(1);
    let mut addr = SocketAddr::from(([127, 0, 0, 1], 3000));
    while let Some(arg) = args.next() {
        match (arg.as_str(), args.next().map(|v| v.parse())) {
            ("--addr", Some(Ok(a))) => addr = a,
            _ => {
                eprintln!("usage: hyper_util [--addr HOST:PORT]");
                std::process::exit(2);
            }
        }
    }
    addr
}
