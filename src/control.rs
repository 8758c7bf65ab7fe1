//! Server-wide control state: how short of connections the server is, and whether it is shutting
//! down. Set by the serve paths (the connection budget, the lame-duck period, the drain), read by the
//! layer for every response it plans and by the connections' timers. Not counters: [`Stats`] only
//! reports the pressure.
//!
//! [`Stats`]: crate::Stats

use std::sync::atomic::{AtomicU32, AtomicU8, Ordering::Relaxed};

use crate::CloseReason;

/// Resolution of the connection pressure: the idle timeout shrinks in this many steps between the soft
/// and the hard connection limit.
pub(crate) const PRESSURE_STEPS: u32 = 16;

/// The control state of the connections made from one layer value (shared by all its clones).
#[derive(Debug, Default)]
pub(crate) struct Control {
    /// How short of connections the server is, in steps of 1/[`PRESSURE_STEPS`] (0: not at all).
    pressure: AtomicU32,
    /// The server is shutting down (a [`CloseReason`] as `to_u8`, 0 while serving): lame duck, then
    /// drain. No connection that has served a request is kept alive any more.
    shutdown: AtomicU8,
}

impl Control {
    /// How short of connections the server is, in steps of 1/[`PRESSURE_STEPS`].
    pub(crate) fn pressure(&self) -> u32 {
        self.pressure.load(Relaxed)
    }

    /// Sets the pressure level; returns the one it replaces.
    #[cfg_attr(not(feature = "serve"), allow(dead_code))]
    pub(crate) fn set_pressure(&self, level: u32) -> u32 {
        self.pressure.swap(level.min(PRESSURE_STEPS), Relaxed)
    }

    /// Why the server is shutting down ([`CloseReason::LameDuck`] or [`CloseReason::Drain`]), if it is.
    pub(crate) fn shutdown_reason(&self) -> Option<CloseReason> {
        CloseReason::from_u8(self.shutdown.load(Relaxed))
    }

    /// The server starts its lame-duck period or its drain (`None`: it serves again).
    #[cfg_attr(not(feature = "serve"), allow(dead_code))]
    pub(crate) fn set_shutdown(&self, reason: Option<CloseReason>) {
        self.shutdown
            .store(reason.map_or(0, CloseReason::to_u8), Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pressure_is_capped_and_shutdown_round_trips() {
        let control = Control::default();
        assert_eq!(control.set_pressure(PRESSURE_STEPS * 2), 0);
        assert_eq!(control.pressure(), PRESSURE_STEPS);
        assert_eq!(control.shutdown_reason(), None);
        control.set_shutdown(Some(CloseReason::LameDuck));
        assert_eq!(control.shutdown_reason(), Some(CloseReason::LameDuck));
        control.set_shutdown(None);
        assert_eq!(control.shutdown_reason(), None);
    }
}
