//! Apps that keep `axum::serve`: `KeepAliveListener` + `into_make_service` give the same lifecycle.

#![cfg(feature = "axum")]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use common::{
    assert_pipelined_past_the_limit, get_request, http_get, send_junk_until_cut, within, RawClient,
};
use futures_util::{SinkExt, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, Notify};
use tower_keepalive::axum::{into_make_service, KeepAliveListener};
use tower_keepalive::KeepAliveLayer;

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
        .route("/ws", get(ws))
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
    shutdown: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

async fn start(layer: KeepAliveLayer) -> Server {
    let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = tcp.local_addr().unwrap();
    let listener = KeepAliveListener::new(tcp, layer);
    let (tx, rx) = oneshot::channel::<()>();
    let shutdown = listener.on_shutdown(async {
        let _ = rx.await;
    });
    let slow_started = Arc::new(Notify::new());
    let app = app(slow_started.clone());
    let task = tokio::spawn(async move {
        axum::serve(listener, into_make_service(app))
            .with_graceful_shutdown(shutdown)
            .await
    });
    Server {
        addr,
        slow_started,
        shutdown: Some(tx),
        task,
    }
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
    let stream = tokio::net::TcpStream::connect(server.addr).await.unwrap();
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
    server.shutdown.take().unwrap().send(()).unwrap();
    let res = client.read_response().await;
    assert_eq!(res.body_str(), "slow");
    assert_eq!(res.values("connection"), ["close"]);
    assert_eq!(res.header("keep-alive"), None);
    client.expect_eof().await;
    within("axum::serve to return", server.task)
        .await
        .unwrap()
        .unwrap();
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
    let res = within("a response", sender.send_request(req))
        .await
        .unwrap();
    assert!(res.headers().get("keep-alive").is_none());
    let body = within("the body", res.into_body().collect()).await.unwrap();
    assert_eq!(body.to_bytes(), "hello");
    let answered = Instant::now();
    // The server ends the idle connection: the client's connection task finishes.
    let _ = within("the server to close the idle connection", conn).await;
    let idle = answered.elapsed();
    assert!(idle >= Duration::from_secs(1), "closed after {idle:?}");
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
    let stream = within("connect", TcpStream::connect(server.addr))
        .await
        .unwrap();
    let (read, mut write) = stream.into_split();
    write.write_all(get_request("/").as_bytes()).await.unwrap();
    let mut client = RawClient::new(tokio::io::join(read, tokio::io::sink()));
    let res = client.read_response().await;
    assert_eq!(res.values("connection"), ["close"], "{res:#?}");
    client.expect_eof().await;
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
        let clients = (0..10).map(|_| async move {
            let mut client = RawClient::connect(server.addr).await;
            client.send(get_request(path)).await;
            client.stream_mut().shutdown().await.unwrap();
            let res = client.read_response().await;
            assert_eq!(
                (res.status, res.body_str()),
                (200, body),
                "{path}: {res:#?}"
            );
            if path != "/" {
                // Still busy when the end of the request stream came: the response says so.
                assert_eq!(res.values("connection"), ["close"], "{path}: {res:#?}");
            }
            client.expect_eof().await;
        });
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
