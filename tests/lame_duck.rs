//! The lame-duck period before the drain (`Serve::lame_duck`, `KeepAliveListener::lame_duck`), over real
//! sockets on loopback: still accepting and serving, keeping nothing alive, then the drain.
//!
//! Timing: "not before" bounds are strict; "soon after" ones allow [`SLACK`] for a loaded machine. Every
//! wait is bounded.

mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use http::StatusCode;
use support::http1::*;
use support::http2::*;
use support::server::*;
use support::*;
use tokio::net::TcpStream;
use tower_keepalive::{CloseReason, KeepAliveLayer};

/// Long enough that nothing in these tests closes for being idle.
fn layer() -> KeepAliveLayer {
    KeepAliveLayer::new().idle_timeout(Duration::from_secs(30))
}

/// The reasons of the next `n` closes, counted.
async fn reasons<A>(server: &mut TestServer<A>, n: usize) -> HashMap<CloseReason, usize> {
    let mut seen = HashMap::new();
    for _ in 0..n {
        *seen.entry(server.next_close().await.reason).or_default() += 1;
    }
    seen
}

async fn assert_refused(addr: std::net::SocketAddr) {
    let refused = within("connect", TcpStream::connect(addr)).await;
    assert!(
        refused.is_err(),
        "a new connection was accepted after the lame-duck period"
    );
}

#[tokio::test]
async fn http1_lame_duck_serves_new_connections_with_close_then_drains() {
    let period = Duration::from_secs(3);
    let layer = layer();
    let stats = layer.stats();
    let mut server = TestServer::builder(layer).lame_duck(period).start();
    let mut idle = RawClient::connect(server.addr).await;
    let res = idle.get("/").await;
    assert_eq!(res.header("connection"), Some("keep-alive"));
    let mut busy = RawClient::connect(server.addr).await;
    busy.send(get_request("/slow?ms=1000")).await;
    assert_eq!(server.handler_started().await, "slow");

    server.shutdown();
    let signalled = Instant::now();
    // The idle keep-alive connection is closed at once, quietly.
    let eof = idle.eof().await;
    assert!(
        eof.duration_since(signalled) < SLACK,
        "idle connection not closed at once"
    );
    drop(idle);
    // The listener still accepts, and serves; the response says close.
    let mut fresh = RawClient::connect(server.addr).await;
    let res = fresh.get("/").await;
    assert_eq!((res.status, res.body_str()), (200, "hello"));
    assert_eq!(res.values("connection"), ["close"], "{res:#?}");
    assert_eq!(res.header("keep-alive"), None);
    fresh.expect_eof().await;
    // As clients do on a close: the server's lingering close ends at once.
    drop(fresh);
    // The request in flight at the signal finishes, with close.
    let res = busy.read_response().await;
    assert_eq!((res.status, res.body_str()), (200, "slept"));
    assert_eq!(res.values("connection"), ["close"], "{res:#?}");
    busy.expect_eof().await;
    drop(busy);
    // A connection that has not sent its request is left to send it during the period...
    let mut silent = RawClient::connect(server.addr).await;
    assert_eq!(
        reasons(&mut server, 3).await,
        HashMap::from([(CloseReason::LameDuck, 3)])
    );
    // ... and closed by the drain, which begins when the period is over.
    let drained = silent.eof().await;
    assert_between(
        "the drain",
        drained.duration_since(signalled),
        period,
        period + SLACK,
    );
    assert_refused(server.addr).await;
    server.finished(WAIT).await;
    assert_eq!(server.next_close().await.reason, CloseReason::Drain);
    let snapshot = stats.snapshot();
    assert_eq!(snapshot.closed(CloseReason::LameDuck), 3);
    assert_eq!(snapshot.closed(CloseReason::Drain), 1);
}

