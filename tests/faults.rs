//! Faults, each proving that a connection's state stays exact: nothing stays in flight, the idle timer is
//! armed again and reaps the connection on time (never early), or the connection ends at once for the
//! right reason. And once the inner service or hyper has decided to close, the response says `close`
//! exactly once and the layer never turns it back into keep-alive.
//!
//! Servers run the crate's serve path (`tower_keepalive::serve`) and are observed through `on_close`
//! reports; the inner-service error runs a hand-written hyper-util loop with `ConnectionHandle::drive`,
//! since the serve path only takes infallible services.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HeaderValue, CONNECTION, CONTENT_LENGTH};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use support::apps::{full, BoxError};
use support::http1::{http_get, RawClient};
use support::server::{serve, Closed};
use support::within;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;
use tower::{Layer, ServiceBuilder};
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::timeout::TimeoutLayer;
use tower_keepalive::{CloseReason, ConnectionHandle, KeepAliveLayer};

/// The idle timeout of every server here.
const IDLE: Duration = Duration::from_secs(1);
/// How late an idle close may come on a loaded 2-core machine.
const SLACK: Duration = Duration::from_millis(2500);

fn policy() -> KeepAliveLayer {
    KeepAliveLayer::new().idle_timeout(IDLE).max_requests(100)
}

