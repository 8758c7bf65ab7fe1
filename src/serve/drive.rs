//! Driving one connection through its lifecycle: idle timeout, maximum age, graceful close, drain.

use std::collections::BinaryHeap;
use std::future::Future;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use pin_project_lite::pin_project;
use tokio::sync::Notify;
use tokio::time::Sleep;

use crate::clock;
use crate::connection::Shared;
use crate::{CloseReason, ConnectionHandle};

/// A connection future that can be told to close gracefully: hyper's HTTP/1 and HTTP/2 connections and
/// hyper-util's auto connections, as hyper-util's `GracefulShutdown` watches them (the trait is sealed:
/// those are the connections [`ConnectionHandle::drive`] and [`DrainWatcher::drive`] take).
pub use hyper_util::server::graceful::GracefulConnection;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How long a connection that was told to close gracefully, and has nothing in flight, may take to go.
/// Past it the connection is dropped: this is what ends a client that never finishes its request head
/// (hyper waits for a started head before it honours a graceful shutdown).
const GRACE: Duration = Duration::from_secs(1);

/// The same for an HTTP/2 connection that has carried a request, without a send timeout: a finished
/// response may still sit in h2's buffers until the client's flow control lets it out, with nothing to
/// show for it (nginx's default `send_timeout`). A drain deadline cuts sooner.
const GRACE_HTTP2: Duration = Duration::from_secs(60);

/// The grace period of a connection closing gracefully with nothing in flight. It runs from the later
/// of the close's start and the end of the last response, and nothing the client makes the server
/// write pushes it on: a client that sends PINGs and never acknowledges the server's (which hyper's
/// graceful HTTP/2 close waits for) is dropped at its end. HTTP/2 connections that carried a request
/// get the send timeout, for the response data h2 may still hold (see [`GRACE_HTTP2`]); the others have
/// nothing left to send, and get [`GRACE`].
fn grace(handle: &ConnectionHandle) -> Duration {
    if handle.is_http2() {
        handle.config().send_timeout.unwrap_or(GRACE_HTTP2)
    } else {
        GRACE
    }
}

/// Server-wide drain: tells every watched connection to close gracefully, and waits until they have.
///
/// A `Drain` also keeps the timers of the connections it watches: one task sleeps until the earliest
/// deadline among them (idle timeout, maximum age, grace period) and wakes only the connections whose
/// time has come, so a watched connection carries no timer of its own. Draining costs nothing per
/// request.
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
    timers: Arc<Timers>,
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
            timers: Arc::new(Timers::new()),
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
        self.timers.live.fetch_add(1, Ordering::Relaxed);
        DrainWatcher {
            timers: self.timers.clone(),
        }
    }

    /// Closes the watched connection that holds a slot to least purpose, if any holds one idly: one that
    /// has not finished a request head yet (silent, or dribbling), the oldest first; else the idle
    /// keep-alive connection idle the longest. HTTP/1 connections are dropped at once (nothing is in
    /// flight on them); HTTP/2 ones get GOAWAY. Looks at every connection: for a server at its hard
    /// limit only.
    pub(crate) fn shed_one(&self) -> bool {
        self.timers.shed_one()
    }

    /// The timers, for the lame-duck period that runs before the drain.
    pub(crate) fn timers(&self) -> Arc<Timers> {
        self.timers.clone()
    }

    /// A sender of connection-pressure updates to every watched connection.
    pub(crate) fn pressure_sender(&self) -> PressureSender {
        PressureSender {
            timers: self.timers.clone(),
        }
    }

    /// The connections being watched.
    ///
    /// ```
    /// assert_eq!(tower_keepalive::serve::Drain::new().connections(), 0);
    /// ```
    pub fn connections(&self) -> usize {
        self.timers.live.load(Ordering::Acquire)
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
        self.timers.set_state(DrainState::Draining);
        let Some(deadline) = deadline else {
            self.timers.all_gone().await;
            return 0;
        };
        if tokio::time::timeout(deadline, self.timers.all_gone())
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
        self.timers.set_state(DrainState::Abort);
        self.timers.all_gone().await;
        left
    }
}

/// Tells every watched connection that the server's connection pressure changed: their idle limits
/// shrink or grow with it.
pub(crate) struct PressureSender {
    timers: Arc<Timers>,
}

impl PressureSender {
    /// The pressure rose: idle limits shrank, so every deadline moves earlier now. (Limits that grow
    /// need nothing: each deadline is looked at again when it comes, and moved later.)
    pub(crate) fn rose(&self) {
        self.timers.pressure_rose();
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
    timers: Arc<Timers>,
}

impl Drop for DrainWatcher {
    fn drop(&mut self) {
        if self.timers.live.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.timers.gone.notify_waiters();
        }
    }
}

