//! The idle timeout on the crate's serve path, over real sockets on loopback (HTTP/1, h2c, Unix
//! sockets): idle connections close after it, busy ones never do (slow handlers, long and stalled bodies,
//! reset streams), silent and slow clients are closed, and a WebSocket outlives it.
//!
//! Timing: "not before" bounds are strict and measured so that they hold whatever the load (from an
//! instant the server's own clock cannot precede); "soon after" bounds allow [`SLACK`] for a loaded
//! machine. Every wait is bounded.

mod support;

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use http::StatusCode;
use hyper::body::Body as _;
use support::apps::stream_body;
use support::http1::*;
use support::http2::*;
use support::server::*;
use support::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tower_keepalive::CloseReason;

/// The idle close seen from both ends. The server closed no sooner than `timeout` after the connection
/// went idle by its own clock (strict). The client saw EOF no sooner than `client_floor` after the last
/// byte of the response, and soon after the timeout. The server's idle clock starts when the body's last
/// frame leaves the app, a moment before that byte reaches the client, so a strict client-side floor is
/// the advertised whole seconds of a timeout that has a fraction over them (1.5 s: `timeout=1`).
#[track_caller]
fn assert_idle_close(
    closed: &Closed,
    timeout: Duration,
    client_floor: Duration,
    last_byte: Instant,
    eof: Instant,
) {
    assert_eq!(closed.reason, CloseReason::Idle, "{closed:?}");
    assert_eq!(closed.in_flight, 0, "{closed:?}");
    let idle_since = closed.handle.idle_since().expect("closed while busy");
    assert!(
        closed.at.duration_since(idle_since) >= timeout,
        "server closed {:?} after going idle, before its {timeout:?}",
        closed.at.duration_since(idle_since)
    );
    assert_between(
        "EOF after the last response byte",
        eof.duration_since(last_byte),
        client_floor,
        timeout + SLACK,
    );
}

/// A timeout with a fraction over its advertised whole seconds; the client may count on those.
const TIMEOUT_1_5: Duration = Duration::from_millis(1500);
const ADVERTISED_1: Duration = Duration::from_secs(1);
/// Tests of other things with a 1 s timeout check the client side loosely (the server side strictly).
const LOOSE_1: Duration = Duration::from_millis(900);

#[tokio::test]
async fn http1_idle_connection_closed_after_timeout() {
    // 1.5 s enforced, `timeout=1` advertised: the client-side bound is what the client was promised.
    let timeout = TIMEOUT_1_5;
    let mut server = start(idle(timeout)).await;
    let mut client = RawClient::connect(server.addr).await;
    let res = client.get("/").await;
    assert_eq!((res.status, res.body_str()), (200, "hello"));
    assert_eq!(res.header("connection"), Some("keep-alive"));
    assert!(
        res.header("keep-alive")
            .is_some_and(|v| v.starts_with("timeout=1")),
        "{res:?}"
    );
    let last_byte = client.last_byte_at;

    let eof = client.eof().await;
    let closed = server.next_close().await;
    assert_idle_close(&closed, timeout, ADVERTISED_1, last_byte, eof);
    assert_eq!(closed.handle.requests(), 1);
}

#[tokio::test]
async fn http2_idle_connection_gets_goaway_after_timeout() {
    let timeout = TIMEOUT_1_5;
    let mut server = start(idle(timeout)).await;
    let mut client = H2::connect(server.addr).await;
    let (status, body, last_byte) = client.get("/").await;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"hello"[..]));
    assert!(!client.sender.is_closed());

    let eof = client.closed(timeout + SLACK).await;
    assert!(
        client.sender.is_closed(),
        "the client still thinks it can send"
    );
    let closed = server.next_close().await;
    assert_idle_close(&closed, timeout, ADVERTISED_1, last_byte, eof);
    assert_eq!(closed.handle.requests(), 1);
}