/// What the fault app tells the test.
#[derive(Debug, PartialEq, Eq)]
enum Event {
    /// `/upload` read the whole request body, or failed to.
    Upload(Result<usize, String>),
    /// A handler started.
    Started(&'static str),
    /// A response body or a handler future was dropped before its end.
    Dropped(&'static str),
}

/// Sends an event when dropped: proves that hyper let go of a body or a future.
struct OnDrop(&'static str, mpsc::UnboundedSender<Event>);

impl Drop for OnDrop {
    fn drop(&mut self) {
        let _ = self.1.send(Event::Dropped(self.0));
    }
}

type Body = support::apps::FallibleBody;

/// A body of `n` chunks, `every` apart, that reports being dropped.
fn slow_body(n: usize, every: Duration, guard: OnDrop) -> Body {
    let stream = futures_util::stream::unfold((0, guard), move |(i, guard)| async move {
        if i == n {
            return None;
        }
        if i > 0 {
            tokio::time::sleep(every).await;
        }
        let frame = Frame::data(Bytes::from(format!("chunk {i}\n")));
        Some((Ok::<_, BoxError>(frame), (i + 1, guard)))
    });
    StreamBody::new(stream).boxed()
}

/// A body that sends `first`, and fails a moment later (so that the head and `first` are on the wire).
fn failing_body(first: &'static str) -> Body {
    let frames = futures_util::stream::unfold(0, move |i| async move {
        match i {
            0 => Some((Ok(Frame::data(Bytes::from_static(first.as_bytes()))), 1)),
            1 => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                Some((Err::<Frame<Bytes>, BoxError>("the body failed".into()), 2))
            }
            _ => None,
        }
    });
    StreamBody::new(frames).boxed()
}

/// The app the faults happen in.
///
/// - `/`: `hello`;
/// - `/upload`: reads the whole request body and reports how it went;
/// - `/slow-stream?n=N`: N chunks (default 100) 50 ms apart;
/// - `/pending`: never answers;
/// - `/fail-body`, `/fail-body-len`: a body that fails after its first chunk, without and with a length;
/// - `/panic`: panics;
/// - `/hold`: answers once `release` is notified, with `Connection: keep-alive` and its own `Keep-Alive`;
/// - `/app-close`: says `Connection: close` itself; `/app-keep-alive`: says keep-alive itself.
#[derive(Clone)]
struct FaultApp {
    events: mpsc::UnboundedSender<Event>,
    release: Arc<Notify>,
}

impl FaultApp {
    fn new() -> (Self, mpsc::UnboundedReceiver<Event>) {
        let (events, rx) = mpsc::unbounded_channel();
        let app = FaultApp {
            events,
            release: Arc::new(Notify::new()),
        };
        (app, rx)
    }

    async fn call(self, req: Request<Incoming>) -> Response<Body> {
        let events = self.events.clone();
        let path = req.uri().path().to_string();
        match path.as_str() {
            "/upload" => {
                let result = req.into_body().collect().await;
                let result = result
                    .map(|body| body.to_bytes().len())
                    .map_err(|e| e.to_string());
                let ok = result.is_ok();
                let _ = events.send(Event::Upload(result));
                let mut res = Response::new(full("uploaded"));
                if !ok {
                    *res.status_mut() = StatusCode::BAD_REQUEST;
                }
                res
            }
            "/slow-stream" => {
                let n = req
                    .uri()
                    .query()
                    .and_then(|q| q.strip_prefix("n="))
                    .map_or(100, |n| n.parse().unwrap());
                let _ = events.send(Event::Started("slow-stream"));
                let guard = OnDrop("slow-stream", events);
                Response::new(slow_body(n, Duration::from_millis(50), guard))
            }
            "/pending" => {
                let _guard = OnDrop("pending", events.clone());
                let _ = events.send(Event::Started("pending"));
                std::future::pending::<()>().await;
                unreachable!()
            }
            "/fail-body" => Response::new(failing_body("first")),
            "/fail-body-len" => {
                let mut res = Response::new(failing_body("first"));
                res.headers_mut()
                    .insert(CONTENT_LENGTH, HeaderValue::from_static("100"));
                res
            }
            "/panic" => panic!("the handler panicked"),
            "/hold" => {
                let _ = events.send(Event::Started("hold"));
                self.release.notified().await;
                let mut res = Response::new(full("held"));
                res.headers_mut()
                    .insert(CONNECTION, HeaderValue::from_static("keep-alive"));
                res.headers_mut()
                    .insert("keep-alive", HeaderValue::from_static("timeout=99, max=99"));
                res
            }
            "/app-close" => {
                let mut res = Response::new(full("bye"));
                res.headers_mut()
                    .insert(CONNECTION, HeaderValue::from_static("close"));
                res
            }
            "/app-keep-alive" => {
                let mut res = Response::new(full("hello"));
                res.headers_mut()
                    .insert(CONNECTION, HeaderValue::from_static("keep-alive"));
                res.headers_mut()
                    .insert("keep-alive", HeaderValue::from_static("timeout=99"));
                res
            }
            _ => Response::new(full("hello")),
        }
    }

    fn service(
        self,
    ) -> impl tower::Service<
        Request<Incoming>,
        Response = Response<Body>,
        Error = Infallible,
        Future = impl Send,
    > + Clone
           + Send
           + 'static {
        tower::service_fn(move |req| {
            let app = self.clone();
            async move { Ok::<_, Infallible>(app.call(req).await) }
        })
    }
}

async fn next_event(events: &mut mpsc::UnboundedReceiver<Event>) -> Event {
    within("an event from the app", events.recv())
        .await
        .expect("the app is gone")
}

/// The connection was reaped as idle, on time: nothing in flight, idle since no earlier than `floor` (the
/// timer was armed again after the fault), closed no earlier than the idle timeout after that and not
/// much later.
#[track_caller]
fn assert_reaped_idle(closed: &Closed, floor: Instant, requests: u64) {
    assert_eq!(closed.reason, CloseReason::Idle, "{closed:?}");
    assert_eq!(closed.handle.in_flight(), 0, "{closed:?}");
    assert_eq!(closed.handle.requests(), requests, "{closed:?}");
    let since = closed.handle.idle_since().expect("idle");
    assert!(since >= floor, "idle since before the fault: {closed:?}");
    assert!(
        closed.at >= since + IDLE,
        "closed {:?} before the idle timeout",
        since + IDLE - closed.at
    );
    assert!(
        closed.at <= since + IDLE + SLACK,
        "closed {:?} after the idle timeout",
        closed.at - since
    );
}

/// The connection ended at once because the client went away: nothing in flight, and it did not wait
/// for the idle timer.
#[track_caller]
fn assert_gone_at_once(closed: &Closed, left: Instant, requests: u64) {
    assert!(
        matches!(
            closed.reason,
            CloseReason::ClientClosed | CloseReason::Error
        ),
        "{closed:?}"
    );
    assert_eq!(closed.handle.in_flight(), 0, "{closed:?}");
    assert_eq!(closed.handle.requests(), requests, "{closed:?}");
    assert!(
        closed.at < left + IDLE,
        "took {:?} to notice the client had gone",
        closed.at - left
    );
}

#[tokio::test]
async fn client_vanishes_mid_request_body() {
    let (app, mut events) = FaultApp::new();
    let mut server = serve(policy(), app.service()).await;

    let mut stream = within("connect", TcpStream::connect(server.addr))
        .await
        .unwrap();
    stream
        .write_all(b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 1000\r\n\r\n0123456789")
        .await
        .unwrap();
    // Let the request reach the app before leaving, so the body is cut, not the head.
    tokio::task::yield_now().await;
    drop(stream);
    let left = Instant::now();

    match next_event(&mut events).await {
        Event::Upload(Err(_)) => {}
        other => panic!("the app read a whole body: {other:?}"),
    }
    let closed = server.next_close().await;
    assert_gone_at_once(&closed, left, 1);

    // The same with a client that half-closes: it stops sending but would still read an answer.
    let mut stream = within("connect", TcpStream::connect(server.addr))
        .await
        .unwrap();
    stream
        .write_all(b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 1000\r\n\r\n0123456789")
        .await
        .unwrap();
    stream.shutdown().await.unwrap();
    let left = Instant::now();
    assert!(matches!(
        next_event(&mut events).await,
        Event::Upload(Err(_))
    ));
    let closed = server.next_close().await;
    assert_gone_at_once(&closed, left, 1);
    // hyper still answers (the app's 400), then ends the connection. That answer advertises keep-alive:
    // hyper's read side is closed, which the layer cannot see; harmless, as the client cannot send again.
    let answer = read_to_close(&mut stream).await;
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 400 Bad Request\r\n"),
        "{answer:?}"
    );

    support::server::assert_serves_others(&mut server).await;
    server.finish().await;
}

/// Reads until the server closes the connection (EOF or reset).
async fn read_to_close(stream: &mut TcpStream) -> String {
    let mut bytes = Vec::new();
    let _ = within(
        "the server to close",
        tokio::io::AsyncReadExt::read_to_end(stream, &mut bytes),
    )
    .await;
    String::from_utf8_lossy(&bytes).into_owned()
}

#[tokio::test]
async fn client_vanishes_mid_response_body() {
    let (app, mut events) = FaultApp::new();
    let mut server = serve(policy(), app.service()).await;

    let mut stream = within("connect", TcpStream::connect(server.addr))
        .await
        .unwrap();
    stream
        .write_all(http_get("/slow-stream", "HTTP/1.1", &[]).as_bytes())
        .await
        .unwrap();
    assert_eq!(next_event(&mut events).await, Event::Started("slow-stream"));
    // The head and the first chunk arrive; then the client goes away.
    let mut first = vec![0u8; 256];
    let n = within(
        "the first chunk",
        tokio::io::AsyncReadExt::read(&mut stream, &mut first),
    )
    .await
    .unwrap();
    assert!(n > 0);
    drop(stream);
    let left = Instant::now();

    // hyper notices at its next write, drops the body, and the connection ends.
    assert_eq!(next_event(&mut events).await, Event::Dropped("slow-stream"));
    let closed = server.next_close().await;
    assert_gone_at_once(&closed, left, 1);

    support::server::assert_serves_others(&mut server).await;
    server.finish().await;
}

#[tokio::test]
async fn client_vanishes_between_requests() {
    let (app, _events) = FaultApp::new();
    let mut server = serve(policy(), app.service()).await;

    let mut client = RawClient::connect(server.addr).await;
    for _ in 0..2 {
        let res = client.request(http_get("/", "HTTP/1.1", &[])).await;
        assert_eq!(res.values("connection"), ["keep-alive"], "{res:#?}");
    }
    drop(client);
    let left = Instant::now();
    let closed = server.next_close().await;
    assert_eq!(closed.reason, CloseReason::ClientClosed);
    assert_gone_at_once(&closed, left, 2);

    // A client that only half-closes between requests: hyper ends the connection too.
    let mut client = RawClient::connect(server.addr).await;
    let res = client.request(http_get("/", "HTTP/1.1", &[])).await;
    assert_eq!(res.body_str(), "hello");
    let mut stream = client.into_stream();
    stream.shutdown().await.unwrap();
    let left = Instant::now();
    assert_eq!(read_to_close(&mut stream).await, "");
    let closed = server.next_close().await;
    assert_eq!(closed.reason, CloseReason::ClientClosed);
    assert_gone_at_once(&closed, left, 1);

    server.finish().await;
}

/// Opens an h2c connection (prior knowledge); returns its sender and the client connection's task, which
/// ends when the server closes the connection.
async fn connect_h2(
    addr: SocketAddr,
) -> (
    SendRequest<Empty<Bytes>>,
    JoinHandle<Result<(), hyper::Error>>,
) {
    let stream = within("connect", TcpStream::connect(addr)).await.unwrap();
    let (sender, conn) = within(
        "the h2 handshake",
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)),
    )
    .await
    .unwrap();
    (sender, tokio::spawn(conn))
}

