//! The crate's serve path (`tower_keepalive::serve`) on 127.0.0.1, behind a listener that counts what it
//! accepts, with every `on_close` report collected. A connection task that panics never reports, so
//! "every accepted connection reported exactly once" ([`TestServer::finish`]) is what proves that nothing
//! panicked and nothing leaked.

use std::collections::VecDeque;
use std::future::IntoFuture;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::body::Incoming;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tower::Service;
use tower_keepalive::serve::{HttpBuilder, Listener, TcpKeepalive};
use tower_keepalive::{CloseReason, ConnectionHandle, KeepAliveLayer};

use super::apps::{self, BoxError};
use super::http1::{http_get, RawClient};
use super::{within, within_for, WAIT};

/// One connection's end, as reported through `on_close`.
#[derive(Debug, Clone)]
pub struct Closed {
    pub handle: ConnectionHandle,
    pub reason: CloseReason,
    /// When `on_close` ran: at or after the moment the connection ended.
    pub at: Instant,
    /// `handle.in_flight()` when `on_close` ran.
    pub in_flight: usize,
}

/// Serves [`apps::timed`] on 127.0.0.1 with `layer`.
pub async fn start(layer: KeepAliveLayer) -> TestServer {
    TestServer::builder(layer).start()
}

/// Serves `app` on 127.0.0.1 with `layer`.
pub async fn serve<S, B>(layer: KeepAliveLayer, app: S) -> TestServer
where
    S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    TestServer::builder(layer).serve(app)
}

/// How a [`TestServer`] is set up; [`TestServer::builder`] makes one.
pub struct Builder<L> {
    listener: L,
    options: Options,
}

/// The hibernation delay every server of this test binary gets unless its test sets one: 1 ms in
/// `tests/hibernated.rs`, which runs the lifecycle's tests again with each idle HTTP/1 connection
/// hibernating right after each response; the serve path's default elsewhere.
pub const FORCED_HIBERNATION: Option<Duration> =
    if bytes_eq(env!("CARGO_CRATE_NAME").as_bytes(), b"hibernated") {
        Some(Duration::from_millis(1))
    } else {
        None
    };

const fn bytes_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// A change to hyper's own settings (`Serve::http_builder`).
type HttpSettings = Box<dyn FnOnce(&mut HttpBuilder)>;

/// The serve path's settings a test may give, each left at the serve path's default unless set.
struct Options {
    layer: KeepAliveLayer,
    drain_timeout: Option<Duration>,
    lame_duck: Option<Duration>,
    header_timeout: Option<Duration>,
    connection_limits: Option<(usize, usize)>,
    peer_addr: Option<bool>,
    tcp_keepalive: Option<TcpKeepalive>,
    http: Vec<HttpSettings>,
    /// `Some(None)`: no hibernation; `None`: the serve path's default, or [`FORCED_HIBERNATION`].
    hibernate_after: Option<Option<Duration>>,
    #[cfg(feature = "tls")]
    tls: Option<rustls::ServerConfig>,
    #[cfg(feature = "tls")]
    tls_handshake_timeout: Option<Duration>,
}

impl<L: Listener> Builder<L> {
    /// Serves on `listener` instead of a fresh TCP listener on 127.0.0.1.
    pub fn listener<M: Listener>(self, listener: M) -> Builder<M> {
        Builder {
            listener,
            options: self.options,
        }
    }

    /// A bound on the time a request head may take (`Serve::header_timeout`).
    pub fn header_timeout(mut self, timeout: Duration) -> Self {
        self.options.header_timeout = Some(timeout);
        self
    }

    /// The connection budget (`Serve::connection_limits`).
    pub fn connection_limits(mut self, soft: usize, hard: usize) -> Self {
        self.options.connection_limits = Some((soft, hard));
        self
    }

    /// A deadline for the drain after the shutdown signal (`Serve::drain_timeout`).
    pub fn drain_timeout(mut self, timeout: Duration) -> Self {
        self.options.drain_timeout = Some(timeout);
        self
    }

    /// A lame-duck period before the drain (`Serve::lame_duck`).
    pub fn lame_duck(mut self, period: Duration) -> Self {
        self.options.lame_duck = Some(period);
        self
    }

