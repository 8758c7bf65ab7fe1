//! The hello-world servers that `benches/run` puts side by side: one service, three ways to serve it.
//!
//! ```text
//! cargo run --release --example bench_server -- --mode bare|layer|serve [--addr 127.0.0.1:0] [--threads 1]
//!     [--idle-timeout SECS] [--max-requests N] [--no-content-type] [--tls] [--no-peer-addr]
//!     [--hibernate-after SECS] [--no-hibernation] [--header-timeout SECS]
//! ```
//!
//! - `bare`: a hyper-util accept loop (auto builder: HTTP/1.1 and h2c on one port), no layer;
//! - `layer`: the same loop with `KeepAliveLayer` bound to a handle per connection (headers, counting,
//!   in-flight tracking; nobody drives the lifecycle);
//! - `serve`: `tower_keepalive::serve`, the full lifecycle (idle timer, drain, connection budget).
//!
//! All three set `TCP_NODELAY`, turn hyper's header-read timer off (as the serve path does), and answer
//! every request with `200 hello` and a `content-type` (as axum and nginx do). The runtime has `--threads`
//! worker threads (default 1) and the accept loop runs on them too, so pinning the process to one core with
//! `taskset` gives it exactly that core. Built with feature `metrics`, it records into a Prometheus
//! recorder. The first line on stdout is `listening on http://ADDR`; sizes of the per-connection
//! futures go to stderr. Stop it with a signal.
//!
//! With `--tls` (feature `tls`) every mode serves HTTPS on a self-signed certificate for `localhost` made
//! at start (rcgen), ALPN `h2` and `http/1.1`: `bare` and `layer` run the TLS handshake with tokio-rustls
//! in each connection's task before hyper-util's auto builder (as a hand-written accept loop does), and
//! `serve` uses `Serve::tls`. The first line is then `listening on https://ADDR`.
//!
//! `--no-peer-addr`: `serve` without the peer address in each request's extensions
//! (`Serve::peer_addr(false)`), to measure what that extension costs per request.
//!
//! `--hibernate-after SECS` and `--no-hibernation`: `serve`'s idle HTTP/1 connections hibernate after
//! that long (`Serve::hibernate_after`; 1 s by default), or never (`Serve::no_hibernation`).
//! `--header-timeout SECS`: `serve`'s `Serve::header_timeout` (10 s by default).
//!
//! **Reports.** On `SIGUSR1` (on `SIGUSR2`, after giving the allocator's free memory back to the
//! system with glibc's `malloc_trim`) the server prints one line to stdout: `REPORT live_bytes=B live_allocs=N
//! open=N idle=N hibernating=N` (the connection gauges of `KeepAliveLayer::stats`, which only `serve`
//! keeps up), then `LIVE_SIZES size:count ...`, the sizes of which 50 or more allocations are live.
//! The live heap is counted only in the `bench_server_heap` build of this same file
//! (`benches/tools/bench_server_heap.rs`), which installs [`Counting`] as the global allocator; here
//! both counts read 0, and no allocation pays for counting, so that `benches/instructions` measures
//! the server as users run it.

use std::alloc::{GlobalAlloc, Layout, System};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicIsize, Ordering::Relaxed};
use std::time::Duration;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tower::Layer;
use tower_keepalive::KeepAliveLayer;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Bare,
    Layer,
    Serve,
}

struct Args {
    mode: Mode,
    addr: SocketAddr,
    threads: usize,
    layer: KeepAliveLayer,
    content_type: bool,
    sizes: bool,
    tls: bool,
    peer_addr: bool,
    /// `Some(None)`: `--no-hibernation`; `None`: the serve path's default.
    hibernate_after: Option<Option<Duration>>,
    header_timeout: Option<Duration>,
}

