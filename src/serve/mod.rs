//! The serve path: an accept loop that gives every connection the keep-alive lifecycle.
//!
//! [`serve`] runs HTTP/1.1 and h2c (prior knowledge, told apart by the connection preface) on one
//! listener over hyper's own connection builders ([`HttpBuilder`]), for an axum `Router` or any tower
//! `Service`. Each accepted connection gets its own
//! [`ConnectionHandle`]; the keep-alive layer is applied to the whole service by the serve path itself, so
//! idle enforcement sees every request (a layer forgotten on some routes cannot get a busy connection
//! closed under a request), and the connection is driven through its lifecycle:
//!
//! - **idle timeout**: a connection with nothing in flight and every response body sent is closed once it
//!   has been idle for the timeout: HTTP/1 by closing it, HTTP/2 with GOAWAY. Never before the advertised
//!   `timeout=`, except under connection pressure (see the budget below). A connection that is accepted
//!   and never sends a byte, or that dribbles its request head, is closed too (hyper-util's protocol
//!   detection runs no timer of its own);
//! - **maximum requests**: HTTP/1 says `Connection: close` on the last response; HTTP/2 gets GOAWAY after
//!   the last stream (RFC 9113 section 6.8), and the streams in flight finish;
//! - **maximum age** (off by default, jittered per connection): as it nears, HTTP/1 responses advertise
//!   no more than the whole seconds left before it (`Keep-Alive: timeout=`), and the first response
//!   planned with less than a second left, or the next response of a connection still busy at its
//!   maximum age, says `Connection: close` (RFC 9112 section 9.6). A connection idle at its maximum age
//!   is closed once the timeout its last response advertised has run out, counted from the end of that
//!   response: a client that trusts the advert never has the connection closed under a request. HTTP/2
//!   gets GOAWAY at the maximum age, and the streams in flight finish;
//! - **drain** on a shutdown signal: idle connections close at once, requests in flight finish with
//!   `Connection: close` (HTTP/1) or after GOAWAY (HTTP/2); the serve future returns once every connection
//!   is gone, or when the drain deadline passes;
//! - **slow readers**: a response is in flight until its last byte has been written to the socket, so a
//!   large body hyper is still writing out to a slow client is never taken for an idle connection;
//! - **half-close** (RFC 9112 section 9.6): a client that shuts down its sending side after a request
//!   without a body (scripts, `nc`, some proxies and load tools) has finished sending, and is answered,
//!   then the connection closes (a response not begun yet says `Connection: close`). One that
//!   half-closes with no request in flight is closed at once. (The flip side: a client that goes away in
//!   the middle of such a request looks the same, and is noticed when its response is written, or after
//!   60 s, not before.) A request body cut short by a half-close still fails at once;
//! - **lingering close** (RFC 9112 section 9.6, nginx's `lingering_close`): when a connection ends, its
//!   sending side is shut down after the last response byte, then what the client still sends is read
//!   and dropped until it closes its side too, for at most 2 s without input, 10 s in all or 4 MiB
//!   (none of it when the client has closed already, or, with nothing from the client waiting, for a
//!   connection idle for 1 s, as at its idle timeout, or when the client asked to close after a request
//!   without a body). Closing with input unread would make the kernel reset the connection, destroying
//!   the responses the client has not read yet (requests pipelined past the connection's last). A
//!   drain's deadline still drops a lingering connection at once;
//! - **connection budget** ([`Serve::connection_limits`]): above the soft limit of open connections
//!   the idle timeout shrinks, and idle connections may be closed *before* the `timeout=` their last
//!   response advertised, longest idle first (close reason [`CloseReason::Pressure`]); this is the one
//!   exception to the promise above, and the trade it makes is admitting new clients;
//! - **TLS** (feature `tls`, [`Serve::tls`]): the same lifecycle over rustls, the protocol chosen by
//!   ALPN, each handshake in its connection's task with a timeout (see [`tls`]);
//! - **hibernation** ([`Serve::hibernate_after`], 1 s by default): an HTTP/1 connection idle for that
//!   long gives back hyper's connection (its buffers and state, about 17 KB) and keeps only its socket
//!   and its handle until the next request's first bytes, when a new one is made on it: about 0.8 KB of
//!   heap each instead of about 20 KB (BENCHMARKS.md). Nothing above changes for it (see [`HttpBuilder`]
//!   for why the serve path drives hyper's builders itself);
//! - WebSocket upgrades work; once upgraded, the connection belongs to the WebSocket and none of the
//!   above applies to it, but it keeps its room in the budget until the WebSocket ends, and at most
//!   [`Serve::max_upgraded`] connections (half the budget by default) may be upgraded at once: an
//!   upgrade request beyond that is answered `503`, so WebSockets cannot starve HTTP clients.
//!
//! The connection's IO does the last three, in [`WatchedIo`]; the `axum::serve` path
//! (`tower_keepalive::axum`) wraps its connections in it too, so both paths behave the same on the wire.
//!
//! No timer per connection: the server keeps one heap of deadlines (idle, maximum age, grace periods)
//! and one task that sleeps until the earliest, then wakes only the connections whose time has come.
//! Nothing runs while connections sit idle, no lock is taken per request, and an idle connection adds
//! under 100 bytes to what hyper's usual accept loop keeps for it (see BENCHMARKS.md).
//!
//! For a hand-written hyper-util accept loop, the same lifecycle is [`ConnectionHandle::drive`] (one
//! connection) and [`Drain`] (server-wide shutdown).
//!
//! # Example
//!
//! ```no_run
//! use std::time::Duration;
//! use axum::{routing::get, Router};
//! use tower_keepalive::KeepAliveLayer;
//!
//! # async fn run() -> std::io::Result<()> {
//! let app = Router::new().route("/", get(|| async { "hello" }));
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
//! tower_keepalive::serve(listener, app)
//!     .keep_alive(KeepAliveLayer::new().idle_timeout(Duration::from_secs(10)).max_requests(1000))
//!     .with_graceful_shutdown(async { let _ = tokio::signal::ctrl_c().await; })
//!     .drain_timeout(Duration::from_secs(30))
//!     .await?;
//! # Ok(())
//! # }
//! ```

