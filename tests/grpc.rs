//! gRPC on the serve path (feature `tonic`): tonic-health's generated service served by
//! `tower_keepalive::serve` (h2c, and TLS with feature `tls`) and by `axum::serve` with
//! `KeepAliveListener`, called by tonic's own client `Channel`. Checks that `Request::remote_addr()`
//! and `local_addr()` work, that an idle channel's connection gets GOAWAY (RFC 9113 section 6.8) and
//! the channel reconnects for its next call, and that max age moves new calls to a fresh connection
//! while a server-streaming call runs on through the grace period and is cut after it, and a slow
//! call in flight at the maximum age finishes within the grace.
//!
//! The client connects through a connector of the test's own, which records each connection's local
//! address and every byte the server sends on it (h2c), so that GOAWAY frames are read on the wire.

#![cfg(feature = "tonic")]

mod support;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use support::server::{Builder, TestServer};
use support::{within, WAIT};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Notify};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::health_server::HealthServer;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::server::{HealthReporter, HealthService};
use tower_keepalive::{CloseReason, KeepAliveLayer};

/// What the server's interceptor saw on one call: tonic's `remote_addr()` and `local_addr()`.
type Seen = (Option<SocketAddr>, Option<SocketAddr>);

struct Server {
    addr: SocketAddr,
    reporter: HealthReporter,
    /// Every call's addresses, as the service saw them.
    seen: mpsc::UnboundedReceiver<Seen>,
    inner: TestServer,
}

impl Server {
    async fn next_seen(&mut self) -> Seen {
        within("a call to reach the service", self.seen.recv())
            .await
            .expect("server running")
    }

    /// The next connection's close reason and age, from `Serve::on_close`.
    async fn next_close(&mut self) -> (CloseReason, Duration) {
        let closed = self.inner.next_close().await;
        (closed.reason, closed.at - closed.handle.opened_at())
    }
}

/// An interceptor that reports what tonic's `Request` says of each call's connection (tonic builds
/// it from the request's extensions, where the serve path put them).
#[derive(Clone)]
struct Report(mpsc::UnboundedSender<Seen>);

impl tonic::service::Interceptor for Report {
    fn call(&mut self, req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let _ = self.0.send((req.remote_addr(), req.local_addr()));
        Ok(req)
    }
}

type Health = InterceptedService<HealthServer<HealthService>, Report>;

/// The health service behind the reporting interceptor, and what it reports.
fn health(reporter: &HealthReporter) -> (Health, mpsc::UnboundedReceiver<Seen>) {
    let (seen_tx, seen) = mpsc::unbounded_channel();
    let service = HealthServer::new(HealthService::from_health_reporter(reporter.clone()));
    (InterceptedService::new(service, Report(seen_tx)), seen)
}

/// Answers a call that carries `x-delay-ms` that much later: a slow call.
#[derive(Clone)]
struct Delay<S>(S);

impl<S, B> tower::Service<http::Request<B>> for Delay<S>
where
    S: tower::Service<http::Request<B>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let delay = req
            .headers()
            .get("x-delay-ms")
            .and_then(|v| v.to_str().ok()?.parse().ok())
            .map(Duration::from_millis);
        let call = self.0.call(req);
        Box::pin(async move {
            if let Some(delay) = delay {
                tokio::time::sleep(delay).await;
            }
            call.await
        })
    }
}

/// Serves the health service on 127.0.0.1 with `layer`, the serve path set up further by `configure`.
fn start_with(
    layer: KeepAliveLayer,
    configure: impl FnOnce(Builder<TcpListener>) -> Builder<TcpListener>,
) -> Server {
    let reporter = HealthReporter::new();
    let (svc, seen) = health(&reporter);
    let inner = configure(TestServer::builder(layer)).serve(Delay(svc));
    Server {
        addr: inner.addr,
        reporter,
        seen,
        inner,
    }
}

/// Serves the health service on 127.0.0.1 (h2c) with `layer`.
fn start(layer: KeepAliveLayer) -> Server {
    start_with(layer, |builder| builder)
}

/// One connection the client made: its local address, and the bytes the server sent on it.
#[derive(Clone)]
struct Conn {
    local: SocketAddr,
    received: Arc<Mutex<Vec<u8>>>,
    /// Notified on each read, and when the server closes.
    read: Arc<Notify>,
    /// The connection has ended: the server closed it (end of stream or error), or the client.
    closed: Arc<AtomicBool>,
}

impl Conn {
    fn goaways(&self) -> Vec<(u32, u32)> {
        goaways(&self.received.lock().unwrap())
    }

