//! For `tests/lifecycle.rs`: a server on the crate's serve path that reports every close, a test app, the
//! raw HTTP/1 client (`tests/raw`), hyper's HTTP/2 client, and a raw HTTP/2 frame reader for seeing GOAWAY
//! on the wire.

// Each test uses its own part of this module.
#![allow(dead_code)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::IntoFuture;
use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::ws::{WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tower_keepalive::serve::Listener;
use tower_keepalive::{CloseReason, ConnectionHandle, KeepAliveLayer};

#[path = "../raw/mod.rs"]
mod raw;
// Not every test file uses each of them.
#[allow(unused_imports)]
pub use raw::{
    assert_adverts_honest, assert_pipelined_past_the_limit, get_request, is_reset,
    send_junk_until_cut, within, RawClient,
};

/// The bound on any single wait that has no tighter bound of its own.
pub const WAIT: Duration = Duration::from_secs(10);

/// How late "soon after" may be on a loaded 2-core machine.
pub const SLACK: Duration = Duration::from_secs(3);

/// Asserts `lo <= elapsed < hi`.
#[track_caller]
pub fn assert_between(what: &str, elapsed: Duration, lo: Duration, hi: Duration) {
    assert!(
        elapsed >= lo,
        "{what}: after {elapsed:?}, before the {lo:?} it must wait"
    );
    assert!(elapsed < hi, "{what}: after {elapsed:?}, not within {hi:?}");
}

/// One connection's end, as reported through `on_close`.
#[derive(Debug, Clone)]
pub struct Closed {
    pub handle: ConnectionHandle,
    pub reason: CloseReason,
    /// When `on_close` ran: at or after the moment the connection ended.
    pub at: Instant,
    /// `handle.in_flight()` when `on_close` ran.
    pub in_flight: usize,
}

/// A server on the crate's serve path, on a listener of the test's choosing.
pub struct TestServer<A> {
    pub addr: A,
    closes: mpsc::UnboundedReceiver<Closed>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<io::Result<()>>>,
    /// One message per handler start (`"slow"`, `"stream"`, ...).
    pub started: mpsc::UnboundedReceiver<&'static str>,
}

/// Serves [`app`] on 127.0.0.1 with `layer`.
pub async fn start(layer: KeepAliveLayer) -> TestServer<SocketAddr> {
    start_with(layer, None).await
}

/// Serves [`app`] on 127.0.0.1 with `layer` and an optional drain deadline.
pub async fn start_with(
    layer: KeepAliveLayer,
    drain_timeout: Option<Duration>,
) -> TestServer<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    start_on(listener, layer, drain_timeout)
}

/// Serves [`app`] on `listener`.
pub fn start_on<L: Listener>(
    listener: L,
    layer: KeepAliveLayer,
    drain_timeout: Option<Duration>,
) -> TestServer<L::Addr> {
    start_lame_duck_on(listener, layer, None, drain_timeout)
}

/// Serves [`app`] on 127.0.0.1 with `layer`, a lame-duck period and an optional drain deadline.
pub async fn start_lame_duck(
    layer: KeepAliveLayer,
    lame_duck: Duration,
    drain_timeout: Option<Duration>,
) -> TestServer<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    start_lame_duck_on(listener, layer, Some(lame_duck), drain_timeout)
}

/// Serves [`app`] on `listener`, with a lame-duck period if given.
pub fn start_lame_duck_on<L: Listener>(
    listener: L,
    layer: KeepAliveLayer,
    lame_duck: Option<Duration>,
    drain_timeout: Option<Duration>,
) -> TestServer<L::Addr> {
    let addr = listener.local_addr().unwrap();
    let (started_tx, started) = mpsc::unbounded_channel();
    let (close_tx, closes) = mpsc::unbounded_channel();
    let (shutdown, signal) = oneshot::channel::<()>();
    let mut server = tower_keepalive::serve(listener, app(started_tx))
        .keep_alive(layer)
        .on_close(move |handle, reason| {
            let _ = close_tx.send(Closed {
                handle: handle.clone(),
                reason,
                at: Instant::now(),
                in_flight: handle.in_flight(),
            });
        })
        .with_graceful_shutdown(async move {
            let _ = signal.await;
        });
    if let Some(timeout) = drain_timeout {
        server = server.drain_timeout(timeout);
    }
    if let Some(period) = lame_duck {
        server = server.lame_duck(period);
    }
    TestServer {
        addr,
        closes,
        shutdown: Some(shutdown),
        task: Some(tokio::spawn(server.into_future())),
        started,
    }
}

impl<A> TestServer<A> {
    /// The next connection to close, in the order they closed.
    pub async fn next_close(&mut self) -> Closed {
        within("a connection to close", WAIT, self.closes.recv())
            .await
            .expect("server gone")
    }

