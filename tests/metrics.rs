//! The `metrics` feature, seen from a real server: a Prometheus recorder installed for this test binary,
//! a known sequence of connections on the crate's serve path, then a scrape checked value by value.
//!
//! The recorder is the process's global one (the serve path records from its connection tasks, which a
//! thread-local recorder would not see), so this binary has a single test: another running beside it
//! would add to the same counters.
#![cfg(feature = "metrics")]

mod support;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use support::http1::*;
use support::http2::*;
use support::server::*;
use support::*;
use tokio::net::TcpStream;
use tower_keepalive::{CloseReason, KeepAliveLayer};

const IDLE: Duration = Duration::from_secs(1);

fn install_recorder() -> PrometheusHandle {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full("tower_keepalive_connection_requests".into()),
            &[0.0, 1.0, 2.0, 3.0],
        )
        .unwrap()
        .set_buckets_for_metric(
            Matcher::Full("tower_keepalive_connection_duration_seconds".into()),
            &[0.5, 60.0],
        )
        .unwrap()
        .install_recorder()
        .expect("the only recorder of this test binary");
    tower_keepalive::metrics::describe();
    handle
}

/// A scrape: each sample by its name and its labels (sorted, `k="v"` joined by commas).
struct Scrape {
    samples: BTreeMap<(String, String), f64>,
    text: String,
}

impl Scrape {
    fn new(handle: &PrometheusHandle) -> Self {
        let text = handle.render();
        let mut samples = BTreeMap::new();
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let (series, value) = line.rsplit_once(' ').expect("a sample line");
            let (name, labels) = match series.split_once('{') {
                Some((name, labels)) => {
                    let mut labels: Vec<&str> = labels.trim_end_matches('}').split(',').collect();
                    labels.sort();
                    (name, labels.join(","))
                }
                None => (series, String::new()),
            };
            samples.insert((name.to_string(), labels), value.parse().unwrap());
        }
        Scrape { samples, text }
    }

    /// The sample `name{labels}`; `labels` sorted by name as `k="v"` joined by commas. Absent: 0.
    #[track_caller]
    fn get(&self, name: &str, labels: &str) -> f64 {
        self.samples
            .get(&(name.to_string(), labels.to_string()))
            .copied()
            .unwrap_or(0.0)
    }
}

