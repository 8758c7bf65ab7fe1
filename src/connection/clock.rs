//! Times as nanoseconds on the monotonic clock: 8 bytes where an `Instant` takes 16, for the state kept
//! per connection and per timer entry.
//!
//! The idle stamp at the end of each request reads the precise monotonic clock. The kernel's coarse
//! clock would be 20 ns cheaper, but right after a CPU wakes from idle it can lag by more than its
//! stated resolution (5.5 ms against 4 ms, measured here), which could close a connection before the
//! advertised timeout.
//!
//! On Linux a reading is `CLOCK_MONOTONIC` itself (through libc, which reads it in the vDSO), the clock
//! `Instant` reads too: cheaper per request than `Instant::now` and the subtraction of an epoch
//! (BENCHMARKS.md). Not through rustix, whose own vDSO lookup crashes under valgrind (rustix issue
//! 1559). Elsewhere a reading is the time since a process epoch, through `Instant`.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// One moment on both scales: an `Instant`, and the reading taken just before it.
struct Epoch {
    at: Instant,
    ns: u64,
}

fn epoch() -> &'static Epoch {
    static EPOCH: OnceLock<Epoch> = OnceLock::new();
    EPOCH.get_or_init(|| {
        // The reading first: `at` is then never earlier than the moment `ns` names, so an `Instant`
        // converted from a reading errs late (by the few nanoseconds between the two), never early.
        let ns = now_ns();
        Epoch {
            at: Instant::now(),
            ns,
        }
    })
}

/// Now, in nanoseconds.
#[cfg(any(target_os = "linux", target_os = "android"))]
#[inline]
pub(crate) fn now_ns() -> u64 {
    // Fails only for a clock the kernel does not have. `Instant::now` reads the same clock and panics
    // the same way: there is no reading to fall back on that is never early.
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC is always readable");
    // Never negative on the monotonic clock.
    u64::try_from(ts.tv_sec())
        .unwrap_or(0)
        .saturating_mul(1_000_000_000)
        .saturating_add(u64::try_from(ts.tv_nsec()).unwrap_or(0))
}

/// Now, in nanoseconds.
#[cfg(not(any(target_os = "linux", target_os = "android")))]
#[inline]
pub(crate) fn now_ns() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    nanos(START.get_or_init(Instant::now).elapsed())
}

/// The instant of a reading of [`now_ns`].
pub(crate) fn instant(ns: u64) -> Instant {
    let epoch = epoch();
    if ns >= epoch.ns {
        epoch.at + Duration::from_nanos(ns - epoch.ns)
    } else {
        // A reading from before the epoch was set; an `Instant` that far back always exists (the
        // machine was up), else the epoch stands in.
        epoch
            .at
            .checked_sub(Duration::from_nanos(epoch.ns - ns))
            .unwrap_or(epoch.at)
    }
}

/// `at` as a reading of [`now_ns`].
#[cfg_attr(not(feature = "serve"), allow(dead_code))]
pub(crate) fn ns_of(at: Instant) -> u64 {
    let epoch = epoch();
    match at.checked_duration_since(epoch.at) {
        Some(after) => epoch.ns.saturating_add(nanos(after)),
        None => epoch.ns.saturating_sub(nanos(epoch.at - at)),
    }
}

/// `d` in nanoseconds, saturating (in 64-bit arithmetic: cheaper than going through `as_nanos`).
#[inline]
#[cfg_attr(not(feature = "serve"), allow(dead_code))]
pub(crate) fn nanos(d: Duration) -> u64 {
    d.as_secs()
        .saturating_mul(1_000_000_000)
        .saturating_add(u64::from(d.subsec_nanos()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readings_fall_between_instants_and_round_trip() {
        let _ = instant(0);
        let before = Instant::now();
        let at = instant(now_ns());
        // Converted readings err late by the gap between the epoch's two readings, never early.
        assert!(before <= at, "{before:?} > {at:?}");
        assert!(at <= Instant::now() + Duration::from_millis(1));
        assert_eq!(instant(ns_of(at)), at);
        let earlier = before - Duration::from_millis(5);
        assert_eq!(instant(ns_of(earlier)), earlier);
    }

    #[test]
    fn nanos_saturates() {
        assert_eq!(nanos(Duration::new(3, 7)), 3_000_000_007);
        assert_eq!(nanos(Duration::MAX), u64::MAX);
    }
}
