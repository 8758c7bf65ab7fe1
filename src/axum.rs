//! Keep-alive for apps that keep `axum::serve`.
//!
//! `axum::serve` drives its connections itself and offers two hooks: the [`Listener`] it accepts from,
//! and the make-service it calls once per connection. This module uses both:
//!
//! - [`KeepAliveListener`] wraps any axum listener. Each accepted connection gets its
//!   [`ConnectionHandle`], carried by its IO ([`KeepAliveIo`]), and a deadline in the listener's timer
//!   (one task and one heap of deadlines for all its connections, as on the serve path). When the
//!   connection has been idle for the timeout (nothing in flight, every response written to the
//!   socket), or has passed its maximum age (and the timeout its last response advertised has run out),
//!   or has been told to close (HTTP/2 maximum requests) and is idle, the next read returns end-of-file
//!   (after one pending read, in which h2 writes out the frames it has queued): hyper then closes the
//!   connection quietly. A connection that never sends a request, or dribbles its
//!   request head, is closed the same way. The IO is the serve path's [`WatchedIo`] inside, so the wire
//!   behaves as on the serve path: a large body to a slow reader is not cut, a client that half-closes
//!   after its request is answered, and the connection ends with a lingering close (RFC 9112 section
//!   9.6) rather than a reset.
//! - [`into_make_service`] applies the keep-alive layer to the whole router per connection, bound to that
//!   connection's handle, so every request is tracked: nothing busy is ever closed.
//! - [`KeepAliveListener::on_shutdown`] wraps the future you give to axum's `with_graceful_shutdown`, so
//!   that from the signal on, responses say `Connection: close` instead of advertising keep-alive.
//!
//! The send timeout ([`KeepAliveLayer::send_timeout`](crate::KeepAliveLayer::send_timeout)) holds here
//! too: once the listener's timer finds a connection's output stalled for it, every read and write of
//! the IO fails, and hyper drops the connection.
//!
//! Once a connection is upgraded (a WebSocket), its IO belongs to the upgraded protocol and is left
//! alone; it counts as open in the stats until that IO is dropped.
//!
//! Idle connections do not hibernate on this path ([`Serve::hibernate_after`](crate::serve::Serve::hibernate_after)):
//! `axum::serve` makes and drives hyper's connection itself, so nothing here can take it apart while
//! idle, and each idle HTTP/1 connection keeps hyper's buffers and state (about 17 KB) until it closes.
//!
//! Compared with the crate's own [`serve`](crate::serve()), an idle HTTP/2 connection is closed without
//! a GOAWAY frame (the IO cannot send one), and the response body is boxed into axum's `Body` on each
//! request. There is no connection budget here (axum's accept loop takes what the listener gives), so
//! no share of it kept from WebSockets (`Serve::max_upgraded`) either: bound descriptors with the
//! process's limit. At the end of a lame-duck period ([`KeepAliveListener::lame_duck`]) the
//! listener's accept queue is taken in, and a connection accepted in the last second is given time to
//! send its first request, as on the serve path, but for tokio's `TcpListener` only (the period's
//! future has to see its queue), and that time comes before axum stops accepting, not after. Prefer
//! [`serve`](crate::serve()) where you can: it takes the same `Router`.
//!
//! # axum versions
//!
//! Tested with axum 0.8 (0.8.9, its latest release). axum's next release (unreleased, read on its main
//! branch) changes three things that touch this module:
//!
//! - `axum::serve` turns on hyper's HTTP/1 `header_read_timeout` (30 s). hyper 1.12 runs it from the
//!   end of a response to the next request's head, so it closes an idle keep-alive connection quietly
//!   30 s after its last response: keep the idle timeout under 30 s on this path (the default is 5 s),
//!   or the advertised `timeout=` promises more than hyper keeps. The crate's [`serve`](crate::serve())
//!   runs its own head timer and is not affected.
//! - `ListenerExt::limit_connections(n)`: wrap it inside, `KeepAliveListener::new(tcp.limit_connections(n),
//!   layer)`, since [`into_make_service`] needs a `KeepAliveListener` outermost. Idle connections keep
//!   their place until their idle timeout; the serve path's budget sheds them for new clients instead.
//!   [`KeepAliveListener::tcp_keepalive`] does not see a `TcpStream` through the limiter: call
//!   [`TcpKeepalive::apply`] from `tap_io` on the `TcpListener` before `limit_connections`.
//! - The serve future's output is `()` instead of `io::Result<()>` (drop the `?` after `.await`). The
//!   listener and make-service hooks this module uses are unchanged: the module builds against axum's
//!   main branch as it is.
//!
//! # Example
//!
//! ```no_run
//! use std::time::Duration;
//! use axum::{routing::get, Router};
//! use tower_keepalive::axum::{into_make_service, KeepAliveListener};
//! use tower_keepalive::KeepAliveLayer;
//!
//! # async fn run() -> std::io::Result<()> {
//! let app = Router::new().route("/", get(|| async { "hello" }));
//! let tcp = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
//! let listener = KeepAliveListener::new(tcp, KeepAliveLayer::new().idle_timeout(Duration::from_secs(10)));
//! let shutdown = listener.on_shutdown(async { let _ = tokio::signal::ctrl_c().await; });
//! axum::serve(listener, into_make_service(app))
//!     .with_graceful_shutdown(shutdown)
//!     .await?;
//! # Ok(())
//! # }
//! ```

