//! Shared by every integration test file (each declares `mod support;`).
//!
//! - [`http1`]: a raw HTTP/1 client that writes exact bytes and parses responses itself, for byte-level
//!   checks on the wire.
//! - [`http2`]: hyper's HTTP/2 client over h2c (prior knowledge), and a raw frame client that sees GOAWAY
//!   and RST_STREAM as sent and can play a hostile peer (its own SETTINGS, PINGs never acknowledged).
//! - [`server`]: [`server::TestServer`], the crate's serve path on 127.0.0.1 with every `on_close`
//!   report collected and the accepted connections counted; [`server::TestServer::builder`] picks the
//!   listener, app, drain deadline and lame-duck period.
//! - `axum_serve` (feature `axum`): `axum::serve` over the crate's `KeepAliveListener`, the other
//!   serve path.
//! - `both` (feature `axum`): a server on either serve path, for behaviour that must hold on both.
//! - [`hyper_loop`]: a hand-written hyper-util accept loop, for the layer on its own (no serve path).
//! - [`logs`]: what `tracing` logs during a test.
//! - [`apps`]: the apps those servers serve.
//! - `tls` (feature `tls`): a self-signed certificate, and a rustls client that trusts it.
//!
//! Every wait is bounded: by [`WAIT`] unless a test names a tighter bound.

// Each test file uses its own part of this module.
#![allow(dead_code)]

pub mod apps;
#[cfg(feature = "axum")]
pub mod axum_serve;
#[cfg(feature = "axum")]
pub mod both;
pub mod http1;
pub mod http2;
pub mod hyper_loop;
pub mod logs;
pub mod server;
#[cfg(feature = "tls")]
pub mod tls;

use std::future::Future;
use std::time::Duration;

use tower_keepalive::KeepAliveLayer;

/// The bound on any single wait that has no tighter bound of its own: generous, the test machine is
/// shared (two cores, other builds running).
pub const WAIT: Duration = Duration::from_secs(10);

/// How late "soon after" may be on a loaded 2-core machine.
pub const SLACK: Duration = Duration::from_secs(3);

/// One second, the unit of most timeouts in the tests.
pub const SEC: Duration = Duration::from_secs(1);

/// `n` milliseconds.
pub fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// A policy with nothing but an idle timeout.
pub fn idle(timeout: Duration) -> KeepAliveLayer {
    KeepAliveLayer::new().idle_timeout(timeout)
}

/// Awaits `fut` for at most [`WAIT`], panicking with `what` if it takes longer.
pub async fn within<F: Future>(what: &str, fut: F) -> F::Output {
    within_for(what, WAIT, fut).await
}

/// Awaits `fut` for at most `limit`, panicking with `what` if it takes longer.
pub async fn within_for<F: Future>(what: &str, limit: Duration, fut: F) -> F::Output {
    match tokio::time::timeout(limit, fut).await {
        Ok(out) => out,
        Err(_) => panic!("timed out after {limit:?} waiting for {what}"),
    }
}

/// Asserts `lo <= elapsed < hi`.
#[track_caller]
pub fn assert_between(what: &str, elapsed: Duration, lo: Duration, hi: Duration) {
    assert!(
        elapsed >= lo,
        "{what}: after {elapsed:?}, before the {lo:?} it must wait"
    );
    assert!(elapsed < hi, "{what}: after {elapsed:?}, not within {hi:?}");
}
