//! TCP keepalive (`SO_KEEPALIVE`, idle time, interval, count) on accepted sockets, read back with
//! socket2 on the server's side of the connection, on the serve path and on the `axum::serve` path.

#![cfg(all(feature = "axum", target_os = "linux"))]

mod support;

use std::future::IntoFuture;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::time::Duration;

use axum::routing::get;
use axum::Router;
use support::http1::RawClient;
use support::server::TestServer;
use support::within;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tower_keepalive::serve::TcpKeepalive;
use tower_keepalive::KeepAliveLayer;

fn app() -> Router {
    Router::new().route("/", get(|| async { "ok" }))
}

fn keepalive() -> TcpKeepalive {
    TcpKeepalive::new(Duration::from_secs(37))
        .interval(Duration::from_secs(7))
        .retries(4)
}

/// A TCP listener that hands the test a second descriptor of each accepted socket (`dup`), so its
/// options can be read once the server has set them.
struct Tapped {
    inner: TcpListener,
    sockets: mpsc::UnboundedSender<socket2::Socket>,
}

impl Tapped {
    fn tap(&self, stream: &TcpStream) {
        let fd = stream.as_fd().try_clone_to_owned().unwrap();
        let _ = self.sockets.send(socket2::Socket::from(fd));
    }
}

impl tower_keepalive::serve::Listener for Tapped {
    type Io = TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> std::io::Result<(TcpStream, SocketAddr)> {
        let (stream, addr) = self.inner.accept().await?;
        self.tap(&stream);
        Ok((stream, addr))
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

impl axum::serve::Listener for Tapped {
    type Io = TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (TcpStream, SocketAddr) {
        let (stream, addr) = self.inner.accept().await.unwrap();
        self.tap(&stream);
        (stream, addr)
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

async fn tapped() -> (Tapped, SocketAddr, mpsc::UnboundedReceiver<socket2::Socket>) {
    let inner = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = inner.local_addr().unwrap();
    let (sockets, rx) = mpsc::unbounded_channel();
    (Tapped { inner, sockets }, addr, rx)
}

/// One request answered: by then the server has accepted the connection and configured its socket.
async fn request<S: AsyncRead + AsyncWrite + Unpin>(mut client: RawClient<S>) -> RawClient<S> {
    let res = client.get("/").await;
    assert_eq!(res.status, 200, "{res:#?}");
    assert_eq!(res.body_str(), "ok");
    client
}

fn assert_keepalive(socket: &socket2::Socket) {
    assert!(socket.keepalive().unwrap(), "SO_KEEPALIVE off");
    assert_eq!(
        socket.tcp_keepalive_time().unwrap(),
        Duration::from_secs(37)
    );
    assert_eq!(
        socket.tcp_keepalive_interval().unwrap(),
        Duration::from_secs(7)
    );
    assert_eq!(socket.tcp_keepalive_retries().unwrap(), 4);
}

#[tokio::test]
async fn serve_sets_tcp_keepalive_on_accepted_sockets() {
    let (listener, _, mut sockets) = tapped().await;
    let server = TestServer::builder(KeepAliveLayer::new())
        .listener(listener)
        .tcp_keepalive(keepalive())
        .serve(app());
    let _client = request(RawClient::connect(server.addr).await).await;
    let socket = within("socket", sockets.recv()).await.unwrap();
    assert_keepalive(&socket);
}

#[tokio::test]
async fn serve_leaves_tcp_keepalive_off_by_default() {
    let (listener, _, mut sockets) = tapped().await;
    let server = TestServer::builder(KeepAliveLayer::new())
        .listener(listener)
        .serve(app());
    let _client = request(RawClient::connect(server.addr).await).await;
    let socket = within("socket", sockets.recv()).await.unwrap();
    assert!(!socket.keepalive().unwrap());
}

#[tokio::test]
async fn keep_alive_listener_sets_tcp_keepalive_on_accepted_sockets() {
    let (listener, addr, mut sockets) = tapped().await;
    let listener = tower_keepalive::axum::KeepAliveListener::new(listener, Default::default())
        .tcp_keepalive(keepalive());
    let server = tokio::spawn(
        axum::serve(listener, tower_keepalive::axum::into_make_service(app())).into_future(),
    );
    let _client = request(RawClient::connect(addr).await).await;
    let socket = within("socket", sockets.recv()).await.unwrap();
    assert_keepalive(&socket);
    server.abort();
}

#[cfg(feature = "tls")]
#[tokio::test]
async fn serve_sets_tcp_keepalive_under_tls() {
    let cert = support::tls::certificate(&["localhost"]);
    let (listener, _, mut sockets) = tapped().await;
    let server = TestServer::builder(KeepAliveLayer::new())
        .listener(listener)
        .tls(cert.server)
        .tcp_keepalive(keepalive())
        .serve(app());
    let tls = support::tls::connect(server.addr, &cert.roots, &[], "localhost").await;
    let _client = request(RawClient::new(tls)).await;
    let socket = within("socket", sockets.recv()).await.unwrap();
    assert_keepalive(&socket);
}
