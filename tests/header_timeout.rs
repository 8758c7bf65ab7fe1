//! `Serve::header_timeout`: a request head is bounded from its first byte (from the accept for a
//! connection's first request), whatever the idle timeout; an idle connection keeps its idle timeout.

#![cfg(feature = "axum")]

mod support;

use std::time::{Duration, Instant};

use axum::routing::get;
use axum::Router;
use support::server::TestServer;
use support::within;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tower_keepalive::{CloseReason, KeepAliveLayer};

const IDLE: Duration = Duration::from_secs(30);
const HEADER: Duration = Duration::from_secs(1);

/// The serve path with a 1 s header timeout and a 30 s idle timeout; `/slow` answers after twice the
/// header timeout.
fn start() -> TestServer {
    let app = Router::new().route("/", get(|| async { "hello" })).route(
        "/slow",
        get(|| async {
            tokio::time::sleep(2 * HEADER).await;
            "hello"
        }),
    );
    TestServer::builder(KeepAliveLayer::new().idle_timeout(IDLE))
        .header_timeout(HEADER)
        .serve(app)
}

/// Reads until the server closes the connection (end-of-file or reset); at most `limit`.
async fn wait_closed(tcp: &mut TcpStream, limit: Duration) -> Instant {
    let mut buf = [0u8; 1024];
    tokio::time::timeout(limit, async {
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return Instant::now(),
                Ok(_) => {}
            }
        }
    })
    .await
    .expect("the server closed the connection in time")
}

/// Sends a GET and reads its whole response (the app's `hello`, 5 bytes of body).
async fn request(tcp: &mut TcpStream) -> String {
    request_path(tcp, "/").await
}

async fn request_path(tcp: &mut TcpStream, path: &str) -> String {
    tcp.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    tokio::time::timeout(Duration::from_secs(5), async {
        while !got.ends_with(b"hello") {
            let n = tcp.read(&mut buf).await.unwrap();
            assert!(
                n > 0,
                "closed before the response: {:?}",
                String::from_utf8_lossy(&got)
            );
            got.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .expect("a response in time");
    String::from_utf8_lossy(&got).into_owned()
}

/// Dribbles a request head that never ends, a byte every 200 ms, until the write fails.
fn slowloris(tcp: TcpStream) -> (tokio::net::tcp::OwnedReadHalf, tokio::task::JoinHandle<()>) {
    let (read, mut write) = tcp.into_split();
    let task = tokio::spawn(async move {
        for byte in b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ".iter().cycle() {
            if write.write_all(&[*byte]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    (read, task)
}

#[tokio::test]
async fn a_dribbled_head_is_cut_at_the_header_timeout_not_the_idle_timeout() {
    let mut server = start();
    let tcp = within("connect", TcpStream::connect(server.addr))
        .await
        .unwrap();
    let began = Instant::now();
    let (mut read, writer) = slowloris(tcp);
    let mut buf = [0u8; 64];
    let closed = tokio::time::timeout(Duration::from_secs(5), read.read(&mut buf))
        .await
        .expect("cut within 5 s, long before the 30 s idle timeout");
    assert!(
        matches!(closed, Ok(0) | Err(_)),
        "no response to a head never finished"
    );
    let elapsed = began.elapsed();
    assert!(
        elapsed >= Duration::from_millis(800) && elapsed < Duration::from_millis(2500),
        "cut after {elapsed:?}"
    );
    writer.abort();
    assert_eq!(server.next_close().await.reason, CloseReason::HeaderTimeout);
}

/// Dribbles a head on `tcp` ([`slowloris`]): the server cuts it at the header timeout counted from its
/// first byte, with no response, and reports `HeaderTimeout`.
async fn assert_dribbled_head_cut(server: &mut TestServer, tcp: TcpStream) {
    let began = Instant::now();
    let (mut read, writer) = slowloris(tcp);
    let mut buf = [0u8; 64];
    let closed = tokio::time::timeout(Duration::from_secs(5), read.read(&mut buf))
        .await
        .expect("cut within 5 s");
    assert!(matches!(closed, Ok(0) | Err(_)));
    let elapsed = began.elapsed();
    assert!(
        elapsed >= Duration::from_millis(800) && elapsed < Duration::from_millis(2500),
        "cut {elapsed:?} after the head's first byte"
    );
    writer.abort();
    assert_eq!(server.next_close().await.reason, CloseReason::HeaderTimeout);
}

#[tokio::test]
async fn an_idle_connection_outlives_the_header_timeout_and_its_next_head_gets_its_own() {
    let mut server = start();
    let mut tcp = within("connect", TcpStream::connect(server.addr))
        .await
        .unwrap();
    assert!(request(&mut tcp).await.starts_with("HTTP/1.1 200"));
    // Idle for twice the header timeout: still open, and answers.
    tokio::time::sleep(2 * HEADER).await;
    let res = request(&mut tcp).await;
    assert!(res.starts_with("HTTP/1.1 200"), "{res}");
    assert!(res.contains("timeout=30"), "{res}");
    // Idle past the header timeout again, then a dribbled head: its time counts from its first byte.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_dribbled_head_cut(&mut server, tcp).await;
}

#[tokio::test]
async fn a_connection_that_never_sends_a_byte_is_cut_at_the_header_timeout() {
    let mut server = start();
    let began = Instant::now();
    let mut tcp = within("connect", TcpStream::connect(server.addr))
        .await
        .unwrap();
    let closed = wait_closed(&mut tcp, Duration::from_secs(5)).await;
    let elapsed = closed - began;
    assert!(
        elapsed >= Duration::from_millis(800) && elapsed < Duration::from_millis(2500),
        "cut after {elapsed:?}"
    );
    assert_eq!(server.next_close().await.reason, CloseReason::HeaderTimeout);
}

#[tokio::test]
async fn a_head_after_a_request_longer_than_the_header_timeout_is_cut_in_time() {
    // The connection's timer looks at a busy connection no less often than the header timeout, so
    // the head that follows a slow request is found and cut in time too.
    let mut server = start();
    let mut tcp = within("connect", TcpStream::connect(server.addr))
        .await
        .unwrap();
    let res = request_path(&mut tcp, "/slow").await;
    assert!(res.starts_with("HTTP/1.1 200"), "{res}");
    assert_dribbled_head_cut(&mut server, tcp).await;
}
