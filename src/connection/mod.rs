//! Per-connection state: the [`ConnectionHandle`] and why a connection closed.
//!
//! A layer value cannot hold per-connection state: hyper-util's `TowerToHyperService` clones the service
//! for every request and axum's `Router::layer` applies a layer to each route separately. So the state is
//! created once where the connection is accepted ([`KeepAliveLayer::connection`]) and reaches the layer with
//! each request, either bound to the service ([`KeepAliveLayer::bind`]) or as a request extension.
//!
//! [`KeepAliveLayer::connection`]: crate::KeepAliveLayer::connection
//! [`KeepAliveLayer::bind`]: crate::KeepAliveLayer::bind

use std::fmt;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use atomic_waker::AtomicWaker;

pub(crate) mod clock;
#[cfg(feature = "serve")]
mod driver;
mod state;

pub(crate) use state::Shared;
use state::*;

use crate::close::CloseReason;
use crate::config::{Advert, Config};

/// The keep-alive state of one connection, shared by the layer and whoever drives the connection.
///
/// Create one per accepted connection with [`KeepAliveLayer::connection`], and give it to the layer either
/// by binding it ([`KeepAliveLayer::bind`], no cost per request) or by inserting it into each request's
/// extensions (for stacks such as axum's `Router::layer`, where the layer is built before any connection
/// exists). Cloning is cheap: clones share the same state.
///
/// The handle counts requests, tracks what is in flight and since when the connection is idle (nothing in
/// flight and every response body fully sent, or dropped), and records the first decision to close it.
///
/// # Example
///
/// ```
/// use tower_keepalive::KeepAliveLayer;
///
/// let layer = KeepAliveLayer::new().max_requests(100);
/// // In an accept loop: one handle per connection.
/// let handle = layer.connection();
/// assert_eq!(handle.requests(), 0);
/// assert_eq!(handle.in_flight(), 0);
/// assert!(handle.idle_since().is_some());
/// ```
///
/// [`KeepAliveLayer::connection`]: crate::KeepAliveLayer::connection
/// [`KeepAliveLayer::bind`]: crate::KeepAliveLayer::bind
#[derive(Clone)]
pub struct ConnectionHandle {
    pub(crate) shared: Arc<Shared>,
}

impl ConnectionHandle {
    pub(crate) fn new(config: Arc<Config>) -> Self {
        // The precise clock, once per connection: `opened_at` is never later than the accept.
        let opened_ns = clock::now_ns();
        config.stats.connection_opened();
        let max_age_ms = config.max_age.map_or(u32::MAX, |age| {
            let age = jitter(age, config.max_age_jitter, seed(opened_ns));
            u32::try_from(age.as_millis()).map_or(u32::MAX - 1, |ms| ms.min(u32::MAX - 1))
        });
        ConnectionHandle {
            shared: Arc::new(Shared {
                config,
                opened_ns,
                max_age_ms,
                activity: AtomicU64::new(0),
                requests_wrapped: AtomicU32::new(0),
                idle_since_ns: AtomicU64::new(opened_ns),
                head_since_ms: AtomicU32::new(0),
                io: AtomicU8::new(0),
                request_flags: AtomicU8::new(0),
                progress: AtomicU32::new(0),
                waiting: AtomicU32::new(0),
                close: AtomicU8::new(0),
                advert_secs: AtomicU8::new(0),
                waker: AtomicWaker::new(),
                scheduled_ns: AtomicU64::new(0),
                progress_ms: AtomicU32::new(0),
                progress_seen: AtomicU32::new(0),
            }),
        }
    }

    /// Requests started on this connection so far.
    ///
    /// ```
    /// let handle = tower_keepalive::KeepAliveLayer::new().connection();
    /// assert_eq!(handle.requests(), 0);
    /// ```
    pub fn requests(&self) -> u64 {
        self.shared.requests()
    }

    /// Requests whose response is not yet fully sent (HTTP/2: open streams).
    ///
    /// ```
    /// let handle = tower_keepalive::KeepAliveLayer::new().connection();
    /// assert_eq!(handle.in_flight(), 0);
    /// ```
    pub fn in_flight(&self) -> usize {
        in_flight(self.shared.activity.load(Ordering::Acquire)) as usize
    }

