//! Driving one connection through its lifecycle: idle timeout, maximum age, graceful close, drain.

use std::future::{poll_fn, Future};
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use pin_project_lite::pin_project;

use tokio::sync::watch;
use tokio::time::{sleep_until, Instant};

use crate::{CloseReason, ConnectionHandle};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How long a connection that was told to close gracefully, and has nothing in flight, may take to go.
/// Past it the connection is dropped: this is what ends a client that never finishes its request head
/// (hyper waits for a started head before it honours a graceful shutdown).
const GRACE: Duration = Duration::from_secs(1);

/// The same for HTTP/2, where a finished response may still sit in h2's buffers until the client's flow
/// control lets it out, with no write to show for it: a stalled reader gets this long (nginx's default
/// `send_timeout`) before it is cut. A drain deadline cuts sooner.
const GRACE_HTTP2: Duration = Duration::from_secs(60);

fn grace(handle: &ConnectionHandle) -> Duration {
    if handle.is_http2() {
        GRACE_HTTP2
    } else {
        GRACE
    }
}

/// A connection future that can be told to close gracefully: hyper's HTTP/1 and HTTP/2 connections and
/// hyper-util's auto connections.
///
/// hyper-util has a trait of the same shape for its `GracefulShutdown`, but it is sealed; this one is
/// implemented for the same types.
///
/// # Example
///
/// ```
/// use hyper_util::rt::{TokioExecutor, TokioIo};
/// use hyper_util::server::conn::auto;
/// use tower_keepalive::serve::GracefulConnection;
///
/// fn assert_graceful<C: GracefulConnection>(_: &C) {}
///
/// # async fn f(io: tokio::net::TcpStream) {
/// let builder = auto::Builder::new(TokioExecutor::new());
/// let conn = builder.serve_connection_with_upgrades(
///     TokioIo::new(io),
///     hyper::service::service_fn(|_req: http::Request<hyper::body::Incoming>| async {
///         Ok::<_, std::convert::Infallible>(http::Response::new(String::from("hello")))
///     }),
/// );
/// // What `ConnectionHandle::drive` and `DrainWatcher::drive` take.
/// assert_graceful(&conn);
/// # }
/// ```
pub trait GracefulConnection: Future<Output = Result<(), Self::Error>> {
    /// The error the connection ends with.
    type Error: Into<BoxError>;

    /// Starts a graceful close: HTTP/1 closes once the current response is written (at once when idle),
    /// HTTP/2 sends GOAWAY and closes after its open streams.
    fn graceful_shutdown(self: Pin<&mut Self>);
}

impl<I, B, S> GracefulConnection for hyper::server::conn::http1::Connection<I, S>
where
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = B>,
    S::Error: Into<BoxError>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + 'static,
    B: hyper::body::Body + 'static,
    B::Error: Into<BoxError>,
{
    type Error = hyper::Error;

    fn graceful_shutdown(self: Pin<&mut Self>) {
        hyper::server::conn::http1::Connection::graceful_shutdown(self);
    }
}

impl<I, B, S> GracefulConnection for hyper::server::conn::http1::UpgradeableConnection<I, S>
where
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = B>,
    S::Error: Into<BoxError>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    B: hyper::body::Body + 'static,
    B::Error: Into<BoxError>,
{
    type Error = hyper::Error;

    fn graceful_shutdown(self: Pin<&mut Self>) {
        hyper::server::conn::http1::UpgradeableConnection::graceful_shutdown(self);
    }
}

impl<I, B, S, E> GracefulConnection for hyper::server::conn::http2::Connection<I, S, E>
where
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = B>,
    S::Error: Into<BoxError>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + 'static,
    B: hyper::body::Body + 'static,
    B::Error: Into<BoxError>,
    E: hyper::rt::bounds::Http2ServerConnExec<S::Future, B>,
{
    type Error = hyper::Error;

    fn graceful_shutdown(self: Pin<&mut Self>) {
        hyper::server::conn::http2::Connection::graceful_shutdown(self);
    }
}

