//! The layer on its own, without the crate's serve path: a hand-written hyper-util accept loop on
//! 127.0.0.1 (HTTP/1 and h2c on one port) that binds a [`KeepAliveLayer`] to each connection and hands
//! each connection's handle to the test.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tower::{Layer, Service, ServiceExt};
use tower_keepalive::{ConnectionHandle, KeepAliveLayer};

use super::apps::App;
use super::http1::RawClient;
use super::within;

/// A server on 127.0.0.1 serving HTTP/1 and h2c (prior knowledge) on one port; every accepted connection's
/// handle is sent to the test, in accept order.
pub struct Server {
    pub addr: SocketAddr,
    conns: mpsc::UnboundedReceiver<ConnectionHandle>,
    accept: JoinHandle<()>,
}

impl Server {
    /// The handle of the next connection the server accepts.
    pub async fn next_conn(&mut self) -> ConnectionHandle {
        within("the server to accept a connection", self.conns.recv())
            .await
            .expect("accept loop ended")
    }

    /// Connects a raw HTTP/1 client and returns it with the server side's handle of that connection.
    pub async fn connect(&mut self) -> (RawClient, ConnectionHandle) {
        let client = RawClient::connect(self.addr).await;
        let handle = self.next_conn().await;
        (client, handle)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Serves `app` behind `layer`, bound per connection with [`KeepAliveLayer::bind`].
pub async fn start_server(layer: KeepAliveLayer, app: App) -> Server {
    let make_layer = layer.clone();
    serve(layer, move |handle| {
        make_layer.bind(handle).layer(app.clone())
    })
    .await
}

/// Serves `app`, which carries the layer itself (an axum `Router::layer`): each connection's handle reaches
/// it as a request extension. `layer` only makes the handles.
pub async fn start_server_with_extensions<S, B>(layer: KeepAliveLayer, app: S) -> Server
where
    S: Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    serve(layer, move |handle| {
        app.clone().map_request(move |mut req: Request<Incoming>| {
            req.extensions_mut().insert(handle.clone());
            req
        })
    })
    .await
}

/// Serves `app` as it is: no layer added and no handle given to it. For the control case that shows what
/// hyper does alone, or an app whose layer gets no handle. The handles sent to the test are never used.
pub async fn start_server_without_handles<S, B>(app: S) -> Server
where
    S: Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    serve(KeepAliveLayer::new(), move |_handle| app.clone()).await
}

async fn serve<M, S, B>(layer: KeepAliveLayer, make: M) -> Server
where
    M: Fn(ConnectionHandle) -> S + Send + 'static,
    S: Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, conns) = mpsc::unbounded_channel();
    let accept = tokio::spawn(async move {
        loop {
            let Ok((io, _)) = listener.accept().await else {
                continue;
            };
            let handle = layer.connection();
            let svc = TowerToHyperService::new(make(handle.clone()));
            let _ = tx.send(handle);
            tokio::spawn(async move {
                // No timer: hyper's own header read timeout stays off, so nothing but the layer's
                // decisions (and the client) ends a connection in these tests.
                let builder = auto::Builder::new(TokioExecutor::new());
                let _ = builder
                    .serve_connection_with_upgrades(TokioIo::new(io), svc)
                    .await;
            });
        }
    });
    Server {
        addr,
        conns,
        accept,
    }
}
