//! `tower-keepalive` on the wire: what a server with [`KeepAliveLayer`] answers to real clients.
//!
//! Run it with:
//!
//! ```text
//! cargo run --example demo
//! ```
//!
//! The demo starts a server on a free loopback port: a hand-written hyper-util accept loop that speaks
//! HTTP/1.x and h2c (HTTP/2 without TLS) on the same port, with an axum router behind
//! `KeepAliveLayer::new().idle_timeout(5 s).max_requests(3)` and one `ConnectionHandle` per accepted
//! connection. Then it talks to the server and prints what came back:
//!
//! 1. HTTP/1.1, three requests on one connection: `Keep-Alive: timeout=5, max=2`, then `max=1`, then
//!    `Connection: close` at the limit, and the server closes the connection.
//! 2. HTTP/1.1 with `Connection: close` from the client: the response says `close`, the connection ends.
//! 3. HTTP/1.0: without `Connection: keep-alive` the connection closes after one response; with it, the
//!    connection is kept alive and advertised, and closes at the limit as well.
//! 4. A handler that sets `Connection` and `Keep-Alive` itself: on HTTP/1.1 the layer advertises its own
//!    policy instead; on h2c no connection-specific field reaches the client.
//! 5. The server's side: each connection's request count and close reason, from its handle.
//!
//! The program checks every answer itself. If something on the wire is not as expected it says what, and
//! exits with status 1; otherwise it ends with "All checks passed." and status 0. Set `RUST_LOG=debug` to see
//! tracing output as well.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use axum::{routing::get, Router};
use bytes::Bytes;
use http::{Request, Version};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tower::ServiceBuilder;
use tower_keepalive::{CloseReason, ConnectionHandle, KeepAliveLayer};

/// The longest the demo waits for anything on the network.
const WAIT: Duration = Duration::from_secs(2);

type Error = Box<dyn std::error::Error + Send + Sync>;
type Result<T, E = Error> = std::result::Result<T, E>;

/// Fails the demo with a message unless `cond` holds.
macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(format!($($msg)+).into());
        }
    };
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();

    match run().await {
        Ok(()) => println!("\nAll checks passed."),
        Err(err) => {
            eprintln!("\ndemo FAILED: {err}");
            std::process::exit(1);
        }
    }
}

async fn run() -> Result<()> {
    let layer = KeepAliveLayer::new()
        .idle_timeout(Duration::from_secs(5))
        .max_requests(3);
    let mut server = Server::start(layer).await?;
    println!(
        "Server on {} (HTTP/1.x and h2c), idle timeout 5 s, at most 3 requests per connection.",
        server.addr
    );

    let mut expected = Vec::new();
    http11_countdown(server.addr, &mut expected).await?;
    http11_client_close(server.addr, &mut expected).await?;
    http10(server.addr, &mut expected).await?;
    handler_fields(server.addr, &mut expected).await?;
    server_view(&mut server, &expected).await
}

// ---------------------------------------------------------------------------------------------------------
// The sections
// ---------------------------------------------------------------------------------------------------------

async fn http11_countdown(addr: SocketAddr, expected: &mut Vec<Expected>) -> Result<()> {
    section("1. HTTP/1.1: three requests on one connection (max_requests = 3)");
    let mut conn = RawConn::connect(addr).await?;
    let res = conn.send(&raw_get("HTTP/1.1", None)).await?;
    res.expect("HTTP/1.1 200 OK", &["keep-alive"], &["timeout=5, max=2"])?;
    println!("  (same connection)");
    let res = conn.send(&raw_get("HTTP/1.1", None)).await?;
    res.expect("HTTP/1.1 200 OK", &["keep-alive"], &["timeout=5, max=1"])?;
    println!("  (same connection: the last request it serves)");
    let res = conn.send(&raw_get("HTTP/1.1", None)).await?;
    res.expect("HTTP/1.1 200 OK", &["close"], &[])?;
    conn.expect_eof().await?;
    expected.push(conn.expect_server("HTTP/1.1, 3 requests", 3, Some(CloseReason::MaxRequests)));
    Ok(())
}

async fn http11_client_close(addr: SocketAddr, expected: &mut Vec<Expected>) -> Result<()> {
    section("2. HTTP/1.1 with `Connection: close` from the client");
    let mut conn = RawConn::connect(addr).await?;
    let res = conn.send(&raw_get("HTTP/1.1", Some("close"))).await?;
    res.expect("HTTP/1.1 200 OK", &["close"], &[])?;
    conn.expect_eof().await?;
    expected.push(conn.expect_server(
        "HTTP/1.1, client said close",
        1,
        Some(CloseReason::ClientClosed),
    ));
    Ok(())
}

