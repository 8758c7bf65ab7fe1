//! Server-wide counters: [`Stats`], [`StatsSnapshot`].

use std::fmt;
use std::sync::atomic::{
    AtomicU32, AtomicU64, AtomicUsize,
    Ordering::{Acquire, Relaxed, Release},
};
use std::sync::Arc;

use crate::control::{Control, PRESSURE_STEPS};
use crate::CloseReason;

/// Buckets of the requests-per-connection distribution: `0`, `1`, `2..=3`, `4..=7`, ... up to
/// `2^(BUCKETS-2)..` (powers of two).
const BUCKETS: usize = 18;

#[derive(Default)]
pub(crate) struct Counters {
    opened: AtomicU64,
    closed: AtomicU64,
    /// What every request moves, spread over shards so that threads do not fight over one cache line.
    requests: Shards,
    by_reason: [AtomicU64; CloseReason::COUNT],
    per_connection: [AtomicU64; BUCKETS],
    /// Idle HTTP/1 connections hibernating now (serve path).
    hibernating: AtomicU64,
}

/// Shards that belong to one thread at a time: their owner moves them with plain loads and stores, no
/// locked instruction. A thread takes one on its first request and gives it back when it exits.
const EXCLUSIVE: usize = 32;
/// Shards for threads beyond those, shared, moved with atomic additions.
const SHARED: usize = 4;
const SHARDS: usize = EXCLUSIVE + SHARED;

/// One shard of the per-request counters, alone on its cache line(s).
#[derive(Default)]
#[repr(align(128))]
struct Shard {
    started: AtomicU64,
    /// Two gauges in one word, so that a request moves both at once: requests in flight in the low half,
    /// connections with something in flight in the high half. A request may end on another shard than it
    /// started on; the shards' sum (wrapping) is still exact.
    gauges: AtomicU64,
}

struct Shards([Shard; SHARDS]);

impl Default for Shards {
    fn default() -> Self {
        Shards(std::array::from_fn(|_| Shard::default()))
    }
}

/// The calling thread's shard index, and whether the thread owns it.
#[derive(Clone, Copy)]
struct Slot {
    index: usize,
    exclusive: bool,
}

/// The exclusive shards taken, one bit each.
static TAKEN: AtomicU32 = AtomicU32::new(0);

/// A thread's slot, released when the thread exits.
struct ThreadSlot(Slot);

impl ThreadSlot {
    fn take() -> Self {
        let mut taken = TAKEN.load(Relaxed);
        while taken != u32::MAX {
            let bit = taken.trailing_ones();
            // Acquire: what the shard's previous owner wrote is seen before this thread adds to it.
            match TAKEN.compare_exchange_weak(taken, taken | 1 << bit, Acquire, Relaxed) {
                Ok(_) => {
                    return ThreadSlot(Slot {
                        index: bit as usize,
                        exclusive: true,
                    })
                }
                Err(now) => taken = now,
            }
        }
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        ThreadSlot(Slot {
            index: EXCLUSIVE + NEXT.fetch_add(1, Relaxed) % SHARED,
            exclusive: false,
        })
    }
}

impl Drop for ThreadSlot {
    fn drop(&mut self) {
        if self.0.exclusive {
            // Release: this thread's last additions are seen by the next owner.
            TAKEN.fetch_and(!(1 << self.0.index), Release);
        }
    }
}

thread_local! {
    static SLOT: ThreadSlot = ThreadSlot::take();
}

/// Adds `delta` (wrapping) to the calling thread's copy of a counter.
#[inline]
fn add(counter: &AtomicU64, slot: Slot, delta: u64) {
    if slot.exclusive {
        counter.store(counter.load(Relaxed).wrapping_add(delta), Relaxed);
    } else {
        counter.fetch_add(delta, Relaxed);
    }
}

impl Counters {
    /// The calling thread's shard. A thread whose slot is already gone (a value dropped while the thread
    /// exits) shares the first shared shard.
    #[inline]
    fn shard(&self) -> (&Shard, Slot) {
        let slot = SLOT.try_with(|slot| slot.0).unwrap_or(Slot {
            index: EXCLUSIVE,
            exclusive: false,
        });
        (&self.requests.0[slot.index], slot)
    }

    fn sum(&self, field: impl Fn(&Shard) -> &AtomicU64) -> u64 {
        self.requests.0.iter().fold(0u64, |sum, shard| {
            sum.wrapping_add(field(shard).load(Relaxed))
        })
    }
}

