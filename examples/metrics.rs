//! The server's connection metrics at `/metrics`, through the `metrics` facade and
//! metrics-exporter-prometheus (feature `metrics`).
//!
//! ```text
//! cargo run --example metrics --features metrics
//! cargo run --example metrics --features metrics -- --addr 127.0.0.1:0
//! curl -s http://127.0.0.1:3000/ http://127.0.0.1:3000/ > /dev/null; curl -s http://127.0.0.1:3000/metrics
//! ```
//!
//! The exporter is installed as the process's recorder, without its own HTTP listener: the app's
//! `/metrics` route renders it. The crate records at connection events (open connections, closes by
//! reason, duration and requests of each closed connection, the connection budget's queued and shed
//! clients); the gauges that move with every request (idle connections, requests in flight) are copied
//! from the layer's `Stats` at each scrape. See the `tower_keepalive::metrics` module docs for every name.
//!
//! Ctrl-C drains and exits.

use std::net::SocketAddr;
use std::time::Duration;

use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tower_keepalive::KeepAliveLayer;
use tower_keepalive::Stats;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let prometheus = PrometheusBuilder::new()
        // Histograms with buckets (a Prometheus `histogram`), rather than the exporter's summaries.
        .set_buckets_for_metric(
            Matcher::Full("tower_keepalive_connection_duration_seconds".into()),
            &[0.1, 1.0, 5.0, 15.0, 60.0, 300.0, 3600.0],
        )
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full("tower_keepalive_connection_requests".into()),
                &[1.0, 2.0, 5.0, 10.0, 100.0, 1000.0],
            )
        })
        .expect("buckets are not empty")
        .install_recorder()
        .expect("no other recorder installed");
    tower_keepalive::metrics::describe();

    // Take the stats from the finished layer: each builder method returns a layer with fresh counters.
    let keep_alive = KeepAliveLayer::new()
        .idle_timeout(Duration::from_secs(5))
        .max_requests(100);
    let stats = keep_alive.stats();

    let app = Router::new().route("/", get(|| async { "hello\n" })).route(
        "/metrics",
        get(move || scrape(prometheus.clone(), stats.clone())),
    );

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

/// The Prometheus text format, version 0.0.4 (the `text/plain` that axum gives a `String` is what
/// Prometheus expects).
async fn scrape(prometheus: PrometheusHandle, stats: Stats) -> String {
    tower_keepalive::metrics::record_snapshot(&stats.snapshot());
    // Without the exporter's listener nothing runs its upkeep (draining histograms): do it per scrape.
    prometheus.run_upkeep();
    prometheus.render()
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
