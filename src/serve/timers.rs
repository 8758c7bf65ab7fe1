//! The timers of a drain's connections: one heap of deadlines and one task that sleeps until the
//! earliest, then looks at the connections whose time has come ([`check`]). Also the server's phase
//! (serving, lame duck, draining) as the timers apply it to every connection.

use std::collections::BinaryHeap;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use super::lifecycle::{check, Timer};
use crate::connection::clock;
use crate::connection::Shared;
use crate::{CloseReason, ConnectionHandle};

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

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum DrainState {
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
    pub(crate) gone: Notify,
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
}

/// How long a drain that follows a lame-duck period leaves a connection accepted but silent, that has
/// not sent its first request yet, to send it. Behind a balancer such a connection was opened to send
/// a request at once, and the request may be on its way, or in the socket and not read yet: closing
/// the connection now would lose it (a balancer does not retry a non-idempotent request it has sent).
/// It is served, and its response says `Connection: close`; a connection still silent after this is
/// closed. A second covers a round trip on any network a balancer sits on, with room for a loaded host.
/// The budget's shedding at its hard limit spares such a young connection for as long, for the same
/// reason (see `Timers::shed_one`).
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

    pub(crate) fn set_state(&self, state: DrainState) {
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
                // (The `axum::serve` path's IO leaves such a connection be until its close is
                // requested: `KeepAliveIo::should_end`.)
                DrainState::LameDuck
                    if !handle.is_http2()
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
    /// `DrainState::LameDuck`). An idle HTTP/1 connection is left [`LAME_DUCK_IDLE_GRACE`] for a
    /// request on its way, instead of being closed at once.
    pub(crate) fn begin_lame_duck(&self) {
        self.set_state(DrainState::LameDuck);
    }

    /// The drain begins, without waiting for it (the axum path, where axum waits).
    #[cfg(feature = "axum")]
    pub(crate) fn begin_drain(&self) {
        self.set_state(DrainState::Draining);
    }

    pub(crate) fn pressure_rose(&self) {
        self.lock().recompute = true;
        self.wake.notify_one();
    }

    /// Looks at every connection whose time has come; returns when to look next.
    pub(super) fn tick(&self) -> Option<Instant> {
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

    pub(crate) fn shed_one(&self) -> bool {
        let heap = self.lock();
        let now = Instant::now();
        // (rank, when it was accepted or went idle): the smallest goes first. Rank 0: never served a
        // request and accepted over `FIRST_REQUEST_GRACE` ago (silent, or dribbling its head); 1: an
        // idle keep-alive connection. One accepted just now is not shed at all: its first request is
        // most likely on its way (in a burst of clients at the limit, the one accepted before this
        // one), and closing it would lose that request; the new client waits for it to be served or
        // to age.
        let mut best: Option<((u8, Instant), ConnectionHandle)> = None;
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
            let rank = match handle.requests() {
                0 if since + FIRST_REQUEST_GRACE > now => continue,
                0 => 0,
                _ => 1,
            };
            let key = (rank, since);
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

    /// Whether a watched connection accepted under [`FIRST_REQUEST_GRACE`] ago has not begun its first
    /// request, nor been told to close: the `axum::serve` path's drain would end it at once (hyper
    /// closes a connection that has not begun a request), where the serve path leaves it that grace.
    /// Looks at every connection: for the end of a lame-duck period only.
    #[cfg(feature = "axum")]
    pub(crate) fn awaiting_first_request(&self) -> bool {
        let heap = self.lock();
        let now = Instant::now();
        heap.entries
            .iter()
            .filter_map(Entry::current)
            .any(|handle| {
                handle.requests() == 0
                    && !handle.is_closing()
                    && handle
                        .idle_since()
                        .is_some_and(|since| since + FIRST_REQUEST_GRACE > now)
            })
    }

    pub(crate) async fn all_gone(&self) {
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

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::KeepAliveLayer;

    /// Timers watching one connection of `layer`, started.
    pub(crate) fn one_watched(layer: &KeepAliveLayer) -> (Arc<Timers>, ConnectionHandle) {
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
            .control
            .set_pressure(crate::control::PRESSURE_STEPS);
        timers.pressure_rose();
        let next = timers.tick().expect("a deadline");
        let after = handle.shared.scheduled_ns.load(Ordering::Relaxed);
        assert!(after < before, "{after} !< {before}");
        // At the hard limit the idle limit is 1/16 of the timeout: under four seconds from now.
        assert!(next <= Instant::now() + Duration::from_secs(4));
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
