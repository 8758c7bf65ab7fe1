//! The send timeout (`KeepAliveLayer::send_timeout`) on the wire, on both serve paths (`serve()` and
//! `axum::serve` with `KeepAliveListener`): a client that holds a connection by not reading, HTTP/1 or
//! HTTP/2 streams on a zero flow-control window kept busy with PINGs, is cut at it, with its own close
//! reason; a slow reader is not.

#![cfg(feature = "axum")]

mod support;

use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::apps::bulk;
use support::both::{serve_on, Path, Server};
use support::http1::is_reset;
use support::http2::{RawH2, DATA, INITIAL_WINDOW_SIZE};
use support::{within, within_for, SLACK, WAIT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tower_keepalive::{CloseReason, KeepAliveLayer};

/// The send timeout of these tests.
const SEND: Duration = Duration::from_secs(1);
/// A body far larger than the socket buffers of both ends.
const BIG: u64 = 64 * 1024 * 1024;

async fn start(path: Path, layer: KeepAliveLayer) -> Server {
    serve_on(path, layer, bulk(Arc::new(AtomicUsize::new(0)))).await
}

/// The send timeout of these tests, and an idle timeout as short. The timer looks at a connection when
/// its idle timeout comes (a request starting wakes no timer), then twice per send timeout while it is
/// busy: output that stalls is seen at most an idle timeout late, so the idle timeout bounds how late
/// the cut comes after the send timeout.
fn policy() -> KeepAliveLayer {
    KeepAliveLayer::new().idle_timeout(SEND).send_timeout(SEND)
}

async fn connect(addr: std::net::SocketAddr) -> TcpStream {
    within("connect", TcpStream::connect(addr)).await.unwrap()
}

/// Reads until the end of the stream or a reset; returns the bytes read.
async fn drain(stream: &mut TcpStream) -> u64 {
    within("the end of the stream", async {
        let mut total = 0u64;
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) => return total,
                Ok(n) => total += n as u64,
                Err(err) if is_reset(&err) => return total,
                Err(err) => panic!("read failed: {err}"),
            }
        }
    })
    .await
}

// HTTP/1 ------------------------------------------------------------------------------------------

