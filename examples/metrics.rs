//! The layer's counters at `/metrics`, in the Prometheus text exposition format, written by hand.
//!
//! ```text
//! cargo run --example metrics
//! cargo run --example metrics -- --addr 127.0.0.1:0
//! curl -s http://127.0.0.1:3000/ http://127.0.0.1:3000/ > /dev/null; curl -s http://127.0.0.1:3000/metrics
//! ```
//!
//! `KeepAliveLayer::stats` is a live view of relaxed atomic counters kept by every connection of the layer:
//! a few atomic additions per request, no lock, cheap enough to leave on. No metrics framework is
//! needed to export them; this example renders a `StatsSnapshot` as:
//!
//! - counters: connections accepted, requests started, connections closed by reason (a `reason` label);
//! - gauges: connections open, connections idle, requests in flight;
//! - a histogram of requests per closed connection, with cumulative `le` buckets (0, 1, 3, 7, ... 65535,
//!   `+Inf`). It has a `_count` but no `_sum`: the snapshot does not carry one.
//!
//! Ctrl-C drains and exits.

use std::fmt::Write;
use std::net::SocketAddr;
use std::time::Duration;

use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tower_keepalive::KeepAliveLayer;
use tower_keepalive::{Stats, StatsSnapshot};

#[tokio::main]
async fn main() -> std::io::Result<()> {
    // Take the stats from the finished layer: each builder method returns a layer with fresh counters.
    let keep_alive = KeepAliveLayer::new()
        .idle_timeout(Duration::from_secs(5))
        .max_requests(100);
    let stats = keep_alive.stats();

    let app = Router::new()
        .route("/", get(|| async { "hello\n" }))
        .route("/metrics", get(move || metrics(stats.clone())));

    let listener = tokio::net::TcpListener::bind(addr_from_args()).await?;
    println!("listening on http://{}", listener.local_addr()?);
    tower_keepalive::serve(listener, app)
        .keep_alive(keep_alive)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .drain_timeout(Duration::from_secs(10))
        .await
}

async fn metrics(stats: Stats) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        render(&stats.snapshot()),
    )
}

/// One snapshot in the Prometheus text format, version 0.0.4.
fn render(s: &StatsSnapshot) -> String {
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        let _ = writeln!(out, "{name} {value}");
    };
    metric(
        "keepalive_connections_opened_total",
        "counter",
        "Connections accepted.",
        s.connections_opened(),
    );
    metric(
        "keepalive_connections_open",
        "gauge",
        "Connections open now.",
        s.connections_open(),
    );
    metric(
        "keepalive_connections_idle",
        "gauge",
        "Open connections with nothing in flight.",
        s.connections_idle(),
    );
    metric(
        "keepalive_requests_in_flight",
        "gauge",
        "Requests whose response is not fully sent yet.",
        s.in_flight(),
    );
    metric(
        "keepalive_requests_total",
        "counter",
        "Requests started.",
        s.requests(),
    );

    let name = "keepalive_connections_closed_total";
    let _ = writeln!(out, "# HELP {name} Connections closed, by reason.");
    let _ = writeln!(out, "# TYPE {name} counter");
    for (reason, count) in s.closes() {
        let _ = writeln!(out, "{name}{{reason=\"{reason}\"}} {count}");
    }

    // The snapshot gives per-bucket counts; Prometheus buckets are cumulative (`le`: at most).
    let name = "keepalive_requests_per_connection";
    let _ = writeln!(
        out,
        "# HELP {name} Requests served by each closed connection."
    );
    let _ = writeln!(out, "# TYPE {name} histogram");
    let mut cumulative = 0;
    for (bound, count) in s.requests_per_connection() {
        cumulative += count;
        let le = if bound == u64::MAX {
            "+Inf".to_string()
        } else {
            bound.to_string()
        };
        let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
    }
    let _ = writeln!(out, "{name}_count {cumulative}");
    out
}

/// `--addr HOST:PORT`, 127.0.0.1:3000 by default.
fn addr_from_args() -> SocketAddr {
    let mut args = std::env::args().skip(1);
    let mut addr = SocketAddr::from(([127, 0, 0, 1], 3000));
    while let Some(arg) = args.next() {
        match (arg.as_str(), args.next().map(|v| v.parse())) {
            ("--addr", Some(Ok(a))) => addr = a,
            _ => {
                eprintln!("usage: metrics [--addr HOST:PORT]");
                std::process::exit(2);
            }
        }
    }
    addr
}
