//! TCP keepalive (`SO_KEEPALIVE`, idle time, interval, count) on accepted sockets, read back with
//! socket2 on the server's side of the connection, on the serve path and on the `axum::serve` path.

#![cfg(all(feature = "axum", target_os = "linux"))]

use std::future::IntoFuture;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::time::Duration;

use axum::routing::get;
use axum::Router;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tower_keepalive::serve::TcpKeepalive;

const WAIT: Duration = Duration::from_secs(10);

async fn within<F: std::future::Future>(what: &str, fut: F) -> F::Output {
    tokio::time::timeout(WAIT, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

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
async fn request(addr: SocketAddr) -> TcpStream {
    let mut stream = within("connect", TcpStream::connect(addr)).await.unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    while !buf.ends_with(b"ok") {
        let mut chunk = [0; 1024];
        let n = within("response", stream.read(&mut chunk)).await.unwrap();
        assert!(n > 0, "closed before the response: {buf:?}");
        buf.extend_from_slice(&chunk[..n]);
    }
    assert!(buf.starts_with(b"HTTP/1.1 200"), "{buf:?}");
    stream
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
    let (listener, addr, mut sockets) = tapped().await;
    tokio::spawn(
        tower_keepalive::serve(listener, app())
            .tcp_keepalive(keepalive())
            .into_future(),
    );
    let _client = request(addr).await;
    let socket = within("socket", sockets.recv()).await.unwrap();
    assert_keepalive(&socket);
}

#[tokio::test]
async fn serve_leaves_tcp_keepalive_off_by_default() {
    let (listener, addr, mut sockets) = tapped().await;
    tokio::spawn(tower_keepalive::serve(listener, app()).into_future());
    let _client = request(addr).await;
    let socket = within("socket", sockets.recv()).await.unwrap();
    assert!(!socket.keepalive().unwrap());
}

#[tokio::test]
async fn keep_alive_listener_sets_tcp_keepalive_on_accepted_sockets() {
    let (listener, addr, mut sockets) = tapped().await;
    let listener = tower_keepalive::axum::KeepAliveListener::new(listener, Default::default())
        .tcp_keepalive(keepalive());
    tokio::spawn(
        axum::serve(listener, tower_keepalive::axum::into_make_service(app())).into_future(),
    );
    let _client = request(addr).await;
    let socket = within("socket", sockets.recv()).await.unwrap();
    assert_keepalive(&socket);
}

#[cfg(feature = "tls")]
#[tokio::test]
async fn serve_sets_tcp_keepalive_under_tls() {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
    use std::sync::Arc;

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let der = CertificateDer::from(cert.cert.der().to_vec());
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.signing_key.serialize_der()));
    let config = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![der.clone()], key)
        .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(der).unwrap();
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();

    let (listener, addr, mut sockets) = tapped().await;
    tokio::spawn(
        tower_keepalive::serve(listener, app())
            .tls(config)
            .tcp_keepalive(keepalive())
            .into_future(),
    );
    let tcp = within("connect", TcpStream::connect(addr)).await.unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let mut tls = within(
        "handshake",
        tokio_rustls::TlsConnector::from(Arc::new(client)).connect(name, tcp),
    )
    .await
    .unwrap();
    tls.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    while !buf.ends_with(b"ok") {
        let mut chunk = [0; 1024];
        let n = within("response", tls.read(&mut chunk)).await.unwrap();
        assert!(n > 0, "closed before the response: {buf:?}");
        buf.extend_from_slice(&chunk[..n]);
    }
    let socket = within("socket", sockets.recv()).await.unwrap();
    assert_keepalive(&socket);
}
