//! Soak: many concurrent connections of every kind through the crate's serve path on loopback, then the
//! books: every accepted connection reported closed exactly once, for the reason its kind of client
//! implies, with its requests counted and nothing left in flight; and the process's memory back near
//! where it started.
//!
//! The default form opens 1000 connections at once, in one measured round after a warm-up round, and
//! takes a few seconds. The long form runs rounds for a given time:
//!
//! ```text
//! SOAK_CONNECTIONS=10000 SOAK_SECONDS=120 cargo test --release --all-features --test soak -- --nocapture
//! ```
//!
//! Each connection takes two file descriptors here (client and server side); the number of connections is
//! scaled down to fit the process's open-file limit, with a note on stderr.

mod support;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::apps::{full, BoxError};
use support::http1::{http_get, RawClient};
use support::server::{serve, TestServer};
use support::within;
use tokio::sync::Barrier;
use tower_keepalive::{CloseReason, KeepAliveLayer};

/// Idle timeout of the soak server: long enough that no connection is reaped while the others are still
/// being opened (the idle time runs from each accept, and opening a thousand connections has taken over
/// 2 s on a shared 2-core machine), short enough to keep the round short.
const IDLE: Duration = Duration::from_secs(4);
const MAX_REQUESTS: u64 = 5;
/// How far the memory may have grown after the measured rounds, against the warm-up's level.
const RSS_GROWTH_LIMIT_KB: u64 = 30 * 1024;

/// The kinds of client, each with the close reason and the request count it implies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Kind {
    /// Three HTTP/1.1 requests (one streamed), then the client leaves.
    KeepAlive,
    /// Two requests, then waits for the server to reap the idle connection.
    KeepAliveIdle,
    /// Requests until the server says `close` at its limit.
    MaxRequests,
    /// One request with `Connection: close`.
    Close,
    /// HTTP/1.0 without keep-alive: one request.
    Http10,
    /// HTTP/1.0 with keep-alive: two requests, then the client leaves.
    Http10KeepAlive,
    /// h2c: four streams (two at once), then waits for the server to reap the idle connection.
    H2Idle,
    /// h2c: two streams, then the client drops the connection.
    H2Gone,
    /// Sends its request head a few bytes at a time, then a second request with `close`.
    Slow,
    /// Sends half a request head and leaves.
    AbortedHead,
    /// Sends a head announcing a 1000-byte body, 10 bytes of it, and leaves.
    AbortedBody,
    /// Connects, sends nothing, and leaves.
    Silent,
}

const KINDS: [Kind; 12] = [
    Kind::KeepAlive,
    Kind::KeepAliveIdle,
    Kind::MaxRequests,
    Kind::Close,
    Kind::Http10,
    Kind::Http10KeepAlive,
    Kind::H2Idle,
    Kind::H2Gone,
    Kind::Slow,
    Kind::AbortedHead,
    Kind::AbortedBody,
    Kind::Silent,
];

impl Kind {
    /// The close reasons this kind may end with, and the requests the server counts.
    fn expected(self) -> (&'static [CloseReason], u64) {
        use CloseReason::*;
        // A client that leaves is seen as a clean EOF or as an error (a reset, a cut message), depending
        // on where hyper was when it noticed.
        const GONE: &[CloseReason] = &[ClientClosed, Error];
        match self {
            Kind::KeepAlive => (&[ClientClosed], 3),
            Kind::KeepAliveIdle => (&[Idle], 2),
            Kind::MaxRequests => (&[MaxRequests], MAX_REQUESTS),
            Kind::Close => (&[ClientClosed], 1),
            Kind::Http10 => (&[ClientClosed], 1),
            Kind::Http10KeepAlive => (&[ClientClosed], 2),
            Kind::H2Idle => (&[Idle], 4),
            Kind::H2Gone => (GONE, 2),
            Kind::Slow => (&[ClientClosed], 2),
            // hyper reads an EOF inside a head as an incomplete message.
            Kind::AbortedHead => (&[Error], 0),
            Kind::AbortedBody => (GONE, 1),
            // An EOF before any byte is a clean end.
            Kind::Silent => (&[ClientClosed], 0),
        }
    }
}

