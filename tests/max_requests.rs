//! The maximum number of requests per connection on the crate's serve path, over real sockets on loopback:
//! HTTP/2 GOAWAY after the last one, HTTP/1 `Connection: close` on it with requests pipelined past it
//! never run, and the lingering close after it (RFC 9112 section 9.6); HTTP/2 streams past the maximum
//! refused, on both serve paths, when a client that never acknowledges PING keeps opening them.
//!
//! Timing: "not before" bounds are strict and measured so that they hold whatever the load (from an
//! instant the server's own clock cannot precede); "soon after" bounds allow [`SLACK`] for a loaded
//! machine. Every wait is bounded.

mod support;

use std::time::{Duration, Instant};

use http::StatusCode;
use support::http1::*;
use support::http2::*;
use support::server::*;
use support::*;
use tower_keepalive::CloseReason;

#[tokio::test]
async fn http2_max_requests_goaway_then_close() {
    let mut server = start(idle(Duration::from_secs(30)).max_requests(3)).await;
    let mut client = H2::connect(server.addr).await;
    for _ in 0..3 {
        let (status, body, _) = client.get("/").await;
        assert_eq!((status, &body[..]), (StatusCode::OK, &b"hello"[..]));
    }
    // Well before the idle timeout.
    client.closed(SLACK).await;
    let closed = server.next_close().await;
    assert_eq!(closed.reason, CloseReason::MaxRequests);
    assert_eq!(closed.handle.requests(), 3);
    let req = client.request("/");
    assert!(
        client.sender.send_request(req).await.is_err(),
        "a 4th request went through"
    );
}

// On the wire: GOAWAY naming the 3rd stream; a 4th stream sent after it is not answered.
#[tokio::test]
async fn http2_max_requests_goaway_on_the_wire() {
    let mut server = start(idle(Duration::from_secs(30)).max_requests(3)).await;
    let mut client = RawH2::connect(server.addr).await;
    let mut frames = Vec::new();
    for stream in [1, 3, 5] {
        client.get(stream).await;
        loop {
            let frame = client.frame().await.expect("EOF before a response");
            frames.push(frame.clone());
            if frame.stream == stream && frame.ends_stream() {
                break;
            }
        }
    }
    // Wait for the final GOAWAY (last stream 5), then open a 4th stream.
    loop {
        let frame = client.frame().await.expect("EOF before the final GOAWAY");
        frames.push(frame.clone());
        if frame.kind == GOAWAY && frame.goaway().0 == 5 {
            break;
        }
    }
    client.get(7).await;
    let (rest, _) = client.frames_to_eof().await;
    frames.extend(rest);
    assert!(
        !frames.iter().any(|f| f.stream == 7 && f.kind == HEADERS),
        "stream 7 answered: {frames:?}"
    );
    for goaway in frames.iter().filter(|f| f.kind == GOAWAY) {
        assert_eq!(goaway.goaway().1, 0, "GOAWAY not NO_ERROR: {goaway:?}");
    }
    let closed = server.next_close().await;
    assert_eq!(closed.reason, CloseReason::MaxRequests);
    assert_eq!(closed.handle.requests(), 3);
}

// HTTP/1: pipelined requests past the limit are not processed.
#[tokio::test]
async fn http1_max_requests_pipelined_stop_at_the_limit() {
    let mut server = start(idle(Duration::from_secs(30)).max_requests(2)).await;
    let mut client = RawClient::connect(server.addr).await;
    let pipelined = [
        get_request("/"),
        get_request("/"),
        get_request("/slow?ms=1"),
    ]
    .concat();
    client.send(pipelined).await;
    let first = client.read_response().await;
    assert_eq!(first.header("connection"), Some("keep-alive"));
    let second = client.read_response().await;
    assert_eq!(second.header("connection"), Some("close"));
    client.eof().await;
    let closed = server.next_close().await;
    assert_eq!(closed.reason, CloseReason::MaxRequests);
    assert_eq!(closed.handle.requests(), 2);
    assert!(server.started.try_recv().is_err(), "the 3rd request ran");
}

// Lingering close (RFC 9112 section 9.6): a server that closes with input unread makes the kernel
// reset the connection, which destroys the responses the client has not read yet. Pipelined requests
// past the limit are read and dropped until the client closes.
#[tokio::test]
async fn http1_pipelined_past_max_requests_get_every_response_then_a_clean_close() {
    let mut server = start(idle(Duration::from_secs(30)).max_requests(100)).await;
    // A reset destroys what the client has not read: it depends on timing, so several rounds.
    for _ in 0..5 {
        assert_pipelined_past_the_limit(server.addr, "/big?bytes=65536", 100, 10_000).await;
        let closed = server.next_close().await;
        assert_eq!(closed.reason, CloseReason::MaxRequests);
        assert_eq!(closed.handle.requests(), 100, "requests past the limit ran");
    }
}