async fn http10(addr: SocketAddr, expected: &mut Vec<Expected>) -> Result<()> {
    section("3a. HTTP/1.0 without keep-alive: one response, then the connection closes");
    let mut conn = RawConn::connect(addr).await?;
    let res = conn.send(&raw_get("HTTP/1.0", None)).await?;
    res.expect("HTTP/1.0 200 OK", &["close"], &[])?;
    conn.expect_eof().await?;
    expected.push(conn.expect_server(
        "HTTP/1.0, no keep-alive",
        1,
        Some(CloseReason::ClientClosed),
    ));

    section("3b. HTTP/1.0 with `Connection: keep-alive`: kept alive, then closed at the limit");
    let mut conn = RawConn::connect(addr).await?;
    let res = conn.send(&raw_get("HTTP/1.0", Some("keep-alive"))).await?;
    res.expect("HTTP/1.0 200 OK", &["keep-alive"], &["timeout=5, max=2"])?;
    println!("  (same connection)");
    let res = conn.send(&raw_get("HTTP/1.0", Some("keep-alive"))).await?;
    res.expect("HTTP/1.0 200 OK", &["keep-alive"], &["timeout=5, max=1"])?;
    println!("  (same connection: the last request it serves)");
    let res = conn.send(&raw_get("HTTP/1.0", Some("keep-alive"))).await?;
    res.expect("HTTP/1.0 200 OK", &["close"], &[])?;
    conn.expect_eof().await?;
    expected.push(conn.expect_server("HTTP/1.0, keep-alive", 3, Some(CloseReason::MaxRequests)));
    Ok(())
}

async fn handler_fields(addr: SocketAddr, expected: &mut Vec<Expected>) -> Result<()> {
    section("4a. A handler that sets `Connection` and `Keep-Alive` itself, over HTTP/1.1");
    println!(
        "  The handler of /own-fields sets `connection: keep-alive` and `keep-alive: timeout=99`."
    );
    println!("  The layer replaces them with its own policy:");
    let mut conn = RawConn::connect(addr).await?;
    let res = conn
        .send(&raw_get_path("/own-fields", "HTTP/1.1", None))
        .await?;
    res.expect("HTTP/1.1 200 OK", &["keep-alive"], &["timeout=5, max=2"])?;
    expected.push(conn.expect_server(
        "HTTP/1.1, handler fields",
        1,
        Some(CloseReason::ClientClosed),
    ));

    section("4b. The same route over h2c: no connection-specific field reaches an HTTP/2 client");
    // RFC 9113 section 8.2.2 makes such a response malformed; Safari refuses it. hyper's own HTTP/2 server
    // drops the fields it knows as a last line of defence; the layer removes them, and every field named
    // in `Connection`, before any HTTP/2 stack sees the response.
    let stream = bounded("connecting", TcpStream::connect(addr)).await?;
    let port = stream.local_addr()?.port();
    let (mut sender, driver) = bounded(
        "the HTTP/2 handshake",
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)),
    )
    .await?;
    let driver = tokio::spawn(driver);

    let req = Request::get(format!("http://{addr}/own-fields")).body(Empty::<Bytes>::new())?;
    println!("  > GET /own-fields (HTTP/2, prior knowledge)");
    let res = bounded("the HTTP/2 response", sender.send_request(req)).await?;
    println!("  < {:?} {}", res.version(), res.status());
    for (name, value) in res.headers() {
        println!("  < {name}: {}", String::from_utf8_lossy(value.as_bytes()));
    }
    ensure!(
        res.version() == Version::HTTP_2 && res.status() == 200,
        "h2c: expected HTTP/2 200, got {:?} {}",
        res.version(),
        res.status()
    );
    let forbidden = [
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "upgrade",
        "te",
    ];
    for name in forbidden {
        ensure!(
            !res.headers().contains_key(name),
            "h2c: the response carries the connection-specific field `{name}`"
        );
    }
    println!("  (none of: {})", forbidden.join(", "));
    let body = bounded("the HTTP/2 body", res.into_body().collect())
        .await?
        .to_bytes();
    ensure!(body == "hello\n", "h2c: unexpected body {body:?}");

    // Without a sender the client connection shuts down, and the server sees it end.
    drop(sender);
    bounded("closing the HTTP/2 connection", async {
        driver.await.map_err(Error::from)?.map_err(Error::from)
    })
    .await?;
    expected.push(Expected {
        label: "h2c, handler fields",
        port,
        requests: 1,
        reason: Some(CloseReason::ClientClosed),
    });
    Ok(())
}

