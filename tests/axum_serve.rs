//! Apps that keep `axum::serve`: `KeepAliveListener` + `into_make_service` give the same lifecycle.

#![cfg(feature = "axum")]

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use futures_util::{SinkExt, StreamExt};
use support::axum_serve::{serve_axum, AxumServer};
use support::http1::{
    answered_and_closed, assert_adverts_honest, assert_pipelined_past_the_limit, get_request,
    half_close_after, http_get, send_junk_until_cut, RawClient,
};
use support::{within, WAIT};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Notify};
use tower_keepalive::{CloseReason, ConnectionHandle, KeepAliveLayer};

/// The size of `/big`'s body.
const BIG: usize = 32 * 1024 * 1024;

/// The app; `started` is notified when a `/slow` request reaches its handler.
///
/// - `/`: `hello`;
/// - `/slow`: `slow` after 2.5 s;
/// - `/pause`: `paused` after 300 ms;
/// - `/big`: [`BIG`] bytes of `x` in one frame;
/// - `/64k`: 64 KiB of `x`;
/// - `/ws`: a WebSocket echo.
fn app(started: Arc<Notify>) -> Router {
    Router::new()
        .route("/", get(|| async { "hello" }))
        .route(
            "/pause",
            get(|| async {
                tokio::time::sleep(Duration::from_millis(300)).await;
                "paused"
            }),
        )
        .route(
            "/big",
            get(|| async { bytes::Bytes::from(vec![b'x'; BIG]) }),
        )
        .route("/64k", get(|| async { vec![b'x'; 64 * 1024] }))
        .route(
            "/slow",
            get(move || async move {
                started.notify_one();
                tokio::time::sleep(Duration::from_millis(2500)).await;
                "slow"
            }),
        )
        .route("/stream", get(stream))
        .route("/ws", get(ws))
}

