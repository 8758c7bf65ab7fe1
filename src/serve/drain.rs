//! Server-wide drain: [`Drain`] tells every watched connection to close gracefully and waits for them;
//! each connection's [`DrainWatcher`] drives it through its lifecycle on the drain's shared timers.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::lifecycle::{BoxError, GracefulConnection, Lifecycle};
use super::timers::{DrainState, Timers};
use crate::{CloseReason, ConnectionHandle};

/// Server-wide drain: tells every watched connection to close gracefully, and waits until they have.
///
/// A `Drain` also keeps the timers of the connections it watches: one task sleeps until the earliest
/// deadline among them (idle timeout, maximum age, grace period) and wakes only the connections whose
/// time has come, so a watched connection carries no timer of its own. Draining costs nothing per
/// request.
///
/// # Example
///
/// ```no_run
/// use std::time::Duration;
/// use hyper_util::rt::{TokioExecutor, TokioIo};
/// use hyper_util::server::conn::auto;
/// use hyper_util::service::TowerToHyperService;
/// use tower::ServiceBuilder;
/// use tower_keepalive::{serve::Drain, KeepAliveLayer};
///
/// # async fn run() -> std::io::Result<()> {
/// let keep_alive = KeepAliveLayer::new();
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
/// let drain = Drain::new();
/// let mut shutdown = std::pin::pin!(tokio::signal::ctrl_c());
/// loop {
///     let (io, _) = tokio::select! {
///         accepted = listener.accept() => accepted?,
///         _ = &mut shutdown => break,
///     };
///     let handle = keep_alive.connection();
///     let svc = ServiceBuilder::new()
///         .layer(keep_alive.bind(handle.clone()))
///         .service_fn(|_req: http::Request<hyper::body::Incoming>| async {
///             Ok::<_, std::convert::Infallible>(http::Response::new(String::from("hello")))
///         });
///     let watcher = drain.watcher();
///     tokio::spawn(async move {
///         let builder = auto::Builder::new(TokioExecutor::new());
///         let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), TowerToHyperService::new(svc));
///         let reason = watcher.drive(handle, conn).await;
///         println!("connection closed: {reason}");
///     });
/// }
/// drain.drain(Some(Duration::from_secs(30))).await;
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct Drain {
    timers: Arc<Timers>,
}

impl Default for Drain {
    fn default() -> Self {
        Self::new()
    }
}

impl Drain {
    /// A drain signal with no connections yet.
    ///
    /// ```
    /// let drain = tower_keepalive::serve::Drain::new();
    /// assert_eq!(drain.connections(), 0);
    /// ```
    pub fn new() -> Self {
        Drain {
            timers: Arc::new(Timers::new()),
        }
    }

    /// A watcher for one new connection; it counts as live until its [`DrainWatcher::drive`] future ends
    /// (or the watcher is dropped).
    ///
    /// ```
    /// let drain = tower_keepalive::serve::Drain::new();
    /// let watcher = drain.watcher();
    /// assert_eq!(drain.connections(), 1);
    /// drop(watcher);
    /// assert_eq!(drain.connections(), 0);
    /// ```
    pub fn watcher(&self) -> DrainWatcher {
        self.timers.live.fetch_add(1, Ordering::Relaxed);
        DrainWatcher {
            timers: self.timers.clone(),
        }
    }

    /// Closes the watched connection that holds a slot to least purpose, if any holds one idly: one that
    /// has not finished a request head yet (silent, or dribbling) and was accepted over a second ago,
    /// the oldest first; else the idle keep-alive connection idle the longest. Never one accepted under
    /// a second ago and not yet served: its first request is most likely on its way. HTTP/1 connections are dropped at once (nothing is in
    /// flight on them); HTTP/2 ones get GOAWAY. Looks at every connection: for a server at its hard
    /// limit only.
    pub(crate) fn shed_one(&self) -> bool {
        self.timers.shed_one()
    }

    /// The timers, for the lame-duck period that runs before the drain.
    pub(crate) fn timers(&self) -> Arc<Timers> {
        self.timers.clone()
    }

    /// A sender of connection-pressure updates to every watched connection.
    pub(crate) fn pressure_sender(&self) -> PressureSender {
        PressureSender {
            timers: self.timers.clone(),
        }
    }

