//! Shared by the integration tests: a hand-written hyper-util accept loop on 127.0.0.1 (HTTP/1 and h2c on
//! one port), a test app, and the raw HTTP/1 client that checks the bytes on the wire (`tests/raw`).

// Each test file uses its own part of this module.
#![allow(dead_code)]

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tower::util::BoxCloneService;
use tower::{Layer, Service, ServiceExt};
use tower_keepalive::{ConnectionHandle, KeepAliveLayer};

#[path = "../raw/mod.rs"]
mod raw;
pub use raw::{RawClient, RawResponse};
// For the files that check adverts against a maximum age; the others leave it unused.
#[allow(unused_imports)]
pub use raw::assert_adverts_honest;
// For the files that pipeline or flood; the others include this module too.
#[allow(unused_imports)]
pub use raw::{assert_pipelined_past_the_limit, get_request, send_junk_until_cut};

/// The bound on every wait: generous, the test machine is shared.
pub const WAIT: Duration = Duration::from_secs(5);

/// Awaits `fut` for at most [`WAIT`], panicking with `what` if it takes longer.
pub async fn within<F: Future>(what: &str, fut: F) -> F::Output {
    raw::within(what, WAIT, fut).await
}

pub type Body = BoxBody<Bytes, Infallible>;
pub type App = BoxCloneService<Request<Incoming>, Response<Body>, Infallible>;

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

/// The test app.
///
/// - `/`: `hello`, length known in advance.
/// - `/stream`: `hello world` in two chunks, length unknown.
/// - `/close`: the app itself says `Connection: close`.
/// - `/hop`: connection-specific fields of every kind, two `Connection` field lines naming `X-Custom` and
///   `X-Other`, plus `X-Kept` and `Content-Type` that must survive.
/// - `/ka99`: the app sends its own `Keep-Alive: timeout=99, max=1000`.
/// - `/ka99-conn`: the same with `Connection: Keep-Alive`.
pub fn app() -> App {
    BoxCloneService::new(tower::service_fn(|req: Request<Incoming>| async move {
        Ok::<_, Infallible>(route(req.uri().path()))
    }))
}

pub fn route(path: &str) -> Response<Body> {
    let full = |s: &'static str| Full::new(Bytes::from_static(s.as_bytes())).boxed();
    match path {
        "/" => Response::new(full("hello")),
        "/stream" => {
            let chunks = [Bytes::from_static(b"hello "), Bytes::from_static(b"world")]
                .map(|chunk| Ok::<_, Infallible>(Frame::data(chunk)));
            Response::new(StreamBody::new(futures_util::stream::iter(chunks)).boxed())
        }
        "/close" => with_headers(full("bye"), &[("connection", "close")]),
        "/hop" => with_headers(
            full("hop"),
            &[
                ("connection", "X-Custom"),
                ("connection", "X-Other"),
                ("x-custom", "1"),
                ("x-other", "2"),
                ("keep-alive", "timeout=99"),
                ("proxy-connection", "keep-alive"),
                ("upgrade", "foo"),
                ("te", "trailers"),
                ("x-kept", "yes"),
                ("content-type", "text/plain"),
            ],
        ),
        "/ka99" => with_headers(full("hello"), &[("keep-alive", "timeout=99, max=1000")]),
        "/ka99-conn" => with_headers(
            full("hello"),
            &[
                ("connection", "Keep-Alive"),
                ("keep-alive", "timeout=99, max=1000"),
            ],
        ),
        _ => {
            let mut res = Response::new(full("not found"));
            *res.status_mut() = StatusCode::NOT_FOUND;
            res
        }
    }
}

fn with_headers(body: Body, headers: &[(&'static str, &'static str)]) -> Response<Body> {
    let mut res = Response::new(body);
    for (name, value) in headers {
        res.headers_mut().append(
            HeaderName::from_static(name),
            HeaderValue::from_static(value),
        );
    }
    res
}

/// A GET request's bytes: `GET {path} {version}`, a Host line, then `lines`, each one field line.
pub fn http_get(path: &str, version: &str, lines: &[&str]) -> String {
    let mut req = format!("GET {path} {version}\r\nHost: 127.0.0.1\r\n");
    for line in lines {
        req.push_str(line);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    req
}

/// One response as read off the wire.
/// Asserts a response's status line and its field lines (other than `date`, sent once) exactly and in order.
#[track_caller]
pub fn assert_head(res: &RawResponse, status_line: &str, headers: &[(&str, &str)]) {
    assert_eq!(res.status_line, status_line, "{res:#?}");
    assert_eq!(res.headers_without_date(), headers, "{res:#?}");
    assert_eq!(res.values("date").len(), 1, "{res:#?}");
}