mod budget;
mod builder;
mod conn;
mod drain;
mod io;
mod lame_duck;
mod lifecycle;
mod listener;
mod peer;
mod task;
mod tcp;
mod timers;
#[cfg(feature = "tls")]
#[cfg_attr(docsrs, doc(cfg(feature = "tls")))]
pub mod tls;
mod upgrade;

use std::fmt;
use std::future::{Future, IntoFuture};
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::service::TowerToHyperService;
use tower_service::Service;

pub use builder::HttpBuilder;
pub use drain::{Drain, DrainWatcher};
pub use io::WatchedIo;
#[cfg(feature = "axum")]
pub(crate) use lame_duck::begin as lame_duck_begin;
pub use lifecycle::GracefulConnection;
pub use listener::Listener;
#[cfg(feature = "axum")]
pub(crate) use listener::Queue;
pub use peer::PeerAddr;
pub use tcp::TcpKeepalive;
#[cfg(feature = "axum")]
pub(crate) use timers::{Timers, FIRST_REQUEST_GRACE};

use budget::{Admission, Budget, Held, Limits};
use conn::HttpConnection;
use listener::Accepting;
#[cfg(feature = "tonic")]
pub(crate) use peer::LocalAddr;
pub(crate) use peer::WithPeer;
use task::ConnectionTask;
use upgrade::{Gate, UpgradeOf};

use crate::future::RefusingFuture;
use crate::{CloseReason, ConnectionHandle, KeepAlive, KeepAliveLayer, ResponseBody};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type OnClose = Arc<dyn Fn(&ConnectionHandle, CloseReason) + Send + Sync>;

/// Serves `service` on `listener` with the keep-alive lifecycle. See the [module docs](self).
///
/// The returned [`Serve`] is configured with its builder methods and runs when awaited.
///
/// # Example
///
/// ```no_run
/// # async fn run() -> std::io::Result<()> {
/// let app = axum::Router::new().route("/", axum::routing::get(|| async { "hello" }));
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
/// tower_keepalive::serve(listener, app).await?;
/// # Ok(())
/// # }
/// ```
pub fn serve<L, S>(listener: L, service: S) -> Serve<L, S> {
    Serve {
        listener,
        service,
        layer: KeepAliveLayer::new()
            .with_header_timeout(Some(HEADER_TIMEOUT))
            .with_hibernation(Some(HIBERNATE_AFTER)),
        signal: std::future::pending(),
        lame_duck: None,
        drain_timeout: None,
        on_close: None,
        limits: Limits::from_fd_limit(),
        max_upgraded: None,
        builder: HttpBuilder::default(),
        accepting: Accepting::default(),
        #[cfg(feature = "tls")]
        tls: tls::Settings::default(),
    }
}

/// The default [`Serve::hibernate_after`]: 1 s. A client that sends its next request within a second
/// (a page's subresources, an API client's next call, a load test) never pays for the rebuild; one idle
/// for longer holds little but its socket for the rest of its idle timeout.
const HIBERNATE_AFTER: Duration = Duration::from_secs(1);

/// The default [`Serve::header_timeout`]: 10 s. A request head is one or two packets; 10 s covers a
/// few TCP retransmissions on a poor mobile link (1 + 2 + 4 s of back-off) and then some, while a
/// client that dribbles its head (slowloris) holds a connection for no longer. Shorter than hyper's
/// 30 s and nginx's 60 s `client_header_timeout`, longer than actix-web's 5 s; Go has none by default.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// A server being configured; runs when awaited. Built by [`serve`].
///
/// ```no_run
/// # async fn run() -> std::io::Result<()> {
/// # let app = axum::Router::new();
/// # let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
/// let server: tower_keepalive::serve::Serve<_, _, _> = tower_keepalive::serve(listener, app);
/// server.await?;
/// # Ok(())
/// # }
/// ```
#[must_use = "a server does nothing until awaited"]
pub struct Serve<L, S, F = std::future::Pending<()>> {
    listener: L,
    service: S,
    layer: KeepAliveLayer,
    signal: F,
    lame_duck: Option<Duration>,
    drain_timeout: Option<Duration>,
    on_close: Option<OnClose>,
    limits: Option<Limits>,
    max_upgraded: Option<usize>,
    builder: HttpBuilder,
    accepting: Accepting,
    #[cfg(feature = "tls")]
    tls: tls::Settings,
}

