//! The clock of the per-request path: nanoseconds since a process epoch, read cheaply.
//!
//! A request's end stamps the connection's idle time. `Instant::now` reads the precise monotonic clock,
//! 20-40 ns in a VM; on Linux this reads the kernel's coarse monotonic clock instead (the same clock as
//! of its last tick, a few ns), rounded up by its resolution. So a stamp is never earlier than the true
//! time, and at most one tick (1-4 ms) later: an idle connection may close that much after its timeout,
//! never before it. Elsewhere the precise clock is read.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

struct Epoch {
    instant: Instant,
    /// The coarse clock's reading of the same moment (or a moment before it), in ns, and its resolution.
    #[cfg(any(target_os = "linux", target_os = "android"))]
    coarse: Option<(u64, u64)>,
}

/// Coarser than this, the precise clock is used: a stamp may not be late by more.
#[cfg(any(target_os = "linux", target_os = "android"))]
const MAX_RESOLUTION: Duration = Duration::from_millis(10);

fn epoch() -> &'static Epoch {
    static EPOCH: OnceLock<Epoch> = OnceLock::new();
    EPOCH.get_or_init(|| {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        {
            use rustix::time::{clock_getres, clock_gettime, ClockId};
            let resolution = nanos(timespec(clock_getres(ClockId::MonotonicCoarse)));
            // The monotonic clock first, then `Instant` (the same clock): the epoch's coarse reading is
            // at or before its instant, so stamps converted to instants only err late.
            let precise = nanos(timespec(clock_gettime(ClockId::Monotonic)));
            let instant = Instant::now();
            let coarse = (resolution > 0 && resolution <= nanos(MAX_RESOLUTION))
                .then_some((precise, resolution));
            Epoch { instant, coarse }
        }
        #[cfg(not(any(target_os = "linux", target_os = "android")))]
        Epoch {
            instant: Instant::now(),
        }
    })
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn timespec(ts: rustix::time::Timespec) -> Duration {
    let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
    let subsec = u32::try_from(ts.tv_nsec).unwrap_or(0);
    Duration::new(secs, subsec)
}

/// Now, in nanoseconds since the epoch: never earlier than the true time, at most the coarse clock's
/// resolution later.
#[inline]
pub(crate) fn now_ns() -> u64 {
    let epoch = epoch();
    #[cfg(any(target_os = "linux", target_os = "android"))]
    if let Some((base, resolution)) = epoch.coarse {
        use rustix::time::{clock_gettime, ClockId};
        let coarse = nanos(timespec(clock_gettime(ClockId::MonotonicCoarse)));
        return coarse.saturating_sub(base).saturating_add(resolution);
    }
    nanos(epoch.instant.elapsed())
}

/// Now, by the precise clock, in nanoseconds since the epoch.
pub(crate) fn precise_now_ns() -> u64 {
    nanos(epoch().instant.elapsed())
}

/// The instant of a reading of [`now_ns`].
pub(crate) fn instant(ns: u64) -> Instant {
    epoch().instant + Duration::from_nanos(ns)
}

/// `at` in nanoseconds since the epoch (0 before it).
pub(crate) fn ns_of(at: Instant) -> u64 {
    nanos(at.saturating_duration_since(epoch().instant))
}

pub(crate) fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_are_never_early_and_at_most_a_tick_late() {
        for _ in 0..1000 {
            let before = Instant::now();
            let stamp = instant(now_ns());
            let after = Instant::now();
            assert!(stamp >= before, "{stamp:?} < {before:?}");
            assert!(
                stamp <= after + MAX_LATE,
                "{stamp:?} > {after:?} + {MAX_LATE:?}"
            );
        }
    }

    const MAX_LATE: Duration = Duration::from_millis(11);

    #[test]
    fn precise_readings_fall_between_instants() {
        let _ = now_ns();
        let before = Instant::now();
        let at = instant(precise_now_ns());
        assert!(before <= at && at <= Instant::now());
    }
}
