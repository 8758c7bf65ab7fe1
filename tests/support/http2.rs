//! HTTP/2 over h2c (prior knowledge): hyper's client, and a raw client that writes hand-made frames and
//! returns every frame the server sends, for seeing GOAWAY and RST_STREAM on the wire.

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

use super::http1::is_reset;
use super::{within, within_for};

/// An HTTP/2 (prior knowledge) client connection made with hyper.
pub struct H2 {
    pub sender: hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
    /// The client connection future, spawned: it ends when the server has closed the connection.
    pub conn: JoinHandle<Result<(), hyper::Error>>,
    /// The client's own address on the connection.
    pub local: SocketAddr,
    addr: SocketAddr,
}

impl H2 {
    pub async fn connect(addr: SocketAddr) -> Self {
        let tcp = within("connect", TcpStream::connect(addr)).await.unwrap();
        let local = tcp.local_addr().unwrap();
        let (sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                .await
                .expect("h2 handshake");
        H2 {
            sender,
            conn: tokio::spawn(conn),
            local,
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
        let res = within("an h2 response", self.sender.send_request(req))
            .await
            .expect("h2 request failed");
        let status = res.status();
        let body = within("an h2 body", res.into_body().collect())
            .await
            .expect("h2 body failed")
            .to_bytes();
        (status, body, Instant::now())
    }

    /// Waits at most `limit` for the server to close the connection; returns when it did.
    pub async fn closed(&mut self, limit: Duration) -> Instant {
        let result = within_for("the h2 connection to close", limit, &mut self.conn)
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

/// SETTINGS_INITIAL_WINDOW_SIZE (RFC 9113 section 6.5.2).
pub const INITIAL_WINDOW_SIZE: u16 = 0x4;

/// A raw HTTP/2 (prior knowledge) client: sends requests as hand-made frames and returns every frame the
/// server sends but SETTINGS and PING, which it answers as a client must; or, if told to
/// ([`never_acknowledge_pings`](Self::never_acknowledge_pings)), it counts the server's PINGs and never
/// answers them, as a hostile client does.
pub struct RawH2 {
    stream: TcpStream,
    buf: Vec<u8>,
    answer_pings: bool,
    /// The PINGs the server has sent so far (acknowledgements of the client's own not counted).
    pub pings_received: usize,
}

impl RawH2 {
    pub async fn connect(addr: SocketAddr) -> Self {
        Self::connect_with(addr, &[]).await
    }

    /// Connects with `settings` (identifier, value) in the client's SETTINGS frame.
    pub async fn connect_with(addr: SocketAddr, settings: &[(u16, u32)]) -> Self {
        let stream = within("connect", TcpStream::connect(addr)).await.unwrap();
        let mut h2 = RawH2 {
            stream,
            buf: Vec::new(),
            answer_pings: true,
            pings_received: 0,
        };
        h2.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.unwrap();
        let mut payload = Vec::new();
        for (id, value) in settings {
            payload.extend_from_slice(&id.to_be_bytes());
            payload.extend_from_slice(&value.to_be_bytes());
        }
        h2.write_frame(SETTINGS, 0, 0, &payload).await;
        h2
    }

    /// From now on the server's PINGs are counted and never acknowledged.
    pub fn never_acknowledge_pings(mut self) -> Self {
        self.answer_pings = false;
        self
    }

    async fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        within("write", self.stream.write_all(bytes)).await
    }

    /// Writes a frame; the error if the server has gone.
    pub async fn try_write_frame(
        &mut self,
        kind: u8,
        flags: u8,
        stream: u32,
        payload: &[u8],
    ) -> io::Result<()> {
        let len = payload.len() as u32;
        let mut frame = len.to_be_bytes()[1..].to_vec();
        frame.push(kind);
        frame.push(flags);
        frame.extend_from_slice(&stream.to_be_bytes());
        frame.extend_from_slice(payload);
        self.write(&frame).await
    }

    pub async fn write_frame(&mut self, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
        self.try_write_frame(kind, flags, stream, payload)
            .await
            .expect("write failed");
    }

    /// A `GET /` on `stream`.
    pub async fn get(&mut self, stream: u32) {
        self.try_get(stream, "/").await.expect("write failed");
    }

    /// A GET for `path` on `stream`; the error if the server has gone. The header block: HPACK's static
    /// table for `:method GET` and `:scheme http`, then `:path` and `:authority` as literals without
    /// indexing (RFC 7541 section 6.2.2).
    pub async fn try_get(&mut self, stream: u32, path: &str) -> io::Result<()> {
        assert!(
            path.len() < 127,
            "a path longer than HPACK's one-byte length"
        );
        let mut block = vec![0x82, 0x86, 0x04, path.len() as u8];
        block.extend_from_slice(path.as_bytes());
        block.extend_from_slice(&[0x01, 9]);
        block.extend_from_slice(b"127.0.0.1");
        // END_STREAM | END_HEADERS
        self.try_write_frame(HEADERS, 0x5, stream, &block).await
    }

    /// A PING of the client's own, which the server acknowledges; the error if the server has gone.
    pub async fn ping(&mut self) -> io::Result<()> {
        self.try_write_frame(PING, 0, 0, &[7; 8]).await
    }

    /// The next frame from the server other than SETTINGS and PING (answered here, or PING counted),
    /// or `None` at EOF.
    pub async fn frame(&mut self) -> Option<Frame> {
        loop {
            while self.buf.len() < 9
                || self.buf.len()
                    < 9 + (u32::from_be_bytes([0, self.buf[0], self.buf[1], self.buf[2]]) as usize)
            {
                let mut chunk = [0u8; 16 * 1024];
                let n = match within("an h2 frame", self.stream.read(&mut chunk)).await {
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
            // A failed answer means the server has gone: the next read says so.
            match frame.kind {
                SETTINGS if frame.flags & ACK == 0 => {
                    let _ = self.try_write_frame(SETTINGS, ACK, 0, &[]).await;
                }
                SETTINGS => {}
                PING if frame.flags & ACK == 0 => {
                    self.pings_received += 1;
                    if self.answer_pings {
                        let _ = self.try_write_frame(PING, ACK, 0, &frame.payload).await;
                    }
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

    /// Reads frames, sending a PING of the client's own every 200 ms, until EOF (within `limit`); returns
    /// the frames and when EOF came. The server's acknowledgements keep it writing: they must not keep
    /// the connection open.
    pub async fn ping_until_closed(&mut self, limit: Duration) -> (Vec<Frame>, Instant) {
        within_for("the server to close the connection", limit, async {
            let mut frames = Vec::new();
            let mut tick = tokio::time::interval(Duration::from_millis(200));
            loop {
                tokio::select! {
                    frame = self.frame() => match frame {
                        Some(frame) => frames.push(frame),
                        None => return (frames, Instant::now()),
                    },
                    _ = tick.tick() => {
                        // The server may be gone: the next read says so.
                        let _ = self.ping().await;
                    }
                }
            }
        })
        .await
    }
}