    /// Asserts that no connection has reported its close yet.
    #[track_caller]
    pub fn assert_no_close(&mut self) {
        if let Ok(closed) = self.closes.try_recv() {
            panic!("unexpected close: {closed:?}");
        }
    }

    /// Waits until a handler has started.
    pub async fn handler_started(&mut self) -> &'static str {
        within("a handler to start", WAIT, self.started.recv())
            .await
            .expect("app gone")
    }

    /// Sends the shutdown signal.
    pub fn shutdown(&mut self) {
        let _ = self.shutdown.take().expect("shut down twice").send(());
    }

    /// Waits at most `limit` for the serve future to return, which it must do without an error.
    pub async fn finished(&mut self, limit: Duration) {
        let task = self.task.take().expect("awaited twice");
        within("the serve future to return", limit, task)
            .await
            .expect("serve task panicked")
            .expect("serve returned an error");
    }
}

impl<A> Drop for TestServer<A> {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// The test app:
///
/// - `/`: `hello`;
/// - `/slow?ms=N`: reports `"slow"`, then answers `slept` after N ms;
/// - `/stream?chunks=N&ms=M`: reports `"stream"`, then a body of N chunks `chunk {i}\n`, M ms apart;
/// - `/big?bytes=N`: N bytes of `x`, length known;
/// - `/ws`: a WebSocket echo.
pub fn app(started: mpsc::UnboundedSender<&'static str>) -> Router {
    Router::new()
        .route("/", get(|| async { "hello" }))
        .route("/slow", get(slow))
        .route("/stream", get(stream))
        .route("/big", get(big))
        .route("/ws", get(ws))
        .with_state(started)
}

type Started = State<mpsc::UnboundedSender<&'static str>>;

fn param(q: &HashMap<String, String>, name: &str) -> u64 {
    q.get(name)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("missing ?{name}="))
}

async fn slow(State(started): Started, Query(q): Query<HashMap<String, String>>) -> &'static str {
    let _ = started.send("slow");
    tokio::time::sleep(Duration::from_millis(param(&q, "ms"))).await;
    "slept"
}