    /// Waits until the GOAWAY frames the server has sent on this connection (last stream id, error
    /// code) satisfy `done`; returns them.
    async fn goaways_until(&self, done: impl Fn(&[(u32, u32)]) -> bool) -> Vec<(u32, u32)> {
        tokio::time::timeout(WAIT, async {
            loop {
                let read = self.read.notified();
                let goaways = self.goaways();
                if done(&goaways) {
                    return goaways;
                }
                read.await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("GOAWAY frames in time, got {:?}", self.goaways()))
    }

    /// Waits until the connection has ended; the GOAWAY frames the server sent on it.
    async fn closed(&self) -> Vec<(u32, u32)> {
        within("the connection to end", async {
            loop {
                let read = self.read.notified();
                if self.closed.load(Ordering::Acquire) {
                    return self.goaways();
                }
                read.await;
            }
        })
        .await
    }
}

/// The GOAWAY frames (last stream id, error code) in what an h2 server sent: frames from the first
/// byte (the server sends no preface of its own), RFC 9113 section 4.1 and 6.8.
fn goaways(mut bytes: &[u8]) -> Vec<(u32, u32)> {
    let mut found = Vec::new();
    while bytes.len() >= 9 {
        let len = u32::from_be_bytes([0, bytes[0], bytes[1], bytes[2]]) as usize;
        let Some(payload) = bytes.get(9..9 + len) else {
            break;
        };
        if bytes[3] == 0x7 && payload.len() >= 8 {
            let last = u32::from_be_bytes(payload[0..4].try_into().unwrap()) & 0x7fff_ffff;
            let code = u32::from_be_bytes(payload[4..8].try_into().unwrap());
            found.push((last, code));
        }
        bytes = &bytes[9 + len..];
    }
    found
}

/// At least one GOAWAY, every one NO_ERROR and keeping stream 1, the first call's (h2 sends a first
/// one naming the highest stream id, 2^31-1, then one naming the last stream it will serve).
fn assert_graceful(goaways: &[(u32, u32)]) {
    assert!(!goaways.is_empty(), "no GOAWAY");
    for &(last, code) in goaways {
        assert_eq!(code, 0, "GOAWAY with an error: {goaways:?}");
        assert!(last >= 1, "stream 1 refused: {goaways:?}");
    }
}

/// A TCP stream that keeps a copy of what it reads.
struct Tap {
    io: TcpStream,
    conn: Conn,
}

impl AsyncRead for Tap {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let res = Pin::new(&mut this.io).poll_read(cx, buf);
        if let Poll::Ready(done) = &res {
            let read = &buf.filled()[before..];
            if read.is_empty() || done.is_err() {
                this.conn.closed.store(true, Ordering::Release);
            }
            this.conn.received.lock().unwrap().extend_from_slice(read);
            this.conn.read.notify_waiters();
        }
        res
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        self.conn.closed.store(true, Ordering::Release);
        self.conn.read.notify_waiters();
    }
}

impl AsyncWrite for Tap {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// A tonic `Channel` to `addr` (URI `uri`, `http://` or `https://`), through a connector that reports
/// each connection it makes.
async fn channel(endpoint: Endpoint, addr: SocketAddr) -> (Channel, mpsc::UnboundedReceiver<Conn>) {
    let (conn_tx, conns) = mpsc::unbounded_channel();
    let connector = tower::service_fn(move |_: http::Uri| {
        let conn_tx = conn_tx.clone();
        async move {
            let io = TcpStream::connect(addr).await?;
            let conn = Conn {
                local: io.local_addr()?,
                received: Arc::default(),
                read: Arc::default(),
                closed: Arc::default(),
            };
            let _ = conn_tx.send(conn.clone());
            Ok::<_, std::io::Error>(TokioIo::new(Tap { io, conn }))
        }
    });
    let channel = within(
        "the channel to connect",
        endpoint.connect_with_connector(connector),
    )
    .await
    .expect("connected");
    (channel, conns)
}

async fn next_conn(conns: &mut mpsc::UnboundedReceiver<Conn>) -> Conn {
    within("a connection", conns.recv())
        .await
        .expect("connector alive")
}

/// A health check of the server as a whole: its status, or the error as text.
async fn check(client: &mut HealthClient<Channel>) -> Result<i32, String> {
    let call = client.check(HealthCheckRequest {
        service: String::new(),
    });
    let res = within("the call to be answered", call)
        .await
        .map_err(|status| status.to_string())?;
    Ok(res.into_inner().status)
}

fn h2c(addr: SocketAddr) -> Endpoint {
    Endpoint::from_shared(format!("http://{addr}")).unwrap()
}

#[tokio::test]
async fn health_check_is_served_and_the_service_sees_the_client_address() {
    let mut server = start(KeepAliveLayer::new());
    let (channel, mut conns) = channel(h2c(server.addr), server.addr).await;
    let mut client = HealthClient::new(channel);
    assert_eq!(check(&mut client).await, Ok(ServingStatus::Serving as i32));
    let conn = next_conn(&mut conns).await;
    let (remote, local) = server.next_seen().await;
    assert_eq!(
        remote,
        Some(conn.local),
        "remote_addr() is the client's address"
    );
    assert_eq!(local, Some(server.addr), "local_addr() is the server's");
}

/// On a wildcard listener, `local_addr()` is the address the client reached, not `0.0.0.0`.
#[tokio::test]
async fn on_a_wildcard_listener_local_addr_is_the_address_reached() {
    let listener = TcpListener::bind("0.0.0.0:0").await.unwrap();
    let addr = SocketAddr::from(([127, 0, 0, 1], listener.local_addr().unwrap().port()));
    let mut server = start_with(KeepAliveLayer::new(), |builder| builder.listener(listener));
    let (channel, mut conns) = channel(h2c(addr), addr).await;
    let mut client = HealthClient::new(channel);
    assert_eq!(check(&mut client).await, Ok(ServingStatus::Serving as i32));
    let conn = next_conn(&mut conns).await;
    let seen = server.next_seen().await;
    assert_eq!(seen, (Some(conn.local), Some(addr)));
}

#[tokio::test]
async fn an_idle_channel_gets_goaway_and_its_next_call_reconnects() {
    let idle = Duration::from_millis(300);
    let mut server = start(KeepAliveLayer::new().idle_timeout(idle));
    let (channel, mut conns) = channel(h2c(server.addr), server.addr).await;
    let mut client = HealthClient::new(channel);
    assert_eq!(check(&mut client).await, Ok(ServingStatus::Serving as i32));
    let first = next_conn(&mut conns).await;

    // Idle past the timeout: a graceful GOAWAY (RFC 9113 section 6.8), then the connection closes,
    // for being idle.
    let goaways = first.closed().await;
    assert_graceful(&goaways);
    let (reason, age) = server.next_close().await;
    assert_eq!(reason, CloseReason::Idle);
    assert!(age >= idle, "closed after {age:?}, before the idle timeout");

    // The same channel makes a new connection for its next call, which succeeds.
    assert_eq!(check(&mut client).await, Ok(ServingStatus::Serving as i32));
    let second = next_conn(&mut conns).await;
    assert_ne!(second.local, first.local);
    let _ = server.next_seen().await;
    assert_eq!(server.next_seen().await.0, Some(second.local));
}

/// The maximum age of the max-age tests, and its grace.
const MAX_AGE: Duration = Duration::from_secs(1);
const GRACE: Duration = Duration::from_secs(2);

/// A server whose connections reach [`MAX_AGE`] (no jitter) long before their idle timeout, and a
/// client of it: the server, the client, the client's connections, and when the client was made.
async fn max_age_client() -> (
    Server,
    HealthClient<Channel>,
    mpsc::UnboundedReceiver<Conn>,
    Instant,
) {
    let layer = KeepAliveLayer::new()
        .idle_timeout(Duration::from_secs(30))
        .max_age(MAX_AGE)
        .max_age_jitter(0.0)
        .max_age_grace(GRACE);
    let server = start(layer);
    let (channel, conns) = channel(h2c(server.addr), server.addr).await;
    (server, HealthClient::new(channel), conns, Instant::now())
}

#[tokio::test]
async fn max_age_moves_new_calls_to_a_fresh_connection_and_a_stream_runs_on_through_the_grace() {
    let (max_age, grace) = (MAX_AGE, GRACE);
    let (mut server, mut client, mut conns, opened) = max_age_client().await;

    // A server-streaming call (Watch), open across the maximum age: its first message is the status.
    let watch = client.watch(HealthCheckRequest {
        service: String::new(),
    });
    let mut stream = within("the watch to be answered", watch)
        .await
        .expect("watch accepted")
        .into_inner();
    let first = next_conn(&mut conns).await;
    let status = within("a status on the watch", stream.message()).await;
    assert_eq!(
        status.unwrap().unwrap().status,
        ServingStatus::Serving as i32
    );

    // At the maximum age: GOAWAY, with the watch's stream (1) still to be served.
    assert_graceful(&first.goaways_until(|g| !g.is_empty()).await);
    assert!(opened.elapsed() >= max_age - Duration::from_millis(100));

    // A new call goes over a fresh connection, and is served. tonic's `Channel` (0.14) fails the first
    // call after a GOAWAY with `Cancelled` while a stream is still open on the old connection, without
    // sending it (grpc/grpc-rust issue 2185), and reconnects for the next one: a gRPC client retries.
    let mut failed = Vec::new();
    while let Err(err) = check(&mut client).await {
        failed.push(err);
        assert!(
            failed.len() < 3,
            "calls after GOAWAY kept failing: {failed:?}"
        );
    }
    let second = next_conn(&mut conns).await;
    assert_ne!(second.local, first.local);

    // The watch still runs on the old connection, within the grace: it gets the next status.
    server
        .reporter
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    let status = within("a status on the watch", stream.message()).await;
    assert_eq!(
        status.unwrap().unwrap().status,
        ServingStatus::NotServing as i32,
        "the stream runs on after GOAWAY"
    );

    // Past the maximum age and the grace, the old connection is closed under it.
    let ended = within("the stream to be cut", async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                other => return other.map(|_| ()),
            }
        }
    })
    .await;
    assert!(
        ended.is_err(),
        "the cut is an error to the client: {ended:?}"
    );
    let cut_at = opened.elapsed();
    assert!(
        cut_at >= max_age + grace - Duration::from_millis(100),
        "cut after {cut_at:?}, before the grace ran out"
    );
    // Every connection closes for its age: the fresh one too, idle at its own maximum age, and the
    // old one, at its age plus the grace.
    loop {
        let (reason, age) = server.next_close().await;
        assert_eq!(reason, CloseReason::MaxAge);
        if age >= max_age + grace - Duration::from_millis(100) {
            break;
        }
    }
    // The channel goes on with a fresh connection.
    assert_eq!(
        check(&mut client).await,
        Ok(ServingStatus::NotServing as i32)
    );
}