    /// When the connection became idle, or `None` while a request is in flight or, on the crate's serve
    /// paths (an IO wrapped in `serve::WatchedIo`), while a response is still being written to a full
    /// socket. A new connection is idle from the moment it was accepted.
    ///
    /// ```
    /// let handle = tower_keepalive::KeepAliveLayer::new().connection();
    /// assert!(handle.idle_since().is_some());
    /// ```
    pub fn idle_since(&self) -> Option<Instant> {
        if in_flight(self.shared.activity.load(Ordering::Acquire)) != 0 {
            return None;
        }
        if self.shared.io.load(Ordering::Acquire) & IO_WRITE_BLOCKED != 0 {
            return None;
        }
        Some(clock::instant(
            self.shared.idle_since_ns.load(Ordering::Relaxed),
        ))
    }

    /// An HTTP/2 response body has output waiting: it was just made, or handed a frame over.
    pub(crate) fn body_waiting(&self) {
        self.shared.waiting.fetch_add(1, Ordering::Relaxed);
    }

    /// A waiting HTTP/2 response body was polled (its output moved on: progress), or dropped
    /// (`progressed` false).
    pub(crate) fn body_done_waiting(&self, progressed: bool) {
        let shared = &*self.shared;
        if progressed {
            shared.progress.fetch_add(1, Ordering::Relaxed);
        }
        shared.waiting.fetch_sub(1, Ordering::Relaxed);
    }

    /// Records that the connection speaks HTTP/2. A load, and an atomic or only the first time.
    pub(crate) fn mark_http2(&self) {
        self.set_request_flag(REQ_HTTP2, true);
    }

    pub(crate) fn is_http2(&self) -> bool {
        self.shared.request_flags.load(Ordering::Relaxed) & REQ_HTTP2 != 0
    }

    fn set_request_flag(&self, flag: u8, on: bool) {
        let flags = &self.shared.request_flags;
        // Requests in a row are alike: the bit rarely changes, so the usual cost is a plain load.
        if (flags.load(Ordering::Relaxed) & flag != 0) != on {
            if on {
                flags.fetch_or(flag, Ordering::Relaxed);
            } else {
                flags.fetch_and(!flag, Ordering::Relaxed);
            }
        }
    }

    /// When the connection was accepted (when this handle was created).
    ///
    /// ```
    /// let handle = tower_keepalive::KeepAliveLayer::new().connection();
    /// assert!(handle.opened_at() <= std::time::Instant::now());
    /// ```
    pub fn opened_at(&self) -> Instant {
        clock::instant(self.shared.opened_ns)
    }

    /// When this connection reaches its maximum age (jitter included), if it has one.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_keepalive::KeepAliveLayer;
    ///
    /// let handle = KeepAliveLayer::new().max_age(Duration::from_secs(60)).connection();
    /// let age = handle.max_age_at().unwrap() - handle.opened_at();
    /// // +/- 10 % jitter by default
    /// assert!(age >= Duration::from_secs(54) && age <= Duration::from_secs(66));
    /// ```
    pub fn max_age_at(&self) -> Option<Instant> {
        self.has_max_age()
            .then(|| clock::instant(self.shared.max_age_at_ns()))
    }

    /// Why the connection is closing or closed, or `None` while it is kept alive.
    ///
    /// ```
    /// let handle = tower_keepalive::KeepAliveLayer::new().connection();
    /// assert_eq!(handle.close_reason(), None);
    /// ```
    pub fn close_reason(&self) -> Option<CloseReason> {
        CloseReason::from_u8(self.shared.close.load(Ordering::Acquire) & REASON)
    }

    /// Whether a close has been decided: the layer answers no more requests of this connection with
    /// keep-alive.
    ///
    /// ```
    /// use tower_keepalive::{CloseReason, KeepAliveLayer};
    ///
    /// let handle = KeepAliveLayer::new().connection();
    /// handle.close(CloseReason::Drain);
    /// assert!(handle.is_closing());
    /// ```
    pub fn is_closing(&self) -> bool {
        self.shared.close.load(Ordering::Acquire) & REASON != 0
    }

    /// Decides to close this connection gracefully, for `reason`. Returns `true` if this was the first
    /// decision, `false` if the connection was already closing (the first reason stays).
    ///
    /// The next HTTP/1 response says `Connection: close`; whoever drives the connection is woken to close
    /// it (HTTP/2: GOAWAY) once nothing is in flight.
    ///
    /// ```
    /// use tower_keepalive::{CloseReason, KeepAliveLayer};
    ///
    /// let handle = KeepAliveLayer::new().connection();
    /// assert!(handle.close(CloseReason::MaxAge));
    /// assert!(!handle.close(CloseReason::Drain));
    /// ```
    pub fn close(&self, reason: CloseReason) -> bool {
        let first = self.decide(reason.to_u8() | REQUESTED);
        if first {
            self.shared.waker.wake();
        }
        first
    }