// The linger is bounded by what it reads: a client that sends without end after the close is cut
// (at 4 MiB).
#[tokio::test]
async fn http1_lingering_close_is_cut_when_the_client_never_stops_sending() {
    let mut server = start(idle(Duration::from_secs(30)).max_requests(1)).await;
    let (_client, mut write) = answered_and_closed(server.addr).await;
    send_junk_until_cut(&mut write, WAIT).await;
    assert_eq!(server.next_close().await.reason, CloseReason::MaxRequests);
}

// And by time: a client that stays silent and never closes is let go 2 s after the close. The
// lifecycle's 1 s grace for a connection told to close does not cut the linger short.
#[tokio::test]
async fn http1_lingering_close_of_a_silent_client_ends_after_two_seconds() {
    let mut server = start(idle(Duration::from_secs(30)).max_requests(1)).await;
    let began = Instant::now();
    let (_client, _write) = answered_and_closed(server.addr).await;
    let closed = server.next_close().await;
    assert_eq!(closed.reason, CloseReason::MaxRequests);
    // From before the request: the linger began after it, so the lower bound holds whatever the load.
    assert_between(
        "the end of the linger",
        closed.at.duration_since(began),
        ms(1500),
        ms(2000) + SLACK,
    );
}

// HTTP/2 against a client that never acknowledges the server's PING, on both serve paths.
#[cfg(feature = "axum")]
mod never_acknowledging {
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use super::support::apps::bulk;
    use super::support::both::{serve_on, Path};
    use super::support::http2::{RawH2, HEADERS, RST_STREAM};
    use super::support::{within, SLACK, WAIT};
    use tower_keepalive::KeepAliveLayer;

    /// With a maximum of N requests, a client that never acknowledges the server's PING (so hyper's
    /// graceful close never sends its final GOAWAY, and keeps taking new streams) and opens 3 N streams
    /// is served N of them; the rest are reset with REFUSED_STREAM without reaching the handler, and the
    /// connection is dropped after its grace period.
    async fn h2_max_requests_hold(path: Path) {
        const MAX: u64 = 5;
        let grace = Duration::from_secs(2);
        let hits = Arc::new(AtomicUsize::new(0));
        let server = serve_on(
            path,
            KeepAliveLayer::new().max_requests(MAX).send_timeout(grace),
            bulk(hits.clone()),
        )
        .await;
        let mut client = RawH2::connect(server.addr).await.never_acknowledge_pings();
        let streams: Vec<u32> = (0..3 * MAX as u32).map(|i| 2 * i + 1).collect();
        // Each stream's answer: the first byte of its response head, or its reset's error code.
        let mut answers: HashMap<u32, Result<u8, u32>> = HashMap::new();
        // One stream after the other, each answered before the next: the client has seen the GOAWAY long
        // before it opens the streams past the maximum.
        for &stream in &streams {
            if client.try_get(stream, "/count").await.is_err() {
                break;
            }
            let answered = within("an answer", async {
                loop {
                    match client.frame().await {
                        Some(f) if f.kind == HEADERS && f.stream == stream => {
                            return Some(Ok(f.payload[0]))
                        }
                        Some(f) if f.kind == RST_STREAM && f.stream == stream => {
                            return Some(Err(u32::from_be_bytes(
                                f.payload[..4].try_into().unwrap(),
                            )))
                        }
                        Some(_) => {}
                        None => return None,
                    }
                }
            })
            .await;
            let Some(answer) = answered else { break };
            answers.insert(stream, answer);
        }
        let hits = hits.load(Ordering::SeqCst) as u64;
        assert!(hits <= MAX, "{path:?}: {hits} requests reached the handler");
        assert_eq!(
            hits, MAX,
            "{path:?}: the allowed requests were not all served"
        );
        // HPACK: 0x88 is `:status 200` (static index 8).
        let served = answers.values().filter(|&&a| a == Ok(0x88)).count() as u64;
        assert_eq!(served, MAX, "{path:?}: {answers:?}");
        // Past the maximum, refused: reset with REFUSED_STREAM (0x7), never answered.
        for (stream, answer) in &answers {
            if *stream > 2 * MAX as u32 - 1 {
                assert_eq!(
                    *answer,
                    Err(0x7),
                    "{path:?}: stream {stream} not refused: {answers:?}"
                );
            }
        }
        // The client ignores the close: it is dropped within the grace period after its last answer.
        let last = Instant::now();
        let (_, closed) = client.ping_until_closed(grace + WAIT).await;
        assert!(
            closed - last < grace + SLACK,
            "{path:?}: closed {:?} after the last answer",
            closed - last
        );
    }

    #[tokio::test]
    async fn h2_max_requests_hold_against_a_client_that_never_acknowledges_ping_serve() {
        h2_max_requests_hold(Path::Serve).await;
    }

    #[tokio::test]
    async fn h2_max_requests_hold_against_a_client_that_never_acknowledges_ping_axum() {
        h2_max_requests_hold(Path::Axum).await;
    }
}
