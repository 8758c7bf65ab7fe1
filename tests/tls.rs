//! TLS on the serve path (feature `tls`): HTTP/1.1 and h2 chosen by ALPN, handshakes off the accept
//! loop and bounded in time, and the keep-alive lifecycle on TLS connections. A rustls client trusts the
//! server's self-signed rcgen certificate.

#![cfg(feature = "tls")]

mod support;

use std::future::IntoFuture;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::routing::get;
use axum::Router;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use support::http1::{get_request, RawClient};
use support::{assert_between, within, within_for, SLACK};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tower_keepalive::{CloseReason, KeepAliveLayer, Stats};

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A self-signed certificate for `localhost`, the server's config (no ALPN set: the serve path's
/// default applies), and a client config that trusts the certificate.
fn certificate() -> (rustls::ServerConfig, rustls::RootCertStore) {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let der = CertificateDer::from(cert.cert.der().to_vec());
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.signing_key.serialize_der()));
    let server = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![der.clone()], key)
        .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(der).unwrap();
    (server, roots)
}

struct Server {
    addr: SocketAddr,
    roots: rustls::RootCertStore,
    stats: Stats,
    closes: mpsc::UnboundedReceiver<CloseReason>,
    task: JoinHandle<std::io::Result<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves `/` (`hello`) over TLS on 127.0.0.1 with `layer`, and the handshake timeout if given.
async fn start(layer: KeepAliveLayer, handshake_timeout: Option<Duration>) -> Server {
    let (config, roots) = certificate();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stats = layer.stats();
    let (close_tx, closes) = mpsc::unbounded_channel();
    let app = Router::new().route("/", get(|| async { "hello" }));
    let mut server = tower_keepalive::serve(listener, app)
        .keep_alive(layer)
        .tls(config)
        .on_close(move |_, reason| {
            let _ = close_tx.send(reason);
        });
    if let Some(timeout) = handshake_timeout {
        server = server.tls_handshake_timeout(timeout);
    }
    Server {
        addr,
        roots,
        stats,
        closes,
        task: tokio::spawn(server.into_future()),
    }
}

impl Server {
    /// A TLS connection offering `alpn`, its handshake done.
    async fn connect(&self, alpn: &[&[u8]]) -> TlsStream<TcpStream> {
        let mut config = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(self.roots.clone())
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let connector = TlsConnector::from(Arc::new(config));
        let tcp = within("connect", TcpStream::connect(self.addr))
            .await
            .unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        within("the TLS handshake", connector.connect(name, tcp))
            .await
            .unwrap()
    }

