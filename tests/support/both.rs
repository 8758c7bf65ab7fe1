//! One server on either serve path, for a behaviour that must hold on both: `tower_keepalive::serve`
//! ([`TestServer`]) or `axum::serve` over the crate's `KeepAliveListener` ([`AxumServer`]).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::Router;
use tower_keepalive::{CloseReason, KeepAliveLayer, Stats};

use super::axum_serve::{serve_axum, serve_axum_lame_duck, AxumServer};
use super::server::{serve, TestServer};
use super::within_for;

/// A serve path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    /// `tower_keepalive::serve`.
    Serve,
    /// `axum::serve` over a `KeepAliveListener`.
    Axum,
}

/// A server on one serve path, watched through its layer's counters.
pub struct Server {
    pub addr: SocketAddr,
    stats: Stats,
    // Kept to keep the server running: dropping it aborts the server.
    _running: Running,
}

enum Running {
    Serve(TestServer),
    Axum(AxumServer),
}

/// Serves `app` with `layer` on `path`.
pub async fn serve_on(path: Path, layer: KeepAliveLayer, app: Router) -> Server {
    let stats = layer.stats();
    let running = match path {
        Path::Serve => Running::Serve(serve(layer, app).await),
        Path::Axum => Running::Axum(serve_axum(layer, app).await),
    };
    let addr = match &running {
        Running::Serve(server) => server.addr,
        Running::Axum(server) => server.addr,
    };
    Server {
        addr,
        stats,
        _running: running,
    }
}

/// Serves `app` with `layer` on `path`; the shutdown signal ([`Server::shutdown`]) starts a lame-duck
/// `period`, then the drain.
pub async fn serve_on_lame_duck(
    path: Path,
    layer: KeepAliveLayer,
    app: Router,
    period: Duration,
) -> Server {
    let stats = layer.stats();
    let running = match path {
        Path::Serve => Running::Serve(TestServer::builder(layer).lame_duck(period).serve(app)),
        Path::Axum => Running::Axum(serve_axum_lame_duck(layer, app, period).await),
    };
    let addr = match &running {
        Running::Serve(server) => server.addr,
        Running::Axum(server) => server.addr,
    };
    Server {
        addr,
        stats,
        _running: running,
    }
}

impl Server {
    /// Gives the server its shutdown signal, without waiting for what follows. Once only.
    pub fn shutdown(&mut self) {
        match &mut self._running {
            Running::Serve(server) => server.shutdown(),
            Running::Axum(server) => server.shutdown(),
        }
    }

    /// Connections closed so far for `reason`.
    pub fn closed(&self, reason: CloseReason) -> u64 {
        self.stats.snapshot().closed(reason)
    }

    /// Waits at most `limit` until a connection has closed for `reason`; returns when that was seen.
    /// `axum::serve` reports no closes, so both paths are watched through the layer's counters, looked
    /// at every 20 ms.
    pub async fn until_closed(&self, reason: CloseReason, limit: Duration) -> Instant {
        within_for(&format!("a close for {reason}"), limit, async {
            while self.closed(reason) == 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Instant::now()
        })
        .await
    }
}
