//! Hostile clients that hold connections by not reading, by sending PINGs and never acknowledging the
//! server's, or by opening streams past the maximum: the send timeout (`KeepAliveLayer::send_timeout`),
//! the grace period after GOAWAY, and HTTP/2's maximum requests, on the wire, on both serve paths
//! (`serve()` and `axum::serve` with `KeepAliveListener`).

#![cfg(feature = "axum")]

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::{Future, IntoFuture};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::Query;
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tower_keepalive::axum::{into_make_service, KeepAliveListener};
use tower_keepalive::{CloseReason, KeepAliveLayer};

/// The bound on a wait with none tighter of its own.
const WAIT: Duration = Duration::from_secs(10);
/// How late "soon after" may be on a loaded 2-core machine.
const SLACK: Duration = Duration::from_secs(3);
/// The send timeout of these tests.
const SEND: Duration = Duration::from_secs(1);
/// A body far larger than the socket buffers of both ends.
const BIG: u64 = 64 * 1024 * 1024;

async fn within<F: Future>(what: &str, limit: Duration, fut: F) -> F::Output {
    match tokio::time::timeout(limit, fut).await {
        Ok(out) => out,
        Err(_) => panic!("timed out after {limit:?} waiting for {what}"),
    }
}

fn is_reset(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionAborted
    )
}

#[derive(Clone, Copy, Debug)]
enum Path {
    /// `tower_keepalive::serve`.
    Serve,
    /// `axum::serve` over a `KeepAliveListener`.
    Axum,
}

