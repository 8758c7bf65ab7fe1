//! HTTP/1 on the wire: a raw client that writes exact bytes, parses the responses itself, and notes when
//! the last byte and the end of the stream arrived; request builders and assertions on what it reads.

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, Join, Sink};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

use super::{within, within_for};

/// A GET for `path` over HTTP/1.1, with nothing but `Host`.
pub fn get_request(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
}

/// Whether a read or write failed because the peer reset or dropped the connection.
pub fn is_reset(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionAborted
    )
}

/// A client that pipelines: reads with a [`RawClient`] while a task of its own writes.
pub type PipeliningClient = RawClient<Join<OwnedReadHalf, Sink>>;

/// Connects, and sends `count` copies of `request` from a task while the caller reads the responses with
/// the returned client. Returns once a tenth of them are out, so that the server has input it has not read
/// yet when it answers the last request it will; the rest goes out while the caller reads. The task stops
/// at its first failed write (the server may close before it has read everything) and returns the write
/// half, still open: the server, not the client, ends the connection. Abort the task if the server may
/// stop reading without closing.
pub async fn pipeline(
    addr: SocketAddr,
    request: &[u8],
    count: usize,
) -> (PipeliningClient, JoinHandle<OwnedWriteHalf>) {
    let stream = within("connect", TcpStream::connect(addr)).await.unwrap();
    let (read, mut write) = stream.into_split();
    // A hundred requests per write: fewer system calls, and the server still sees them arrive while it
    // answers.
    let batch = request.repeat(100);
    let len = request.len();
    let (under_way, started) = tokio::sync::oneshot::channel();
    let writer = tokio::spawn(async move {
        let mut under_way = Some(under_way);
        let mut sent = 0;
        while sent < count {
            let n = (count - sent).min(100);
            if write.write_all(&batch[..n * len]).await.is_err() {
                break;
            }
            sent += n;
            if sent >= count / 10 {
                if let Some(tx) = under_way.take() {
                    let _ = tx.send(());
                }
            }
        }
        write
    });
    // Dropped unsent if the writer stopped early: that is a start too.
    let _ = within("the first requests to go out", started).await;
    (
        RawClient::new(tokio::io::join(read, tokio::io::sink())),
        writer,
    )
}

/// Pipelines `count` GETs for `path` on one connection to a server that answers at most `max` requests
/// per connection, reading while they are sent: exactly `max` responses arrive, the last saying
/// `Connection: close`, then a clean end of the stream.
///
/// A server that closes with input unread makes its kernel reset the connection, which throws away what
/// it has not sent yet, and the client's kernel what the client has not read yet. Give `path` a body of
/// some size (64 KiB, say): the server has then written most of the responses into its socket buffer, not
/// onto the wire, when it closes.
pub async fn assert_pipelined_past_the_limit(
    addr: SocketAddr,
    path: &str,
    max: usize,
    count: usize,
) {
    let (mut client, writer) = pipeline(addr, get_request(path).as_bytes(), count).await;
    for n in 1..=max {
        let res = client.read_response().await;
        assert_eq!(res.status, 200, "response {n}: {res:#?}");
        let expected = if n < max { "keep-alive" } else { "close" };
        assert_eq!(
            res.values("connection"),
            [expected],
            "response {n}: {res:#?}"
        );
    }
    client.expect_eof().await;
    writer.abort();
}

/// Writes junk on `stream` as fast as the server takes it, reading nothing, until a write fails (the
/// server closed and reset the connection). Fails if that takes longer than `limit`. Returns how many
/// bytes went out.
pub async fn send_junk_until_cut(stream: &mut OwnedWriteHalf, limit: Duration) -> usize {
    let junk = vec![b'x'; 64 * 1024];
    let mut sent = 0;
    within_for(
        "the server to cut a client that never stops sending",
        limit,
        async {
            loop {
                match stream.write(&junk).await {
                    Ok(0) => return,
                    Ok(n) => sent += n,
                    Err(err) if is_reset(&err) => return,
                    Err(err) => panic!("write failed: {err}"),
                }
            }
        },
    )
    .await;
    sent
}