/// 12 chunks, 200 ms apart: a body that takes 2.2 s after the response head.
async fn stream() -> Response {
    let chunks = futures_util::stream::unfold(0u32, |i| async move {
        if i == 12 {
            return None;
        }
        if i > 0 {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Some((Ok::<_, std::convert::Infallible>(format!("{i}\n")), i + 1))
    });
    Response::new(axum::body::Body::from_stream(chunks))
}

async fn ws(upgrade: WebSocketUpgrade) -> Response {
    upgrade.on_upgrade(|mut socket: WebSocket| async move {
        while let Some(Ok(msg)) = socket.recv().await {
            if matches!(msg, Message::Text(_)) && socket.send(msg).await.is_err() {
                break;
            }
        }
    })
}

struct Server {
    addr: SocketAddr,
    slow_started: Arc<Notify>,
    inner: AxumServer,
}

/// Serves [`app`] on `axum::serve` with `layer`.
async fn start(layer: KeepAliveLayer) -> Server {
    let slow_started = Arc::new(Notify::new());
    let inner = serve_axum(layer, app(slow_started.clone())).await;
    Server {
        addr: inner.addr,
        slow_started,
        inner,
    }
}

/// [`start`], with the handles of the connections accepted, in accept order.
async fn start_tapped(
    layer: KeepAliveLayer,
) -> (Server, mpsc::UnboundedReceiver<ConnectionHandle>) {
    let mut server = start(layer).await;
    let (_, none) = mpsc::unbounded_channel();
    let accepted = std::mem::replace(&mut server.inner.accepted, none);
    (server, accepted)
}

#[tokio::test]
async fn requests_are_counted_without_router_layer() {
    let server = start(KeepAliveLayer::new().max_requests(3)).await;
    let mut client = RawClient::connect(server.addr).await;
    let get = http_get("/", "HTTP/1.1", &[]);
    let res = client.request(&get).await;
    assert_eq!(res.header("keep-alive"), Some("timeout=5, max=2"));
    let res = client.request(&get).await;
    assert_eq!(res.header("keep-alive"), Some("timeout=5, max=1"));
    let res = client.request(&get).await;
    assert_eq!(res.header("connection"), Some("close"));
    assert_eq!(res.header("keep-alive"), None);
    client.expect_eof().await;
}

#[tokio::test]
async fn idle_connection_is_closed_after_the_timeout_and_not_before() {
    let server = start(KeepAliveLayer::new().idle_timeout(Duration::from_secs(1))).await;
    let mut client = RawClient::connect(server.addr).await;
    // The server's idle time starts after this instant, whatever the load: measured from after the
    // response, the bound would not hold when the client's task runs late.
    let asked = Instant::now();
    let res = client.request(http_get("/", "HTTP/1.1", &[])).await;
    assert_eq!(res.header("keep-alive"), Some("timeout=1, max=999"));
    client.expect_eof().await;
    let idle = asked.elapsed();
    assert!(idle >= Duration::from_secs(1), "closed after {idle:?}");

    // A client that never sends a byte is closed too.
    let connecting = Instant::now();
    let mut silent = RawClient::connect(server.addr).await;
    silent.expect_eof().await;
    assert!(connecting.elapsed() >= Duration::from_secs(1));
}

#[tokio::test]
async fn a_slow_request_is_never_cut() {
    let server = start(KeepAliveLayer::new().idle_timeout(Duration::from_secs(1))).await;
    let mut client = RawClient::connect(server.addr).await;
    let res = client.request(http_get("/slow", "HTTP/1.1", &[])).await;
    assert_eq!(res.status_line, "HTTP/1.1 200 OK");
    assert_eq!(res.body_str(), "slow");
    // And the connection is still reusable right after.
    let res = client.request(http_get("/", "HTTP/1.1", &[])).await;
    assert_eq!(res.body_str(), "hello");
}

#[tokio::test]
async fn a_websocket_outlives_the_idle_timeout() {
    let server = start(KeepAliveLayer::new().idle_timeout(Duration::from_secs(1))).await;
    let stream = within("connect", TcpStream::connect(server.addr))
        .await
        .unwrap();
    let url = format!("ws://{}/ws", server.addr);
    let (mut socket, res) = within("handshake", tokio_tungstenite::client_async(url, stream))
        .await
        .unwrap();
    assert_eq!(res.status(), 101);
    assert!(res.headers().get("keep-alive").is_none());
    for round in 0..2 {
        socket.send("ping".into()).await.unwrap();
        let echo = within("echo", socket.next()).await.unwrap().unwrap();
        assert_eq!(echo.into_text().unwrap().as_str(), "ping");
        if round == 0 {
            // Longer than the idle timeout: the HTTP lifecycle no longer applies.
            tokio::time::sleep(Duration::from_millis(1600)).await;
        }
    }
}

#[tokio::test]
async fn shutdown_makes_responses_say_close() {
    let mut server = start(KeepAliveLayer::new()).await;
    let mut client = RawClient::connect(server.addr).await;
    client.send(http_get("/slow", "HTTP/1.1", &[])).await;
    // The request is in flight (the handler sleeps); signal shutdown now.
    within("the handler to start", server.slow_started.notified()).await;
    server.inner.shutdown();
    let res = client.read_response().await;
    assert_eq!(res.body_str(), "slow");
    assert_eq!(res.values("connection"), ["close"]);
    assert_eq!(res.header("keep-alive"), None);
    client.expect_eof().await;
    server.inner.finished(WAIT).await;
}

#[tokio::test]
async fn an_idle_h2c_connection_is_closed_after_the_timeout_and_not_before() {
    use http_body_util::{BodyExt, Empty};
    use hyper_util::rt::{TokioExecutor, TokioIo};

    let server = start(KeepAliveLayer::new().idle_timeout(Duration::from_secs(1))).await;
    let stream = within("connect", tokio::net::TcpStream::connect(server.addr))
        .await
        .unwrap();
    let (mut sender, conn) = within(
        "the h2 handshake",
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)),
    )
    .await
    .unwrap();
    let conn = tokio::spawn(conn);
    let req = http::Request::get(format!("http://{}/", server.addr))
        .body(Empty::<bytes::Bytes>::new())
        .unwrap();
    // The server's idle clock starts when the body leaves the app: after this, before the client has
    // read it. So the strict "not before" bound counts from here.
    let sent = Instant::now();
    let res = within("a response", sender.send_request(req))
        .await
        .unwrap();
    assert!(res.headers().get("keep-alive").is_none());
    let body = within("the body", res.into_body().collect()).await.unwrap();
    assert_eq!(body.to_bytes(), "hello");
    // The server ends the idle connection: the client's connection task finishes.
    let _ = within("the server to close the idle connection", conn).await;
    let idle = sent.elapsed();
    assert!(idle >= Duration::from_secs(1), "closed after {idle:?}");
}