    /// The connections being watched.
    ///
    /// ```
    /// assert_eq!(tower_keepalive::serve::Drain::new().connections(), 0);
    /// ```
    pub fn connections(&self) -> usize {
        self.timers.live.load(Ordering::Acquire)
    }

    /// Drains: no connection is kept alive any more. Idle connections close at once; requests in flight
    /// finish, their HTTP/1 responses say `Connection: close`, HTTP/2 connections get GOAWAY. Returns when
    /// every watched connection is gone, or once `deadline` has passed, after dropping the connections
    /// still open. Returns the number of connections so dropped.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let drain = tower_keepalive::serve::Drain::new();
    /// assert_eq!(drain.drain(None).await, 0);
    /// # }
    /// ```
    pub async fn drain(self, deadline: Option<Duration>) -> usize {
        self.timers.set_state(DrainState::Draining);
        let Some(deadline) = deadline else {
            self.timers.all_gone().await;
            return 0;
        };
        if tokio::time::timeout(deadline, self.timers.all_gone())
            .await
            .is_ok()
        {
            return 0;
        }
        let left = self.connections();
        tracing::debug!(
            connections = left,
            "drain deadline passed; dropping connections"
        );
        self.timers.set_state(DrainState::Abort);
        self.timers.all_gone().await;
        left
    }
}

/// Tells every watched connection that the server's connection pressure changed: their idle limits
/// shrink or grow with it.
pub(crate) struct PressureSender {
    timers: Arc<Timers>,
}

impl PressureSender {
    /// The pressure rose: idle limits shrank, so every deadline moves earlier now. (Limits that grow
    /// need nothing: each deadline is looked at again when it comes, and moved later.)
    pub(crate) fn rose(&self) {
        self.timers.pressure_rose();
    }
}

/// One connection's view of a [`Drain`]. See [`Drain::watcher`].
///
/// ```
/// let drain = tower_keepalive::serve::Drain::new();
/// let watcher: tower_keepalive::serve::DrainWatcher = drain.watcher();
/// ```
#[derive(Debug)]
pub struct DrainWatcher {
    timers: Arc<Timers>,
}

impl Drop for DrainWatcher {
    fn drop(&mut self) {
        if self.timers.live.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.timers.gone.notify_waiters();
        }
    }
}

impl DrainWatcher {
    /// Drives `conn` through its lifecycle (see [`ConnectionHandle::drive`]) and closes it gracefully
    /// when the server drains. Resolves with the reason the connection closed. The connection's timer
    /// is the drain's (see [`Drain`]).
    ///
    /// ```no_run
    /// # async fn f(conn: impl tower_keepalive::serve::GracefulConnection<Error = hyper::Error>) {
    /// let layer = tower_keepalive::KeepAliveLayer::new();
    /// let drain = tower_keepalive::serve::Drain::new();
    /// let reason = drain.watcher().drive(layer.connection(), conn).await;
    /// # }
    /// ```
    pub fn drive<C>(self, handle: ConnectionHandle, conn: C) -> impl Future<Output = CloseReason>
    where
        C: GracefulConnection,
        C::Error: Into<BoxError>,
    {
        // On the heap, once: an `async fn` would keep the connection it is given and its pinned copy.
        let mut conn = Box::pin(conn);
        async move { self.drive_pinned(&handle, conn.as_mut()).await }
    }

    /// The drain's timers, which the connection's lifecycle uses as its timer.
    pub(crate) fn timers(&self) -> &Arc<Timers> {
        &self.timers
    }

    /// Hands the connection to the drain's timers before it is driven (during a TLS handshake), so that
    /// its idle timeout, the budget's shedding and a drain reach it as they reach a connection that has
    /// not sent a request yet: each decides a close through the handle, which wakes its task.
    #[cfg(feature = "tls")]
    pub(crate) fn watch_undriven(&self, handle: &ConnectionHandle) {
        self.timers.start(handle);
    }

    /// As [`drive`](Self::drive), with the connection pinned by the caller (stored once, not moved into
    /// each future on the way) and the watcher left counting until the caller drops it: the serve path
    /// reports the close first.
    pub(crate) fn drive_pinned<'a, C>(
        &'a self,
        handle: &'a ConnectionHandle,
        conn: Pin<&'a mut C>,
    ) -> Lifecycle<'a, C, &'a Arc<Timers>> {
        Lifecycle::new(handle, conn, &self.timers)
    }
}