/// A client that requests a large body and never reads it is cut at the send timeout, with its own
/// close reason, and gets less than the body.
async fn http1_non_reader_is_cut(path: Path) {
    let server = start(path, policy()).await;
    let mut client = connect(server.addr).await;
    client
        .write_all(format!("GET /big?bytes={BIG} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let sent = Instant::now();
    let cut = server
        .until_closed(CloseReason::SendTimeout, SEND + WAIT)
        .await;
    let took = cut - sent;
    // The socket buffers fill at once on loopback; then nothing moves for the send timeout, seen at
    // most an idle timeout late (see `policy`).
    assert!(took >= SEND, "{path:?}: cut after {took:?}");
    assert!(took < 2 * SEND + SLACK, "{path:?}: cut after {took:?}");
    // On the wire: what the buffers held, then the end.
    let got = drain(&mut client).await;
    assert!(got < BIG, "{path:?}: the whole body came through");
    assert_eq!(server.closed(CloseReason::SendTimeout), 1);
}

#[tokio::test]
async fn http1_non_reader_is_cut_at_the_send_timeout_serve() {
    http1_non_reader_is_cut(Path::Serve).await;
}

#[tokio::test]
async fn http1_non_reader_is_cut_at_the_send_timeout_axum() {
    http1_non_reader_is_cut(Path::Axum).await;
}

/// With an idle timeout longer than the send timeout, the timer first looks at the busy connection
/// when the idle timeout comes; the stall counts from when the socket filled (which the IO stamps),
/// not from that look, so the cut comes at that first look rather than a send timeout after it.
async fn http1_stall_counts_from_the_full_socket(path: Path) {
    const IDLE: Duration = Duration::from_secs(4);
    const SEND: Duration = Duration::from_secs(2);
    let layer = KeepAliveLayer::new().idle_timeout(IDLE).send_timeout(SEND);
    let server = start(path, layer).await;
    let mut client = connect(server.addr).await;
    let sent = Instant::now();
    client
        .write_all(format!("GET /big?bytes={BIG} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let cut = server
        .until_closed(CloseReason::SendTimeout, IDLE + SEND + WAIT)
        .await;
    let took = cut - sent;
    assert!(took >= SEND, "{path:?}: cut after {took:?}");
    // Timed from the first look, the cut would come at IDLE + SEND.
    assert!(took < IDLE + SEND / 2, "{path:?}: cut after {took:?}");
    assert!(
        drain(&mut client).await < BIG,
        "{path:?}: the whole body came through"
    );
}

#[tokio::test]
async fn http1_stall_counts_from_the_full_socket_serve() {
    http1_stall_counts_from_the_full_socket(Path::Serve).await;
}

#[tokio::test]
async fn http1_stall_counts_from_the_full_socket_axum() {
    http1_stall_counts_from_the_full_socket(Path::Axum).await;
}

/// A client that reads slowly, with pauses shorter than the send timeout, gets the whole body: every
/// write that goes through starts the time again.
async fn http1_slow_reader_is_not_cut(path: Path) {
    const BODY: u64 = 6 * 1024 * 1024;
    let server = start(path, policy()).await;
    // A small receive window, so that the server's writes wait on this client's reads.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(64 * 1024).unwrap();
    let mut client = within("connect", socket.connect(server.addr))
        .await
        .unwrap();
    client
        .write_all(format!("GET /big?bytes={BODY} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut got = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    // About 2.5 MB/s, in steps 250 ms apart: well under the send timeout, each.
    within_for("the slow read", Duration::from_secs(30), async {
        while got < BODY {
            let n = client.read(&mut buf).await.unwrap();
            assert_ne!(n, 0, "{path:?}: cut after {got} bytes");
            got += n as u64;
            if got % (640 * 1024) < n as u64 {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    })
    .await;
    assert_eq!(server.closed(CloseReason::SendTimeout), 0, "{path:?}");
}

#[tokio::test]
async fn http1_slow_reader_is_not_cut_serve() {
    http1_slow_reader_is_not_cut(Path::Serve).await;
}

#[tokio::test]
async fn http1_slow_reader_is_not_cut_axum() {
    http1_slow_reader_is_not_cut(Path::Axum).await;
}

// HTTP/2, raw frames --------------------------------------------------------------------------------

/// Streams stuck on a zero flow-control window are cut at the send timeout, though the client keeps
/// the connection writing with PINGs (whose acknowledgements are no progress of a response).
async fn h2_zero_window_is_cut(path: Path) {
    let server = start(path, policy()).await;
    let mut client = RawH2::connect_with(server.addr, &[(INITIAL_WINDOW_SIZE, 0)])
        .await
        .never_acknowledge_pings();
    for stream in [1, 3, 5] {
        client.try_get(stream, "/big?bytes=1048576").await.unwrap();
    }
    let began = Instant::now();
    let (frames, closed) = client.ping_until_closed(SEND + WAIT).await;
    let took = closed - began;
    assert!(took >= SEND, "{path:?}: closed after {took:?}");
    assert!(took < 2 * SEND + SLACK, "{path:?}: closed after {took:?}");
    assert!(
        !frames.iter().any(|f| f.kind == DATA),
        "{path:?}: data went through a zero window: {frames:?}"
    );
    server.until_closed(CloseReason::SendTimeout, WAIT).await;
}

#[tokio::test]
async fn h2_zero_window_streams_are_cut_at_the_send_timeout_serve() {
    h2_zero_window_is_cut(Path::Serve).await;
}

#[tokio::test]
async fn h2_zero_window_streams_are_cut_at_the_send_timeout_axum() {
    h2_zero_window_is_cut(Path::Axum).await;
}
