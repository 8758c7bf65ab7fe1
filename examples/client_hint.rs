//! A client that reads a server's `Keep-Alive` hint and decides how long to keep its pooled connection.
//!
//! ```text
//! cargo run --example client_hint
//! ```
//!
//! It starts a server in the same process (idle timeout 2 s, at most 3 requests per connection), then
//! sends five requests through a one-connection "pool", printing the hint of each response and what the
//! client does with it:
//!
//! - `Keep-Alive: timeout=T` says the server keeps an idle connection at least `T` seconds: reuse it up to
//!   `T` minus a safety margin, never after; `timeout=0` means do not reuse it at all;
//! - `max=R` says how many more requests the connection will take;
//! - `Connection: close` means the server closes it after this response.
//!
//! Reusing a connection the server is closing at the same moment makes the request fail (or worse, if it
//! is not idempotent, leaves the client unsure whether it ran), which is what the hint is there to avoid.
//! The program exits when done.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderMap, Request};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tower_keepalive::{KeepAliveHeader, KeepAliveLayer};

type Error = Box<dyn std::error::Error + Send + Sync>;

/// Subtracted from the advertised timeout: a request sent just before the deadline must still arrive
/// before it.
const MARGIN: Duration = Duration::from_millis(500);
/// How long the client keeps an idle connection when the server gives no hint.
const DEFAULT_IDLE: Duration = Duration::from_secs(4);

/// The one pooled connection.
struct Pooled {
    id: usize,
    sender: http1::SendRequest<Empty<Bytes>>,
    /// Do not send on it after this.
    reuse_until: Instant,
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let addr = start_server().await?;
    println!("server on http://{addr}: idle timeout 2 s, 3 requests per connection\n");

    let mut pool: Option<Pooled> = None;
    let mut opened = 0;
    // Four requests back to back, then one after a pause longer than the hint allows.
    for (i, pause) in [0, 0, 0, 0, 2500].into_iter().enumerate() {
        if pause > 0 {
            println!("(idle for {pause} ms)");
            tokio::time::sleep(Duration::from_millis(pause)).await;
        }

        // Take the pooled connection if the last hint still allows it.
        let mut conn = match pool.take() {
            Some(conn) if Instant::now() < conn.reuse_until => {
                println!("request {}: reusing connection #{}", i + 1, conn.id);
                conn
            }
            Some(conn) => {
                println!(
                    "request {}: connection #{} is past its hint, dropping it (server had closed it: {})",
                    i + 1,
                    conn.id,
                    conn.sender.is_closed()
                );
                opened += 1;
                connect(addr, opened).await?
            }
            None => {
                opened += 1;
                println!("request {}: opening connection #{opened}", i + 1);
                connect(addr, opened).await?
            }
        };

        let req = Request::get(format!("http://{addr}/"))
            .header(header::HOST, addr.to_string())
            .body(Empty::new())?;
        let res = conn.sender.send_request(req).await?;
        let headers = res.headers().clone();
        res.into_body().collect().await?;

        show_hint(&headers);
        match reuse_for(&headers) {
            Some(window) => {
                println!("  -> keep it, reuse for at most {window:?}\n");
                conn.reuse_until = Instant::now() + window;
                pool = Some(conn);
            }
            None => println!("  -> do not reuse it\n"),
        }
    }
    println!("{opened} connections for 5 requests");
    Ok(())
}

/// How long the response allows the connection to be reused, or `None` if it must not be.
fn reuse_for(headers: &HeaderMap) -> Option<Duration> {
    let close = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("close"));
    if close {
        return None;
    }
    let hint = match KeepAliveHeader::from_headers(headers) {
        Ok(hint) => hint.unwrap_or_default(),
        // A malformed hint is no hint: fall back to the client's own default.
        Err(err) => {
            println!("  (ignoring an invalid Keep-Alive field: {err})");
            KeepAliveHeader::new()
        }
    };
    if hint.max() == Some(0) {
        return None;
    }
    match hint.timeout() {
        Some(timeout) => timeout
            .checked_sub(MARGIN)
            .filter(|window| !window.is_zero()),
        None => Some(DEFAULT_IDLE),
    }
}

fn show_hint(headers: &HeaderMap) {
    for name in [
        header::CONNECTION,
        header::HeaderName::from_static("keep-alive"),
    ] {
        for value in headers.get_all(&name) {
            println!("  < {name}: {}", value.to_str().unwrap_or("<binary>"));
        }
    }
    if let Ok(Some(hint)) = KeepAliveHeader::from_headers(headers) {
        let timeout = hint
            .timeout()
            .map_or_else(|| "not given".to_string(), |t| format!("{t:?}"));
        let max = hint
            .max()
            .map_or_else(|| "not given".to_string(), |m| m.to_string());
        println!("  hint: idle timeout {timeout}, requests left {max}");
    }
}

async fn connect(addr: SocketAddr, id: usize) -> Result<Pooled, Error> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (sender, driver) = http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(driver);
    Ok(Pooled {
        id,
        sender,
        reuse_until: Instant::now(),
    })
}

async fn start_server() -> std::io::Result<SocketAddr> {
    let app = axum::Router::new().route("/", axum::routing::get(|| async { "hello\n" }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = tower_keepalive::serve(listener, app)
        .keep_alive(
            KeepAliveLayer::new()
                .idle_timeout(Duration::from_secs(2))
                .max_requests(3),
        )
        .on_close(|conn, reason| {
            println!(
                "  [server: a connection closed, {reason}, after {} requests]",
                conn.requests()
            );
        });
    tokio::spawn(async move { server.await });
    Ok(addr)
}