use std::convert::Infallible;
use std::fmt;
use std::future::{Future, Ready};
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use ::axum::body::Body;
use ::axum::extract::Request;
use ::axum::response::Response;
use ::axum::serve::{IncomingStream, Listener};
use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tower_service::Service;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::body::RefusedStream;
#[cfg(feature = "tonic")]
use crate::serve::LocalAddr;
use crate::serve::{Queue, TcpKeepalive, Timers, WatchedIo, WithPeer, FIRST_REQUEST_GRACE};
use crate::{CloseReason, ConnectionHandle, KeepAlive, KeepAliveLayer};

/// An axum [`Listener`] whose connections carry their keep-alive state and enforce the idle timeout.
/// See the [module docs](self).
///
/// ```
/// use tower_keepalive::{axum::KeepAliveListener, KeepAliveLayer};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> std::io::Result<()> {
/// let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
/// let listener = KeepAliveListener::new(tcp, KeepAliveLayer::new());
/// # Ok(())
/// # }
/// ```
pub struct KeepAliveListener<L> {
    inner: L,
    layer: KeepAliveLayer,
    timers: Arc<Timers>,
    tcp_keepalive: Option<TcpKeepalive>,
    /// Told of every accept: the end of a lame-duck period waits for the listener's queue to empty.
    accepted: Arc<tokio::sync::Notify>,
}

impl<L> KeepAliveListener<L> {
    /// Wraps `inner`; `layer` is the policy of every connection.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> std::io::Result<()> {
    /// let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    /// let listener = tower_keepalive::axum::KeepAliveListener::new(tcp, Default::default());
    /// # Ok(())
    /// # }
    /// ```
    pub fn new(inner: L, layer: KeepAliveLayer) -> Self {
        KeepAliveListener {
            inner,
            layer: KeepAliveLayer {
                config: layer.config,
                handle: None,
            },
            timers: Arc::new(Timers::new()),
            tcp_keepalive: None,
            accepted: Arc::new(tokio::sync::Notify::new()),
        }
    }

    /// TCP keepalive probes on every accepted connection whose IO is a `tokio::net::TcpStream`
    /// (default: off), as [`Serve::tcp_keepalive`](crate::serve::Serve::tcp_keepalive) sets them on
    /// the serve path. For a listener of axum's that wraps the stream (`tap_io` keeps it a
    /// `TcpStream`), or your own, call [`TcpKeepalive::apply`] in `ListenerExt::tap_io` instead.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> std::io::Result<()> {
    /// use std::time::Duration;
    /// use tower_keepalive::serve::TcpKeepalive;
    /// let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    /// let listener = tower_keepalive::axum::KeepAliveListener::new(tcp, Default::default())
    ///     .tcp_keepalive(TcpKeepalive::new(Duration::from_secs(60)));
    /// # Ok(())
    /// # }
    /// ```
    pub fn tcp_keepalive(mut self, keepalive: TcpKeepalive) -> Self {
        self.tcp_keepalive = Some(keepalive);
        self
    }