    /// Whether requests carry the peer's address (`Serve::peer_addr`).
    pub fn peer_addr(mut self, on: bool) -> Self {
        self.options.peer_addr = Some(on);
        self
    }

    /// TCP keepalive on accepted sockets (`Serve::tcp_keepalive`).
    pub fn tcp_keepalive(mut self, keepalive: TcpKeepalive) -> Self {
        self.options.tcp_keepalive = Some(keepalive);
        self
    }

    /// hyper's own settings (`Serve::http_builder`).
    pub fn http_builder(mut self, configure: impl FnOnce(&mut HttpBuilder) + 'static) -> Self {
        self.options.http.push(Box::new(configure));
        self
    }

    /// HTTP/1 hibernation after `after` idle (`Serve::hibernate_after`).
    pub fn hibernate_after(mut self, after: Duration) -> Self {
        self.options.hibernate_after = Some(Some(after));
        self
    }

    /// No hibernation (`Serve::no_hibernation`).
    pub fn no_hibernation(mut self) -> Self {
        self.options.hibernate_after = Some(None);
        self
    }

    /// TLS with `config` (`Serve::tls`).
    #[cfg(feature = "tls")]
    pub fn tls(mut self, config: rustls::ServerConfig) -> Self {
        self.options.tls = Some(config);
        self
    }

    /// A bound on the TLS handshake (`Serve::tls_handshake_timeout`).
    #[cfg(feature = "tls")]
    pub fn tls_handshake_timeout(mut self, timeout: Duration) -> Self {
        self.options.tls_handshake_timeout = Some(timeout);
        self
    }

    /// Serves [`apps::timed`], whose handler starts reach [`TestServer::handler_started`].
    pub fn start(self) -> TestServer<L::Addr> {
        let (started_tx, started) = mpsc::unbounded_channel();
        let mut server = self.serve(apps::timed(started_tx));
        server.started = started;
        server
    }

    /// Serves `app`.
    pub fn serve<S, B>(self, app: S) -> TestServer<L::Addr>
    where
        S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
        B: http_body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        let addr = self.listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let (accepted_tx, accepted_rx) = watch::channel(0);
        let listener = CountingListener {
            inner: self.listener,
            accepted: accepted.clone(),
            accepted_tx,
        };
        let (report, reports) = mpsc::unbounded_channel();
        let (shutdown, signal) = oneshot::channel::<()>();
        let options = self.options;
        let mut server = tower_keepalive::serve(listener, app)
            .keep_alive(options.layer)
            .with_graceful_shutdown(async move {
                let _ = signal.await;
            })
            .on_close(move |handle, reason| {
                let _ = report.send(Closed {
                    handle: handle.clone(),
                    reason,
                    at: Instant::now(),
                    in_flight: handle.in_flight(),
                });
            });
        if let Some(timeout) = options.drain_timeout {
            server = server.drain_timeout(timeout);
        }
        if let Some(period) = options.lame_duck {
            server = server.lame_duck(period);
        }
        if let Some(timeout) = options.header_timeout {
            server = server.header_timeout(timeout);
        }
        if let Some((soft, hard)) = options.connection_limits {
            server = server.connection_limits(soft, hard);
        }
        if let Some(on) = options.peer_addr {
            server = server.peer_addr(on);
        }
        if let Some(keepalive) = options.tcp_keepalive {
            server = server.tcp_keepalive(keepalive);
        }
        for configure in options.http {
            server = server.http_builder(configure);
        }
        match options.hibernate_after.or(FORCED_HIBERNATION.map(Some)) {
            Some(Some(after)) => server = server.hibernate_after(after),
            Some(None) => server = server.no_hibernation(),
            None => {}
        }
        #[cfg(feature = "tls")]
        {
            if let Some(config) = options.tls {
                server = server.tls(config);
            }
            if let Some(timeout) = options.tls_handshake_timeout {
                server = server.tls_handshake_timeout(timeout);
            }
        }
        TestServer {
            addr,
            accepted,
            accepted_rx,
            reports,
            waiting: VecDeque::new(),
            taken: 0,
            history: Vec::new(),
            shutdown: Some(shutdown),
            task: Some(tokio::spawn(server.into_future())),
            started: mpsc::unbounded_channel().1,
        }
    }
}