#[tokio::test]
async fn connections_are_recorded_at_their_events() {
    let metrics = install_recorder();
    let layer = KeepAliveLayer::new().max_requests(3).idle_timeout(IDLE);
    let mut server = start(layer).await;

    // A: three requests, the last one at the limit.
    let mut a = RawClient::connect(server.addr).await;
    for _ in 0..3 {
        assert_eq!(a.get("/").await.status, 200);
    }
    a.expect_eof().await;
    // As clients do on a close: the server's lingering close then ends at once.
    drop(a);
    assert_eq!(server.next_close().await.reason, CloseReason::MaxRequests);

    // B: two requests, then the client goes.
    let mut b = RawClient::connect(server.addr).await;
    for _ in 0..2 {
        assert_eq!(b.get("/").await.status, 200);
    }
    drop(b);
    assert_eq!(server.next_close().await.reason, CloseReason::ClientClosed);

    // C (HTTP/1.1), D (h2c) and E (never says a word) are open, then closed for idleness.
    let mut c = RawClient::connect(server.addr).await;
    for _ in 0..2 {
        assert_eq!(c.get("/").await.status, 200);
    }
    let mut d = H2::connect(server.addr).await;
    for _ in 0..2 {
        assert_eq!(d.get("/").await.0, 200);
    }
    let e = within("connect", TcpStream::connect(server.addr))
        .await
        .unwrap();
    let mut idle = Vec::new();
    for _ in 0..3 {
        let closed = server.next_close().await;
        idle.push((closed.reason, closed.handle.requests()));
    }
    idle.sort_by_key(|&(_, requests)| requests);
    assert_eq!(
        idle,
        [
            (CloseReason::Idle, 0),
            (CloseReason::Idle, 2),
            (CloseReason::Idle, 2)
        ]
    );
    c.expect_eof().await;
    d.closed(WAIT).await;
    drop(e);

    let s = Scrape::new(&metrics);
    let text = &s.text;
    assert_eq!(
        s.get("tower_keepalive_active_connections", ""),
        0.0,
        "{text}"
    );
    let closed = "tower_keepalive_closed_connections_total";
    assert_eq!(
        s.get(closed, r#"protocol="http1",reason="max_requests""#),
        1.0,
        "{text}"
    );
    assert_eq!(
        s.get(closed, r#"protocol="http1",reason="client_closed""#),
        1.0,
        "{text}"
    );
    assert_eq!(
        s.get(closed, r#"protocol="http1",reason="idle""#),
        1.0,
        "{text}"
    );
    assert_eq!(
        s.get(closed, r#"protocol="http2",reason="idle""#),
        1.0,
        "{text}"
    );
    assert_eq!(
        s.get(closed, r#"protocol="none",reason="idle""#),
        1.0,
        "{text}"
    );

    // Requests per connection: 3, 2, 2 over HTTP/1.1, 2 over h2c, none on the silent one.
    let requests = "tower_keepalive_connection_requests";
    let http1 = r#"protocol="http1""#;
    assert_eq!(s.get(&format!("{requests}_count"), http1), 3.0, "{text}");
    assert_eq!(s.get(&format!("{requests}_sum"), http1), 7.0, "{text}");
    let bucket = |le: &str| {
        s.get(
            &format!("{requests}_bucket"),
            &format!(r#"le="{le}",{http1}"#),
        )
    };
    assert_eq!(
        (bucket("1"), bucket("2"), bucket("3")),
        (0.0, 2.0, 3.0),
        "{text}"
    );
    assert_eq!(
        s.get(&format!("{requests}_sum"), r#"protocol="http2""#),
        2.0,
        "{text}"
    );
    assert_eq!(
        s.get(&format!("{requests}_count"), r#"protocol="none""#),
        1.0,
        "{text}"
    );

    // Durations: the idle connections lasted at least the idle timeout, the others less.
    let duration = "tower_keepalive_connection_duration_seconds";
    for (protocol, reason, at_least_idle) in [
        ("http1", "max_requests", false),
        ("http1", "client_closed", false),
        ("http1", "idle", true),
        ("http2", "idle", true),
        ("none", "idle", true),
    ] {
        let labels = format!(r#"protocol="{protocol}",reason="{reason}""#);
        assert_eq!(
            s.get(&format!("{duration}_count"), &labels),
            1.0,
            "{labels}: {text}"
        );
        let seconds = s.get(&format!("{duration}_sum"), &labels);
        assert_eq!(
            seconds >= IDLE.as_secs_f64(),
            at_least_idle,
            "{labels}: {seconds} s"
        );
        let short = s.get(
            &format!("{duration}_bucket"),
            &format!(r#"le="0.5",{labels}"#),
        );
        assert_eq!(
            short,
            if at_least_idle { 0.0 } else { 1.0 },
            "{labels}: {text}"
        );
    }
    assert!(
        text.contains("# HELP tower_keepalive_active_connections Connections open now."),
        "{text}"
    );
    assert_eq!(s.get("tower_keepalive_queued_connections_total", ""), 0.0);

    // The budget at its hard limit: one connection allowed; F idles, G arrives, waits, and F is shed.
    let app = tower::service_fn(|_req: http::Request<hyper::body::Incoming>| async {
        Ok::<_, Infallible>(http::Response::new(String::from("hello")))
    });
    let layer = KeepAliveLayer::new().idle_timeout(Duration::from_secs(60));
    let stats = layer.stats();
    let mut budget_server = TestServer::builder(layer)
        .connection_limits(0, 1)
        .serve(app);
    let addr = budget_server.addr;
    let mut f = RawClient::connect(addr).await;
    assert_eq!(f.get("/").await.status, 200);
    let mut g = RawClient::connect(addr).await;
    assert_eq!(g.get("/").await.status, 200);
    let reason = budget_server.next_close().await.reason;
    assert_eq!(reason, CloseReason::Pressure);
    f.expect_eof().await;

    tower_keepalive::metrics::record_snapshot(&stats.snapshot());
    let s = Scrape::new(&metrics);
    let text = &s.text;
    assert_eq!(
        s.get("tower_keepalive_queued_connections_total", ""),
        1.0,
        "{text}"
    );
    assert_eq!(
        s.get("tower_keepalive_shed_connections_total", ""),
        1.0,
        "{text}"
    );
    assert_eq!(
        s.get(closed, r#"protocol="http1",reason="pressure""#),
        1.0,
        "{text}"
    );
    // G is open and idle, at the hard limit.
    assert_eq!(
        s.get("tower_keepalive_active_connections", ""),
        1.0,
        "{text}"
    );
    assert_eq!(s.get("tower_keepalive_idle_connections", ""), 1.0, "{text}");
    assert_eq!(s.get("tower_keepalive_active_requests", ""), 0.0, "{text}");
    assert_eq!(
        s.get("tower_keepalive_connection_pressure", ""),
        1.0,
        "{text}"
    );
    assert_eq!(
        s.get("tower_keepalive_hibernating_connections", ""),
        0.0,
        "{text}"
    );
    // Idle past the serve path's hibernation delay, G hibernates, and the gauge says so.
    within("G to hibernate", async {
        while stats.snapshot().connections_hibernating() != 1 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    tower_keepalive::metrics::record_snapshot(&stats.snapshot());
    let s = Scrape::new(&metrics);
    let text = &s.text;
    assert_eq!(
        s.get("tower_keepalive_hibernating_connections", ""),
        1.0,
        "{text}"
    );
    assert_eq!(s.get("tower_keepalive_idle_connections", ""), 1.0, "{text}");
    drop(budget_server);
}
