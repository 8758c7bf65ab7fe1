//! The serve path: an accept loop that gives every connection the keep-alive lifecycle.
//!
//! [`serve`] runs HTTP/1.1 and h2c (prior knowledge) on one listener over hyper-util's auto builder,
//! for an axum `Router` or any tower `Service`. Each accepted connection gets its own
//! [`ConnectionHandle`]; the keep-alive layer is applied to the whole service by the serve path itself, so
//! idle enforcement sees every request (a layer forgotten on some routes cannot get a busy connection
//! closed under a request), and the connection is driven through its lifecycle:
//!
//! - **idle timeout**: a connection with nothing in flight and every response body sent is closed once it
//!   has been idle for the timeout: HTTP/1 by closing it, HTTP/2 with GOAWAY. Never before the advertised
//!   `timeout=`. A connection that is accepted and never sends a byte, or that dribbles its request head,
//!   is closed too (hyper-util's protocol detection runs no timer of its own);
//! - **maximum requests**: HTTP/1 says `Connection: close` on the last response; HTTP/2 gets GOAWAY after
//!   the last stream (RFC 9113 section 6.8), and the streams in flight finish;
//! - **maximum age** (off by default, jittered per connection): a graceful close at the next request
//!   boundary;
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
//! - WebSocket upgrades work; once upgraded, the connection belongs to the WebSocket and none of the
//!   above applies to it.
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
mod drive;
mod listener;
mod watched;

use std::fmt;
use std::future::{Future, IntoFuture};
use std::io;
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tower_service::Service;

#[cfg(feature = "axum")]
pub(crate) use drive::Timers;
pub use drive::{Drain, DrainWatcher, GracefulConnection};
pub use listener::Listener;
pub use watched::WatchedIo;

use budget::{Budget, Limits};

use crate::{CloseReason, ConnectionHandle, KeepAlive, KeepAliveLayer};

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
        layer: KeepAliveLayer::new(),
        signal: std::future::pending(),
        drain_timeout: None,
        on_close: None,
        limits: Limits::from_fd_limit(),
        builder: default_builder(),
    }
}

fn default_builder() -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // The lifecycle closes idle connections and slow heads itself; hyper's own header timer would close
    // a connection before the advertised timeout, and without a timer hyper warns on each one.
    builder.http1().header_read_timeout(None);
    builder
}

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
    drain_timeout: Option<Duration>,
    on_close: Option<OnClose>,
    limits: Option<Limits>,
    builder: auto::Builder<TokioExecutor>,
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
        self.layer = KeepAliveLayer {
            config: layer.config,
            handle: None,
        };
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
            drain_timeout: self.drain_timeout,
            on_close: self.on_close,
            limits: self.limits,
            builder: self.builder,
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
    /// admitted; at `hard` no idle connection is kept, and new connections wait in the listener's accept
    /// queue rather than being accepted and dropped. A request in flight is never cut.
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

    /// Tunes hyper-util's connection builder: HTTP/1 buffer and header limits, HTTP/2 streams, windows
    /// and frame sizes, and so on. The serve path starts from `auto::Builder::new(TokioExecutor::new())`
    /// with hyper's HTTP/1 header-read timer off (the lifecycle closes idle connections and slow heads
    /// itself; turning hyper's timer back on would close connections before the advertised timeout).
    ///
    /// ```no_run
    /// # async fn run() -> std::io::Result<()> {
    /// # let app = axum::Router::new();
    /// # let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    /// tower_keepalive::serve(listener, app)
    ///     .http_builder(|builder| {
    ///         builder.http1().max_buf_size(64 * 1024);
    ///         builder.http2().max_concurrent_streams(100);
    ///     })
    ///     .await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn http_builder(
        mut self,
        configure: impl FnOnce(&mut auto::Builder<TokioExecutor>),
    ) -> Self {
        configure(&mut self.builder);
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
}

