//! The cost of waking a hibernated connection, for `benches/run`: N keep-alive HTTP/1.1 connections to a
//! server on loopback, then rounds of: every connection idle for `--pause` seconds (past the serve path's
//! hibernation delay), then one request on each connection in turn (the **wake** request: on the serve
//! path the connection has hibernated and hyper's connection is made again), then at once one more
//! request on each (the **awake** request, on a connection that is not idle).
//!
//! ```text
//! cargo run --release --example wake_clients -- --addr 127.0.0.1:8080 [-n 200] [--rounds 5]
//!     [--pause 1.5] [--pid SERVER_PID]
//! ```
//!
//! One request at a time: the latency of each (from writing the request to reading the whole response,
//! at the client) is the server's turnaround with no queueing. With `--pid` it also reads the server's
//! CPU time (its threads' time on CPU, /proc/PID/task/*/schedstat) before and after each phase: CPU per
//! request for wake and awake requests. The idle timeout of the server must be longer than the pause.
//! Every wait is bounded. The last line on stdout is `RESULT key=value ...` for scripts.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct Args {
    addr: SocketAddr,
    n: usize,
    rounds: usize,
    pause: Duration,
    pid: Option<u32>,
}

fn usage() -> ! {
    eprintln!("usage: wake_clients --addr ADDR [-n N] [--rounds R] [--pause SECS] [--pid PID]");
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut args = Args {
        addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
        n: 200,
        rounds: 5,
        pause: Duration::from_millis(1500),
        pid: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| usage());
        match flag.as_str() {
            "--addr" => args.addr = value().parse().unwrap_or_else(|_| usage()),
            "-n" => args.n = value().parse().unwrap_or_else(|_| usage()),
            "--rounds" => args.rounds = value().parse().unwrap_or_else(|_| usage()),
            "--pause" => match value().parse::<f64>() {
                Ok(s) if s.is_finite() && s >= 0.0 => args.pause = Duration::from_secs_f64(s),
                _ => usage(),
            },
            "--pid" => args.pid = Some(value().parse().unwrap_or_else(|_| usage())),
            _ => usage(),
        }
    }
    if !args.addr.ip().is_loopback() {
        eprintln!("wake_clients sends traffic to loopback addresses only");
        std::process::exit(2);
    }
    args.n = args.n.max(1);
    args
}

/// The server's time on CPU so far, all threads, in nanoseconds.
fn cpu_ns(pid: u32) -> Option<u64> {
    let mut total = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let stat = std::fs::read_to_string(task.ok()?.path().join("schedstat")).ok()?;
        total += stat.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(total)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// One request on `stream`, its whole response read; the time it took.
async fn exchange(stream: &mut TcpStream, request: &[u8]) -> std::io::Result<Duration> {
    let started = Instant::now();
    stream.write_all(request).await?;
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 512];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = find(&buf, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                return Ok(started.elapsed());
            }
        }
    }
}

/// One request on each connection in turn: the latencies, and the server's CPU per request.
async fn phase(
    conns: &mut [TcpStream],
    request: &[u8],
    pid: Option<u32>,
    latencies: &mut Vec<f64>,
) -> std::io::Result<Option<f64>> {
    let before = pid.and_then(cpu_ns);
    for stream in conns.iter_mut() {
        let took = tokio::time::timeout(Duration::from_secs(10), exchange(stream, request))
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        latencies.push(took.as_secs_f64() * 1e6);
    }
    let after = pid.and_then(cpu_ns);
    Ok(match (before, after) {
        (Some(a), Some(b)) => Some((b - a) as f64 / conns.len() as f64),
        _ => None,
    })
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    percentile(&v, 50.0)
}

fn main() {
    let args = parse_args();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    if let Err(err) = rt.block_on(run(args)) {
        eprintln!("wake_clients: {err}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> std::io::Result<()> {
    let request = format!("GET / HTTP/1.1\r\nHost: {}\r\n\r\n", args.addr);
    let request = request.as_bytes();
    let mut conns = Vec::with_capacity(args.n);
    for _ in 0..args.n {
        let mut stream =
            tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(args.addr))
                .await
                .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        stream.set_nodelay(true)?;
        tokio::time::timeout(Duration::from_secs(10), exchange(&mut stream, request))
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        conns.push(stream);
    }
    let (mut wake, mut awake) = (Vec::new(), Vec::new());
    let (mut wake_cpu, mut awake_cpu) = (Vec::new(), Vec::new());
    for round in 1..=args.rounds {
        tokio::time::sleep(args.pause).await;
        let w = phase(&mut conns, request, args.pid, &mut wake).await?;
        let a = phase(&mut conns, request, args.pid, &mut awake).await?;
        let fmt = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.0}"));
        println!(
            "round {round}: server CPU per request: wake {} ns, awake {} ns",
            fmt(w),
            fmt(a)
        );
        wake_cpu.extend(w);
        awake_cpu.extend(a);
    }
    wake.sort_by(f64::total_cmp);
    awake.sort_by(f64::total_cmp);
    let mut result = format!("RESULT n={} rounds={}", args.n, args.rounds);
    for (name, lat, cpu) in [("wake", &wake, wake_cpu), ("awake", &awake, awake_cpu)] {
        let (p50, p99) = (percentile(lat, 50.0), percentile(lat, 99.0));
        println!(
            "{name}: {} requests, latency p50 {p50:.1} us, p99 {p99:.1} us",
            lat.len()
        );
        result += &format!(" {name}_p50_us={p50:.1} {name}_p99_us={p99:.1}");
        if !cpu.is_empty() {
            let cpu = median(cpu);
            println!("{name}: server CPU per request {cpu:.0} ns (median of the rounds)");
            result += &format!(" {name}_cpu_ns={cpu:.0}");
        }
    }
    println!("{result}");
    Ok(())
}