// On the wire: a GOAWAY with NO_ERROR, no sooner than the timeout, then EOF.
#[tokio::test]
async fn http2_idle_goaway_on_the_wire() {
    let timeout = TIMEOUT_1_5;
    let mut server = start(idle(timeout)).await;
    let connecting = Instant::now();
    let mut client = RawH2::connect(server.addr).await;
    client.get(1).await;
    let mut frames = Vec::new();
    let last_byte = loop {
        let frame = client.frame().await.expect("EOF before the response");
        frames.push(frame.clone());
        if frame.stream == 1 && frame.ends_stream() {
            break frame.at;
        }
    };
    assert!(
        frames.iter().any(|f| f.kind == HEADERS && f.stream == 1),
        "{frames:?}"
    );

    let (frames, eof) = client.frames_to_eof().await;
    let goaways: Vec<_> = frames.iter().filter(|f| f.kind == GOAWAY).collect();
    assert!(!goaways.is_empty(), "closed without GOAWAY: {frames:?}");
    for goaway in &goaways {
        assert_eq!(goaway.goaway().1, 0, "GOAWAY not NO_ERROR: {goaway:?}");
    }
    // The last GOAWAY names the last stream served.
    assert_eq!(goaways.last().unwrap().goaway().0, 1, "{goaways:?}");
    // Not before the advertised whole seconds after the response, soon after the timeout.
    assert_between(
        "first GOAWAY after the response",
        goaways[0].at.duration_since(last_byte),
        ADVERTISED_1,
        timeout + SLACK,
    );
    assert!(eof.duration_since(connecting) < timeout + SLACK);
    let closed = server.next_close().await;
    assert_eq!(closed.reason, CloseReason::Idle);
    let idle_since = closed.handle.idle_since().unwrap();
    assert!(closed.at.duration_since(idle_since) >= timeout);
}

#[tokio::test]
async fn http1_streaming_response_longer_than_idle_timeout_is_not_cut() {
    let timeout = SEC;
    let mut server = start(idle(timeout)).await;
    let mut client = RawClient::connect(server.addr).await;
    let sent = Instant::now();
    let res = client.get("/stream?chunks=5&ms=400").await;
    assert_eq!(res.status, 200);
    assert_eq!(res.body_str(), stream_body(5));
    assert!(client.last_byte_at.duration_since(sent) >= ms(1600));
    assert_eq!(res.header("connection"), Some("keep-alive"));
    let last_byte = client.last_byte_at;

    // Reaped once idle, a full timeout after the body ended.
    let eof = client.eof().await;
    let closed = server.next_close().await;
    assert_idle_close(&closed, timeout, LOOSE_1, last_byte, eof);
}

#[tokio::test]
async fn http2_streaming_response_longer_than_idle_timeout_is_not_cut() {
    let timeout = SEC;
    let mut server = start(idle(timeout)).await;
    let mut client = H2::connect(server.addr).await;
    let sent = Instant::now();
    let (status, body, last_byte) = client.get("/stream?chunks=5&ms=400").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, stream_body(5));
    assert!(last_byte.duration_since(sent) >= ms(1600));

    let eof = client.closed(timeout + SLACK).await;
    let closed = server.next_close().await;
    assert_idle_close(&closed, timeout, LOOSE_1, last_byte, eof);
}

// Where the body is handed to hyper in one piece and the client reads it slowly: the connection is
// not counted idle while hyper is still writing what it was given.
#[tokio::test]
async fn http1_large_body_to_a_slow_reader_is_not_cut() {
    let timeout = SEC;
    let len = 32 * 1024 * 1024;
    let mut server = start(idle(timeout)).await;
    let mut client = RawClient::connect(server.addr).await;
    client.send(get_request(&format!("/big?bytes={len}"))).await;
    // A client that reads nothing for longer than idle timeout + grace: the socket buffers fill up and
    // the rest of the body waits in the server.
    tokio::time::sleep(ms(3000)).await;
    let res = client.read_response().await;
    assert_eq!(res.status, 200);
    assert_eq!(res.body.len(), len, "body cut");
    let _ = client.eof().await;
    assert_eq!(server.next_close().await.reason, CloseReason::Idle);
}

// HTTP/2: the same with the client reading nothing for a while. Here the rest of the body waits in
// h2's send buffer for the client's flow-control window, not in a full socket, so no write shows that
// the connection is still busy: HTTP/2 connections get a longer grace (60 s) before a hard close.
#[tokio::test]
async fn http2_large_body_to_a_stalled_reader_is_not_cut() {
    let timeout = SEC;
    let len = 32 * 1024 * 1024;
    let mut server = start(idle(timeout)).await;
    let mut client = H2::connect(server.addr).await;
    let req = client.request(&format!("/big?bytes={len}"));
    let res = within("response head", client.sender.send_request(req))
        .await
        .unwrap();
    tokio::time::sleep(ms(3000)).await;
    let body = within(
        "the body",
        http_body_util::BodyExt::collect(res.into_body()),
    )
    .await
    .expect("body cut")
    .to_bytes();
    assert_eq!(body.len(), len, "body cut");
    client.closed(timeout + SLACK).await;
    assert_eq!(server.next_close().await.reason, CloseReason::Idle);
}

