//! hyper's own settings, reached through `Serve::http_builder`, are safe to turn on: every timed one
//! needs a timer, which the serve path gives the builder (without one, hyper panics inside each
//! connection: "You must supply a timer"). HTTP/2 PING keep-alive (`http2().keep_alive_interval`) on the
//! wire: PINGs go out on a connection with a stream in flight, the stream completes when the peer answers
//! them, and a peer that stops answering is closed (RFC 9113 section 6.7).

mod support;

use std::time::Duration;

use http::StatusCode;
use support::http1::*;
use support::http2::*;
use support::server::TestServer;
use support::*;
use tower_keepalive::KeepAliveLayer;

/// HTTP/2 PING keep-alive: PINGs go out while a stream is in flight (hyper's client answers them), the
/// stream completes, and the connection goes on serving.
#[tokio::test]
async fn http2_ping_keep_alive_serves_requests() {
    let server = TestServer::builder(KeepAliveLayer::new())
        .http_builder(|builder| {
            builder
                .http2()
                .keep_alive_interval(Some(Duration::from_millis(100)))
                .keep_alive_timeout(Duration::from_secs(5));
        })
        .start();
    let mut client = H2::connect(server.addr).await;
    // Several PING intervals long.
    let (status, body, _) = client.get("/slow?ms=500").await;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"slept"[..]));
    let (status, body, _) = client.get("/").await;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"hello"[..]));
    assert!(!client.conn.is_finished(), "the connection closed");
}

/// hyper's HTTP/1 header-read timer turned back on: requests are served, and a head that never completes
/// is dropped at that timeout.
#[tokio::test]
async fn http1_header_read_timeout_serves_requests_and_cuts_a_stalled_head() {
    let server = TestServer::builder(KeepAliveLayer::new().idle_timeout(Duration::from_secs(60)))
        .http_builder(|builder| {
            builder
                .http1()
                .header_read_timeout(Some(Duration::from_millis(500)));
        })
        .start();
    let mut client = RawClient::connect(server.addr).await;
    let res = client.get("/").await;
    assert_eq!(res.status, 200);
    assert_eq!(res.body_str(), "hello");

    let mut stalled = RawClient::connect(server.addr).await;
    stalled.send("GET / HTTP/1.1\r\nHost: x\r\n").await;
    // Far sooner than the 60 s idle timeout.
    within("the stalled head to be cut", stalled.eof()).await;
}

// HTTP/2 PING keep-alive against raw frames, so that the client can choose never to acknowledge a PING.

const INTERVAL: Duration = Duration::from_millis(200);
const TIMEOUT: Duration = Duration::from_millis(300);
/// Generous for a loaded machine: the close is due at about INTERVAL + TIMEOUT.
const PING_SLACK: Duration = Duration::from_secs(5);

/// A server whose `/slow?ms=N` answers after N ms, with PING keep-alive if `ping`.
fn ping_server(ping: bool) -> TestServer {
    TestServer::builder(KeepAliveLayer::new())
        .http_builder(move |builder| {
            if ping {
                builder
                    .http2()
                    .keep_alive_interval(Some(INTERVAL))
                    .keep_alive_timeout(TIMEOUT);
            }
        })
        .start()
}

/// Connects with prior knowledge, acknowledging the server's PINGs if `answer`, and sends `GET
/// /slow?ms={handler_ms}` on stream 1. Reads frames until the connection ends or the response's HEADERS
/// arrive; returns the PINGs seen and whether the response came.
async fn run_client(server: &TestServer, handler_ms: u64, answer: bool) -> (usize, bool) {
    let mut client = RawH2::connect(server.addr).await;
    if !answer {
        client = client.never_acknowledge_pings();
    }
    client
        .try_get(1, &format!("/slow?ms={handler_ms}"))
        .await
        .unwrap();
    while let Some(frame) = client.frame().await {
        if frame.kind == HEADERS && frame.stream == 1 {
            return (client.pings_received, true);
        }
    }
    (client.pings_received, false)
}

#[tokio::test]
async fn a_peer_that_stops_answering_pings_is_closed() {
    // The handler outlasts the test: with a stream in flight neither the idle timeout nor the header
    // timeout applies, so only the PING timeout can close the connection.
    let server = ping_server(true);
    let (pings, answered) = within_for(
        "the connection of a peer that never acknowledges PINGs to close",
        PING_SLACK,
        run_client(&server, 60_000, false),
    )
    .await;
    assert!(!answered, "the stream completed before the PING timeout");
    assert!(pings >= 1, "closed without a PING");
}

#[tokio::test]
async fn pings_go_out_while_a_stream_is_in_flight_and_it_completes() {
    let server = ping_server(true);
    let (pings, answered) =
        within_for("the response", PING_SLACK, run_client(&server, 1500, true)).await;
    assert!(
        answered,
        "the connection closed under a peer that answers PINGs"
    );
    // 1.5 s of handler time at a 200 ms interval: several PINGs, bounded loosely for a loaded machine.
    assert!(pings >= 2, "{pings} PINGs");
}

#[tokio::test]
async fn without_the_setting_no_pings_and_a_silent_peer_is_kept() {
    // A peer silent for as long as the PING test's takes to be closed, and then some.
    let server = ping_server(false);
    let (pings, answered) =
        within_for("the response", PING_SLACK, run_client(&server, 1500, false)).await;
    assert!(answered);
    assert_eq!(pings, 0);
}
