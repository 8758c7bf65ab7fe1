//! The state behind a [`ConnectionHandle`](super::ConnectionHandle): one allocation of 96 bytes per
//! connection, atomics written by the layer (requests, idle stamp), the connection's IO (writes, reads)
//! and its driver (close flags, grace period), and the bit layouts they share.

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use atomic_waker::AtomicWaker;

use crate::close::CloseReason;
use crate::config::Config;

pub(crate) struct Shared {
    pub(crate) config: Arc<Config>,
    /// When the connection was accepted. Every time here is a reading of `clock` in nanoseconds: 8 bytes
    /// where an `Instant` takes 16.
    pub(super) opened_ns: u64,
    /// When the connection reaches its maximum age (jitter applied), in milliseconds after
    /// `opened_ns` (at most `u32::MAX - 1`, about 49 days); `u32::MAX` when it has none. Four bytes
    /// rather than a clock reading's eight, to leave room for `head_since_ms` in the 96.
    pub(super) max_age_ms: u32,
    /// Requests in flight (low half) and requests started, modulo 2^32 (high half): one atomic
    /// addition starts a request. See [`ACTIVITY_REQUEST`].
    pub(super) activity: AtomicU64,
    /// How many times the high half of `activity` wrapped around.
    pub(super) requests_wrapped: AtomicU32,
    /// When `in_flight` last dropped to zero (when the connection was accepted, before its first
    /// request). Written before the decrement that makes the connection idle, so whoever sees
    /// `in_flight == 0` also sees the matching time.
    pub(super) idle_since_ns: AtomicU64,
    /// When the request head being read started: the first byte read in the current idle period, or
    /// the accept for a connection's first request. Stale (a head that has since become a request)
    /// when earlier than `idle_since_ns`. Set by the serve path's IO wrapper (`serve::io`), for
    /// the header timeout.
    /// In milliseconds after `opened_ns`, rounded down, so that the mark of a head that became a request
    /// is always earlier than the idle period after it; a head whose first byte came in the
    /// millisecond its idle period began is marked at its next read. Saturated at `u32::MAX` (a
    /// connection over 49 days old, whose heads are then no longer timed).
    #[cfg_attr(not(feature = "serve"), allow(dead_code))]
    pub(super) head_since_ms: AtomicU32,
    /// What the connection's IO (`serve::io`) tells the others, written by it alone, so with plain
    /// loads and stores: [`IO_WRITE_BLOCKED`], whether its last write found the socket full (the
    /// response bodies are done, but hyper is still sending what they gave it, a large body to a slow
    /// client: the connection is not idle); [`IO_LINGERING`], whether it is in its lingering close
    /// (closed for writing, reading what the client still sends until it closes too, within bounds of
    /// its own), which whoever drives the connection lets finish rather than drop it at the end of its
    /// grace period; [`IO_PEER_EOF`], whether it has read the client's end of stream (its own state,
    /// kept here in a byte that is free). Always 0 without that IO.
    pub(super) io: AtomicU8,
    /// What the request side knows of the connection: [`REQ_HTTP2`], it has carried an HTTP/2 request;
    /// [`REQ_BODILESS`], the request in flight is known to have no body (it ends with its head; set per
    /// request by the crate's serve paths), so the IO may hold back a client's end of stream: with a
    /// body, it may end a body the client cut short, which hyper must see to fail the request. Read with
    /// a plain load, changed with an atomic or/and only when a bit changes (HTTP/2 streams start on
    /// several threads). The others are the driver's and its timer's, in a byte that is free:
    /// [`REQ_GRACE`], [`REQ_STALLED`], and hibernation's [`REQ_HIBERNATES`], [`REQ_HIBERNATE`] and
    /// [`REQ_PARKING`].
    pub(super) request_flags: AtomicU8,
    /// Progress of the connection's output, counted (not timed: no clock read per write), for the send
    /// timeout: writes that went through (HTTP/1: every one; HTTP/2: one that went through a socket
    /// that had been full, as the PING and SETTINGS acknowledgements a client can make the server
    /// write are no progress of a response), and response bodies polled again after they had handed a
    /// frame over (HTTP/2: a stream whose flow-control window opened). Written by the IO with a load and
    /// a store, by the bodies with an atomic addition: an addition lost to that race still changes the
    /// value, and it is compared for a change only, so it may wrap.
    pub(super) progress: AtomicU32,
    /// HTTP/2 response bodies with output waiting: made, or having handed over a frame, and not polled
    /// since (hyper does not poll the body of a stream whose flow-control window is shut).
    pub(super) waiting: AtomicU32,
    /// The close decided, if any (its reason in the low bits, see [`REASON`]), whether the connection's
    /// driver was asked to carry it out ([`REQUESTED`]), and whether it must drop the connection now
    /// ([`DROP_NOW`]).
    pub(super) close: AtomicU8,
    /// With a maximum age only (always 0 without one): the `timeout=` the last response promised, in
    /// seconds (advertised or not; 0 before the first response and after one that said `close`), for
    /// the idle close at the maximum age to wait out. [`u8::MAX`] stands for 255 s or more: the idle
    /// timeout then, which no promise exceeds. One byte, in what was padding. Written by the layer
    /// before the response's in-flight mark is released, so whoever sees the connection idle sees the
    /// promise of the response that made it so.
    pub(super) advert_secs: AtomicU8,
    /// Wakes whoever drives the connection when one of the `close` flags is set.
    pub(super) waker: AtomicWaker,
    /// When the connection's timer next looks at it (a `clock` reading): a timer entry for another time
    /// is stale.
    #[cfg_attr(not(feature = "serve"), allow(dead_code))]
    pub(crate) scheduled_ns: AtomicU64,
    /// When the timer last saw the output make progress while output was waiting ([`REQ_STALLED`]
    /// set), or when the IO found the socket full ([`IO_WRITE_BLOCKED`] set), or, in a graceful close ([`REQ_GRACE`] set) with none waiting since, when the close began:
    /// milliseconds after `opened_ns`, wrapping (only spans far shorter than 49 days are read from it).
    #[cfg_attr(not(feature = "serve"), allow(dead_code))]
    pub(super) progress_ms: AtomicU32,
    /// The `progress` count the timer saw last.
    #[cfg_attr(not(feature = "serve"), allow(dead_code))]
    pub(super) progress_seen: AtomicU32,
}

