//! Per-request cost of the layer, in process: the same `service_fn` with and without `KeepAlive` bound to
//! a connection handle, for HTTP/1.1 and HTTP/2 requests, the response body polled to its end (so the
//! header rewrite, the body wrapper and the release of the in-flight guard are all inside the timing).
//!
//! Every future is ready at once and is polled on the bench thread (`now_or_never`): no runtime, no
//! socket. Requests are built outside the timed loop; a "connection" serves 1000 requests (nginx's
//! default, and the layer's), after which a new handle is bound, outside the timing too (the
//! `connection` bench measures that on its own).
//!
//! ```text
//! cargo bench --bench layer
//! cargo bench --bench layer -- --warm-up-time 1 --measurement-time 3   # short, as benches/run does
//! ALTERNATE=2000 cargo bench --bench layer   # bare and layered batches in alternation, median difference
//! ```
//!
//! Results and how to read them: BENCHMARKS.md.

use std::convert::Infallible;
use std::hint::black_box;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, BenchmarkId, Criterion};
use futures_util::FutureExt;
use http::header::{ACCEPT, CONTENT_TYPE, HOST, USER_AGENT};
use http::{HeaderValue, Request, Response, Version};
use http_body::{Body, Frame};
use http_body_util::Full;
use tower::{Layer, Service};
use tower_keepalive::KeepAliveLayer;

/// Requests per connection, as nginx's `keepalive_requests` default and the layer's `max_requests`.
const PER_CONNECTION: u64 = 1000;

/// A hello-world response as a framework sends it: one header set (axum sets `content-type`).
fn hello() -> Response<Full<Bytes>> {
    let mut res = Response::new(Full::new(Bytes::from_static(b"hello")));
    res.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    res
}

/// The same with no header at all: the layer's `Connection` is the map's first entry.
fn hello_no_headers() -> Response<Full<Bytes>> {
    Response::new(Full::new(Bytes::from_static(b"hello")))
}

/// A request as a load generator sends it.
fn request(version: Version) -> Request<Full<Bytes>> {
    let mut req = Request::new(Full::new(Bytes::new()));
    *req.version_mut() = version;
    let headers = req.headers_mut();
    headers.insert(HOST, HeaderValue::from_static("127.0.0.1:8080"));
    headers.insert(USER_AGENT, HeaderValue::from_static("bench/1"));
    headers.insert(ACCEPT, HeaderValue::from_static("*/*"));
    req
}

fn drain_body<B: Body + Unpin>(mut body: B) {
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        match Pin::new(&mut body).poll_frame(&mut cx) {
            Poll::Ready(Some(Ok(frame))) => {
                black_box(frame);
            }
            Poll::Ready(None) => return,
            Poll::Ready(Some(Err(_))) | Poll::Pending => {
                panic!("a ready body failed or was pending")
            }
        }
    }
}

/// Runs `iters` requests through services made by `connect`, one per `PER_CONNECTION` requests, and
/// returns the time spent in the requests alone.
fn run<S, B>(iters: u64, version: Version, mut connect: impl FnMut() -> S) -> Duration
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>, Error = Infallible>,
    B: Body + Unpin,
{
    let mut total = Duration::ZERO;
    let mut left = iters;
    let mut requests = Vec::with_capacity(PER_CONNECTION as usize);
    while left > 0 {
        let n = left.min(PER_CONNECTION);
        left -= n;
        requests.extend((0..n).map(|_| request(version)));
        let mut svc = connect();
        let start = Instant::now();
        for req in requests.drain(..) {
            let res = svc
                .call(req)
                .now_or_never()
                .expect("ready at once")
                .unwrap_or_else(|e| match e {});
            let (parts, body) = res.into_parts();
            black_box(&parts);
            drain_body(body);
        }
        total += start.elapsed();
    }
    total
}

/// A body that passes every frame through.
type PassThrough =
    http_body_util::combinators::MapFrame<Full<Bytes>, fn(Frame<Bytes>) -> Frame<Bytes>>;

/// The body wrapped in a combinator that passes every frame through.
fn wrap_body(res: Response<Full<Bytes>>) -> Response<PassThrough> {
    res.map(|body| http_body_util::BodyExt::map_frame(body, std::convert::identity as fn(_) -> _))
}

fn inner(
    response: fn() -> Response<Full<Bytes>>,
) -> impl Service<Request<Full<Bytes>>, Response = Response<Full<Bytes>>, Error = Infallible> {
    tower::service_fn(move |req: Request<Full<Bytes>>| {
        black_box(&req);
        std::future::ready(Ok::<_, Infallible>(response()))
    })
}

