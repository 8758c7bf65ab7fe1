//! Idle keep-alive connections at scale, for `benches/run`: opens N connections to a server on loopback,
//! sends one HTTP/1.1 request on each, reads the response, then sits idle and records when the server
//! closes each connection.
//!
//! ```text
//! cargo run --release --example idle_clients -- --addr 127.0.0.1:8080 [-n 10000] [--idle-timeout 5]
//!     [--pid SERVER_PID] [--sources 4] [--concurrency 64] [--cpu-window 3] [--no-close]
//!     [--waves K] [--wave-pause SECS] [--settle SECS] [--report FILE] [--tls]
//! ```
//!
//! For each connection it takes the time from its response to the server's close (EOF or reset) and
//! prints the median, p99 and max of (close time - idle timeout). With `--pid` it also reads the server's
//! resident memory (`VmRSS` in /proc/PID/status) before the first connection and once all are
//! established (bytes per idle connection), and the server's CPU time (its threads' time on CPU in
//! /proc/PID/task/*/schedstat, else utime + stime in /proc/PID/stat) over a window while every connection sits idle and before the first idle timer is due. `--no-close`
//! (for a server that never closes idle connections) stops after that window.
//!
//! `--waves K` opens the connections in K waves: each wave connects, sends its requests and reads the
//! responses before the next begins, `--wave-pause` seconds later (past the serve path's hibernation
//! delay, the server has freed what the wave's connections held before the next comes, and can reuse
//! it). Memory is read `--settle` seconds (0.2) after the last response. With `--report FILE` (the
//! server's stdout, `bench_server` and `bench_server_heap`) it also sends the server `SIGUSR1` before
//! the first connection and when it reads the memory, and takes the live heap and the connection gauges
//! from the `REPORT` line the server prints (`heap_per_conn`, `allocs_per_conn`, `hibernating`); then,
//! with `SIGUSR2`, has the server give its allocator's free memory back (glibc's `malloc_trim`) and reads
//! its memory again (`rss_trimmed_per_conn`): what the connections hold, without what the allocator
//! keeps of what earlier connections freed.
//! `--tls` (feature `tls`): HTTPS, accepting any certificate (the bench server's is made at start).
//!
//! At most `--concurrency` connections are being set up at once (64: tokio's and std's listeners have a
//! backlog of 128, and a full accept queue drops SYNs, which the client retries only after a second).
//! Connections come from several loopback source addresses (127.0.0.2, 127.0.0.3, ...) so that ephemeral
//! ports do not run short; traffic goes to loopback only. Every wait is bounded. The last line on stdout
//! is `RESULT key=value ...` for scripts.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;
use tokio::sync::{Notify, Semaphore};

struct Args {
    addr: SocketAddr,
    n: usize,
    idle_timeout: Duration,
    pid: Option<u32>,
    sources: u8,
    concurrency: usize,
    cpu_window: Duration,
    close: bool,
    waves: usize,
    wave_pause: Duration,
    settle: Duration,
    report: Option<std::path::PathBuf>,
    tls: bool,
}

fn usage() -> ! {
    eprintln!(
        "usage: idle_clients --addr ADDR [-n N] [--idle-timeout SECS] [--pid PID] [--sources K] \
         [--concurrency C] [--cpu-window SECS] [--no-close] [--waves K] [--wave-pause SECS] \
         [--settle SECS] [--report FILE] [--tls]"
    );
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut args = Args {
        addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
        n: 10_000,
        idle_timeout: Duration::from_secs(5),
        pid: None,
        sources: 4,
        concurrency: 64,
        cpu_window: Duration::from_secs(3),
        close: true,
        waves: 1,
        wave_pause: Duration::ZERO,
        settle: Duration::from_millis(200),
        report: None,
        tls: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| usage());
        let secs = |v: String| match v.parse::<f64>() {
            Ok(s) if s.is_finite() && s >= 0.0 => Duration::from_secs_f64(s),
            _ => usage(),
        };
        match flag.as_str() {
            "--addr" => args.addr = value().parse().unwrap_or_else(|_| usage()),
            "-n" => args.n = value().parse().unwrap_or_else(|_| usage()),
            "--idle-timeout" => args.idle_timeout = secs(value()),
            "--pid" => args.pid = Some(value().parse().unwrap_or_else(|_| usage())),
            "--sources" => args.sources = value().parse().unwrap_or_else(|_| usage()),
            "--concurrency" => args.concurrency = value().parse().unwrap_or_else(|_| usage()),
            "--cpu-window" => args.cpu_window = secs(value()),
            "--no-close" => args.close = false,
            "--waves" => args.waves = value().parse().unwrap_or_else(|_| usage()),
            "--wave-pause" => args.wave_pause = secs(value()),
            "--settle" => args.settle = secs(value()),
            "--report" => args.report = Some(value().into()),
            "--tls" if cfg!(feature = "tls") => args.tls = true,
            _ => usage(),
        }
    }
    if !args.addr.ip().is_loopback() {
        eprintln!("idle_clients sends traffic to loopback addresses only");
        std::process::exit(2);
    }
    args.sources = args.sources.clamp(1, 200);
    args.concurrency = args.concurrency.max(1);
    args.waves = args.waves.clamp(1, args.n.max(1));
    args
}

