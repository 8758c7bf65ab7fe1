//! The connection lifecycle on the crate's serve path, over real sockets on loopback: idle timeout, maximum
//! requests and age, drain, silent and slow clients, WebSockets, Unix sockets.
//!
//! Timing: "not before" bounds are strict and measured so that they hold whatever the load (from an
//! instant the server's own clock cannot precede); "soon after" bounds allow [`SLACK`] for a loaded
//! machine. Every wait is bounded.

mod lifecycle_support;

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use http::StatusCode;
use hyper::body::Body as _;
use lifecycle_support::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tower_keepalive::{CloseReason, KeepAliveLayer};

const SEC: Duration = Duration::from_secs(1);

fn idle(timeout: Duration) -> KeepAliveLayer {
    KeepAliveLayer::new().idle_timeout(timeout)
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

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

// 1.
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

// 2.
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

// 2, on the wire: a GOAWAY with NO_ERROR, no sooner than the timeout, then EOF.
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

// 3.
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

// 3.
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

// 3, where the body is handed to hyper in one piece and the client reads it slowly: the connection is
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

// 3, HTTP/2: the same with the client reading nothing for a while. Here the rest of the body waits in
// h2's send buffer for the client's flow-control window, not in a full socket, so no write shows that
// the connection is still busy: HTTP/2 connections get a longer grace (60 s) before a hard close.
#[tokio::test]
async fn http2_large_body_to_a_stalled_reader_is_not_cut() {
    let timeout = SEC;
    let len = 32 * 1024 * 1024;
    let mut server = start(idle(timeout)).await;
    let mut client = H2::connect(server.addr).await;
    let req = client.request(&format!("/big?bytes={len}"));
    let res = within("response head", WAIT, client.sender.send_request(req))
        .await
        .unwrap();
    tokio::time::sleep(ms(3000)).await;
    let body = within(
        "the body",
        WAIT,
        http_body_util::BodyExt::collect(res.into_body()),
    )
    .await
    .expect("body cut")
    .to_bytes();
    assert_eq!(body.len(), len, "body cut");
    client.closed(timeout + SLACK).await;
    assert_eq!(server.next_close().await.reason, CloseReason::Idle);
}

// 4.
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

// 4.
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

// 5: the client drops a response body mid-stream (RST_STREAM CANCEL).
#[tokio::test]
async fn http2_stream_reset_mid_body_releases_the_connection() {
    let timeout = SEC;
    let mut server = start(idle(timeout)).await;
    let mut client = H2::connect(server.addr).await;
    // 40 s of body if nobody stops it.
    let req = client.request("/stream?chunks=200&ms=200");
    let res = within("response head", WAIT, client.sender.send_request(req))
        .await
        .unwrap();
    let mut body = res.into_body();
    let first = within(
        "first chunk",
        WAIT,
        http_body_util::BodyExt::frame(&mut body),
    )
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

// 5: the client drops the response future before the head (the handler is still running).
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

// 6.
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

// 6, on the wire: GOAWAY naming the 3rd stream; a 4th stream sent after it is not answered.
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

// 6, HTTP/1: pipelined requests past the limit are not processed.
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

/// A maximum age of 2 s ±10 %: a response right after the connection opens still has more than a
/// second left, so it keeps the connection alive (advertising the whole seconds left, not the 10 s).
fn max_age_layer() -> KeepAliveLayer {
    idle(Duration::from_secs(10))
        .max_age(2 * SEC)
        .max_age_jitter(0.1)
}

// 7: idle connections closed at their jittered maximum age.
#[tokio::test]
async fn max_age_closes_idle_connections_with_jitter() {
    let mut server = start(max_age_layer()).await;
    let mut clients = Vec::new();
    for _ in 0..4 {
        let connecting = Instant::now();
        let mut client = RawClient::connect(server.addr).await;
        let res = client.get("/").await;
        assert_eq!(res.header("connection"), Some("keep-alive"));
        let timeout = Duration::from_secs(res.advertised_timeout().expect("no timeout="));
        // Under 2.2 s left: never the 10 s idle timeout.
        assert!(timeout <= 2 * SEC, "{res:#?}");
        let last_byte = client.last_byte_at;
        clients.push((connecting, client, timeout, last_byte));
    }
    for (connecting, client, timeout, last_byte) in &mut clients {
        let eof = client.eof().await;
        assert_between(
            "EOF after connecting",
            eof.duration_since(*connecting),
            ms(1800),
            ms(2200) + SLACK,
        );
        // The server counts the advert from the end of the response, a moment before its last byte
        // reached the client.
        assert!(
            eof.duration_since(*last_byte) + ms(250) >= *timeout,
            "EOF {:?} after a response advertising {timeout:?}",
            eof.duration_since(*last_byte)
        );
    }
    let mut ages = Vec::new();
    for _ in 0..4 {
        let closed = server.next_close().await;
        assert_eq!(closed.reason, CloseReason::MaxAge, "{closed:?}");
        let at = closed.handle.max_age_at().expect("no max age");
        let age = at.duration_since(closed.handle.opened_at());
        assert!(
            age >= ms(1800) && age <= ms(2200),
            "age {age:?} outside ±10 %"
        );
        assert!(closed.at >= at, "closed before its max age");
        ages.push(age);
    }
    ages.sort();
    ages.dedup();
    assert!(ages.len() > 1, "no jitter: {ages:?}");
}

// 7: a busy connection past its maximum age says `close` on its next response, then closes.
#[tokio::test]
async fn max_age_busy_http1_connection_closes_after_next_response() {
    let mut server = start(max_age_layer()).await;
    let mut client = RawClient::connect(server.addr).await;
    let res = client.get("/").await;
    assert_eq!(res.header("connection"), Some("keep-alive"));
    // In flight across the maximum age (at most 2.2 s).
    let res = client.get("/slow?ms=2600").await;
    assert_eq!((res.status, res.body_str()), (200, "slept"));
    assert_eq!(res.header("connection"), Some("close"));
    assert_eq!(res.header("keep-alive"), None);
    client.eof().await;
    let closed = server.next_close().await;
    assert_eq!(closed.reason, CloseReason::MaxAge);
    assert_eq!(closed.handle.requests(), 2);
}

// 7, HTTP/2: GOAWAY at the maximum age, after the stream in flight.
#[tokio::test]
async fn max_age_busy_http2_connection_closes_after_its_stream() {
    let mut server = start(max_age_layer()).await;
    let mut client = H2::connect(server.addr).await;
    let (status, body, _) = client.get("/slow?ms=2600").await;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"slept"[..]));
    client.closed(SLACK).await;
    assert_eq!(server.next_close().await.reason, CloseReason::MaxAge);
}

