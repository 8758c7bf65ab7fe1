//! TLS for the tests (feature `tls`): a self-signed rcgen certificate, the server's rustls config for
//! it, and a rustls client that trusts it.

use std::net::SocketAddr;
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::within;

/// ring, the provider the crate's feature `tls` builds rustls with.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A self-signed certificate.
pub struct Certificate {
    /// The server's config: no ALPN set, so the serve path's default applies.
    pub server: ServerConfig,
    /// Roots that trust the certificate, for a client.
    pub roots: RootCertStore,
    /// The certificate in PEM, for clients that take that (tonic).
    pub pem: String,
}

/// A self-signed certificate for `names` (DNS names, or IP addresses as text).
pub fn certificate(names: &[&str]) -> Certificate {
    let names = names
        .iter()
        .map(|name| name.to_string())
        .collect::<Vec<_>>();
    let cert = rcgen::generate_simple_self_signed(names).unwrap();
    let der = CertificateDer::from(cert.cert.der().to_vec());
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.signing_key.serialize_der()));
    let server = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![der.clone()], key)
        .unwrap();
    let mut roots = RootCertStore::empty();
    roots.add(der).unwrap();
    Certificate {
        server,
        roots,
        pem: cert.cert.pem(),
    }
}

/// A TLS connection to `addr` for the server `name`, offering `alpn`, its handshake done.
pub async fn connect(
    addr: SocketAddr,
    roots: &RootCertStore,
    alpn: &[&[u8]],
    name: &'static str,
) -> TlsStream<TcpStream> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots.clone())
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let connector = TlsConnector::from(Arc::new(config));
    let tcp = within("connect", TcpStream::connect(addr)).await.unwrap();
    let name = ServerName::try_from(name).unwrap();
    within("the TLS handshake", connector.connect(name, tcp))
        .await
        .unwrap()
}