impl<L, S, F> Serve<L, S, F> {
    /// The keep-alive policy of every connection (default: [`KeepAliveLayer::new`]). The serve path
    /// applies it to the whole service itself: do not add the layer to the service as well.
    ///
    /// ```no_run
    /// # async fn run() -> std::io::Result<()> {
    /// # let app = axum::Router::new();
    /// # let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    /// use tower_keepalive::KeepAliveLayer;
    /// tower_keepalive::serve(listener, app)
    ///     .keep_alive(KeepAliveLayer::new().max_requests(100))
    ///     .await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn keep_alive(mut self, layer: KeepAliveLayer) -> Self {
        // A layer bound to some connection would make every connection share its count.
        let header_timeout = self.layer.config.header_timeout;
        let hibernate_after = self.layer.config.hibernate_after;
        self.layer = KeepAliveLayer {
            config: layer.config,
            handle: None,
        }
        .with_header_timeout(header_timeout)
        .with_hibernation(hibernate_after);
        self
    }

    /// The longest a request head (request line and header fields, RFC 9112 section 2.1) may take to
    /// arrive, counted from its first byte, or from the accept for a connection's first request
    /// (default: 10 s). A connection whose head is not complete by then is dropped (close reason
    /// [`CloseReason::HeaderTimeout`]), with no response, as hyper's and nginx's header timeouts do:
    /// whatever the idle timeout, so with an idle timeout of 75 s and a header timeout of 2 s, a head
    /// dribbled a byte at a time (slowloris) is cut at 2 s, while a connection idle after a response
    /// keeps its 75 s. A connection that never sends a byte is cut at the header timeout too (or at the
    /// idle timeout, when that is shorter), as nginx's `client_header_timeout` cuts it. Under connection
    /// pressure the header timeout shrinks as the idle timeout does.
    ///
    /// It is the crate's own timer, not hyper's `header_read_timeout`: hyper 1.12 starts that one
    /// when it begins to wait for the next head, at the end of the previous response, so it would close
    /// idle connections at the header timeout; and it runs no timer before hyper's connection is made,
    /// on the connection's first bytes. Here the first bytes read in an idle period start the head.
    ///
    /// HTTP/2 connections are held to it until their first request (the preface and settings must be
    /// followed by a request's HEADERS within it); after that, the idle timeout alone applies to them,
    /// as their idle periods carry frames that start no request. The head timeout applies to the
    /// decrypted stream over TLS, and to the handshake too, which is part of the first head's time.
    ///
    /// ```no_run
    /// # async fn run() -> std::io::Result<()> {
    /// # let app = axum::Router::new();
    /// # let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    /// tower_keepalive::serve(listener, app)
    ///     .header_timeout(std::time::Duration::from_secs(5))
    ///     .await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn header_timeout(mut self, timeout: Duration) -> Self {
        self.layer = self.layer.with_header_timeout(Some(timeout));
        self
    }

    /// Drains and returns once `signal` completes. See [`Drain::drain`] for what draining does.
    ///
    /// ```no_run
    /// # async fn run() -> std::io::Result<()> {
    /// # let app = axum::Router::new();
    /// # let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    /// tower_keepalive::serve(listener, app)
    ///     .with_graceful_shutdown(async { let _ = tokio::signal::ctrl_c().await; })
    ///     .await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn with_graceful_shutdown<G>(self, signal: G) -> Serve<L, S, G>
    where
        G: Future<Output = ()> + Send + 'static,
    {
        Serve {
            listener: self.listener,
            service: self.service,
            layer: self.layer,
            signal,
            lame_duck: self.lame_duck,
            drain_timeout: self.drain_timeout,
            on_close: self.on_close,
            limits: self.limits,
            max_upgraded: self.max_upgraded,
            builder: self.builder,
            accepting: self.accepting,
            #[cfg(feature = "tls")]
            tls: self.tls,
        }
    }

    /// The connection budget: at most `hard` connections open at once, with the soft limit at three
    /// quarters of it. See [`connection_limits`](Self::connection_limits).
    ///
    /// ```no_run
    /// # async fn run() -> std::io::Result<()> {
    /// # let app = axum::Router::new();
    /// # let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    /// tower_keepalive::serve(listener, app).max_connections(10_000).await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn max_connections(self, hard: usize) -> Self {
        self.connection_limits(hard.saturating_mul(3) / 4, hard)
    }

    /// The connection budget, with a soft and a hard limit. Below `soft` open connections nothing
    /// changes. Above it, keep-alive yields: the idle timeout, advertised and enforced, shrinks in
    /// proportion to how far the server is between `soft` and `hard`, so the longest-idle connections
    /// close first (close reason [`CloseReason::Pressure`], HTTP/2 with GOAWAY) and new clients are
    /// admitted. At `hard`, each new client makes room at once, as nginx does when it runs out of
    /// connections: connections that never finished a request head (silent, or dribbling one) are
    /// closed first, oldest first, then idle keep-alive connections, longest idle first; never one
    /// accepted under a second ago and not yet served, whose first request is most likely on its way.
    /// While every
    /// connection is busy the new client waits, and those behind it wait in the listener's accept queue
    /// rather than being accepted and dropped. A request in flight is never cut.
    ///
    /// What a client may see: responses sent under pressure advertise the shortened timeout
    /// (`Keep-Alive: timeout=1` at the hard limit of a 16 s timeout), but a connection that was told a
    /// longer `timeout=` before the pressure rose may be closed before it runs out. Only idle
    /// connections are closed this way: on HTTP/1 the server closes its side with no bytes sent (a
    /// clean FIN, as RFC 9112 section 9.6 allows at any time), so a client that sends a request at that
    /// moment sees the connection close under it and, as RFC 9112 section 9.3.1 says, retries it on a
    /// new connection if it is idempotent (browsers, curl and undici do); on HTTP/2 the connection gets
    /// GOAWAY (RFC 9113 section 6.8) with the last stream it processed, so no request is lost.
    ///
    /// By default the budget comes from the process's file-descriptor limit (`RLIMIT_NOFILE`, less a
    /// tenth of it and at least 32 for the rest of the process; soft at three quarters), so the accept
    /// loop sheds idle connections instead of running into `EMFILE`.
    ///
    /// ```no_run
    /// # async fn run() -> std::io::Result<()> {
    /// # let app = axum::Router::new();
    /// # let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    /// tower_keepalive::serve(listener, app).connection_limits(8_000, 10_000).await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn connection_limits(mut self, soft: usize, hard: usize) -> Self {
        self.limits = Some(Limits::new(soft, hard));
        self
    }

    /// No connection budget: every connection is accepted and keeps its full idle timeout.
    ///
    /// ```no_run
    /// # async fn run() -> std::io::Result<()> {
    /// # let app = axum::Router::new();
    /// # let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    /// tower_keepalive::serve(listener, app).unlimited_connections().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn unlimited_connections(mut self) -> Self {
        self.limits = None;
        self
    }

    /// How many connections of the budget may be upgraded at once (`101 Switching Protocols`, a
    /// WebSocket), so that the rest is kept for HTTP (default: half the hard limit of
    /// [`connection_limits`](Self::connection_limits); no effect without a budget).
    ///
    /// An upgraded connection keeps its room in the budget until the upgraded protocol drops its IO
    /// (the WebSocket ends), and counts as open in the stats until then: the server never accepts
    /// past its budget, whatever the WebSockets do. A connection takes an upgrade slot when it sends a
    /// request asking to upgrade (HTTP/1.1 `Upgrade`, RFC 9110 section 7.8, other than `h2c`, which is
    /// never switched to; or `CONNECT`, a tunnel), before the service sees it, and keeps it until it closes, upgraded or not.
    /// When every slot is taken, such a request is answered `503 Service Unavailable` with
    /// `Retry-After: 1` at once, without reaching the service: the client learns that no upgrade is
    /// to be had now, rather than waiting, and plain HTTP clients are still served. A WebSocket over
    /// HTTP/2 (extended CONNECT, RFC 8441, when turned on with `http_builder`) is a stream of an HTTP/2
    /// connection that keeps its own room, and takes no upgrade slot.
    ///
    /// The `axum::serve` path has no budget: there, bound the descriptors with the process's limit.
    ///
    /// ```no_run
    /// # async fn run() -> std::io::Result<()> {
    /// # let app = axum::Router::new();
    /// # let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    /// tower_keepalive::serve(listener, app)
    ///     .max_connections(10_000)
    ///     .max_upgraded(8_000)
    ///     .await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn max_upgraded(mut self, max: usize) -> Self {
        self.max_upgraded = Some(max);
        self
    }

    /// Tunes hyper's connection builders ([`HttpBuilder`]): HTTP/1 buffer and header limits, HTTP/2
    /// streams, windows and frame sizes, PING keep-alive, which protocols are served, and so on. The
    /// serve path starts from [`HttpBuilder::default`]: a [`TokioTimer`](hyper_util::rt::TokioTimer)
    /// for both protocols, so every timed setting is safe to turn on, and hyper's HTTP/1 header-read
    /// timer off (the lifecycle closes idle connections and slow heads itself; turning hyper's timer
    /// back on would close idle connections at that timeout, before the advertised one if it is
    /// shorter). The HTTP/1 buffer (`max_buf_size`, which bounds the request head) starts at 64 KiB
    /// instead of hyper's ~400 KB: a larger head is answered with `431 Request Header Fields Too
    /// Large`. (HTTP/2's `max_header_list_size` is hyper's, 16 KiB.)
    ///
    /// HTTP/2 PING keep-alive (RFC 9113 section 6.7) is set here: with `keep_alive_interval(Some(i))`,
    /// hyper sends a PING once nothing has been received for `i`, whether streams are open or not, and
    /// closes the connection when a PING is not answered within `keep_alive_timeout` (hyper's default:
    /// 20 s). A stream in flight completes as long as the peer answers; one that stops answering (gone
    /// without a FIN, or stuck) is closed after about `i` plus the timeout. PINGs are not requests: the
    /// idle timeout still closes a connection with nothing in flight. For TCP connections, see also
    /// [`tcp_keepalive`](Self::tcp_keepalive), which finds a vanished peer below HTTP, for HTTP/1 too.
    ///
    /// ```no_run
    /// # async fn run() -> std::io::Result<()> {
    /// # let app = axum::Router::new();
    /// # let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    /// tower_keepalive::serve(listener, app)
    ///     .http_builder(|builder| {
    ///         builder.http1().max_buf_size(64 * 1024);
    ///         builder
    ///             .http2()
    ///             .max_concurrent_streams(100)
    ///             .keep_alive_interval(Some(std::time::Duration::from_secs(20)));
    ///     })
    ///     .await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn http_builder(mut self, configure: impl FnOnce(&mut HttpBuilder)) -> Self {
        configure(&mut self.builder);
        self
    }

    /// How long an HTTP/1 connection stays idle before it hibernates (default: 1 s): it gives back
    /// hyper's connection (its buffers and state, about 17 KB) and keeps only its socket and its
    /// keep-alive state until the next request's first bytes arrive, when a new hyper connection is
    /// made on it (about 13,500 instructions for the two, some 10 µs; see BENCHMARKS.md). nginx frees
    /// an idle keep-alive connection's buffers the same way. Measured with 10,000 idle clients, a
    /// hibernating connection holds about 0.8 KB of heap (its task, tokio's registration of its socket,
    /// its handle) where an awake one holds about 20 KB; nginx, 0.55 KB.
    ///
    /// Nothing of the keep-alive lifecycle changes: the idle timeout, the request count and the
    /// `Keep-Alive` fields, maximum age, drain, lame duck and the budget's shedding all reach a
    /// hibernating connection as they reach any idle one. Bytes the client had sent of its next request
    /// (a head in progress) are kept and come first. HTTP/2 connections (whose HPACK tables, settings
    /// and windows are state) and upgraded ones never hibernate; TLS connections do, and keep their
    /// TLS session (see BENCHMARKS.md for what that holds). The `axum::serve` path cannot hibernate:
    /// axum drives hyper's connection itself.
    ///
    /// ```no_run
    /// # async fn run() -> std::io::Result<()> {
    /// # let app = axum::Router::new();
    /// # let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    /// tower_keepalive::serve(listener, app)
    ///     .hibernate_after(std::time::Duration::from_millis(250))
    ///     .await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn hibernate_after(mut self, after: Duration) -> Self {
        self.layer = self.layer.with_hibernation(Some(after));
        self
    }

    /// Idle HTTP/1 connections keep hyper's connection for their whole idle period, as with a plain
    /// hyper accept loop (see [`hibernate_after`](Self::hibernate_after)).
    ///
    /// ```no_run
    /// # async fn run() -> std::io::Result<()> {
    /// # let app = axum::Router::new();
    /// # let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    /// tower_keepalive::serve(listener, app).no_hibernation().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn no_hibernation(mut self) -> Self {
        self.layer = self.layer.with_hibernation(None);
        self
    }

    /// A lame-duck period of `period` before the drain (default: none, the drain begins at the signal).
    ///
    /// Behind a load balancer, an instance told to stop (Kubernetes sends SIGTERM) is still sent new
    /// requests until the balancer has taken it out of rotation, which takes seconds: one that stops
    /// accepting at once refuses them, and those already sent on its idle keep-alive connections fail.
    /// For `period` from the shutdown signal ([`with_graceful_shutdown`](Self::with_graceful_shutdown))
    /// the server keeps accepting and serving, but keeps no connection alive:
    ///
    /// - HTTP/1: every response says `Connection: close` (RFC 9112 section 9.6) and the connection
    ///   closes after it; a connection idle at the signal is closed a second later if still idle, not
    ///   at once: a balancer reuses its most recent connection first, and a request it has already sent
    ///   on that connection would be lost with it (it does not retry a non-idempotent request); within
    ///   the second, such a request arrives and is answered with `close`;
    /// - HTTP/2: every connection gets GOAWAY at once (RFC 9113 section 6.8), and its streams in flight
    ///   finish; a connection opened during the period serves the streams it opens first and then gets
    ///   its GOAWAY;
    /// - a connection accepted but silent, that has not sent its first request yet, is left to send it
    ///   (a balancer opens a connection and sends on it at once): it is served and closed as above, or
    ///   closed by its idle timeout or by the drain.
    ///
    /// Only then does the listener close and the drain begin, with its
    /// [`drain_timeout`](Self::drain_timeout). At that moment nothing the balancer sent is dropped:
    ///
    /// - the clients still in the listener's accept queue (and one waiting for room in the
    ///   [budget](Self::connection_limits)) are accepted and served as in the period, rather than reset
    ///   when the listener closes; at the budget's hard limit they wait for room for no longer than the
    ///   drain timeout, before the drain begins;
    /// - a connection that has not sent its first request yet is given 1 s to send it (it may be on its
    ///   way, or in the socket and not read yet) and served with `Connection: close`, instead of being
    ///   closed at once as the drain closes idle connections; one still silent then is closed.
    ///
    /// Connections closed during the period have close reason [`CloseReason::LameDuck`], those closed
    /// by the drain [`CloseReason::Drain`]; both are counted apart in the stats. Make the period longer than the balancer takes to stop sending (Kubernetes:
    /// endpoint propagation, a few seconds), and the pod's `terminationGracePeriodSeconds` at least the
    /// period plus the drain timeout.
    ///
    /// ```no_run
    /// # async fn run() -> std::io::Result<()> {
    /// # let app = axum::Router::new();
    /// # let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    /// use std::time::Duration;
    /// tower_keepalive::serve(listener, app)
    ///     .with_graceful_shutdown(async { let _ = tokio::signal::ctrl_c().await; })
    ///     .lame_duck(Duration::from_secs(10))
    ///     .drain_timeout(Duration::from_secs(30))
    ///     .await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn lame_duck(mut self, period: Duration) -> Self {
        self.lame_duck = Some(period);
        self
    }

    /// How long a drain may take before the connections still open are dropped (default: no limit).
    ///
    /// ```no_run
    /// # async fn run() -> std::io::Result<()> {
    /// # let app = axum::Router::new();
    /// # let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    /// tower_keepalive::serve(listener, app)
    ///     .drain_timeout(std::time::Duration::from_secs(30))
    ///     .await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn drain_timeout(mut self, timeout: Duration) -> Self {
        self.drain_timeout = Some(timeout);
        self
    }

    /// Called once for each connection when it has closed, with its handle (request count, age) and the
    /// reason. Runs on the connection's task: keep it short.
    ///
    /// ```no_run
    /// # async fn run() -> std::io::Result<()> {
    /// # let app = axum::Router::new();
    /// # let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    /// tower_keepalive::serve(listener, app)
    ///     .on_close(|conn, reason| println!("closed after {} requests: {reason}", conn.requests()))
    ///     .await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn on_close(
        mut self,
        f: impl Fn(&ConnectionHandle, CloseReason) + Send + Sync + 'static,
    ) -> Self {
        self.on_close = Some(Arc::new(f));
        self
    }

    /// Whether every request carries its connection's peer address (default: on): as
    /// [`PeerAddr<L::Addr>`](PeerAddr) in its extensions, and with feature `axum` as
    /// `axum::extract::ConnectInfo<L::Addr>` too, which axum's `ConnectInfo` extractor reads (as it
    /// would under `into_make_service_with_connect_info`). With feature `tonic`, a TCP connection's
    /// requests carry tonic's `TcpConnectInfo` too (peer and local address), so that a tonic
    /// service's `Request::remote_addr()` and `local_addr()` work as under tonic's own server; over
    /// TLS as well, though tonic's `TlsConnectInfo` (and so `peer_certs()`) is not there, as tonic
    /// offers no way to build it. Over TLS the address is the TCP peer's,
    /// and each request carries the connection's [`tls::TlsInfo`] too (ALPN protocol and SNI name:
    /// one more allocation per request, the extension's box).
    ///
    /// The cost, measured by `tests/alloc.rs`: inserting into `http::Extensions` allocates the map on
    /// a request's first extension and one box per value, so 3 allocations per request for a service
    /// that adds no extension of its own (4 with feature `axum`, which adds `ConnectInfo`, and one more
    /// with feature `tonic`), and 1 (or 2) for an axum `Router`, which allocates the map for its own
    /// extensions anyway. Feature `tonic` also costs one `getsockname` per connection on a wildcard
    /// listener (`0.0.0.0`), for the local address. Small next to
    /// what hyper and a router allocate per request, and what users of
    /// `into_make_service_with_connect_info` already pay; a server that never reads the address can
    /// turn it off.
    ///
    /// ```no_run
    /// # async fn run() -> std::io::Result<()> {
    /// # let app = axum::Router::new();
    /// # let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    /// tower_keepalive::serve(listener, app).peer_addr(false).await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn peer_addr(mut self, on: bool) -> Self {
        self.accepting.peer_addr = on;
        self
    }

    /// TCP keepalive probes on every accepted TCP connection (default: off). See [`TcpKeepalive`] for
    /// what they find that the idle timeout does not, and why they are off by default.
    ///
    /// Set at accept, before a TLS handshake, on connections whose IO is a `tokio::net::TcpStream`
    /// (a `TcpListener`, or a listener of your own that yields one); other listeners' connections (a
    /// Unix socket) are left as they are. A failure to set it is logged at `debug` and the connection
    /// served without probes.
    ///
    /// ```no_run
    /// # async fn run() -> std::io::Result<()> {
    /// # let app = axum::Router::new();
    /// # let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    /// use std::time::Duration;
    /// use tower_keepalive::serve::TcpKeepalive;
    /// tower_keepalive::serve(listener, app)
    ///     .tcp_keepalive(TcpKeepalive::new(Duration::from_secs(60)).interval(Duration::from_secs(10)))
    ///     .await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn tcp_keepalive(mut self, keepalive: TcpKeepalive) -> Self {
        self.accepting.tcp_keepalive = Some(keepalive);
        self
    }

    /// Serves HTTPS: every accepted connection is a TLS connection, with `config` (see
    /// [`tls::config_from_pem`] for one read from PEM files).
    ///
    /// What a client sees:
    ///
    /// - ALPN decides the protocol: `h2` is served as HTTP/2 only, `http/1.1` (or no ALPN) as HTTP/1
    ///   only, so a client that negotiated HTTP/1.1 cannot switch to HTTP/2 by sending the preface. A
    ///   config with no ALPN protocols is given `["h2", "http/1.1"]` (only one of them when
    ///   [`http_builder`](Self::http_builder) restricted the builder to it).
    /// - The handshake runs in the connection's own task, never on the accept loop, bounded by
    ///   [`tls_handshake_timeout`](Self::tls_handshake_timeout) (10 s by default). A connection whose
    ///   handshake fails or times out is closed, logged at `debug`, with close reason
    ///   [`CloseReason::TlsHandshake`].
    /// - The handshake counts as the start of the connection's first idle period, as the silence of a
    ///   plain connection does: the idle timeout (shortened under connection pressure) ends a handshake
    ///   that outlasts it (close reason [`CloseReason::Idle`]), the connection budget counts it and may
    ///   shed it, and a drain drops it at once. Past the handshake, the idle timeout, maximum requests,
    ///   maximum age, drain, budget and stats apply to the connection as to a plain one, and closing it
    ///   sends TLS `close_notify`.
    ///
    /// ```no_run
    /// # async fn run() -> std::io::Result<()> {
    /// # let app = axum::Router::new();
    /// let listener = tokio::net::TcpListener::bind("0.0.0.0:443").await?;
    /// let config = tower_keepalive::serve::tls::config_from_pem("cert.pem", "key.pem")?;
    /// tower_keepalive::serve(listener, app).tls(config).await?;
    /// # Ok(())
    /// # }
    /// ```
    #[cfg(feature = "tls")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tls")))]
    pub fn tls(mut self, config: impl Into<Arc<rustls::ServerConfig>>) -> Self {
        self.tls.config = Some(config.into());
        self
    }

    /// How long a TLS handshake may take before the connection is closed (default: 10 s). See
    /// [`tls`](Self::tls).
    ///
    /// ```no_run
    /// # async fn run() -> std::io::Result<()> {
    /// # let app = axum::Router::new();
    /// # let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    /// # let config = tower_keepalive::serve::tls::config_from_pem("cert.pem", "key.pem")?;
    /// tower_keepalive::serve(listener, app)
    ///     .tls(config)
    ///     .tls_handshake_timeout(std::time::Duration::from_secs(5))
    ///     .await?;
    /// # Ok(())
    /// # }
    /// ```
    #[cfg(feature = "tls")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tls")))]
    pub fn tls_handshake_timeout(mut self, timeout: Duration) -> Self {
        self.tls.handshake_timeout = timeout;
        self
    }
}

