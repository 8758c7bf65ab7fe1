//! hyper's settings for the serve path's connections: [`HttpBuilder`].

use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioTimer};

/// The largest HTTP/1 request head (request line and fields) the serve path reads: 64 KiB, between
/// nginx's 32 KiB (`large_client_header_buffers 4 8k`) and Go's 1 MB (`DefaultMaxHeaderBytes`). A larger
/// head is answered with `431 Request Header Fields Too Large` (RFC 6585 section 5) and the connection
/// closed. Change it with `http_builder(|b| { b.http1().max_buf_size(n); })` (at least 8 KiB).
const MAX_REQUEST_HEAD: usize = 64 * 1024;

/// Which protocols a server speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Versions {
    Both,
    Http1,
    Http2,
}

/// hyper's HTTP/1 and HTTP/2 connection builders, as the serve path uses them, and which of the two
/// protocols it serves (both by default: HTTP/1.1, and h2c with prior knowledge, told apart by the
/// HTTP/2 connection preface, RFC 9113 section 3.4; over TLS, ALPN chooses). Reached through
/// [`Serve::http_builder`](super::Serve::http_builder).
///
/// The serve path drives hyper's own builders rather than hyper-util's `auto` builder: it detects the
/// preface itself, which lets it take an idle HTTP/1 connection apart and build it again on its next
/// request (see [`Serve::hibernate_after`](super::Serve::hibernate_after)). The settings are the same
/// ones `auto::Builder::http1()` and `http2()` reach.
///
/// ```
/// use std::time::Duration;
/// use tower_keepalive::serve::HttpBuilder;
///
/// let mut builder = HttpBuilder::default();
/// builder.http1().max_buf_size(32 * 1024);
/// builder.http2().max_concurrent_streams(100).keep_alive_interval(Some(Duration::from_secs(20)));
/// assert!(builder.is_http1_available() && builder.is_http2_available());
/// ```
#[derive(Clone, Debug)]
pub struct HttpBuilder {
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
    versions: Versions,
}

impl Default for HttpBuilder {
    /// hyper's builders with a [`TokioTimer`] for both protocols (every timed setting needs one: without
    /// it, hyper panics inside each connection), hyper's HTTP/1 header-read timer off (the lifecycle
    /// closes idle connections and slow heads itself; hyper's would close a connection before the
    /// advertised timeout), and an HTTP/1 buffer of 64 KiB rather than hyper's ~400 KB (the buffer
    /// bounds an unfinished head: a few hundred clients sending endless heads would otherwise hold a
    /// hundred megabytes; a larger head is answered with `431`).
    ///
    /// ```
    /// let builder = tower_keepalive::serve::HttpBuilder::default();
    /// assert!(builder.is_http1_available());
    /// ```
    fn default() -> Self {
        let mut http1 = http1::Builder::new();
        http1
            .timer(TokioTimer::new())
            .header_read_timeout(None)
            .max_buf_size(MAX_REQUEST_HEAD);
        let mut http2 = http2::Builder::new(TokioExecutor::new());
        http2.timer(TokioTimer::new());
        HttpBuilder {
            http1,
            http2,
            versions: Versions::Both,
        }
    }
}

impl HttpBuilder {
    /// hyper's HTTP/1 builder: buffer and header limits, `half_close`, `writev`, and so on.
    ///
    /// ```
    /// let mut builder = tower_keepalive::serve::HttpBuilder::default();
    /// builder.http1().max_headers(50).title_case_headers(true);
    /// ```
    pub fn http1(&mut self) -> &mut http1::Builder {
        &mut self.http1
    }

    /// hyper's HTTP/2 builder: streams, windows, frame sizes, PING keep-alive, extended CONNECT.
    ///
    /// ```
    /// let mut builder = tower_keepalive::serve::HttpBuilder::default();
    /// builder.http2().max_concurrent_streams(100).enable_connect_protocol();
    /// ```
    pub fn http2(&mut self) -> &mut http2::Builder<TokioExecutor> {
        &mut self.http2
    }

    /// Serves HTTP/1 only: an HTTP/2 preface is answered as a malformed HTTP/1 request, and TLS offers
    /// `http/1.1` alone in ALPN.
    ///
    /// ```
    /// let mut builder = tower_keepalive::serve::HttpBuilder::default();
    /// builder.http1_only();
    /// assert!(!builder.is_http2_available());
    /// ```
    pub fn http1_only(&mut self) -> &mut Self {
        self.versions = Versions::Http1;
        self
    }

    /// Serves HTTP/2 only (h2c with prior knowledge, or `h2` alone in TLS's ALPN).
    ///
    /// ```
    /// let mut builder = tower_keepalive::serve::HttpBuilder::default();
    /// builder.http2_only();
    /// assert!(!builder.is_http1_available());
    /// ```
    pub fn http2_only(&mut self) -> &mut Self {
        self.versions = Versions::Http2;
        self
    }

    /// Whether HTTP/1 is served.
    ///
    /// ```
    /// assert!(tower_keepalive::serve::HttpBuilder::default().is_http1_available());
    /// ```
    pub fn is_http1_available(&self) -> bool {
        self.versions != Versions::Http2
    }

    /// Whether HTTP/2 is served.
    ///
    /// ```
    /// assert!(tower_keepalive::serve::HttpBuilder::default().is_http2_available());
    /// ```
    pub fn is_http2_available(&self) -> bool {
        self.versions != Versions::Http1
    }

    pub(super) fn h1(&self) -> &http1::Builder {
        &self.http1
    }

    pub(super) fn h2(&self) -> &http2::Builder<TokioExecutor> {
        &self.http2
    }
}