    /// Wraps the shutdown `signal` you give to axum's `with_graceful_shutdown`: once it completes, no
    /// connection of this listener is kept alive (responses say `Connection: close`), and axum's graceful
    /// shutdown does the rest.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> std::io::Result<()> {
    /// let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    /// let listener = tower_keepalive::axum::KeepAliveListener::new(tcp, Default::default());
    /// let shutdown = listener.on_shutdown(async {});
    /// shutdown.await;
    /// # Ok(())
    /// # }
    /// ```
    pub fn on_shutdown<F>(&self, signal: F) -> impl Future<Output = ()> + Send + 'static
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let state = self.layer.config.control.clone();
        async move {
            signal.await;
            state.set_shutdown(Some(CloseReason::Drain));
        }
    }

    /// Wraps the shutdown `signal` as [`on_shutdown`](Self::on_shutdown) does, with a lame-duck period
    /// of `period` first: give the future it returns to axum's `with_graceful_shutdown`. axum keeps
    /// accepting until the future resolves, `period` after the signal; meanwhile no connection of this
    /// listener is kept alive: every HTTP/1 response says `Connection: close` (RFC 9112 section 9.6),
    /// idle HTTP/1 connections that have served a request are closed a second after the signal (a
    /// request a balancer sent on one meanwhile is answered, with `close`), and new connections are
    /// served, then closed. Close reason [`CloseReason::LameDuck`]. Then axum stops accepting and drains (see
    /// [`Serve::lame_duck`](crate::serve::Serve::lame_duck) for why a server behind a load balancer
    /// wants this).
    ///
    /// When `inner` is tokio's `TcpListener`, the end of the period, as on the serve path, takes in the
    /// clients in the listener's accept queue (no new one joins it from then on, on Linux: a client
    /// connecting then is refused once the listener has closed), and waits for a connection accepted
    /// in the last second to begin its first request (for at most a second), before the future
    /// resolves: axum would reset the first and close the second at once. So the future resolves a
    /// little after `period`: milliseconds as a rule, a few seconds at the very most (each wait is
    /// bounded).
    ///
    /// What this path cannot do, where [`serve`](crate::serve()) can: send GOAWAY (RFC 9113 section
    /// 6.8). An HTTP/2 connection is closed by end-of-file once it has no stream open (a client that
    /// sends a stream at that moment sees the connection close under it); axum's own drain sends GOAWAY
    /// once the period is over. axum has no drain deadline either.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> std::io::Result<()> {
    /// use std::time::Duration;
    /// let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    /// let listener = tower_keepalive::axum::KeepAliveListener::new(tcp, Default::default());
    /// let shutdown = listener.lame_duck(async {}, Duration::from_millis(10));
    /// shutdown.await;
    /// # Ok(())
    /// # }
    /// ```
    pub fn lame_duck<F>(
        &self,
        signal: F,
        period: std::time::Duration,
    ) -> impl Future<Output = ()> + Send + 'static
    where
        F: Future<Output = ()> + Send + 'static,
        L: 'static,
    {
        let state = self.layer.config.control.clone();
        let timers = self.timers.clone();
        let queue = Queue::of(&self.inner);
        let accepted = self.accepted.clone();
        async move {
            signal.await;
            crate::serve::lame_duck_begin(&state, &timers);
            tokio::time::sleep(period).await;
            // axum's drain ends a connection that has not begun a request at once: one accepted just
            // now has its first request on the way. Waited for while axum still accepts (new clients
            // are served as lame-duck connections meanwhile).
            first_requests(&timers).await;
            // axum accepts while this future is pending: the clients the balancer queued until now are
            // taken in, not reset when axum drops the listener; their requests are on the way too.
            if let Some(queue) = queue {
                queue.empty(&accepted).await;
                first_requests(&timers).await;
            }
            state.set_shutdown(Some(CloseReason::Drain));
            // Silent connections accepted meanwhile close now too, as on the serve path's drain.
            timers.begin_drain();
        }
    }
}