/// A client that trusts the adverts (as undici does), one request every 200 ms, never has its connection
/// closed under a request: each advert fits in the time left before the maximum age, and the close comes
/// as `Connection: close` on a response.
#[tokio::test]
async fn max_age_adverts_shrink_and_the_close_comes_on_a_response() {
    let layer = KeepAliveLayer::new()
        .idle_timeout(Duration::from_secs(2))
        .max_age(Duration::from_millis(3500))
        .max_age_jitter(0.0);
    let (server, mut accepted) = start_tapped(layer).await;
    let mut client = RawClient::connect(server.addr).await;
    let handle = within("the accept", accepted.recv()).await.unwrap();
    let max_age_at = handle.max_age_at().expect("no max age");
    // Longer than `within`'s bound: the client runs until the maximum age.
    let exchanges = tokio::time::timeout(
        Duration::from_secs(15),
        client.trust_adverts("/", Duration::from_millis(200), 60),
    )
    .await
    .expect("the trusting client timed out");
    let timeouts = assert_adverts_honest(&exchanges, max_age_at);
    client.expect_eof().await;
    assert_eq!(handle.close_reason(), Some(CloseReason::MaxAge));
    assert!(
        timeouts.windows(2).all(|pair| pair[0] >= pair[1]),
        "adverts grew: {timeouts:?}"
    );
    assert_eq!(timeouts.first(), Some(&2), "{timeouts:?}");
}

/// An idle connection whose last advert runs past its maximum age stays open until the advert has run
/// out, counted from the end of the response, and closes then.
#[tokio::test]
async fn max_age_waits_for_the_last_advert_to_run_out() {
    let layer = KeepAliveLayer::new()
        .idle_timeout(Duration::from_secs(2))
        .max_age(Duration::from_secs(3))
        .max_age_jitter(0.0);
    let (server, mut accepted) = start_tapped(layer).await;
    let mut client = RawClient::connect(server.addr).await;
    let handle = within("the accept", accepted.recv()).await.unwrap();
    // Planned 3 s before the maximum age: `timeout=2`. Answered 2.5 s later, 0.5 s before it: the
    // advert runs on 1.5 s past the maximum age.
    let res = client.request(http_get("/slow", "HTTP/1.1", &[])).await;
    let last_byte = client.last_byte_at;
    assert_eq!(res.header("connection"), Some("keep-alive"), "{res:#?}");
    assert_eq!(res.advertised_timeout(), Some(2), "{res:#?}");
    let idle_since = handle.idle_since().expect("busy after the response");
    let max_age_at = handle.max_age_at().expect("no max age");
    assert!(idle_since + Duration::from_secs(2) > max_age_at);
    let eof = client.eof().await;
    assert_eq!(handle.close_reason(), Some(CloseReason::MaxAge));
    // Strict from the end of the response on the server's clock; the client read the response a
    // moment after.
    assert!(
        eof >= idle_since + Duration::from_secs(2),
        "closed {:?} after the response, before its timeout=2",
        eof.duration_since(idle_since)
    );
    let after = eof.duration_since(last_byte);
    assert!(
        after < Duration::from_secs(2) + Duration::from_secs(3),
        "closed {after:?} after the response"
    );
}