    /// Records `reason` without waking the driver: for decisions the protocol already carries out (a
    /// `Connection: close` response makes hyper close the connection after it).
    pub(crate) fn mark_closing(&self, reason: CloseReason) {
        self.decide(reason.to_u8());
    }

    /// Records the close a response carries out (it says `Connection: close`, or switches protocols):
    /// it is the last response, and it promised no timeout.
    pub(crate) fn mark_closed_by_response(&self, reason: CloseReason) {
        self.mark_closing(reason);
        if self.has_max_age() {
            self.shared.advert_secs.store(0, Ordering::Relaxed);
        }
    }

    /// Records a close (`bits`: the reason, maybe with [`REQUESTED`]) if none is recorded yet; the
    /// driver's flags may already be set. Returns whether this was the first decision.
    fn decide(&self, bits: u8) -> bool {
        self.shared
            .close
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |close| {
                (close & REASON == 0).then_some(close | bits)
            })
            .is_ok()
    }

    /// Asks the driver to carry out a close decided without it (the connection is closing, but the
    /// protocol has not closed it). No effect if it was asked already or nothing is decided.
    pub(crate) fn request_driver(&self) {
        self.set_flag(REQUESTED);
    }

    fn set_flag(&self, flag: u8) {
        let before = self.shared.close.fetch_or(flag, Ordering::AcqRel);
        if before & flag == 0 {
            self.shared.waker.wake();
        }
    }

    pub(crate) fn config(&self) -> &Config {
        &self.shared.config
    }

    /// Whether the connection's maximum age has passed.
    pub(crate) fn is_past_max_age(&self) -> bool {
        self.has_max_age() && clock::now_ns() >= self.shared.max_age_at_ns()
    }

    /// Whether the connection has a maximum age. No atomic, no clock: a connection without one pays
    /// for nothing more per request.
    #[inline(always)]
    pub(crate) fn has_max_age(&self) -> bool {
        self.shared.max_age_ms != u32::MAX
    }

    /// For an HTTP/1 response planned now on a connection with a maximum age: its `Keep-Alive` value
    /// (`None` when not advertised), whose timeout is cut to the whole seconds left before the maximum
    /// age, and that timeout recorded as the connection's last promise. `Err(MaxAge)` when less than a
    /// second is left: the response says `close` instead.
    #[inline(never)]
    pub(crate) fn max_age_advert(
        &self,
        remaining: Option<u64>,
    ) -> Result<Option<Advert>, CloseReason> {
        let shared = &*self.shared;
        let left = shared.max_age_at_ns().saturating_sub(clock::now_ns());
        let (secs, advert) = shared
            .config
            .advert_within(remaining, Duration::from_nanos(left))
            .ok_or(CloseReason::MaxAge)?;
        shared
            .advert_secs
            .store(u8::try_from(secs).unwrap_or(u8::MAX), Ordering::Relaxed);
        Ok(advert)
    }

    /// Counts a new request and marks it in flight. Returns the request's 1-based number on this connection.
    pub(crate) fn start_request(&self) -> (u64, InFlight) {
        let shared = &*self.shared;
        let before = shared
            .activity
            .fetch_add(ACTIVITY_REQUEST, Ordering::AcqRel);
        shared.config.stats.request_started(in_flight(before) == 0);
        let started = (before >> 32).wrapping_add(1) & u64::from(u32::MAX);
        let wrapped = if started == 0 {
            shared.requests_wrapped.fetch_add(1, Ordering::Relaxed) + 1
        } else {
            shared.requests_wrapped.load(Ordering::Relaxed)
        };
        let n = u64::from(wrapped) << 32 | started;
        (
            n,
            InFlight {
                handle: self.clone(),
            },
        )
    }

    /// The close decided for this connection, or for the whole server (lame duck, drain) once the
    /// connection has served a request, if any. A connection that has not served one yet is left to
    /// send it: during the lame-duck period a balancer opens connections and sends on them at once, and
    /// a close under that first request would lose it.
    pub(crate) fn pending_close(&self) -> Option<CloseReason> {
        self.close_reason().or_else(|| {
            self.config()
                .control
                .shutdown_reason()
                .filter(|_| self.requests() != 0)
        })
    }
}

