//! `KeepAliveLayer::max_age_grace`: after the maximum age and its GOAWAY, streams still open get the grace
//! period, then the connection is closed hard (gRPC's `MAX_CONNECTION_AGE_GRACE`). Real sockets on
//! loopback; every wait bounded.

mod lifecycle_support;

use std::time::{Duration, Instant};

use http::StatusCode;
use http_body_util::BodyExt;
use lifecycle_support::*;
use tower_keepalive::{CloseReason, KeepAliveLayer};

const MAX_AGE: Duration = Duration::from_secs(1);
const GRACE: Duration = Duration::from_secs(2);

fn layer() -> KeepAliveLayer {
    KeepAliveLayer::new()
        .idle_timeout(Duration::from_secs(30))
        .max_age(MAX_AGE)
        .max_age_jitter(0.0)
        .max_age_grace(GRACE)
}

#[tokio::test]
async fn http2_stream_open_past_max_age_and_grace_is_cut() {
    let mut server = start(layer()).await;
    let opened = Instant::now();
    let mut client = H2::connect(server.addr).await;
    // Before the maximum age, a short request is served as usual.
    assert_eq!(client.get("/").await.0, StatusCode::OK);
    // 10 s of body: it outlasts the maximum age and the grace period.
    let req = client.request("/stream?chunks=100&ms=100");
    let res = within("the response head", WAIT, client.sender.send_request(req))
        .await
        .expect("the stream failed before its head");
    assert_eq!(res.status(), StatusCode::OK);
    let mut body = res.into_body();
    let cut = loop {
        match within("the stream to be cut", WAIT, body.frame()).await {
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
    let mut server = start(layer()).await;
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