/// A response whose head went out with keep-alive before the maximum age, and whose body ends after it,
/// keeps its advert too: a request sent while that runs is answered (with `close`), not cut.
#[tokio::test]
async fn max_age_keeps_the_advert_of_a_response_streaming_across_it() {
    let layer = KeepAliveLayer::new()
        .idle_timeout(Duration::from_secs(2))
        .max_age(Duration::from_secs(2))
        .max_age_jitter(0.0);
    let (server, mut accepted) = start_tapped(layer).await;
    let mut client = RawClient::connect(server.addr).await;
    let handle = within("the accept", accepted.recv()).await.unwrap();
    // Planned 1.8 s before the maximum age: `timeout=1`. The body ends 0.4 s after the maximum age.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let res = client.request(http_get("/stream", "HTTP/1.1", &[])).await;
    assert_eq!(res.body_str().lines().count(), 12);
    assert_eq!(res.header("connection"), Some("keep-alive"), "{res:#?}");
    assert_eq!(res.advertised_timeout(), Some(1), "{res:#?}");
    assert!(handle.idle_since().expect("busy after the response") > handle.max_age_at().unwrap());
    // As a client that trusts the advert: the next request well within it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    client.send(http_get("/", "HTTP/1.1", &[])).await;
    let res = within("the response", client.try_read_response())
        .await
        .expect("the connection was closed under a request sent within its advert");
    assert_eq!(res.body_str(), "hello");
    assert_eq!(res.values("connection"), ["close"], "{res:#?}");
    client.expect_eof().await;
    assert_eq!(handle.close_reason(), Some(CloseReason::MaxAge));
}

// A response is in flight until its last byte has been written to the socket: a large body that hyper
// holds in one piece and writes out to a slow reader is not taken for an idle connection and cut.
#[tokio::test]
async fn a_large_body_to_a_slow_reader_is_not_cut() {
    let server = start(KeepAliveLayer::new().idle_timeout(Duration::from_secs(1))).await;
    let mut client = RawClient::connect(server.addr).await;
    client.send(get_request("/big")).await;
    // Reading nothing for longer than the idle timeout: the socket buffers fill up and the rest of the
    // body waits in the server.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let res = client.read_response().await;
    assert_eq!(res.status, 200);
    assert_eq!(res.body.len(), BIG, "body cut");
    // Then the connection is idle, and closed after the timeout.
    client.expect_eof().await;
}

// Lingering close (RFC 9112 section 9.6): pipelined requests past the limit do not reset the connection
// under the responses the client has not read yet.
#[tokio::test]
async fn pipelined_past_max_requests_get_every_response_then_a_clean_close() {
    let server = start(KeepAliveLayer::new().max_requests(100)).await;
    // A reset destroys what the client has not read: it depends on timing, so several rounds.
    for _ in 0..5 {
        assert_pipelined_past_the_limit(server.addr, "/64k", 100, 10_000).await;
    }
}

// The linger is bounded: a client that sends without end after the close is cut.
#[tokio::test]
async fn a_lingering_close_is_cut_when_the_client_never_stops_sending() {
    let server = start(KeepAliveLayer::new().max_requests(1)).await;
    let (_client, mut write) = answered_and_closed(server.addr).await;
    send_junk_until_cut(&mut write, Duration::from_secs(10)).await;
}

// A client that half-closes after its request (RFC 9112 section 9.6: it has finished sending) is
// answered, then the connection closes. On a runtime with worker threads, as servers run: whether the
// end of stream is read before or after the service has seen the request depends on timing there, hence
// ten clients at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_then_half_close_is_answered() {
    let server = start(KeepAliveLayer::new().idle_timeout(Duration::from_secs(30))).await;
    for (path, body) in [("/", "hello"), ("/pause", "paused")] {
        let clients = (0..10).map(|_| half_close_after(server.addr, path, body));
        futures_util::future::join_all(clients).await;
    }
}

// One that half-closes without a request is closed at once, not after the idle timeout.
#[tokio::test]
async fn a_half_close_without_a_request_is_closed_at_once() {
    let server = start(KeepAliveLayer::new().idle_timeout(Duration::from_secs(30))).await;
    let mut client = RawClient::connect(server.addr).await;
    client.stream_mut().shutdown().await.unwrap();
    // Well within the idle timeout.
    within("the server to close", client.expect_eof()).await;
}