impl<L: fmt::Debug> fmt::Debug for KeepAliveListener<L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeepAliveListener")
            .field("inner", &self.inner)
            .field("layer", &self.layer)
            .finish()
    }
}

impl<L: Listener> Listener for KeepAliveListener<L> {
    type Io = KeepAliveIo<L::Io>;
    type Addr = L::Addr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let (io, addr) = self.inner.accept().await;
        if let Some(keepalive) = &self.tcp_keepalive {
            keepalive.apply_to(&io);
        }
        let handle = self.layer.connection();
        self.timers.live.fetch_add(1, Ordering::Relaxed);
        self.timers.start(&handle);
        // Only once shutting down: notifying takes a lock.
        if self.layer.config.control.shutdown_reason().is_some() {
            self.accepted.notify_waiters();
        }
        (KeepAliveIo::new(io, handle, self.timers.clone()), addr)
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

pin_project! {
    /// A connection accepted by [`KeepAliveListener`]: the IO and its [`ConnectionHandle`]. Once the
    /// listener's timer finds the connection closing and idle, reads give end-of-file.
    ///
    /// The IO is wrapped in a [`WatchedIo`], as on the crate's own serve path, and behaves the same on
    /// the wire: a response is in flight until its last byte has been written to the socket, so a large
    /// body to a slow reader is not cut; a client that half-closes after its request is answered; and
    /// the connection ends with a lingering close (RFC 9112 section 9.6). See [`WatchedIo`].
    ///
    /// ```
    /// # async fn f(io: tower_keepalive::axum::KeepAliveIo<tokio::net::TcpStream>) {
    /// println!("{} requests so far", io.handle().requests());
    /// # }
    /// ```
    pub struct KeepAliveIo<I> {
        #[pin]
        inner: WatchedIo<I>,
        // The listener's timers, which wake this IO's task through the handle.
        timers: Arc<Timers>,
        // Once end-of-file has been given, it is given again: the connection is over.
        closed: bool,
        // The last read found the connection ending and returned pending instead, for the flush below.
        flushing: bool,
    }

    impl<I> PinnedDrop for KeepAliveIo<I> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            // The connection is gone (the handle may live on elsewhere): its deadline goes too, and it
            // counts as closed now.
            this.inner.handle().mark_undriven();
            this.inner.handle().report_closed(CloseReason::ClientClosed);
            this.timers.live.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl<I> KeepAliveIo<I> {
    fn new(inner: I, handle: ConnectionHandle, timers: Arc<Timers>) -> Self {
        KeepAliveIo {
            inner: WatchedIo::new(inner, handle),
            timers,
            closed: false,
            flushing: false,
        }
    }

    /// The connection's keep-alive state.
    ///
    /// ```
    /// # async fn f(io: tower_keepalive::axum::KeepAliveIo<tokio::net::TcpStream>) {
    /// let requests: u64 = io.handle().requests();
    /// # }
    /// ```
    pub fn handle(&self) -> &ConnectionHandle {
        self.inner.handle()
    }

    /// The wrapped IO.
    ///
    /// ```
    /// # async fn f(io: tower_keepalive::axum::KeepAliveIo<tokio::net::TcpStream>) {
    /// let peer = io.get_ref().peer_addr();
    /// # }
    /// ```
    pub fn get_ref(&self) -> &I {
        self.inner.get_ref()
    }
}

impl<I: fmt::Debug> fmt::Debug for KeepAliveIo<I> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeepAliveIo")
            .field("inner", self.get_ref())
            .field("handle", self.handle())
            .finish()
    }
}