impl<I, B, S, E> GracefulConnection for hyper_util::server::conn::auto::Connection<'_, I, S, E>
where
    S: hyper::service::Service<http::Request<hyper::body::Incoming>, Response = http::Response<B>>,
    S::Error: Into<BoxError>,
    S::Future: 'static,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + 'static,
    B: hyper::body::Body + 'static,
    B::Error: Into<BoxError>,
    E: hyper::rt::bounds::Http2ServerConnExec<S::Future, B>,
{
    type Error = BoxError;

    fn graceful_shutdown(self: Pin<&mut Self>) {
        hyper_util::server::conn::auto::Connection::graceful_shutdown(self);
    }
}

impl<I, B, S, E> GracefulConnection
    for hyper_util::server::conn::auto::UpgradeableConnection<'_, I, S, E>
where
    S: hyper::service::Service<http::Request<hyper::body::Incoming>, Response = http::Response<B>>,
    S::Error: Into<BoxError>,
    S::Future: 'static,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    B: hyper::body::Body + 'static,
    B::Error: Into<BoxError>,
    E: hyper::rt::bounds::Http2ServerConnExec<S::Future, B>,
{
    type Error = BoxError;

    fn graceful_shutdown(self: Pin<&mut Self>) {
        hyper_util::server::conn::auto::UpgradeableConnection::graceful_shutdown(self);
    }
}

/// What the server tells every connection: whether it drains, and how short of connections it is.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) struct ServerSignal {
    drain: DrainState,
    pressure: u32,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum DrainState {
    Serving,
    /// Keep nothing alive: idle connections close now, busy ones after their in-flight work.
    Draining,
    /// The drain deadline passed: drop what is left.
    Abort,
}

/// Server-wide drain: tells every watched connection to close gracefully, and waits until they have.
///
/// One `watch` channel broadcasts the signal, and waiting for it to close (every connection's receivers
/// gone) is waiting for the connections: draining costs nothing per request.
///
/// # Example
///
/// ```no_run
/// use std::time::Duration;
/// use hyper_util::rt::{TokioExecutor, TokioIo};
/// use hyper_util::server::conn::auto;
/// use hyper_util::service::TowerToHyperService;
/// use tower::ServiceBuilder;
/// use tower_keepalive::{serve::Drain, KeepAliveLayer};
///
/// # async fn run() -> std::io::Result<()> {
/// let keep_alive = KeepAliveLayer::new();
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
/// let drain = Drain::new();
/// let mut shutdown = std::pin::pin!(tokio::signal::ctrl_c());
/// loop {
///     let (io, _) = tokio::select! {
///         accepted = listener.accept() => accepted?,
///         _ = &mut shutdown => break,
///     };
///     let handle = keep_alive.connection();
///     let svc = ServiceBuilder::new()
///         .layer(keep_alive.bind(handle.clone()))
///         .service_fn(|_req: http::Request<hyper::body::Incoming>| async {
///             Ok::<_, std::convert::Infallible>(http::Response::new(String::from("hello")))
///         });
///     let watcher = drain.watcher();
///     tokio::spawn(async move {
///         let builder = auto::Builder::new(TokioExecutor::new());
///         let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), TowerToHyperService::new(svc));
///         let reason = watcher.drive(handle, conn).await;
///         println!("connection closed: {reason}");
///     });
/// }
/// drain.drain(Some(Duration::from_secs(30))).await;
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct Drain {
    tx: watch::Sender<ServerSignal>,
    /// Watchers alive. Not the channel's receiver count: a connection's lifecycle holds receivers of
    /// its own while it runs.
    live: Arc<AtomicUsize>,
}

impl Default for Drain {
    fn default() -> Self {
        Self::new()
    }
}

impl Drain {
    /// A drain signal with no connections yet.
    ///
    /// ```
    /// let drain = tower_keepalive::serve::Drain::new();
    /// assert_eq!(drain.connections(), 0);
    /// ```
    pub fn new() -> Self {
        Drain {
            tx: watch::channel(ServerSignal {
                drain: DrainState::Serving,
                pressure: 0,
            })
            .0,
            live: Arc::default(),
        }
    }