impl DrainWatcher {
    /// Drives `conn` through its lifecycle (see [`ConnectionHandle::drive`]) and closes it gracefully
    /// when the server drains. Resolves with the reason the connection closed. The connection's timer
    /// is the drain's (see [`Drain`]).
    ///
    /// ```no_run
    /// # async fn f(conn: impl tower_keepalive::serve::GracefulConnection<Error = hyper::Error>) {
    /// let layer = tower_keepalive::KeepAliveLayer::new();
    /// let drain = tower_keepalive::serve::Drain::new();
    /// let reason = drain.watcher().drive(layer.connection(), conn).await;
    /// # }
    /// ```
    pub fn drive<C>(self, handle: ConnectionHandle, conn: C) -> impl Future<Output = CloseReason>
    where
        C: GracefulConnection,
        C::Error: Into<BoxError>,
    {
        // On the heap, once: an `async fn` would keep the connection it is given and its pinned copy.
        let mut conn = Box::pin(conn);
        async move { self.drive_pinned(&handle, conn.as_mut()).await }
    }

    /// Hands the connection to the drain's timers before it is driven (during a TLS handshake), so that
    /// its idle timeout, the budget's shedding and a drain reach it as they reach a connection that has
    /// not sent a request yet: each decides a close through the handle, which wakes its task.
    #[cfg(feature = "tls")]
    pub(crate) fn watch_undriven(&self, handle: &ConnectionHandle) {
        self.timers.start(handle);
    }

    /// As [`drive`](Self::drive), with the connection pinned by the caller (stored once, not moved into
    /// each future on the way) and the watcher left counting until the caller drops it: the serve path
    /// reports the close first.
    pub(crate) fn drive_pinned<'a, C>(
        &'a self,
        handle: &'a ConnectionHandle,
        conn: Pin<&'a mut C>,
    ) -> Lifecycle<'a, C, &'a Arc<Timers>> {
        Lifecycle::new(handle, conn, &self.timers)
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
    /// - maximum age: HTTP/1 closes after a response that says `close` (the first one with less than a
    ///   second left before the maximum age, or the next one if busy then), or, idle, once the timeout
    ///   its last response advertised has run out; HTTP/2 gets GOAWAY;
    /// - a close decided by the layer (HTTP/2 maximum requests) or with [`close`](Self::close) is
    ///   carried out (HTTP/2: GOAWAY); one not done within its grace period (1 s with nothing in
    ///   flight; for HTTP/2 after a request, the send timeout) is dropped, whatever PINGs the client
    ///   sends;
    /// - send timeout ([`KeepAliveLayer::send_timeout`](crate::KeepAliveLayer::send_timeout)): output
    ///   waiting with none of it going out for that long (a client that does not read, HTTP/2 streams
    ///   on a shut window) drops the connection ([`CloseReason::SendTimeout`]); needs the IO wrapped in
    ///   [`WatchedIo`](crate::serve::WatchedIo) for HTTP/1.
    ///
    /// One timer per connection; nothing runs while the connection is idle but that timer, and waking
    /// the connection for its requests takes no lock. A request in flight is never cut. Wrap the
    /// connection's IO in [`WatchedIo`](crate::serve::WatchedIo) so that a response still being written
    /// to a slow client is not taken for idle either, and so that the connection ends with a lingering
    /// close (RFC 9112 section 9.6), which this lifecycle lets run its course. Here the IO does not
    /// learn whether a request has a body, so it does not hold back a client's half-close: turn on
    /// hyper's `http1().half_close(true)` to answer such clients. Connections watched by a
    /// [`Drain`] share its timer instead ([`DrainWatcher::drive`]).
    ///
    /// ```no_run
    /// # async fn f(conn: impl tower_keepalive::serve::GracefulConnection<Error = hyper::Error>) {
    /// let layer = tower_keepalive::KeepAliveLayer::new();
    /// let handle = layer.connection();
    /// // ... bind `handle` to the service that `conn` serves ...
    /// let reason = handle.drive(conn).await;
    /// # }
    /// ```
    pub fn drive<C>(self, conn: C) -> impl Future<Output = CloseReason>
    where
        C: GracefulConnection,
        C::Error: Into<BoxError>,
    {
        // On the heap, once: an `async fn` would keep the connection it is given and its pinned copy.
        let mut conn = Box::pin(conn);
        async move {
            let timer = OwnTimer {
                sleep: tokio::time::sleep_until(self.next_check().into()),
            };
            Lifecycle::new(&self, conn.as_mut(), timer).await
        }
    }
}

/// How often the timer looks again at a connection that is closing but still busy.
const CLOSING_RECHECK: Duration = Duration::from_millis(100);

/// What the connection's timer does when its time comes: drops it if its output has waited for the send
/// timeout with none of it going out; closes it if it is due (idle, too old); drops it if it was told to
/// close and has stayed idle for its grace period; and says when to look again (`None`: never, it is
/// being dropped).
fn check(handle: &ConnectionHandle, now: Instant) -> Option<Instant> {
    if !handle.wants_timer() {
        return None;
    }
    if past_max_age_grace(handle, now) {
        tracing::debug!("streams still open past the maximum age and its grace; closing hard");
        handle.drop_now();
        return None;
    }
    // The send timeout, busy or closing alike: output waiting, none of it going out.
    let mut send_due = None;
    if let Some(timeout) = handle.config().send_timeout {
        if let Some(since) = handle.output_stalled_since(now) {
            if since + timeout <= now {
                tracing::debug!(
                    "no progress writing the response within the send timeout; dropping"
                );
                handle.close(CloseReason::SendTimeout);
                handle.drop_now();
                return None;
            }
            send_due = Some(since + timeout);
        }
    }
    let next = check_lifecycle(handle, now)?;
    Some(send_due.map_or(next, |due| next.min(due)))
}

