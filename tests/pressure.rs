//! The connection budget: idle keep-alive connections yield to new clients, requests in flight never do.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::routing::get;
use axum::Router;
use common::{http_get, within, RawClient};
use tokio::net::TcpListener;
use tower_keepalive::{CloseReason, KeepAliveLayer};

use std::future::IntoFuture;

type Reasons = Arc<Mutex<Vec<CloseReason>>>;

async fn start(soft: usize, hard: usize, idle: Duration) -> (SocketAddr, Reasons, KeepAliveLayer) {
    let app = Router::new().route("/", get(|| async { "hello" })).route(
        "/slow",
        get(|| async {
            tokio::time::sleep(Duration::from_millis(2000)).await;
            "slow"
        }),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let reasons = Reasons::default();
    let seen = reasons.clone();
    let layer = KeepAliveLayer::new().idle_timeout(idle);
    let server = tower_keepalive::serve(listener, app)
        .keep_alive(layer.clone())
        .connection_limits(soft, hard)
        .on_close(move |_, reason| seen.lock().unwrap().push(reason));
    tokio::spawn(server.into_future());
    (addr, reasons, layer)
}

#[tokio::test]
async fn idle_connections_yield_to_new_clients_and_busy_ones_do_not() {
    // Hard limit 4, soft 2; a 16 s timeout shrinks to 1 s at the hard limit.
    let (addr, reasons, layer) = start(2, 4, Duration::from_secs(16)).await;
    let stats = layer.stats();
    let get = http_get("/", "HTTP/1.1", &[]);

    // One connection busy with a slow request for the whole test.
    let mut busy = RawClient::connect(addr).await;
    busy.send(http_get("/slow", "HTTP/1.1", &[])).await;

    // Twice the budget of clients, each holding an idle keep-alive connection once answered.
    let mut idle = Vec::new();
    let mut adverts = Vec::new();
    let first_answered = Instant::now();
    for _ in 0..8 {
        let started = Instant::now();
        let mut client = RawClient::connect(addr).await;
        let res = client.request(&get).await;
        assert_eq!(res.body_str(), "hello");
        // Served within a bounded time: the longest idle connection yields after a sixteenth of the
        // timeout at most.
        let waited = started.elapsed();
        assert!(
            waited < Duration::from_secs(4),
            "new client waited {waited:?}"
        );
        adverts.push(res.header("keep-alive").unwrap().to_string());
        idle.push(client);
    }

    // The request in flight was never cut.
    let res = within("the slow response", busy.read_response()).await;
    assert_eq!(res.body_str(), "slow");

    // Under pressure, the advertised timeout shrank with the enforced one.
    assert_eq!(adverts[0], "timeout=16, max=999", "{adverts:?}");
    // At the hard limit: a sixteenth of the timeout.
    assert!(
        adverts.iter().any(|a| a == "timeout=1, max=999"),
        "{adverts:?}"
    );
    // The clients admitted early were shed for pressure, longest idle first.
    let shed = reasons
        .lock()
        .unwrap()
        .iter()
        .filter(|r| **r == CloseReason::Pressure)
        .count();
    assert!(shed >= 4, "{:?}", reasons.lock().unwrap());
    assert!(stats.snapshot().closed(CloseReason::Pressure) >= 4);
    assert!(stats.snapshot().connections_open() <= 4);
    // The documented exception to "never before the advertised timeout": the first client was told
    // `timeout=16`, and its connection closed long before that, cleanly and with no bytes sent.
    for client in &mut idle[..4] {
        within("the shed connection to close", client.expect_eof()).await;
    }
    assert!(
        first_answered.elapsed() < Duration::from_secs(16),
        "the shed connections outlived their advert"
    );
}

#[tokio::test]
async fn below_the_soft_limit_nothing_changes() {
    let (addr, reasons, _layer) = start(8, 16, Duration::from_secs(5)).await;
    let mut clients = Vec::new();
    for _ in 0..8 {
        let mut client = RawClient::connect(addr).await;
        let res = client.request(http_get("/", "HTTP/1.1", &[])).await;
        assert_eq!(res.header("keep-alive"), Some("timeout=5, max=999"));
        clients.push(client);
    }
    assert!(reasons.lock().unwrap().is_empty());
}
