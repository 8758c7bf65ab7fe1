//! Shared by `hostile.rs`, `faults.rs` and `soak.rs`: the crate's own serve path on 127.0.0.1, behind a
//! listener that counts what it accepts, with every `on_close` report collected. A connection task that
//! panics never reports, so "every accepted connection reported exactly once" is what proves that nothing
//! panicked and nothing leaked. The test file must also declare `mod common;` (for `within`).

// Each test file uses its own part of this module.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::IntoFuture;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{HeaderValue, CONNECTION};
use http::{Request, Response};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tower::util::BoxCloneService;
use tower::Service;
use tower_keepalive::serve::Listener;
use tower_keepalive::{CloseReason, ConnectionHandle, KeepAliveLayer};

use crate::common::within;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = BoxBody<Bytes, BoxError>;
pub type App = BoxCloneService<Request<Incoming>, Response<Body>, Infallible>;

/// A body of known length.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).map_err(|e| match e {}).boxed()
}

/// One `on_close` report.
#[derive(Debug)]
pub struct Closed {
    pub handle: ConnectionHandle,
    pub reason: CloseReason,
    /// When `on_close` ran.
    pub at: Instant,
}

/// A TCP listener that counts the connections it hands to the serve loop.
struct CountingListener {
    inner: TcpListener,
    accepted: Arc<AtomicUsize>,
    accepted_tx: watch::Sender<usize>,
}

impl Listener for CountingListener {
    type Io = TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> io::Result<(TcpStream, SocketAddr)> {
        let accepted = Listener::accept(&mut self.inner).await?;
        let n = self.accepted.fetch_add(1, Ordering::SeqCst) + 1;
        self.accepted_tx.send_replace(n);
        Ok(accepted)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Listener::local_addr(&self.inner)
    }
}

/// `tower_keepalive::serve` running on 127.0.0.1, with its accounting.
pub struct TestServer {
    pub addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    accepted_rx: watch::Receiver<usize>,
    reports: mpsc::UnboundedReceiver<Closed>,
    /// Reports received but not yet taken by the test.
    waiting: VecDeque<Closed>,
    /// Reports taken so far by the test.
    taken: usize,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<io::Result<()>>>,
}

/// Serves `app` through `tower_keepalive::serve` with `layer` as its policy.
pub async fn start<S, B>(layer: KeepAliveLayer, app: S) -> TestServer
where
    S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    // A long accept queue: the kernel drops connections beyond it (clients then wait for SYN-ACK
    // retransmissions, seconds), and the soak test opens hundreds at once.
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(4096).unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let (accepted_tx, accepted_rx) = watch::channel(0);
    let listener = CountingListener {
        inner: listener,
        accepted: accepted.clone(),
        accepted_tx,
    };
    let (report, reports) = mpsc::unbounded_channel();
    let (shutdown, signal) = oneshot::channel::<()>();
    let server = tower_keepalive::serve(listener, app)
        .keep_alive(layer)
        .with_graceful_shutdown(async move {
            let _ = signal.await;
        })
        .on_close(move |handle, reason| {
            let _ = report.send(Closed {
                handle: handle.clone(),
                reason,
                at: Instant::now(),
            });
        });
    let task = tokio::spawn(server.into_future());
    TestServer {
        addr,
        accepted,
        accepted_rx,
        reports,
        waiting: VecDeque::new(),
        taken: 0,
        shutdown: Some(shutdown),
        task: Some(task),
    }
}

impl TestServer {
    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Waits until the server has accepted `n` connections in all.
    pub async fn wait_accepted(&mut self, n: usize) {
        let wait = self.accepted_rx.wait_for(|&a| a >= n);
        let ok = matches!(
            tokio::time::timeout(crate::common::WAIT, wait).await,
            Ok(Ok(_))
        );
        assert!(
            ok,
            "the server accepted {} connections, not {n}",
            self.accepted()
        );
    }

    /// The next `on_close` report.
    pub async fn next_close(&mut self) -> Closed {
        let closed = match self.waiting.pop_front() {
            Some(closed) => closed,
            None => within("an on_close report", self.reports.recv())
                .await
                .expect("the server stopped reporting"),
        };
        self.taken += 1;
        closed
    }

    /// Reports taken so far plus those already waiting.
    pub fn reported(&mut self) -> usize {
        while let Ok(closed) = self.reports.try_recv() {
            self.waiting.push_back(closed);
        }
        self.taken + self.waiting.len()
    }

    /// Gives the server its graceful shutdown signal, without waiting for the drain.
    pub fn begin_shutdown(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
    }

    /// Shuts the server down gracefully and checks its books: the serve future ends without error, and
    /// every connection ever accepted has reported its close exactly once. Returns the reports the test had
    /// not taken yet.
    pub async fn finish(mut self) -> Vec<Closed> {
        self.begin_shutdown();
        let task = self.task.take().unwrap();
        within("the server to drain", task)
            .await
            .expect("the serve task panicked")
            .expect("serve failed");
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

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// The hostile tests' app: answers with the request's fields, one `name: value` line each (values that are
/// not UTF-8 shown lossily), with a known length. `/close` adds `Connection: close` from the app.
pub fn echo_app() -> App {
    BoxCloneService::new(tower::service_fn(|req: Request<Incoming>| async move {
        let mut text = String::new();
        for (name, value) in req.headers() {
            text.push_str(name.as_str());
            text.push_str(": ");
            text.push_str(&String::from_utf8_lossy(value.as_bytes()));
            text.push('\n');
        }
        let mut res = Response::new(full(text));
        if req.uri().path() == "/close" {
            res.headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
        }
        Ok::<_, Infallible>(res)
    }))
}

/// The field names in an [`echo_app`] body.
pub fn echoed_names(body: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(body)
        .lines()
        .filter_map(|line| line.split_once(": ").map(|(name, _)| name.to_string()))
        .collect()
}

/// What a server sent back on a connection, up to its close.
#[derive(Debug)]
pub struct Exchange {
    pub bytes: Vec<u8>,
}

impl Exchange {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }
}

/// Writes `request` (ignoring write errors: the server may close before it has read everything) and reads
/// until the server closes the connection. Fails if it stays open for [`crate::common::WAIT`].
pub async fn send_until_closed(addr: SocketAddr, request: Vec<u8>) -> Exchange {
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
    Exchange { bytes }
}

/// A fresh client on a fresh connection gets an answer: the server is still serving.
pub async fn assert_serves_others(server: &mut TestServer) {
    let mut client = crate::common::RawClient::connect(server.addr).await;
    let res = client
        .request(crate::common::http_get(
            "/",
            "HTTP/1.1",
            &["Connection: close"],
        ))
        .await;
    assert_eq!(res.status_line, "HTTP/1.1 200 OK", "{res:#?}");
    client.expect_eof().await;
    let closed = server.next_close().await;
    assert_eq!(closed.reason, CloseReason::ClientClosed);
    assert_eq!(closed.handle.requests(), 1);
    assert_eq!(closed.handle.in_flight(), 0);
}