/// One HTTP/1 response as read off the wire.
#[derive(Debug)]
pub struct RawResponse {
    pub status_line: String,
    pub status: u16,
    /// Field lines in the order received, names as sent.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    /// Every value of `name` (case-insensitive), one per field line, in order.
    pub fn values(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// The value of `name`, which must appear on at most one field line.
    pub fn header(&self, name: &str) -> Option<&str> {
        let values = self.values(name);
        assert!(
            values.len() <= 1,
            "{name} sent on {} field lines: {values:?}\n{self:#?}",
            values.len()
        );
        values.first().copied()
    }

    /// The field lines other than `date`, which changes every second.
    pub fn headers_without_date(&self) -> Vec<(&str, &str)> {
        self.headers
            .iter()
            .filter(|(n, _)| !n.eq_ignore_ascii_case("date"))
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect()
    }

    pub fn body_str(&self) -> &str {
        std::str::from_utf8(&self.body).expect("body is not UTF-8")
    }

    /// The `timeout=` of the response's `Keep-Alive`, in seconds, if it has one.
    pub fn advertised_timeout(&self) -> Option<u64> {
        self.header("keep-alive")?
            .split(',')
            .filter_map(|param| param.trim().split_once('='))
            .find(|(name, _)| name.trim().eq_ignore_ascii_case("timeout"))
            .map(|(_, value)| value.trim().parse().expect("bad timeout="))
    }
}

/// One request of [`RawClient::trust_adverts`]: when it was sent, and its response, or `None` when the
/// connection ended instead.
#[derive(Debug)]
pub struct Exchange {
    pub sent: Instant,
    pub response: Option<RawResponse>,
    /// When the response's last byte came, or the end of the connection.
    pub received: Instant,
}

/// Checks what [`RawClient::trust_adverts`] saw of a connection whose maximum age falls at `max_age_at`:
/// every advert before the close was no longer than the time really left before the maximum age,
/// counted from when its request was sent (the server planned the response after that); the close came
/// as a response saying `close`, in the last second before the maximum age (when less than a second is
/// left, none is advertised), never as the connection ending under a request sent while the last advert
/// still ran. Returns the timeouts advertised, in order.
#[track_caller]
pub fn assert_adverts_honest(exchanges: &[Exchange], max_age_at: Instant) -> Vec<u64> {
    let mut timeouts = Vec::new();
    let Some((last, before)) = exchanges.split_last() else {
        panic!("no request sent");
    };
    for (i, exchange) in before.iter().enumerate() {
        let res = exchange
            .response
            .as_ref()
            .expect("only the last may have no response");
        assert_eq!(res.header("connection"), Some("keep-alive"), "{res:#?}");
        let timeout = res
            .advertised_timeout()
            .unwrap_or_else(|| panic!("no timeout= advertised: {res:#?}"));
        let left = max_age_at.saturating_duration_since(exchange.sent);
        assert!(
            Duration::from_secs(timeout) <= left,
            "request {i} sent {left:?} before the maximum age was answered with timeout={timeout}"
        );
        timeouts.push(timeout);
    }
    let Some(res) = &last.response else {
        let (advert, answered) = before
            .last()
            .map(|prev| (timeouts.last().copied(), prev.received))
            .unwrap_or((None, last.sent));
        panic!(
            "the connection ended under request {}, sent {:?} after a response advertising \
             timeout={advert:?} ({:?} before the maximum age)",
            before.len(),
            last.sent.duration_since(answered),
            max_age_at.saturating_duration_since(last.sent),
        );
    };
    assert_eq!(res.values("connection"), ["close"], "{res:#?}");
    assert!(res.values("keep-alive").is_empty(), "{res:#?}");
    // The server planned the close with less than a second left, then the client read it; the handle's
    // `Instant` errs late by nanoseconds, hence the millisecond.
    let early = (max_age_at - Duration::from_secs(1)).saturating_duration_since(last.received);
    assert!(
        early <= Duration::from_millis(1),
        "the close came {early:?} before the last second of the maximum age"
    );
    timeouts
}

/// A raw HTTP/1 client over any stream (TCP unless said otherwise).
pub struct RawClient<S = TcpStream> {
    stream: S,
    buf: Vec<u8>,
    /// When the end of the stream was read (a reset counts), if it was.
    eof_at: Option<Instant>,
    reset: bool,
    /// When the last byte was read.
    pub last_byte_at: Instant,
}

impl RawClient<TcpStream> {
    pub async fn connect(addr: SocketAddr) -> Self {
        RawClient::new(within("connect", TcpStream::connect(addr)).await.unwrap())
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> RawClient<S> {
    pub fn new(stream: S) -> Self {
        RawClient {
            stream,
            buf: Vec::new(),
            eof_at: None,
            reset: false,
            last_byte_at: Instant::now(),
        }
    }

    pub fn stream_mut(&mut self) -> &mut S {
        &mut self.stream
    }

    /// The underlying stream, for a client that takes over the connection (WebSocket).
    pub fn into_stream(self) -> S {
        assert!(self.buf.is_empty(), "unread bytes");
        self.stream
    }

    pub async fn send(&mut self, bytes: impl AsRef<[u8]>) {
        within("write", self.stream.write_all(bytes.as_ref()))
            .await
            .unwrap();
    }

    /// Sends `bytes`; `false` if the server had reset or closed the connection.
    async fn try_send(&mut self, bytes: impl AsRef<[u8]>) -> bool {
        match within("write", self.stream.write_all(bytes.as_ref())).await {
            Ok(()) => true,
            Err(err) if is_reset(&err) => {
                self.reset = true;
                self.eof_at.get_or_insert_with(Instant::now);
                false
            }
            Err(err) => panic!("write failed: {err}"),
        }
    }

    /// Reads one response, or `None` if the connection ends (a close or a reset) before its first byte.
    pub async fn try_read_response(&mut self) -> Option<RawResponse> {
        if self.buf.is_empty() && self.fill().await == 0 {
            return None;
        }
        Some(self.read_response().await)
    }

    /// A client that trusts the adverts, as undici does: sends `GET path` every `period` (from one send to
    /// the next) on this one connection for as long as the last response allows it, and stops at a
    /// response that says `Connection: close`, at the end of the connection, or after `limit` requests.
    /// Panics if a response that keeps the connection alive advertises no `timeout=`, or one that the
    /// next request would miss (the period is meant to be well within it).
    pub async fn trust_adverts(
        &mut self,
        path: &str,
        period: Duration,
        limit: usize,
    ) -> Vec<Exchange> {
        let request = get_request(path);
        let mut exchanges: Vec<Exchange> = Vec::new();
        while exchanges.len() < limit {
            if let Some(prev) = exchanges.last() {
                tokio::time::sleep_until((prev.sent + period).into()).await;
            }
            let sent = Instant::now();
            if let Some(prev) = exchanges.last() {
                let advert = prev
                    .response
                    .as_ref()
                    .and_then(RawResponse::advertised_timeout);
                let valid_until = advert.map(|t| prev.received + Duration::from_secs(t));
                assert!(
                    valid_until.is_some_and(|until| sent < until),
                    "the client fell behind: {:?} after a response advertising timeout={advert:?}",
                    sent.duration_since(prev.received)
                );
            }
            let response = if self.try_send(&request).await {
                self.try_read_response().await
            } else {
                None
            };
            let received = Instant::now();
            let close = response
                .as_ref()
                .is_none_or(|res| res.header("connection") != Some("keep-alive"));
            exchanges.push(Exchange {
                sent,
                response,
                received,
            });
            if close {
                break;
            }
        }
        exchanges
    }

    /// Sends `request` and reads one response to it.
    pub async fn request(&mut self, request: impl AsRef<[u8]>) -> RawResponse {
        self.send(request).await;
        self.read_response().await
    }

    /// Sends a GET for `path` ([`get_request`]) and reads its response.
    pub async fn get(&mut self, path: &str) -> RawResponse {
        self.request(get_request(path)).await
    }

    /// Reads more bytes into the buffer; returns how many (0: the server closed its side, or reset it).
    async fn fill(&mut self) -> usize {
        let mut chunk = [0u8; 16 * 1024];
        let n = match within("bytes from the server", self.stream.read(&mut chunk)).await {
            Ok(n) => n,
            Err(err) if is_reset(&err) => {
                self.reset = true;
                0
            }
            Err(err) => panic!("read failed: {err}"),
        };
        if n == 0 {
            self.eof_at.get_or_insert_with(Instant::now);
        } else {
            self.last_byte_at = Instant::now();
        }
        self.buf.extend_from_slice(&chunk[..n]);
        n
    }

    async fn take(&mut self, n: usize) -> Vec<u8> {
        while self.buf.len() < n {
            assert!(
                self.fill().await > 0,
                "EOF after {} of {n} bytes",
                self.buf.len()
            );
        }
        self.buf.drain(..n).collect()
    }

    async fn take_line(&mut self) -> String {
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line: Vec<u8> = self.buf.drain(..i + 2).collect();
                return String::from_utf8(line[..i].to_vec()).expect("line is not UTF-8");
            }
            assert!(
                self.fill().await > 0,
                "EOF inside a line: {:?}",
                String::from_utf8_lossy(&self.buf)
            );
        }
    }

