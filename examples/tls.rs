//! An HTTPS server with keep-alive, on a self-signed certificate made at start (rcgen).
//!
//! ```text
//! cargo run --example tls --features tls -- --addr 127.0.0.1:0 --idle-timeout 5 --max-requests 100 [--self-test]
//! ```
//!
//! The first line on stdout is `listening on https://ADDR`. ALPN offers `h2` and `http/1.1`; each
//! connection is served with the protocol it negotiated. Try it with
//! `curl -k --http1.1 -v https://ADDR/` (the response says `Connection: keep-alive` and
//! `Keep-Alive: timeout=.., max=..`) or `curl -k --http2 https://ADDR/`.
//!
//! With `--self-test` it connects to itself with a rustls client that trusts the certificate, asks
//! once over HTTP/1.1 and once over h2, checks the answers, and exits 0 (1 on a failure).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::routing::get;
use axum::Router;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower_keepalive::KeepAliveLayer;

struct Args {
    addr: SocketAddr,
    layer: KeepAliveLayer,
    self_test: bool,
}

fn usage() -> ! {
    eprintln!("usage: tls [--addr ADDR] [--idle-timeout SECS] [--max-requests N] [--self-test]");
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut args = Args {
        addr: SocketAddr::from(([127, 0, 0, 1], 3443)),
        layer: KeepAliveLayer::new(),
        self_test: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "--addr" => {
                args.addr = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| usage())
            }
            "--idle-timeout" => {
                let secs: f64 = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| usage());
                if !secs.is_finite() || secs < 0.0 {
                    usage();
                }
                args.layer = args.layer.idle_timeout(Duration::from_secs_f64(secs));
            }
            "--max-requests" => {
                let n = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| usage());
                args.layer = args.layer.max_requests(n);
            }
            "--self-test" => args.self_test = true,
            _ => usage(),
        }
    }
    args
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let args = parse_args();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])
        .map_err(std::io::Error::other)?;
    let der = CertificateDer::from(cert.cert.der().to_vec());
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.signing_key.serialize_der()));
    // No ALPN protocols set: the serve path offers `h2` and `http/1.1`.
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(std::io::Error::other)?
        .with_no_client_auth()
        .with_single_cert(vec![der.clone()], key)
        .map_err(std::io::Error::other)?;

    let listener = tokio::net::TcpListener::bind(args.addr).await?;
    let addr = listener.local_addr()?;
    println!("listening on https://{addr}");
    let app = Router::new().route("/", get(|| async { "hello over TLS\n" }));
    let server = tower_keepalive::serve(listener, app)
        .keep_alive(args.layer)
        .tls(config)
        .on_close(|conn, reason| eprintln!("closed after {} requests: {reason}", conn.requests()));

    if !args.self_test {
        return server
            .with_graceful_shutdown(async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await;
    }
    tokio::spawn(std::future::IntoFuture::into_future(server));
    match tokio::time::timeout(Duration::from_secs(20), self_test(addr, der)).await {
        Ok(Ok(())) => {
            println!("self-test passed");
            Ok(())
        }
        Ok(Err(err)) => {
            eprintln!("self-test failed: {err}");
            std::process::exit(1)
        }
        Err(_) => {
            eprintln!("self-test timed out");
            std::process::exit(1)
        }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// One request over HTTP/1.1 and one over h2, each on its own TLS connection.
async fn self_test(addr: SocketAddr, cert: CertificateDer<'static>) -> Result<(), BoxError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert)?;
    let connect = |alpn: &'static [u8]| {
        let roots = roots.clone();
        async move {
            let mut config = rustls::ClientConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()?
                .with_root_certificates(roots)
                .with_no_client_auth();
            config.alpn_protocols = vec![alpn.to_vec()];
            let tcp = tokio::net::TcpStream::connect(addr).await?;
            let stream = tokio_rustls::TlsConnector::from(Arc::new(config))
                .connect(ServerName::try_from("localhost")?, tcp)
                .await?;
            if stream.get_ref().1.alpn_protocol() != Some(alpn) {
                return Err(BoxError::from("ALPN did not pick the protocol offered"));
            }
            Ok::<_, BoxError>(stream)
        }
    };

    let mut stream = connect(b"http/1.1").await?;
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let head = response.to_ascii_lowercase();
    if !head.starts_with("http/1.1 200") || !response.ends_with("hello over TLS\n") {
        return Err(format!("unexpected HTTP/1.1 response: {response:?}").into());
    }
    println!("HTTP/1.1: {}", response.lines().next().unwrap_or_default());

    let stream = connect(b"h2").await?;
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = http::Request::builder()
        .uri(format!("https://localhost:{}/", addr.port()))
        .body(Empty::<bytes::Bytes>::new())?;
    let res = sender.send_request(req).await?;
    let (status, version) = (res.status(), res.version());
    let body = res.into_body().collect().await?.to_bytes();
    if status != 200 || version != http::Version::HTTP_2 || &body[..] != b"hello over TLS\n" {
        return Err(format!("unexpected h2 response: {status} {version:?} {body:?}").into());
    }
    println!("h2: {status}");
    Ok(())
}
