//! A WebSocket echo next to keep-alive: an upgraded connection outlives the HTTP idle timeout.
//!
//! ```text
//! cargo run --example websocket                     # serve on 127.0.0.1:3000 until Ctrl-C
//! cargo run --example websocket -- --self-test      # serve on a free port, run a client, exit
//! ```
//!
//! The server has a 2 s idle timeout. Plain HTTP connections that stay idle that long are closed; a
//! WebSocket is not: once the `101 Switching Protocols` response is sent (its `Connection: upgrade` left
//! untouched), the connection belongs to the WebSocket and the idle timer, maximum age and drain of the
//! HTTP connection no longer apply to it. Its own life (pings, idle policy, closing) is the app's job.
//!
//! `--self-test` opens a WebSocket, stays silent for 3 s (past the idle timeout), then sends a message and
//! prints the echo. It exits 0 when the echo came back.

use std::future::IntoFuture;
use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use futures_util::{SinkExt, StreamExt};
use tower_keepalive::KeepAliveLayer;

const IDLE_TIMEOUT: Duration = Duration::from_secs(2);

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let self_test = match std::env::args().nth(1).as_deref() {
        None => false,
        Some("--self-test") => true,
        Some(_) => {
            eprintln!("usage: websocket [--self-test]");
            std::process::exit(2);
        }
    };

    let app = Router::new()
        .route("/", get(|| async { "WebSocket echo at /ws\n" }))
        .route("/ws", get(ws));
    let port = if self_test { 0 } else { 3000 };
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port))).await?;
    let addr = listener.local_addr()?;
    println!("listening on http://{addr} (WebSocket at ws://{addr}/ws)");

    let server = tower_keepalive::serve(listener, app)
        .keep_alive(KeepAliveLayer::new().idle_timeout(IDLE_TIMEOUT))
        // For a WebSocket this reports `upgraded` as soon as the 101 is sent: the HTTP connection is
        // over, the WebSocket carries on over the same socket.
        .on_close(|conn, reason| {
            println!(
                "server: connection closed ({reason}) after {:?}",
                conn.opened_at().elapsed()
            );
        })
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        });

    if !self_test {
        server.await?;
        return Ok(());
    }

    let server = tokio::spawn(server.into_future());
    let result = tokio::time::timeout(Duration::from_secs(10), client(addr)).await;
    server.abort();
    match result {
        Ok(Ok(())) => {
            println!("self-test passed: the WebSocket outlived the idle timeout");
            Ok(())
        }
        Ok(Err(err)) => Err(format!("self-test failed: {err}").into()),
        Err(_) => Err("self-test failed: timed out".into()),
    }
}

async fn ws(upgrade: WebSocketUpgrade) -> Response {
    upgrade.on_upgrade(echo)
}

async fn echo(mut socket: WebSocket) {
    while let Some(Ok(msg)) = socket.recv().await {
        let reply = match msg {
            Message::Text(_) | Message::Binary(_) => msg,
            Message::Close(_) => break,
            // Pings are answered by the WebSocket library itself.
            _ => continue,
        };
        if socket.send(reply).await.is_err() {
            break;
        }
    }
}

async fn client(addr: SocketAddr) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    use tokio_tungstenite::tungstenite::Message;

    let (mut socket, res) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws")).await?;
    println!(
        "client: {} with connection: {:?}",
        res.status(),
        res.headers().get("connection")
    );

    let silence = IDLE_TIMEOUT + Duration::from_secs(1);
    println!("client: silent for {silence:?}, past the idle timeout");
    tokio::time::sleep(silence).await;

    socket.send(Message::text("still here?")).await?;
    match socket.next().await {
        Some(Ok(Message::Text(text))) => println!("client: echo {:?}", text.as_str()),
        other => return Err(format!("expected an echo, got {other:?}").into()),
    }
    socket.close(None).await?;
    Ok(())
}