impl Counters {
    pub(crate) fn connection_opened(&self) {
        self.opened.fetch_add(1, Relaxed);
        #[cfg(feature = "metrics")]
        crate::metrics::connection_opened();
    }

    /// A connection closed for `reason` after `requests`; it was opened at `opened_ns` (a
    /// `clock` reading) and carried HTTP/2 if `http2` (both for the `metrics` feature).
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    pub(crate) fn connection_closed(
        &self,
        reason: CloseReason,
        requests: u64,
        opened_ns: u64,
        http2: bool,
    ) {
        #[cfg(feature = "metrics")]
        crate::metrics::connection_closed(reason, requests, opened_ns, http2);
        self.by_reason[reason.index()].fetch_add(1, Relaxed);
        self.per_connection[bucket(requests)].fetch_add(1, Relaxed);
        // Last, so that a snapshot never sees a connection closed but not yet counted by reason.
        self.closed.fetch_add(1, Relaxed);
    }

    /// An idle connection began (`true`) or ended (`false`) hibernating.
    #[cfg(feature = "serve")]
    pub(crate) fn hibernating(&self, began: bool) {
        if began {
            self.hibernating.fetch_add(1, Relaxed);
        } else {
            self.hibernating.fetch_sub(1, Relaxed);
        }
    }

    /// A request started; `was_idle` when the connection had nothing in flight.
    pub(crate) fn request_started(&self, was_idle: bool) {
        let (shard, slot) = self.shard();
        add(&shard.started, slot, 1);
        add(&shard.gauges, slot, gauge_step(was_idle));
    }

    /// A request finished; `now_idle` when it was the connection's last in flight.
    pub(crate) fn request_finished(&self, now_idle: bool) {
        let (shard, slot) = self.shard();
        add(&shard.gauges, slot, gauge_step(now_idle).wrapping_neg());
    }
}

/// One request in flight, and one busy connection if `connection` is set.
fn gauge_step(connection: bool) -> u64 {
    1 | (u64::from(connection) << 32)
}

fn bucket(requests: u64) -> usize {
    let log = (u64::BITS - requests.leading_zeros()) as usize;
    log.min(BUCKETS - 1)
}

/// A live view of one layer's counters: connections open and idle, requests in flight and served,
/// closes by reason, and the distribution of requests per connection. Cheap to clone.
///
/// Kept by every [`ConnectionHandle`] made from one [`KeepAliveLayer`] (and its clones), in shards of
/// relaxed atomic counters: per request, a thread moves a few counters of a shard it owns with plain loads
/// and stores (threads beyond the shards share a few with atomic additions); no lock, no allocation. A
/// snapshot sums the shards. Read them with [`KeepAliveLayer::stats`] and [`Stats::snapshot`], for logs
/// or a metrics endpoint.
///
/// A connection counts as closed when it ends: when the serve path's driver (or
/// [`ConnectionHandle::drive`]) finishes with it, or when the `axum::serve` path drops its IO. An
/// upgraded connection (a WebSocket) counts as open until the upgraded protocol drops its IO (on the
/// serve paths; in general, until the last clone of its handle goes, which that IO keeps). A handle kept
/// after that does not keep it counted open. Without a
/// driver (the layer alone in an accept loop of your own, no `drive`), the end is known only when the
/// last clone of the handle is dropped, as in the example below.
///
/// # Example
///
/// ```
/// use tower_keepalive::{CloseReason, KeepAliveLayer};
///
/// let layer = KeepAliveLayer::new();
/// let stats = layer.stats();
/// let handle = layer.connection();
/// assert_eq!(stats.snapshot().connections_open(), 1);
/// handle.close(CloseReason::Drain);
/// drop(handle);
/// let snapshot = stats.snapshot();
/// assert_eq!(snapshot.connections_open(), 0);
/// assert_eq!(snapshot.closed(CloseReason::Drain), 1);
/// ```
///
/// [`ConnectionHandle`]: crate::ConnectionHandle
/// [`ConnectionHandle::drive`]: crate::ConnectionHandle::drive
/// [`KeepAliveLayer`]: crate::KeepAliveLayer
/// [`KeepAliveLayer::stats`]: crate::KeepAliveLayer::stats
#[derive(Clone)]
pub struct Stats {
    pub(crate) counters: Arc<Counters>,
    pub(crate) control: Arc<Control>,
}

impl fmt::Debug for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.snapshot(), f)
    }
}

