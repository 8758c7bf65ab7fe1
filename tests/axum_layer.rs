//! An axum `Router` with the layer on it, served by a hyper-util accept loop that hands each connection's
//! handle to the layer as a request extension.

mod support;

use axum::extract::ws::{Message as AxumMessage, WebSocketUpgrade};
use axum::response::Response;
use axum::routing::get;
use axum::Router;

use futures_util::{SinkExt, StreamExt};
use support::http1::{assert_head, http_get, RawResponse};
use support::hyper_loop::{start_server_with_extensions, start_server_without_handles, Server};
use support::logs::Logs;
use support::within;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tower_keepalive::{CloseReason, KeepAliveLayer};

const OK_11: &str = "HTTP/1.1 200 OK";
const TEXT: (&str, &str) = ("content-type", "text/plain; charset=utf-8");

async fn ws_echo(ws: WebSocketUpgrade) -> Response {
    ws.on_upgrade(|mut socket| async move {
        while let Some(Ok(msg)) = socket.recv().await {
            if matches!(msg, AxumMessage::Close(_)) || socket.send(msg).await.is_err() {
                break;
            }
        }
    })
}

/// The app: `/` says hello, `/ws` echoes WebSocket messages; the layer on the whole router.
fn router(layer: KeepAliveLayer) -> Router {
    Router::new()
        .route("/", get(|| async { "hello" }))
        .route("/ws", get(ws_echo))
        .layer(layer)
}

/// Serves [`router`], each connection's handle in its requests' extensions.
async fn start(layer: KeepAliveLayer) -> Server {
    start_server_with_extensions(layer.clone(), router(layer)).await
}

fn advert(res: &RawResponse) -> Option<&str> {
    res.header("keep-alive")
}

/// Sends one text message and expects it back.
async fn echo<S>(ws: &mut WebSocketStream<S>, text: &str)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    within("a WebSocket send", ws.send(Message::text(text)))
        .await
        .unwrap();
    let reply = within("the WebSocket echo", ws.next())
        .await
        .expect("WebSocket closed")
        .unwrap();
    assert_eq!(reply, Message::text(text));
}

#[tokio::test]
async fn router_counts_down_per_connection() {
    let mut server = start(KeepAliveLayer::new().max_requests(3)).await;
    let (mut a, handle_a) = server.connect().await;
    let (mut b, handle_b) = server.connect().await;

    let res = a.request(http_get("/", "HTTP/1.1", &[])).await;
    assert_head(
        &res,
        OK_11,
        &[
            TEXT,
            ("connection", "keep-alive"),
            ("keep-alive", "timeout=5, max=2"),
            ("content-length", "5"),
        ],
    );
    assert_eq!(res.body_str(), "hello");
    let res = a.request(http_get("/", "HTTP/1.1", &[])).await;
    assert_eq!(advert(&res), Some("timeout=5, max=1"));
    // B counts its own requests, not A's.
    let res = b.request(http_get("/", "HTTP/1.1", &[])).await;
    assert_eq!(advert(&res), Some("timeout=5, max=2"));

    let res = a.request(http_get("/", "HTTP/1.1", &[])).await;
    assert_head(
        &res,
        OK_11,
        &[TEXT, ("connection", "close"), ("content-length", "5")],
    );
    a.expect_eof().await;
    assert_eq!(handle_a.requests(), 3);
    assert_eq!(handle_a.close_reason(), Some(CloseReason::MaxRequests));

    let res = b.request(http_get("/", "HTTP/1.1", &[])).await;
    assert_eq!(advert(&res), Some("timeout=5, max=1"));
    assert_eq!(handle_b.requests(), 2);
    assert_eq!(handle_b.close_reason(), None);
}

/// `Router::layer` reaches the fallback and the method-not-allowed answer too: every request counts.
#[tokio::test]
async fn unrouted_requests_are_counted_too() {
    let mut server = start(KeepAliveLayer::new().max_requests(3)).await;
    let (mut client, handle) = server.connect().await;

    let res = client.request(http_get("/missing", "HTTP/1.1", &[])).await;
    assert_head(
        &res,
        "HTTP/1.1 404 Not Found",
        &[
            ("connection", "keep-alive"),
            ("keep-alive", "timeout=5, max=2"),
            ("content-length", "0"),
        ],
    );
    let post = http_get("/", "HTTP/1.1", &["Content-Length: 0"]).replacen("GET", "POST", 1);
    let res = client.request(post).await;
    assert!(res.status_line.starts_with("HTTP/1.1 405 "), "{res:#?}");
    assert_eq!(advert(&res), Some("timeout=5, max=1"));
    let res = client.request(http_get("/", "HTTP/1.1", &[])).await;
    assert_eq!(res.header("connection"), Some("close"));
    client.expect_eof().await;
    assert_eq!(handle.requests(), 3);
    assert_eq!(handle.close_reason(), Some(CloseReason::MaxRequests));
}