impl<L, S, F> fmt::Debug for Serve<L, S, F>
where
    L: fmt::Debug,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Serve")
            .field("listener", &self.listener)
            .field("layer", &self.layer)
            .field("lame_duck", &self.lame_duck)
            .field("drain_timeout", &self.drain_timeout)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl<L, S, B, F> IntoFuture for Serve<L, S, F>
where
    L: Listener,
    S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
    F: Future<Output = ()> + Send + 'static,
{
    type Output = std::io::Result<()>;
    type IntoFuture = Pin<Box<dyn Future<Output = std::io::Result<()>> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.run())
    }
}

impl<L, S, B, F> Serve<L, S, F>
where
    L: Listener,
    S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
    F: Future<Output = ()> + Send + 'static,
{
    async fn run(self) -> std::io::Result<()> {
        let Serve {
            mut listener,
            service,
            layer,
            signal,
            lame_duck,
            drain_timeout,
            on_close,
            limits,
            max_upgraded,
            builder,
            accepting,
            #[cfg(feature = "tls")]
            tls,
        } = self;
        // What every connection's task needs from the server, behind one pointer.
        let shared = Arc::new(ConnectionsShared {
            #[cfg(feature = "tls")]
            tls: tls.acceptor(&builder),
            builder,
            on_close,
        });
        // A layer reused after an earlier server drained starts serving again.
        layer.config.control.set_shutdown(None);
        let drain = Drain::new();
        let budget = limits.map(|limits| {
            Arc::new(Budget::new(
                limits,
                max_upgraded.unwrap_or(limits.hard / 2),
                layer.config.control.clone(),
                drain.pressure_sender(),
            ))
        });
        let mut signal = pin!(lame_duck::stop_accepting(
            signal,
            lame_duck,
            layer.config.control.clone(),
            drain.timers(),
        ));
        let mut backoff = listener::Backoff::default();
        #[cfg(feature = "tonic")]
        let local = LocalAddr::of(&listener);

        // Serves one accepted connection in a task of its own. Owns the service (which need not be
        // `Sync`), borrows the rest.
        let start = {
            let (layer, accepting, budget, drain, shared) =
                (&layer, &accepting, &budget, &drain, &shared);
            #[cfg(feature = "tonic")]
            let local = &local;
            move |io: L::Io, addr: L::Addr, permit: Option<Admission>| {
                if let Some(budget) = &budget {
                    budget.update();
                }
                let handle = layer.connection();
                let peer = WithPeer::new(service.clone(), accepting.peer(&addr));
                #[cfg(feature = "tonic")]
                let peer = peer.with_local_addr(local.of_connection(&io));
                let svc = KeepAlive::bound(Gate::new(peer, budget.clone()), handle.clone());
                // The connection's room in the budget goes with its IO: an upgraded connection keeps it
                // until the upgraded protocol drops the IO.
                let io = Held::new(io, permit.map(|permit| permit.bind(&handle)));
                let watcher = drain.watcher();
                let span = tracing::debug_span!(
                    "connection",
                    network.peer.address = tracing::field::Empty,
                    network.peer.port = tracing::field::Empty,
                    network.protocol.name = "http",
                );
                if !span.is_disabled() {
                    record_peer(&span, &addr);
                }
                #[cfg(feature = "tls")]
                if let Some(acceptor) = &shared.tls {
                    let accepted = tls::Accepted {
                        acceptor: acceptor.clone(),
                        handle,
                        watcher,
                        permit: None,
                        shared: shared.clone(),
                        info: accepting.peer_addr,
                    };
                    spawn_connection(accepted.serve(io, svc), span);
                    return;
                }
                let start = if !shared.builder.is_http2_available() {
                    conn::Start::Http1
                } else if !shared.builder.is_http1_available() {
                    conn::Start::Http2
                } else {
                    conn::Start::Detect
                };
                let conn = HttpConnection::new(
                    shared.clone(),
                    handle.clone(),
                    WatchedIo::new(io, handle.clone()),
                    TowerToHyperService::new(ConnectionService { inner: svc }),
                    start,
                );
                let task = ConnectionTask::new(conn, handle, watcher, None, shared.clone());
                spawn_connection(task, span);
            }
        };

        // A client accepted, still waiting for room in the budget when the signal came.
        let mut waiting = None;
        loop {
            let (io, addr) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => {
                        backoff.reset();
                        accepted
                    }
                    Err(err) => {
                        if let Some(pause) = backoff.on_error(&err) {
                            tokio::select! {
                                () = tokio::time::sleep(pause) => {}
                                () = &mut signal => break,
                            }
                        }
                        continue;
                    }
                },
                () = &mut signal => break,
            };
            accepting.configure(&io);
            // At the hard limit, the client just accepted makes room (an idle connection is closed for
            // it) or waits here while every connection is busy; the clients behind it stay in the
            // listener's accept queue.
            let permit = match &budget {
                Some(budget) => tokio::select! {
                    permit = budget.admit_shedding(&drain) => permit,
                    () = &mut signal => {
                        waiting = Some((io, addr));
                        break;
                    }
                },
                None => None,
            };
            start(io, addr, permit);
        }

        if lame_duck.is_some() {
            // The clients the balancer sent here until the end of the lame-duck period are served:
            // those already in the listener's accept queue would be reset when it closes, and with
            // them the requests they have sent. Taken without waiting for new ones (the kernel is
            // asked what it holds: a busy runtime sees a queued client late), as lame-duck connections
            // (their first response says `close`); the drain leaves each its first request. At the hard
            // limit they wait for room as any client does, for no longer than the drain may take.
            let room_until = drain_timeout.map(|timeout| tokio::time::Instant::now() + timeout);
            let mut backlog = 0usize;
            let mut next = waiting.take();
            // From here new clients are refused (after a SYN retry), not queued and then reset.
            listener::freeze_queue(&listener);
            loop {
                let accepted = match next.take() {
                    Some(accepted) => Some(accepted),
                    None => listener::accept_queued(&mut listener).await,
                };
                let Some((io, addr)) = accepted else {
                    break;
                };
                let permit = match (&budget, room_until) {
                    (Some(budget), Some(until)) => {
                        match tokio::time::timeout_at(until, budget.admit_shedding(&drain)).await {
                            Ok(permit) => permit,
                            Err(_) => break,
                        }
                    }
                    (Some(budget), None) => budget.admit_shedding(&drain).await,
                    (None, _) => None,
                };
                start(io, addr, permit);
                backlog += 1;
            }
            tracing::debug!(
                connections = backlog,
                "lame duck over; accepted the listener's queue"
            );
        }
        drop(waiting);
        // Stop accepting: new clients are refused rather than left in the backlog during the drain.
        drop(listener);
        // Responses decided from now on say `close`, even before their connection hears of the drain.
        layer.config.control.set_shutdown(Some(CloseReason::Drain));
        tracing::debug!(connections = drain.connections(), "draining");
        drain.drain(drain_timeout).await;
        Ok(())
    }
}

