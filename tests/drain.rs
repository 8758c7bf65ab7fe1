//! The drain after the shutdown signal on the crate's serve path, over real sockets on loopback:
//! requests in flight finish, idle connections close at once, new ones are refused, and past the drain
//! deadline what is left is cut.
//!
//! Timing: "not before" bounds are strict and measured so that they hold whatever the load (from an
//! instant the server's own clock cannot precede); "soon after" bounds allow [`SLACK`] for a loaded
//! machine. Every wait is bounded.

mod support;

use std::time::{Duration, Instant};

use http::StatusCode;
use support::http1::*;
use support::http2::*;
use support::server::*;
use support::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tower_keepalive::CloseReason;

#[tokio::test]
async fn drain_http1_finishes_in_flight_closes_idle_refuses_new() {
    let mut server = start(idle(Duration::from_secs(30))).await;
    let mut idle_client = RawClient::connect(server.addr).await;
    assert_eq!(idle_client.get("/").await.status, 200);
    let mut busy = RawClient::connect(server.addr).await;
    busy.send(get_request("/slow?ms=1500")).await;
    assert_eq!(server.handler_started().await, "slow");

    server.shutdown();
    let signalled = Instant::now();
    let eof = idle_client.eof().await;
    assert!(
        eof.duration_since(signalled) < SLACK,
        "idle connection not closed at once"
    );
    // The drain has begun, so the listener is gone.
    let refused = within("connect", TcpStream::connect(server.addr)).await;
    assert!(
        refused.is_err(),
        "a new connection was accepted during drain"
    );

    let res = busy.read_response().await;
    assert_eq!((res.status, res.body_str()), (200, "slept"));
    assert_eq!(res.header("connection"), Some("close"));
    assert_eq!(res.header("keep-alive"), None);
    busy.eof().await;
    server.finished(WAIT).await;
    for _ in 0..2 {
        assert_eq!(server.next_close().await.reason, CloseReason::Drain);
    }
}

#[tokio::test]
async fn drain_http2_finishes_in_flight_closes_idle_refuses_new() {
    let mut server = start(idle(Duration::from_secs(30))).await;
    let mut idle_client = H2::connect(server.addr).await;
    assert_eq!(idle_client.get("/").await.0, StatusCode::OK);
    let mut busy = H2::connect(server.addr).await;
    let req = busy.request("/slow?ms=1500");
    let response = tokio::spawn(busy.sender.send_request(req));
    assert_eq!(server.handler_started().await, "slow");

    server.shutdown();
    let signalled = Instant::now();
    let closed_at = idle_client.closed(SLACK).await;
    assert!(closed_at.duration_since(signalled) < SLACK);
    let refused = within("connect", TcpStream::connect(server.addr)).await;
    assert!(
        refused.is_err(),
        "a new connection was accepted during drain"
    );

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
    .unwrap()
    .to_bytes();
    assert_eq!(&body[..], b"slept");
    busy.closed(SLACK).await;
    server.finished(WAIT).await;
    for _ in 0..2 {
        assert_eq!(server.next_close().await.reason, CloseReason::Drain);
    }
}

// Past the drain deadline, what is left is cut.
#[tokio::test]
async fn drain_deadline_cuts_http1_request() {
    let mut server = TestServer::builder(idle(Duration::from_secs(30)))
        .drain_timeout(ms(500))
        .start();
    let mut busy = RawClient::connect(server.addr).await;
    busy.send(get_request("/slow?ms=10000")).await;
    assert_eq!(server.handler_started().await, "slow");
    server.shutdown();
    let signalled = Instant::now();
    server.finished(ms(500) + SLACK).await;
    assert!(
        signalled.elapsed() >= ms(500),
        "returned before the deadline"
    );
    // Cut: EOF (or a reset) with no response.
    busy.eof().await;
    assert_eq!(server.next_close().await.reason, CloseReason::Drain);
}

#[tokio::test]
async fn drain_deadline_cuts_http2_request() {
    let mut server = TestServer::builder(idle(Duration::from_secs(30)))
        .drain_timeout(ms(500))
        .start();
    let mut busy = H2::connect(server.addr).await;
    let req = busy.request("/slow?ms=10000");
    let response = tokio::spawn(busy.sender.send_request(req));
    assert_eq!(server.handler_started().await, "slow");
    server.shutdown();
    let signalled = Instant::now();
    server.finished(ms(500) + SLACK).await;
    assert!(
        signalled.elapsed() >= ms(500),
        "returned before the deadline"
    );
    let res = within("the cut response", response).await.unwrap();
    assert!(res.is_err(), "a response came through: {res:?}");
    assert_eq!(server.next_close().await.reason, CloseReason::Drain);
}

// A drain deadline still drops a lingering connection at once.
#[tokio::test]
async fn drain_deadline_cuts_a_lingering_close() {
    let mut server = TestServer::builder(idle(Duration::from_secs(30)).max_requests(1))
        .drain_timeout(ms(500))
        .start();
    let (_client, mut write) = answered_and_closed(server.addr).await;
    // A byte every 300 ms keeps the linger going for as long as it may last (10 s).
    let dribble = tokio::spawn(async move {
        let mut tick = tokio::time::interval(ms(300));
        loop {
            tick.tick().await;
            if write.write_all(b"x").await.is_err() {
                return;
            }
        }
    });
    server.shutdown();
    let signalled = Instant::now();
    server.finished(ms(500) + SLACK).await;
    assert!(
        signalled.elapsed() >= ms(500),
        "returned before the deadline"
    );
    assert_eq!(server.next_close().await.reason, CloseReason::MaxRequests);
    dribble.abort();
}