fn h2_request(addr: SocketAddr, path: &str) -> Request<Empty<Bytes>> {
    Request::get(format!("http://{addr}{path}"))
        .body(Empty::new())
        .unwrap()
}

async fn h2_get_ok(sender: &mut SendRequest<Empty<Bytes>>, addr: SocketAddr) {
    within("the sender", sender.ready()).await.unwrap();
    let res = within("a response", sender.send_request(h2_request(addr, "/")))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let body = within("the body", res.into_body().collect())
        .await
        .unwrap()
        .to_bytes();
    assert_eq!(body, "hello");
}

/// The end of an h2c fault: the connection serves one more request, is reaped as idle on time with
/// `requests` served and nothing in flight, and the client sees it end.
async fn serves_on_then_reaped(
    mut server: support::server::TestServer,
    mut sender: SendRequest<Empty<Bytes>>,
    conn: JoinHandle<Result<(), hyper::Error>>,
    requests: u64,
) {
    let addr = server.addr;
    let floor = Instant::now();
    h2_get_ok(&mut sender, addr).await;
    let closed = server.next_close().await;
    assert_reaped_idle(&closed, floor, requests);
    within("the client connection to end", conn)
        .await
        .unwrap()
        .unwrap();
    server.finish().await;
}

#[tokio::test]
async fn h2_streams_reset_by_the_client_release_their_count() {
    let (app, mut events) = FaultApp::new();
    let server = serve(policy(), app.service()).await;
    let addr = server.addr;
    let (mut sender, conn) = connect_h2(addr).await;

    // Reset before the response: the client gives up on a handler that never answers.
    within("the sender", sender.ready()).await.unwrap();
    let pending = tokio::spawn(sender.send_request(h2_request(addr, "/pending")));
    assert_eq!(next_event(&mut events).await, Event::Started("pending"));
    pending.abort();
    assert_eq!(next_event(&mut events).await, Event::Dropped("pending"));

    // Reset mid-body: the client drops a streaming response after its first chunk.
    within("the sender", sender.ready()).await.unwrap();
    let res = within(
        "a response",
        sender.send_request(h2_request(addr, "/slow-stream")),
    )
    .await
    .unwrap();
    assert_eq!(next_event(&mut events).await, Event::Started("slow-stream"));
    let mut body = res.into_body();
    let frame = within("the first chunk", body.frame())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(frame.into_data().unwrap(), "chunk 0\n");
    drop(body);
    assert_eq!(next_event(&mut events).await, Event::Dropped("slow-stream"));

    // The connection serves on, then is reaped on time as idle: nothing stayed in flight.
    serves_on_then_reaped(server, sender, conn, 3).await;
}