/// What happened to one connection; times are offsets from the start of the run.
#[derive(Clone, Copy, Debug, Default)]
struct Outcome {
    responded: Option<Duration>,
    closed: Option<Duration>,
    failed: bool,
}

fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// CPU time used by `pid` so far, in nanoseconds: the sum over its threads of the time on CPU from
/// `/proc/PID/task/*/schedstat` (nanosecond resolution), or else utime + stime from `/proc/PID/stat`
/// (clock ticks, 10 ms).
fn cpu_ns(pid: u32) -> Option<u64> {
    let from_schedstat = || -> Option<u64> {
        let mut total = 0;
        for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
            let stat = std::fs::read_to_string(task.ok()?.path().join("schedstat")).ok()?;
            total += stat.split_whitespace().next()?.parse::<u64>().ok()?;
        }
        Some(total)
    };
    from_schedstat().or_else(|| {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name may hold spaces; the fields after it are plain.
        let rest = &stat[stat.rfind(')')? + 2..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // Fields 14 and 15 of stat(5), utime and stime; `rest` starts at field 3.
        let utime: u64 = fields.get(11)?.parse().ok()?;
        let stime: u64 = fields.get(12)?.parse().ok()?;
        // Clock ticks are 1/100 s on Linux here (`getconf CLK_TCK`).
        Some((utime + stime) * 10_000_000)
    })
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Whether `buf` holds a whole response (head and `content-length` body).
fn response_complete(buf: &[u8]) -> bool {
    let Some(end) = find(buf, b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
    let len = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    buf.len() >= end + 4 + len
}

/// What every connection's task shares.
struct Run {
    args: Args,
    start: Instant,
    /// Bounds everything: connecting, the requests, and the wait for the closes.
    deadline: Instant,
    /// Connections being set up at once.
    permits: Semaphore,
    /// Connections done with their request, answered or not.
    responded: AtomicUsize,
    /// Connections whose request was answered.
    answered: AtomicUsize,
    /// Notified when `responded` reaches `wave_end`: the current wave is done.
    all_responded: Notify,
    wave_end: AtomicUsize,
    #[cfg(feature = "tls")]
    tls: Option<tokio_rustls::TlsConnector>,
}

impl Run {
    fn responded(&self) {
        if self.responded.fetch_add(1, Ordering::AcqRel) + 1
            == self.wave_end.load(Ordering::Acquire)
        {
            self.all_responded.notify_one();
        }
    }
}

trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Stream for T {}

/// A TCP connection from `source` to the server, with TLS over it when asked.
async fn connect(run: &Run, source: Ipv4Addr) -> std::io::Result<Box<dyn Stream>> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(IpAddr::V4(source), 0))?;
    let tcp = socket.connect(run.args.addr).await?;
    #[cfg(feature = "tls")]
    if let Some(connector) = &run.tls {
        let name =
            rustls::pki_types::ServerName::try_from("localhost").map_err(std::io::Error::other)?;
        return Ok(Box::new(connector.connect(name, tcp).await?));
    }
    Ok(Box::new(tcp))
}