impl<I> KeepAliveIo<I> {
    /// Whether the connection should end now: closing (idle for the timeout, past its maximum age, told
    /// to close, the server shutting down) and idle (nothing in flight, every response written to the
    /// socket). Registers the task to be woken when the timers decide a close otherwise.
    fn should_end(self: Pin<&mut Self>, cx: &mut Context<'_>) -> bool {
        let this = self.project();
        if *this.closed {
            return true;
        }
        let handle = this.inner.handle();
        if handle.close_reason() == Some(CloseReason::Upgraded) {
            // The upgraded protocol owns the IO now, and the timers let it go; it counts as open until
            // the IO is dropped, as on the serve path.
            if handle.wants_timer() {
                handle.mark_undriven();
            }
            return false;
        }
        // Registered before the state is read: a close decided after this read wakes the task. (A
        // wake-up takes the registration, so it is made on every read; so did the timer this replaces.)
        handle.register_driver(cx.waker());
        // Idle, not merely nothing in flight: hyper may still be writing out the last body frame it was
        // given, and an end-of-file now would cut that response.
        if handle.idle_since().is_some()
            && handle.pending_close().is_some()
            && handle.may_close_idle(std::time::Instant::now())
            && !spared_by_lame_duck(handle)
        {
            // Past its age but busy, the layer says `close` on the next response instead.
            handle.close(CloseReason::Drain);
            return true;
        }
        false
    }
}

/// Waits until no connection accepted in the last second is still silent (it has begun its first
/// request, or closed), at most [`FIRST_REQUEST_GRACE`]: the serve path's drain gives such a connection
/// that grace, axum's closes it at once. Looked at every 10 ms: for the end of a lame-duck period only.
async fn first_requests(timers: &Timers) {
    let until = tokio::time::Instant::now() + FIRST_REQUEST_GRACE;
    while timers.awaiting_first_request() && tokio::time::Instant::now() < until {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// Whether an idle HTTP/1 connection is in the lame-duck period's idle grace: marked to close, its
/// close not requested yet (the timers request it when the grace ends, `LAME_DUCK_IDLE_GRACE`). A
/// balancer's request may be on its way: it is read and answered with `Connection: close`, as on the
/// serve path, rather than met with end-of-file.
fn spared_by_lame_duck(handle: &ConnectionHandle) -> bool {
    handle.close_reason() == Some(CloseReason::LameDuck)
        && !handle.is_http2()
        && !handle.driver_flags().0
}

/// The error every read and write gives once the timers have decided to drop the connection (the send
/// timeout: a client that does not read would not read a close either). hyper then drops it.
fn dropped() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "connection dropped: send timeout")
}

impl<I> KeepAliveIo<I> {
    /// Whether the timers decided to drop the connection. A load.
    #[inline]
    fn is_dropped(&self) -> bool {
        self.inner.handle().driver_flags().1
    }

    /// A write that found the socket full: the task is woken if the timers decide to drop the
    /// connection meanwhile (a client that does not read leaves hyper no reason to read either).
    fn written<T>(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        poll: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if poll.is_pending() {
            let handle = self.inner.handle();
            handle.register_driver(cx.waker());
            if handle.driver_flags().1 {
                return Poll::Ready(Err(dropped()));
            }
        }
        poll
    }
}

impl<I: AsyncRead> AsyncRead for KeepAliveIo<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.is_dropped() {
            return Poll::Ready(Err(dropped()));
        }
        if !self.as_mut().should_end(cx) {
            *self.as_mut().project().flushing = false;
            return self.project().inner.poll_read(cx, buf);
        }
        let this = self.project();
        // h2 writes out the frames it has queued (the last responses, resets of refused streams) only
        // once a read is pending, and drops them at end-of-file: one pending read first, after which h2
        // has handed them all to the socket, or found it full (the connection is then not idle, and
        // this starts again when it is).
        if !*this.closed && !std::mem::replace(this.flushing, true) {
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        // End-of-file: hyper closes an idle connection quietly.
        *this.closed = true;
        Poll::Ready(Ok(()))
    }
}

impl<I: AsyncRead + AsyncWrite> AsyncWrite for KeepAliveIo<I> {
    #[inline]
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.is_dropped() {
            return Poll::Ready(Err(dropped()));
        }
        let poll = self.as_mut().project().inner.poll_write(cx, buf);
        self.written(cx, poll)
    }

    #[inline]
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.is_dropped() {
            return Poll::Ready(Err(dropped()));
        }
        let poll = self.as_mut().project().inner.poll_flush(cx);
        self.written(cx, poll)
    }

    #[inline]
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }

    #[inline]
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.is_dropped() {
            return Poll::Ready(Err(dropped()));
        }
        let poll = self.as_mut().project().inner.poll_write_vectored(cx, bufs);
        self.written(cx, poll)
    }

    #[inline]
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// The make-service for `axum::serve` over a [`KeepAliveListener`]: every connection's service is
/// `service` with the keep-alive layer bound to that connection. See the [module docs](self).
///
/// ```
/// let app: axum::Router = axum::Router::new();
/// let make_service = tower_keepalive::axum::into_make_service(app);
/// ```
pub fn into_make_service<S>(service: S) -> IntoMakeService<S> {
    IntoMakeService { service }
}

