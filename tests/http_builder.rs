//! hyper's own settings, reached through `Serve::http_builder`, are safe to turn on: every timed one
//! needs a timer, which the serve path gives the builder (without one, hyper panics inside each
//! connection: "You must supply a timer").

mod support;

use std::future::IntoFuture;
use std::time::Duration;

use http::StatusCode;
use support::http1::*;
use support::http2::*;
use support::*;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

/// HTTP/2 PING keep-alive: PINGs go out while a stream is in flight (hyper's client answers them), the
/// stream completes, and the connection goes on serving.
#[tokio::test]
async fn http2_ping_keep_alive_serves_requests() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (started, _) = mpsc::unbounded_channel();
    let server = tokio::spawn(
        tower_keepalive::serve(listener, apps::timed(started))
            .http_builder(|builder| {
                builder
                    .http2()
                    .keep_alive_interval(Some(Duration::from_millis(100)))
                    .keep_alive_timeout(Duration::from_secs(5));
            })
            .into_future(),
    );
    let mut client = H2::connect(addr).await;
    // Several PING intervals long.
    let (status, body, _) = client.get("/slow?ms=500").await;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"slept"[..]));
    let (status, body, _) = client.get("/").await;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"hello"[..]));
    assert!(!client.conn.is_finished(), "the connection closed");
    server.abort();
}

/// hyper's HTTP/1 header-read timer turned back on: requests are served, and a head that never completes
/// is dropped at that timeout.
#[tokio::test]
async fn http1_header_read_timeout_serves_requests_and_cuts_a_stalled_head() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (started, _) = mpsc::unbounded_channel();
    let server = tokio::spawn(
        tower_keepalive::serve(listener, apps::timed(started))
            .keep_alive(
                tower_keepalive::KeepAliveLayer::new().idle_timeout(Duration::from_secs(60)),
            )
            .http_builder(|builder| {
                builder
                    .http1()
                    .header_read_timeout(Some(Duration::from_millis(500)));
            })
            .into_future(),
    );
    let mut client = RawClient::connect(addr).await;
    let res = client.get("/").await;
    assert_eq!(res.status, 200);
    assert_eq!(res.body_str(), "hello");

    let mut stalled = RawClient::connect(addr).await;
    stalled.send("GET / HTTP/1.1\r\nHost: x\r\n").await;
    // Far sooner than the 60 s idle timeout.
    within("the stalled head to be cut", stalled.eof()).await;
    server.abort();
}