#[tokio::test]
async fn a_slow_call_in_flight_at_max_age_finishes_within_the_grace() {
    let (max_age, grace) = (MAX_AGE, GRACE);
    let (mut server, mut client, mut conns, opened) = max_age_client().await;

    // A call answered 1.5 s after it starts: in flight at the maximum age, done within the grace.
    let mut req = tonic::Request::new(HealthCheckRequest {
        service: String::new(),
    });
    req.metadata_mut().insert(
        "x-delay-ms",
        tonic::metadata::MetadataValue::from_static("1500"),
    );
    let res = within("the slow call to be answered", client.check(req))
        .await
        .expect("the slow call succeeded");
    assert_eq!(res.into_inner().status, ServingStatus::Serving as i32);
    assert!(opened.elapsed() >= Duration::from_millis(1500));
    // The GOAWAY came while it was in flight, and kept it.
    let first = next_conn(&mut conns).await;
    assert_graceful(&first.goaways());
    // The connection closed once the call was done, not at the end of the grace.
    let (reason, age) = server.next_close().await;
    assert_eq!(reason, CloseReason::MaxAge);
    assert!(age < max_age + grace, "closed after {age:?}");
}

#[cfg(feature = "axum")]
#[tokio::test]
async fn under_axum_serve_the_service_sees_the_client_address() {
    let reporter = HealthReporter::new();
    let (svc, mut seen) = health(&reporter);
    let app = axum::Router::new().route_service("/grpc.health.v1.Health/{*method}", svc);
    let server = support::axum_serve::serve_axum(KeepAliveLayer::new(), app).await;
    let addr = server.addr;

    let (channel, mut conns) = channel(h2c(addr), addr).await;
    let mut client = HealthClient::new(channel);
    assert_eq!(check(&mut client).await, Ok(ServingStatus::Serving as i32));
    let conn = next_conn(&mut conns).await;
    let (remote, local) = within("a call to reach the service", seen.recv())
        .await
        .unwrap();
    assert_eq!(remote, Some(conn.local));
    assert_eq!(local, Some(addr));
}