/// Idle timeout 2 s, maximum age 3.5 s exactly: the adverts must shrink over the last two seconds.
fn honest_max_age_layer() -> KeepAliveLayer {
    idle(2 * SEC).max_age(ms(3500)).max_age_jitter(0.0)
}

// 7: a client that trusts the adverts (as undici does), one request every 200 ms, never has its
// connection closed under a request: each advert fits in the time left before the maximum age, and the
// close comes as `Connection: close` on a response.
#[tokio::test]
async fn max_age_adverts_shrink_and_the_close_comes_on_a_response() {
    let mut server = start(honest_max_age_layer()).await;
    let mut client = RawClient::connect(server.addr).await;
    let exchanges = within(
        "the trusting client",
        WAIT,
        client.trust_adverts("/", ms(200), 60),
    )
    .await;
    // The close comes on a response: the connection ends right after it.
    if exchanges
        .last()
        .is_some_and(|exchange| exchange.response.is_some())
    {
        client.expect_eof().await;
    }
    let closed = server.next_close().await;
    let max_age_at = closed.handle.max_age_at().expect("no max age");
    let timeouts = assert_adverts_honest(&exchanges, max_age_at);
    assert_eq!(closed.reason, CloseReason::MaxAge, "{closed:?}");
    assert!(
        timeouts.windows(2).all(|pair| pair[0] >= pair[1]),
        "adverts grew: {timeouts:?}"
    );
    assert_eq!(timeouts.first(), Some(&2), "{timeouts:?}");
}

