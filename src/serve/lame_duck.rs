//! The lame-duck period between a shutdown signal and the drain: still accepting and serving, keeping
//! nothing alive, while load balancers take the server out of rotation.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use super::timers::Timers;
use crate::control::Control;
use crate::CloseReason;

/// Resolves when the server should stop accepting: when `signal` completes, or, with a lame-duck
/// `period`, that long after it. From the signal on, every connection that has served a request closes
/// (HTTP/1: `Connection: close` on its next response, or closed at once if idle; HTTP/2: GOAWAY, RFC
/// 9113 section 6.8), and new connections are served, then closed the same way.
pub(crate) async fn stop_accepting<F: Future<Output = ()>>(
    signal: F,
    period: Option<Duration>,
    control: Arc<Control>,
    timers: Arc<Timers>,
) {
    signal.await;
    let Some(period) = period else {
        return;
    };
    tracing::debug!(?period, "lame duck: serving, keeping no connection alive");
    begin(&control, &timers);
    tokio::time::sleep(period).await;
}

/// The lame-duck period begins: responses decided from now on say `close` (the server-wide flag is
/// set first, so that none goes out with keep-alive between the two), and every connection that has
/// served a request is told to close; an idle HTTP/1 one a second later, so as not to close it under a
/// request on its way. Both serve paths.
pub(crate) fn begin(control: &Control, timers: &Timers) {
    control.set_shutdown(Some(CloseReason::LameDuck));
    timers.begin_lame_duck();
}