fn usage() -> ! {
    eprintln!(
        "usage: bench_server --mode bare|layer|serve [--addr ADDR] [--threads N] [--idle-timeout SECS] \
         [--max-requests N (0: unlimited)] [--no-content-type] [--sizes] [--tls] [--no-peer-addr] \
         [--hibernate-after SECS] [--no-hibernation] [--header-timeout SECS]"
    );
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut args = Args {
        mode: Mode::Bare,
        addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        threads: 1,
        layer: KeepAliveLayer::new(),
        content_type: true,
        sizes: false,
        tls: false,
        peer_addr: true,
        hibernate_after: None,
        header_timeout: None,
    };
    let mut mode = None;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| usage());
        match flag.as_str() {
            "--mode" => {
                mode = Some(match value().as_str() {
                    "bare" => Mode::Bare,
                    "layer" => Mode::Layer,
                    "serve" => Mode::Serve,
                    _ => usage(),
                })
            }
            "--addr" => args.addr = value().parse().unwrap_or_else(|_| usage()),
            "--threads" => args.threads = value().parse().unwrap_or_else(|_| usage()),
            "--idle-timeout" => {
                let secs: f64 = value().parse().unwrap_or_else(|_| usage());
                if !secs.is_finite() || secs < 0.0 {
                    usage();
                }
                args.layer = args.layer.idle_timeout(Duration::from_secs_f64(secs));
            }
            "--max-requests" => {
                let n: u64 = value().parse().unwrap_or_else(|_| usage());
                args.layer = if n == 0 {
                    args.layer.unlimited_requests()
                } else {
                    args.layer.max_requests(n)
                };
            }
            "--no-content-type" => args.content_type = false,
            "--sizes" => args.sizes = true,
            "--no-peer-addr" => args.peer_addr = false,
            "--hibernate-after" => {
                let secs: f64 = value().parse().unwrap_or_else(|_| usage());
                if !secs.is_finite() || secs < 0.0 {
                    usage();
                }
                args.hibernate_after = Some(Some(Duration::from_secs_f64(secs)));
            }
            "--no-hibernation" => args.hibernate_after = Some(None),
            "--header-timeout" => {
                let secs: f64 = value().parse().unwrap_or_else(|_| usage());
                if !secs.is_finite() || secs <= 0.0 {
                    usage();
                }
                args.header_timeout = Some(Duration::from_secs_f64(secs));
            }
            "--tls" if cfg!(feature = "tls") => args.tls = true,
            _ => usage(),
        }
    }
    args.mode = mode.unwrap_or_else(|| if args.sizes { Mode::Bare } else { usage() });
    args.threads = args.threads.max(1);
    args
}

pub(crate) fn main() -> std::io::Result<()> {
    let args = parse_args();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads)
        .enable_all()
        .build()?;
    // Spawned, so that the accept loop runs on the worker threads rather than on this one.
    rt.block_on(async move { tokio::spawn(run(args)).await })
        .map_err(std::io::Error::other)?
}