    /// A watcher for one new connection; it counts as live until its [`DrainWatcher::drive`] future ends
    /// (or the watcher is dropped).
    ///
    /// ```
    /// let drain = tower_keepalive::serve::Drain::new();
    /// let watcher = drain.watcher();
    /// assert_eq!(drain.connections(), 1);
    /// drop(watcher);
    /// assert_eq!(drain.connections(), 0);
    /// ```
    pub fn watcher(&self) -> DrainWatcher {
        self.live.fetch_add(1, Ordering::Relaxed);
        DrainWatcher {
            rx: self.tx.subscribe(),
            live: self.live.clone(),
        }
    }

    /// A sender of connection-pressure updates to every watched connection.
    pub(crate) fn pressure_sender(&self) -> PressureSender {
        PressureSender {
            tx: self.tx.clone(),
        }
    }

    /// The connections being watched.
    ///
    /// ```
    /// assert_eq!(tower_keepalive::serve::Drain::new().connections(), 0);
    /// ```
    pub fn connections(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }

    /// Drains: no connection is kept alive any more. Idle connections close at once; requests in flight
    /// finish, their HTTP/1 responses say `Connection: close`, HTTP/2 connections get GOAWAY. Returns when
    /// every watched connection is gone, or once `deadline` has passed, after dropping the connections
    /// still open. Returns the number of connections so dropped.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let drain = tower_keepalive::serve::Drain::new();
    /// assert_eq!(drain.drain(None).await, 0);
    /// # }
    /// ```
    pub async fn drain(self, deadline: Option<Duration>) -> usize {
        self.tx.send_modify(|s| s.drain = DrainState::Draining);
        let Some(deadline) = deadline else {
            self.tx.closed().await;
            return 0;
        };
        if tokio::time::timeout(deadline, self.tx.closed())
            .await
            .is_ok()
        {
            return 0;
        }
        let left = self.connections();
        tracing::debug!(
            connections = left,
            "drain deadline passed; dropping connections"
        );
        self.tx.send_modify(|s| s.drain = DrainState::Abort);
        self.tx.closed().await;
        left
    }
}

/// Tells every watched connection that the server's connection pressure changed: their idle limits
/// shrink or grow with it.
pub(crate) struct PressureSender {
    tx: watch::Sender<ServerSignal>,
}

impl PressureSender {
    pub(crate) fn set(&self, level: u32) {
        self.tx.send_if_modified(|s| {
            let changed = s.pressure != level;
            s.pressure = level;
            changed
        });
    }
}

/// One connection's view of a [`Drain`]. See [`Drain::watcher`].
///
/// ```
/// let drain = tower_keepalive::serve::Drain::new();
/// let watcher: tower_keepalive::serve::DrainWatcher = drain.watcher();
/// ```
#[derive(Debug)]
pub struct DrainWatcher {
    rx: watch::Receiver<ServerSignal>,
    live: Arc<AtomicUsize>,
}

impl Drop for DrainWatcher {
    fn drop(&mut self) {
        self.live.fetch_sub(1, Ordering::Relaxed);
    }
}

impl DrainWatcher {
    /// Drives `conn` through its lifecycle (see [`ConnectionHandle::drive`]) and closes it gracefully
    /// when the server drains. Resolves with the reason the connection closed.
    ///
    /// ```no_run
    /// # async fn f(conn: impl tower_keepalive::serve::GracefulConnection) {
    /// let layer = tower_keepalive::KeepAliveLayer::new();
    /// let drain = tower_keepalive::serve::Drain::new();
    /// let reason = drain.watcher().drive(layer.connection(), conn).await;
    /// # }
    /// ```
    pub fn drive<C: GracefulConnection>(
        self,
        handle: ConnectionHandle,
        conn: C,
    ) -> impl Future<Output = CloseReason> {
        // On the heap, once: an `async fn` would keep the connection it is given and its pinned copy.
        let mut conn = Box::pin(conn);
        async move { self.drive_pinned(&handle, conn.as_mut()).await }
    }

    /// As [`drive`](Self::drive), with the connection pinned by the caller (stored once, not moved into
    /// each future on the way) and the watcher left counting until the caller drops it: the serve path
    /// reports the close first.
    pub(crate) async fn drive_pinned<C: GracefulConnection>(
        &self,
        handle: &ConnectionHandle,
        conn: Pin<&mut C>,
    ) -> CloseReason {
        lifecycle(handle, conn, Some(self.rx.clone())).await
    }
}