impl Stats {
    /// The counters as they are now. Each is read on its own, so under load a snapshot may be off by the
    /// requests that moved while it was read; it never shows fewer connections open than idle.
    ///
    /// ```
    /// let stats = tower_keepalive::KeepAliveLayer::new().stats();
    /// let now = stats.snapshot();
    /// assert_eq!(now.connections_open(), now.connections_idle());
    /// ```
    pub fn snapshot(&self) -> StatsSnapshot {
        let c = &*self.counters;
        let closed = c.closed.load(Relaxed);
        let gauges = c.sum(|shard| &shard.gauges);
        let (in_flight, busy) = (gauges & u64::from(u32::MAX), gauges >> 32);
        let opened = c.opened.load(Relaxed);
        let started = c.sum(|shard| &shard.started);
        let open = opened.saturating_sub(closed);
        StatsSnapshot {
            connections_opened: opened,
            connections_open: open,
            connections_idle: open.saturating_sub(busy),
            connections_hibernating: c.hibernating.load(Relaxed),
            in_flight,
            requests: started,
            by_reason: std::array::from_fn(|i| c.by_reason[i].load(Relaxed)),
            per_connection: std::array::from_fn(|i| c.per_connection[i].load(Relaxed)),
            pressure: self.control.pressure(),
        }
    }
}

/// The counters of a [`Stats`] at one moment.
///
/// ```
/// let snapshot = tower_keepalive::KeepAliveLayer::new().stats().snapshot();
/// println!("{} open, {} idle", snapshot.connections_open(), snapshot.connections_idle());
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatsSnapshot {
    connections_opened: u64,
    connections_open: u64,
    connections_idle: u64,
    connections_hibernating: u64,
    in_flight: u64,
    requests: u64,
    by_reason: [u64; CloseReason::COUNT],
    per_connection: [u64; BUCKETS],
    pressure: u32,
}

impl StatsSnapshot {
    /// How short of connections the server is, from `0.0` (below its soft limit) to `1.0` (at its hard
    /// limit). Idle timeouts shrink in proportion. Only the serve path with a connection budget sets it.
    ///
    /// ```
    /// # let s = tower_keepalive::KeepAliveLayer::new().stats().snapshot();
    /// assert_eq!(s.pressure(), 0.0);
    /// ```
    pub fn pressure(&self) -> f64 {
        f64::from(self.pressure) / f64::from(PRESSURE_STEPS)
    }

    /// Connections accepted since the layer was built.
    ///
    /// ```
    /// # let s = tower_keepalive::KeepAliveLayer::new().stats().snapshot();
    /// assert_eq!(s.connections_opened(), 0);
    /// ```
    pub fn connections_opened(&self) -> u64 {
        self.connections_opened
    }

    /// Connections open now.
    ///
    /// ```
    /// # let s = tower_keepalive::KeepAliveLayer::new().stats().snapshot();
    /// assert_eq!(s.connections_open(), 0);
    /// ```
    pub fn connections_open(&self) -> u64 {
        self.connections_open
    }

    /// Connections open now with nothing in flight (including those yet to send a first request).
    ///
    /// ```
    /// # let s = tower_keepalive::KeepAliveLayer::new().stats().snapshot();
    /// assert_eq!(s.connections_idle(), 0);
    /// ```
    pub fn connections_idle(&self) -> u64 {
        self.connections_idle
    }

    /// Idle HTTP/1 connections hibernating now: holding their socket and little else until their next
    /// request (serve path, [`Serve::hibernate_after`](crate::serve::Serve::hibernate_after)). They
    /// count as idle too.
    ///
    /// ```
    /// # let s = tower_keepalive::KeepAliveLayer::new().stats().snapshot();
    /// assert_eq!(s.connections_hibernating(), 0);
    /// ```
    pub fn connections_hibernating(&self) -> u64 {
        self.connections_hibernating
    }

    /// Requests whose response is not yet fully sent.
    ///
    /// ```
    /// # let s = tower_keepalive::KeepAliveLayer::new().stats().snapshot();
    /// assert_eq!(s.in_flight(), 0);
    /// ```
    pub fn in_flight(&self) -> u64 {
        self.in_flight
    }

    /// Requests started since the layer was built.
    ///
    /// ```
    /// # let s = tower_keepalive::KeepAliveLayer::new().stats().snapshot();
    /// assert_eq!(s.requests(), 0);
    /// ```
    pub fn requests(&self) -> u64 {
        self.requests
    }

    /// Connections closed for `reason`.
    ///
    /// ```
    /// # let s = tower_keepalive::KeepAliveLayer::new().stats().snapshot();
    /// assert_eq!(s.closed(tower_keepalive::CloseReason::Idle), 0);
    /// ```
    pub fn closed(&self, reason: CloseReason) -> u64 {
        self.by_reason[reason.index()]
    }