#[cfg(feature = "tls")]
#[tokio::test]
async fn over_tls_health_check_is_served_and_the_service_sees_the_client_address() {
    use tonic::transport::{Certificate, ClientTlsConfig};

    let cert = support::tls::certificate(&["localhost"]);
    let idle = Duration::from_millis(300);
    let mut server = start_with(KeepAliveLayer::new().idle_timeout(idle), |builder| {
        builder.tls(cert.server)
    });
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&cert.pem))
        .domain_name("localhost");
    let endpoint = Endpoint::from_shared(format!("https://localhost:{}", server.addr.port()))
        .unwrap()
        .tls_config(tls)
        .unwrap();
    let (channel, mut conns) = channel(endpoint, server.addr).await;
    let mut client = HealthClient::new(channel);
    assert_eq!(check(&mut client).await, Ok(ServingStatus::Serving as i32));
    let first = next_conn(&mut conns).await;
    let (remote, local) = server.next_seen().await;
    assert_eq!(remote, Some(first.local), "remote_addr() over TLS");
    assert_eq!(local, Some(server.addr));

    // The idle timeout closes a TLS channel's connection too, and the channel reconnects.
    let (reason, _) = server.next_close().await;
    assert_eq!(reason, CloseReason::Idle);
    assert_eq!(check(&mut client).await, Ok(ServingStatus::Serving as i32));
    assert_ne!(next_conn(&mut conns).await.local, first.local);
}
