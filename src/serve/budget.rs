//! The server-wide connection budget: admission at the hard limit, shrinking idle timeouts above the soft
//! one.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Semaphore;

use super::drain::{Drain, PressureSender};
use crate::control::{Control, PRESSURE_STEPS};
use crate::ConnectionHandle;

/// Connection limits: below `soft` nothing changes; between `soft` and `hard` the idle timeout (advertised
/// and enforced) shrinks in proportion, so the longest-idle connections close first, even before the
/// timeout their last response advertised; at `hard` new connections wait in the listener's accept
/// queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Limits {
    pub(crate) soft: usize,
    pub(crate) hard: usize,
}

impl Limits {
    pub(crate) fn new(soft: usize, hard: usize) -> Self {
        let hard = hard.max(1);
        Limits {
            soft: soft.min(hard - 1),
            hard,
        }
    }

    /// From the process's file-descriptor limit, keeping a tenth of it (at least 32) for everything
    /// else the process opens; the soft limit at three quarters of the hard one. `None` where the limit
    /// is unknown or unlimited.
    pub(crate) fn from_fd_limit() -> Option<Self> {
        let fds = fd_limit()?;
        let hard = fds.saturating_sub((fds / 10).max(32));
        (hard >= 4).then(|| Limits::new(hard * 3 / 4, hard))
    }

    /// The pressure at `open` connections, in steps of 1/[`PRESSURE_STEPS`].
    pub(crate) fn pressure(&self, open: usize) -> u32 {
        if open <= self.soft {
            return 0;
        }
        let span = (self.hard - self.soft) as u64;
        let over = (open - self.soft) as u64;
        // Rounded up: the first connection over the soft limit already counts.
        let level = (over * u64::from(PRESSURE_STEPS)).div_ceil(span);
        level.min(u64::from(PRESSURE_STEPS)) as u32
    }
}

#[cfg(unix)]
fn fd_limit() -> Option<usize> {
    use nix::sys::resource::{getrlimit, Resource, RLIM_INFINITY};
    let (soft, _hard) = getrlimit(Resource::RLIMIT_NOFILE).ok()?;
    if soft == RLIM_INFINITY {
        return None;
    }
    usize::try_from(soft).ok()
}

#[cfg(not(unix))]
fn fd_limit() -> Option<usize> {
    None
}

/// How often a server at its hard limit looks again for a connection to close, while every one is busy.
const SHED_RETRY: Duration = Duration::from_millis(50);

/// The live budget of one server.
pub(crate) struct Budget {
    limits: Limits,
    permits: Arc<Semaphore>,
    control: Arc<Control>,
    signal: PressureSender,
    /// The most connections that may hold an upgrade slot at once; the rest of `hard` is kept for HTTP.
    max_upgraded: usize,
    /// Connections holding an upgrade slot: asked to upgrade and not closed yet (upgraded or not).
    upgraded: AtomicUsize,
}

impl Budget {
    pub(crate) fn new(
        limits: Limits,
        max_upgraded: usize,
        control: Arc<Control>,
        signal: PressureSender,
    ) -> Self {
        Budget {
            limits,
            permits: Arc::new(Semaphore::new(limits.hard)),
            control,
            signal,
            max_upgraded: max_upgraded.min(limits.hard),
            upgraded: AtomicUsize::new(0),
        }
    }