    /// Reads one response to a GET: the head, then the body by `Transfer-Encoding: chunked`,
    /// `Content-Length`, or up to EOF when it has neither (none for 1xx, 204 and 304).
    pub async fn read_response(&mut self) -> RawResponse {
        self.read(false).await
    }

    /// Reads one response to a HEAD request: a head with no body.
    pub async fn read_head_response(&mut self) -> RawResponse {
        self.read(true).await
    }

    async fn read(&mut self, head_only: bool) -> RawResponse {
        let status_line = self.take_line().await;
        let status: u16 = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("malformed status line {status_line:?}"));
        let mut headers = Vec::new();
        loop {
            let line = self.take_line().await;
            if line.is_empty() {
                break;
            }
            let (name, value) = line
                .split_once(':')
                .unwrap_or_else(|| panic!("malformed field line {line:?}"));
            headers.push((name.to_string(), value.trim().to_string()));
        }
        let mut res = RawResponse {
            status_line,
            status,
            headers,
            body: Vec::new(),
        };
        if head_only || status < 200 || status == 204 || status == 304 {
            return res;
        }
        let chunked = res
            .values("transfer-encoding")
            .iter()
            .any(|v| v.eq_ignore_ascii_case("chunked"));
        if chunked {
            assert!(
                res.header("content-length").is_none(),
                "both lengths: {res:#?}"
            );
            loop {
                let size_line = self.take_line().await;
                let size = usize::from_str_radix(size_line.split(';').next().unwrap().trim(), 16)
                    .unwrap_or_else(|_| panic!("bad chunk size {size_line:?}"));
                if size == 0 {
                    // No trailers expected: the empty line that ends the message.
                    assert_eq!(self.take_line().await, "", "trailers after the last chunk");
                    break;
                }
                let data = self.take(size).await;
                res.body.extend_from_slice(&data);
                assert_eq!(self.take_line().await, "", "chunk not followed by CRLF");
            }
        } else if let Some(len) = res.header("content-length") {
            let len: usize = len.parse().expect("bad content-length");
            res.body = self.take(len).await;
        } else {
            // Close-delimited (RFC 9112 section 6.3): the body is everything up to EOF.
            while self.fill().await > 0 {}
            res.body = std::mem::take(&mut self.buf);
        }
        res
    }