async fn one(run: Arc<Run>, index: usize) -> Outcome {
    let (args, start, deadline) = (&run.args, run.start, run.deadline);
    let mut outcome = Outcome::default();
    let permit = run.permits.acquire().await;
    let source = Ipv4Addr::new(127, 0, 0, 2 + (index % usize::from(args.sources)) as u8);
    let mut stream = match tokio::time::timeout_at(deadline.into(), connect(&run, source)).await {
        Ok(Ok(stream)) => stream,
        _ => {
            outcome.failed = true;
            drop(permit);
            run.responded();
            return outcome;
        }
    };
    let request = format!("GET / HTTP/1.1\r\nHost: {}\r\n\r\n", args.addr);
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    let exchange = async {
        stream.write_all(request.as_bytes()).await?;
        while !response_complete(&buf) {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        Ok::<_, std::io::Error>(())
    };
    let ok = matches!(
        tokio::time::timeout_at(deadline.into(), exchange).await,
        Ok(Ok(()))
    );
    drop(permit);
    if ok {
        outcome.responded = Some(start.elapsed());
        run.answered.fetch_add(1, Ordering::Relaxed);
    } else {
        outcome.failed = true;
    }
    run.responded();
    if !ok {
        return outcome;
    }
    // Idle: whatever arrives now is the end of the connection (EOF or a reset).
    if let Ok(result) = tokio::time::timeout_at(deadline.into(), stream.read(&mut chunk)).await {
        match result {
            Ok(0) | Err(_) => outcome.closed = Some(start.elapsed()),
            Ok(_) => outcome.failed = true,
        }
    }
    outcome
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn main() {
    let args = parse_args();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run(args));
}

/// The server's `REPORT` line (see `bench_server`), asked for with `signal` (`-USR1`, or `-USR2` to trim
/// first): its `key=value` pairs.
/// `None` if the server did not answer within 5 s.
async fn server_report(
    pid: u32,
    file: &std::path::Path,
    signal: &str,
) -> Option<Vec<(String, i64)>> {
    let reports = || {
        std::fs::read_to_string(file)
            .ok()
            .map(|text| {
                text.lines()
                    .filter(|l| l.starts_with("REPORT "))
                    .map(String::from)
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default()
    };
    let seen = reports().len();
    let sent = std::process::Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .ok()?;
    if !sent.success() {
        return None;
    }
    // The server writes its line at once; a file has no readiness to wait on, so look every 10 ms.
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        if let Some(line) = reports().get(seen) {
            return Some(
                line.split_whitespace()
                    .filter_map(|kv| {
                        let (k, v) = kv.split_once('=')?;
                        Some((k.to_string(), v.parse().ok()?))
                    })
                    .collect(),
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    None
}

fn field(report: &Option<Vec<(String, i64)>>, key: &str) -> Option<i64> {
    report
        .as_ref()?
        .iter()
        .find(|(k, _)| k == key)
        .map(|&(_, v)| v)
}

/// A client config that accepts whatever certificate the bench server made at start.
#[cfg(feature = "tls")]
fn tls_connector() -> tokio_rustls::TlsConnector {
    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use rustls::{DigitallySignedStruct, SignatureScheme};

    #[derive(Debug)]
    struct AnyCert(Arc<rustls::crypto::CryptoProvider>);
    impl ServerCertVerifier for AnyCert {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }
        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }
        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

async fn run(args: Args) {
    // The report first: the server's first one touches pages of its own, which are not the connections'.
    let report_before = match (args.pid, &args.report) {
        (Some(pid), Some(file)) => server_report(pid, file, "-USR1").await,
        _ => None,
    };
    let rss_before = args.pid.and_then(rss_bytes);
    let start = Instant::now();
    let wait = Duration::from_secs(if args.close { 30 } else { 20 });
    let pauses = args.wave_pause * u32::try_from(args.waves - 1).unwrap_or(u32::MAX);
    let run = Arc::new(Run {
        deadline: start + pauses + args.idle_timeout + wait,
        start,
        permits: Semaphore::new(args.concurrency),
        responded: AtomicUsize::new(0),
        answered: AtomicUsize::new(0),
        all_responded: Notify::new(),
        wave_end: AtomicUsize::new(0),
        #[cfg(feature = "tls")]
        tls: args.tls.then(tls_connector),
        args,
    });
    let args = &run.args;
    let mut tasks = tokio::task::JoinSet::new();
    for wave in 0..args.waves {
        let (from, to) = (args.n * wave / args.waves, args.n * (wave + 1) / args.waves);
        if wave > 0 && !args.wave_pause.is_zero() {
            tokio::time::sleep(args.wave_pause).await;
        }
        run.wave_end.store(to, Ordering::Release);
        for index in from..to {
            tasks.spawn(one(run.clone(), index));
        }
        if to > from {
            let _ =
                tokio::time::timeout_at(run.deadline.into(), run.all_responded.notified()).await;
        }
    }
    let established = start.elapsed();
    let answered = run.answered.load(Ordering::Acquire);
    println!(
        "{answered} of {} requests answered in {:.2} s",
        args.n,
        established.as_secs_f64()
    );

    // Memory and CPU of the server while every connection is idle.
    let mut rss_after = None;
    let mut report_after = None;
    let mut rss_trimmed = None;
    let mut cpu = None;
    if let Some(pid) = args.pid {
        tokio::time::sleep(args.settle).await;
        rss_after = rss_bytes(pid);
        if let Some(file) = &args.report {
            report_after = server_report(pid, file, "-USR1").await;
            // Then what the process keeps once the allocator has given its free memory back.
            if server_report(pid, file, "-USR2").await.is_some() {
                rss_trimmed = rss_bytes(pid);
            }
        }
        // The window must end before the first connection's idle timer is due; the first response came
        // at most `established` after the start, so the first timer is due no earlier than
        // `idle_timeout` after the start.
        let since = start.elapsed();
        let room = if args.close {
            args.idle_timeout
                .saturating_sub(since)
                .saturating_sub(Duration::from_millis(300))
        } else {
            args.cpu_window
        };
        let window = args.cpu_window.min(room);
        if window >= Duration::from_millis(500) {
            let a = cpu_ns(pid);
            let t = Instant::now();
            tokio::time::sleep(window).await;
            let b = cpu_ns(pid);
            if let (Some(a), Some(b)) = (a, b) {
                cpu = Some((b - a, t.elapsed(), b));
            }
        } else {
            println!("no room for a CPU window before the first idle timer");
        }
    }

    let mut outcomes = Vec::with_capacity(args.n);
    if args.close {
        while let Some(done) = tasks.join_next().await {
            if let Ok(outcome) = done {
                outcomes.push(outcome);
            }
        }
    } else {
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }

    let failed = outcomes.iter().filter(|o| o.failed).count();
    let mut lateness_ms: Vec<f64> = outcomes
        .iter()
        .filter_map(|o| Some((o.closed? - o.responded?).as_secs_f64() * 1e3))
        .map(|idle_ms| idle_ms - args.idle_timeout.as_secs_f64() * 1e3)
        .collect();
    lateness_ms.sort_by(f64::total_cmp);
    let closed = lateness_ms.len();
    let never_closed = outcomes
        .iter()
        .filter(|o| o.responded.is_some() && o.closed.is_none() && !o.failed)
        .count();

    let mut result = format!(
        "RESULT n={} answered={answered} connect_s={:.3}",
        args.n,
        established.as_secs_f64()
    );
    if let (Some(before), Some(after)) = (rss_before, rss_after) {
        let per = (after as f64 - before as f64) / args.n.max(1) as f64;
        println!(
            "server RSS: {:.1} MiB before, {:.1} MiB with {} idle connections: {per:.0} bytes each",
            before as f64 / 1048576.0,
            after as f64 / 1048576.0,
            args.n
        );
        result += &format!(" rss_before={before} rss_after={after} rss_per_conn={per:.0}");
        if let Some(trimmed) = rss_trimmed {
            let per = (trimmed as f64 - before as f64) / args.n.max(1) as f64;
            println!(
                "server RSS after malloc_trim: {:.1} MiB: {per:.0} bytes each",
                trimmed as f64 / 1048576.0
            );
            result += &format!(" rss_trimmed_per_conn={per:.0}");
        }
    }
    if let (Some(before), Some(after)) = (
        field(&report_before, "live_bytes"),
        field(&report_after, "live_bytes"),
    ) {
        // 0 and 0: a server without the counting allocator (bench_server rather than bench_server_heap).
        if before > 0 {
            let n = args.n.max(1) as f64;
            let per = (after - before) as f64 / n;
            let allocs = field(&report_after, "live_allocs").unwrap_or(0)
                - field(&report_before, "live_allocs").unwrap_or(0);
            println!(
                "server live heap: {before} B before, {after} B with {} idle connections: {per:.0} bytes \
                 and {:.2} allocations each",
                args.n,
                allocs as f64 / n
            );
            result += &format!(
                " heap_before={before} heap_after={after} heap_per_conn={per:.0} allocs_per_conn={:.2}",
                allocs as f64 / n
            );
        }
    }
    if let Some(hibernating) = field(&report_after, "hibernating") {
        let open = field(&report_after, "open").unwrap_or(0);
        println!("server: {open} connections open, {hibernating} hibernating");
        result += &format!(" open={open} hibernating={hibernating}");
    }
    if let Some((ns, window, total)) = cpu {
        let cpu_ms = ns as f64 / 1e6;
        let total_ms = total as f64 / 1e6;
        println!(
            "server CPU while idle: {cpu_ms:.3} ms over {:.2} s (since it started: {total_ms:.0} ms)",
            window.as_secs_f64()
        );
        result += &format!(
            " idle_cpu_ms={cpu_ms:.3} idle_window_s={:.2} cpu_total_ms={total_ms:.0}",
            window.as_secs_f64()
        );
    }
    if args.close {
        let (p50, p99, max) = (
            percentile(&lateness_ms, 50.0),
            percentile(&lateness_ms, 99.0),
            lateness_ms.last().copied().unwrap_or(f64::NAN),
        );
        let min = lateness_ms.first().copied().unwrap_or(f64::NAN);
        println!(
            "{closed} closed by the server, {never_closed} not closed in time, {failed} failed; \
             close - idle timeout: min {min:.1} ms, median {p50:.1} ms, p99 {p99:.1} ms, max {max:.1} ms"
        );
        result += &format!(
            " closed={closed} not_closed={never_closed} failed={failed} late_min_ms={min:.1} \
             late_p50_ms={p50:.1} late_p99_ms={p99:.1} late_max_ms={max:.1}"
        );
    }
    println!("{result}");
}
