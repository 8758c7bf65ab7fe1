//! Upgraded connections and the connection budget (`Serve::max_connections`, `Serve::max_upgraded`),
//! over real sockets on loopback: a WebSocket keeps its room in the budget until it ends, counts as
//! open in the stats meanwhile, and upgrades beyond their share are refused with 503 while plain HTTP
//! clients are still served.
//!
//! Every wait is bounded.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::ws::{Message as AxumMessage, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use futures_util::{SinkExt, StreamExt};
use support::http1::RawClient;
use support::within_for as within;
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tower_keepalive::{KeepAliveLayer, Stats};

/// The bound on every wait: generous, the test machine is shared.
const WAIT: Duration = Duration::from_secs(10);

/// An echo WebSocket at `/ws`, "hello" at `/`.
fn app() -> Router {
    async fn ws(upgrade: WebSocketUpgrade) -> Response {
        upgrade.on_upgrade(|mut socket: WebSocket| async move {
            while let Some(Ok(msg)) = socket.recv().await {
                if matches!(msg, AxumMessage::Close(_)) || socket.send(msg).await.is_err() {
                    break;
                }
            }
        })
    }
    Router::new()
        .route("/", get(|| async { "hello" }))
        .route("/ws", get(ws))
}

/// A server with a budget of `hard` connections, `upgraded` of which may be upgraded; a long idle
/// timeout, so that nothing here closes for being idle.
async fn start(hard: usize, upgraded: usize) -> (SocketAddr, Stats) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let layer = KeepAliveLayer::new().idle_timeout(Duration::from_secs(60));
    let stats = layer.stats();
    let server = tower_keepalive::serve(listener, app())
        .keep_alive(layer)
        .connection_limits(hard, hard)
        .max_upgraded(upgraded);
    tokio::spawn(async move {
        let _ = server.await;
    });
    (addr, stats)
}

type Ws = WebSocketStream<TcpStream>;

/// Opens a WebSocket to the server; `Err` with the response status when the upgrade is refused.
async fn websocket(addr: SocketAddr) -> Result<Ws, u16> {
    let tcp = within("connect", WAIT, TcpStream::connect(addr))
        .await
        .unwrap();
    let url = format!("ws://{addr}/ws");
    match within(
        "the WebSocket handshake",
        WAIT,
        tokio_tungstenite::client_async(url, tcp),
    )
    .await
    {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(res)) => Err(res.status().as_u16()),
        Err(err) => panic!("WebSocket handshake failed: {err}"),
    }
}

async fn echo(ws: &mut Ws, text: &str) {
    within("send", WAIT, ws.send(Message::text(text)))
        .await
        .unwrap();
    let reply = within("echo", WAIT, ws.next()).await.unwrap().unwrap();
    assert_eq!(reply, Message::text(text));
}

/// Closes `ws` as a client does, and waits for the server's end of it.
async fn close(mut ws: Ws) {
    within("close", WAIT, ws.close(None)).await.unwrap();
    // The server answers the close and drops the socket: the stream ends.
    while let Some(Ok(_)) = within("the server's close", WAIT, ws.next()).await {}
}

/// Waits until the stats show `open` connections open. The stats have no signal to await: they are
/// read every 10 ms, for at most [`WAIT`].
async fn open_becomes(stats: &Stats, open: u64) {
    within("the open connections to settle", WAIT, async {
        while stats.snapshot().connections_open() != open {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn upgrades_beyond_their_share_get_503_and_http_is_still_served() {
    let (addr, stats) = start(4, 2).await;
    let mut first = websocket(addr).await.expect("first upgrade");
    let mut second = websocket(addr).await.expect("second upgrade");
    echo(&mut first, "one").await;
    echo(&mut second, "two").await;

    // The share is taken: the third upgrade is refused at once, on the wire, before any 101.
    let mut third = RawClient::connect(addr).await;
    let res = third
        .request(
            "GET /ws HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        )
        .await;
    assert_eq!(res.status, 503, "{res:?}");
    assert_eq!(res.header("retry-after"), Some("1"));
    assert_eq!(res.header("content-length"), Some("0"));
    // The refused connection goes on with HTTP.
    assert_eq!(third.get("/").await.body_str(), "hello");
    // So does a fresh plain HTTP client: the rest of the budget is kept for HTTP.
    let mut plain = RawClient::connect(addr).await;
    let res = plain.get("/").await;
    assert_eq!((res.status, res.body_str()), (200, "hello"));
    drop((third, plain));

    // The WebSockets were not disturbed; when one ends, its slot comes back.
    echo(&mut first, "still here").await;
    close(first).await;
    open_becomes(&stats, 1).await;
    let mut again = websocket(addr)
        .await
        .expect("an upgrade once a WebSocket ended");
    echo(&mut again, "three").await;
    echo(&mut second, "two again").await;
}

#[tokio::test]
async fn an_upgraded_connection_keeps_its_room_in_the_budget_until_it_ends() {
    // Every slot may be upgraded here: the budget alone bounds the descriptors.
    let (addr, stats) = start(2, 2).await;
    let mut first = websocket(addr).await.expect("first upgrade");
    let second = websocket(addr).await.expect("second upgrade");
    // Upgraded connections count as open until they end.
    open_becomes(&stats, 2).await;
    assert_eq!(stats.snapshot().connections_open(), 2);

    // The budget is full of WebSockets: a new client waits in the accept queue, unserved.
    let mut waiting = RawClient::connect(addr).await;
    waiting.send(support::http1::get_request("/")).await;
    let early = tokio::time::timeout(Duration::from_millis(500), waiting.read_response()).await;
    assert!(
        early.is_err(),
        "a client was served past a budget full of upgraded connections"
    );
    echo(&mut first, "one").await;

    // A WebSocket ends: its room goes to the waiting client.
    close(second).await;
    let res = within(
        "the waiting client's response",
        WAIT,
        waiting.read_response(),
    )
    .await;
    assert_eq!((res.status, res.body_str()), (200, "hello"));
    echo(&mut first, "two").await;
    close(first).await;
}