// 7: an idle connection whose last advert runs past its maximum age stays open until the advert has run
// out, counted from the end of the response, and closes then.
#[tokio::test]
async fn max_age_waits_for_the_last_advert_to_run_out() {
    let mut server = start(honest_max_age_layer()).await;
    let mut client = RawClient::connect(server.addr).await;
    // Planned 3 s before the maximum age: `timeout=2`. Answered 1.7 s later, 1.3 s before it: the advert
    // runs on 0.7 s past the maximum age.
    tokio::time::sleep(ms(500)).await;
    let res = client.get("/slow?ms=1700").await;
    let last_byte = client.last_byte_at;
    assert_eq!(res.header("connection"), Some("keep-alive"), "{res:#?}");
    let timeout = Duration::from_secs(res.advertised_timeout().expect("no timeout="));
    assert_eq!(timeout, 2 * SEC, "{res:#?}");
    let eof = client.eof().await;
    let closed = server.next_close().await;
    assert_eq!(closed.reason, CloseReason::MaxAge, "{closed:?}");
    let max_age_at = closed.handle.max_age_at().expect("no max age");
    let idle_since = closed.handle.idle_since().expect("closed while busy");
    assert!(
        idle_since + timeout > max_age_at,
        "the advert ran out before the maximum age: nothing tested"
    );
    // Strict on the server's clock: from the end of the response.
    assert!(
        closed.at >= idle_since + timeout,
        "closed {:?} after the response, before its timeout={}",
        closed.at.duration_since(idle_since),
        timeout.as_secs()
    );
    assert!(closed.at >= max_age_at, "closed before its maximum age");
    // The client read the last byte a moment after the server finished the response.
    assert_between(
        "EOF after the response's last byte",
        eof.duration_since(last_byte),
        timeout - ms(250),
        timeout + SLACK,
    );
}

// 7: a response whose head went out with keep-alive before the maximum age, and whose body ends after
// it, keeps its advert too: a request sent while that runs is answered (with `close`), not cut.
#[tokio::test]
async fn max_age_keeps_the_advert_of_a_response_streaming_across_it() {
    let mut server = start(idle(2 * SEC).max_age(2 * SEC).max_age_jitter(0.0)).await;
    let mut client = RawClient::connect(server.addr).await;
    // Planned 1.8 s before the maximum age: `timeout=1`. The body ends 0.4 s after the maximum age.
    tokio::time::sleep(ms(200)).await;
    let res = client.get("/stream?chunks=12&ms=200").await;
    assert_eq!(res.body_str(), stream_body(12));
    assert_eq!(res.header("connection"), Some("keep-alive"), "{res:#?}");
    assert_eq!(res.advertised_timeout(), Some(1), "{res:#?}");
    // As a client that trusts the advert: the next request well within it.
    tokio::time::sleep(ms(300)).await;
    client.send(get_request("/")).await;
    let res = within("the response", WAIT, client.try_read_response())
        .await
        .expect("the connection was closed under a request sent within its advert");
    assert_eq!(res.body_str(), "hello");
    assert_eq!(res.values("connection"), ["close"], "{res:#?}");
    client.expect_eof().await;
    let closed = server.next_close().await;
    assert_eq!(closed.reason, CloseReason::MaxAge, "{closed:?}");
    assert_eq!(closed.handle.requests(), 2);
}

