//! What whoever drives the connection (the serve paths' lifecycle, timers and IO) reads and sets on
//! the handle: the IO's notes (writes, reads, lingering close, end of stream), the driver's flags and
//! grace period, and when the connection is due to close. Serve path only.

use std::time::{Duration, Instant};

use super::clock;
use super::*;

/// With keep-alive off (a zero idle timeout) a connection still gets this long to send its request.
const FIRST_REQUEST_WHEN_DISABLED: Duration = Duration::from_secs(5);

/// The shortest interval at which a busy connection's timer looks again.
const MIN_RECHECK: Duration = Duration::from_millis(10);

impl Shared {
    /// The clock reading a `head_since_ms` value stands for.
    fn head_ns(&self, ms: u32) -> u64 {
        self.opened_ns.saturating_add(u64::from(ms) * 1_000_000)
    }
}

impl ConnectionHandle {
    /// Wrapping milliseconds after the accept, for `progress_ms`.
    fn wrapping_ms(&self, now_ns: u64) -> u32 {
        (now_ns.saturating_sub(self.shared.opened_ns) / 1_000_000) as u32
    }

    /// The timeout the last response promised (see `Shared::advert_secs`); zero without a maximum age.
    pub(super) fn last_advert(&self) -> Duration {
        match self.shared.advert_secs.load(Ordering::Relaxed) {
            u8::MAX => self.config().idle_timeout,
            secs => Duration::from_secs(secs.into()),
        }
    }

    /// The time `progress_ms` stands for, seen from `now`.
    fn progress_at(&self, now: Instant) -> Instant {
        let now_ms = self.wrapping_ms(clock::ns_of(now));
        let ago = now_ms.wrapping_sub(self.shared.progress_ms.load(Ordering::Relaxed));
        now.checked_sub(Duration::from_millis(ago.into()))
            .unwrap_or(now)
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
            // A write the socket refused was stamped by the IO when it was refused (after any
            // progress, which clears the flag): the stall counts from there, not from this look,
            // which may come up to an idle timeout later. Output h2 holds back is timed from here.
            if shared.io.load(Ordering::Acquire) & IO_WRITE_BLOCKED != 0 {
                return Some(self.progress_at(now));
            }
            shared
                .progress_ms
                .store(self.wrapping_ms(clock::ns_of(now)), Ordering::Relaxed);
            return Some(now);
        }
        Some(self.progress_at(now))
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

    /// The driver can (`true`) or cannot hibernate the connection now (see `serve::conn`).
    pub(crate) fn set_hibernates(&self, on: bool) {
        self.set_request_flag(REQ_HIBERNATES, on);
    }

    /// The driver is taking hyper's connection apart (`true`), or done with it: while it is, the IO
    /// does not shut the socket down.
    pub(crate) fn set_parking(&self, on: bool) {
        self.set_request_flag(REQ_PARKING, on);
    }

    /// Whether the driver is taking hyper's connection apart to hibernate (see [`set_parking`]).
    ///
    /// [`set_parking`]: Self::set_parking
    pub(crate) fn is_parking(&self) -> bool {
        self.shared.request_flags.load(Ordering::Relaxed) & REQ_PARKING != 0
    }

    /// The connection begins (`true`) or ends hibernating: its driver waits for its next bytes.
    pub(crate) fn set_hibernating(&self, on: bool) {
        self.set_io_flag(IO_HIBERNATING, on);
    }

    /// Whether the connection hibernates (see [`set_hibernating`]).
    ///
    /// [`set_hibernating`]: Self::set_hibernating
    fn is_hibernating(&self) -> bool {
        self.shared.io.load(Ordering::Relaxed) & IO_HIBERNATING != 0
    }

    /// Whether the timer asked the driver to hibernate the connection, and it has not looked yet.
    fn hibernation_requested(&self) -> bool {
        self.shared.request_flags.load(Ordering::Relaxed) & REQ_HIBERNATE != 0
    }

    /// For the driver: whether the timer asked it to hibernate the connection. Takes the request, and
    /// registers `waker` again for the close flags (the timer's wake-up took the registration).
    pub(crate) fn take_hibernation_request(&self, waker: &std::task::Waker) -> bool {
        if self.shared.request_flags.load(Ordering::Relaxed) & REQ_HIBERNATE == 0 {
            return false;
        }
        self.set_request_flag(REQ_HIBERNATE, false);
        self.register_driver(waker);
        true
    }

    /// When the connection is to hibernate: once idle for `hibernate_after`, if its driver can
    /// hibernate it and has not been asked to yet.
    fn hibernation_at(&self) -> Option<Instant> {
        let after = self.config().hibernate_after?;
        let flags = self.shared.request_flags.load(Ordering::Relaxed);
        if flags & (REQ_HIBERNATES | REQ_HIBERNATE) != REQ_HIBERNATES {
            return None;
        }
        Some(self.idle_since()? + after)
    }

    /// For the timer, at `now`: asks the driver to hibernate the connection if its time has come.
    pub(crate) fn hibernate_if_due(&self, now: Instant) {
        if self.hibernation_at().is_some_and(|at| at <= now) {
            self.set_request_flag(REQ_HIBERNATE, true);
            self.shared.waker.wake();
        }
    }

    /// Records a write on the connection's socket: `blocked` when the socket was full.
    pub(crate) fn note_write(&self, blocked: bool) {
        let shared = &self.shared;
        if blocked {
            if shared.io.load(Ordering::Relaxed) & IO_WRITE_BLOCKED == 0 {
                // The socket just filled: the output stalls from now, for the send timeout. A clock
                // reading only here, when a write is refused, never on a write that goes through.
                shared
                    .progress_ms
                    .store(self.wrapping_ms(clock::now_ns()), Ordering::Relaxed);
                self.set_io_flag(IO_WRITE_BLOCKED, true);
            }
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

    /// For whoever drives the connection: whether it was asked to close it gracefully, and whether to
    /// drop it now.
    pub(crate) fn driver_flags(&self) -> (bool, bool) {
        let close = self.shared.close.load(Ordering::Acquire);
        (close & REQUESTED != 0, close & DROP_NOW != 0)
    }

    /// Whether the driver can hibernate the connection (see [`set_hibernates`]).
    ///
    /// [`set_hibernates`]: Self::set_hibernates
    fn hibernates(&self) -> bool {
        self.shared.request_flags.load(Ordering::Relaxed) & REQ_HIBERNATES != 0
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
                // A connection that can hibernate is looked at often enough to find it idle soon
                // after its request: nothing tells the timer when a request ends.
                let every = match self.config().hibernate_after {
                    Some(after) if self.hibernates() => every.min(after.max(MIN_RECHECK)),
                    _ => every,
                };
                Instant::now() + every
            }
        };
        // A head's first byte is seen by the IO, which tells no timer (that would take the timer's
        // lock once per request): an idle connection held to a header timeout is looked at every
        // header timeout, to find the head that has started and schedule its deadline. A
        // hibernating one is not: its driver tells the timer when it wakes.
        let at = match self.head_timing() {
            Some((Some(head), limit)) => at.min(head + limit),
            // A hibernating connection's driver reads the head's first bytes itself, and has the timer
            // look then: no look is needed before. Nor for one about to hibernate: its driver has the
            // timer look again if it does not.
            Some((None, _)) if self.is_hibernating() || self.hibernation_requested() => at,
            Some((None, limit)) => at.min(Instant::now() + limit),
            None => at,
        };
        let at = match self.hibernation_at() {
            Some(hibernate) => at.min(hibernate),
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