struct Server {
    addr: SocketAddr,
    layer: KeepAliveLayer,
    /// Handler runs of `/count`.
    hits: Arc<AtomicUsize>,
    task: JoinHandle<io::Result<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Server {
    fn closed(&self, reason: CloseReason) -> u64 {
        self.layer.stats().snapshot().closed(reason)
    }

    /// Waits until a connection has closed for `reason`, and returns when that was seen. `axum::serve`
    /// reports no closes, so both paths are watched through the layer's counters, looked at every 20 ms.
    async fn until_closed(&self, reason: CloseReason, limit: Duration) -> Instant {
        within(&format!("a close for {reason}"), limit, async {
            while self.closed(reason) == 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Instant::now()
        })
        .await
    }
}

fn param(q: &HashMap<String, String>, name: &str, default: u64) -> u64 {
    q.get(name).and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// `/big?bytes=N`: N bytes streamed in 64 KiB frames; `/count`: counts its runs; `/`: `hello`.
fn app(hits: Arc<AtomicUsize>) -> Router {
    Router::new()
        .route("/", get(|| async { "hello" }))
        .route(
            "/count",
            get(move || async move {
                hits.fetch_add(1, Ordering::SeqCst);
                "counted"
            }),
        )
        .route(
            "/big",
            get(|Query(q): Query<HashMap<String, String>>| async move {
                const FRAME: u64 = 64 * 1024;
                let frame = Bytes::from(vec![b'x'; FRAME as usize]);
                let body = futures_util::stream::unfold(param(&q, "bytes", BIG), move |left| {
                    let frame = frame.clone();
                    async move {
                        let n = left.min(FRAME);
                        (n != 0).then(|| (Ok::<_, Infallible>(frame.slice(..n as usize)), left - n))
                    }
                });
                Response::new(Body::from_stream(body))
            }),
        )
}

async fn start(path: Path, layer: KeepAliveLayer) -> Server {
    let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = tcp.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let app = app(hits.clone());
    let task = match path {
        Path::Serve => tokio::spawn(
            tower_keepalive::serve(tcp, app)
                .keep_alive(layer.clone())
                .into_future(),
        ),
        Path::Axum => {
            let listener = KeepAliveListener::new(tcp, layer.clone());
            tokio::spawn(axum::serve(listener, into_make_service(app)).into_future())
        }
    };
    Server {
        addr,
        layer,
        hits,
        task,
    }
}

/// The send timeout of these tests, and an idle timeout as short. The timer looks at a connection when
/// its idle timeout comes (a request starting wakes no timer), then twice per send timeout while it is
/// busy: output that stalls is seen at most an idle timeout late, so the idle timeout bounds how late
/// the cut comes after the send timeout.
fn policy() -> KeepAliveLayer {
    KeepAliveLayer::new().idle_timeout(SEND).send_timeout(SEND)
}

async fn connect(addr: SocketAddr) -> TcpStream {
    within("connect", WAIT, TcpStream::connect(addr))
        .await
        .unwrap()
}

/// Reads until the end of the stream or a reset; returns the bytes read.
async fn drain(stream: &mut TcpStream, limit: Duration) -> u64 {
    within("the end of the stream", limit, async {
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
    let got = drain(&mut client, WAIT).await;
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

/// A client that reads slowly, with pauses shorter than the send timeout, gets the whole body: every
/// write that goes through starts the time again.
async fn http1_slow_reader_is_not_cut(path: Path) {
    const BODY: u64 = 6 * 1024 * 1024;
    let server = start(path, policy()).await;
    // A small receive window, so that the server's writes wait on this client's reads.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(64 * 1024).unwrap();
    let mut client = within("connect", WAIT, socket.connect(server.addr))
        .await
        .unwrap();
    client
        .write_all(format!("GET /big?bytes={BODY} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut got = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    // About 2.5 MB/s, in steps 250 ms apart: well under the send timeout, each.
    within("the slow read", Duration::from_secs(30), async {
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

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const ACK: u8 = 0x1;

#[derive(Debug)]
struct Frame {
    kind: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
}

/// A hostile HTTP/2 client over prior knowledge: acknowledges SETTINGS, never the server's PING.
struct RawH2 {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl RawH2 {
    /// Connects with `settings` (id, value) in its SETTINGS.
    async fn connect(addr: SocketAddr, settings: &[(u16, u32)]) -> Self {
        let mut h2 = RawH2 {
            stream: connect(addr).await,
            buf: Vec::new(),
        };
        h2.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.unwrap();
        let mut payload = Vec::new();
        for (id, value) in settings {
            payload.extend_from_slice(&id.to_be_bytes());
            payload.extend_from_slice(&value.to_be_bytes());
        }
        h2.frame_out(SETTINGS, 0, 0, &payload).await.unwrap();
        h2
    }

    async fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        within("a write", WAIT, self.stream.write_all(bytes)).await
    }

    async fn frame_out(
        &mut self,
        kind: u8,
        flags: u8,
        stream: u32,
        payload: &[u8],
    ) -> io::Result<()> {
        let mut frame = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        frame.extend_from_slice(&[kind, flags]);
        frame.extend_from_slice(&stream.to_be_bytes());
        frame.extend_from_slice(payload);
        self.write(&frame).await
    }

    /// A GET for `path` on `stream`: HPACK static `:method GET`, `:scheme http`, then `:path` and
    /// `:authority` as literals without indexing.
    async fn get(&mut self, stream: u32, path: &str) -> io::Result<()> {
        let mut block = vec![0x82, 0x86, 0x04, path.len() as u8];
        block.extend_from_slice(path.as_bytes());
        block.extend_from_slice(&[0x01, 9]);
        block.extend_from_slice(b"127.0.0.1");
        // END_STREAM | END_HEADERS
        self.frame_out(HEADERS, 0x5, stream, &block).await
    }

    /// A PING of the client's own (which the server acknowledges).
    async fn ping(&mut self) -> io::Result<()> {
        self.frame_out(PING, 0, 0, &[7; 8]).await
    }

    /// The next frame, `None` at the end of the stream or a reset. SETTINGS are acknowledged; PINGs
    /// from the server never are.
    async fn frame(&mut self) -> Option<Frame> {
        loop {
            while self.buf.len() < 9
                || self.buf.len()
                    < 9 + u32::from_be_bytes([0, self.buf[0], self.buf[1], self.buf[2]]) as usize
            {
                let mut chunk = [0u8; 16 * 1024];
                match self.stream.read(&mut chunk).await {
                    Ok(0) => return None,
                    Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                    Err(err) if is_reset(&err) => return None,
                    Err(err) => panic!("read failed: {err}"),
                }
            }
            let len = u32::from_be_bytes([0, self.buf[0], self.buf[1], self.buf[2]]) as usize;
            let head: Vec<u8> = self.buf.drain(..9).collect();
            let frame = Frame {
                kind: head[3],
                flags: head[4],
                stream: u32::from_be_bytes(head[5..9].try_into().unwrap()) & 0x7fff_ffff,
                payload: self.buf.drain(..len).collect(),
            };
            if frame.kind == SETTINGS && frame.flags & ACK == 0 {
                // A failed write means the server is gone: the next read says so.
                let _ = self.frame_out(SETTINGS, ACK, 0, &[]).await;
                continue;
            }
            return Some(frame);
        }
    }

    /// Reads frames, sending a PING every 200 ms, until the end of the stream; returns the frames and
    /// when the end came.
    async fn ping_until_closed(&mut self, limit: Duration) -> (Vec<Frame>, Instant) {
        within("the server to close the connection", limit, async {
            let mut frames = Vec::new();
            let mut tick = tokio::time::interval(Duration::from_millis(200));
            loop {
                tokio::select! {
                    frame = self.frame() => match frame {
                        Some(frame) => frames.push(frame),
                        None => return (frames, Instant::now()),
                    },
                    _ = tick.tick() => {
                        // The server may be gone: the read says so.
                        let _ = self.ping().await;
                    }
                }
            }
        })
        .await
    }
}

/// SETTINGS_INITIAL_WINDOW_SIZE.
const INITIAL_WINDOW_SIZE: u16 = 0x4;

/// Streams stuck on a zero flow-control window are cut at the send timeout, though the client keeps
/// the connection writing with PINGs (whose acknowledgements are no progress of a response).
async fn h2_zero_window_is_cut(path: Path) {
    let server = start(path, policy()).await;
    let mut client = RawH2::connect(server.addr, &[(INITIAL_WINDOW_SIZE, 0)]).await;
    for stream in [1, 3, 5] {
        client.get(stream, "/big?bytes=1048576").await.unwrap();
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

/// A client that opens no stream and sends PINGs without acknowledging the server's is closed after the
/// idle timeout and a short grace period: the acknowledgements the server writes do not push the grace
/// on.
async fn h2_pinger_without_streams_is_closed(path: Path) {
    let idle = Duration::from_secs(1);
    let server = start(path, KeepAliveLayer::new().idle_timeout(idle)).await;
    let began = Instant::now();
    let mut client = RawH2::connect(server.addr, &[]).await;
    let (frames, closed) = client.ping_until_closed(idle + WAIT).await;
    let took = closed - began;
    assert!(took >= idle, "{path:?}: closed after {took:?}");
    // The idle timeout, then (serve path) a grace of one second after GOAWAY.
    assert!(
        took < idle + Duration::from_secs(1) + SLACK,
        "{path:?}: closed after {took:?}"
    );
    if let Path::Serve = path {
        assert!(frames.iter().any(|f| f.kind == GOAWAY), "{frames:?}");
    }
}

#[tokio::test]
async fn h2_pinger_without_streams_is_closed_after_the_idle_timeout_serve() {
    h2_pinger_without_streams_is_closed(Path::Serve).await;
}

#[tokio::test]
async fn h2_pinger_without_streams_is_closed_after_the_idle_timeout_axum() {
    h2_pinger_without_streams_is_closed(Path::Axum).await;
}

/// The same after a request: the grace after GOAWAY is then the send timeout (for response data h2
/// may still hold), and it is not pushed on by PINGs either.
#[tokio::test]
async fn h2_pinger_after_a_request_is_closed_after_the_idle_timeout_and_its_grace() {
    let idle = Duration::from_secs(1);
    let grace = Duration::from_secs(2);
    let server = start(
        Path::Serve,
        KeepAliveLayer::new().idle_timeout(idle).send_timeout(grace),
    )
    .await;
    let mut client = RawH2::connect(server.addr, &[]).await;
    client.get(1, "/").await.unwrap();
    let began = Instant::now();
    let (frames, closed) = client.ping_until_closed(idle + grace + WAIT).await;
    assert!(
        frames.iter().any(|f| f.kind == DATA && f.stream == 1),
        "{frames:?}"
    );
    assert!(frames.iter().any(|f| f.kind == GOAWAY), "{frames:?}");
    let took = closed - began;
    assert!(took >= idle, "closed after {took:?}");
    assert!(took < idle + grace + SLACK, "closed after {took:?}");
}

/// With a maximum of N requests, a client that never acknowledges the server's PING (so hyper's
/// graceful close never sends its final GOAWAY, and keeps taking new streams) and opens 3 N streams is
/// served N of them; the rest are reset with REFUSED_STREAM without reaching the handler, and the
/// connection is dropped after its grace period.
async fn h2_max_requests_hold(path: Path) {
    const MAX: u64 = 5;
    let grace = Duration::from_secs(2);
    let server = start(
        path,
        KeepAliveLayer::new().max_requests(MAX).send_timeout(grace),
    )
    .await;
    let mut client = RawH2::connect(server.addr, &[]).await;
    let streams: Vec<u32> = (0..3 * MAX as u32).map(|i| 2 * i + 1).collect();
    // Each stream's answer: the first byte of its response head, or its reset's error code.
    let mut answers: HashMap<u32, Result<u8, u32>> = HashMap::new();
    // One stream after the other, each answered before the next: the client has seen the GOAWAY long
    // before it opens the streams past the maximum.
    for &stream in &streams {
        if client.get(stream, "/count").await.is_err() {
            break;
        }
        let answered = within("an answer", WAIT, async {
            loop {
                match client.frame().await {
                    Some(f) if f.kind == HEADERS && f.stream == stream => {
                        return Some(Ok(f.payload[0]))
                    }
                    Some(f) if f.kind == RST_STREAM && f.stream == stream => {
                        return Some(Err(u32::from_be_bytes(f.payload[..4].try_into().unwrap())))
                    }
                    Some(_) => {}
                    None => return None,
                }
            }
        })
        .await;
        let Some(answer) = answered else { break };
        answers.insert(stream, answer);
    }
    let hits = server.hits.load(Ordering::SeqCst) as u64;
    assert!(hits <= MAX, "{path:?}: {hits} requests reached the handler");
    assert_eq!(
        hits, MAX,
        "{path:?}: the allowed requests were not all served"
    );
    // HPACK: 0x88 is `:status 200` (static index 8).
    let served = answers.values().filter(|&&a| a == Ok(0x88)).count() as u64;
    assert_eq!(served, MAX, "{path:?}: {answers:?}");
    // Past the maximum, refused: reset with REFUSED_STREAM (0x7), never answered.
    for (stream, answer) in &answers {
        if *stream > 2 * MAX as u32 - 1 {
            assert_eq!(
                *answer,
                Err(0x7),
                "{path:?}: stream {stream} not refused: {answers:?}"
            );
        }
    }
    // The client ignores the close: it is dropped within the grace period after its last answer.
    let last = Instant::now();
    let (_, closed) = client.ping_until_closed(grace + WAIT).await;
    assert!(
        closed - last < grace + SLACK,
        "{path:?}: closed {:?} after the last answer",
        closed - last
    );
}

#[tokio::test]
async fn h2_max_requests_hold_against_a_client_that_never_acknowledges_ping_serve() {
    h2_max_requests_hold(Path::Serve).await;
}

#[tokio::test]
async fn h2_max_requests_hold_against_a_client_that_never_acknowledges_ping_axum() {
    h2_max_requests_hold(Path::Axum).await;
}
