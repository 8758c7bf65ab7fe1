//! The ALPN protocol and SNI name of a TLS connection on each of its requests (`serve::tls::TlsInfo`),
//! over real TLS with a rustls client, on HTTP/1.1 and h2.

#![cfg(all(feature = "tls", feature = "axum"))]

use std::future::IntoFuture;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::routing::get;
use axum::{Extension, Router};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tower_keepalive::serve::tls::TlsInfo;

const WAIT: Duration = Duration::from_secs(10);

async fn within<F: std::future::Future>(what: &str, fut: F) -> F::Output {
    tokio::time::timeout(WAIT, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The handler's view: `ALPN|SNI`, `-` for none, `missing` without the extension.
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
    addr: SocketAddr,
    roots: rustls::RootCertStore,
}

async fn start(peer_addr: bool) -> Server {
    let cert = rcgen::generate_simple_self_signed(vec![
        "localhost".to_string(),
        "api.localhost".to_string(),
        "127.0.0.1".to_string(),
    ])
    .unwrap();
    let der = CertificateDer::from(cert.cert.der().to_vec());
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.signing_key.serialize_der()));
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![der.clone()], key)
        .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(der).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = Router::new().route("/", get(describe));
    tokio::spawn(
        tower_keepalive::serve(listener, app)
            .tls(config)
            .peer_addr(peer_addr)
            .into_future(),
    );
    Server { addr, roots }
}

impl Server {
    /// `GET /` over a TLS connection offering `alpn` to `name`; the body, and the protocol version.
    async fn get(&self, alpn: &[&[u8]], name: &'static str) -> (String, http::Version) {
        let mut config = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(self.roots.clone())
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let tcp = within("connect", TcpStream::connect(self.addr))
            .await
            .unwrap();
        let name = ServerName::try_from(name).unwrap();
        let stream = within(
            "handshake",
            TlsConnector::from(Arc::new(config)).connect(name, tcp),
        )
        .await
        .unwrap();
        let h2 = stream.get_ref().1.alpn_protocol() == Some(&b"h2"[..]);
        let io = TokioIo::new(stream);
        let req = http::Request::get("/")
            .header(http::header::HOST, "localhost")
            .body(Empty::<bytes::Bytes>::new())
            .unwrap();
        let res = if h2 {
            let req = http::Request::get("https://localhost/")
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
async fn http11_requests_carry_alpn_and_sni() {
    let server = start(true).await;
    let (body, version) = server.get(&[b"http/1.1"], "api.localhost").await;
    assert_eq!(version, http::Version::HTTP_11);
    assert_eq!(body, "http/1.1|api.localhost");
}

#[tokio::test]
async fn h2_requests_carry_alpn_and_sni() {
    let server = start(true).await;
    let (body, version) = server.get(&[b"h2", b"http/1.1"], "localhost").await;
    assert_eq!(version, http::Version::HTTP_2);
    assert_eq!(body, "h2|localhost");
}

#[tokio::test]
async fn no_alpn_and_no_sni_are_none() {
    let server = start(true).await;
    // rustls sends no SNI to an IP address.
    let (body, _) = server.get(&[], "127.0.0.1").await;
    assert_eq!(body, "-|-");
}

#[tokio::test]
async fn off_with_the_peer_address() {
    let server = start(false).await;
    let (body, _) = server.get(&[b"http/1.1"], "localhost").await;
    assert_eq!(body, "missing");
}
