//! Closes the client makes, on the crate's serve path over real sockets on loopback: shutting down its
//! write side, dropping the socket, HTTP/2 going away, and half-closing after a request (RFC 9112
//! section 9.6), each reported as `CloseReason::ClientClosed`.
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
use tower_keepalive::CloseReason;

#[tokio::test]
async fn client_shutting_down_write_side_is_client_closed() {
    let mut server = start(idle(Duration::from_secs(30))).await;
    let mut client = RawClient::connect(server.addr).await;
    assert_eq!(client.get("/").await.status, 200);
    let shut = Instant::now();
    client.stream_mut().shutdown().await.unwrap();
    client.eof().await;
    let closed = server.next_close().await;
    assert_eq!(closed.reason, CloseReason::ClientClosed);
    assert!(closed.at.duration_since(shut) < SLACK);
}

#[tokio::test]
async fn client_dropping_socket_is_client_closed() {
    let mut server = start(idle(Duration::from_secs(30))).await;
    let mut client = RawClient::connect(server.addr).await;
    assert_eq!(client.get("/").await.status, 200);
    let dropped = Instant::now();
    drop(client);
    let closed = server.next_close().await;
    assert_eq!(closed.reason, CloseReason::ClientClosed);
    assert_eq!(closed.handle.requests(), 1);
    assert!(closed.at.duration_since(dropped) < SLACK);
}

#[tokio::test]
async fn http2_client_going_away_is_client_closed() {
    let mut server = start(idle(Duration::from_secs(30))).await;
    let mut client = H2::connect(server.addr).await;
    assert_eq!(client.get("/").await.0, StatusCode::OK);
    let dropped = Instant::now();
    // Without a sender, hyper's client connection closes.
    drop(client.sender);
    within("the client connection to end", client.conn)
        .await
        .unwrap()
        .unwrap();
    let closed = server.next_close().await;
    assert_eq!(closed.reason, CloseReason::ClientClosed);
    assert!(closed.at.duration_since(dropped) < SLACK);
}

// A client that half-closes after its request (RFC 9112 section 9.6: it has finished sending) is
// answered, then the connection closes. On a runtime with worker threads, as servers run: whether the
// end of stream is read before or after the service has seen the request depends on timing there, hence
// ten clients at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_request_then_half_close_is_answered() {
    let mut server = start(idle(Duration::from_secs(30))).await;
    for (path, body) in [("/", "hello"), ("/slow?ms=300", "slept")] {
        let clients = (0..10).map(|_| half_close_after(server.addr, path, body));
        futures_util::future::join_all(clients).await;
        for _ in 0..10 {
            let closed = server.next_close().await;
            assert_eq!(closed.reason, CloseReason::ClientClosed, "{path}");
            assert_eq!(closed.handle.requests(), 1, "{path}");
        }
    }
}

// One that half-closes without a request is closed at once, not after the idle timeout.
#[tokio::test]
async fn http1_half_close_without_a_request_is_closed_at_once() {
    let mut server = start(idle(Duration::from_secs(30))).await;
    let mut client = RawClient::connect(server.addr).await;
    let shut = Instant::now();
    client.stream_mut().shutdown().await.unwrap();
    client.expect_eof().await;
    let closed = server.next_close().await;
    assert_eq!(closed.reason, CloseReason::ClientClosed);
    assert_eq!(closed.handle.requests(), 0);
    assert!(closed.at.duration_since(shut) < SLACK, "{closed:?}");
}