async fn run(args: Args) -> std::io::Result<()> {
    if args.sizes {
        sizes(&args.layer);
        return Ok(());
    }
    // Built with feature `metrics`, the server records into a real recorder, as one that exports its
    // metrics does: what the feature costs when used.
    #[cfg(feature = "metrics")]
    let _recorder = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .map_err(std::io::Error::other)?;
    let listener = tokio::net::TcpListener::bind(args.addr).await?;
    #[cfg(feature = "tls")]
    let tls = if args.tls { Some(tls_config()?) } else { None };
    let scheme = if args.tls { "https" } else { "http" };
    println!("listening on {scheme}://{}", listener.local_addr()?);
    #[cfg(unix)]
    report_on_signal(args.layer.stats())?;

    let content_type = args.content_type;
    let hello = tower::service_fn(move |_req: Request<Incoming>| async move {
        let mut res = Response::new(Full::new(Bytes::from_static(b"hello")));
        if content_type {
            res.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        }
        Ok::<_, Infallible>(res)
    });

    if args.mode == Mode::Serve {
        let mut server = tower_keepalive::serve(listener, hello)
            .keep_alive(args.layer)
            .peer_addr(args.peer_addr);
        match args.hibernate_after {
            None => {}
            Some(Some(after)) => server = server.hibernate_after(after),
            Some(None) => server = server.no_hibernation(),
        }
        if let Some(timeout) = args.header_timeout {
            server = server.header_timeout(timeout);
        }
        #[cfg(feature = "tls")]
        if let Some(config) = tls {
            return server.tls(config).await;
        }
        return server.await;
    }
    #[cfg(feature = "tls")]
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);

    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().header_read_timeout(None);
    let mut sized = false;
    loop {
        let (io, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                // Out of file descriptors, most likely: give the connections time to go.
                eprintln!("accept: {err}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = io.set_nodelay(true);
        #[cfg(feature = "tls")]
        if let Some(acceptor) = &acceptor {
            // The handshake in the connection's task, as `Serve::tls` does it: the accept loop never
            // waits on a client.
            let acceptor = acceptor.clone();
            let builder = builder.clone();
            let svc = (args.mode == Mode::Layer).then(|| {
                let handle = args.layer.connection();
                args.layer.bind(handle).layer(hello)
            });
            tokio::spawn(async move {
                let Ok(Ok(io)) =
                    tokio::time::timeout(Duration::from_secs(10), acceptor.accept(io)).await
                else {
                    return;
                };
                let io = TokioIo::new(io);
                let _ = match svc {
                    None => {
                        builder
                            .serve_connection_with_upgrades(io, TowerToHyperService::new(hello))
                            .await
                    }
                    Some(svc) => {
                        builder
                            .serve_connection_with_upgrades(io, TowerToHyperService::new(svc))
                            .await
                    }
                };
            });
            continue;
        }
        let io = TokioIo::new(io);
        let builder = builder.clone();
        if args.mode == Mode::Bare {
            let svc = TowerToHyperService::new(hello);
            let conn = async move {
                let _ = builder.serve_connection_with_upgrades(io, svc).await;
            };
            report_size(&mut sized, "bare", &conn);
            tokio::spawn(conn);
        } else {
            let handle = args.layer.connection();
            let svc = TowerToHyperService::new(args.layer.bind(handle).layer(hello));
            let conn = async move {
                let _ = builder.serve_connection_with_upgrades(io, svc).await;
            };
            report_size(&mut sized, "layer", &conn);
            tokio::spawn(conn);
        }
    }
}

/// A self-signed certificate for `localhost`, made now; TLS 1.3 and 1.2 on `ring`, ALPN `h2` and
/// `http/1.1` (what `Serve::tls` offers when the config names none).
#[cfg(feature = "tls")]
fn tls_config() -> std::io::Result<std::sync::Arc<rustls::ServerConfig>> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])
        .map_err(std::io::Error::other)?;
    let der = CertificateDer::from(cert.cert.der().to_vec());
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.signing_key.serialize_der()));
    let mut config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(std::io::Error::other)?
    .with_no_client_auth()
    .with_single_cert(vec![der], key)
    .map_err(std::io::Error::other)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(std::sync::Arc::new(config))
}

/// `--sizes`: the size of each per-connection future, over an in-memory IO, then exit.
fn sizes(layer: &KeepAliveLayer) {
    let hello = tower::service_fn(|_req: Request<Incoming>| async {
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"hello"))))
    });
    let builder = auto::Builder::new(TokioExecutor::new());
    let io = || TokioIo::new(tokio::io::duplex(64).0);
    let bare = builder.serve_connection_with_upgrades(io(), TowerToHyperService::new(hello));
    let handle = layer.connection();
    let bound = layer.bind(handle.clone()).layer(hello);
    let layered =
        builder.serve_connection_with_upgrades(io(), TowerToHyperService::new(bound.clone()));
    let conn =
        builder.serve_connection_with_upgrades(io(), TowerToHyperService::new(bound.clone()));
    let driven = handle.clone().drive(conn);
    let conn =
        builder.serve_connection_with_upgrades(io(), TowerToHyperService::new(bound.clone()));
    let drain = tower_keepalive::serve::Drain::new();
    let watched = drain.watcher().drive(handle, conn);
    println!(
        "hyper-util auto connection: {} bytes; with the layer: {} bytes; \
         ConnectionHandle::drive(conn): {} bytes; DrainWatcher::drive(conn): {} bytes",
        std::mem::size_of_val(&bare),
        std::mem::size_of_val(&layered),
        std::mem::size_of_val(&driven),
        std::mem::size_of_val(&watched),
    );
}

/// The size of the first connection's task future, once: what the runtime allocates for each task
/// besides the connection's buffers.
fn report_size<T>(done: &mut bool, mode: &str, future: &T) {
    if !*done {
        *done = true;
        eprintln!(
            "{mode}: connection future {} bytes",
            std::mem::size_of_val(future)
        );
    }
}