// 8.
#[tokio::test]
async fn drain_http1_finishes_in_flight_closes_idle_refuses_new() {
    let mut server = start(idle(Duration::from_secs(30))).await;
    let mut idle_client = RawClient::connect(server.addr).await;
    assert_eq!(idle_client.get("/").await.status, 200);
    let mut busy = RawClient::connect(server.addr).await;
    busy.send(get_request("/slow?ms=1500")).await;
    assert_eq!(server.handler_started().await, "slow");

    server.shutdown();
    let signalled = Instant::now();
    let eof = idle_client.eof().await;
    assert!(
        eof.duration_since(signalled) < SLACK,
        "idle connection not closed at once"
    );
    // The drain has begun, so the listener is gone.
    let refused = within("connect", WAIT, TcpStream::connect(server.addr)).await;
    assert!(
        refused.is_err(),
        "a new connection was accepted during drain"
    );

    let res = busy.read_response().await;
    assert_eq!((res.status, res.body_str()), (200, "slept"));
    assert_eq!(res.header("connection"), Some("close"));
    assert_eq!(res.header("keep-alive"), None);
    busy.eof().await;
    server.finished(WAIT).await;
    for _ in 0..2 {
        assert_eq!(server.next_close().await.reason, CloseReason::Drain);
    }
}

// 8.
#[tokio::test]
async fn drain_http2_finishes_in_flight_closes_idle_refuses_new() {
    let mut server = start(idle(Duration::from_secs(30))).await;
    let mut idle_client = H2::connect(server.addr).await;
    assert_eq!(idle_client.get("/").await.0, StatusCode::OK);
    let mut busy = H2::connect(server.addr).await;
    let req = busy.request("/slow?ms=1500");
    let response = tokio::spawn(busy.sender.send_request(req));
    assert_eq!(server.handler_started().await, "slow");

    server.shutdown();
    let signalled = Instant::now();
    let closed_at = idle_client.closed(SLACK).await;
    assert!(closed_at.duration_since(signalled) < SLACK);
    let refused = within("connect", WAIT, TcpStream::connect(server.addr)).await;
    assert!(
        refused.is_err(),
        "a new connection was accepted during drain"
    );

    let res = within("the in-flight response", WAIT, response)
        .await
        .unwrap()
        .expect("in-flight request failed");
    assert_eq!(res.status(), StatusCode::OK);
    let body = within(
        "the in-flight body",
        WAIT,
        http_body_util::BodyExt::collect(res.into_body()),
    )
    .await
    .unwrap()
    .to_bytes();
    assert_eq!(&body[..], b"slept");
    busy.closed(SLACK).await;
    server.finished(WAIT).await;
    for _ in 0..2 {
        assert_eq!(server.next_close().await.reason, CloseReason::Drain);
    }
}

// 8: past the drain deadline, what is left is cut.
#[tokio::test]
async fn drain_deadline_cuts_http1_request() {
    let mut server = start_with(idle(Duration::from_secs(30)), Some(ms(500))).await;
    let mut busy = RawClient::connect(server.addr).await;
    busy.send(get_request("/slow?ms=10000")).await;
    assert_eq!(server.handler_started().await, "slow");
    server.shutdown();
    let signalled = Instant::now();
    server.finished(ms(500) + SLACK).await;
    assert!(
        signalled.elapsed() >= ms(500),
        "returned before the deadline"
    );
    // Cut: EOF (or a reset) with no response.
    busy.eof().await;
    assert_eq!(server.next_close().await.reason, CloseReason::Drain);
}

// 8.
#[tokio::test]
async fn drain_deadline_cuts_http2_request() {
    let mut server = start_with(idle(Duration::from_secs(30)), Some(ms(500))).await;
    let mut busy = H2::connect(server.addr).await;
    let req = busy.request("/slow?ms=10000");
    let response = tokio::spawn(busy.sender.send_request(req));
    assert_eq!(server.handler_started().await, "slow");
    server.shutdown();
    let signalled = Instant::now();
    server.finished(ms(500) + SLACK).await;
    assert!(
        signalled.elapsed() >= ms(500),
        "returned before the deadline"
    );
    let res = within("the cut response", WAIT, response).await.unwrap();
    assert!(res.is_err(), "a response came through: {res:?}");
    assert_eq!(server.next_close().await.reason, CloseReason::Drain);
}