fn requests(c: &mut Criterion) {
    let default = KeepAliveLayer::new();
    let unlimited = KeepAliveLayer::new().unlimited_requests();
    type Case = (&'static str, Version, fn() -> Response<Full<Bytes>>, bool);
    let cases: [Case; 3] = [
        ("http1.1", Version::HTTP_11, hello, true),
        ("http2", Version::HTTP_2, hello, true),
        (
            "http1.1-no-response-headers",
            Version::HTTP_11,
            hello_no_headers,
            false,
        ),
    ];
    for (name, version, response, with_unlimited) in cases {
        let mut group = c.benchmark_group(name);
        group.bench_function(BenchmarkId::new("bare", "service_fn"), |b| {
            b.iter_custom(|iters| run(iters, version, || inner(response)))
        });
        // A layer that changes nothing but has the keep-alive layer's shape (its own response future,
        // the body wrapped): what any such middleware costs here, for scale.
        group.bench_function(BenchmarkId::new("noop-wrapper", "map_response"), |b| {
            b.iter_custom(|iters| {
                run(iters, version, || {
                    tower::util::MapResponseLayer::new(wrap_body).layer(inner(response))
                })
            })
        });
        group.bench_function(BenchmarkId::new("layer", "default"), |b| {
            b.iter_custom(|iters| {
                run(iters, version, || {
                    default.bind(default.connection()).layer(inner(response))
                })
            })
        });
        if with_unlimited {
            group.bench_function(BenchmarkId::new("layer", "unlimited"), |b| {
                b.iter_custom(|iters| {
                    run(iters, version, || {
                        unlimited
                            .bind(unlimited.connection())
                            .layer(inner(response))
                    })
                })
            });
        }
        group.finish();
    }
}

/// The same requests on two threads at once, each with its own connection, through one layer (as a
/// server's worker threads share it): what the per-request cost becomes when the state shared by all
/// connections (server-wide counters, the shared `Keep-Alive` buffer) is touched from two cores. The
/// time is per request on one thread; compare with the one-thread figure of the same group.
fn two_threads(c: &mut Criterion) {
    let layer = KeepAliveLayer::new();
    let mut group = c.benchmark_group("http1.1-two-threads");
    group.bench_function(BenchmarkId::new("bare", "service_fn"), |b| {
        b.iter_custom(|iters| parallel(|| run(iters, Version::HTTP_11, || inner(hello))))
    });
    group.bench_function(BenchmarkId::new("layer", "default"), |b| {
        b.iter_custom(|iters| {
            parallel(|| {
                run(iters, Version::HTTP_11, || {
                    layer.bind(layer.connection()).layer(inner(hello))
                })
            })
        })
    });
    group.finish();
}

/// Runs `f` on two threads at once; the slower thread's time.
fn parallel(f: impl Fn() -> Duration + Sync) -> Duration {
    std::thread::scope(|s| {
        let other = s.spawn(&f);
        let mine = f();
        mine.max(other.join().expect("bench thread"))
    })
}

fn connection(c: &mut Criterion) {
    // Once per accepted connection: the handle (one allocation) and the layer bound to it.
    let layer = KeepAliveLayer::new();
    c.bench_function("connection/handle+bind", |b| {
        b.iter(|| black_box(layer.bind(layer.connection())))
    });
}

/// The layer's cost per request as the median difference between bare and layered batches of one
/// connection's requests, run in alternation: slow drifts of a shared machine (another job starting,
/// the CPU's clock) fall on both sides of each difference. Finer than comparing two criterion medians
/// measured seconds apart, and the way to compare two builds of the crate: run it on each.
///
/// ```text
/// ALTERNATE=2000 cargo bench --bench layer     # batch pairs per protocol
/// ```
fn alternate(pairs: usize) {
    let layer = KeepAliveLayer::new();
    for (name, version) in [("http1.1", Version::HTTP_11), ("http2", Version::HTTP_2)] {
        let mut deltas: Vec<f64> = (0..pairs)
            .map(|_| {
                let bare = run(PER_CONNECTION, version, || inner(hello));
                let layered = run(PER_CONNECTION, version, || {
                    layer.bind(layer.connection()).layer(inner(hello))
                });
                (layered.as_nanos() as f64 - bare.as_nanos() as f64) / PER_CONNECTION as f64
            })
            .collect();
        deltas.sort_by(f64::total_cmp);
        let at = |q: usize| deltas[(deltas.len() - 1) * q / 4];
        println!(
            "{name}: layer - bare, median {:+.1} ns per request (quartiles {:+.1} / {:+.1}; {pairs} pairs of {PER_CONNECTION})",
            at(2),
            at(1),
            at(3),
        );
    }
}

criterion_group!(benches, requests, two_threads, connection);

fn main() {
    match std::env::var("ALTERNATE").ok().and_then(|n| n.parse().ok()) {
        Some(pairs) if pairs > 0 => alternate(pairs),
        _ => {
            benches();
            Criterion::default().configure_from_args().final_summary();
        }
    }
}