/// A listener that counts the connections it hands to the serve loop.
struct CountingListener<L> {
    inner: L,
    accepted: Arc<AtomicUsize>,
    accepted_tx: watch::Sender<usize>,
}

impl<L: Listener> Listener for CountingListener<L> {
    type Io = L::Io;
    type Addr = L::Addr;

    async fn accept(&mut self) -> io::Result<(L::Io, L::Addr)> {
        let accepted = self.inner.accept().await?;
        let n = self.accepted.fetch_add(1, Ordering::SeqCst) + 1;
        self.accepted_tx.send_replace(n);
        Ok(accepted)
    }

    fn local_addr(&self) -> io::Result<L::Addr> {
        self.inner.local_addr()
    }
}

/// `tower_keepalive::serve` running, with its accounting.
pub struct TestServer<A = SocketAddr> {
    pub addr: A,
    accepted: Arc<AtomicUsize>,
    accepted_rx: watch::Receiver<usize>,
    reports: mpsc::UnboundedReceiver<Closed>,
    /// Reports received but not yet taken by the test.
    waiting: VecDeque<Closed>,
    /// Reports taken so far by the test.
    taken: usize,
    /// The reason of every report received so far, taken or not, in order.
    history: Vec<CloseReason>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<io::Result<()>>>,
    /// One message per handler start of [`apps::timed`] (`"slow"`, `"stream"`, ...).
    pub started: mpsc::UnboundedReceiver<&'static str>,
}

impl TestServer {
    /// A server on a fresh TCP listener on 127.0.0.1, with `layer` as its policy. Its accept queue is
    /// long: the kernel drops connections beyond it (clients then wait for SYN-ACK retransmissions,
    /// seconds), and the soak test opens hundreds at once.
    pub fn builder(layer: KeepAliveLayer) -> Builder<TcpListener> {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        Builder {
            listener: socket.listen(4096).unwrap(),
            options: Options {
                layer,
                drain_timeout: None,
                lame_duck: None,
                header_timeout: None,
                connection_limits: None,
                peer_addr: None,
                tcp_keepalive: None,
                http: Vec::new(),
                hibernate_after: None,
                #[cfg(feature = "tls")]
                tls: None,
                #[cfg(feature = "tls")]
                tls_handshake_timeout: None,
            },
        }
    }
}

impl<A> TestServer<A> {
    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Waits until the server has accepted `n` connections in all.
    pub async fn wait_accepted(&mut self, n: usize) {
        let wait = self.accepted_rx.wait_for(|&a| a >= n);
        let ok = matches!(tokio::time::timeout(WAIT, wait).await, Ok(Ok(_)));
        assert!(
            ok,
            "the server accepted {} connections, not {n}",
            self.accepted()
        );
    }

    /// The next `on_close` report, in the order the connections closed.
    pub async fn next_close(&mut self) -> Closed {
        let closed = match self.waiting.pop_front() {
            Some(closed) => closed,
            None => {
                let closed = within("a connection to close", self.reports.recv())
                    .await
                    .expect("the server stopped reporting");
                self.history.push(closed.reason);
                closed
            }
        };
        self.taken += 1;
        closed
    }

    /// Asserts that no connection has reported its close yet.
    #[track_caller]
    pub fn assert_no_close(&mut self) {
        if let Some(closed) = self.waiting.front() {
            panic!("unexpected close: {closed:?}");
        }
        if let Ok(closed) = self.reports.try_recv() {
            panic!("unexpected close: {closed:?}");
        }
    }

    /// Reports taken so far plus those already waiting.
    pub fn reported(&mut self) -> usize {
        while let Ok(closed) = self.reports.try_recv() {
            self.history.push(closed.reason);
            self.waiting.push_back(closed);
        }
        self.taken + self.waiting.len()
    }

    /// The reason of every close reported so far, taken by the test or not, in the order reported: a
    /// snapshot, without waiting.
    pub fn reasons_so_far(&mut self) -> Vec<CloseReason> {
        self.reported();
        self.history.clone()
    }

