//! TCP keepalive (`SO_KEEPALIVE`) on accepted connections: [`TcpKeepalive`].

use std::any::Any;
use std::io;
use std::time::Duration;

/// TCP keepalive probes for accepted connections (`SO_KEEPALIVE` with its idle time, interval and
/// count), set with [`Serve::tcp_keepalive`](super::Serve::tcp_keepalive) or
/// `axum::KeepAliveListener::tcp_keepalive` (feature `axum`), or by hand with [`apply`](Self::apply).
///
/// Off by default, as in nginx (`so_keepalive`), Apache and hyper: HTTP keep-alive's idle timeout
/// already takes back connections that sit idle, whether their client is still there or not. What TCP
/// keepalive finds is a peer that vanished without a FIN or RST (a host that lost power, a NAT or
/// firewall that forgot the flow) while the connection is *busy*: a long request, a long-poll, a
/// server-sent event stream or a WebSocket, where nothing is written for a while and the idle timeout
/// does not run. After `time` without a segment from the peer, the kernel sends a probe every
/// `interval`, and after `retries` unanswered probes the connection fails with `ETIMEDOUT`, which ends
/// the request and closes the connection. Probes are answered by the peer's kernel, so an application
/// that hangs with its socket open is not found this way.
///
/// `interval` and `retries` are left to the system (Linux: 75 s and 9) unless set; where the platform
/// cannot set one of them (`retries` on Windows, both on OpenBSD and Solaris), it is ignored.
///
/// ```
/// use std::time::Duration;
/// use tower_keepalive::serve::TcpKeepalive;
///
/// // A peer gone for 60 s is probed every 10 s and dropped after 3 unanswered probes: about 90 s.
/// let keepalive = TcpKeepalive::new(Duration::from_secs(60))
///     .interval(Duration::from_secs(10))
///     .retries(3);
/// # let _ = keepalive;
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpKeepalive {
    time: Duration,
    interval: Option<Duration>,
    retries: Option<u32>,
}

impl TcpKeepalive {
    /// Probes start after `time` with nothing received from the peer (Linux's `TCP_KEEPIDLE`; its
    /// default, 2 hours, is what a socket with only `SO_KEEPALIVE` set gets).
    ///
    /// ```
    /// let keepalive = tower_keepalive::serve::TcpKeepalive::new(std::time::Duration::from_secs(60));
    /// # let _ = keepalive;
    /// ```
    pub fn new(time: Duration) -> Self {
        TcpKeepalive {
            time,
            interval: None,
            retries: None,
        }
    }

    /// The time between two unanswered probes (`TCP_KEEPINTVL`).
    ///
    /// ```
    /// use std::time::Duration;
    /// let keepalive = tower_keepalive::serve::TcpKeepalive::new(Duration::from_secs(60))
    ///     .interval(Duration::from_secs(10));
    /// # let _ = keepalive;
    /// ```
    pub fn interval(mut self, interval: Duration) -> Self {
        self.interval = Some(interval);
        self
    }

    /// How many unanswered probes fail the connection (`TCP_KEEPCNT`).
    ///
    /// ```
    /// use std::time::Duration;
    /// let keepalive = tower_keepalive::serve::TcpKeepalive::new(Duration::from_secs(60)).retries(3);
    /// # let _ = keepalive;
    /// ```
    pub fn retries(mut self, retries: u32) -> Self {
        self.retries = Some(retries);
        self
    }

    /// Turns keepalive on for `stream` with these settings: for a hand-written accept loop, or for
    /// axum's `ListenerExt::tap_io`.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> std::io::Result<()> {
    /// use std::time::Duration;
    /// use tower_keepalive::serve::TcpKeepalive;
    ///
    /// let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    /// let client = tokio::net::TcpStream::connect(listener.local_addr()?).await?;
    /// let (stream, _) = listener.accept().await?;
    /// TcpKeepalive::new(Duration::from_secs(60)).apply(&stream)?;
    /// # drop(client);
    /// # Ok(())
    /// # }
    /// ```
    pub fn apply(&self, stream: &tokio::net::TcpStream) -> io::Result<()> {
        let mut keepalive = socket2::TcpKeepalive::new().with_time(self.time);
        #[cfg(any(
            target_os = "android",
            target_os = "dragonfly",
            target_os = "freebsd",
            target_os = "fuchsia",
            target_os = "illumos",
            target_os = "linux",
            target_os = "netbsd",
            target_vendor = "apple",
            windows,
        ))]
        if let Some(interval) = self.interval {
            keepalive = keepalive.with_interval(interval);
        }
        #[cfg(any(
            target_os = "android",
            target_os = "dragonfly",
            target_os = "freebsd",
            target_os = "fuchsia",
            target_os = "illumos",
            target_os = "linux",
            target_os = "netbsd",
            target_vendor = "apple",
        ))]
        if let Some(retries) = self.retries {
            keepalive = keepalive.with_retries(retries);
        }
        socket2::SockRef::from(stream).set_tcp_keepalive(&keepalive)
    }

    /// Applies to an accepted connection's IO if it is a TCP stream; any other IO (a Unix socket, a
    /// listener's own type) is left alone. Checked by type, so it costs nothing where it cannot apply.
    pub(crate) fn apply_to<I: Any>(&self, io: &I) {
        let Some(stream) = (io as &dyn Any).downcast_ref::<tokio::net::TcpStream>() else {
            return;
        };
        // A connection without probes still works; the error is that one socket's.
        if let Err(err) = self.apply(stream) {
            tracing::debug!(error = %err, "setting TCP keepalive failed");
        }
    }
}