#[tokio::test]
async fn websocket_upgrade_keeps_connection_upgrade() {
    let mut server = start(KeepAliveLayer::new()).await;
    let stream = within("connect", tokio::net::TcpStream::connect(server.addr))
        .await
        .unwrap();
    let handle = server.next_conn().await;

    let url = format!("ws://{}/ws", server.addr);
    let (mut ws, res) = within(
        "the WebSocket handshake",
        tokio_tungstenite::client_async(url, stream),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 101);
    let connection: Vec<_> = res.headers().get_all("connection").iter().collect();
    assert_eq!(connection, ["upgrade"], "{res:#?}");
    assert_eq!(res.headers()["upgrade"], "websocket");
    assert!(res.headers().get("keep-alive").is_none(), "{res:#?}");
    assert_eq!(handle.close_reason(), Some(CloseReason::Upgraded));

    echo(&mut ws, "ping 1").await;
    echo(&mut ws, "ping 2").await;
    assert_eq!(handle.requests(), 1);
    assert_eq!(handle.close_reason(), Some(CloseReason::Upgraded));
    within("the WebSocket close", ws.close(None)).await.unwrap();
}

/// The request that uses up the limit is an upgrade: the 101 is left alone (no `close` added, which would
/// break the handshake) and the WebSocket works.
#[tokio::test]
async fn websocket_upgrade_at_the_request_limit_is_untouched() {
    let mut server = start(KeepAliveLayer::new().max_requests(2)).await;
    let (mut client, handle) = server.connect().await;

    let res = client.request(http_get("/", "HTTP/1.1", &[])).await;
    assert_eq!(advert(&res), Some("timeout=5, max=1"));

    let upgrade = http_get(
        "/ws",
        "HTTP/1.1",
        &[
            "Connection: Upgrade",
            "Upgrade: websocket",
            "Sec-WebSocket-Version: 13",
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        ],
    );
    let res = client.request(upgrade).await;
    assert_head(
        &res,
        "HTTP/1.1 101 Switching Protocols",
        &[
            ("connection", "upgrade"),
            ("upgrade", "websocket"),
            // RFC 6455 section 1.3's example key and answer.
            ("sec-websocket-accept", "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
        ],
    );
    assert_eq!(handle.requests(), 2);
    assert_eq!(handle.close_reason(), Some(CloseReason::Upgraded));

    let mut ws = WebSocketStream::from_raw_socket(client.into_stream(), Role::Client, None).await;
    echo(&mut ws, "after the limit").await;
    within("the WebSocket close", ws.close(None)).await.unwrap();
}

/// A router whose layer never gets a handle (the accept loop inserts none) still rewrites the fields, but
/// cannot count, so it advertises no `max` and enforces no limit; it says so once through `tracing`.
///
/// The only test in this file without a handle: the warning is once per process.
#[tokio::test]
async fn without_a_handle_fields_are_rewritten_and_a_warning_logged_once() {
    let logs = Logs::default();
    let _guard = logs.subscribe(tracing::Level::INFO);

    let mut server =
        start_server_without_handles(router(KeepAliveLayer::new().max_requests(2))).await;
    let (mut client, _unused) = server.connect().await;
    for _ in 0..3 {
        let res = client.request(http_get("/", "HTTP/1.1", &[])).await;
        assert_head(
            &res,
            OK_11,
            &[
                TEXT,
                ("connection", "keep-alive"),
                ("keep-alive", "timeout=5"),
                ("content-length", "5"),
            ],
        );
    }
    let logs = logs.text();
    assert_eq!(
        logs.matches("without a ConnectionHandle").count(),
        1,
        "{logs}"
    );
    assert!(logs.contains("WARN"), "{logs}");
}