/// One connection through a hand-written hyper-util loop and `ConnectionHandle::drive`, with an inner
/// service that fails on `/fail`. Resolves with the handle and the reason `drive` returned.
async fn serve_one_fallible(
    layer: KeepAliveLayer,
) -> (SocketAddr, JoinHandle<(ConnectionHandle, CloseReason)>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let (io, _) = listener.accept().await.unwrap();
        let handle = layer.connection();
        let svc = layer.bind(handle.clone()).layer(tower::service_fn(
            |req: Request<Incoming>| async move {
                if req.uri().path() == "/fail" {
                    Err::<Response<Full<Bytes>>, _>(std::io::Error::other(
                        "the inner service failed",
                    ))
                } else {
                    Ok(Response::new(Full::new(Bytes::from_static(b"hello"))))
                }
            },
        ));
        let builder = auto::Builder::new(TokioExecutor::new());
        let conn =
            builder.serve_connection_with_upgrades(TokioIo::new(io), TowerToHyperService::new(svc));
        let reason = handle.clone().drive(conn).await;
        (handle, reason)
    });
    (addr, task)
}

#[tokio::test]
async fn inner_service_error_ends_an_http1_connection_with_reason_error() {
    let (addr, task) = serve_one_fallible(policy()).await;
    let mut client = RawClient::connect(addr).await;
    let res = client.request(http_get("/", "HTTP/1.1", &[])).await;
    assert_eq!(res.values("connection"), ["keep-alive"], "{res:#?}");
    // hyper answers a service error by closing the connection without a word.
    client.send(http_get("/fail", "HTTP/1.1", &[])).await;
    client.expect_eof().await;
    let (handle, reason) = within("the connection to end", task).await.unwrap();
    assert_eq!(reason, CloseReason::Error);
    assert_eq!(handle.close_reason(), Some(CloseReason::Error));
    assert_eq!(handle.in_flight(), 0);
    assert_eq!(handle.requests(), 2);
}