#[tokio::test]
async fn http2_lame_duck_sends_goaway_to_every_connection() {
    let period = Duration::from_secs(4);
    let mut server = TestServer::builder(layer()).lame_duck(period).start();
    let mut idle = H2::connect(server.addr).await;
    assert_eq!(idle.get("/").await.0, StatusCode::OK);
    let mut busy = H2::connect(server.addr).await;
    let req = busy.request("/slow?ms=1500");
    let response = tokio::spawn(busy.sender.send_request(req));
    assert_eq!(server.handler_started().await, "slow");

    server.shutdown();
    let signalled = Instant::now();
    // GOAWAY: the idle connection ends cleanly, at once.
    let closed = idle.closed(SLACK).await;
    assert!(closed.duration_since(signalled) < SLACK);
    // A new connection is served its stream, then gets its GOAWAY.
    let mut fresh = H2::connect(server.addr).await;
    let (status, body, _) = fresh.get("/").await;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"hello"[..]));
    fresh.closed(SLACK).await;
    // The stream in flight at the signal finishes; then its connection ends.
    let res = within("the in-flight response", response)
        .await
        .unwrap()
        .expect("in-flight request failed");
    assert_eq!(res.status(), StatusCode::OK);
    let body = within(
        "the in-flight body",
        http_body_util::BodyExt::collect(res.into_body()),
    )
    .await
    .expect("in-flight body failed")
    .to_bytes();
    assert_eq!(&body[..], b"slept");
    busy.closed(SLACK).await;
    let closes = reasons(&mut server, 3).await;
    assert_eq!(closes, HashMap::from([(CloseReason::LameDuck, 3)]));
    // The serve future returns once the period is over and the connections are gone.
    server.finished(period + WAIT).await;
    assert!(
        signalled.elapsed() >= period,
        "returned before the lame-duck period was over"
    );
    assert_refused(server.addr).await;
}

#[tokio::test]
async fn without_lame_duck_the_drain_starts_at_the_signal() {
    let mut server = start(layer()).await;
    let mut idle = RawClient::connect(server.addr).await;
    assert_eq!(idle.get("/").await.status, 200);
    server.shutdown();
    idle.eof().await;
    assert_refused(server.addr).await;
    server.finished(WAIT).await;
    assert_eq!(server.next_close().await.reason, CloseReason::Drain);
}

#[tokio::test]
async fn a_request_outlasting_lame_duck_and_drain_deadline_is_cut() {
    let period = Duration::from_millis(500);
    let mut server = TestServer::builder(layer())
        .lame_duck(period)
        .drain_timeout(Duration::from_millis(500))
        .start();
    let mut busy = RawClient::connect(server.addr).await;
    busy.send(get_request("/slow?ms=10000")).await;
    assert_eq!(server.handler_started().await, "slow");
    server.shutdown();
    let signalled = Instant::now();
    busy.eof().await;
    server.finished(WAIT).await;
    assert!(signalled.elapsed() >= period + Duration::from_millis(500));
    // Its close was decided in the lame-duck period: that stays its reason.
    assert_eq!(server.next_close().await.reason, CloseReason::LameDuck);
}

#[cfg(feature = "axum")]
mod axum_path {
    use super::*;
    use axum::routing::get;
    use axum::Router;
    use support::axum_serve::serve_axum_lame_duck;

    #[tokio::test]
    async fn axum_lame_duck_serves_with_close_then_stops_accepting() {
        let period = Duration::from_secs(3);
        let layer = layer();
        let stats = layer.stats();
        let app = Router::new().route("/", get(|| async { "hello" }));
        let mut server = serve_axum_lame_duck(layer, app, period).await;
        let addr = server.addr;

        let mut idle = RawClient::connect(addr).await;
        assert_eq!(idle.get("/").await.header("connection"), Some("keep-alive"));
        server.shutdown();
        let signalled = Instant::now();
        let eof = idle.eof().await;
        assert!(
            eof.duration_since(signalled) < SLACK,
            "idle connection not closed at once"
        );
        let mut fresh = RawClient::connect(addr).await;
        let res = fresh.get("/").await;
        assert_eq!((res.status, res.body_str()), (200, "hello"));
        assert_eq!(res.values("connection"), ["close"], "{res:#?}");
        fresh.expect_eof().await;
        server.finished(period + WAIT).await;
        assert!(
            signalled.elapsed() >= period,
            "returned before the lame-duck period was over"
        );
        let refused = within("connect", TcpStream::connect(addr)).await;
        assert!(refused.is_err(), "accepted after the lame-duck period");
        assert_eq!(stats.snapshot().closed(CloseReason::LameDuck), 2);
    }
}
