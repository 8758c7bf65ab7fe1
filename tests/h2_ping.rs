//! HTTP/2 PING keep-alive on the serve path (`http_builder` with `http2().keep_alive_interval`):
//! PINGs go out on a connection with a stream in flight, the stream completes when the peer answers
//! them, and a peer that stops answering is closed (RFC 9113 section 6.7). Raw frames over TCP, so the
//! client can choose never to acknowledge a PING.

#![cfg(feature = "axum")]

use std::future::IntoFuture;
use std::net::SocketAddr;
use std::time::Duration;

use axum::routing::get;
use axum::Router;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const INTERVAL: Duration = Duration::from_millis(200);
const TIMEOUT: Duration = Duration::from_millis(300);
/// Generous for a loaded machine: the close is due at about INTERVAL + TIMEOUT.
const SLACK: Duration = Duration::from_secs(5);

const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const HEADERS: u8 = 0x1;
const GOAWAY: u8 = 0x7;
const ACK: u8 = 0x1;

/// A server whose `/slow` answers after `handler`.
async fn start(ping: bool, handler: Duration) -> SocketAddr {
    let app = Router::new().route(
        "/slow",
        get(move || async move {
            tokio::time::sleep(handler).await;
            "done"
        }),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tower_keepalive::serve(listener, app).http_builder(move |builder| {
        if ping {
            builder
                .http2()
                .keep_alive_interval(Some(INTERVAL))
                .keep_alive_timeout(TIMEOUT);
        }
    });
    tokio::spawn(server.into_future());
    addr
}

struct Frame {
    kind: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = len.to_be_bytes()[1..].to_vec();
    out.extend_from_slice(&[kind, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// The next frame, or `None` at end of stream or on a reset.
async fn read_frame(stream: &mut TcpStream) -> Option<Frame> {
    let mut head = [0u8; 9];
    stream.read_exact(&mut head).await.ok()?;
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let mut payload = vec![0; len];
    stream.read_exact(&mut payload).await.ok()?;
    let stream_id = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
    Some(Frame {
        kind: head[3],
        flags: head[4],
        stream: stream_id,
        payload,
    })
}

/// Connects with prior knowledge and sends `GET /slow` on stream 1.
async fn open_stream(addr: SocketAddr) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(frame(SETTINGS, 0, 0, &[]));
    // HPACK: :method GET, :scheme http (static table), :path "/slow" (literal, indexed name).
    let mut block = vec![0x82, 0x86, 0x44, 5];
    block.extend_from_slice(b"/slow");
    // END_STREAM | END_HEADERS
    out.extend(frame(HEADERS, 0x5, 1, &block));
    stream.write_all(&out).await.unwrap();
    stream
}

/// Reads frames until the connection ends or the response's HEADERS arrive, acknowledging SETTINGS
/// and, if `answer`, PINGs. Returns the PINGs seen and whether the response came.
async fn run_client(stream: &mut TcpStream, answer: bool) -> (usize, bool) {
    let mut pings = 0;
    while let Some(frame) = read_frame(stream).await {
        match frame.kind {
            SETTINGS if frame.flags & ACK == 0 => {
                let _ = stream.write_all(&self::frame(SETTINGS, ACK, 0, &[])).await;
            }
            PING if frame.flags & ACK == 0 => {
                pings += 1;
                if answer {
                    let ack = self::frame(PING, ACK, 0, &frame.payload);
                    let _ = stream.write_all(&ack).await;
                }
            }
            HEADERS if frame.stream == 1 => return (pings, true),
            GOAWAY => {}
            _ => {}
        }
    }
    (pings, false)
}

#[tokio::test]
async fn a_peer_that_stops_answering_pings_is_closed() {
    // The handler outlasts the test: with a stream in flight neither the idle timeout nor the header
    // timeout applies, so only the PING timeout can close the connection.
    let addr = start(true, Duration::from_secs(60)).await;
    let mut stream = open_stream(addr).await;
    let (pings, answered) = tokio::time::timeout(SLACK, run_client(&mut stream, false))
        .await
        .expect("the connection of a peer that never acknowledges PINGs stayed open");
    assert!(!answered, "the stream completed before the PING timeout");
    assert!(pings >= 1, "closed without a PING");
}

#[tokio::test]
async fn pings_go_out_while_a_stream_is_in_flight_and_it_completes() {
    let addr = start(true, Duration::from_millis(1500)).await;
    let mut stream = open_stream(addr).await;
    let (pings, answered) = tokio::time::timeout(SLACK, run_client(&mut stream, true))
        .await
        .expect("no response");
    assert!(
        answered,
        "the connection closed under a peer that answers PINGs"
    );
    // 1.5 s of handler time at a 200 ms interval: several PINGs, bounded loosely for a loaded machine.
    assert!(pings >= 2, "{pings} PINGs");
}

#[tokio::test]
async fn without_the_setting_no_pings_and_a_silent_peer_is_kept() {
    // A peer silent for as long as the PING test's takes to be closed, and then some.
    let addr = start(false, Duration::from_millis(1500)).await;
    let mut stream = open_stream(addr).await;
    let (pings, answered) = tokio::time::timeout(SLACK, run_client(&mut stream, false))
        .await
        .expect("no response");
    assert!(answered);
    assert_eq!(pings, 0);
}