    /// Every close reason with its count.
    ///
    /// ```
    /// # let s = tower_keepalive::KeepAliveLayer::new().stats().snapshot();
    /// for (reason, count) in s.closes() {
    ///     println!("{reason}: {count}");
    /// }
    /// ```
    pub fn closes(&self) -> impl Iterator<Item = (CloseReason, u64)> + '_ {
        CloseReason::ALL.iter().map(|&r| (r, self.closed(r)))
    }

    /// The distribution of requests per closed connection, as `(upper bound, count)` pairs: the count of
    /// connections that served at most `upper bound` requests and more than the previous bound; the last
    /// bound is `u64::MAX`. Bounds: 0, 1, 3, 7, 15, ... (powers of two less one).
    ///
    /// ```
    /// # let s = tower_keepalive::KeepAliveLayer::new().stats().snapshot();
    /// let (bound, count) = s.requests_per_connection().next().unwrap();
    /// assert_eq!((bound, count), (0, 0));
    /// ```
    pub fn requests_per_connection(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.per_connection.iter().enumerate().map(|(i, &count)| {
            let bound = if i == BUCKETS - 1 {
                u64::MAX
            } else {
                (1u64 << i) - 1
            };
            (bound, count)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_powers_of_two() {
        assert_eq!(bucket(0), 0);
        assert_eq!(bucket(1), 1);
        assert_eq!(bucket(2), 2);
        assert_eq!(bucket(3), 2);
        assert_eq!(bucket(4), 3);
        assert_eq!(bucket(u64::MAX), BUCKETS - 1);
        let s = Stats {
            counters: Arc::default(),
            control: Arc::default(),
        }
        .snapshot();
        let bounds: Vec<u64> = s.requests_per_connection().map(|(b, _)| b).collect();
        assert_eq!(&bounds[..4], [0, 1, 3, 7]);
        assert_eq!(*bounds.last().unwrap(), u64::MAX);
        // Each bucket holds the values its bound admits.
        for (i, &b) in bounds.iter().enumerate().take(BUCKETS - 1) {
            assert_eq!(bucket(b), i);
        }
    }

    #[test]
    fn connections_and_requests_are_counted() {
        let layer = crate::KeepAliveLayer::new();
        let stats = layer.stats();
        let a = layer.connection();
        let b = layer.connection();
        let (_, g1) = a.start_request();
        let (_, g2) = a.start_request();
        let s = stats.snapshot();
        assert_eq!(
            (s.connections_open(), s.connections_idle(), s.in_flight()),
            (2, 1, 2)
        );
        drop(g1);
        assert_eq!(stats.snapshot().connections_idle(), 1);
        drop(g2);
        let s = stats.snapshot();
        assert_eq!(
            (s.connections_idle(), s.in_flight(), s.requests()),
            (2, 0, 2)
        );
        a.close(CloseReason::MaxRequests);
        drop(a);
        drop(b);
        let s = stats.snapshot();
        assert_eq!(s.connections_open(), 0);
        assert_eq!(s.closed(CloseReason::MaxRequests), 1);
        assert_eq!(s.closed(CloseReason::ClientClosed), 1);
        let per: Vec<(u64, u64)> = s.requests_per_connection().take(3).collect();
        assert_eq!(per, [(0, 1), (1, 0), (3, 1)]);
    }

    #[test]
    fn counts_stay_exact_across_more_threads_than_exclusive_shards() {
        let layer = crate::KeepAliveLayer::new();
        let stats = layer.stats();
        const THREADS: usize = EXCLUSIVE + 2 * SHARED;
        const PER_THREAD: u64 = 2_000;
        // Requests started on one thread and finished on another, as tokio's work stealing does; the
        // first wave of threads exits, so the second takes over their exclusive shards.
        for _wave in 0..2 {
            let handle = layer.connection();
            std::thread::scope(|scope| {
                let (tx, rx) = std::sync::mpsc::channel();
                for _ in 0..THREADS {
                    let (handle, tx) = (handle.clone(), tx.clone());
                    scope.spawn(move || {
                        for _ in 0..PER_THREAD {
                            let _ = tx.send(handle.start_request().1);
                        }
                    });
                }
                drop(tx);
                let finisher = scope.spawn(move || rx.into_iter().for_each(drop));
                let _ = finisher.join();
            });
            let s = stats.snapshot();
            assert_eq!((s.in_flight(), s.connections_idle()), (0, 1));
        }
        assert_eq!(stats.snapshot().requests(), 2 * THREADS as u64 * PER_THREAD);
    }
}