    async fn next_close(&mut self) -> CloseReason {
        within("a connection to close", self.closes.recv())
            .await
            .expect("server gone")
    }
}

/// Waits until the server has accepted `n` connections (nothing signals an accept: the counter is
/// looked at every 10 ms).
async fn opened(stats: &Stats, n: u64) {
    within("the server to accept the connections", async {
        while stats.snapshot().connections_opened() < n {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn http11_over_tls_counts_down_and_reports_its_close() {
    let mut server = start(KeepAliveLayer::new().max_requests(3), None).await;
    let stream = server.connect(&[b"http/1.1"]).await;
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let mut client = RawClient::new(stream);
    for max in [2, 1] {
        let res = client.get("/").await;
        assert_eq!(res.status, 200);
        assert_eq!(res.body_str(), "hello");
        assert_eq!(res.values("connection"), ["keep-alive"]);
        assert_eq!(
            res.values("keep-alive"),
            [format!("timeout=5, max={max}").as_str()]
        );
    }
    let res = client.get("/").await;
    assert_eq!(res.values("connection"), ["close"]);
    assert!(res.values("keep-alive").is_empty());
    // The server ends its side with close_notify: a clean end of the TLS stream.
    client.expect_eof().await;
    assert_eq!(server.next_close().await, CloseReason::MaxRequests);
    assert_eq!(server.stats.snapshot().requests(), 3);
}

#[tokio::test]
async fn no_alpn_is_http1_too() {
    let mut server = start(KeepAliveLayer::new(), None).await;
    let stream = server.connect(&[]).await;
    assert_eq!(stream.get_ref().1.alpn_protocol(), None);
    let mut client = RawClient::new(stream);
    assert_eq!(client.get("/").await.values("connection"), ["keep-alive"]);
    drop(client);
    assert_eq!(server.next_close().await, CloseReason::ClientClosed);
}

/// ALPN's choice stands: hyper-util would take a preface for HTTP/2 whatever ALPN said.
#[tokio::test]
async fn a_client_that_negotiated_http11_cannot_switch_to_h2() {
    let mut server = start(KeepAliveLayer::new(), None).await;
    let mut stream = server.connect(&[b"http/1.1"]).await;
    stream
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    stream.flush().await.unwrap();
    let mut buf = [0u8; 64];
    let read = within("the server to close", stream.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "the server answered: {read:?}"
    );
    assert_eq!(server.next_close().await, CloseReason::Error);
}

#[tokio::test]
async fn h2_over_tls_has_no_connection_fields() {
    let mut server = start(KeepAliveLayer::new(), None).await;
    let stream = server.connect(&[b"h2", b"http/1.1"]).await;
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    let conn = tokio::spawn(conn);
    let req = http::Request::builder()
        .uri("https://localhost/")
        .body(Empty::<bytes::Bytes>::new())
        .unwrap();
    let res = within("the h2 response", sender.send_request(req))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.version(), http::Version::HTTP_2);
    for name in ["connection", "keep-alive"] {
        assert!(!res.headers().contains_key(name), "{name} in h2 response");
    }
    let body = within("the h2 body", res.into_body().collect())
        .await
        .unwrap()
        .to_bytes();
    assert_eq!(&body[..], b"hello");
    drop(sender);
    let _ = within("the h2 client to end", conn).await;
    assert_eq!(server.next_close().await, CloseReason::ClientClosed);
}

/// The start of a ClientHello: a handshake record header promising more than follows.
const HALF_HELLO: &[u8] = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03";

#[tokio::test]
async fn stalled_handshakes_do_not_hold_up_a_fresh_client() {
    let server = start(KeepAliveLayer::new(), None).await;
    let mut stalled = Vec::new();
    for i in 0..55 {
        let mut tcp = within("connect", TcpStream::connect(server.addr))
            .await
            .unwrap();
        if i % 10 == 0 {
            tcp.write_all(HALF_HELLO).await.unwrap();
        }
        stalled.push(tcp);
    }
    // Every stalled connection has been accepted (the accept loop is past them) before the fresh one.
    opened(&server.stats, 55).await;
    let started = Instant::now();
    let mut client = RawClient::new(server.connect(&[b"http/1.1"]).await);
    assert_eq!(client.get("/").await.status, 200);
    let elapsed = started.elapsed();
    assert!(elapsed < Duration::from_secs(2), "took {elapsed:?}");
    assert_eq!(server.stats.snapshot().connections_open(), 56);
    drop(stalled);
}

#[tokio::test]
async fn a_stalled_handshake_times_out_and_the_server_keeps_serving() {
    let mut server = start(KeepAliveLayer::new(), Some(Duration::from_millis(500))).await;
    let mut stalled = RawClient::connect(server.addr).await;
    stalled.send(HALF_HELLO).await;
    let started = Instant::now();
    let eof = stalled.eof().await;
    assert_between(
        "the stalled handshake's close",
        eof - started,
        Duration::from_millis(400),
        Duration::from_millis(500) + SLACK,
    );
    assert_eq!(server.next_close().await, CloseReason::TlsHandshake);

    // Not TLS at all: the handshake fails at once, for the same reason.
    let mut plain = RawClient::connect(server.addr).await;
    plain.send(get_request("/")).await;
    let mut buf = [0u8; 256];
    let _ = within("the server to close", async {
        while !matches!(plain.stream_mut().read(&mut buf).await, Ok(0) | Err(_)) {}
    })
    .await;
    assert_eq!(server.next_close().await, CloseReason::TlsHandshake);

    let mut client = RawClient::new(server.connect(&[b"http/1.1"]).await);
    assert_eq!(client.get("/").await.status, 200);
    assert_eq!(server.stats.snapshot().closed(CloseReason::TlsHandshake), 2);
}

#[tokio::test]
async fn the_idle_timeout_closes_a_tls_connection_with_close_notify() {
    let idle = Duration::from_secs(1);
    let mut server = start(KeepAliveLayer::new().idle_timeout(idle), None).await;
    let mut client = RawClient::new(server.connect(&[b"http/1.1"]).await);
    let res = client.get("/").await;
    assert_eq!(res.values("keep-alive"), ["timeout=1, max=999"]);
    let idle_from = client.last_byte_at;
    // A clean end: the read returns 0 after close_notify, not an error or a reset.
    let eof = client.eof().await;
    client.expect_eof().await;
    assert_between("the idle close", eof - idle_from, idle, idle + SLACK);
    assert_eq!(server.next_close().await, CloseReason::Idle);
}

#[tokio::test]
async fn a_drain_drops_connections_still_in_their_handshake() {
    let (config, _) = certificate();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (shutdown, signal) = tokio::sync::oneshot::channel::<()>();
    let (close_tx, mut closes) = mpsc::unbounded_channel();
    let app = Router::new().route("/", get(|| async { "hello" }));
    let layer = KeepAliveLayer::new();
    let stats = layer.stats();
    let server = tokio::spawn(
        tower_keepalive::serve(listener, app)
            .keep_alive(layer)
            .tls(config)
            .on_close(move |_, reason| {
                let _ = close_tx.send(reason);
            })
            .with_graceful_shutdown(async move {
                let _ = signal.await;
            })
            .into_future(),
    );
    let mut stalled = RawClient::connect(addr).await;
    stalled.send(HALF_HELLO).await;
    opened(&stats, 1).await;
    let started = Instant::now();
    let _ = shutdown.send(());
    within_for("the serve future to return", SLACK, server)
        .await
        .unwrap()
        .unwrap();
    assert!(started.elapsed() < SLACK);
    stalled.eof().await;
    let reason = within("the close", closes.recv()).await;
    assert_eq!(reason, Some(CloseReason::Drain));
}