impl Shared {
    /// The clock reading at the maximum age (`u64::MAX` without one).
    pub(super) fn max_age_at_ns(&self) -> u64 {
        if self.max_age_ms == u32::MAX {
            return u64::MAX;
        }
        self.opened_ns
            .saturating_add(u64::from(self.max_age_ms) * 1_000_000)
    }
}

/// The bits of `Shared::close` that hold the reason.
pub(super) const REASON: u8 = 0x0f;
/// The close was decided with [`ConnectionHandle::close`]: the driver carries it out.
pub(super) const REQUESTED: u8 = 0x10;
/// The driver drops the connection at once.
#[cfg_attr(not(feature = "serve"), allow(dead_code))]
pub(super) const DROP_NOW: u8 = 0x20;
/// Nobody drives the connection any more (it closed, or was upgraded and handed over): its timer stops.
#[cfg_attr(not(feature = "serve"), allow(dead_code))]
pub(super) const UNDRIVEN: u8 = 0x40;
/// The connection's end has been counted and logged ([`ConnectionHandle::report_closed`]).
pub(super) const REPORTED: u8 = 0x80;

/// `Shared::io`: the connection's last write found the socket full.
/// `Shared::request_flags`: the connection has carried an HTTP/2 request.
pub(super) const REQ_HTTP2: u8 = 0x01;
/// `Shared::request_flags`: the request in flight has no body.
#[cfg_attr(not(feature = "serve"), allow(dead_code))]
pub(super) const REQ_BODILESS: u8 = 0x02;
/// `Shared::request_flags`: the driver has begun a graceful close (set once, by the driver).
#[cfg_attr(not(feature = "serve"), allow(dead_code))]
pub(super) const REQ_GRACE: u8 = 0x04;
/// `Shared::request_flags`: the timer is timing output that waits (`Shared::progress_ms` is when it
/// last saw it move). Written by the timer alone.
#[cfg_attr(not(feature = "serve"), allow(dead_code))]
pub(super) const REQ_STALLED: u8 = 0x08;
/// `Shared::request_flags`: the connection holds an upgrade slot of the serve path's budget.
#[cfg_attr(not(feature = "serve"), allow(dead_code))]
pub(super) const REQ_UPGRADE: u8 = 0x10;
/// `Shared::request_flags`: the driver can hibernate the connection (an HTTP/1 connection of the serve
/// path, awake, with hibernation on): its timer asks it to once it has been idle long enough.
#[cfg_attr(not(feature = "serve"), allow(dead_code))]
pub(super) const REQ_HIBERNATES: u8 = 0x20;
/// `Shared::request_flags`: the timer asked the driver to hibernate the connection.
#[cfg_attr(not(feature = "serve"), allow(dead_code))]
pub(super) const REQ_HIBERNATE: u8 = 0x40;
/// `Shared::request_flags`: the driver is taking hyper's connection apart to hibernate: the IO must not
/// shut the socket down when hyper tells it to.
#[cfg_attr(not(feature = "serve"), allow(dead_code))]
pub(super) const REQ_PARKING: u8 = 0x80;

