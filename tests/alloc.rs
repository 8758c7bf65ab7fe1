//! Heap allocations the layer adds per request, counted by a global allocator.
//!
//! Each case runs the same `service_fn` with and without `KeepAlive` (bound to a connection handle), on
//! the test thread, with every future polled once to completion (`now_or_never`) and the response body
//! polled to its end, so that the header rewrite, the body wrapper and the release of the in-flight
//! guard are all counted. The counter is per thread: the harness's other threads cannot disturb it.
//!
//! Figures and the commands that reproduce them: BENCHMARKS.md.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use futures_util::FutureExt;
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Request, Response, Version};
use http_body::Body;
use http_body_util::Full;
use tower::{Layer, Service};
use tower_keepalive::KeepAliveLayer;

struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
    static BYTES: Cell<u64> = const { Cell::new(0) };
}

fn count(bytes: usize) {
    // `try_with`: the allocator also runs while thread-locals are being torn down.
    let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
    let _ = BYTES.try_with(|n| n.set(n.get() + bytes as u64));
}

// SAFETY: every call is forwarded unchanged to `System`; the counter touches no heap memory.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size);
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocations() -> u64 {
    ALLOCATIONS.with(Cell::get)
}

fn bytes() -> u64 {
    BYTES.with(Cell::get)
}

const REQUESTS: u64 = 1000;
const WARM_UP: u64 = 10;

/// A hello-world response as frameworks send it: one header already set (axum sets `content-type`).
fn hello() -> Response<Full<Bytes>> {
    let mut res = Response::new(Full::new(Bytes::from_static(b"hello")));
    res.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    res
}

/// A response whose header map is empty, so the layer's fields are its first.
fn bare_hello() -> Response<Full<Bytes>> {
    Response::new(Full::new(Bytes::from_static(b"hello")))
}

/// Polls a body to its end, frame by frame, and drops it.
fn drain_body<B: Body + Unpin>(mut body: B) -> usize {
    let mut cx = Context::from_waker(Waker::noop());
    let mut frames = 0;
    loop {
        match Pin::new(&mut body).poll_frame(&mut cx) {
            Poll::Ready(Some(Ok(_))) => frames += 1,
            Poll::Ready(None) => return frames,
            Poll::Ready(Some(Err(_))) => panic!("body error"),
            Poll::Pending => panic!("a ready body was pending"),
        }
    }
}

/// One request through `svc`, completed on this thread.
fn one<S, B>(svc: &mut S, version: Version)
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>, Error = Infallible>,
    S::Future: Future,
    B: Body + Unpin,
{
    let mut req = Request::new(Full::new(Bytes::new()));
    *req.version_mut() = version;
    let res = svc
        .call(req)
        .now_or_never()
        .expect("the service is ready at once")
        .unwrap_or_else(|e| match e {});
    assert_eq!(drain_body(res.into_body()), 1);
}

/// Allocations for `REQUESTS` requests through `svc`, after a warm-up on a separate service (a separate
/// connection, for the layer) made by the same factory.
fn measure<S, B>(mut make: impl FnMut() -> S, version: Version) -> u64
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>, Error = Infallible>,
    B: Body + Unpin,
{
    // The warm-up makes everything that is made once per process: the layer's advert table, the
    // promotion of its shared buffer, thread-locals.
    let mut warm = make();
    for _ in 0..WARM_UP {
        one(&mut warm, version);
    }
    drop(warm);
    // A new connection: its handle is allocated here, outside the count, once per connection.
    let mut svc = make();
    let before = allocations();
    for _ in 0..REQUESTS {
        one(&mut svc, version);
    }
    allocations() - before
}

/// Allocations per `REQUESTS` requests: (without the layer, with it).
fn compare(
    layer: &KeepAliveLayer,
    response: fn() -> Response<Full<Bytes>>,
    version: Version,
) -> (u64, u64) {
    let inner = move || {
        tower::service_fn(move |_req: Request<Full<Bytes>>| async move {
            Ok::<_, Infallible>(response())
        })
    };
    let bare = measure(inner, version);
    let layered = measure(|| layer.bind(layer.connection()).layer(inner()), version);
    (bare, layered)
}

fn assert_none_added(name: &str, layer: KeepAliveLayer, version: Version) {
    let (bare, layered) = compare(&layer, hello, version);
    assert_eq!(
        layered, bare,
        "{name}: the layer added {} allocations over {REQUESTS} requests ({bare} without it, {layered} with it)",
        layered as i64 - bare as i64,
    );
}

#[test]
fn http11_keep_alive_default_policy_adds_no_allocation() {
    // Idle 5 s, at most 1000 requests, advertised: `Connection: keep-alive` and
    // `Keep-Alive: timeout=5, max=R` on every response, `Connection: close` on the 1000th.
    assert_none_added("HTTP/1.1", KeepAliveLayer::new(), Version::HTTP_11);
}

#[test]
fn http11_unlimited_requests_adds_no_allocation() {
    assert_none_added(
        "HTTP/1.1 unlimited",
        KeepAliveLayer::new().unlimited_requests(),
        Version::HTTP_11,
    );
}

