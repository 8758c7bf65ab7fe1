//! HTTP/2 streams past the connection's maximum requests: on both serve paths (`serve()` and
//! `axum::serve` with `KeepAliveListener`) they are reset with `REFUSED_STREAM` (RFC 9113 section 8.7:
//! not processed, safe to retry), never reach the handler, and a well-behaved client that retries them on
//! a new connection has every request served. The layer alone, in a hand-written hyper-util loop, answers
//! them `503 Service Unavailable`.

#![cfg(feature = "axum")]

mod support;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tower::util::BoxCloneService;
use tower_keepalive::KeepAliveLayer;

use support::axum_serve::{serve_axum, AxumServer};
use support::http2::{Frame, RawH2, H2, HEADERS, RST_STREAM};
use support::server::{serve, TestServer};
use support::{hyper_loop, within};

/// The maximum requests of these tests.
const MAX: u64 = 4;
/// Streams opened at once on one connection: past the maximum by twice as many.
const STREAMS: u32 = 3 * MAX as u32;
/// RST_STREAM's error code REFUSED_STREAM (RFC 9113 section 7).
const REFUSED_STREAM: u32 = 0x7;
/// HPACK static table index 8, `:status 200`, as the first byte of a header block.
const STATUS_200: u8 = 0x88;

#[derive(Clone, Copy, Debug)]
enum Path {
    /// `tower_keepalive::serve`.
    Serve,
    /// `axum::serve` over a `KeepAliveListener`.
    Axum,
}

/// A running server of either path, kept alive for the test; `hits` counts handler runs.
struct Server {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    _serve: Option<TestServer>,
    _axum: Option<AxumServer>,
}

impl Server {
    fn hits(&self) -> u64 {
        self.hits.load(Ordering::SeqCst) as u64
    }
}

/// `/`: counts its runs, answers `hello`.
fn app(hits: Arc<AtomicUsize>) -> Router {
    Router::new().route(
        "/",
        get(move || async move {
            hits.fetch_add(1, Ordering::SeqCst);
            "hello"
        }),
    )
}

async fn start(path: Path) -> Server {
    let layer = KeepAliveLayer::new().max_requests(MAX);
    let hits = Arc::new(AtomicUsize::new(0));
    let app = app(hits.clone());
    match path {
        Path::Serve => {
            let server = serve(layer, app).await;
            Server {
                addr: server.addr,
                hits,
                _serve: Some(server),
                _axum: None,
            }
        }
        Path::Axum => {
            let server = serve_axum(layer, app).await;
            Server {
                addr: server.addr,
                hits,
                _serve: None,
                _axum: Some(server),
            }
        }
    }
}

/// How the server ended a stream: its response's first header byte, or RST_STREAM's error code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    Headers(u8),
    Reset(u32),
}

/// Opens `STREAMS` streams at once on a raw connection (all written before any frame is read, so that
/// they all reach the server before the client has acknowledged the PING of hyper's graceful close),
/// then reads until each stream has been answered or the server has closed the connection.
async fn open_streams_at_once(addr: SocketAddr) -> BTreeMap<u32, Answer> {
    let mut client = RawH2::connect(addr).await;
    let streams: Vec<u32> = (0..STREAMS).map(|i| 2 * i + 1).collect();
    for &stream in &streams {
        client.get(stream).await;
    }
    let mut answers = BTreeMap::new();
    within("every stream answered", async {
        while answers.len() < streams.len() {
            let Some(frame) = client.frame().await else {
                break;
            };
            if let Some(answer) = answer(&frame) {
                // The first word on a stream is its answer: a reset after a head would not be a refusal.
                answers.entry(frame.stream).or_insert(answer);
            }
        }
    })
    .await;
    answers
}

fn answer(frame: &Frame) -> Option<Answer> {
    match frame.kind {
        HEADERS => Some(Answer::Headers(frame.payload[0])),
        RST_STREAM => Some(Answer::Reset(u32::from_be_bytes(
            frame.payload[..4].try_into().unwrap(),
        ))),
        _ => None,
    }
}

async fn streams_past_the_maximum_are_refused(path: Path) {
    let server = start(path).await;
    let answers = open_streams_at_once(server.addr).await;
    let hits = server.hits();
    assert_eq!(hits, MAX, "{path:?}: handler runs; answers {answers:?}");
    // Which streams are served is hyper's order of calling the service (the order of the streams on a
    // current-thread runtime, not on a multi-threaded one): counted, not named.
    let served = answers
        .values()
        .filter(|&&answer| answer == Answer::Headers(STATUS_200))
        .count() as u64;
    assert_eq!(served, MAX, "{path:?}: {answers:?}");
    for (stream, answer) in &answers {
        assert!(
            *answer == Answer::Headers(STATUS_200) || *answer == Answer::Reset(REFUSED_STREAM),
            "{path:?}: stream {stream} neither served nor refused: {answers:?}"
        );
    }
    // Every stream answered before the connection ends (`axum::serve`'s end-of-file used to come before
    // h2 had written what it queued, and lost them).
    assert_eq!(answers.len(), STREAMS as usize, "{path:?}: {answers:?}");
}