/// Made by [`into_make_service`].
///
/// ```
/// let make_service: tower_keepalive::axum::IntoMakeService<axum::Router> =
///     tower_keepalive::axum::into_make_service(axum::Router::new());
/// ```
#[derive(Clone, Debug)]
pub struct IntoMakeService<S> {
    service: S,
}

impl<S, L, I> Service<IncomingStream<'_, L>> for IntoMakeService<S>
where
    S: Clone,
    L: Listener<Io = KeepAliveIo<I>>,
    // Implied by axum's `Listener::Io: 'static`; said for the connection's local address (tonic).
    I: 'static,
    L::Addr: Clone + Send + Sync + 'static,
{
    type Response = ConnectionService<S, L::Addr>;
    type Error = Infallible;
    type Future = Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, stream: IncomingStream<'_, L>) -> Self::Future {
        let handle = stream.io().handle().clone();
        let peer = WithPeer::new(self.service.clone(), Some(stream.remote_addr().clone()));
        #[cfg(feature = "tonic")]
        let peer = peer.with_local_addr(LocalAddr::unknown().of_connection(stream.io().get_ref()));
        std::future::ready(Ok(ConnectionService {
            inner: KeepAlive::bound(peer, handle),
        }))
    }
}

/// One connection's service under `axum::serve`: the app with the keep-alive layer bound to the
/// connection, and the connection's peer address (`A`, the listener's `Addr`) in every request as
/// axum's [`ConnectInfo`](::axum::extract::ConnectInfo) and as
/// [`PeerAddr`](crate::serve::PeerAddr), as `into_make_service_with_connect_info` would give it (and
/// with feature `tonic`, for TCP, as tonic's `TcpConnectInfo`, for `Request::remote_addr()`). Made
/// by [`IntoMakeService`].
///
/// ```
/// fn is_service<S: tower::Service<axum::extract::Request>>() {}
/// is_service::<tower_keepalive::axum::ConnectionService<axum::Router>>();
/// ```
#[derive(Clone, Debug)]
pub struct ConnectionService<S, A = std::net::SocketAddr> {
    inner: KeepAlive<WithPeer<S, A>>,
}

impl<S, A> Service<Request> for ConnectionService<S, A>
where
    S: Service<Request, Response = Response, Error = Infallible>,
    A: Clone + Send + Sync + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = ConnectionFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        // For the IO's half-close handling: see `WatchedIo`.
        if let Some(handle) = self.inner.bound_handle() {
            handle.note_request_body(!http_body::Body::is_end_stream(req.body()));
        }
        ConnectionFuture {
            inner: self.inner.call(req),
        }
    }
}

pin_project! {
    /// Response future of [`ConnectionService`].
    ///
    /// ```
    /// fn is_future<F: std::future::Future>() {}
    /// is_future::<tower_keepalive::axum::ConnectionFuture<std::future::Ready<Result<axum::response::Response, std::convert::Infallible>>>>();
    /// ```
    pub struct ConnectionFuture<F> {
        #[pin]
        inner: crate::ResponseFuture<F>,
    }
}

impl<F> fmt::Debug for ConnectionFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectionFuture").finish_non_exhaustive()
    }
}

impl<F> Future for ConnectionFuture<F>
where
    F: Future<Output = Result<Response, Infallible>>,
{
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let res = ready!(self.project().inner.poll(cx))?;
        if res.body().is_refused() {
            // `axum::serve` wants services that cannot fail: the refusal is the body's error instead.
            return Poll::Ready(Ok(res.map(|_| Body::new(RefusedStream))));
        }
        Poll::Ready(Ok(res.map(Body::new)))
    }
}