// 9.
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
            read = within("the server to close", WAIT, tokio::io::AsyncReadExt::read(client.stream_mut(), &mut buf)) => {
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

// 9: an HTTP/1 request head that never completes.
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

// 9: the HTTP/2 preface dribbled (hyper-util is still sniffing the protocol).
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

// 10.
#[tokio::test]
async fn websocket_outlives_idle_timeout_and_drain() {
    use tokio_tungstenite::tungstenite::Message;

    let timeout = SEC;
    let mut server = start(idle(timeout)).await;
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let url = format!("ws://{}/ws", server.addr);
    let (mut ws, res) = within(
        "the WebSocket handshake",
        WAIT,
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
        within("send", WAIT, ws.send(Message::text(text)))
            .await
            .unwrap();
        let reply = within("echo", WAIT, ws.next()).await.unwrap().unwrap();
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

// 11.
#[cfg(unix)]
#[tokio::test]
async fn unix_socket_request_then_idle_close() {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let path = std::env::temp_dir().join(format!(
        "tower-keepalive-lifecycle-{}-{nanos}.sock",
        std::process::id()
    ));
    let _ = std::fs::remove_file(&path);
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let timeout = ms(1500);
    let mut server = start_on(listener, idle(timeout), None);
    let stream = within("connect", WAIT, tokio::net::UnixStream::connect(&path))
        .await
        .unwrap();
    let mut client = RawClient::new(stream);
    let res = client.get("/").await;
    assert_eq!((res.status, res.body_str()), (200, "hello"));
    assert_eq!(res.header("connection"), Some("keep-alive"));
    let last_byte = client.last_byte_at;
    let eof = client.eof().await;
    let closed = server.next_close().await;
    assert_idle_close(&closed, timeout, ADVERTISED_1, last_byte, eof);
    let _ = std::fs::remove_file(&path);
}

// 12.
#[tokio::test]
async fn client_shutting_down_write_side_is_client_closed() {
    let mut server = start(idle(Duration::from_secs(30))).await;
    let mut client = RawClient::connect(server.addr).await;
    assert_eq!(client.get("/").await.status, 200);
    let shut = Instant::now();
    client.stream_mut().shutdown().await.unwrap();
    client.eof().await;
    let closed = server.next_close().await;
    assert_eq!(closed.reason, CloseReason::ClientClosed);
    assert!(closed.at.duration_since(shut) < SLACK);
}

// 12.
#[tokio::test]
async fn client_dropping_socket_is_client_closed() {
    let mut server = start(idle(Duration::from_secs(30))).await;
    let mut client = RawClient::connect(server.addr).await;
    assert_eq!(client.get("/").await.status, 200);
    let dropped = Instant::now();
    drop(client);
    let closed = server.next_close().await;
    assert_eq!(closed.reason, CloseReason::ClientClosed);
    assert_eq!(closed.handle.requests(), 1);
    assert!(closed.at.duration_since(dropped) < SLACK);
}

// 12.
#[tokio::test]
async fn http2_client_going_away_is_client_closed() {
    let mut server = start(idle(Duration::from_secs(30))).await;
    let mut client = H2::connect(server.addr).await;
    assert_eq!(client.get("/").await.0, StatusCode::OK);
    let dropped = Instant::now();
    // Without a sender, hyper's client connection closes.
    drop(client.sender);
    within("the client connection to end", WAIT, client.conn)
        .await
        .unwrap()
        .unwrap();
    let closed = server.next_close().await;
    assert_eq!(closed.reason, CloseReason::ClientClosed);
    assert!(closed.at.duration_since(dropped) < SLACK);
}

// 13. Lingering close (RFC 9112 section 9.6): a server that closes with input unread makes the kernel
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

/// A client that has sent one request to a server answering one request per connection: it has read the
/// response (`Connection: close`) and the end of the stream, and can still write.
async fn answered_and_closed(
    addr: std::net::SocketAddr,
) -> (
    RawClient<tokio::io::Join<tokio::net::tcp::OwnedReadHalf, tokio::io::Sink>>,
    tokio::net::tcp::OwnedWriteHalf,
) {
    let stream = within("connect", WAIT, TcpStream::connect(addr))
        .await
        .unwrap();
    let (read, mut write) = stream.into_split();
    write.write_all(get_request("/").as_bytes()).await.unwrap();
    let mut client = RawClient::new(tokio::io::join(read, tokio::io::sink()));
    let res = client.read_response().await;
    assert_eq!(res.values("connection"), ["close"], "{res:#?}");
    client.expect_eof().await;
    (client, write)
}

// 13: the linger is bounded by what it reads: a client that sends without end after the close is cut
// (at 4 MiB).
#[tokio::test]
async fn http1_lingering_close_is_cut_when_the_client_never_stops_sending() {
    let mut server = start(idle(Duration::from_secs(30)).max_requests(1)).await;
    let (_client, mut write) = answered_and_closed(server.addr).await;
    send_junk_until_cut(&mut write, WAIT).await;
    assert_eq!(server.next_close().await.reason, CloseReason::MaxRequests);
}

// 13: and by time: a client that stays silent and never closes is let go 2 s after the close. The
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

// 13: a drain deadline still drops a lingering connection at once.
#[tokio::test]
async fn drain_deadline_cuts_a_lingering_close() {
    let mut server = start_with(idle(Duration::from_secs(30)).max_requests(1), Some(ms(500))).await;
    let (_client, mut write) = answered_and_closed(server.addr).await;
    // A byte every 300 ms keeps the linger going for as long as it may last (10 s).
    let dribble = tokio::spawn(async move {
        let mut tick = tokio::time::interval(ms(300));
        loop {
            tick.tick().await;
            if write.write_all(b"x").await.is_err() {
                return;
            }
        }
    });
    server.shutdown();
    let signalled = Instant::now();
    server.finished(ms(500) + SLACK).await;
    assert!(
        signalled.elapsed() >= ms(500),
        "returned before the deadline"
    );
    assert_eq!(server.next_close().await.reason, CloseReason::MaxRequests);
    dribble.abort();
}

// 14. A client that half-closes after its request (RFC 9112 section 9.6: it has finished sending) is
// answered, then the connection closes. On a runtime with worker threads, as servers run: whether the
// end of stream is read before or after the service has seen the request depends on timing there, hence
// ten clients at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_request_then_half_close_is_answered() {
    let mut server = start(idle(Duration::from_secs(30))).await;
    for (path, body) in [("/", "hello"), ("/slow?ms=300", "slept")] {
        let clients = (0..10).map(|_| half_close_after(server.addr, path, body));
        futures_util::future::join_all(clients).await;
        for _ in 0..10 {
            let closed = server.next_close().await;
            assert_eq!(closed.reason, CloseReason::ClientClosed, "{path}");
            assert_eq!(closed.handle.requests(), 1, "{path}");
        }
    }
}

/// Sends a GET for `path` and half-closes: the response (`body`) comes, then the end of the stream.
async fn half_close_after(addr: std::net::SocketAddr, path: &str, body: &str) {
    let mut client = RawClient::connect(addr).await;
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
}

// 14: one that half-closes without a request is closed at once, not after the idle timeout.
#[tokio::test]
async fn http1_half_close_without_a_request_is_closed_at_once() {
    let mut server = start(idle(Duration::from_secs(30))).await;
    let mut client = RawClient::connect(server.addr).await;
    let shut = Instant::now();
    client.stream_mut().shutdown().await.unwrap();
    client.expect_eof().await;
    let closed = server.next_close().await;
    assert_eq!(closed.reason, CloseReason::ClientClosed);
    assert_eq!(closed.handle.requests(), 0);
    assert!(closed.at.duration_since(shut) < SLACK, "{closed:?}");
}
