//! The connection budget: idle keep-alive connections yield to new clients, requests in flight never do.

mod support;

use std::time::{Duration, Instant};

use axum::routing::get;
use axum::Router;
use support::http1::{http_get, RawClient};
use support::server::TestServer;
use support::within;
use tower_keepalive::{CloseReason, KeepAliveLayer};

/// A server with the connection budget `soft`/`hard` and an idle timeout of `idle`: `/` answers `hello`,
/// `/slow` answers `slow` after 2 s.
fn start(soft: usize, hard: usize, idle: Duration) -> (TestServer, KeepAliveLayer) {
    let app = Router::new().route("/", get(|| async { "hello" })).route(
        "/slow",
        get(|| async {
            tokio::time::sleep(Duration::from_millis(2000)).await;
            "slow"
        }),
    );
    let layer = KeepAliveLayer::new().idle_timeout(idle);
    let server = TestServer::builder(layer.clone())
        .connection_limits(soft, hard)
        .serve(app);
    (server, layer)
}

#[tokio::test]
async fn idle_connections_yield_to_new_clients_and_busy_ones_do_not() {
    // Hard limit 4, soft 2; a 16 s timeout shrinks to 1 s at the hard limit.
    let (mut server, layer) = start(2, 4, Duration::from_secs(16));
    let addr = server.addr;
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
    let reasons = server.reasons_so_far();
    let shed = reasons
        .iter()
        .filter(|r| **r == CloseReason::Pressure)
        .count();
    assert!(shed >= 4, "{reasons:?}");
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
    let (mut server, _layer) = start(8, 16, Duration::from_secs(5));
    let addr = server.addr;
    let mut clients = Vec::new();
    for _ in 0..8 {
        let mut client = RawClient::connect(addr).await;
        let res = client.request(http_get("/", "HTTP/1.1", &[])).await;
        assert_eq!(res.header("keep-alive"), Some("timeout=5, max=999"));
        clients.push(client);
    }
    assert!(server.reasons_so_far().is_empty());
}

/// At the hard limit a new client does not wait for a shortened idle timeout to run out: the idle
/// connection idle the longest is closed at once to make room, and a request in flight is never cut.
#[tokio::test]
async fn at_the_hard_limit_a_new_client_is_served_at_once() {
    // A 30 s timeout would shrink to about 1.9 s at the hard limit.
    let (mut server, _layer) = start(3, 4, Duration::from_secs(30));
    let addr = server.addr;
    let get = http_get("/", "HTTP/1.1", &[]);
    let mut busy = RawClient::connect(addr).await;
    busy.send(http_get("/slow", "HTTP/1.1", &[])).await;
    let mut idle = Vec::new();
    for _ in 0..3 {
        let mut client = RawClient::connect(addr).await;
        assert_eq!(client.request(&get).await.body_str(), "hello");
        idle.push(client);
    }
    for round in 0..3 {
        let started = Instant::now();
        let mut client = RawClient::connect(addr).await;
        let res = client.request(&get).await;
        let waited = started.elapsed();
        assert_eq!(res.body_str(), "hello");
        assert!(
            waited < Duration::from_secs(1),
            "round {round}: a new client waited {waited:?}"
        );
        // The longest idle went, cleanly.
        within("the shed connection to close", idle[round].expect_eof()).await;
        idle.push(client);
    }
    assert_eq!(
        server.reasons_so_far(),
        [CloseReason::Pressure; 3],
        "shed for pressure, nothing else"
    );
    let res = within("the slow response", busy.read_response()).await;
    assert_eq!(res.body_str(), "slow");
}

/// Under pressure, connections that never finished a request head (silent, or dribbling it) are the
/// first to go, before idle keep-alive connections with real requests behind them.
#[tokio::test]
async fn connections_without_a_request_are_shed_first() {
    // A header timeout that pressure shrinks to no less than 4 s (a sixteenth), longer than the wait
    // below: the unfinished heads must still be open when the new clients come.
    let layer = KeepAliveLayer::new().idle_timeout(Duration::from_secs(30));
    let mut server = TestServer::builder(layer)
        .connection_limits(3, 4)
        .header_timeout(Duration::from_secs(64))
        .serve(Router::new().route("/", get(|| async { "hello" })));
    let addr = server.addr;
    let get = http_get("/", "HTTP/1.1", &[]);
    // Two clients with a history of requests, idle the longest.
    let mut kept = Vec::new();
    for _ in 0..2 {
        let mut client = RawClient::connect(addr).await;
        assert_eq!(client.request(&get).await.body_str(), "hello");
        kept.push(client);
    }
    // Then a silent client and a slow head.
    let mut silent = RawClient::connect(addr).await;
    let mut dribbling = RawClient::connect(addr).await;
    dribbling.send("GET / HTTP/1.1\r\nHost: x\r\n").await;
    // A connection accepted just now may have its first request on the way, and is shed last; past
    // a second without a finished head, it goes first. No event marks that second: it is waited out.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    for _ in 0..2 {
        let started = Instant::now();
        let mut client = RawClient::connect(addr).await;
        assert_eq!(client.request(&get).await.body_str(), "hello");
        assert!(started.elapsed() < Duration::from_secs(1));
        // Kept open with the client: the budget is full again.
        kept.push(client);
    }
    within("the silent client's close", silent.eof()).await;
    within("the slow head's close", dribbling.eof()).await;
    assert_eq!(server.reasons_so_far(), [CloseReason::Pressure; 2]);
    // The clients with requests behind them were left alone.
    for client in &mut kept[..2] {
        assert_eq!(client.request(&get).await.body_str(), "hello");
    }
}

#[tokio::test]
async fn a_connection_accepted_just_now_is_shed_after_idle_keep_alive_ones() {
    let (mut server, _layer) = start(1, 2, Duration::from_secs(30));
    let addr = server.addr;
    let get = http_get("/", "HTTP/1.1", &[]);
    // One client with a history of requests, idle.
    let mut kept = RawClient::connect(addr).await;
    assert_eq!(kept.request(&get).await.body_str(), "hello");
    // A client whose first request is on its way (half of its head is in) when the next one arrives
    // at the full budget: the idle keep-alive connection makes room, not the fresh one. The server
    // gives no sign of having read the first half: a moment is waited out for it.
    let mut fresh = RawClient::connect(addr).await;
    fresh.send("GET / HTTP/1.1\r\n").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _next = RawClient::connect(addr).await;
    within("the idle keep-alive connection's close", kept.eof()).await;
    assert_eq!(server.reasons_so_far(), [CloseReason::Pressure]);
    fresh.send("Host: x\r\n\r\n").await;
    assert_eq!(fresh.read_response().await.body_str(), "hello");
}
