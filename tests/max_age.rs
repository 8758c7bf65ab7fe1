//! The maximum connection age on the crate's serve path, over real sockets on loopback: jittered closes of
//! idle connections, busy ones closing after their response or stream, adverts that never promise more
//! than the time left, and the grace period for HTTP/2 streams open past it (`max_age_grace`).
//!
//! Timing: "not before" bounds are strict and measured so that they hold whatever the load (from an
//! instant the server's own clock cannot precede); "soon after" bounds allow [`SLACK`] for a loaded
//! machine. Every wait is bounded.

mod support;

use std::time::{Duration, Instant};

use http::StatusCode;
use http_body_util::BodyExt;
use support::apps::stream_body;
use support::http1::*;
use support::http2::*;
use support::server::*;
use support::*;
use tower_keepalive::{CloseReason, KeepAliveLayer};

/// A maximum age of 2 s ±10 %: a response right after the connection opens still has more than a
/// second left, so it keeps the connection alive (advertising the whole seconds left, not the 10 s).
fn max_age_layer() -> KeepAliveLayer {
    idle(Duration::from_secs(10))
        .max_age(2 * SEC)
        .max_age_jitter(0.1)
}

// Idle connections closed at their jittered maximum age.
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

// A busy connection past its maximum age says `close` on its next response, then closes.
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

// HTTP/2: GOAWAY at the maximum age, after the stream in flight.
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

// A client that trusts the adverts (as undici does), one request every 200 ms, never has its
// connection closed under a request: each advert fits in the time left before the maximum age, and the
// close comes as `Connection: close` on a response.
#[tokio::test]
async fn max_age_adverts_shrink_and_the_close_comes_on_a_response() {
    let mut server = start(honest_max_age_layer()).await;
    let mut client = RawClient::connect(server.addr).await;
    let exchanges = within(
        "the trusting client",
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

// An idle connection whose last advert runs past its maximum age stays open until the advert has run
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

// A response whose head went out with keep-alive before the maximum age, and whose body ends after
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
    let res = within("the response", client.try_read_response())
        .await
        .expect("the connection was closed under a request sent within its advert");
    assert_eq!(res.body_str(), "hello");
    assert_eq!(res.values("connection"), ["close"], "{res:#?}");
    client.expect_eof().await;
    let closed = server.next_close().await;
    assert_eq!(closed.reason, CloseReason::MaxAge, "{closed:?}");
    assert_eq!(closed.handle.requests(), 2);
}

/// The grace period after the maximum age (`KeepAliveLayer::max_age_grace`).
const MAX_AGE: Duration = Duration::from_secs(1);
const GRACE: Duration = Duration::from_secs(2);

/// A 1 s maximum age, exactly, with a 2 s grace for the streams still open at it (gRPC's
/// `MAX_CONNECTION_AGE_GRACE`): then the connection is closed hard.
fn grace_layer() -> KeepAliveLayer {
    KeepAliveLayer::new()
        .idle_timeout(Duration::from_secs(30))
        .max_age(MAX_AGE)
        .max_age_jitter(0.0)
        .max_age_grace(GRACE)
}

#[tokio::test]
async fn http2_stream_open_past_max_age_and_grace_is_cut() {
    let mut server = start(grace_layer()).await;
    let opened = Instant::now();
    let mut client = H2::connect(server.addr).await;
    // Before the maximum age, a short request is served as usual.
    assert_eq!(client.get("/").await.0, StatusCode::OK);
    // 10 s of body: it outlasts the maximum age and the grace period.
    let req = client.request("/stream?chunks=100&ms=100");
    let res = within("the response head", client.sender.send_request(req))
        .await
        .expect("the stream failed before its head");
    assert_eq!(res.status(), StatusCode::OK);
    let mut body = res.into_body();
    let cut = loop {
        match within("the stream to be cut", body.frame()).await {
            Some(Ok(_)) => continue,
            Some(Err(_)) => break Instant::now(),
            None => panic!("the stream ended normally, after {:?}", opened.elapsed()),
        }
    };
    assert_between(
        "the cut",
        cut.duration_since(opened),
        MAX_AGE + GRACE,
        MAX_AGE + GRACE + SLACK,
    );
    let closed = server.next_close().await;
    assert_eq!(closed.reason, CloseReason::MaxAge, "{closed:?}");
}

#[tokio::test]
async fn http2_request_finishing_within_the_grace_is_not_cut() {
    let mut server = start(grace_layer()).await;
    let mut client = H2::connect(server.addr).await;
    // In flight across the maximum age (1 s), done well within the grace period (until 3 s).
    let (status, body, _) = client.get("/slow?ms=1500").await;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"slept"[..]));
    // GOAWAY came at the maximum age; with its stream done, the connection ends cleanly.
    client.closed(WAIT).await;
    let closed = server.next_close().await;
    assert_eq!(closed.reason, CloseReason::MaxAge, "{closed:?}");
}

#[tokio::test]
async fn without_a_grace_a_stream_past_max_age_runs_to_its_end() {
    let mut server = start(
        KeepAliveLayer::new()
            .idle_timeout(Duration::from_secs(30))
            .max_age(MAX_AGE)
            .max_age_jitter(0.0),
    )
    .await;
    let mut client = H2::connect(server.addr).await;
    let (status, body, _) = client.get("/stream?chunks=25&ms=100").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, stream_body(25));
    client.closed(WAIT).await;
    assert_eq!(server.next_close().await.reason, CloseReason::MaxAge);
}