/// One connection's service on the serve path: the app behind the keep-alive layer bound to the
/// connection, telling the connection's IO whether each request has a body (see [`WatchedIo`]: a client's
/// end of stream is held back only while a request without one is in flight). An HTTP/2 stream the layer
/// refuses is reset with `REFUSED_STREAM` rather than answered 503 (see [`RefusingFuture`]).
#[derive(Clone)]
struct ConnectionService<S> {
    inner: KeepAlive<S>,
}

impl<S, B> Service<Request<Incoming>> for ConnectionService<S>
where
    S: Service<Request<Incoming>, Response = Response<B>>,
    S::Error: Into<BoxError>,
    B: http_body::Body,
{
    type Response = Response<ResponseBody<B>>;
    type Error = BoxError;
    type Future = RefusingFuture<S::Future>;

    #[inline]
    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    #[inline]
    fn call(&mut self, mut req: Request<Incoming>) -> Self::Future {
        if let Some(handle) = self.inner.bound_handle() {
            handle.note_request_body(!http_body::Body::is_end_stream(req.body()));
            // The budget's upgrade share charges the connection, which only this service knows.
            if upgrade::asks_to_upgrade(&req) {
                req.extensions_mut().insert(UpgradeOf(handle.clone()));
            }
        }
        RefusingFuture::new(self.inner.call(req))
    }
}