#[tokio::test]
async fn inner_service_error_on_h2_resets_one_stream_and_the_connection_serves_on() {
    let (addr, task) = serve_one_fallible(policy()).await;
    let (mut sender, conn) = connect_h2(addr).await;
    h2_get_ok(&mut sender, addr).await;
    within("the sender", sender.ready()).await.unwrap();
    within(
        "the failed stream",
        sender.send_request(h2_request(addr, "/fail")),
    )
    .await
    .expect_err("a failed service resets its stream");
    // Only that stream: the connection serves on, then is reaped as idle on time.
    let floor = Instant::now();
    h2_get_ok(&mut sender, addr).await;
    let (handle, reason) = within("the idle connection to be reaped", task)
        .await
        .unwrap();
    let closed = Closed {
        reason,
        at: Instant::now(),
        in_flight: handle.in_flight(),
        handle,
    };
    assert_reaped_idle(&closed, floor, 3);
    within("the client connection to end", conn)
        .await
        .unwrap()
        .unwrap();
}

/// The same through the serve path, which takes fallible services too.
#[tokio::test]
async fn inner_service_error_through_the_serve_path() {
    let svc = tower::service_fn(|req: Request<Incoming>| async move {
        if req.uri().path() == "/fail" {
            Err(std::io::Error::other("the inner service failed"))
        } else {
            Ok(Response::new(full("hello")))
        }
    });
    let mut server = serve(policy(), svc).await;

    // HTTP/1: the connection ends without a word, for reason Error, nothing in flight.
    let mut client = RawClient::connect(server.addr).await;
    let res = client.request(http_get("/", "HTTP/1.1", &[])).await;
    assert_eq!(res.values("connection"), ["keep-alive"], "{res:#?}");
    client.send(http_get("/fail", "HTTP/1.1", &[])).await;
    client.expect_eof().await;
    let closed = server.next_close().await;
    assert_eq!(closed.reason, CloseReason::Error);
    assert_eq!(closed.handle.in_flight(), 0);
    assert_eq!(closed.handle.requests(), 2);

    // HTTP/2: one stream is reset; the connection serves on and is reaped as idle, on time.
    let (mut sender, conn) = connect_h2(server.addr).await;
    within("the sender", sender.ready()).await.unwrap();
    within(
        "the failed stream",
        sender.send_request(h2_request(server.addr, "/fail")),
    )
    .await
    .expect_err("a failed service resets its stream");
    serves_on_then_reaped(server, sender, conn, 2).await;
}

