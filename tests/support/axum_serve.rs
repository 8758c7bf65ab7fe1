//! The other serve path: `axum::serve` over the crate's [`KeepAliveListener`] on 127.0.0.1, with the
//! handle of each connection it accepts handed to the test.

use std::future::IntoFuture;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use axum::serve::Listener;
use axum::Router;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tower_keepalive::axum::{into_make_service, KeepAliveIo, KeepAliveListener};
use tower_keepalive::{ConnectionHandle, KeepAliveLayer};

use super::within_for;

/// `axum::serve` running on a [`KeepAliveListener`].
pub struct AxumServer {
    pub addr: SocketAddr,
    /// The handle of each connection accepted, in accept order.
    pub accepted: mpsc::UnboundedReceiver<ConnectionHandle>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<io::Result<()>>>,
}

/// Serves `app` with `layer`; the shutdown signal starts the drain (`KeepAliveListener::on_shutdown`).
pub async fn serve_axum(layer: KeepAliveLayer, app: Router) -> AxumServer {
    start(layer, app, None).await
}

/// Serves `app` with `layer`; the shutdown signal starts a lame-duck `period`, then the drain
/// (`KeepAliveListener::lame_duck`).
pub async fn serve_axum_lame_duck(
    layer: KeepAliveLayer,
    app: Router,
    period: Duration,
) -> AxumServer {
    start(layer, app, Some(period)).await
}

async fn start(layer: KeepAliveLayer, app: Router, lame_duck: Option<Duration>) -> AxumServer {
    let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = tcp.local_addr().unwrap();
    let inner = KeepAliveListener::new(tcp, layer);
    let (shutdown, signal) = oneshot::channel::<()>();
    let signal = async move {
        let _ = signal.await;
    };
    let (handles, accepted) = mpsc::unbounded_channel();
    let task = match lame_duck {
        None => {
            let signal = inner.on_shutdown(signal);
            let listener = Tapped { inner, handles };
            tokio::spawn(
                axum::serve(listener, into_make_service(app))
                    .with_graceful_shutdown(signal)
                    .into_future(),
            )
        }
        Some(period) => {
            let signal = inner.lame_duck(signal, period);
            let listener = Tapped { inner, handles };
            tokio::spawn(
                axum::serve(listener, into_make_service(app))
                    .with_graceful_shutdown(signal)
                    .into_future(),
            )
        }
    };
    AxumServer {
        addr,
        accepted,
        shutdown: Some(shutdown),
        task: Some(task),
    }
}

impl AxumServer {
    /// Sends the shutdown signal, which the running server must receive.
    #[track_caller]
    pub fn shutdown(&mut self) {
        self.shutdown
            .take()
            .expect("shut down twice")
            .send(())
            .expect("the server is gone");
    }

    /// Waits at most `limit` for `axum::serve` to return, which it must do without an error.
    pub async fn finished(&mut self, limit: Duration) {
        let task = self.task.take().expect("awaited twice");
        within_for("axum::serve to return", limit, task)
            .await
            .expect("serve task panicked")
            .expect("serve failed");
    }
}

impl Drop for AxumServer {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// A [`KeepAliveListener`] that hands the test the handle of each connection it accepts.
struct Tapped {
    inner: KeepAliveListener<TcpListener>,
    handles: mpsc::UnboundedSender<ConnectionHandle>,
}

impl Listener for Tapped {
    type Io = KeepAliveIo<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let (io, addr) = self.inner.accept().await;
        let _ = self.handles.send(io.handle().clone());
        (io, addr)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}
