//! One accepted connection's task on the serve path: [`ConnectionTask`].

use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use pin_project_lite::pin_project;

use super::budget::Admission;
use super::drain::DrainWatcher;
use super::lifecycle::{Driven, Driver};
use super::{closed, ConnectionsShared};
use crate::{CloseReason, ConnectionHandle};

pin_project! {
    /// Drives one connection through its lifecycle on the drain's shared timer, then reports its close
    /// (`super::closed`): plain and TLS connections alike.
    ///
    /// A future of its own rather than an `async` block: a block keeps what it captured (the IO, the
    /// service) beside the connection it moved them into, for the connection's whole life, and this
    /// future is most of what an idle connection costs (see `serve::conn` on hibernation).
    pub(super) struct ConnectionTask<C> {
        #[pin]
        conn: C,
        handle: ConnectionHandle,
        // Taken when the connection has closed: it stops counting for the drain then.
        watcher: Option<DrainWatcher>,
        permit: Option<Admission>,
        shared: Arc<ConnectionsShared>,
        driver: Driver,
    }

    impl<C> PinnedDrop for ConnectionTask<C> {
        fn drop(this: Pin<&mut Self>) {
            // Ended or given up (its runtime shut down): the timer lets it go.
            this.handle.mark_undriven();
        }
    }
}

impl<C> ConnectionTask<C> {
    pub(super) fn new(
        conn: C,
        handle: ConnectionHandle,
        watcher: DrainWatcher,
        permit: Option<Admission>,
        shared: Arc<ConnectionsShared>,
    ) -> Self {
        ConnectionTask {
            conn,
            handle,
            watcher: Some(watcher),
            permit,
            shared,
            driver: Driver::default(),
        }
    }
}

impl<C: Driven> Future for ConnectionTask<C> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        let Some(watcher) = this.watcher.as_ref() else {
            return Poll::Ready(());
        };
        let mut timer = watcher.timers();
        let (driver, handle) = (this.driver, &*this.handle);
        let mut conn = this.conn;
        // A handler that panics (no `CatchPanic` in the stack) unwinds through the connection: its
        // close is still reported and counted, then the panic goes on.
        let polled = catch_unwind(AssertUnwindSafe(|| {
            driver.poll_drive(conn.as_mut(), handle, Pin::new(&mut timer), cx)
        }));
        let (reason, panic) = match polled {
            Ok(Poll::Pending) => return Poll::Pending,
            Ok(Poll::Ready(reason)) => (reason, None),
            Err(panic) => {
                handle.mark_undriven();
                handle.mark_closing(CloseReason::Error);
                let reason = handle.close_reason().unwrap_or(CloseReason::Error);
                handle.report_closed(reason);
                (reason, Some(panic))
            }
        };
        if let Some(watcher) = this.watcher.take() {
            closed(this.shared, handle, reason, watcher, this.permit.take());
        }
        if let Some(panic) = panic {
            std::panic::resume_unwind(panic);
        }
        Poll::Ready(())
    }
}