#[tokio::test]
async fn a_panic_behind_catch_panic_answers_500_and_keeps_the_books() {
    let (app, _events) = FaultApp::new();
    let svc = ServiceBuilder::new()
        .layer(CatchPanicLayer::new())
        .service(app.service());
    let mut server = serve(policy(), svc).await;

    let mut client = RawClient::connect(server.addr).await;
    let res = client.request(http_get("/panic", "HTTP/1.1", &[])).await;
    assert_eq!(res.status_line, "HTTP/1.1 500 Internal Server Error");
    // The 500 is an ordinary response: the connection stays usable.
    assert_eq!(res.values("connection"), ["keep-alive"], "{res:#?}");
    let floor = Instant::now();
    let res = client.request(http_get("/", "HTTP/1.1", &[])).await;
    assert_eq!(res.body_str(), "hello");
    client.expect_eof().await;
    let closed = server.next_close().await;
    assert_reaped_idle(&closed, floor, 2);

    // On h2 as well.
    let (mut sender, conn) = connect_h2(server.addr).await;
    within("the sender", sender.ready()).await.unwrap();
    let res = within(
        "a response",
        sender.send_request(h2_request(server.addr, "/panic")),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
    drop(res);
    serves_on_then_reaped(server, sender, conn, 2).await;
}

/// Without `CatchPanic` the panic unwinds through the connection: hyper has no answer to give, the
/// connection ends, and the serve path still reports its close (reason `Error`) and goes on serving.
#[tokio::test]
async fn a_panic_without_catch_panic_still_reports_the_close() {
    let (app, _events) = FaultApp::new();
    let mut server = serve(policy(), app.service()).await;
    let mut client = RawClient::connect(server.addr).await;
    let res = client.request(http_get("/", "HTTP/1.1", &[])).await;
    assert_eq!(res.body_str(), "hello");
    client.send(http_get("/panic", "HTTP/1.1", &[])).await;
    client.expect_eof().await;
    let closed = server.next_close().await;
    assert_eq!(closed.reason, CloseReason::Error);
    assert_eq!(closed.handle.requests(), 2);
    assert_eq!(closed.handle.in_flight(), 0);
    support::server::assert_serves_others(&mut server).await;
    server.finish().await;
}

#[tokio::test]
async fn a_handler_that_never_answers_times_out_and_releases_its_count() {
    let (app, mut events) = FaultApp::new();
    let svc = ServiceBuilder::new()
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            Duration::from_millis(300),
        ))
        .service(app.service());
    let mut server = serve(policy(), svc).await;

    let mut client = RawClient::connect(server.addr).await;
    let res = client.request(http_get("/pending", "HTTP/1.1", &[])).await;
    assert_eq!(res.status_line, "HTTP/1.1 408 Request Timeout");
    assert_eq!(next_event(&mut events).await, Event::Started("pending"));
    assert_eq!(next_event(&mut events).await, Event::Dropped("pending"));
    let floor = Instant::now();
    let res = client.request(http_get("/", "HTTP/1.1", &[])).await;
    assert_eq!(res.body_str(), "hello");
    client.expect_eof().await;
    let closed = server.next_close().await;
    assert_reaped_idle(&closed, floor, 2);
    server.finish().await;
}