async fn server_view(server: &mut Server, expected: &[Expected]) -> Result<()> {
    section("5. The server's view: one ConnectionHandle per connection");
    let mut ended = Vec::new();
    while ended.len() < expected.len() {
        let what = "the server to report every connection closed";
        let closed = bounded(what, async {
            server.closed.recv().await.ok_or("the accept loop stopped")
        })
        .await?;
        ended.push(closed);
    }

    println!("  {:<28} {:>8}  close reason", "connection", "requests");
    for want in expected {
        let Some(got) = ended.iter().find(|c| c.peer.port() == want.port) else {
            return Err(
                format!("{}: the server never reported this connection", want.label).into(),
            );
        };
        let requests = got.handle.requests();
        let reason = got.handle.close_reason();
        let shown = reason.map_or(
            "none: kept alive until the client left",
            CloseReason::as_str,
        );
        println!("  {:<28} {:>8}  {shown}", want.label, requests);
        if let Some(err) = &got.error {
            println!("  {:<28} {:>8}  (connection error: {err})", "", "");
        }
        ensure!(
            requests == want.requests && reason == want.reason,
            "{}: the server counted {requests} request(s), close reason {reason:?}; \
             expected {}, {:?}",
            want.label,
            want.requests,
            want.reason
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------
// The server: a hand-written hyper-util accept loop with the layer
// ---------------------------------------------------------------------------------------------------------

fn app() -> Router {
    Router::new().route("/", get(|| async { "hello\n" })).route(
        "/own-fields",
        get(|| async {
            // Connection-specific fields that must never reach an HTTP/2 client.
            (
                [("connection", "keep-alive"), ("keep-alive", "timeout=99")],
                "hello\n",
            )
        }),
    )
}

struct Server {
    addr: SocketAddr,
    /// One message per connection, when it has ended.
    closed: mpsc::UnboundedReceiver<Closed>,
}

struct Closed {
    peer: SocketAddr,
    handle: ConnectionHandle,
    error: Option<String>,
}

impl Server {
    async fn start(layer: KeepAliveLayer) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (tx, closed) = mpsc::unbounded_channel();

        // HTTP/1.x and h2c on one port. hyper's own HTTP/1 header timer is off: `ConnectionHandle::drive`
        // closes idle connections (and slow request heads) itself, never before the advertised timeout.
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder.http1().header_read_timeout(None);
        let app = app();

        tokio::spawn(async move {
            loop {
                let (io, peer) = match listener.accept().await {
                    Ok(accepted) => accepted,
                    Err(err) => {
                        eprintln!("accept failed: {err}");
                        continue;
                    }
                };
                // One handle per connection: its own request count and close reason.
                let handle = layer.connection();
                let svc = ServiceBuilder::new()
                    .layer(layer.bind(handle.clone()))
                    .service(app.clone());
                let builder = builder.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    let conn = builder.serve_connection_with_upgrades(
                        TokioIo::new(io),
                        TowerToHyperService::new(svc),
                    );
                    // The connection's lifecycle: idle timeout, GOAWAY at the limit on HTTP/2.
                    let reason = handle.clone().drive(conn).await;
                    let error = (reason == CloseReason::Error).then(|| "see the logs".to_string());
                    let _ = tx.send(Closed {
                        peer,
                        handle,
                        error,
                    });
                });
            }
        });
        Ok(Server { addr, closed })
    }
}

/// What the server should report for one client connection.
struct Expected {
    label: &'static str,
    /// The client's local port: how the server's report is matched to it.
    port: u16,
    requests: u64,
    reason: Option<CloseReason>,
}

// ---------------------------------------------------------------------------------------------------------
// A raw HTTP/1 client: bytes in, bytes out, nothing added or hidden
// ---------------------------------------------------------------------------------------------------------

fn raw_get(version: &str, connection: Option<&str>) -> String {
    raw_get_path("/", version, connection)
}

fn raw_get_path(path: &str, version: &str, connection: Option<&str>) -> String {
    let mut req = format!("GET {path} {version}\r\nhost: demo\r\n");
    if let Some(value) = connection {
        req.push_str(&format!("connection: {value}\r\n"));
    }
    req + "\r\n"
}

struct RawConn {
    stream: TcpStream,
    /// Bytes read but not yet consumed.
    buf: Vec<u8>,
}

struct RawResponse {
    status_line: String,
    /// Field lines as received: names and values untouched.
    fields: Vec<(String, String)>,
    body: Vec<u8>,
}