fn env_or(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(value) => value
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value:?} is not a number")),
        Err(_) => default,
    }
}

/// The soft limit on open files, from `/proc/self/limits`.
fn open_file_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// The process's resident memory, in kB.
fn rss_kb() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// The soak app: `/` answers `hello`, `/stream` answers in three chunks of unknown length. Counts every
/// request it sees.
fn app(
    calls: Arc<AtomicU64>,
) -> impl tower::Service<
    Request<Incoming>,
    Response = Response<support::apps::FallibleBody>,
    Error = Infallible,
    Future = impl Send,
> + Clone
       + Send
       + 'static {
    tower::service_fn(move |req: Request<Incoming>| {
        calls.fetch_add(1, Ordering::Relaxed);
        async move {
            let res = match req.uri().path() {
                "/stream" => {
                    let chunks = ["a", "b", "c"]
                        .map(|c| Ok::<_, BoxError>(Frame::data(Bytes::from_static(c.as_bytes()))));
                    Response::new(StreamBody::new(futures_util::stream::iter(chunks)).boxed())
                }
                _ => Response::new(full("hello")),
            };
            Ok::<_, Infallible>(res)
        }
    })
}

async fn expect_ok(client: &mut RawClient, request: String, connection: &str) {
    let res = client.request(request).await;
    assert!(res.status_line.ends_with(" 200 OK"), "{res:#?}");
    assert_eq!(res.values("connection"), [connection], "{res:#?}");
}

async fn h2_get(
    sender: &mut hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
    addr: SocketAddr,
) {
    within("the h2 sender", sender.ready()).await.unwrap();
    let req = Request::get(format!("http://{addr}/"))
        .body(Empty::new())
        .unwrap();
    let res = within("an h2 response", sender.send_request(req))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let body = within("an h2 body", res.into_body().collect())
        .await
        .unwrap();
    assert_eq!(body.to_bytes(), "hello");
}