/// The rest of [`check`]: idle timeout, maximum age, header timeout, grace period.
fn check_lifecycle(handle: &ConnectionHandle, now: Instant) -> Option<Instant> {
    if handle.in_grace() {
        if handle.is_lingering() {
            // Closed for writing and reading what the client still sends, so that the kernel does not
            // reset the connection under responses the client has not read: that ends within its own
            // bounds (`serve::watched`). A drain's deadline still drops it.
            return Some(now + GRACE);
        }
        // Told to close, nothing in flight for the grace period, still open: a head that never
        // completes, a client that never acknowledges the PING of hyper's graceful HTTP/2 close. A
        // response hyper is still writing out (to a full socket, or as HTTP/2 flow control lets it)
        // is not cut here: the send timeout is for that.
        let quiet = handle.quiet_since(now);
        if quiet.is_some_and(|since| since + grace(handle) <= now) {
            tracing::debug!("connection did not close within the grace period; dropping it");
            handle.drop_now();
            return None;
        }
        return Some(
            max_age_grace_end(handle).map_or(now + GRACE, |end| end.clamp(now, now + GRACE)),
        );
    }
    match handle.due(now) {
        // HTTP/1 past its maximum age closes on a response that says `close`, or once idle and its last
        // advert has run out (below): asking the driver now would close it right after a response that
        // went out with keep-alive before the maximum age.
        Some(CloseReason::MaxAge) if !handle.is_http2() => handle.mark_closing(CloseReason::MaxAge),
        // hyper waits for a started head before it honours a graceful shutdown, and there is no
        // request to lose: the connection is dropped, as hyper's own header timeout does.
        Some(CloseReason::HeaderTimeout) => {
            tracing::debug!("request head not complete within the header timeout; dropping");
            handle.close(CloseReason::HeaderTimeout);
            handle.drop_now();
            return None;
        }
        Some(reason) => {
            handle.close(reason);
        }
        None => {}
    }
    if handle.is_closing() {
        // Closing, maybe for a reason the protocol has not carried out (a response still streaming, an
        // HTTP/2 connection): once idle, the driver closes it. A deadline already past must not be
        // kept, or the timer would fire again at once, and again.
        if handle.in_flight() == 0 && handle.may_close_idle(now) {
            handle.request_driver();
        }
        Some(handle.next_check().max(now + CLOSING_RECHECK))
    } else {
        Some(handle.next_check().max(now))
    }
}

/// Whether the connection is closing for its maximum age, still has something in flight (or a graceful
/// close that has not ended), and its grace period after the maximum age has run out: it is cut.
/// A closing connection is looked at every [`CLOSING_RECHECK`], so the cut comes that soon after.
fn past_max_age_grace(handle: &ConnectionHandle, now: Instant) -> bool {
    max_age_grace_end(handle).is_some_and(|end| end <= now)
        && (handle.in_flight() != 0 || handle.in_grace())
}

/// When the grace period after the connection's maximum age ends, if it has one and is closing for it.
fn max_age_grace_end(handle: &ConnectionHandle) -> Option<Instant> {
    let grace = handle.config().max_age_grace?;
    if handle.close_reason() != Some(CloseReason::MaxAge) {
        return None;
    }
    Some(handle.max_age_at()? + grace)
}

/// Where a connection's lifecycle gets its timer from.
pub(crate) trait Timer {
    /// The connection starts to be driven.
    fn start(self: Pin<&mut Self>, handle: &ConnectionHandle);
    /// Look at the connection again no later than `at`.
    fn schedule(self: Pin<&mut Self>, handle: &ConnectionHandle, at: Instant);
    /// Ready when the timer has looked at the connection (its flags may have changed).
    fn poll_check(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        handle: &ConnectionHandle,
    ) -> Poll<()>;
}

pin_project! {
    /// A timer of the connection's own: for [`ConnectionHandle::drive`].
    pub(crate) struct OwnTimer {
        #[pin]
        sleep: Sleep,
    }
}

impl Timer for OwnTimer {
    fn start(self: Pin<&mut Self>, _: &ConnectionHandle) {}

    fn schedule(self: Pin<&mut Self>, _: &ConnectionHandle, at: Instant) {
        self.project().sleep.reset(at.into());
    }

    fn poll_check(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        handle: &ConnectionHandle,
    ) -> Poll<()> {
        let mut sleep = self.project().sleep;
        if sleep.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        if let Some(at) = check(handle, Instant::now()) {
            sleep.reset(at.into());
        }
        Poll::Ready(())
    }
}