    /// Waits until a handler of [`apps::timed`] has started.
    pub async fn handler_started(&mut self) -> &'static str {
        within("a handler to start", self.started.recv())
            .await
            .expect("app gone")
    }

    /// Gives the server its graceful shutdown signal, without waiting for the drain. Once only.
    #[track_caller]
    pub fn shutdown(&mut self) {
        let _ = self.shutdown.take().expect("shut down twice").send(());
    }

    /// Waits at most `limit` for the serve future to return, which it must do without an error.
    pub async fn finished(&mut self, limit: Duration) {
        let task = self.task.take().expect("awaited twice");
        within_for("the serve future to return", limit, task)
            .await
            .expect("serve task panicked")
            .expect("serve returned an error");
    }

    /// Shuts the server down gracefully (unless [`shutdown`](Self::shutdown) did already) and checks its
    /// books: the serve future ends without error, and every connection ever accepted has reported its
    /// close exactly once. Returns the reports the test had not taken yet.
    pub async fn finish(mut self) -> Vec<Closed> {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        self.finished(WAIT).await;
        let mut rest: Vec<Closed> = self.waiting.drain(..).collect();
        // The channel ends once the last connection task has run its `on_close`.
        while let Some(closed) = within("the remaining on_close reports", self.reports.recv()).await
        {
            rest.push(closed);
        }
        let accepted = self.accepted();
        assert_eq!(
            self.taken + rest.len(),
            accepted,
            "{accepted} connections accepted, {} reported closed: a connection task panicked or leaked",
            self.taken + rest.len()
        );
        rest
    }
}

impl<A> Drop for TestServer<A> {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// What a server sent back on a connection, up to its close.
#[derive(Debug)]
pub struct Received {
    pub bytes: Vec<u8>,
}

impl Received {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }
}

/// Writes `request` (ignoring write errors: the server may close before it has read everything) and reads
/// until the server closes the connection. Fails if it stays open for [`WAIT`].
pub async fn send_until_closed(addr: SocketAddr, request: Vec<u8>) -> Received {
    let stream = within("connect", TcpStream::connect(addr)).await.unwrap();
    let (mut read, mut write) = stream.into_split();
    let writer = tokio::spawn(async move {
        let _ = write.write_all(&request).await;
        // Keep the write half open: the server, not the client, must end the connection.
        write
    });
    let mut bytes = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        match within("the server to close the connection", read.read(&mut chunk)).await {
            Ok(0) => break,
            Ok(n) => bytes.extend_from_slice(&chunk[..n]),
            // A server that closes with input unread resets the connection.
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("read failed: {e}"),
        }
    }
    drop(within("the writer", writer).await);
    Received { bytes }
}

/// A fresh client on a fresh connection gets an answer: the server is still serving.
pub async fn assert_serves_others(server: &mut TestServer) {
    let mut client = RawClient::connect(server.addr).await;
    let res = client
        .request(http_get("/", "HTTP/1.1", &["Connection: close"]))
        .await;
    assert_eq!(res.status_line, "HTTP/1.1 200 OK", "{res:#?}");
    client.expect_eof().await;
    let closed = server.next_close().await;
    assert_eq!(closed.reason, CloseReason::ClientClosed);
    assert_eq!(closed.handle.requests(), 1);
    assert_eq!(closed.handle.in_flight(), 0);
}

/// A Unix socket path of one test's own in the temporary directory, removed when dropped.
#[cfg(unix)]
pub struct UnixPath(pub std::path::PathBuf);

#[cfg(unix)]
impl UnixPath {
    /// A fresh path for `test`, and a listener bound to it.
    pub fn bind(test: &str) -> (Self, tokio::net::UnixListener) {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let path = std::env::temp_dir().join(format!(
            "tower-keepalive-{test}-{}-{nanos}.sock",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&path);
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        (UnixPath(path), listener)
    }

    /// A raw HTTP/1 client connected to the socket.
    pub async fn connect(&self) -> RawClient<tokio::net::UnixStream> {
        let stream = within("connect", tokio::net::UnixStream::connect(&self.0))
            .await
            .unwrap();
        RawClient::new(stream)
    }
}

#[cfg(unix)]
impl Drop for UnixPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
