use std::any::Any;
use std::future::Future;
use std::io;
use std::time::Duration;

use futures_util::FutureExt;
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

/// Stops new clients from joining a TCP listener's accept queue, ahead of closing it (Linux and
/// Android; elsewhere, or for another listener, does nothing and returns `false`). Closing a listener
/// resets the connections in its queue, and a client whose connect has completed has sent its request
/// on it: to serve every client the queue took, the queue must stop taking them before it is emptied
/// for the last time. A socket filter drops new connection attempts (SYN): such a client tries again
/// about a second later (its SYN retransmission), finds the listener closed and is refused, which a
/// balancer takes as a sign to use another server (nginx's `proxy_next_upstream error`), its request
/// unsent. Handshakes already under way complete, and join the queue.
pub(crate) fn freeze_queue<L: Any>(listener: &L) -> bool {
    #[cfg(unix)]
    if let Some(tcp) = (listener as &dyn Any).downcast_ref::<tokio::net::TcpListener>() {
        return freeze(std::os::fd::AsFd::as_fd(tcp));
    }
    let _ = listener;
    false
}

/// [`freeze_queue`] on a TCP listener's socket.
#[cfg(unix)]
fn freeze(socket: std::os::fd::BorrowedFd<'_>) -> bool {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        use socket2::SockFilter;
        // Classic BPF over the TCP header: drop a segment with SYN set, keep any other whole.
        const DROP_SYN: [SockFilter; 4] = [
            // BPF_LD | BPF_B | BPF_ABS: A = the flags byte.
            SockFilter::new(0x30, 0, 0, 13),
            // BPF_JMP | BPF_JSET | BPF_K: SYN set? Next; else skip one.
            SockFilter::new(0x45, 0, 1, 0x02),
            // BPF_RET | BPF_K: drop.
            SockFilter::new(0x06, 0, 0, 0),
            // BPF_RET | BPF_K: keep the whole segment.
            SockFilter::new(0x06, 0, 0, u32::MAX),
        ];
        socket2::SockRef::from(&socket)
            .attach_filter(&DROP_SYN)
            .is_ok()
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    {
        let _ = socket;
        false
    }
}

/// The next client in the listener's accept queue, without waiting for new ones; `None` when the
/// queue is empty (or failing: out of file descriptors). A runtime learns of a client the kernel queued
/// when its IO driver next turns, which a busy runtime does milliseconds later: for tokio's TCP and
/// Unix listeners the kernel is asked (`poll(2)`), and a client it holds is waited for (at most
/// [`QUEUED_WAIT`]). Another listener's queue is taken as the runtime sees it.
pub(crate) async fn accept_queued<L: Listener>(listener: &mut L) -> Option<(L::Io, L::Addr)> {
    loop {
        let accepted = match listener.accept().now_or_never() {
            Some(accepted) => accepted,
            None if kernel_queue(listener) == Some(true) => {
                tokio::time::timeout(QUEUED_WAIT, listener.accept())
                    .await
                    .ok()?
            }
            None => return None,
        };
        match accepted {
            Ok(accepted) => return Some(accepted),
            // One client gone before it was accepted: the next.
            Err(err) if Backoff::per_connection(&err) => continue,
            Err(_) => return None,
        }
    }
}

/// How long the end of a lame-duck period waits for a client the kernel holds to reach the runtime
/// (and be accepted): a generous bound on a turn of a busy runtime's IO driver.
const QUEUED_WAIT: Duration = Duration::from_secs(1);

/// Whether the kernel holds a client in the queue of tokio's TCP or Unix listener (`None`: another
/// listener, or not unix).
fn kernel_queue<L: Any>(listener: &L) -> Option<bool> {
    #[cfg(unix)]
    {
        use std::os::fd::AsFd;
        let listener = listener as &dyn Any;
        if let Some(tcp) = listener.downcast_ref::<tokio::net::TcpListener>() {
            return Some(holds_clients(tcp.as_fd()));
        }
        if let Some(unix) = listener.downcast_ref::<tokio::net::UnixListener>() {
            return Some(holds_clients(unix.as_fd()));
        }
        None
    }
    #[cfg(not(unix))]
    {
        let _ = listener;
        None
    }
}

/// Whether a listening socket's accept queue holds a client: `poll(2)` reports it readable then.
#[cfg(unix)]
fn holds_clients(socket: std::os::fd::BorrowedFd<'_>) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut fds = [PollFd::new(socket, PollFlags::POLLIN)];
    poll(&mut fds, PollTimeout::ZERO).is_ok_and(|ready| ready > 0)
}

/// The `axum::serve` path's hold on its TCP listener's accept queue, for the end of a lame-duck
/// period: a second descriptor of the listening socket (axum owns the listener, and keeps accepting
/// while the period's future is pending). Dropped, it leaves the socket to the listener alone.
#[cfg(feature = "axum")]
#[derive(Debug)]
pub(crate) struct Queue {
    #[cfg(unix)]
    socket: std::os::fd::OwnedFd,
}

#[cfg(feature = "axum")]
impl Queue {
    /// The queue of `listener`, if it is tokio's TCP listener (on unix).
    pub(crate) fn of<L: Any>(listener: &L) -> Option<Queue> {
        #[cfg(unix)]
        if let Some(tcp) = (listener as &dyn Any).downcast_ref::<tokio::net::TcpListener>() {
            let socket = std::os::fd::AsFd::as_fd(tcp).try_clone_to_owned().ok()?;
            return Some(Queue { socket });
        }
        let _ = listener;
        None
    }

    /// Freezes the queue ([`freeze_queue`]), then waits until whoever accepts from the listener has
    /// taken every client it holds: `accepted` is told of each accept. At most [`QUEUED_WAIT`] without
    /// an accept.
    pub(crate) async fn empty(self, accepted: &tokio::sync::Notify) {
        #[cfg(unix)]
        {
            use std::os::fd::AsFd;
            freeze(self.socket.as_fd());
            loop {
                let mut next = std::pin::pin!(accepted.notified());
                next.as_mut().enable();
                if !holds_clients(self.socket.as_fd()) {
                    return;
                }
                if tokio::time::timeout(QUEUED_WAIT, next).await.is_err() {
                    return;
                }
            }
        }
        #[cfg(not(unix))]
        let _ = accepted;
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
    /// An accept error that belongs to one client only: the next may be accepted at once.
    fn per_connection(err: &io::Error) -> bool {
        matches!(
            err.kind(),
            io::ErrorKind::ConnectionAborted
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionRefused
                | io::ErrorKind::Interrupted
        )
    }

    pub(crate) fn reset(&mut self) {
        self.current = None;
    }

    pub(crate) fn on_error(&mut self, err: &io::Error) -> Option<Duration> {
        if Self::per_connection(err) {
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