/// One client of `kind`: connects, waits for every other client to be connected too, then does its part.
async fn client(kind: Kind, addr: SocketAddr, barrier: Arc<Barrier>) {
    let mut client = RawClient::connect(addr).await;
    barrier.wait().await;
    match kind {
        Kind::KeepAlive => {
            expect_ok(&mut client, http_get("/", "HTTP/1.1", &[]), "keep-alive").await;
            expect_ok(
                &mut client,
                http_get("/stream", "HTTP/1.1", &[]),
                "keep-alive",
            )
            .await;
            expect_ok(&mut client, http_get("/", "HTTP/1.1", &[]), "keep-alive").await;
        }
        Kind::KeepAliveIdle => {
            for _ in 0..2 {
                expect_ok(&mut client, http_get("/", "HTTP/1.1", &[]), "keep-alive").await;
            }
            client.expect_eof().await;
        }
        Kind::MaxRequests => {
            for _ in 1..MAX_REQUESTS {
                expect_ok(&mut client, http_get("/", "HTTP/1.1", &[]), "keep-alive").await;
            }
            expect_ok(&mut client, http_get("/", "HTTP/1.1", &[]), "close").await;
            client.expect_eof().await;
        }
        Kind::Close => {
            let request = http_get("/", "HTTP/1.1", &["Connection: close"]);
            expect_ok(&mut client, request, "close").await;
            client.expect_eof().await;
        }
        Kind::Http10 => {
            expect_ok(&mut client, http_get("/", "HTTP/1.0", &[]), "close").await;
            client.expect_eof().await;
        }
        Kind::Http10KeepAlive => {
            for _ in 0..2 {
                let request = http_get("/", "HTTP/1.0", &["Connection: keep-alive"]);
                expect_ok(&mut client, request, "keep-alive").await;
            }
        }
        Kind::H2Idle | Kind::H2Gone => {
            let (mut sender, conn) = within(
                "the h2 handshake",
                hyper::client::conn::http2::handshake(
                    TokioExecutor::new(),
                    TokioIo::new(client.into_stream()),
                ),
            )
            .await
            .unwrap();
            let conn = tokio::spawn(conn);
            h2_get(&mut sender, addr).await;
            h2_get(&mut sender, addr).await;
            if kind == Kind::H2Gone {
                conn.abort();
                return;
            }
            let (mut a, mut b) = (sender.clone(), sender.clone());
            tokio::join!(h2_get(&mut a, addr), h2_get(&mut b, addr));
            // The server reaps the idle connection with GOAWAY; the client's connection then ends.
            within("the server to close the h2 connection", conn)
                .await
                .unwrap()
                .unwrap();
        }
        Kind::Slow => {
            let request = http_get("/", "HTTP/1.1", &[]);
            for piece in request.as_bytes().chunks(12) {
                client.send(piece).await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let res = client.read_response().await;
            assert_eq!(res.values("connection"), ["keep-alive"], "{res:#?}");
            let request = http_get("/", "HTTP/1.1", &["Connection: close"]);
            expect_ok(&mut client, request, "close").await;
            client.expect_eof().await;
        }
        Kind::AbortedHead => client.send(b"GET / HTTP/1.1\r\nHo").await,
        Kind::AbortedBody => {
            client
                .send(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1000\r\n\r\n0123456789")
                .await;
        }
        Kind::Silent => drop(client),
    }
}

/// One round: `n` connections at once, of every kind in turn. Returns the number of each kind.
async fn round(server: &mut TestServer, calls: &AtomicU64, n: usize) -> HashMap<Kind, usize> {
    let accepted_before = server.accepted();
    let barrier = Arc::new(Barrier::new(n + 1));
    let mut kinds = HashMap::new();
    let mut clients = Vec::with_capacity(n);
    for i in 0..n {
        let kind = KINDS[i % KINDS.len()];
        *kinds.entry(kind).or_insert(0) += 1;
        clients.push((
            kind,
            tokio::spawn(client(kind, server.addr, barrier.clone())),
        ));
    }
    // Every client connected and accepted, none closed yet: `n` connections open at once.
    server.wait_accepted(accepted_before + n).await;
    if server.reported() != accepted_before {
        let early = server.next_close().await;
        panic!(
            "a connection closed early: {early:?}, {} in all",
            server.reported() - accepted_before
        );
    }
    let calls_before = calls.load(Ordering::Relaxed);
    within("the clients to connect", barrier.wait()).await;

    let mut failures = Vec::new();
    for (kind, client) in clients {
        match tokio::time::timeout(support::WAIT * 2, client).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => failures.push(format!("{kind:?}: {err}")),
            Err(_) => failures.push(format!("{kind:?}: still running")),
        }
    }
    assert!(
        failures.is_empty(),
        "{} clients failed, first: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );

    // The books. Each report is matched to the kinds by its reason and request count.
    let mut seen: HashMap<(CloseReason, u64), usize> = HashMap::new();
    let mut requests = 0;
    for _ in 0..n {
        let closed = server.next_close().await;
        assert_eq!(closed.handle.in_flight(), 0, "{closed:?}");
        requests += closed.handle.requests();
        *seen
            .entry((closed.reason, closed.handle.requests()))
            .or_insert(0) += 1;
    }
    assert_eq!(
        server.reported(),
        server.accepted(),
        "connections left open"
    );
    // Every request the app saw was counted on its connection, and none twice.
    assert_eq!(
        requests,
        calls.load(Ordering::Relaxed) - calls_before,
        "requests counted vs seen"
    );
    let mut books: Vec<_> = seen
        .iter()
        .map(|((r, q), n)| (r.as_str(), *q, *n))
        .collect();
    books.sort_unstable();
    eprintln!(
        "soak round: (reason, requests, connections) {books:?}; VmRSS {} kB",
        rss_kb()
    );
    check_books(&kinds, seen);
    kinds
}

/// Matches the reports against the kinds: kinds with one possible reason must match exactly; kinds that
/// may end either way take what is left of their request count, and nothing may remain.
fn check_books(kinds: &HashMap<Kind, usize>, mut seen: HashMap<(CloseReason, u64), usize>) {
    let report = format!("{seen:?}");
    let mut take = |reason: CloseReason, requests: u64, count: usize| -> usize {
        let entry = seen.entry((reason, requests)).or_insert(0);
        let taken = count.min(*entry);
        *entry -= taken;
        taken
    };
    let mut flexible = Vec::new();
    for (&kind, &count) in kinds {
        let (reasons, requests) = kind.expected();
        if let [reason] = reasons {
            assert_eq!(
                take(*reason, requests, count),
                count,
                "{kind:?}: expected {count} closed for {reason:?} after {requests} requests; reports {report}"
            );
        } else {
            flexible.push((kind, reasons, requests, count));
        }
    }
    for (kind, reasons, requests, count) in flexible {
        let mut left = count;
        for &reason in reasons {
            left -= take(reason, requests, left);
        }
        assert_eq!(
            left, 0,
            "{kind:?}: {left} of {count} not accounted for; reports {report}"
        );
    }
    seen.retain(|_, n| *n > 0);
    assert!(
        seen.is_empty(),
        "unexpected closes {seen:?}; reports {report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak() {
    let started = Instant::now();
    let mut connections = env_or("SOAK_CONNECTIONS", 1000) as usize;
    let seconds = env_or("SOAK_SECONDS", 0);
    if let Some(limit) = open_file_limit() {
        // Two descriptors per connection, plus the test harness's own.
        let fit = (limit.saturating_sub(256) / 2) as usize;
        if fit < connections {
            eprintln!(
                "soak: open-file limit {limit} fits {fit} connections at once, not {connections}"
            );
            connections = fit;
        }
    }
    assert!(connections >= KINDS.len(), "too few connections to soak");

    let calls = Arc::new(AtomicU64::new(0));
    let layer = KeepAliveLayer::new()
        .idle_timeout(IDLE)
        .max_requests(MAX_REQUESTS);
    let mut server = serve(layer, app(calls.clone())).await;

    // Warm-up: the allocator's pools, the runtime's worker state and hyper's buffers reach their working
    // size; memory is measured against this level. A long run warms up for its first quarter: glibc's
    // per-thread arenas keep growing for a few rounds of thousands of connections before they level off
    // (about 25 MB over the first four rounds of 5000, with this crate or without it).
    let mut warm_up_rounds = 0;
    loop {
        round(&mut server, &calls, connections).await;
        warm_up_rounds += 1;
        if started.elapsed() >= Duration::from_secs(seconds) / 4 {
            break;
        }
    }
    let baseline = rss_kb();

    let mut rounds = 0;
    let mut total = HashMap::new();
    loop {
        let kinds = round(&mut server, &calls, connections).await;
        for (kind, n) in kinds {
            *total.entry(kind).or_insert(0) += n;
        }
        rounds += 1;
        if started.elapsed() >= Duration::from_secs(seconds) {
            break;
        }
    }
    let after = rss_kb();

    let accepted = server.accepted();
    let rest = server.finish().await;
    assert!(rest.is_empty(), "closes after the last round: {rest:?}");
    eprintln!(
        "soak: {rounds} round(s) of {connections} connections after {warm_up_rounds} of warm-up, {accepted} accepted and \
         closed in {:?}; VmRSS {baseline} kB after the warm-up, {after} kB at the end; kinds {total:?}",
        started.elapsed()
    );
    assert_eq!(accepted, (warm_up_rounds + rounds) * connections);
    assert!(
        after <= baseline + RSS_GROWTH_LIMIT_KB,
        "VmRSS grew from {baseline} kB to {after} kB"
    );
}