impl Timer for &Arc<Timers> {
    fn start(self: Pin<&mut Self>, handle: &ConnectionHandle) {
        Timers::start(self.get_mut(), handle);
    }

    fn schedule(self: Pin<&mut Self>, handle: &ConnectionHandle, at: Instant) {
        let mut heap = self.lock();
        self.push(&mut heap, handle, clock::ns_of(at));
    }

    fn poll_check(self: Pin<&mut Self>, _: &mut Context<'_>, _: &ConnectionHandle) -> Poll<()> {
        // The timers' task looks at the connection and wakes it through its flags.
        Poll::Pending
    }
}

pin_project! {
    /// One connection's lifecycle: drives the hyper connection, and carries out what its handle's flags
    /// say (close gracefully, drop now) when its timer, the layer or the server set them.
    pub(crate) struct Lifecycle<'a, C, T> {
        conn: Pin<&'a mut C>,
        handle: &'a ConnectionHandle,
        #[pin]
        timer: T,
        // The waker registered with the handle; a flag's wake-up takes it.
        waker: Option<Waker>,
        started: bool,
        shutting_down: bool,
    }

    impl<'a, C, T> PinnedDrop for Lifecycle<'a, C, T> {
        fn drop(this: Pin<&mut Self>) {
            // Ended or given up: the connection's timer lets it go (an upgraded connection's handle
            // lives on in its IO, and must not be looked at for as long as the upgrade runs).
            this.handle.mark_undriven();
        }
    }
}

impl<'a, C, T> Lifecycle<'a, C, T> {
    fn new(handle: &'a ConnectionHandle, conn: Pin<&'a mut C>, timer: T) -> Self {
        Lifecycle {
            conn,
            handle,
            timer,
            waker: None,
            started: false,
            shutting_down: false,
        }
    }
}