async fn stream(State(started): Started, Query(q): Query<HashMap<String, String>>) -> Response {
    let _ = started.send("stream");
    let (chunks, ms) = (param(&q, "chunks"), param(&q, "ms"));
    let body = futures_util::stream::unfold(0, move |i| async move {
        if i == chunks {
            return None;
        }
        if i > 0 {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        Some((
            Ok::<_, Infallible>(Bytes::from(format!("chunk {i}\n"))),
            i + 1,
        ))
    });
    Response::new(Body::from_stream(body))
}

/// The body `/stream?chunks=N` sends.
pub fn stream_body(chunks: u64) -> String {
    (0..chunks).map(|i| format!("chunk {i}\n")).collect()
}

async fn big(Query(q): Query<HashMap<String, String>>) -> Vec<u8> {
    vec![b'x'; param(&q, "bytes") as usize]
}

async fn ws(upgrade: WebSocketUpgrade) -> Response {
    upgrade.on_upgrade(echo)
}

async fn echo(mut socket: WebSocket) {
    use axum::extract::ws::Message;
    while let Some(Ok(msg)) = socket.recv().await {
        let echoed = matches!(msg, Message::Text(_) | Message::Binary(_));
        if matches!(msg, Message::Close(_)) || (echoed && socket.send(msg).await.is_err()) {
            break;
        }
    }
}

/// A GET request's bytes.
/// An HTTP/2 (prior knowledge) client connection made with hyper.
pub struct H2 {
    pub sender: hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
    /// The client connection future, spawned: it ends when the server has closed the connection.
    pub conn: JoinHandle<Result<(), hyper::Error>>,
    addr: SocketAddr,
}

impl H2 {
    pub async fn connect(addr: SocketAddr) -> Self {
        let tcp = within("connect", WAIT, TcpStream::connect(addr))
            .await
            .unwrap();
        let (sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                .await
                .expect("h2 handshake");
        H2 {
            sender,
            conn: tokio::spawn(conn),
            addr,
        }
    }

    pub fn request(&self, path: &str) -> Request<Empty<Bytes>> {
        Request::get(format!("http://{}{path}", self.addr))
            .body(Empty::new())
            .unwrap()
    }

    /// Sends a GET for `path`; returns the status, the whole body, and when its last byte arrived.
    pub async fn get(&mut self, path: &str) -> (StatusCode, Bytes, Instant) {
        let req = self.request(path);
        let res = within("an h2 response", WAIT, self.sender.send_request(req))
            .await
            .expect("h2 request failed");
        let status = res.status();
        let body = within("an h2 body", WAIT, res.into_body().collect())
            .await
            .expect("h2 body failed")
            .to_bytes();
        (status, body, Instant::now())
    }

    /// Waits at most `limit` for the server to close the connection; returns when it did.
    pub async fn closed(&mut self, limit: Duration) -> Instant {
        let result = within("the h2 connection to close", limit, &mut self.conn)
            .await
            .expect("h2 connection task panicked");
        let at = Instant::now();
        result.expect("h2 connection ended with an error");
        at
    }
}

/// One HTTP/2 frame off the wire.
#[derive(Debug, Clone)]
pub struct Frame {
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
    pub payload: Vec<u8>,
    pub at: Instant,
}

pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const PING: u8 = 0x6;
pub const GOAWAY: u8 = 0x7;
pub const END_STREAM: u8 = 0x1;
pub const ACK: u8 = 0x1;

impl Frame {
    pub fn ends_stream(&self) -> bool {
        matches!(self.kind, DATA | HEADERS) && self.flags & END_STREAM != 0
    }

    /// A GOAWAY frame's last stream id and error code.
    pub fn goaway(&self) -> (u32, u32) {
        assert_eq!(self.kind, GOAWAY);
        let word = |i: usize| u32::from_be_bytes(self.payload[i..i + 4].try_into().unwrap());
        (word(0) & 0x7fff_ffff, word(4))
    }
}

/// A raw HTTP/2 (prior knowledge) client: sends requests as hand-made frames and returns every frame the
/// server sends, answering SETTINGS and PING as a client must.
pub struct RawH2 {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl RawH2 {
    pub async fn connect(addr: SocketAddr) -> Self {
        let stream = within("connect", WAIT, TcpStream::connect(addr))
            .await
            .unwrap();
        let mut h2 = RawH2 {
            stream,
            buf: Vec::new(),
        };
        h2.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec()).await;
        h2.write_frame(SETTINGS, 0, 0, &[]).await;
        h2
    }

    async fn write(&mut self, bytes: Vec<u8>) {
        within("write", WAIT, self.stream.write_all(&bytes))
            .await
            .unwrap();
    }

    pub async fn write_frame(&mut self, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
        let len = payload.len() as u32;
        let mut frame = len.to_be_bytes()[1..].to_vec();
        frame.push(kind);
        frame.push(flags);
        frame.extend_from_slice(&stream.to_be_bytes());
        frame.extend_from_slice(payload);
        self.write(frame).await;
    }

    /// A `GET /` on `stream`, its header block from HPACK's static table: `:method GET`, `:scheme http`,
    /// `:path /`, then `:authority` as a literal.
    pub async fn get(&mut self, stream: u32) {
        let mut block = vec![0x82, 0x86, 0x84, 0x41, 9];
        block.extend_from_slice(b"127.0.0.1");
        // END_STREAM | END_HEADERS
        self.write_frame(HEADERS, 0x5, stream, &block).await;
    }

    /// The next frame from the server other than SETTINGS and PING (answered here), or `None` at EOF.
    pub async fn frame(&mut self) -> Option<Frame> {
        loop {
            while self.buf.len() < 9
                || self.buf.len()
                    < 9 + (u32::from_be_bytes([0, self.buf[0], self.buf[1], self.buf[2]]) as usize)
            {
                let mut chunk = [0u8; 16 * 1024];
                let n = match within("an h2 frame", WAIT, self.stream.read(&mut chunk)).await {
                    Ok(n) => n,
                    Err(err) if is_reset(&err) => 0,
                    Err(err) => panic!("read failed: {err}"),
                };
                if n == 0 {
                    assert!(self.buf.is_empty(), "EOF inside a frame");
                    return None;
                }
                self.buf.extend_from_slice(&chunk[..n]);
            }
            let len = u32::from_be_bytes([0, self.buf[0], self.buf[1], self.buf[2]]) as usize;
            let head: Vec<u8> = self.buf.drain(..9).collect();
            let frame = Frame {
                kind: head[3],
                flags: head[4],
                stream: u32::from_be_bytes(head[5..9].try_into().unwrap()) & 0x7fff_ffff,
                payload: self.buf.drain(..len).collect(),
                at: Instant::now(),
            };
            match frame.kind {
                SETTINGS if frame.flags & ACK == 0 => self.write_frame(SETTINGS, ACK, 0, &[]).await,
                SETTINGS => {}
                PING if frame.flags & ACK == 0 => {
                    self.write_frame(PING, ACK, 0, &frame.payload).await
                }
                PING => {}
                _ => return Some(frame),
            }
        }
    }

    /// Every frame up to EOF, and when EOF came.
    pub async fn frames_to_eof(&mut self) -> (Vec<Frame>, Instant) {
        let mut frames = Vec::new();
        while let Some(frame) = self.frame().await {
            frames.push(frame);
        }
        (frames, Instant::now())
    }
}