struct ConnectionsShared {
    builder: HttpBuilder,
    on_close: Option<OnClose>,
    #[cfg(feature = "tls")]
    tls: Option<tls::Acceptor>,
}

/// Fills the span's OpenTelemetry peer attributes: `network.peer.address` and `network.peer.port` for
/// an IP peer (a TCP listener's `SocketAddr`, or any address whose `Debug` form is one), else the
/// address's `Debug` form alone (a Unix socket's path, or `(unnamed)`). Only for an enabled span: it
/// formats the address.
fn record_peer(span: &tracing::Span, addr: &dyn fmt::Debug) {
    let text = format!("{addr:?}");
    match text.parse::<std::net::SocketAddr>() {
        Ok(peer) => {
            span.record("network.peer.address", tracing::field::display(peer.ip()));
            span.record("network.peer.port", peer.port());
        }
        Err(_) => {
            span.record("network.peer.address", text.as_str());
        }
    }
}

/// Spawns a connection's task, in its `tracing` span if anyone listens.
fn spawn_connection<T: Future<Output = ()> + Send + 'static>(task: T, span: tracing::Span) {
    // A disabled span (no subscriber wants it) would still take its room in every task.
    if span.is_disabled() {
        tokio::spawn(task);
    } else {
        tokio::spawn(tracing::Instrument::instrument(task, span));
    }
}

/// A connection has closed (and was counted) for `reason`: runs `on_close`, and only then lets the
/// connection stop counting for the drain and give back its room in the budget.
fn closed(
    shared: &ConnectionsShared,
    handle: &ConnectionHandle,
    reason: CloseReason,
    watcher: DrainWatcher,
    permit: Option<Admission>,
) {
    if let Some(on_close) = &shared.on_close {
        on_close(handle, reason);
    }
    drop(watcher);
    drop(permit);
}