    /// Lets the connection of `handle`, which asks to switch protocols, hold an upgrade slot until it
    /// closes: whether it may (it holds one already, or there was one free). Counted before the
    /// request reaches the service, so that no `101` goes out beyond the share, however many upgrade
    /// requests race.
    pub(crate) fn allow_upgrade(&self, handle: &ConnectionHandle) -> bool {
        if handle.holds_upgrade_slot() {
            return true;
        }
        let taken = self
            .upgraded
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max_upgraded).then_some(n + 1)
            })
            .is_ok();
        // Only the connection's own requests take its slot, one at a time on HTTP/1.
        if taken && !handle.take_upgrade_slot() {
            self.upgraded.fetch_sub(1, Ordering::AcqRel);
        }
        taken
    }

    /// Waits for room for one more connection; the connection holds the returned admission while it
    /// is open. `None` once the budget is closed (never: it is not).
    pub(crate) async fn admit(self: &Arc<Self>) -> Option<Admission> {
        let permit = self.permits.acquire().await.ok()?;
        // Given back by the admission's drop: one pointer per connection instead of a permit and a
        // pointer to the budget.
        permit.forget();
        Some(Admission {
            budget: self.clone(),
            handle: None,
        })
    }

    /// As [`admit`](Self::admit), but at the hard limit it makes room: the connections of `drain` that
    /// hold a slot doing nothing are closed at once, those that never finished a request head first,
    /// then idle keep-alive connections, longest idle first (close reason `Pressure`; never one accepted
    /// under a second ago and not yet served, whose first request is on its way), as nginx does when
    /// it runs out of connections. A connection with a request in flight is never chosen. While every
    /// connection is busy, it looks again every [`SHED_RETRY`], for as long as it waits.
    pub(crate) async fn admit_shedding(self: &Arc<Self>, drain: &Drain) -> Option<Admission> {
        #[cfg(feature = "metrics")]
        let mut queued = false;
        loop {
            if let Ok(permit) = self.permits.clone().try_acquire_owned() {
                permit.forget();
                return Some(Admission {
                    budget: self.clone(),
                    handle: None,
                });
            }
            let _shed = drain.shed_one();
            #[cfg(feature = "metrics")]
            crate::metrics::at_hard_limit(!std::mem::replace(&mut queued, true), _shed);
            if let Ok(admission) = tokio::time::timeout(SHED_RETRY, self.admit()).await {
                return admission;
            }
        }
    }

    /// Recomputes the pressure after a connection came or went; wakes the connections only when it
    /// changed.
    pub(crate) fn update(&self) {
        let open = self.limits.hard - self.permits.available_permits();
        let level = self.limits.pressure(open);
        if level > self.control.set_pressure(level) {
            self.signal.rose();
        }
    }
}

/// One admitted connection's room in the budget; dropping it gives the room back (and the
/// connection's upgrade slot, if it holds one) and updates the pressure. Held by the connection's IO
/// ([`Held`]), so an upgraded connection keeps its room until the upgraded protocol drops
/// the IO.
pub(crate) struct Admission {
    budget: Arc<Budget>,
    handle: Option<ConnectionHandle>,
}

impl Admission {
    /// The admission of the connection of `handle`, whose upgrade slot it gives back too.
    pub(crate) fn bind(mut self, handle: &ConnectionHandle) -> Self {
        self.handle = Some(handle.clone());
        self
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        if self.handle.as_ref().is_some_and(|h| h.holds_upgrade_slot()) {
            self.budget.upgraded.fetch_sub(1, Ordering::AcqRel);
        }
        self.budget.permits.add_permits(1);
        self.budget.update();
    }
}

pin_project_lite::pin_project! {
    /// A connection's IO holding the connection's room in the budget: the room is given back when the
    /// IO is dropped, at the connection's end or, once upgraded (a WebSocket), when the upgraded
    /// protocol is done with it. An upgraded connection thus keeps its descriptor counted, and the
    /// server never accepts past its budget into `EMFILE`.
    pub(crate) struct Held<I> {
        #[pin]
        inner: I,
        admission: Option<Admission>,
    }
}

impl<I> Held<I> {
    pub(crate) fn new(inner: I, admission: Option<Admission>) -> Self {
        Held { inner, admission }
    }
}

impl<I: AsyncRead> AsyncRead for Held<I> {
    #[inline]
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.project().inner.poll_read(cx, buf)
    }
}

impl<I: AsyncWrite> AsyncWrite for Held<I> {
    #[inline]
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write(cx, buf)
    }

    #[inline]
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write_vectored(cx, bufs)
    }

    #[inline]
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    #[inline]
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    #[inline]
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pressure_grows_from_soft_to_hard() {
        let limits = Limits::new(75, 100);
        assert_eq!(limits.pressure(0), 0);
        assert_eq!(limits.pressure(75), 0);
        assert_eq!(limits.pressure(76), 1);
        assert_eq!(limits.pressure(88), 9);
        assert_eq!(limits.pressure(100), PRESSURE_STEPS);
        assert_eq!(limits.pressure(1000), PRESSURE_STEPS);
    }

    #[test]
    fn limits_are_sane_for_any_input() {
        assert_eq!(Limits::new(10, 0), Limits { soft: 0, hard: 1 });
        assert_eq!(Limits::new(50, 10), Limits { soft: 9, hard: 10 });
        assert_eq!(Limits::new(0, 1).pressure(1), PRESSURE_STEPS);
        if let Some(limits) = Limits::from_fd_limit() {
            assert!(limits.soft < limits.hard);
        }
    }
}