#[test]
fn http11_beyond_the_advert_table_allocates_only_the_value() {
    // Past the pre-formatted table (the last 4096 counts of a connection) each `Keep-Alive` value is
    // formatted on the spot: exactly one allocation, the value's own bytes.
    let (bare, layered) = compare(
        &KeepAliveLayer::new().max_requests(1_000_000),
        hello,
        Version::HTTP_11,
    );
    assert_eq!(
        layered - bare,
        REQUESTS,
        "{bare} without the layer, {layered} with it"
    );
}

#[test]
fn http2_adds_no_allocation() {
    assert_none_added("HTTP/2", KeepAliveLayer::new(), Version::HTTP_2);
}

#[test]
fn http2_unlimited_requests_adds_no_allocation() {
    assert_none_added(
        "HTTP/2 unlimited",
        KeepAliveLayer::new().unlimited_requests(),
        Version::HTTP_2,
    );
}

#[test]
fn empty_header_map_costs_the_map_its_first_allocation() {
    // A response with no header at all has an unallocated `HeaderMap`; the layer's `Connection` field is
    // its first, and inserting it allocates the map's tables (`HeaderMap::new` allocates nothing until
    // then). That is the map's own, once per response, not the layer's state: any header the service or a
    // framework sets (axum always sets `content-type`) pays it instead.
    let (bare, layered) = compare(&KeepAliveLayer::new(), bare_hello, Version::HTTP_11);
    assert!(
        layered - bare <= 2 * REQUESTS,
        "{bare} without the layer, {layered} with it"
    );
    println!(
        "empty header map: {:.2} allocations per request added",
        (layered - bare) as f64 / REQUESTS as f64
    );
    // HTTP/2 writes nothing into the map: still zero.
    let (bare, layered) = compare(&KeepAliveLayer::new(), bare_hello, Version::HTTP_2);
    assert_eq!(layered, bare);
}

#[test]
fn a_connection_costs_one_allocation() {
    // Per connection, not per request: the handle's shared state, one `Arc`. Its size is what the layer
    // adds to an idle connection's memory (with the few words the bound service adds to the connection's
    // task); BENCHMARKS.md compares it with the resident memory per idle connection.
    let layer = KeepAliveLayer::new();
    drop(layer.bind(layer.connection()));
    let inner =
        tower::service_fn(|_req: Request<Full<Bytes>>| async { Ok::<_, Infallible>(hello()) });
    let (count, size) = (allocations(), bytes());
    let svc = layer.bind(layer.connection()).layer(inner);
    let (count, size) = (allocations() - count, bytes() - size);
    println!(
        "per connection: {count} allocation of {size} bytes; the bound service adds {} bytes to the \
         connection's task",
        std::mem::size_of_val(&svc) - std::mem::size_of_val(&inner)
    );
    assert_eq!(count, 1);
}

/// Allocations per `REQUESTS` requests of `insert` run on each request's extensions before the inner
/// service: (without it, with it).
fn compare_extensions(insert: fn(&mut http::Extensions)) -> (u64, u64) {
    let inner =
        || tower::service_fn(|_req: Request<Full<Bytes>>| async { Ok::<_, Infallible>(hello()) });
    let bare = measure(inner, Version::HTTP_11);
    let with = measure(
        move || {
            let mut inner = inner();
            tower::service_fn(move |mut req: Request<Full<Bytes>>| {
                insert(req.extensions_mut());
                inner.call(req)
            })
        },
        Version::HTTP_11,
    );
    (bare, with)
}

#[test]
fn the_peer_address_costs_the_extension_map_and_a_box_per_type() {
    // What the serve path's per-connection service does for `Serve::peer_addr(true)` (the default):
    // the address as `PeerAddr`, and with feature `axum` as `ConnectInfo` too. Not the layer's: the
    // layer itself still adds nothing (the tests above).
    use std::net::SocketAddr;
    use tower_keepalive::serve::PeerAddr;
    fn peer(extensions: &mut http::Extensions) {
        let addr = SocketAddr::from(([127, 0, 0, 1], 40_000));
        extensions.insert(PeerAddr(addr));
        #[cfg(feature = "axum")]
        extensions.insert(axum::extract::ConnectInfo(addr));
    }
    let types: u64 = if cfg!(feature = "axum") { 2 } else { 1 };
    let (bare, with) = compare_extensions(peer);
    let added = with - bare;
    println!(
        "peer address: {:.2} allocations per request added ({types} extension types, empty map before)",
        added as f64 / REQUESTS as f64
    );
    // The map on the first insert (its box and its table), and one box per value.
    assert_eq!(added, (2 + types) * REQUESTS);
    // A request that already has an extension (axum's router adds its own): only the boxes.
    fn peer_after_another(extensions: &mut http::Extensions) {
        extensions.insert(7_u8);
        peer(extensions);
    }
    let (_, one_other) = compare_extensions(|e| {
        e.insert(7_u8);
    });
    let (_, with) = compare_extensions(peer_after_another);
    println!(
        "peer address on a request with extensions already: {:.2} allocations per request added",
        (with - one_other) as f64 / REQUESTS as f64
    );
    assert_eq!(with - one_other, types * REQUESTS);
}