#[tokio::test]
async fn a_response_body_failing_midway_closes_the_connection() {
    let (app, _events) = FaultApp::new();
    let mut server = serve(policy(), app.service()).await;

    for path in ["/fail-body", "/fail-body-len"] {
        let mut stream = within("connect", TcpStream::connect(server.addr))
            .await
            .unwrap();
        stream
            .write_all(http_get(path, "HTTP/1.1", &[]).as_bytes())
            .await
            .unwrap();
        // The head and the first chunk, then the connection is cut: no message end, so the client
        // cannot mistake the truncated body for a whole one.
        let answer = read_to_close(&mut stream).await;
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer:?}");
        assert!(answer.contains("first"), "{answer:?}");
        assert!(!answer.ends_with("0\r\n\r\n"), "{answer:?}");
        let closed = server.next_close().await;
        assert_eq!(closed.reason, CloseReason::Error, "{path}");
        assert_eq!(closed.handle.in_flight(), 0);
        assert_eq!(closed.handle.requests(), 1);
    }

    // On h2 the failure resets that stream only; the connection serves on and is reaped on time.
    let (mut sender, conn) = connect_h2(server.addr).await;
    within("the sender", sender.ready()).await.unwrap();
    let res = within(
        "a response",
        sender.send_request(h2_request(server.addr, "/fail-body")),
    )
    .await
    .unwrap();
    let body = within("the failing body", res.into_body().collect()).await;
    assert!(body.is_err(), "the stream was not reset");
    serves_on_then_reaped(server, sender, conn, 2).await;
}

#[tokio::test]
async fn a_close_decided_elsewhere_is_said_exactly_once_and_never_undone() {
    let (app, _events) = FaultApp::new();
    let mut server = serve(policy(), app.service()).await;

    // (request, what the server must report) where someone other than the layer's limits decided.
    let cases: [(String, CloseReason); 4] = [
        // The app says close on a keep-alive request.
        (
            http_get("/app-close", "HTTP/1.1", &[]),
            CloseReason::Service,
        ),
        // The client says close; the app says keep-alive.
        (
            http_get("/app-keep-alive", "HTTP/1.1", &["Connection: close"]),
            CloseReason::ClientClosed,
        ),
        // HTTP/1.0 without keep-alive: hyper will close; the app says keep-alive.
        (
            http_get("/app-keep-alive", "HTTP/1.0", &[]),
            CloseReason::ClientClosed,
        ),
        // Both say close.
        (
            http_get("/app-close", "HTTP/1.1", &["Connection: close"]),
            CloseReason::ClientClosed,
        ),
    ];
    for (request, reason) in cases {
        let mut client = RawClient::connect(server.addr).await;
        let res = client.request(&request).await;
        assert_eq!(res.values("connection"), ["close"], "{request}: {res:#?}");
        assert!(res.values("keep-alive").is_empty(), "{request}: {res:#?}");
        client.expect_eof().await;
        let closed = server.next_close().await;
        assert_eq!(closed.reason, reason, "{request}");
        assert_eq!(closed.handle.in_flight(), 0);
    }

    assert_eq!(server.finish().await.len(), 0);
}

/// hyper decides: the server drains while a request is in flight (`graceful_shutdown`), and the app then
/// answers with `Connection: keep-alive` and its own `Keep-Alive`. The response says `close` once, not
/// `keep-alive, close`. This runs the serve path's own pieces (`Drain`, `DrainWatcher::drive`) by hand, to
/// see the moment the connection learns of the drain on its handle.
#[tokio::test]
async fn a_drain_during_a_request_is_said_once_whatever_the_app_says() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (app, mut events) = FaultApp::new();
    let release = app.release.clone();
    let drain = tower_keepalive::serve::Drain::new();
    let watcher = drain.watcher();
    let layer = policy();
    let handle = layer.connection();
    let svc = layer.bind(handle.clone()).layer(app.service());
    let seen = handle.clone();
    let conn_task = tokio::spawn(async move {
        let (io, _) = listener.accept().await.unwrap();
        let builder = auto::Builder::new(TokioExecutor::new());
        let conn =
            builder.serve_connection_with_upgrades(TokioIo::new(io), TowerToHyperService::new(svc));
        watcher.drive(handle.clone(), conn).await
    });

    let mut client = RawClient::connect(addr).await;
    client.send(http_get("/hold", "HTTP/1.1", &[])).await;
    assert_eq!(next_event(&mut events).await, Event::Started("hold"));
    let draining = tokio::spawn(drain.drain(Some(support::WAIT)));
    // The driver records the drain and tells hyper in one step; wait for that step, then let the app
    // answer.
    within("the connection to learn of the drain", async {
        while seen.close_reason() != Some(CloseReason::Drain) {
            tokio::task::yield_now().await;
        }
    })
    .await;
    release.notify_one();
    let res = client.read_response().await;
    assert_eq!(res.body_str(), "held");
    assert_eq!(res.values("connection"), ["close"], "{res:#?}");
    assert!(res.values("keep-alive").is_empty(), "{res:#?}");
    client.expect_eof().await;
    let reason = within("the connection to end", conn_task).await.unwrap();
    assert_eq!(reason, CloseReason::Drain);
    assert_eq!(seen.in_flight(), 0);
    assert_eq!(within("the drain", draining).await.unwrap(), 0);
}

