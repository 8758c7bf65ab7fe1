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

use crate::clock;
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

pub(crate) struct Shared {
    pub(crate) config: Arc<Config>,
    /// When the connection was accepted. Every time here is a reading of `clock` in nanoseconds: 8 bytes
    /// where an `Instant` takes 16.
    opened_ns: u64,
    /// When the connection reaches its maximum age (jitter applied), in milliseconds after
    /// `opened_ns` (at most `u32::MAX - 1`, about 49 days); `u32::MAX` when it has none. Four bytes
    /// rather than a clock reading's eight, to leave room for `head_since_ms` in the 96.
    max_age_ms: u32,
    /// Requests in flight (low half) and requests started, modulo 2^32 (high half): one atomic
    /// addition starts a request. See [`ACTIVITY_REQUEST`].
    activity: AtomicU64,
    /// How many times the high half of `activity` wrapped around.
    requests_wrapped: AtomicU32,
    /// When `in_flight` last dropped to zero (when the connection was accepted, before its first
    /// request). Written before the decrement that makes the connection idle, so whoever sees
    /// `in_flight == 0` also sees the matching time.
    idle_since_ns: AtomicU64,
    /// When the request head being read started: the first byte read in the current idle period, or
    /// the accept for a connection's first request. Stale (a head that has since become a request)
    /// when earlier than `idle_since_ns`. Set by the serve path's IO wrapper (`serve::io`), for
    /// the header timeout.
    /// In milliseconds after `opened_ns`, rounded down, so that the mark of a head that became a request
    /// is always earlier than the idle period after it; a head whose first byte came in the
    /// millisecond its idle period began is marked at its next read. Saturated at `u32::MAX` (a
    /// connection over 49 days old, whose heads are then no longer timed).
    head_since_ms: AtomicU32,
    /// What the connection's IO (`serve::io`) tells the others, written by it alone, so with plain
    /// loads and stores: [`IO_WRITE_BLOCKED`], whether its last write found the socket full (the
    /// response bodies are done, but hyper is still sending what they gave it, a large body to a slow
    /// client: the connection is not idle); [`IO_LINGERING`], whether it is in its lingering close
    /// (closed for writing, reading what the client still sends until it closes too, within bounds of
    /// its own), which whoever drives the connection lets finish rather than drop it at the end of its
    /// grace period; [`IO_PEER_EOF`], whether it has read the client's end of stream (its own state,
    /// kept here in a byte that is free). Always 0 without that IO.
    io: AtomicU8,
    /// What the request side knows of the connection: [`REQ_HTTP2`], it has carried an HTTP/2 request;
    /// [`REQ_BODILESS`], the request in flight is known to have no body (it ends with its head; set per
    /// request by the crate's serve paths), so the IO may hold back a client's end of stream: with a
    /// body, it may end a body the client cut short, which hyper must see to fail the request. Read with
    /// a plain load, changed with an atomic or/and only when a bit changes (HTTP/2 streams start on
    /// several threads). Two bits are the driver's and its timer's, in a byte that is free:
    /// [`REQ_GRACE`] and [`REQ_STALLED`].
    request_flags: AtomicU8,
    /// Progress of the connection's output, counted (not timed: no clock read per write), for the send
    /// timeout: writes that went through (HTTP/1: every one; HTTP/2: one that went through a socket
    /// that had been full, as the PING and SETTINGS acknowledgements a client can make the server
    /// write are no progress of a response), and response bodies polled again after they had handed a
    /// frame over (HTTP/2: a stream whose flow-control window opened). Written by the IO with a load and
    /// a store, by the bodies with an atomic addition: an addition lost to that race still changes the
    /// value, and it is compared for a change only, so it may wrap.
    progress: AtomicU32,
    /// HTTP/2 response bodies with output waiting: made, or having handed over a frame, and not polled
    /// since (hyper does not poll the body of a stream whose flow-control window is shut).
    waiting: AtomicU32,
    /// The close decided, if any (its reason in the low bits, see [`REASON`]), whether the connection's
    /// driver was asked to carry it out ([`REQUESTED`]), and whether it must drop the connection now
    /// ([`DROP_NOW`]).
    close: AtomicU8,
    /// With a maximum age only (always 0 without one): the `timeout=` the last response promised, in
    /// seconds (advertised or not; 0 before the first response and after one that said `close`), for
    /// the idle close at the maximum age to wait out. [`u8::MAX`] stands for 255 s or more: the idle
    /// timeout then, which no promise exceeds. One byte, in what was padding. Written by the layer
    /// before the response's in-flight mark is released, so whoever sees the connection idle sees the
    /// promise of the response that made it so.
    advert_secs: AtomicU8,
    /// Wakes whoever drives the connection when one of the `close` flags is set.
    waker: AtomicWaker,
    /// When the connection's timer next looks at it (a `clock` reading): a timer entry for another time
    /// is stale.
    pub(crate) scheduled_ns: AtomicU64,
    /// When the timer last saw the output make progress while output was waiting ([`REQ_STALLED`]
    /// set), or, in a graceful close ([`REQ_GRACE`] set) with none waiting since, when the close began:
    /// milliseconds after `opened_ns`, wrapping (only spans far shorter than 49 days are read from it).
    progress_ms: AtomicU32,
    /// The `progress` count the timer saw last.
    progress_seen: AtomicU32,
}

