//! Idle HTTP/1 connections hibernate on the serve path (`Serve::hibernate_after`): hyper's connection is
//! taken apart while idle and made again on the next request's first bytes, and nothing on the wire
//! shows it. The keep-alive countdown, the idle timeout, a drain and the bytes of a head in progress
//! carry across; HTTP/2 connections never hibernate; TLS and WebSocket connections work after it.
//!
//! Hibernation is observed through `StatsSnapshot::connections_hibernating`, polled (there is no event
//! to await); every wait is bounded. `tests/hibernated.rs` runs the lifecycle's own tests again with
//! hibernation after 1 ms.

mod support;

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use http::StatusCode;
use tokio::io::AsyncWriteExt;
use tower_keepalive::{CloseReason, KeepAliveLayer, Stats};

use support::http1::*;
use support::http2::*;
use support::server::*;
use support::*;

/// Hibernation soon after each response, so that tests need not wait long for it.
const AFTER: Duration = Duration::from_millis(50);

/// Waits until `n` connections hibernate.
async fn hibernating(stats: &Stats, n: u64) {
    within("connections to hibernate", async {
        while stats.snapshot().connections_hibernating() != n {
            tokio::time::sleep(ms(5)).await;
        }
    })
    .await;
}

fn server(layer: KeepAliveLayer) -> (TestServer, Stats) {
    let stats = layer.stats();
    let server = TestServer::builder(layer).hibernate_after(AFTER).start();
    (server, stats)
}

#[tokio::test]
async fn an_idle_connection_hibernates_and_its_next_request_is_served_with_the_countdown_on() {
    let (mut server, stats) = server(KeepAliveLayer::new().max_requests(5));
    let mut client = RawClient::connect(server.addr).await;
    let first = client.get("/").await;
    assert_eq!(first.status, 200);
    assert_eq!(first.header("keep-alive"), Some("timeout=5, max=4"));
    hibernating(&stats, 1).await;
    for left in (1..4).rev() {
        let res = client.get("/").await;
        assert_eq!(res.status, 200);
        assert_eq!(res.body_str(), "hello");
        assert_eq!(
            res.header("keep-alive"),
            Some(format!("timeout=5, max={left}").as_str())
        );
        // Woken for the request, asleep again after it.
        hibernating(&stats, 1).await;
    }
    // The fifth and last says `close`, as it would have without hibernating.
    let last = client.get("/").await;
    assert_eq!(last.header("connection"), Some("close"));
    client.expect_eof().await;
    assert_eq!(server.next_close().await.reason, CloseReason::MaxRequests);
    assert_eq!(stats.snapshot().connections_hibernating(), 0);
    assert_eq!(stats.snapshot().requests(), 5);
}

