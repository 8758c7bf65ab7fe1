//! One connection's lifecycle: the [`Lifecycle`] future drives a hyper connection and carries out what
//! its handle's flags say; [`check`] is what a connection's timer decides when its time comes (idle
//! timeout, maximum age and its grace, send timeout, the grace period of a graceful close). The timer
//! is the connection's own ([`ConnectionHandle::drive`]) or a drain's shared one (`super::timers`).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use pin_project_lite::pin_project;
use tokio::time::Sleep;

use crate::connection::clock;
use crate::{CloseReason, ConnectionHandle};

/// A connection future that can be told to close gracefully: hyper's HTTP/1 and HTTP/2 connections and
/// hyper-util's auto connections, as hyper-util's `GracefulShutdown` watches them (the trait is sealed:
/// those are the connections [`ConnectionHandle::drive`] and [`DrainWatcher::drive`](super::DrainWatcher::drive) take).
pub use hyper_util::server::graceful::GracefulConnection;

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What a [`Lifecycle`] drives: a connection that ends by itself or when told to close gracefully.
/// hyper's connections ([`GracefulConnection`]) are, and so is the serve path's own, which can also
/// hibernate (`super::conn`).
pub(crate) trait Driven: Future<Output = Result<(), <Self as Driven>::Error>> {
    type Error: Into<BoxError>;

    /// Begins a graceful close: no new request; the connection ends once the ones in flight are done.
    fn shut_down_gracefully(self: Pin<&mut Self>);

    /// Whether hyper's HTTP/1 connection was just made on the connection's first bytes, new or after
    /// hibernating (asked once per making): from then on it can hibernate when idle.
    fn take_http1_started(self: Pin<&mut Self>) -> bool {
        false
    }
}

impl<C> Driven for C
where
    C: GracefulConnection,
    <C as GracefulConnection>::Error: Into<BoxError>,
{
    type Error = <C as GracefulConnection>::Error;

    fn shut_down_gracefully(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

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
    /// [`Drain`](super::Drain) share its timer instead ([`DrainWatcher::drive`](super::DrainWatcher::drive)).
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
pub(crate) fn check(handle: &ConnectionHandle, now: Instant) -> Option<Instant> {
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
            // bounds (`serve::io`). A drain's deadline still drops it.
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
        handle.hibernate_if_due(now);
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

pin_project! {
    /// One connection's lifecycle: drives the hyper connection, and carries out what its handle's flags
    /// say (close gracefully, drop now) when its timer, the layer or the server set them.
    pub(crate) struct Lifecycle<'a, C, T> {
        conn: Pin<&'a mut C>,
        handle: &'a ConnectionHandle,
        #[pin]
        timer: T,
        driver: Driver,
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
    pub(crate) fn new(handle: &'a ConnectionHandle, conn: Pin<&'a mut C>, timer: T) -> Self {
        Lifecycle {
            conn,
            handle,
            timer,
            driver: Driver::default(),
        }
    }
}

impl<C, T> Future for Lifecycle<'_, C, T>
where
    C: Driven,
    T: Timer,
{
    type Output = CloseReason;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<CloseReason> {
        let this = self.project();
        this.driver
            .poll_drive(this.conn.as_mut(), this.handle, this.timer, cx)
    }
}

/// What a lifecycle keeps between two polls of its connection: the [`Lifecycle`] future's, or the serve
/// path's connection task's (`super::task`), which holds the connection and the handle itself. Whoever
/// holds it marks the handle undriven when dropped ([`ConnectionHandle::mark_undriven`]).
#[derive(Default)]
pub(crate) struct Driver {
    // The waker registered with the handle; a flag's wake-up takes it.
    waker: Option<Waker>,
    started: bool,
    shutting_down: bool,
}

impl Driver {
    /// Drives `conn`, the connection of `handle`, with `timer`: resolves with the reason it closed.
    pub(crate) fn poll_drive<C: Driven, T: Timer>(
        &mut self,
        mut conn: Pin<&mut C>,
        handle: &ConnectionHandle,
        mut timer: Pin<&mut T>,
        cx: &mut Context<'_>,
    ) -> Poll<CloseReason> {
        if !self.started {
            self.started = true;
            timer.as_mut().start(handle);
        }
        loop {
            if let Poll::Ready(result) = conn.as_mut().poll(cx) {
                let reason = finished(handle, result);
                handle.mark_undriven();
                // An upgraded connection is still open: it is counted closed when the last clone of its
                // handle goes, with the upgraded IO that keeps one.
                if reason != CloseReason::Upgraded {
                    handle.report_closed(reason);
                }
                return Poll::Ready(reason);
            }
            if conn.as_mut().take_http1_started() {
                if let Some(after) = handle.config().hibernate_after {
                    // Looked at once idle for that long, which the timer would not know to do: its
                    // next look may be as far as the idle timeout, and nothing tells it when the
                    // request now starting ends. Not sooner on a head still in progress, which a
                    // woken connection's leftover bytes may be.
                    let at = handle.next_check().min(Instant::now() + after);
                    handle.set_hibernates(true);
                    timer.as_mut().schedule(handle, at);
                }
            }
            // Registered before the flags are read: a flag set after this read wakes the task.
            if !self.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                handle.register_driver(cx.waker());
                self.waker = Some(cx.waker().clone());
            }
            let (requested, drop_now) = handle.driver_flags();
            if drop_now {
                handle.mark_undriven();
                let reason = handle.close_reason().unwrap_or(CloseReason::Idle);
                handle.report_closed(reason);
                return Poll::Ready(reason);
            }
            if requested && !self.shutting_down {
                conn.as_mut().shut_down_gracefully();
                self.shutting_down = true;
                let now = Instant::now();
                handle.start_grace(clock::ns_of(now));
                timer.as_mut().schedule(handle, now + GRACE);
                // The wake-up for this flag took the registration: register again for the next one.
                self.waker = None;
                continue;
            }
            match timer.as_mut().poll_check(cx, handle) {
                Poll::Ready(()) => continue,
                Poll::Pending => return Poll::Pending,
            }
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
    use crate::serve::timers::tests::one_watched;
    use crate::serve::timers::Timers;
    use crate::KeepAliveLayer;
    use std::sync::Arc;

    /// A connection on its timers, idle past a 1 ms idle timeout, and looked at since.
    async fn idle_past_its_timeout() -> (Arc<Timers>, ConnectionHandle) {
        let layer = KeepAliveLayer::new().idle_timeout(Duration::from_millis(1));
        let (timers, handle) = one_watched(&layer);
        tokio::time::sleep(Duration::from_millis(5)).await;
        timers.tick();
        (timers, handle)
    }

    #[tokio::test]
    async fn a_due_connection_is_asked_to_close_and_dropped_after_its_grace() {
        let (_timers, handle) = idle_past_its_timeout().await;
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
        let (_timers, handle) = idle_past_its_timeout().await;
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
        let (_timers, handle) = idle_past_its_timeout().await;
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
}
