use std::future::Future;
use std::io;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};

/// A source of connections for [`serve`](crate::serve()): a TCP or Unix listener, or your own (a TLS
/// acceptor's streams, say).
///
/// `TcpListener::bind` listens with a backlog of 128: a burst of connects beyond it has SYNs dropped and
/// clients retrying a second later. For bursty traffic, and for the connection budget's accept queue,
/// build the listener with [`tokio::net::TcpSocket`] and `listen(1024)` or more (nginx uses 511).
///
/// # Example
///
/// ```
/// use tower_keepalive::serve::Listener;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> std::io::Result<()> {
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
/// let addr = Listener::local_addr(&listener)?;
/// assert!(addr.ip().is_loopback());
/// # Ok(())
/// # }
/// ```
pub trait Listener: Send + 'static {
    /// The connection type.
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// The peer address type; in each connection's `tracing` span as `network.peer.address` and
    /// `network.peer.port` when its `Debug` form is an IP socket address (as `SocketAddr`'s is), else
    /// as `network.peer.address` in that form; and cloned into every request's extensions as
    /// [`PeerAddr`](super::PeerAddr) (and axum's `ConnectInfo` with feature `axum`, and tonic's
    /// `TcpConnectInfo` with feature `tonic` when it is a `SocketAddr`).
    type Addr: Clone + Send + Sync + std::fmt::Debug + 'static;

    /// Accepts the next connection. An error ends nothing: the serve loop backs off and goes on.
    fn accept(&mut self) -> impl Future<Output = io::Result<(Self::Io, Self::Addr)>> + Send;

    /// The local address being listened on.
    fn local_addr(&self) -> io::Result<Self::Addr>;
}

impl Listener for tokio::net::TcpListener {
    type Io = tokio::net::TcpStream;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> io::Result<(Self::Io, Self::Addr)> {
        let (io, addr) = tokio::net::TcpListener::accept(self).await?;
        // Responses are written whole; Nagle would hold back the end of one until the client's ACK.
        let _ = io.set_nodelay(true);
        Ok((io, addr))
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        tokio::net::TcpListener::local_addr(self)
    }
}

#[cfg(unix)]
impl Listener for tokio::net::UnixListener {
    type Io = tokio::net::UnixStream;
    type Addr = tokio::net::unix::SocketAddr;

    async fn accept(&mut self) -> io::Result<(Self::Io, Self::Addr)> {
        tokio::net::UnixListener::accept(self).await
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        tokio::net::UnixListener::local_addr(self)
    }
}

/// What the accept loop does with each connection it accepts, before serving it.
#[derive(Clone, Debug)]
pub(crate) struct Accepting {
    pub(crate) peer_addr: bool,
    pub(crate) tcp_keepalive: Option<super::TcpKeepalive>,
}

impl Default for Accepting {
    fn default() -> Self {
        Accepting {
            peer_addr: true,
            tcp_keepalive: None,
        }
    }
}

impl Accepting {
    /// The peer address to put into the connection's requests, if that is on.
    pub(crate) fn peer<A: Clone>(&self, addr: &A) -> Option<A> {
        self.peer_addr.then(|| addr.clone())
    }

    /// Sets the socket options of a connection just accepted (before any TLS handshake).
    pub(crate) fn configure<I: 'static>(&self, io: &I) {
        if let Some(keepalive) = &self.tcp_keepalive {
            keepalive.apply_to(io);
        }
    }
}

/// Pauses after accept errors so that a persistent one (`EMFILE`: out of file descriptors) does not spin
/// the loop: 10 ms doubling up to 1 s. Errors that belong to one connection only are skipped at once.
#[derive(Debug, Default)]
pub(crate) struct Backoff {
    current: Option<Duration>,
}

impl Backoff {
    pub(crate) fn reset(&mut self) {
        self.current = None;
    }

    pub(crate) fn on_error(&mut self, err: &io::Error) -> Option<Duration> {
        if matches!(
            err.kind(),
            io::ErrorKind::ConnectionAborted
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionRefused
                | io::ErrorKind::Interrupted
        ) {
            return None;
        }
        let next = self.current.map_or(Duration::from_millis(10), |d| {
            (d * 2).min(Duration::from_secs(1))
        });
        self.current = Some(next);
        tracing::error!(error = %err, pause = ?next, "accept failed");
        Some(next)
    }
}