impl ConnectionHandle {
    /// Drives `conn`, the hyper connection this handle was made for, through its lifecycle, and resolves
    /// with the reason it closed:
    ///
    /// - idle timeout: once nothing has been in flight for the idle timeout, the connection is closed
    ///   (HTTP/1 at once, HTTP/2 with GOAWAY); a connection that never sends a request is closed after
    ///   the timeout too, and one that has started a request head but not finished it is dropped shortly
    ///   after;
    /// - maximum age: the connection closes gracefully at its next request boundary;
    /// - a close decided by the layer (HTTP/2 maximum requests) is carried out with GOAWAY.
    ///
    /// One timer per connection; nothing runs while the connection is idle but that timer, and waking
    /// the connection for its requests takes no lock. A request in flight is never cut. Wrap the
    /// connection's IO in [`WatchedIo`](crate::serve::WatchedIo) so that a response still being written
    /// to a slow client is not taken for idle either.
    ///
    /// ```no_run
    /// # async fn f(conn: impl tower_keepalive::serve::GracefulConnection) {
    /// let layer = tower_keepalive::KeepAliveLayer::new();
    /// let handle = layer.connection();
    /// // ... bind `handle` to the service that `conn` serves ...
    /// let reason = handle.drive(conn).await;
    /// # }
    /// ```
    pub fn drive<C: GracefulConnection>(self, conn: C) -> impl Future<Output = CloseReason> {
        // On the heap, once: an `async fn` would keep the connection it is given and its pinned copy.
        let mut conn = Box::pin(conn);
        async move { lifecycle(&self, conn.as_mut(), None).await }
    }
}

/// The connection's lifecycle. The close is logged when the handle goes, on every path (see
/// `connection.rs`).
async fn lifecycle<C: GracefulConnection>(
    handle: &ConnectionHandle,
    mut conn: Pin<&mut C>,
    server: Option<watch::Receiver<ServerSignal>>,
) -> CloseReason {
    let mut timer = pin!(sleep_until(handle.next_check()));
    let mut shutting_down = false;
    // Once told to close: since when the connection has not been seen writing, to the timer's
    // resolution (writes are counted, not timed).
    let (mut writes_seen, mut wrote_at) = (handle.writes(), Instant::now());

    // A second receiver, only to ask cheaply whether the server said something new.
    let mut seen = server.clone();
    // A connection accepted while the server was already draining.
    let draining = seen
        .as_mut()
        .is_some_and(|rx| rx.borrow_and_update().drain != DrainState::Serving);
    if draining {
        // Picked up by the close branch: a graceful close before anything else.
        handle.close(CloseReason::Drain);
    }
    let mut close_requested = pin!(Gated::new(handle.shared.notify.notified()));
    let mut signal = pin!(Gated::new(next_signal(server)));

    loop {
        tokio::select! {
            biased;
            result = conn.as_mut() => return finished(handle, result),
            () = poll_fn(|cx| close_requested.as_mut().poll_if(cx, handle.is_closing())), if !shutting_down => {
                conn.as_mut().graceful_shutdown();
                shutting_down = true;
                (writes_seen, wrote_at) = (handle.writes(), Instant::now());
                timer.as_mut().reset(wrote_at + GRACE);
            }
            (rx, received) = poll_fn(|cx| signal.as_mut().poll_if(cx, has_changed(&seen))) => {
                if let Some(rx) = seen.as_mut() {
                    rx.borrow_and_update();
                }
                let Some(received) = received else {
                    // The server is gone: nothing more will come.
                    signal.set(Gated::new(next_signal(None)));
                    continue;
                };
                signal.set(Gated::new(next_signal(rx)));
                match received.drain {
                    DrainState::Abort => {
                        handle.close(CloseReason::Drain);
                        return handle.close_reason().unwrap_or(CloseReason::Drain);
                    }
                    DrainState::Draining => {
                        handle.close(CloseReason::Drain);
                        if !shutting_down {
                            conn.as_mut().graceful_shutdown();
                            shutting_down = true;
                            (writes_seen, wrote_at) = (handle.writes(), Instant::now());
                            timer.as_mut().reset(wrote_at + GRACE);
                        }
                    }
                    // Connection pressure changed: the idle limit with it.
                    DrainState::Serving if !shutting_down => timer.as_mut().reset(handle.next_check()),
                    DrainState::Serving => {}
                }
            }
            () = timer.as_mut() => {
                let now = Instant::now();
                if shutting_down {
                    // Told to close, nothing in flight and nothing written for the grace period, still
                    // open: a head that never completes. A response hyper is still writing out (to a
                    // full socket, or as HTTP/2 flow control lets it) is not cut.
                    let writes = handle.writes();
                    if writes != writes_seen {
                        (writes_seen, wrote_at) = (writes, now);
                    }
                    let quiet_since = handle.idle_since().map(|idle| Instant::from_std(idle).max(wrote_at));
                    if quiet_since.is_some_and(|since| since + grace(handle) <= now) {
                        tracing::debug!("connection did not close within the grace period; dropping it");
                        return handle.close_reason().unwrap_or(CloseReason::Idle);
                    }
                    timer.as_mut().reset(now + GRACE);
                    continue;
                }
                if let Some(reason) = handle.due(now.into_std()) {
                    // Wakes the close branch on the next turn.
                    handle.close(reason);
                }
                if handle.is_closing() {
                    // Closing, maybe for an earlier reason the protocol has not carried out (a response
                    // still streaming, an HTTP/2 connection): once idle, close it ourselves. A deadline
                    // already past must not re-arm the timer, or it would fire again at once, and again.
                    if handle.in_flight() == 0 {
                        handle.shared.notify.notify_one();
                    }
                    timer.as_mut().reset(handle.next_check().max(now + CLOSING_RECHECK));
                } else {
                    timer.as_mut().reset(handle.next_check());
                }
            }
        }
    }
}