impl RawConn {
    async fn connect(addr: SocketAddr) -> Result<Self> {
        let stream = bounded("connecting", TcpStream::connect(addr)).await?;
        Ok(RawConn {
            stream,
            buf: Vec::new(),
        })
    }

    /// Writes one request, prints it, and reads its response (which must have a `content-length`).
    async fn send(&mut self, request: &str) -> Result<RawResponse> {
        for line in request.lines().filter(|l| !l.is_empty()) {
            println!("  > {line}");
        }
        bounded(
            "sending a request",
            self.stream.write_all(request.as_bytes()),
        )
        .await?;

        let head_len = loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            self.read_more("a response head").await?;
        };
        let head = String::from_utf8(self.buf[..head_len].to_vec())?;
        let mut lines = head.lines().filter(|l| !l.is_empty());
        let status_line = lines.next().unwrap_or_default().to_owned();
        let fields: Vec<(String, String)> = lines
            .filter_map(|line| line.split_once(':'))
            .map(|(name, value)| (name.to_owned(), value.trim().to_owned()))
            .collect();

        let length = fields
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case("content-length"))
            .ok_or("the response has no content-length")?
            .1
            .parse::<usize>()?;
        while self.buf.len() < head_len + length {
            self.read_more("a response body").await?;
        }
        let body = self.buf[head_len..head_len + length].to_vec();
        self.buf.drain(..head_len + length);

        let res = RawResponse {
            status_line,
            fields,
            body,
        };
        res.show();
        Ok(res)
    }

    async fn read_more(&mut self, what: &str) -> Result<()> {
        let mut chunk = [0; 4096];
        let n = bounded(what, self.stream.read(&mut chunk)).await?;
        ensure!(
            n > 0,
            "the server closed the connection while we waited for {what}"
        );
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }

    /// Checks that the server closed the connection: the next read sees end of stream.
    async fn expect_eof(&mut self) -> Result<()> {
        ensure!(self.buf.is_empty(), "unexpected bytes after the response");
        let mut chunk = [0; 1];
        let n = bounded(
            "the server to close the connection",
            self.stream.read(&mut chunk),
        )
        .await?;
        ensure!(
            n == 0,
            "the connection is still open: the server sent more bytes"
        );
        println!("  < EOF: the server closed the connection");
        Ok(())
    }

    fn expect_server(
        &self,
        label: &'static str,
        requests: u64,
        reason: Option<CloseReason>,
    ) -> Expected {
        Expected {
            label,
            port: self.stream.local_addr().map_or(0, |a| a.port()),
            requests,
            reason,
        }
    }
}

impl RawResponse {
    /// Every value of the field lines called `name`, in order.
    fn values(&self, name: &str) -> Vec<&str> {
        self.fields
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// Prints the status line and the connection fields, as received.
    fn show(&self) {
        println!("  < {}", self.status_line);
        for (name, value) in &self.fields {
            if name.eq_ignore_ascii_case("connection") || name.eq_ignore_ascii_case("keep-alive") {
                println!("  < {name}: {value}");
            }
        }
    }

    /// Checks the status line and the exact `connection` and `keep-alive` field lines.
    fn expect(&self, status_line: &str, connection: &[&str], keep_alive: &[&str]) -> Result<()> {
        let context = || format!("response `{}`", self.status_line);
        ensure!(
            self.status_line == status_line,
            "{}: expected status line `{status_line}`",
            context()
        );
        ensure!(
            self.values("connection") == connection,
            "{}: expected connection {connection:?}, got {:?}",
            context(),
            self.values("connection")
        );
        ensure!(
            self.values("keep-alive") == keep_alive,
            "{}: expected keep-alive {keep_alive:?}, got {:?}",
            context(),
            self.values("keep-alive")
        );
        ensure!(
            self.body == b"hello\n",
            "{}: unexpected body {:?}",
            context(),
            String::from_utf8_lossy(&self.body)
        );
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------------------
// Small things
// ---------------------------------------------------------------------------------------------------------

fn section(title: &str) {
    println!("\n== {title}");
}

/// Runs `fut` for at most [`WAIT`], naming `what` it waited for if it fails or takes too long.
async fn bounded<T, E: Into<Error>>(
    what: &str,
    fut: impl Future<Output = Result<T, E>>,
) -> Result<T> {
    match tokio::time::timeout(WAIT, fut).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(err)) => Err(format!("{what}: {}", err.into()).into()),
        Err(_) => Err(format!("no answer within {WAIT:?} waiting for {what}").into()),
    }
}