#[tokio::test]
async fn http1_slow_request_is_never_cut() {
    let timeout = SEC;
    let mut server = start(idle(timeout)).await;
    let mut client = RawClient::connect(server.addr).await;
    let sent = Instant::now();
    let res = client.get("/slow?ms=2500").await;
    assert_eq!((res.status, res.body_str()), (200, "slept"));
    assert!(sent.elapsed() >= ms(2500));
    assert_eq!(res.header("connection"), Some("keep-alive"));
    server.assert_no_close();
    let last_byte = client.last_byte_at;
    let eof = client.eof().await;
    let closed = server.next_close().await;
    assert_idle_close(&closed, timeout, LOOSE_1, last_byte, eof);
}

#[tokio::test]
async fn http2_slow_request_is_never_cut() {
    let timeout = SEC;
    let mut server = start(idle(timeout)).await;
    let mut client = H2::connect(server.addr).await;
    let sent = Instant::now();
    let (status, body, last_byte) = client.get("/slow?ms=2500").await;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"slept"[..]));
    assert!(sent.elapsed() >= ms(2500));
    server.assert_no_close();
    let eof = client.closed(timeout + SLACK).await;
    let closed = server.next_close().await;
    assert_idle_close(&closed, timeout, LOOSE_1, last_byte, eof);
}

// The client drops a response body mid-stream (RST_STREAM CANCEL).
#[tokio::test]
async fn http2_stream_reset_mid_body_releases_the_connection() {
    let timeout = SEC;
    let mut server = start(idle(timeout)).await;
    let mut client = H2::connect(server.addr).await;
    // 40 s of body if nobody stops it.
    let req = client.request("/stream?chunks=200&ms=200");
    let res = within("response head", client.sender.send_request(req))
        .await
        .unwrap();
    let mut body = res.into_body();
    let first = within("first chunk", http_body_util::BodyExt::frame(&mut body))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.into_data().unwrap(), "chunk 0\n");
    assert!(!body.is_end_stream());
    drop(body);
    let reset = Instant::now();

    // The connection stays open on the client's side; the server reaps it as idle.
    let closed = server.next_close().await;
    assert_reaped_after_reset(&closed, reset, timeout);
    client.closed(WAIT).await;
}

/// A connection whose only stream the client reset was closed as idle: nothing in flight, one idle
/// timeout after the reset (loosely) and no sooner than a timeout after it went idle (strictly).
#[track_caller]
fn assert_reaped_after_reset(closed: &Closed, reset: Instant, timeout: Duration) {
    assert_eq!(closed.reason, CloseReason::Idle, "{closed:?}");
    assert_eq!(closed.in_flight, 0);
    assert_between(
        "idle close after the reset",
        closed.at.duration_since(reset),
        LOOSE_1,
        timeout + SLACK,
    );
    assert!(
        closed
            .at
            .duration_since(closed.handle.idle_since().unwrap())
            >= timeout
    );
}

// The client drops the response future before the head (the handler is still running).
#[tokio::test]
async fn http2_stream_reset_before_response_releases_the_connection() {
    let timeout = SEC;
    let mut server = start(idle(timeout)).await;
    let mut client = H2::connect(server.addr).await;
    let req = client.request("/slow?ms=30000");
    let pending = tokio::spawn(client.sender.send_request(req));
    assert_eq!(server.handler_started().await, "slow");
    pending.abort();
    let reset = Instant::now();

    let closed = server.next_close().await;
    assert_reaped_after_reset(&closed, reset, timeout);
    client.closed(WAIT).await;
}

#[tokio::test]
async fn silent_connection_closed_after_idle_timeout() {
    let timeout = SEC;
    let mut server = start(idle(timeout)).await;
    let connecting = Instant::now();
    let mut client = RawClient::connect(server.addr).await;
    let eof = client.eof().await;
    assert_between(
        "EOF of a silent connection",
        eof.duration_since(connecting),
        timeout,
        timeout + SLACK,
    );
    let closed = server.next_close().await;
    assert_eq!(closed.reason, CloseReason::Idle);
    assert_eq!(closed.handle.requests(), 0);
}