impl<L, S, F> fmt::Debug for Serve<L, S, F>
where
    L: fmt::Debug,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Serve")
            .field("listener", &self.listener)
            .field("layer", &self.layer)
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
    type Output = io::Result<()>;
    type IntoFuture = Pin<Box<dyn Future<Output = io::Result<()>> + Send>>;

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
    async fn run(self) -> io::Result<()> {
        let Serve {
            mut listener,
            service,
            layer,
            signal,
            drain_timeout,
            on_close,
            limits,
            builder,
        } = self;
        // What every connection's task needs from the server, behind one pointer.
        let shared = Arc::new(ConnectionsShared { builder, on_close });
        // A layer reused after an earlier server drained starts serving again.
        layer.config.stats.set_draining(false);
        let drain = Drain::new();
        let budget = limits.map(|limits| {
            Arc::new(Budget::new(
                limits,
                layer.config.stats.clone(),
                drain.pressure_sender(),
            ))
        });
        let mut signal = pin!(signal);
        let mut backoff = listener::Backoff::default();

        loop {
            // At the hard limit, wait here: new clients stay in the accept queue.
            let permit = match &budget {
                Some(budget) => tokio::select! {
                    permit = budget.admit() => permit,
                    () = &mut signal => break,
                },
                None => None,
            };
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
            if let Some(budget) = &budget {
                budget.update();
            }
            let handle = layer.connection();
            let svc = KeepAlive::bound(service.clone(), handle.clone());
            let watcher = drain.watcher();
            let shared = shared.clone();
            let span = tracing::debug_span!("connection", peer = ?addr);
            let task = async move {
                // Pinned here, once: the connection is the largest part of the task.
                let conn = pin!(shared.builder.serve_connection_with_upgrades(
                    TokioIo::new(WatchedIo::new(io, handle.clone())),
                    TowerToHyperService::new(ConnectionService { inner: svc }),
                ));
                // A handler that panics (no `CatchPanic` in the stack) unwinds through the connection:
                // its close is still reported and counted, then the panic goes on.
                let (reason, panic) =
                    match CatchUnwind::new(watcher.drive_pinned(&handle, conn)).await {
                        Ok(reason) => (reason, None),
                        Err(panic) => {
                            handle.mark_closing(CloseReason::Error);
                            let reason = handle.close_reason().unwrap_or(CloseReason::Error);
                            (reason, Some(panic))
                        }
                    };
                if let Some(on_close) = &shared.on_close {
                    on_close(&handle, reason);
                }
                // Only now does the connection stop counting for the drain: `on_close` has run.
                drop(watcher);
                drop(permit);
                if let Some(panic) = panic {
                    std::panic::resume_unwind(panic);
                }
            };
            // A disabled span (no subscriber wants it) would still take its room in every task.
            if span.is_disabled() {
                tokio::spawn(task);
            } else {
                tokio::spawn(tracing::Instrument::instrument(task, span));
            }
        }

        // Stop accepting: new clients are refused rather than left in the backlog during the drain.
        drop(listener);
        // Responses decided from now on say `close`, even before their connection hears of the drain.
        layer.config.stats.set_draining(true);
        tracing::debug!(connections = drain.connections(), "draining");
        drain.drain(drain_timeout).await;
        Ok(())
    }
}

/// One connection's service on the serve path: the app behind the keep-alive layer bound to the
/// connection, telling the connection's IO whether each request has a body (see [`WatchedIo`]: a client's
/// end of stream is held back only while a request without one is in flight).
#[derive(Clone)]
struct ConnectionService<S> {
    inner: KeepAlive<S>,
}

impl<S> Service<Request<Incoming>> for ConnectionService<S>
where
    KeepAlive<S>: Service<Request<Incoming>>,
{
    type Response = <KeepAlive<S> as Service<Request<Incoming>>>::Response;
    type Error = <KeepAlive<S> as Service<Request<Incoming>>>::Error;
    type Future = <KeepAlive<S> as Service<Request<Incoming>>>::Future;

    #[inline]
    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    #[inline]
    fn call(&mut self, req: Request<Incoming>) -> Self::Future {
        if let Some(handle) = self.inner.bound_handle() {
            handle.note_request_body(!http_body::Body::is_end_stream(req.body()));
        }
        self.inner.call(req)
    }
}

struct ConnectionsShared {
    builder: auto::Builder<TokioExecutor>,
    on_close: Option<OnClose>,
}

pin_project_lite::pin_project! {
    /// Resolves with the panic of `inner` instead of unwinding through whoever polls it.
    struct CatchUnwind<F> {
        #[pin]
        inner: F,
    }
}

impl<F> CatchUnwind<F> {
    fn new(inner: F) -> Self {
        CatchUnwind { inner }
    }
}

impl<F: Future> Future for CatchUnwind<F> {
    type Output = std::thread::Result<F::Output>;

    fn poll(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let inner = self.project().inner;
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(poll) => poll.map(Ok),
            Err(panic) => std::task::Poll::Ready(Err(panic)),
        }
    }
}