impl fmt::Debug for ConnectionHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectionHandle")
            .field("requests", &self.requests())
            .field("in_flight", &self.in_flight())
            .field("idle_since", &self.idle_since())
            .field("close_reason", &self.close_reason())
            .finish()
    }
}

/// One request in flight; dropping it (when the response body is finished or dropped) makes the
/// connection idle again if it was the last.
pub(crate) struct InFlight {
    handle: ConnectionHandle,
}

impl InFlight {
    pub(crate) fn handle(&self) -> &ConnectionHandle {
        &self.handle
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let shared = &self.handle.shared;
        // Store the time first: a reader that sees the count reach zero must see this time, not the time
        // of an earlier idle period (which could close the connection right under the client).
        shared
            .idle_since_ns
            .store(clock::now_ns(), Ordering::Relaxed);
        // No wake-up here: the driver's one timer finds the connection idle when it fires, so a request
        // costs no lock or syscall.
        let before = shared.activity.fetch_sub(1, Ordering::AcqRel);
        shared.config.stats.request_finished(in_flight(before) == 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::KeepAliveLayer;

    #[test]
    fn close_reason_round_trips_and_first_wins() {
        for reason in CloseReason::ALL {
            assert_eq!(CloseReason::from_u8(reason.to_u8()), Some(reason));
        }
        assert_eq!(CloseReason::from_u8(0), None);
        assert_eq!(CloseReason::from_u8(200), None);

        let handle = KeepAliveLayer::new().connection();
        assert!(handle.close(CloseReason::Idle));
        handle.mark_closing(CloseReason::Error);
        assert_eq!(handle.close_reason(), Some(CloseReason::Idle));
    }

    #[test]
    fn in_flight_and_idle_since_follow_guards() {
        let handle = KeepAliveLayer::new().connection();
        let before = handle.idle_since().unwrap();
        let (n1, a) = handle.start_request();
        let (n2, b) = handle.start_request();
        assert_eq!((n1, n2), (1, 2));
        assert_eq!(handle.in_flight(), 2);
        assert_eq!(handle.idle_since(), None);
        drop(a);
        assert_eq!(handle.idle_since(), None);
        drop(b);
        assert_eq!(handle.in_flight(), 0);
        assert!(handle.idle_since().unwrap() >= before);
        assert_eq!(handle.requests(), 2);
    }

    #[test]
    #[cfg(feature = "serve")]
    fn the_timer_looks_for_no_head_on_a_hibernating_connection() {
        use std::time::Duration;
        let idle = Duration::from_secs(60);
        let layer = KeepAliveLayer::new()
            .idle_timeout(idle)
            .with_header_timeout(Some(Duration::from_secs(10)))
            .with_hibernation(Some(Duration::from_secs(1)));
        let handle = layer.connection();
        drop(handle.start_request());
        let since = handle.idle_since().unwrap();
        // Awake and idle after a request: looked at within a header timeout, for a head's start.
        assert!(handle.next_check() < since + Duration::from_secs(11));
        // Hibernating: its driver reads the next head's first bytes and has the timer look then.
        handle.set_hibernating(true);
        assert_eq!(handle.next_check(), since + idle);
        handle.set_hibernating(false);
        assert!(handle.next_check() < since + Duration::from_secs(11));
    }

    #[test]
    #[cfg(target_pointer_width = "64")]
    fn the_shared_state_stays_small() {
        // One per connection, for its whole life; its flags live in what would otherwise be padding.
        assert!(std::mem::size_of::<Shared>() <= 96);
    }

    #[test]
    fn jitter_stays_within_bounds() {
        let base = Duration::from_secs(100);
        for seed in [0, 1, u64::MAX, 0x8000_0000_0000_0000, 12345] {
            let d = jitter(base, 0.1, seed);
            assert!(
                d >= Duration::from_secs(90) && d <= Duration::from_secs(110),
                "{d:?}"
            );
        }
        assert_eq!(jitter(base, 0.0, 7), base);
    }

    #[test]
    fn request_count_carries_past_32_bits() {
        let handle = KeepAliveLayer::new().connection();
        handle
            .shared
            .activity
            .store(u64::from(u32::MAX - 1) << 32, Ordering::Relaxed);
        let (a, guard_a) = handle.start_request();
        let (b, guard_b) = handle.start_request();
        let (c, guard_c) = handle.start_request();
        assert_eq!((a, b, c), (0xFFFF_FFFF, 0x1_0000_0000, 0x1_0000_0001));
        assert_eq!((handle.requests(), handle.in_flight()), (0x1_0000_0001, 3));
        drop((guard_a, guard_b, guard_c));
        assert_eq!(handle.in_flight(), 0);
        assert!(handle.idle_since().is_some());
    }

    #[test]
    fn past_its_maximum_age_an_idle_connection_waits_out_its_last_advert() {
        let handle = KeepAliveLayer::new()
            .idle_timeout(Duration::from_secs(10))
            .max_age(Duration::ZERO)
            .max_age_jitter(0.0)
            .connection();
        let since = handle.idle_since().unwrap();
        // No response yet, so no promise: due at the maximum age.
        assert_eq!(handle.due(since), Some(CloseReason::MaxAge));
        // The last response promised 2 s: not before they have run out.
        handle.shared.advert_secs.store(2, Ordering::Relaxed);
        assert_eq!(handle.due(since + Duration::from_millis(1999)), None);
        assert_eq!(
            handle.due(since + Duration::from_secs(2)),
            Some(CloseReason::MaxAge)
        );
        #[cfg(feature = "serve")]
        assert_eq!(handle.next_check(), since + Duration::from_secs(2));
        // Busy: its next response says `close`, whatever the last one promised.
        let (_, guard) = handle.start_request();
        assert_eq!(handle.due(since), Some(CloseReason::MaxAge));
        drop(guard);

        // Marked closing for its age while busy: once idle, not closed while the promise runs.
        let since = handle.idle_since().unwrap();
        handle.mark_closing(CloseReason::MaxAge);
        assert!(!handle.may_close_idle(since + Duration::from_millis(1999)));
        assert!(handle.may_close_idle(since + Duration::from_secs(2)));
        // A response that says `close` leaves nothing to wait for.
        handle.mark_closed_by_response(CloseReason::MaxAge);
        assert!(handle.may_close_idle(since));

        // Closing for another reason: at once.
        let other = KeepAliveLayer::new().max_age(Duration::ZERO).connection();
        other.shared.advert_secs.store(2, Ordering::Relaxed);
        other.close(CloseReason::Drain);
        assert!(other.may_close_idle(other.idle_since().unwrap()));
    }

    #[test]
    fn the_promise_is_the_advert_cut_to_the_seconds_left() {
        let layer = KeepAliveLayer::new()
            .idle_timeout(Duration::from_secs(300))
            .max_age_jitter(0.0);
        let promise = |handle: &ConnectionHandle| handle.last_advert().as_secs();

        let handle = layer.clone().max_age(Duration::from_secs(60)).connection();
        let advert = handle.max_age_advert(Some(7)).unwrap().unwrap();
        assert_eq!(advert.value(), "timeout=59, max=7");
        assert_eq!(promise(&handle), 59);

        // Past what a byte holds: the idle timeout, which no promise exceeds.
        let handle = layer
            .clone()
            .max_age(Duration::from_secs(1000))
            .connection();
        let advert = handle.max_age_advert(Some(7)).unwrap().unwrap();
        assert_eq!(advert.value(), "timeout=300, max=7");
        assert_eq!(handle.shared.advert_secs.load(Ordering::Relaxed), u8::MAX);
        assert_eq!(promise(&handle), 300);

        // Under a second left: `close`, and the last promise stands until that response is sent.
        let handle = layer.max_age(Duration::from_millis(900)).connection();
        assert!(matches!(
            handle.max_age_advert(Some(7)),
            Err(CloseReason::MaxAge)
        ));
        assert_eq!(promise(&handle), 0);
    }

    #[test]
    #[cfg(target_pointer_width = "64")]
    fn the_state_stays_within_its_96_bytes() {
        // The handle is one 112-byte allocation (BENCHMARKS.md): 16 for the reference counts, 96 here.
        assert!(std::mem::size_of::<Shared>() <= 96);
    }

    #[test]
    fn a_close_is_still_recorded_after_the_driver_let_go() {
        // A lifecycle dropped by a panic unwinding through it lets go first; the serve path then
        // records the close as an error.
        let handle = KeepAliveLayer::new().connection();
        handle.mark_undriven();
        assert_eq!(handle.close_reason(), None);
        assert!(!handle.is_closing());
        handle.mark_closing(CloseReason::Error);
        assert_eq!(handle.close_reason(), Some(CloseReason::Error));
        assert!(!handle.close(CloseReason::Drain));
        assert!(!handle.wants_timer());

        let other = KeepAliveLayer::new().connection();
        other.drop_now();
        assert!(other.close(CloseReason::Drain));
        assert_eq!(other.close_reason(), Some(CloseReason::Drain));
    }
}
