//! The end of a lame-duck period (`Serve::lame_duck`), where a balancer's last requests used to be lost,
//! over real sockets on loopback:
//!
//! - a connection accepted shortly before the drain, whose first request arrives a little after the
//!   drain began, is served (with `Connection: close`), not closed under the request;
//! - clients still in the listener's accept queue when the lame-duck period ends are accepted and
//!   served, not reset when the listener closes; also when the runtime, busy, has not seen them yet;
//! - a client that connects once the period is over is refused, never queued (and then reset) while
//!   the server empties its queue;
//! - on both serve paths (`axum::serve` with `KeepAliveListener::lame_duck` too): an idle connection
//!   reused just after the signal, a first request just after the period, and a client queued while
//!   the runtime is busy are all served.
//!
//! Every wait is bounded.

mod support;

use std::future::IntoFuture;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::routing::get;
use axum::Router;
use support::http1::RawClient;
use support::within_for as within;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, Notify};
use tower_keepalive::KeepAliveLayer;

/// The bound on every wait: generous, the test machine is shared.
const WAIT: Duration = Duration::from_secs(10);

/// A request that asks to close after its response: the server closes at once, with no linger.
const GET_CLOSE: &str = "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";

struct Server {
    addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    done: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Server {
    fn shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    async fn finished(self) {
        within("the server to finish", WAIT, self.done)
            .await
            .unwrap()
            .unwrap();
    }
}

/// "hello" at `/`; `/hold` answers once `release` is notified. A lame-duck period of `lame_duck`, an
/// idle timeout long enough that nothing here closes for being idle; `hard` connections at most.
async fn start(lame_duck: Duration, hard: Option<usize>, release: Arc<Notify>) -> Server {
    let app = Router::new().route("/", get(|| async { "hello" })).route(
        "/hold",
        get(move || async move {
            release.notified().await;
            "released"
        }),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = oneshot::channel::<()>();
    let mut server = tower_keepalive::serve(listener, app)
        .keep_alive(KeepAliveLayer::new().idle_timeout(Duration::from_secs(30)))
        .with_graceful_shutdown(async {
            let _ = rx.await;
        })
        .lame_duck(lame_duck)
        .drain_timeout(WAIT);
    if let Some(hard) = hard {
        server = server.connection_limits(hard, hard);
    }
    let done = tokio::spawn(server.into_future());
    Server {
        addr,
        shutdown: Some(tx),
        done,
    }
}

/// Reads, within [`WAIT`], the response `client` is owed (`what`): a `200 hello` that says `close`. A
/// close or a reset first fails the test with `lost`; `context` names the client or the path, if any.
async fn served_with_close(client: &mut RawClient, what: &str, lost: &str, context: &str) {
    let res = within(what, WAIT, client.try_read_response())
        .await
        .unwrap_or_else(|| panic!("{context}: {lost}"));
    assert_eq!((res.status, res.body_str()), (200, "hello"), "{context}");
    assert_eq!(res.header("connection"), Some("close"), "{context}");
}

/// Waits until the server refuses new connections: its listener is closed, the drain has begun. Tries
/// to connect every 10 ms, for at most [`WAIT`]; there is no signal to await from outside.
async fn listener_closed(addr: SocketAddr) {
    within("the listener to close", WAIT, async {
        while TcpStream::connect(addr).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn a_request_sent_on_an_idle_connection_just_after_the_signal_is_served() {
    let mut server = start(Duration::from_secs(3), None, Arc::new(Notify::new())).await;
    let mut pooled = RawClient::connect(server.addr).await;
    let res = pooled.get("/").await;
    assert_eq!(res.header("connection"), Some("keep-alive"));
    server.shutdown();
    // A balancer reuses its idle connection just after the signal, its request already on its way.
    // (The delay is the point: no signal.)
    tokio::time::sleep(Duration::from_millis(100)).await;
    pooled.send(support::http1::get_request("/")).await;
    served_with_close(
        &mut pooled,
        "the reused connection's response",
        "the idle connection was closed under the request",
        "",
    )
    .await;
    pooled.expect_eof().await;
    drop(pooled);
    server.finished().await;
}

#[tokio::test]
async fn a_first_request_sent_just_after_the_drain_began_is_served() {
    let mut server = start(Duration::from_millis(300), None, Arc::new(Notify::new())).await;
    server.shutdown();
    // Connected during the lame-duck period, as a balancer does; its request is on its way.
    let mut late = RawClient::connect(server.addr).await;
    listener_closed(server.addr).await;
    // The request arrives a little after the drain began. (The delay is the point: no signal.)
    tokio::time::sleep(Duration::from_millis(100)).await;
    late.send(support::http1::get_request("/")).await;
    served_with_close(
        &mut late,
        "the late request's response",
        "the connection was closed under its first request",
        "",
    )
    .await;
    late.expect_eof().await;
    server.finished().await;
}

#[tokio::test]
async fn a_connection_that_stays_silent_is_closed_soon_after_the_drain_began() {
    let mut server = start(Duration::from_millis(300), None, Arc::new(Notify::new())).await;
    server.shutdown();
    let mut silent = RawClient::connect(server.addr).await;
    listener_closed(server.addr).await;
    // Closed within the first request's grace (1 s), well before its header timeout (10 s).
    within(
        "the silent connection's close",
        Duration::from_secs(5),
        silent.eof(),
    )
    .await;
    server.finished().await;
}

#[tokio::test]
async fn clients_queued_when_the_lame_duck_period_ends_are_served_not_reset() {
    let period = Duration::from_millis(300);
    let release = Arc::new(Notify::new());
    // Room for one connection: the others wait, the first in the accept loop, the rest in the
    // listener's accept queue.
    let mut server = start(period, Some(1), release.clone()).await;
    let mut busy = RawClient::connect(server.addr).await;
    busy.send("GET /hold HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await;
    // Sent, and held by the handler (it is not idle: nothing sheds it).
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut queued = Vec::new();
    for _ in 0..4 {
        let mut client = RawClient::connect(server.addr).await;
        client.send(GET_CLOSE).await;
        queued.push(client);
    }

    server.shutdown();
    // The lame-duck period ends with every queued client still waiting for room; then room comes.
    // (No signal from outside tells the period's end: waited for, with a margin.)
    tokio::time::sleep(period + Duration::from_millis(400)).await;
    release.notify_one();
    let res = within("the held response", WAIT, busy.read_response()).await;
    assert_eq!(res.body_str(), "released");
    // Each client closes once answered, as a balancer does after `Connection: close`: that ends the
    // server's lingering close, and its room goes to the next.
    drop(busy);

    for (i, mut client) in queued.into_iter().enumerate() {
        served_with_close(
            &mut client,
            "a queued client's response",
            "closed or reset unserved",
            &format!("queued client {i}"),
        )
        .await;
    }
    server.finished().await;
}

/// A server on a runtime of its own, one thread, that turns its IO driver only when it has nothing to
/// run (`event_interval` at its maximum): what a busy runtime does, deterministically. `/block-long`
/// and `/block-short` block that thread for 1.2 s and 0.5 s (a handler doing CPU work), after saying
/// so on `blocking`. On the serve path, or on `axum::serve` with `KeepAliveListener::lame_duck`.
fn start_on_busy_runtime(
    lame_duck: Duration,
    blocking: tokio::sync::mpsc::UnboundedSender<&'static str>,
    on_axum: bool,
) -> (SocketAddr, oneshot::Sender<()>, std::thread::JoinHandle<()>) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .event_interval(u32::MAX)
        .build()
        .unwrap();
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    std_listener.set_nonblocking(true).unwrap();
    let addr = std_listener.local_addr().unwrap();
    let (tx, rx) = oneshot::channel::<()>();
    let thread = std::thread::spawn(move || {
        runtime.block_on(async move {
            let block = |name: &'static str, ms: u64| {
                let blocking = blocking.clone();
                get(move || async move {
                    let _ = blocking.send(name);
                    std::thread::sleep(Duration::from_millis(ms));
                    name
                })
            };
            let app = Router::new()
                .route("/", get(|| async { "hello" }))
                .route("/block-long", block("long", 1200))
                .route("/block-short", block("short", 500));
            let listener = TcpListener::from_std(std_listener).unwrap();
            let layer = KeepAliveLayer::new().idle_timeout(Duration::from_secs(30));
            #[cfg(feature = "axum")]
            if on_axum {
                use tower_keepalive::axum::{into_make_service, KeepAliveListener};
                let listener = KeepAliveListener::new(listener, layer);
                let signal = listener.lame_duck(
                    async {
                        let _ = rx.await;
                    },
                    lame_duck,
                );
                let server = axum::serve(listener, into_make_service(app))
                    .with_graceful_shutdown(signal)
                    .into_future();
                tokio::spawn(server).await.unwrap().unwrap();
                return;
            }
            assert!(!on_axum, "the axum path needs feature axum");
            let server = tower_keepalive::serve(listener, app)
                .keep_alive(layer)
                .with_graceful_shutdown(async {
                    let _ = rx.await;
                })
                .lame_duck(lame_duck)
                .drain_timeout(WAIT);
            // A task, as the serve loop usually is: `block_on` would poll it ahead of every task.
            tokio::spawn(server.into_future()).await.unwrap().unwrap();
        });
    });
    (addr, tx, thread)
}

#[tokio::test]
async fn a_client_queued_while_the_runtime_is_busy_at_the_end_of_the_period_is_served() {
    client_queued_while_the_runtime_is_busy(false).await;
}

#[cfg(feature = "axum")]
#[tokio::test]
async fn axum_a_client_queued_while_the_runtime_is_busy_at_the_end_of_the_period_is_served() {
    client_queued_while_the_runtime_is_busy(true).await;
}

/// The runtime's view of the listener lags the kernel's while it is busy: a client the kernel queued
/// then was reset when the listener closed (the bench behind nginx lost requests so).
async fn client_queued_while_the_runtime_is_busy(on_axum: bool) {
    let period = Duration::from_millis(1000);
    let (blocking_tx, mut blocking) = tokio::sync::mpsc::unbounded_channel();
    let (addr, shutdown, thread) = start_on_busy_runtime(period, blocking_tx, on_axum);
    let mut first = RawClient::connect(addr).await;
    let mut second = RawClient::connect(addr).await;
    // Both accepted (served below), before the signal.
    let res = RawClient::connect(addr).await.request(GET_CLOSE).await;
    assert_eq!(res.body_str(), "hello");
    let _ = shutdown.send(());
    // The first blocks the server's thread from before the period's end until after it. (The delay
    // is the point: nothing tells the period's progress.)
    tokio::time::sleep(Duration::from_millis(300)).await;
    first
        .send("GET /block-long HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await;
    assert_eq!(
        within("the first block", WAIT, blocking.recv()).await,
        Some("long")
    );
    // The second's request waits in its socket; once the thread is free, the runtime reads it in the
    // same turn of its driver as it sees the period's end, and runs it first: it blocks the thread
    // again, before the accept loop has looked at its listener.
    second
        .send("GET /block-short HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await;
    assert_eq!(
        within("the second block", WAIT, blocking.recv()).await,
        Some("short")
    );
    // Queued by the kernel now, while the runtime cannot see it.
    let mut queued = RawClient::connect(addr).await;
    queued.send(GET_CLOSE).await;
    served_with_close(
        &mut queued,
        "the queued client's response",
        "the queued client was reset unserved",
        "",
    )
    .await;
    for (mut client, body) in [(first, "long"), (second, "short")] {
        let res = within("a blocked response", WAIT, client.read_response()).await;
        assert_eq!(res.body_str(), body);
    }
    within(
        "the server to finish",
        WAIT,
        tokio::task::spawn_blocking(move || thread.join()),
    )
    .await
    .unwrap()
    .unwrap();
}

#[cfg(any(target_os = "linux", target_os = "android"))]
#[tokio::test]
async fn a_client_connecting_while_the_queue_is_emptied_is_refused_not_queued() {
    // Once the period is over, the listener's queue takes nobody new: a client that joined it while
    // the server emptied it could come after the last look and be reset with the listener. Its connect
    // is left unanswered, then refused once the listener has closed, its request unsent.
    let period = Duration::from_millis(300);
    let release = Arc::new(Notify::new());
    let mut server = start(period, Some(1), release.clone()).await;
    let mut busy = RawClient::connect(server.addr).await;
    busy.send("GET /hold HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await;
    // Sent, and held by the handler. Then one client waits for room.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut queued = RawClient::connect(server.addr).await;
    queued.send(GET_CLOSE).await;
    server.shutdown();
    // The period ends while the server waits for room for the queued client. (No signal from outside
    // tells the period's end: waited for, with a margin.)
    tokio::time::sleep(period + Duration::from_millis(900)).await;
    let late = tokio::spawn(TcpStream::connect(server.addr));
    // The late connect is still unanswered while the queue is emptied...
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !late.is_finished(),
        "a client joined the queue after the period: {late:?}"
    );
    release.notify_one();
    let res = within("the held response", WAIT, busy.read_response()).await;
    assert_eq!(res.body_str(), "released");
    drop(busy);
    let res = within("the queued client's response", WAIT, queued.read_response()).await;
    assert_eq!((res.status, res.body_str()), (200, "hello"));
    drop(queued);
    // ...and refused once the listener has closed (at its SYN retry, a second or three later).
    let late = within("the late connect", WAIT, late).await.unwrap();
    assert_eq!(
        late.map(|_| ()).map_err(|err| err.kind()),
        Err(std::io::ErrorKind::ConnectionRefused),
        "a client joined the queue after the period"
    );
    server.finished().await;
}

#[cfg(feature = "axum")]
mod both_paths {
    use super::*;
    use support::both::{serve_on_lame_duck, Path};

    /// On either serve path: an idle HTTP/1 connection a balancer reuses just after the signal has its
    /// request served (with `Connection: close`), not closed under it; one left idle is closed a
    /// second after the signal.
    async fn idle_connection_reused_just_after_the_signal(path: Path) {
        let app = Router::new().route("/", get(|| async { "hello" }));
        let layer = KeepAliveLayer::new().idle_timeout(Duration::from_secs(30));
        let mut server = serve_on_lame_duck(path, layer, app, Duration::from_secs(6)).await;
        let mut pooled = RawClient::connect(server.addr).await;
        let mut unused = RawClient::connect(server.addr).await;
        for client in [&mut pooled, &mut unused] {
            let res = client.get("/").await;
            assert_eq!(res.header("connection"), Some("keep-alive"), "{path:?}");
        }
        server.shutdown();
        let signalled = std::time::Instant::now();
        // The request is on its way as the signal comes. (The delay is the point: no signal.)
        tokio::time::sleep(Duration::from_millis(100)).await;
        pooled.send(support::http1::get_request("/")).await;
        served_with_close(
            &mut pooled,
            "the reused connection's response",
            "the idle connection was closed under the request",
            &format!("{path:?}"),
        )
        .await;
        pooled.expect_eof().await;
        // The one nobody reused is closed once the grace (1 s) is over, well within the period.
        let closed = within("the unused connection's close", WAIT, unused.eof()).await;
        let after = closed.duration_since(signalled);
        assert!(
            after >= Duration::from_millis(900) && after < Duration::from_millis(4500),
            "{path:?}: unused idle connection closed {after:?} after the signal"
        );
    }

    /// On either serve path: a connection accepted just before the period's end, its first request
    /// arriving just after it, is served (with `Connection: close`), not closed by the drain.
    async fn first_request_just_after_the_period(path: Path) {
        let app = Router::new().route("/", get(|| async { "hello" }));
        let layer = KeepAliveLayer::new().idle_timeout(Duration::from_secs(30));
        let period = Duration::from_millis(500);
        let mut server = serve_on_lame_duck(path, layer, app, period).await;
        server.shutdown();
        // (The delays are the point: nothing tells the period's progress.)
        tokio::time::sleep(period - Duration::from_millis(100)).await;
        let mut late = RawClient::connect(server.addr).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        late.send(support::http1::get_request("/")).await;
        served_with_close(
            &mut late,
            "the late request's response",
            "the connection was closed under its first request",
            &format!("{path:?}"),
        )
        .await;
        late.expect_eof().await;
    }

    #[tokio::test]
    async fn serve_first_request_just_after_the_period() {
        first_request_just_after_the_period(Path::Serve).await;
    }

    #[tokio::test]
    async fn axum_first_request_just_after_the_period() {
        first_request_just_after_the_period(Path::Axum).await;
    }

    #[tokio::test]
    async fn serve_idle_connection_reused_just_after_the_signal() {
        idle_connection_reused_just_after_the_signal(Path::Serve).await;
    }

    #[tokio::test]
    async fn axum_idle_connection_reused_just_after_the_signal() {
        idle_connection_reused_just_after_the_signal(Path::Axum).await;
    }
}