    /// Waits for the end of the stream, which must come with no more bytes: a close or a reset. Returns
    /// when it was read.
    pub async fn eof(&mut self) -> Instant {
        if self.eof_at.is_none() {
            let n = self.fill().await;
            assert_eq!(
                n,
                0,
                "bytes where EOF was expected: {:?}",
                String::from_utf8_lossy(&self.buf)
            );
        }
        assert!(
            self.buf.is_empty(),
            "unread bytes before EOF: {:?}",
            String::from_utf8_lossy(&self.buf)
        );
        self.eof_at.expect("EOF read")
    }

    /// Asserts that the server closes the connection cleanly (a read returns 0, no reset) with nothing
    /// more sent.
    pub async fn expect_eof(&mut self) {
        self.eof().await;
        assert!(!self.reset, "the connection was reset, not closed");
    }

    /// Whether the server has closed the connection (EOF or a reset read).
    pub fn saw_eof(&self) -> bool {
        self.eof_at.is_some()
    }
}

/// A GET request's bytes: `GET {path} {version}`, a Host line, then `lines`, each one field line.
pub fn http_get(path: &str, version: &str, lines: &[&str]) -> String {
    let mut req = format!("GET {path} {version}\r\nHost: 127.0.0.1\r\n");
    for line in lines {
        req.push_str(line);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    req
}

/// Asserts a response's status line and its field lines (other than `date`, sent once) exactly and in order.
#[track_caller]
pub fn assert_head(res: &RawResponse, status_line: &str, headers: &[(&str, &str)]) {
    assert_eq!(res.status_line, status_line, "{res:#?}");
    assert_eq!(res.headers_without_date(), headers, "{res:#?}");
    assert_eq!(res.values("date").len(), 1, "{res:#?}");
}

/// A client that has sent one request to a server answering one request per connection: it has read the
/// response (`Connection: close`) and the end of the stream, and can still write (the server is in its
/// lingering close, RFC 9112 section 9.6).
pub async fn answered_and_closed(addr: SocketAddr) -> (PipeliningClient, OwnedWriteHalf) {
    let stream = within("connect", TcpStream::connect(addr)).await.unwrap();
    let (read, mut write) = stream.into_split();
    write.write_all(get_request("/").as_bytes()).await.unwrap();
    let mut client = RawClient::new(tokio::io::join(read, tokio::io::sink()));
    let res = client.read_response().await;
    assert_eq!(res.values("connection"), ["close"], "{res:#?}");
    client.expect_eof().await;
    (client, write)
}

/// Sends a GET for `path` and half-closes: the response (`body`) comes, then the end of the stream.
pub async fn half_close_after(addr: SocketAddr, path: &str, body: &str) {
    let mut client = RawClient::connect(addr).await;
    client.send(get_request(path)).await;
    client.stream_mut().shutdown().await.unwrap();
    let res = client.read_response().await;
    assert_eq!(
        (res.status, res.body_str()),
        (200, body),
        "{path}: {res:#?}"
    );
    if path != "/" {
        // Still busy when the end of the request stream came: the response says so.
        assert_eq!(res.values("connection"), ["close"], "{path}: {res:#?}");
    }
    client.expect_eof().await;
}