#[tokio::test]
async fn h2_streams_past_max_requests_are_reset_with_refused_stream_serve() {
    streams_past_the_maximum_are_refused(Path::Serve).await;
}

#[tokio::test]
async fn h2_streams_past_max_requests_are_reset_with_refused_stream_axum() {
    streams_past_the_maximum_are_refused(Path::Axum).await;
}

/// The reset reason behind a hyper client error, if the stream was reset.
fn reset_reason(err: &hyper::Error) -> Option<h2::Reason> {
    let mut source = std::error::Error::source(err);
    while let Some(err) = source {
        if let Some(h2) = err.downcast_ref::<h2::Error>() {
            return h2.reason();
        }
        source = err.source();
    }
    None
}

/// Sends `STREAMS` requests at once on `client`; returns each one's status and body, or its error.
async fn send_at_once(client: &H2) -> Vec<Result<(StatusCode, Bytes), hyper::Error>> {
    let requests: Vec<_> = (0..STREAMS)
        .map(|_| {
            let mut sender = client.sender.clone();
            let req = client.request("/");
            tokio::spawn(async move {
                let res = sender.send_request(req).await?;
                let status = res.status();
                let body = res.into_body().collect().await?.to_bytes();
                Ok((status, body))
            })
        })
        .collect();
    let mut results = Vec::new();
    for request in requests {
        results.push(within("an h2 request", request).await.unwrap());
    }
    results
}

/// A well-behaved client (hyper's) sends `STREAMS` requests at once across the maximum: each is either
/// served or refused with `REFUSED_STREAM`, and each refused one is served on a new connection.
async fn concurrent_requests_across_the_maximum(path: Path) {
    let server = start(path).await;
    let client = H2::connect(server.addr).await;
    let mut served = 0u64;
    let mut refused = 0u64;
    for result in send_at_once(&client).await {
        match result {
            Ok((status, body)) => {
                assert_eq!(status, StatusCode::OK, "{path:?}");
                assert_eq!(&body[..], b"hello", "{path:?}");
                served += 1;
            }
            Err(err) => {
                assert_eq!(
                    reset_reason(&err),
                    Some(h2::Reason::REFUSED_STREAM),
                    "{path:?}: a request failed otherwise than refused: {err:?}"
                );
                refused += 1;
            }
        }
    }
    assert!(served <= MAX, "{path:?}: {served} served on one connection");
    assert!(
        refused > 0,
        "{path:?}: none refused: the test proves nothing"
    );
    assert_eq!(server.hits(), served, "{path:?}: a refused request ran");
    // Refused means not processed: the retries, on a new connection whenever the last one is closing,
    // all succeed.
    let mut retry = H2::connect(server.addr).await;
    for _ in 0..refused {
        if !ready(&mut retry).await {
            retry = H2::connect(server.addr).await;
        }
        let (status, body, _) = retry.get("/").await;
        assert_eq!(status, StatusCode::OK, "{path:?}: a retry");
        assert_eq!(&body[..], b"hello", "{path:?}: a retry");
    }
    assert_eq!(server.hits(), served + refused, "{path:?}");
}

/// Whether the connection still takes requests (not closing after its maximum).
async fn ready(client: &mut H2) -> bool {
    !client.sender.is_closed()
        && within("an h2 connection ready", client.sender.ready())
            .await
            .is_ok()
}

#[tokio::test]
async fn h2_concurrent_requests_across_max_requests_are_served_or_refused_serve() {
    concurrent_requests_across_the_maximum(Path::Serve).await;
}

#[tokio::test]
async fn h2_concurrent_requests_across_max_requests_are_served_or_refused_axum() {
    concurrent_requests_across_the_maximum(Path::Axum).await;
}

/// The layer alone (a hand-written hyper-util loop) cannot make hyper reset a stream: past the maximum it
/// answers `503 Service Unavailable`, still without calling the handler.
#[tokio::test]
async fn h2_requests_past_max_requests_get_503_from_the_layer_alone() {
    let hits = Arc::new(AtomicUsize::new(0));
    let counted = hits.clone();
    let app = BoxCloneService::new(tower::service_fn(move |_req| {
        counted.fetch_add(1, Ordering::SeqCst);
        async { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from("hello")).boxed())) }
    }));
    let server = hyper_loop::start_server(KeepAliveLayer::new().max_requests(MAX), app).await;
    let client = H2::connect(server.addr).await;
    let mut statuses = BTreeMap::new();
    for result in send_at_once(&client).await {
        let (status, _) = result.expect("an h2 request failed");
        *statuses.entry(status.as_u16()).or_insert(0u64) += 1;
    }
    assert_eq!(
        statuses,
        BTreeMap::from([(200, MAX), (503, u64::from(STREAMS) - MAX)])
    );
    assert_eq!(hits.load(Ordering::SeqCst) as u64, MAX);
}