/// Live heap, counted by [`Counting`] when it is the global allocator (`bench_server_heap`).
static LIVE_BYTES: AtomicIsize = AtomicIsize::new(0);
static LIVE_ALLOCS: AtomicIsize = AtomicIsize::new(0);
/// Live allocations by size in bytes (the last slot: 64 KiB and larger), to tell whose they are.
const SIZE_SLOTS: usize = 65537;
static LIVE_BY_SIZE: [AtomicIsize; SIZE_SLOTS] = [const { AtomicIsize::new(0) }; SIZE_SLOTS];

#[allow(dead_code)] // by `Counting`, installed by bench_server_heap only
fn live_by_size(size: usize) -> &'static AtomicIsize {
    &LIVE_BY_SIZE[size.min(SIZE_SLOTS - 1)]
}

/// The system allocator, counting the bytes and allocations live. Installed only by the
/// `bench_server_heap` build: two relaxed atomic additions per allocation are a cost the per-request
/// instruction counts must not include.
#[allow(dead_code)] // installed by bench_server_heap only
pub(crate) struct Counting;

// SAFETY: every call goes to `System` with the caller's arguments; the counters only observe.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract, passed on unchanged.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            LIVE_BYTES.fetch_add(layout.size() as isize, Relaxed);
            LIVE_ALLOCS.fetch_add(1, Relaxed);
            live_by_size(layout.size()).fetch_add(1, Relaxed);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            LIVE_BYTES.fetch_add(layout.size() as isize, Relaxed);
            LIVE_ALLOCS.fetch_add(1, Relaxed);
            live_by_size(layout.size()).fetch_add(1, Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator, that is from `System`, with this layout.
        unsafe { System.dealloc(ptr, layout) };
        LIVE_BYTES.fetch_sub(layout.size() as isize, Relaxed);
        LIVE_ALLOCS.fetch_sub(1, Relaxed);
        live_by_size(layout.size()).fetch_sub(1, Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller upholds `GlobalAlloc::realloc`'s contract, passed on unchanged.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE_BYTES.fetch_add(new_size as isize - layout.size() as isize, Relaxed);
            live_by_size(layout.size()).fetch_sub(1, Relaxed);
            live_by_size(new_size).fetch_add(1, Relaxed);
        }
        p
    }
}

/// Prints a `REPORT` line on every `SIGUSR1` (see the module docs). The signal's task sleeps until a
/// signal comes: nothing runs while connections are idle.
#[cfg(unix)]
fn report_on_signal(stats: tower_keepalive::Stats) -> std::io::Result<()> {
    use std::io::Write;
    use tokio::signal::unix::{signal, SignalKind};
    let mut usr1 = signal(SignalKind::user_defined1())?;
    let mut usr2 = signal(SignalKind::user_defined2())?;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                Some(()) = usr1.recv() => {}
                Some(()) = usr2.recv() => trim(),
                else => break,
            }
            let s = stats.snapshot();
            let mut out = std::io::stdout().lock();
            let _ = writeln!(
                out,
                "REPORT live_bytes={} live_allocs={} open={} idle={} hibernating={}",
                LIVE_BYTES.load(Relaxed),
                LIVE_ALLOCS.load(Relaxed),
                s.connections_open(),
                s.connections_idle(),
                s.connections_hibernating(),
            );
            // The sizes with many allocations live, to tell what each connection keeps (`size:count`;
            // `65536:` counts everything larger too). Empty without the counting allocator.
            let _ = write!(out, "LIVE_SIZES");
            for (size, live) in LIVE_BY_SIZE.iter().enumerate() {
                let live = live.load(Relaxed);
                if live >= 50 {
                    let _ = write!(out, " {size}:{live}");
                }
            }
            let _ = writeln!(out);
            let _ = out.flush();
        }
    });
    Ok(())
}

/// `SIGUSR2`: gives the allocator's free memory back to the system before the report (glibc's
/// `malloc_trim`), to tell the memory connections hold from what the allocator keeps of what they
/// freed.
#[cfg(unix)]
fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn malloc_trim(pad: usize) -> std::ffi::c_int;
        }
        // SAFETY: glibc's `malloc_trim` takes any padding and only releases free memory.
        unsafe { malloc_trim(0) };
    }
}