/// How often the timer looks again at a connection that is closing but still busy.
const CLOSING_RECHECK: Duration = Duration::from_millis(100);

fn has_changed(seen: &Option<watch::Receiver<ServerSignal>>) -> bool {
    seen.as_ref()
        .is_some_and(|rx| rx.has_changed().unwrap_or(false))
}

/// The server's next signal, with the receiver back for the one after; `None` once the server is gone.
async fn next_signal(
    rx: Option<watch::Receiver<ServerSignal>>,
) -> (Option<watch::Receiver<ServerSignal>>, Option<ServerSignal>) {
    let Some(mut rx) = rx else {
        return std::future::pending().await;
    };
    if rx.changed().await.is_err() {
        return (None, None);
    }
    let signal = *rx.borrow_and_update();
    (Some(rx), Some(signal))
}

pin_project! {
    /// A future polled only when it may be ready, or when the task's waker changed. Its last poll
    /// registered a waker that still wakes the task; polling it again on every wake-up of the connection
    /// would take the lock of a tokio `Notify` (shared by all connections, for the server's signal) for
    /// nothing.
    struct Gated<F> {
        #[pin]
        inner: F,
        waker: Option<Waker>,
    }
}

impl<F: Future> Gated<F> {
    fn new(inner: F) -> Self {
        Gated { inner, waker: None }
    }

    fn poll_if(self: Pin<&mut Self>, cx: &mut Context<'_>, maybe_ready: bool) -> Poll<F::Output> {
        let this = self.project();
        let registered = this.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker()));
        if registered && !maybe_ready {
            return Poll::Pending;
        }
        if !registered {
            *this.waker = Some(cx.waker().clone());
        }
        this.inner.poll(cx)
    }
}

fn finished<E: Into<BoxError>>(handle: &ConnectionHandle, result: Result<(), E>) -> CloseReason {
    match result {
        Ok(()) => handle.mark_closing(CloseReason::ClientClosed),
        Err(err) => {
            let err = err.into();
            tracing::debug!(error = %err, "connection error");
            handle.mark_closing(CloseReason::Error);
        }
    }
    handle.close_reason().unwrap_or(CloseReason::ClientClosed)
}