/// This thread's CPU time (user + system), from `/proc/thread-self/stat`, in clock ticks (1/100 s).
fn thread_cpu_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    // Fields 14 and 15 of stat(5); `fields[0]` is field 3.
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// A connection whose close is already decided (the client said `close`) streams a long response, and
/// its maximum age passes meanwhile: the driver must neither spin on its deadline nor cut the response.
/// The server runs on a thread of its own, so that its CPU time is its own.
#[test]
fn a_closing_connection_past_its_max_age_neither_spins_nor_cuts_the_response() {
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let (app, _events) = FaultApp::new();
            let layer = KeepAliveLayer::new()
                .idle_timeout(Duration::from_secs(5))
                .max_age(Duration::from_millis(200))
                .max_age_jitter(0.0);
            let mut server = serve(layer, app.service()).await;
            addr_tx.send(server.addr).unwrap();
            let before = thread_cpu_ticks();
            let _ = stop_rx.await;
            let used = thread_cpu_ticks() - before;
            let closed = server.next_close().await;
            server.finish().await;
            (used, closed.reason, closed.handle.in_flight())
        })
    });
    let addr = addr_rx.recv_timeout(support::WAIT).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let started = Instant::now();
    rt.block_on(async {
        let mut client = RawClient::connect(addr).await;
        // 40 chunks 50 ms apart: 2 s, well past the 200 ms maximum age.
        let res = client
            .request(http_get(
                "/slow-stream?n=40",
                "HTTP/1.1",
                &["Connection: close"],
            ))
            .await;
        assert_eq!(res.values("connection"), ["close"], "{res:#?}");
        assert_eq!(res.body_str().lines().count(), 40, "the response was cut");
        client.expect_eof().await;
    });
    let streamed = started.elapsed();
    stop_tx.send(()).unwrap();
    let (ticks, reason, in_flight) = server.join().unwrap();
    assert_eq!(reason, CloseReason::ClientClosed);
    assert_eq!(in_flight, 0);
    // Serving one slow response costs a few ticks; a driver spinning on its past deadline burns the
    // whole stream's length (about 200 ticks).
    assert!(
        ticks * 10 < streamed.as_millis() as u64 / 4,
        "the server thread used {} ms of CPU over {streamed:?}",
        ticks * 10
    );
}

/// Known gap, kept here to pin it down: an app that answers without reading a request body that has not
/// all arrived (a 413 or a 405 before reading, say). hyper then closes the connection right after the
/// response, as it cannot skip the rest of the body; but the response, written before, advertises
/// keep-alive, and the close is reported as the client's. The layer would need to see the request body's
/// state (wrap it) to say `close` here.
#[tokio::test]
#[ignore = "known gap: the layer cannot see that hyper will close for an unread request body"]
async fn an_unread_request_body_that_hyper_cannot_skip_is_answered_with_close() {
    let (app, _events) = FaultApp::new();
    let mut server = serve(policy(), app.service()).await;
    let mut client = RawClient::connect(server.addr).await;
    // `/` answers at once, without reading the body; 990 of its bytes never come.
    let res = client
        .request(&b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1000\r\n\r\n0123456789"[..])
        .await;
    assert_eq!(res.body_str(), "hello");
    client.expect_eof().await;
    assert_eq!(res.values("connection"), ["close"], "{res:#?}");
    let closed = server.next_close().await;
    assert_ne!(closed.reason, CloseReason::ClientClosed);
    server.finish().await;
}