/// Dribbles `head` one byte every 300 ms and never finishes it; returns when the server closed.
async fn dribble(client: &mut RawClient, head: &[u8]) -> Instant {
    let mut bytes = head.iter().copied().cycle();
    let mut tick = tokio::time::interval(ms(300));
    let mut buf = [0u8; 1024];
    loop {
        tokio::select! {
            read = within("the server to close", tokio::io::AsyncReadExt::read(client.stream_mut(), &mut buf)) => {
                match read {
                    Ok(0) => return Instant::now(),
                    Err(err) if is_reset(&err) => return Instant::now(),
                    // hyper may answer a request head that has grown too large.
                    Ok(n) => panic!("unexpected bytes: {:?}", String::from_utf8_lossy(&buf[..n])),
                    Err(err) => panic!("read failed: {err}"),
                }
            }
            _ = tick.tick() => {
                let byte = [bytes.next().unwrap()];
                // The server may be gone already: the read reports it.
                let _ = client.stream_mut().write_all(&byte).await;
            }
        }
    }
}

// An HTTP/1 request head that never completes.
#[tokio::test]
async fn slow_http1_request_head_is_closed() {
    let timeout = SEC;
    let mut server = start(idle(timeout)).await;
    let connecting = Instant::now();
    let mut client = RawClient::connect(server.addr).await;
    let eof = dribble(
        &mut client,
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    )
    .await;
    // Idle timeout, then at most the 1 s grace.
    assert_between(
        "close of a slow head",
        eof.duration_since(connecting),
        timeout,
        timeout + SEC + SLACK,
    );
    let closed = server.next_close().await;
    assert_eq!(closed.reason, CloseReason::Idle);
    assert_eq!(closed.handle.requests(), 0);
}

// The HTTP/2 preface dribbled (hyper-util is still sniffing the protocol).
#[tokio::test]
async fn slow_http2_preface_is_closed() {
    let timeout = SEC;
    let mut server = start(idle(timeout)).await;
    let connecting = Instant::now();
    let mut client = RawClient::connect(server.addr).await;
    let eof = dribble(&mut client, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
    assert_between(
        "close of a slow preface",
        eof.duration_since(connecting),
        timeout,
        timeout + SEC + SLACK,
    );
    assert_eq!(server.next_close().await.reason, CloseReason::Idle);
}

#[tokio::test]
async fn websocket_outlives_idle_timeout_and_drain() {
    use tokio_tungstenite::tungstenite::Message;

    let timeout = SEC;
    let mut server = start(idle(timeout)).await;
    let tcp = within("connect", TcpStream::connect(server.addr))
        .await
        .unwrap();
    let url = format!("ws://{}/ws", server.addr);
    let (mut ws, res) = within(
        "the WebSocket handshake",
        tokio_tungstenite::client_async(url, tcp),
    )
    .await
    .expect("WebSocket handshake");
    assert_eq!(res.status(), StatusCode::SWITCHING_PROTOCOLS);
    assert_eq!(
        res.headers()["connection"]
            .to_str()
            .unwrap()
            .to_ascii_lowercase(),
        "upgrade"
    );
    assert_eq!(res.headers().get("keep-alive"), None);

    // HTTP is over on this connection as soon as it is upgraded.
    let closed = server.next_close().await;
    assert_eq!(closed.reason, CloseReason::Upgraded);

    async fn echo<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>, text: &str)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        within("send", ws.send(Message::text(text))).await.unwrap();
        let reply = within("echo", ws.next()).await.unwrap().unwrap();
        assert_eq!(reply, Message::text(text));
    }
    echo(&mut ws, "at 0 s").await;
    // No signal to await here: the point is that time passes.
    tokio::time::sleep(ms(2500)).await;
    echo(&mut ws, "at 2.5 s").await;

    // The server drains and returns; the WebSocket is not one of its connections any more.
    server.shutdown();
    server.finished(SLACK).await;
    echo(&mut ws, "after drain").await;
    ws.close(None).await.unwrap();
}

#[cfg(unix)]
#[tokio::test]
async fn unix_socket_request_then_idle_close() {
    let (path, listener) = UnixPath::bind("idle");
    let timeout = ms(1500);
    let mut server = TestServer::builder(idle(timeout))
        .listener(listener)
        .start();
    let mut client = path.connect().await;
    let res = client.get("/").await;
    assert_eq!((res.status, res.body_str()), (200, "hello"));
    assert_eq!(res.header("connection"), Some("keep-alive"));
    let last_byte = client.last_byte_at;
    let eof = client.eof().await;
    let closed = server.next_close().await;
    assert_idle_close(&closed, timeout, ADVERTISED_1, last_byte, eof);
}