#[tokio::test]
async fn a_head_in_progress_is_kept_across_hibernation() {
    let (mut server, stats) = server(KeepAliveLayer::new());
    let mut client = RawClient::connect(server.addr).await;
    assert_eq!(client.get("/").await.status, 200);
    // The start of the next head: hyper reads it into its buffer, which the connection gives back.
    client.send("GET /slow?ms=1 HTTP/1.1\r\nHost: x\r\n").await;
    hibernating(&stats, 1).await;
    client.send("X-Rest: of the head\r\n\r\n").await;
    let res = client.read_response().await;
    assert_eq!(res.status, 200);
    assert_eq!(res.body_str(), "slept");
    assert_eq!(server.handler_started().await, "slow");
    server.assert_no_close();
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order_around_hibernation() {
    let (mut server, stats) = server(KeepAliveLayer::new());
    let mut client = RawClient::connect(server.addr).await;
    assert_eq!(client.get("/").await.status, 200);
    hibernating(&stats, 1).await;
    // Two whole requests and half of a third in one write wake it.
    client
        .send(
            "GET /slow?ms=1 HTTP/1.1\r\nHost: x\r\n\r\n\
             GET / HTTP/1.1\r\nHost: x\r\n\r\n\
             GET /slow?ms=2 HTTP/1.1\r\nHo",
        )
        .await;
    assert_eq!(client.read_response().await.body_str(), "slept");
    assert_eq!(client.read_response().await.body_str(), "hello");
    hibernating(&stats, 1).await;
    client.send("st: x\r\n\r\n").await;
    assert_eq!(client.read_response().await.body_str(), "slept");
    server.assert_no_close();
}

#[tokio::test]
async fn the_idle_timeout_counts_from_the_last_response_not_from_hibernation() {
    let timeout = ms(1200);
    let (mut server, stats) = server(idle(timeout));
    let mut client = RawClient::connect(server.addr).await;
    let res = client.get("/").await;
    assert_eq!(res.status, 200);
    // The server's idle period began before the client read the response's last byte.
    let answered = client.last_byte_at;
    hibernating(&stats, 1).await;
    let closed = client.eof().await;
    assert_between(
        "the close after the last response",
        closed.duration_since(answered),
        timeout - ms(20),
        timeout + SLACK,
    );
    assert_eq!(server.next_close().await.reason, CloseReason::Idle);
    assert_eq!(stats.snapshot().connections_hibernating(), 0);
}

#[tokio::test]
async fn a_drain_closes_hibernating_connections_at_once() {
    let (mut server, stats) = server(idle(ms(60_000)));
    let mut clients = Vec::new();
    for _ in 0..3 {
        let mut client = RawClient::connect(server.addr).await;
        assert_eq!(client.get("/").await.status, 200);
        clients.push(client);
    }
    hibernating(&stats, 3).await;
    let signal = Instant::now();
    server.shutdown();
    for client in &mut clients {
        let closed = client.eof().await;
        assert!(closed.duration_since(signal) < SLACK, "{closed:?}");
    }
    server.finished(SLACK).await;
    let reasons = server.reasons_so_far();
    assert_eq!(reasons, vec![CloseReason::Drain; 3]);
    assert_eq!(stats.snapshot().connections_hibernating(), 0);
}

#[tokio::test]
async fn a_client_that_closes_while_its_connection_hibernates_is_seen_at_once() {
    let (mut server, stats) = server(idle(ms(60_000)));
    let mut client = RawClient::connect(server.addr).await;
    assert_eq!(client.get("/").await.status, 200);
    hibernating(&stats, 1).await;
    let mut stream = client.into_stream();
    within("close", stream.shutdown()).await.unwrap();
    drop(stream);
    let closed = within_for("the close report", SLACK, server.next_close()).await;
    assert_eq!(closed.reason, CloseReason::ClientClosed);
    assert_eq!(stats.snapshot().connections_hibernating(), 0);
}

#[tokio::test]
async fn http2_connections_never_hibernate() {
    let (mut server, stats) = server(KeepAliveLayer::new());
    let mut client = H2::connect(server.addr).await;
    assert_eq!(client.get("/").await.0, StatusCode::OK);
    // An HTTP/1 connection opened after it hibernates well before the HTTP/2 one could have twice.
    let mut http1 = RawClient::connect(server.addr).await;
    assert_eq!(http1.get("/").await.status, 200);
    hibernating(&stats, 1).await;
    tokio::time::sleep(AFTER * 4).await;
    assert_eq!(stats.snapshot().connections_hibernating(), 1);
    assert_eq!(client.get("/").await.0, StatusCode::OK);
    server.assert_no_close();
}

#[tokio::test]
async fn a_websocket_upgrade_after_hibernation_works() {
    use tokio_tungstenite::tungstenite::Message;

    let (mut server, stats) = server(KeepAliveLayer::new());
    let mut client = RawClient::connect(server.addr).await;
    assert_eq!(client.get("/").await.status, 200);
    hibernating(&stats, 1).await;
    let url = format!("ws://{}/ws", server.addr);
    let (mut ws, res) = within(
        "the WebSocket handshake",
        tokio_tungstenite::client_async(url, client.into_stream()),
    )
    .await
    .expect("WebSocket handshake");
    assert_eq!(res.status(), StatusCode::SWITCHING_PROTOCOLS);
    assert_eq!(server.next_close().await.reason, CloseReason::Upgraded);
    within("send", ws.send(Message::text("after hibernating")))
        .await
        .unwrap();
    let echo = within("echo", ws.next()).await.unwrap().unwrap();
    assert_eq!(echo, Message::text("after hibernating"));
    assert_eq!(stats.snapshot().connections_hibernating(), 0);
}

#[tokio::test]
async fn without_hibernation_nothing_hibernates() {
    let layer = KeepAliveLayer::new();
    let stats = layer.stats();
    let mut server = TestServer::builder(layer).no_hibernation().start();
    let mut client = RawClient::connect(server.addr).await;
    assert_eq!(client.get("/").await.status, 200);
    // The time the default would take, and more.
    tokio::time::sleep(ms(1500)).await;
    assert_eq!(stats.snapshot().connections_hibernating(), 0);
    assert_eq!(client.get("/").await.status, 200);
    server.assert_no_close();
}

#[tokio::test]
async fn by_default_a_connection_hibernates_after_a_second_idle() {
    let layer = KeepAliveLayer::new();
    let stats = layer.stats();
    let server = TestServer::builder(layer).start();
    let mut client = RawClient::connect(server.addr).await;
    assert_eq!(client.get("/").await.status, 200);
    let answered = Instant::now();
    hibernating(&stats, 1).await;
    assert!(answered.elapsed() >= ms(900), "{:?}", answered.elapsed());
}

#[cfg(feature = "tls")]
#[tokio::test]
async fn a_tls_connection_hibernates_and_serves_its_next_request() {
    use tokio::io::AsyncReadExt;

    let cert = support::tls::certificate(&["localhost"]);
    let layer = KeepAliveLayer::new();
    let stats = layer.stats();
    let mut server = TestServer::builder(layer)
        .hibernate_after(AFTER)
        .tls(cert.server)
        .start();
    let stream = support::tls::connect(server.addr, &cert.roots, &[b"http/1.1"], "localhost").await;
    let mut client = RawClient::new(stream);
    assert_eq!(client.get("/").await.status, 200);
    hibernating(&stats, 1).await;
    let res = client.get("/").await;
    assert_eq!(res.status, 200);
    assert_eq!(res.body_str(), "hello");
    hibernating(&stats, 1).await;
    server.shutdown();
    let mut stream = client.into_stream();
    let mut rest = Vec::new();
    let _ = within("the close", stream.read_to_end(&mut rest)).await;
    server.finished(SLACK).await;
    assert_eq!(server.reasons_so_far(), vec![CloseReason::Drain]);
}
