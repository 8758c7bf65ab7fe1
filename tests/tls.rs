//! TLS on the serve path (feature `tls`): HTTP/1.1 and h2 chosen by ALPN, handshakes off the accept
//! loop and bounded in time, the keep-alive lifecycle on TLS connections, and the ALPN protocol and SNI
//! name on each request (`serve::tls::TlsInfo`). A rustls client trusts the server's self-signed rcgen
//! certificate.

#![cfg(feature = "tls")]

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::routing::get;
use axum::{Extension, Router};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::http1::{get_request, RawClient};
use support::server::{Builder, TestServer};
use support::tls::{certificate, connect};
use support::{assert_between, within, SLACK};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::client::TlsStream;
use tower_keepalive::serve::tls::TlsInfo;
use tower_keepalive::{CloseReason, KeepAliveLayer, Stats};

/// The handler's view of the TLS connection: `ALPN|SNI`, `-` for none, `missing` without the extension.
async fn describe(tls: Option<Extension<TlsInfo>>) -> String {
    let Some(Extension(tls)) = tls else {
        return "missing".to_string();
    };
    let alpn = tls
        .alpn_protocol()
        .map_or("-".to_string(), |p| String::from_utf8_lossy(p).into_owned());
    format!("{alpn}|{}", tls.server_name().unwrap_or("-"))
}

struct Server {
    inner: TestServer,
    addr: SocketAddr,
    roots: rustls::RootCertStore,
    stats: Stats,
}

/// Serves `/` (`hello`) and `/tls` ([`describe`]) over TLS on 127.0.0.1 with `layer`, the serve path
/// set up further by `configure`. The certificate names `localhost`, `api.localhost` and `127.0.0.1`.
fn start_with(
    layer: KeepAliveLayer,
    configure: impl FnOnce(Builder<TcpListener>) -> Builder<TcpListener>,
) -> Server {
    let cert = certificate(&["localhost", "api.localhost", "127.0.0.1"]);
    let stats = layer.stats();
    let app = Router::new()
        .route("/", get(|| async { "hello" }))
        .route("/tls", get(describe));
    let inner = configure(TestServer::builder(layer).tls(cert.server)).serve(app);
    Server {
        addr: inner.addr,
        inner,
        roots: cert.roots,
        stats,
    }
}

fn start(layer: KeepAliveLayer) -> Server {
    start_with(layer, |builder| builder)
}

impl Server {
    /// A TLS connection to `localhost` offering `alpn`, its handshake done.
    async fn connect(&self, alpn: &[&[u8]]) -> TlsStream<TcpStream> {
        connect(self.addr, &self.roots, alpn, "localhost").await
    }

    async fn next_close(&mut self) -> CloseReason {
        self.inner.next_close().await.reason
    }

    /// `GET /tls` over a TLS connection offering `alpn` to `name` (hyper's client, HTTP/1.1 or h2 as
    /// ALPN chose); the body, and the protocol version.
    async fn tls_info(&self, alpn: &[&[u8]], name: &'static str) -> (String, http::Version) {
        let stream = connect(self.addr, &self.roots, alpn, name).await;
        let h2 = stream.get_ref().1.alpn_protocol() == Some(&b"h2"[..]);
        let io = TokioIo::new(stream);
        let res = if h2 {
            let req = http::Request::get("https://localhost/tls")
                .body(Empty::<bytes::Bytes>::new())
                .unwrap();
            let (mut sender, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                    .await
                    .unwrap();
            tokio::spawn(conn);
            within("h2 response", sender.send_request(req))
                .await
                .unwrap()
        } else {
            let req = http::Request::get("/tls")
                .header(http::header::HOST, "localhost")
                .body(Empty::<bytes::Bytes>::new())
                .unwrap();
            let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
            tokio::spawn(conn);
            within("http/1.1 response", sender.send_request(req))
                .await
                .unwrap()
        };
        let version = res.version();
        let body = within("body", res.into_body().collect())
            .await
            .unwrap()
            .to_bytes();
        (String::from_utf8(body.to_vec()).unwrap(), version)
    }
}

#[tokio::test]
async fn http11_over_tls_counts_down_and_reports_its_close() {
    let mut server = start(KeepAliveLayer::new().max_requests(3));
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
    let mut server = start(KeepAliveLayer::new());
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
    let mut server = start(KeepAliveLayer::new());
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
    let mut server = start(KeepAliveLayer::new());
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
    let mut server = start(KeepAliveLayer::new());
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
    server.inner.wait_accepted(55).await;
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
    let mut server = start_with(KeepAliveLayer::new(), |builder| {
        builder.tls_handshake_timeout(Duration::from_millis(500))
    });
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
    let mut server = start(KeepAliveLayer::new().idle_timeout(idle));
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
    let mut server = start(KeepAliveLayer::new());
    let mut stalled = RawClient::connect(server.addr).await;
    stalled.send(HALF_HELLO).await;
    server.inner.wait_accepted(1).await;
    let started = Instant::now();
    server.inner.shutdown();
    server.inner.finished(SLACK).await;
    assert!(started.elapsed() < SLACK);
    stalled.eof().await;
    assert_eq!(server.next_close().await, CloseReason::Drain);
}

// The ALPN protocol and SNI name of a TLS connection on each of its requests.

#[tokio::test]
async fn http11_requests_carry_alpn_and_sni() {
    let server = start(KeepAliveLayer::new());
    let (body, version) = server.tls_info(&[b"http/1.1"], "api.localhost").await;
    assert_eq!(version, http::Version::HTTP_11);
    assert_eq!(body, "http/1.1|api.localhost");
}

#[tokio::test]
async fn h2_requests_carry_alpn_and_sni() {
    let server = start(KeepAliveLayer::new());
    let (body, version) = server.tls_info(&[b"h2", b"http/1.1"], "localhost").await;
    assert_eq!(version, http::Version::HTTP_2);
    assert_eq!(body, "h2|localhost");
}

#[tokio::test]
async fn no_alpn_and_no_sni_are_none() {
    let server = start(KeepAliveLayer::new());
    // rustls sends no SNI to an IP address.
    let (body, _) = server.tls_info(&[], "127.0.0.1").await;
    assert_eq!(body, "-|-");
}

#[tokio::test]
async fn tls_info_is_off_with_the_peer_address() {
    let server = start_with(KeepAliveLayer::new(), |builder| builder.peer_addr(false));
    let (body, _) = server.tls_info(&[b"http/1.1"], "localhost").await;
    assert_eq!(body, "missing");
}