pub(super) const IO_WRITE_BLOCKED: u8 = 0x01;
/// `Shared::io`: the connection's IO is in its lingering close.
#[cfg_attr(not(feature = "serve"), allow(dead_code))]
pub(super) const IO_LINGERING: u8 = 0x02;
/// `Shared::io`: the connection's IO has read the client's end of stream.
#[cfg_attr(not(feature = "serve"), allow(dead_code))]
pub(super) const IO_PEER_EOF: u8 = 0x04;
/// `Shared::io`: the connection hibernates (serve path): its driver, not hyper, waits for its next bytes,
/// and tells the timer when they come. Written by the driver, in the task that also runs the IO.
#[cfg_attr(not(feature = "serve"), allow(dead_code))]
pub(super) const IO_HIBERNATING: u8 = 0x08;

/// What starting a request adds to `Shared::activity`: one request in flight, one more started.
pub(super) const ACTIVITY_REQUEST: u64 = 1 << 32 | 1;

pub(super) fn in_flight(activity: u64) -> u32 {
    activity as u32
}

impl Shared {
    pub(super) fn requests(&self) -> u64 {
        let started = self.activity.load(Ordering::Relaxed) >> 32;
        u64::from(self.requests_wrapped.load(Ordering::Relaxed)) << 32 | started
    }
}

impl Shared {
    /// Counts the connection closed and logs it, for `reason`.
    pub(super) fn closed(&self, reason: CloseReason) {
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

pub(super) fn seed(opened_ns: u64) -> u64 {
    use std::hash::BuildHasher;
    // RandomState is seeded per process and varies per instance: enough to spread ages apart.
    std::collections::hash_map::RandomState::new().hash_one(opened_ns)
}

/// `base` scaled by a factor uniformly spread over `[1 - fraction, 1 + fraction]`.
pub(super) fn jitter(base: Duration, fraction: f64, seed: u64) -> Duration {
    if fraction <= 0.0 {
        return base;
    }
    // 53 random bits to a float in [0, 1).
    let unit = (seed >> 11) as f64 / (1u64 << 53) as f64;
    let factor = 1.0 + fraction * (2.0 * unit - 1.0);
    base.mul_f64(factor.max(0.0))
}