impl Shared {
    /// The clock reading at the maximum age (`u64::MAX` without one).
    fn max_age_at_ns(&self) -> u64 {
        if self.max_age_ms == u32::MAX {
            return u64::MAX;
        }
        self.opened_ns
            .saturating_add(u64::from(self.max_age_ms) * 1_000_000)
    }

    /// The clock reading a `head_since_ms` value stands for.
    fn head_ns(&self, ms: u32) -> u64 {
        self.opened_ns.saturating_add(u64::from(ms) * 1_000_000)
    }
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

    /// Wrapping milliseconds after the accept, for `progress_ms`.
    fn wrapping_ms(&self, now_ns: u64) -> u32 {
        (now_ns.saturating_sub(self.shared.opened_ns) / 1_000_000) as u32
    }

    /// The time `progress_ms` stands for, seen from `now`.
    fn progress_at(&self, now: Instant) -> Instant {
        let now_ms = self.wrapping_ms(clock::ns_of(now));
        let ago = now_ms.wrapping_sub(self.shared.progress_ms.load(Ordering::Relaxed));
        now.checked_sub(Duration::from_millis(ago.into()))
            .unwrap_or(now)
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

    /// Whether the connection has output waiting to be written: a response body whose frame was not
    /// taken yet (HTTP/2), or a write the socket refused.
    pub(crate) fn has_output_waiting(&self) -> bool {
        self.shared.io.load(Ordering::Acquire) & IO_WRITE_BLOCKED != 0
            || self.shared.waiting.load(Ordering::Relaxed) != 0
    }

    /// For the timer, at `now`: since when output has been waiting with none of it going out, or `None`
    /// when none is waiting. Looks at the progress count, and restarts the time if it moved.
    pub(crate) fn output_stalled_since(&self, now: Instant) -> Option<Instant> {
        let shared = &*self.shared;
        let progress = shared.progress.load(Ordering::Relaxed);
        let moved = progress != shared.progress_seen.load(Ordering::Relaxed);
        if moved {
            shared.progress_seen.store(progress, Ordering::Relaxed);
        }
        if !self.has_output_waiting() {
            self.set_request_flag(REQ_STALLED, false);
            return None;
        }
        if moved || shared.request_flags.load(Ordering::Relaxed) & REQ_STALLED == 0 {
            self.set_request_flag(REQ_STALLED, true);
            shared
                .progress_ms
                .store(self.wrapping_ms(clock::ns_of(now)), Ordering::Relaxed);
            return Some(now);
        }
        Some(self.progress_at(now))
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

    /// The connection's IO begins (`true`) or ends its lingering close.
    pub(crate) fn set_lingering(&self, lingering: bool) {
        self.set_io_flag(IO_LINGERING, lingering);
    }

    /// Whether the connection's IO is in its lingering close: it ends within bounds of its own.
    pub(crate) fn is_lingering(&self) -> bool {
        self.shared.io.load(Ordering::Relaxed) & IO_LINGERING != 0
    }

    /// The connection's IO has read the client's end of stream.
    pub(crate) fn set_peer_eof(&self) {
        self.set_io_flag(IO_PEER_EOF, true);
    }

    /// Whether the connection's IO has read the client's end of stream.
    pub(crate) fn peer_eof(&self) -> bool {
        self.shared.io.load(Ordering::Relaxed) & IO_PEER_EOF != 0
    }

    /// For the IO alone (one writer: a load, and a store when the flag changes).
    fn set_io_flag(&self, flag: u8, on: bool) {
        let io = &self.shared.io;
        let flags = io.load(Ordering::Relaxed);
        let new = if on { flags | flag } else { flags & !flag };
        if new != flags {
            io.store(new, Ordering::Release);
        }
    }

    /// Records whether the request just started has a body: a plain load per request, and an atomic
    /// and/or when it differs from the one before.
    pub(crate) fn note_request_body(&self, has_body: bool) {
        self.set_request_flag(REQ_BODILESS, !has_body);
    }

    /// Whether the request in flight is known to have no body (see [`note_request_body`]).
    ///
    /// [`note_request_body`]: Self::note_request_body
    pub(crate) fn request_is_bodiless(&self) -> bool {
        self.shared.request_flags.load(Ordering::Relaxed) & REQ_BODILESS != 0
    }

    /// Marks the connection as holding one of the server's upgrade slots (the serve path's budget):
    /// returns whether it did not hold one already. Only on a request asking to upgrade.
    pub(crate) fn take_upgrade_slot(&self) -> bool {
        self.shared
            .request_flags
            .fetch_or(REQ_UPGRADE, Ordering::Relaxed)
            & REQ_UPGRADE
            == 0
    }

    /// Whether the connection holds one of the server's upgrade slots (see [`take_upgrade_slot`]).
    ///
    /// [`take_upgrade_slot`]: Self::take_upgrade_slot
    pub(crate) fn holds_upgrade_slot(&self) -> bool {
        self.shared.request_flags.load(Ordering::Relaxed) & REQ_UPGRADE != 0
    }

    /// Records a write on the connection's socket: `blocked` when the socket was full.
    pub(crate) fn note_write(&self, blocked: bool) {
        let shared = &self.shared;
        if blocked {
            self.set_io_flag(IO_WRITE_BLOCKED, true);
            return;
        }
        let flags = shared.io.load(Ordering::Relaxed);
        let unblocked = flags & IO_WRITE_BLOCKED != 0;
        if unblocked || !self.is_http2() {
            // The IO's own count: a load and a store, no read-modify-write (see `Shared::progress`).
            let progress = shared.progress.load(Ordering::Relaxed);
            shared
                .progress
                .store(progress.wrapping_add(1), Ordering::Relaxed);
        }
        if unblocked {
            // The time first, as with `idle_since_ns`: whoever sees the flag cleared sees it.
            // The first write after the socket was full: the earliest the buffered response could have
            // been fully sent. Idle time counts from here if that is later.
            shared
                .idle_since_ns
                .fetch_max(clock::now_ns(), Ordering::Relaxed);
            shared
                .io
                .store(flags & !IO_WRITE_BLOCKED, Ordering::Release);
        }
    }

    /// Records bytes read from the connection's socket: the first read of an idle period starts a
    /// request head, which the header timeout bounds. Two loads per read, a clock reading and a store
    /// once per head; nothing without a header timeout.
    #[inline]
    pub(crate) fn note_read(&self) {
        let shared = &*self.shared;
        if shared.config.header_timeout.is_none()
            || in_flight(shared.activity.load(Ordering::Acquire)) != 0
        {
            return;
        }
        let head = shared.head_since_ms.load(Ordering::Relaxed);
        if head == u32::MAX || shared.head_ns(head) >= shared.idle_since_ns.load(Ordering::Relaxed)
        {
            // This idle period's head has begun already (or the connection is too old to tell).
            return;
        }
        let after = clock::now_ns().saturating_sub(shared.opened_ns);
        let ms = u32::try_from(after / 1_000_000).unwrap_or(u32::MAX);
        shared.head_since_ms.store(ms, Ordering::Relaxed);
    }

    /// When the HTTP/1 request head now being read started, and the header timeout in force, if the
    /// connection has a header timeout and is reading a head (idle, and bytes read since, or no request
    /// yet). HTTP/2 connections are left to the idle timeout once they have carried a request: their
    /// idle periods see reads (PING, SETTINGS, WINDOW_UPDATE) that start no head.
    fn head_deadline(&self) -> Option<Instant> {
        let (head, limit) = self.head_timing()?;
        head.map(|head| head + limit)
    }

    /// For a connection held to a header timeout, idle: when its current head started (`None`: no
    /// byte read yet in this idle period), and the timeout in force.
    fn head_timing(&self) -> Option<(Option<Instant>, Duration)> {
        let shared = &*self.shared;
        let limit = shared.config.effective_header_timeout()?;
        if self.is_http2() {
            return None;
        }
        let idle_since = self.idle_since()?;
        let head = clock::instant(shared.head_ns(shared.head_since_ms.load(Ordering::Relaxed)));
        Some(((head >= idle_since).then_some(head), limit))
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

    /// For whoever drives the connection: whether it was asked to close it gracefully, and whether to
    /// drop it now.
    pub(crate) fn driver_flags(&self) -> (bool, bool) {
        let close = self.shared.close.load(Ordering::Acquire);
        (close & REQUESTED != 0, close & DROP_NOW != 0)
    }

    /// Asks the driver to carry out a close decided without it (the connection is closing, but the
    /// protocol has not closed it). No effect if it was asked already or nothing is decided.
    pub(crate) fn request_driver(&self) {
        self.set_flag(REQUESTED);
    }

    /// Tells the driver to drop the connection at once.
    pub(crate) fn drop_now(&self) {
        self.set_flag(DROP_NOW);
    }

    /// The driver is done with the connection (closed, or upgraded and handed over): a timer that
    /// still holds it lets it go. Wakes nobody.
    pub(crate) fn mark_undriven(&self) {
        self.shared.close.fetch_or(UNDRIVEN, Ordering::AcqRel);
    }

    /// The connection is over for HTTP (its driver finished, its IO was dropped, or it was upgraded):
    /// counts it closed in the stats and logs the `connection closed` event, once, whoever keeps a clone
    /// of the handle afterwards. The first close decided stays the reason; `reason` is used when none was.
    pub(crate) fn report_closed(&self, reason: CloseReason) {
        let before = self.shared.close.fetch_or(REPORTED, Ordering::AcqRel);
        if before & REPORTED == 0 {
            self.shared
                .closed(CloseReason::from_u8(before & REASON).unwrap_or(reason));
        }
    }

    /// Whether a timer should still look at the connection: it is driven and not being dropped.
    pub(crate) fn wants_timer(&self) -> bool {
        self.shared.close.load(Ordering::Acquire) & (DROP_NOW | UNDRIVEN) == 0
    }

    fn set_flag(&self, flag: u8) {
        let before = self.shared.close.fetch_or(flag, Ordering::AcqRel);
        if before & flag == 0 {
            self.shared.waker.wake();
        }
    }

    /// Registers the driver's waker for the flags above. A wake-up takes the waker: register again
    /// after seeing a flag change.
    pub(crate) fn register_driver(&self, waker: &std::task::Waker) {
        self.shared.waker.register(waker);
    }

    /// The driver has begun a graceful close: the grace period counts from `now`.
    pub(crate) fn start_grace(&self, now_ns: u64) {
        // Output waiting now is timed afresh, from the next look.
        self.set_request_flag(REQ_STALLED, false);
        self.shared
            .progress_ms
            .store(self.wrapping_ms(now_ns), Ordering::Relaxed);
        self.set_request_flag(REQ_GRACE, true);
    }

    /// Since when the connection, closing gracefully, has been idle: the latest of the close's start,
    /// the end of its last response, and the last stall of its output (see `Shared::progress_ms`).
    /// `None` while busy, or when no graceful close has begun. What the client makes the server
    /// write meanwhile (PING and SETTINGS acknowledgements) does not push it on: only a response does,
    /// while it is in flight, and the send timeout bounds that.
    pub(crate) fn quiet_since(&self, now: Instant) -> Option<Instant> {
        if !self.in_grace() {
            return None;
        }
        Some(self.idle_since()?.max(self.progress_at(now)))
    }

    /// Whether the driver has begun a graceful close.
    pub(crate) fn in_grace(&self) -> bool {
        self.shared.request_flags.load(Ordering::Relaxed) & REQ_GRACE != 0
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

    /// The timeout the last response promised (see `Shared::advert_secs`); zero without a maximum age.
    fn last_advert(&self) -> Duration {
        match self.shared.advert_secs.load(Ordering::Relaxed) {
            u8::MAX => self.config().idle_timeout,
            secs => Duration::from_secs(secs.into()),
        }
    }

    /// Whether a closing connection with nothing in flight may be closed now. Always, but for its
    /// maximum age: then not before the timeout its last response promised has run out, counted from
    /// the end of that response. The client counts from when it read the response, and may send its
    /// next request until then; a close under that request would be a reset it could not tell from a
    /// failure (RFC 9112 section 9.3.1: only an idempotent request may be retried).
    pub(crate) fn may_close_idle(&self, now: Instant) -> bool {
        if self.shared.advert_secs.load(Ordering::Relaxed) == 0
            || self.close_reason() != Some(CloseReason::MaxAge)
        {
            return true;
        }
        self.idle_since()
            .is_some_and(|since| since + self.last_advert() <= now)
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

    /// The idle time after which the connection closes: the idle timeout, shortened under connection
    /// pressure. With keep-alive off, the time a new connection gets to send its one request.
    pub(crate) fn idle_limit(&self) -> Duration {
        let config = self.config();
        if config.keep_alive_enabled() {
            config.effective_idle_timeout()
        } else {
            FIRST_REQUEST_WHEN_DISABLED
        }
    }

    /// Why the connection should close at `now`, if it should: past its maximum age, while busy (its
    /// next response says `close`) or idle once the timeout its last response promised has run out; or
    /// idle past its idle limit (`Pressure` when only the pressure-shortened limit is passed).
    pub(crate) fn due(&self, now: Instant) -> Option<CloseReason> {
        // Read before the promise: seeing the connection idle means seeing its last response's.
        let idle_since = self.idle_since();
        if self.max_age_at().is_some_and(|at| at <= now) {
            match idle_since {
                None => return Some(CloseReason::MaxAge),
                Some(since) if since + self.last_advert() <= now => {
                    return Some(CloseReason::MaxAge)
                }
                Some(_) => {}
            }
        }
        let idle_since = idle_since?;
        if self.head_deadline().is_some_and(|at| at <= now) {
            return Some(CloseReason::HeaderTimeout);
        }
        let idle = now.saturating_duration_since(idle_since);
        let limit = self.idle_limit();
        if idle < limit {
            None
        } else if idle < self.config().idle_timeout {
            Some(CloseReason::Pressure)
        } else {
            Some(CloseReason::Idle)
        }
    }

    /// When [`due`](Self::due) may next say something, for the connection's one timer: the end of the
    /// idle period if idle; while busy, a re-check later (cheaper than a wake-up on every request);
    /// never past the maximum age, or, when idle, past the later of the maximum age and the end of the
    /// last response's promise.
    #[cfg(feature = "serve")]
    pub(crate) fn next_check(&self) -> Instant {
        let limit = self.idle_limit();
        let idle_since = self.idle_since();
        let at = match idle_since {
            Some(since) => since + limit,
            // Not sooner than every 1/16 of the timeout, even when pressure shrinks the limit to nothing.
            // With a header timeout, no later than it either: the head after this request is bounded
            // by it, and the timer has to see that head.
            None => {
                let every = limit.max(self.config().idle_timeout / 16).max(MIN_RECHECK);
                let every = match self.config().effective_header_timeout() {
                    Some(header) => every.min(header.max(MIN_RECHECK)),
                    None => every,
                };
                // Output that waits is looked at twice per send timeout: a stalled client is cut
                // within one and a half of them.
                let every = match self.config().send_timeout {
                    Some(send) => every.min((send / 2).max(MIN_RECHECK)),
                    None => every,
                };
                Instant::now() + every
            }
        };
        // A head's first byte is seen by the IO, which tells no timer (that would take the timer's
        // lock once per request): an idle connection held to a header timeout is looked at every
        // header timeout, to find the head that has started and schedule its deadline.
        let at = match self.head_timing() {
            Some((Some(head), limit)) => at.min(head + limit),
            Some((None, limit)) => at.min(Instant::now() + limit),
            None => at,
        };
        let Some(age) = self.max_age_at() else {
            return at;
        };
        let age = match idle_since {
            Some(since) => age.max(since + self.last_advert()),
            None => age,
        };
        age.min(at)
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

/// With keep-alive off (a zero idle timeout) a connection still gets this long to send its request.
const FIRST_REQUEST_WHEN_DISABLED: Duration = Duration::from_secs(5);

/// The shortest interval at which a busy connection's timer looks again.
const MIN_RECHECK: Duration = Duration::from_millis(10);

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

/// The bits of `Shared::close` that hold the reason.
const REASON: u8 = 0x0f;
/// The close was decided with [`ConnectionHandle::close`]: the driver carries it out.
const REQUESTED: u8 = 0x10;
/// The driver drops the connection at once.
const DROP_NOW: u8 = 0x20;
/// Nobody drives the connection any more (it closed, or was upgraded and handed over): its timer stops.
const UNDRIVEN: u8 = 0x40;
/// The connection's end has been counted and logged ([`ConnectionHandle::report_closed`]).
const REPORTED: u8 = 0x80;

/// `Shared::io`: the connection's last write found the socket full.
/// `Shared::request_flags`: the connection has carried an HTTP/2 request.
const REQ_HTTP2: u8 = 0x01;
/// `Shared::request_flags`: the request in flight has no body.
const REQ_BODILESS: u8 = 0x02;
/// `Shared::request_flags`: the driver has begun a graceful close (set once, by the driver).
const REQ_GRACE: u8 = 0x04;
/// `Shared::request_flags`: the timer is timing output that waits (`Shared::progress_ms` is when it
/// last saw it move). Written by the timer alone.
const REQ_STALLED: u8 = 0x08;
/// `Shared::request_flags`: the connection holds an upgrade slot of the serve path's budget.
const REQ_UPGRADE: u8 = 0x10;

const IO_WRITE_BLOCKED: u8 = 0x01;
/// `Shared::io`: the connection's IO is in its lingering close.
const IO_LINGERING: u8 = 0x02;
/// `Shared::io`: the connection's IO has read the client's end of stream.
const IO_PEER_EOF: u8 = 0x04;

/// What starting a request adds to `Shared::activity`: one request in flight, one more started.
const ACTIVITY_REQUEST: u64 = 1 << 32 | 1;

fn in_flight(activity: u64) -> u32 {
    activity as u32
}

impl Shared {
    fn requests(&self) -> u64 {
        let started = self.activity.load(Ordering::Relaxed) >> 32;
        u64::from(self.requests_wrapped.load(Ordering::Relaxed)) << 32 | started
    }
}

impl Shared {
    /// Counts the connection closed and logs it, for `reason`.
    fn closed(&self, reason: CloseReason) {
        let requests = self.requests();
        let http2 = self.request_flags.load(Ordering::Relaxed) & REQ_HTTP2 != 0;
        self.config
            .stats
            .connection_closed(reason, requests, self.opened_ns, http2);
        tracing::debug!(reason = reason.as_str(), requests, "connection closed");
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // Nobody reported the end (no driver: the layer alone, in someone else's accept loop): the last
        // clone of the handle going is the latest sign of it.
        let close = *self.close.get_mut();
        if close & REPORTED == 0 {
            self.closed(CloseReason::from_u8(close & REASON).unwrap_or(CloseReason::ClientClosed));
        }
    }
}

fn seed(opened_ns: u64) -> u64 {
    use std::hash::BuildHasher;
    // RandomState is seeded per process and varies per instance: enough to spread ages apart.
    std::collections::hash_map::RandomState::new().hash_one(opened_ns)
}

/// `base` scaled by a factor uniformly spread over `[1 - fraction, 1 + fraction]`.
fn jitter(base: Duration, fraction: f64, seed: u64) -> Duration {
    if fraction <= 0.0 {
        return base;
    }
    // 53 random bits to a float in [0, 1).
    let unit = (seed >> 11) as f64 / (1u64 << 53) as f64;
    let factor = 1.0 + fraction * (2.0 * unit - 1.0);
    base.mul_f64(factor.max(0.0))
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