impl<C, T> Future for Lifecycle<'_, C, T>
where
    C: GracefulConnection,
    C::Error: Into<BoxError>,
    T: Timer,
{
    type Output = CloseReason;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<CloseReason> {
        let mut this = self.project();
        let handle = *this.handle;
        if !*this.started {
            *this.started = true;
            this.timer.as_mut().start(handle);
        }
        loop {
            if let Poll::Ready(result) = this.conn.as_mut().poll(cx) {
                let reason = finished(handle, result);
                handle.mark_undriven();
                // An upgraded connection is still open: it is counted closed when the last clone of its
                // handle goes, with the upgraded IO that keeps one.
                if reason != CloseReason::Upgraded {
                    handle.report_closed(reason);
                }
                return Poll::Ready(reason);
            }
            // Registered before the flags are read: a flag set after this read wakes the task.
            if !this.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                handle.register_driver(cx.waker());
                *this.waker = Some(cx.waker().clone());
            }
            let (requested, drop_now) = handle.driver_flags();
            if drop_now {
                handle.mark_undriven();
                let reason = handle.close_reason().unwrap_or(CloseReason::Idle);
                handle.report_closed(reason);
                return Poll::Ready(reason);
            }
            if requested && !*this.shutting_down {
                this.conn.as_mut().graceful_shutdown();
                *this.shutting_down = true;
                let now = Instant::now();
                handle.start_grace(clock::ns_of(now));
                this.timer.as_mut().schedule(handle, now + GRACE);
                // The wake-up for this flag took the registration: register again for the next one.
                *this.waker = None;
                continue;
            }
            match this.timer.as_mut().poll_check(cx, handle) {
                Poll::Ready(()) => continue,
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum DrainState {
    Serving,
    /// Shutting down, still accepting: connections that have served a request close now if idle, after
    /// their in-flight work if busy; new ones are served, then closed (see `pending_close`).
    LameDuck,
    /// Keep nothing alive: idle connections close now, busy ones after their in-flight work.
    Draining,
    /// The drain deadline passed: drop what is left.
    Abort,
}

/// The timers of a [`Drain`]'s connections: a heap of deadlines, one task sleeping until the earliest.
///
/// Each connection has one current entry (its handle's `scheduled_ns` says which); entries left behind
/// by an earlier schedule, or by a connection that has gone, are dropped when they come up, or all at
/// once when they outnumber the live ones. The heap's lock is taken when a connection starts, when its
/// time comes and when it begins to close: never for a request.
#[derive(Debug)]
pub(crate) struct Timers {
    heap: Mutex<Heap>,
    /// Wakes the timers' task: an entry earlier than it sleeps, a drain, a pressure rise, the end.
    wake: Arc<Notify>,
    running: AtomicBool,
    /// Connections watched and alive (drain watchers, or the axum path's IOs).
    pub(crate) live: AtomicUsize,
    /// Told when `live` drops to zero.
    gone: Notify,
}

#[derive(Debug)]
struct Heap {
    entries: BinaryHeap<Entry>,
    /// When the task wakes next, a `clock` reading (`u64::MAX`: when told).
    wakes_at: u64,
    state: DrainState,
    /// Connection pressure rose: every deadline must be computed again.
    recompute: bool,
    /// Until when (a `clock` reading; 0: not at all) a drain that follows a lame-duck period leaves
    /// a connection that has not sent its first request to send it (see [`FIRST_REQUEST_GRACE`]).
    first_request_until: u64,
    /// Whether the lame-duck period leaves idle HTTP/1 connections [`LAME_DUCK_IDLE_GRACE`] before it
    /// closes them: only where the connection is driven (the serve path); the `axum::serve` path ends
    /// a connection told to close on its next read, which would lose the request it reads.
    idle_grace: bool,
}

/// How long a drain that follows a lame-duck period leaves a connection accepted but silent, that has
/// not sent its first request yet, to send it. Behind a balancer such a connection was opened to send
/// a request at once, and the request may be on its way, or in the socket and not read yet: closing
/// the connection now would lose it (a balancer does not retry a non-idempotent request it has sent).
/// It is served, and its response says `Connection: close`; a connection still silent after this is
/// closed. A second covers a round trip on any network a balancer sits on, with room for a loaded host.
pub(crate) const FIRST_REQUEST_GRACE: Duration = Duration::from_secs(1);

/// How long after the lame-duck period begins an HTTP/1 connection idle then is closed, if it is still
/// idle. Not at once: a balancer picks its most recently used connection for its next request, which
/// may be on its way at that moment, and closing the connection under it loses it (a balancer does
/// not retry a non-idempotent request it has sent). Within this second such a request arrives, and is
/// answered with `Connection: close`; a balancer sending steadily uses up its idle connections so, each
/// closing cleanly after its response. Those it has not needed for this long are closed.
pub(crate) const LAME_DUCK_IDLE_GRACE: Duration = Duration::from_secs(1);

#[derive(Debug)]
struct Entry {
    at: u64,
    conn: Weak<Shared>,
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        self.at == other.at
    }
}

impl Eq for Entry {}

impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Entry {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        // The earliest first: `BinaryHeap` is a max-heap.
        other.at.cmp(&self.at)
    }
}

impl Entry {
    /// The entry's connection, if it is still open and this is its current entry.
    fn current(&self) -> Option<ConnectionHandle> {
        let shared = self.conn.upgrade()?;
        (shared.scheduled_ns.load(Ordering::Relaxed) == self.at)
            .then_some(ConnectionHandle { shared })
    }
}

/// Whether the drain spares `handle` for [`FIRST_REQUEST_GRACE`]: it follows a lame-duck period, the
/// grace has not run out, and the connection has not served a request nor been told to close. Its
/// close is decided then (its first response says `close`), and carried out when its grace ends.
fn spare_first_request(heap: &Heap, handle: &ConnectionHandle) -> bool {
    if heap.first_request_until <= clock::now_ns() || handle.requests() != 0 || handle.is_closing()
    {
        return false;
    }
    handle.mark_closing(CloseReason::Drain);
    true
}

/// Heap entries beyond this many, and beyond twice the live connections, are compacted.
const COMPACT_ABOVE: usize = 1024;

impl Timers {
    pub(crate) fn new() -> Self {
        Timers {
            heap: Mutex::new(Heap {
                entries: BinaryHeap::new(),
                wakes_at: u64::MAX,
                state: DrainState::Serving,
                recompute: false,
                first_request_until: 0,
                idle_grace: false,
            }),
            wake: Arc::new(Notify::new()),
            running: AtomicBool::new(false),
            live: AtomicUsize::new(0),
            gone: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Heap> {
        // Entries are pushed and popped whole: a panic elsewhere leaves the heap consistent.
        self.heap.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A connection starts: its first deadline, or its close if the server is draining.
    pub(crate) fn start(self: &Arc<Self>, handle: &ConnectionHandle) {
        if !self.running.swap(true, Ordering::AcqRel) {
            tokio::spawn(run(Arc::downgrade(self), self.wake.clone()));
        }
        let mut heap = self.lock();
        match heap.state {
            DrainState::Serving | DrainState::LameDuck => {}
            DrainState::Draining if spare_first_request(&heap, handle) => {
                let at = heap.first_request_until;
                self.push(&mut heap, handle, at);
                return;
            }
            DrainState::Draining => {
                handle.close(CloseReason::Drain);
            }
            DrainState::Abort => {
                handle.close(CloseReason::Drain);
                handle.drop_now();
                return;
            }
        }
        let at = clock::ns_of(handle.next_check());
        self.push(&mut heap, handle, at);
    }

    fn push(&self, heap: &mut Heap, handle: &ConnectionHandle, at: u64) {
        handle.shared.scheduled_ns.store(at, Ordering::Relaxed);
        let live = self.live.load(Ordering::Relaxed);
        if heap.entries.len() > COMPACT_ABOVE.max(live.saturating_mul(2)) {
            heap.entries.retain(|entry| entry.current().is_some());
        }
        heap.entries.push(Entry {
            at,
            conn: Arc::downgrade(&handle.shared),
        });
        if at < heap.wakes_at {
            heap.wakes_at = at;
            self.wake.notify_one();
        }
    }

    fn set_state(&self, state: DrainState) {
        let mut heap = self.lock();
        if matches!(
            (heap.state, state),
            (DrainState::LameDuck, DrainState::Draining)
        ) {
            heap.first_request_until = clock::ns_of(Instant::now() + FIRST_REQUEST_GRACE);
        }
        heap.state = state;
        let mut spared = Vec::new();
        let mut idle = Vec::new();
        for entry in heap.entries.iter() {
            let Some(shared) = entry.conn.upgrade() else {
                continue;
            };
            let handle = ConnectionHandle { shared };
            match state {
                DrainState::Serving => {}
                // One that has not served a request may be a balancer's with its first request on the
                // way: closing it now could lose that request. It is served, then closed.
                DrainState::LameDuck if handle.requests() == 0 => {}
                // Its next response says `close`; closed if still idle once the grace is over.
                DrainState::LameDuck
                    if heap.idle_grace
                        && !handle.is_http2()
                        && !handle.is_closing()
                        && handle.idle_since().is_some() =>
                {
                    handle.mark_closing(CloseReason::LameDuck);
                    idle.push(handle);
                }
                DrainState::LameDuck => {
                    handle.close(CloseReason::LameDuck);
                }
                DrainState::Draining if spare_first_request(&heap, &handle) => {
                    spared.push(handle);
                }
                DrainState::Draining => {
                    // One the lame-duck period left to its next response is closed now too.
                    if !handle.close(CloseReason::Drain) && handle.requests() != 0 {
                        handle.request_driver();
                    }
                }
                DrainState::Abort => {
                    handle.close(CloseReason::Drain);
                    handle.drop_now();
                }
            }
        }
        // Looked at again when their grace ends: closed then if still idle (`check`).
        let at = heap.first_request_until;
        for handle in spared {
            self.push(&mut heap, &handle, at);
        }
        let at = clock::ns_of(Instant::now() + LAME_DUCK_IDLE_GRACE);
        for handle in idle {
            self.push(&mut heap, &handle, at);
        }
    }

    /// The lame-duck period begins: no connection that has served a request is kept alive (see
    /// `DrainState::LameDuck`). With `idle_grace` (the serve path), an idle HTTP/1 connection is left
    /// [`LAME_DUCK_IDLE_GRACE`] for a request on its way, instead of being closed at once.
    pub(crate) fn begin_lame_duck(&self, idle_grace: bool) {
        self.lock().idle_grace = idle_grace;
        self.set_state(DrainState::LameDuck);
    }

    /// The drain begins, without waiting for it (the axum path, where axum waits).
    #[cfg(feature = "axum")]
    pub(crate) fn begin_drain(&self) {
        self.set_state(DrainState::Draining);
    }

    fn pressure_rose(&self) {
        self.lock().recompute = true;
        self.wake.notify_one();
    }

    /// Looks at every connection whose time has come; returns when to look next.
    fn tick(&self) -> Option<Instant> {
        let now = Instant::now();
        let now_ns = clock::ns_of(now);
        let mut heap = self.lock();
        if std::mem::take(&mut heap.recompute) {
            let mut entries = std::mem::take(&mut heap.entries).into_vec();
            entries.retain_mut(|entry| {
                let Some(handle) = entry.current() else {
                    return false;
                };
                // A closing connection is looked at often enough; one spared by the drain must not be
                // looked at before its grace ends.
                if !handle.in_grace() && !handle.is_closing() {
                    let at = clock::ns_of(handle.next_check());
                    if at < entry.at {
                        entry.at = at;
                        handle.shared.scheduled_ns.store(at, Ordering::Relaxed);
                    }
                }
                true
            });
            heap.entries = BinaryHeap::from(entries);
        }
        while heap.entries.peek().is_some_and(|entry| entry.at <= now_ns) {
            let Some(entry) = heap.entries.pop() else {
                break;
            };
            let Some(handle) = entry.current() else {
                continue;
            };
            if let Some(next) = check(&handle, now) {
                let at = clock::ns_of(next).max(now_ns + 1);
                handle.shared.scheduled_ns.store(at, Ordering::Relaxed);
                heap.entries.push(Entry {
                    at,
                    conn: entry.conn,
                });
            }
        }
        heap.wakes_at = heap.entries.peek().map_or(u64::MAX, |entry| entry.at);
        (heap.wakes_at != u64::MAX).then(|| clock::instant(heap.wakes_at))
    }

    fn shed_one(&self) -> bool {
        let heap = self.lock();
        // (never served a request, when it was accepted or went idle): the smallest goes first.
        let mut best: Option<((bool, Instant), ConnectionHandle)> = None;
        for entry in heap.entries.iter() {
            let Some(handle) = entry.current() else {
                continue;
            };
            if handle.is_closing() {
                continue;
            }
            let Some(since) = handle.idle_since() else {
                continue;
            };
            let key = (handle.requests() != 0, since);
            if best.as_ref().is_none_or(|(best, _)| key < *best) {
                best = Some((key, handle));
            }
        }
        drop(heap);
        let Some((_, handle)) = best else {
            return false;
        };
        tracing::debug!(
            requests = handle.requests(),
            "at the connection limit: closing an idle connection"
        );
        handle.close(CloseReason::Pressure);
        if !handle.is_http2() {
            handle.drop_now();
        }
        true
    }

    async fn all_gone(&self) {
        loop {
            let mut gone = pin!(self.gone.notified());
            gone.as_mut().enable();
            if self.live.load(Ordering::Acquire) == 0 {
                return;
            }
            gone.await;
        }
    }
}

impl Drop for Timers {
    fn drop(&mut self) {
        // The task holds only a weak reference: it ends now.
        self.wake.notify_one();
    }
}

/// The timers' task: sleeps until the earliest deadline, or until told; ends with its `Timers`.
async fn run(timers: Weak<Timers>, wake: Arc<Notify>) {
    // Dropped with its runtime: the next connection to start spawns the task again.
    struct Running(Weak<Timers>);
    impl Drop for Running {
        fn drop(&mut self) {
            if let Some(timers) = self.0.upgrade() {
                timers.running.store(false, Ordering::Release);
            }
        }
    }
    let _running = Running(timers.clone());
    loop {
        let mut told = pin!(wake.notified());
        told.as_mut().enable();
        let next = match timers.upgrade() {
            Some(timers) => timers.tick(),
            None => return,
        };
        match next {
            Some(at) => {
                tokio::select! {
                    () = tokio::time::sleep_until(at.into()) => {}
                    () = told => {}
                }
            }
            None => told.await,
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::KeepAliveLayer;

    /// Timers watching one connection of `layer`, started.
    fn one_watched(layer: &KeepAliveLayer) -> (Arc<Timers>, ConnectionHandle) {
        let timers = Arc::new(Timers::new());
        let handle = layer.connection();
        timers.live.fetch_add(1, Ordering::Relaxed);
        timers.start(&handle);
        (timers, handle)
    }

    fn entries(timers: &Timers) -> usize {
        timers.lock().entries.len()
    }

    #[tokio::test]
    async fn entries_of_closed_connections_are_compacted() {
        let timers = Arc::new(Timers::new());
        let layer = KeepAliveLayer::new();
        let kept: Vec<ConnectionHandle> = (0..10).map(|_| layer.connection()).collect();
        for handle in &kept {
            timers.live.fetch_add(1, Ordering::Relaxed);
            timers.start(handle);
        }
        // Many short connections come and go: their entries stay behind until compacted.
        for _ in 0..5_000 {
            let handle = layer.connection();
            timers.start(&handle);
        }
        let left = entries(&timers);
        assert!(
            left <= COMPACT_ABOVE + 1,
            "{left} entries for {} live connections",
            kept.len()
        );
        // The live ones are all still there, each with its current entry.
        let heap = timers.lock();
        for handle in &kept {
            let at = handle.shared.scheduled_ns.load(Ordering::Relaxed);
            assert!(heap
                .entries
                .iter()
                .any(|e| e.at == at && e.conn.ptr_eq(&Arc::downgrade(&handle.shared))));
        }
    }

    #[tokio::test]
    async fn rising_pressure_moves_deadlines_earlier() {
        let layer = KeepAliveLayer::new().idle_timeout(Duration::from_secs(60));
        let (timers, handle) = one_watched(&layer);
        let before = handle.shared.scheduled_ns.load(Ordering::Relaxed);
        layer
            .config
            .stats
            .set_pressure(crate::stats::PRESSURE_STEPS);
        timers.pressure_rose();
        let next = timers.tick().expect("a deadline");
        let after = handle.shared.scheduled_ns.load(Ordering::Relaxed);
        assert!(after < before, "{after} !< {before}");
        // At the hard limit the idle limit is 1/16 of the timeout: under four seconds from now.
        assert!(next <= Instant::now() + Duration::from_secs(4));
    }

    #[tokio::test]
    async fn a_due_connection_is_asked_to_close_and_dropped_after_its_grace() {
        let layer = KeepAliveLayer::new().idle_timeout(Duration::from_millis(1));
        let (timers, handle) = one_watched(&layer);
        tokio::time::sleep(Duration::from_millis(5)).await;
        timers.tick();
        assert_eq!(handle.close_reason(), Some(CloseReason::Idle));
        assert_eq!(handle.driver_flags(), (true, false));
        // The driver begins its graceful close, and the connection never goes: dropped after the
        // grace period, not before (times in the future stand for the timer firing later).
        let began = Instant::now();
        handle.start_grace(clock::ns_of(began));
        assert!(check(&handle, began + GRACE / 2).is_some());
        assert_eq!(handle.driver_flags(), (true, false));
        assert_eq!(check(&handle, began + GRACE), None);
        assert_eq!(handle.driver_flags(), (true, true));
    }

    #[tokio::test]
    async fn writes_do_not_extend_the_grace_of_an_idle_connection() {
        let layer = KeepAliveLayer::new().idle_timeout(Duration::from_millis(1));
        let (timers, handle) = one_watched(&layer);
        tokio::time::sleep(Duration::from_millis(5)).await;
        timers.tick();
        let began = Instant::now();
        handle.start_grace(clock::ns_of(began));
        // PING acknowledgements, say: the server writes, the client sends nothing else.
        for step in 1..4 {
            handle.note_write(false);
            assert!(check(&handle, began + GRACE * step / 4).is_some());
        }
        handle.note_write(false);
        assert_eq!(check(&handle, began + GRACE), None);
        assert_eq!(handle.driver_flags(), (true, true));
    }

    #[tokio::test]
    async fn output_that_waits_past_the_send_timeout_is_dropped_and_progress_restarts_it() {
        let send = Duration::from_secs(2);
        let layer = KeepAliveLayer::new().send_timeout(send);
        let handle = layer.connection();
        handle.mark_http2();
        let (_, _in_flight) = handle.start_request();
        let at = Instant::now();
        // In flight, nothing waiting (a handler at work): never a send timeout.
        assert!(check(&handle, at).is_some());
        assert!(check(&handle, at + 10 * send).is_some());
        assert_eq!(handle.close_reason(), None);
        // A body whose stream window is shut: hyper does not poll it.
        handle.body_waiting();
        let at = at + 10 * send;
        assert!(check(&handle, at).is_some());
        // Polled again before the send timeout (the window opened), then stuck again.
        handle.body_done_waiting(true);
        handle.body_waiting();
        assert!(check(&handle, at + send * 3 / 4).is_some());
        // A write through a socket that was not full is no progress on HTTP/2 (a PING ack).
        handle.note_write(false);
        assert!(check(&handle, at + send * 3 / 2).is_some());
        assert_eq!(handle.close_reason(), None);
        // Stuck since the poll at 3/4: cut one send timeout later.
        assert_eq!(check(&handle, at + send * 7 / 4), None);
        assert_eq!(handle.close_reason(), Some(CloseReason::SendTimeout));
        assert_eq!(handle.driver_flags(), (true, true));
    }

    #[tokio::test]
    async fn a_lingering_connection_is_not_dropped_at_the_end_of_its_grace() {
        let layer = KeepAliveLayer::new().idle_timeout(Duration::from_millis(1));
        let (timers, handle) = one_watched(&layer);
        tokio::time::sleep(Duration::from_millis(5)).await;
        timers.tick();
        let began = Instant::now();
        handle.start_grace(clock::ns_of(began));
        // Its IO has shut down for writing and reads what the client still sends, within its own
        // bounds: the grace period does not cut that short.
        handle.set_lingering(true);
        assert!(check(&handle, began + GRACE).is_some());
        assert_eq!(handle.driver_flags(), (true, false));
        handle.set_lingering(false);
        assert_eq!(check(&handle, began + GRACE), None);
        assert_eq!(handle.driver_flags(), (true, true));
    }

    #[tokio::test]
    async fn a_busy_connection_is_dropped_once_past_its_max_age_and_grace() {
        let layer = KeepAliveLayer::new()
            .max_age(Duration::from_millis(20))
            .max_age_jitter(0.0)
            .max_age_grace(Duration::from_millis(30));
        let handle = layer.connection();
        handle.mark_http2();
        let (_, in_flight) = handle.start_request();
        let age = handle.max_age_at().expect("a maximum age");
        // At the maximum age: GOAWAY, and the stream runs on.
        assert!(check(&handle, age).is_some());
        assert_eq!(handle.close_reason(), Some(CloseReason::MaxAge));
        assert_eq!(handle.driver_flags(), (true, false));
        let began = Instant::now();
        handle.start_grace(clock::ns_of(began));
        // The next look is due by the end of the grace, not a whole `GRACE` later.
        let next = check(&handle, age + Duration::from_millis(10)).expect("looked at again");
        assert!(next <= age + Duration::from_millis(30), "{next:?}");
        assert_eq!(handle.driver_flags(), (true, false));
        // Past it: cut, whatever is in flight.
        assert_eq!(check(&handle, age + Duration::from_millis(30)), None);
        assert_eq!(handle.driver_flags(), (true, true));
        drop(in_flight);

        // Without a grace period, the stream is waited for.
        let layer = KeepAliveLayer::new()
            .max_age(Duration::from_millis(20))
            .max_age_jitter(0.0);
        let handle = layer.connection();
        handle.mark_http2();
        let (_, _in_flight) = handle.start_request();
        let age = handle.max_age_at().expect("a maximum age");
        assert!(check(&handle, age).is_some());
        assert!(check(&handle, age + Duration::from_secs(3600)).is_some());
        assert_eq!(handle.driver_flags(), (true, false));
    }

    #[tokio::test]
    async fn a_connection_nobody_drives_leaves_the_timers() {
        let layer = KeepAliveLayer::new().idle_timeout(Duration::from_millis(1));
        let (timers, handle) = one_watched(&layer);
        // As when an upgraded connection's lifecycle ends while its IO keeps the handle.
        handle.mark_undriven();
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert_eq!(timers.tick(), None);
        assert_eq!(entries(&timers), 0);
        assert_eq!(handle.close_reason(), None);
    }
}
