//! TLS on the serve path (feature `tls`): rustls through tokio-rustls, with the `ring` provider.
//!
//! [`Serve::tls`](super::Serve::tls) turns the server into an HTTPS server; [`config_from_pem`] builds
//! its `rustls::ServerConfig` from a certificate chain and a key in PEM files. Each connection's
//! handshake runs in the connection's own task, bounded by
//! [`Serve::tls_handshake_timeout`](super::Serve::tls_handshake_timeout), and the protocol ALPN chose
//! is the one served: `h2` as HTTP/2 only, anything else as HTTP/1 only. Each request carries its
//! connection's [`TlsInfo`]: the protocol ALPN chose and the server name the client asked for (SNI).
//!
//! # Example
//!
//! ```no_run
//! # async fn run() -> std::io::Result<()> {
//! let app = axum::Router::new().route("/", axum::routing::get(|| async { "hello" }));
//! let listener = tokio::net::TcpListener::bind("0.0.0.0:443").await?;
//! let config = tower_keepalive::serve::tls::config_from_pem("cert.pem", "key.pem")?;
//! tower_keepalive::serve(listener, app).tls(config).await?;
//! # Ok(())
//! # }
//! ```

use std::future::Future;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::service::TowerToHyperService;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tower_service::Service;

use super::conn::{HttpConnection, Start};
use super::task::ConnectionTask;
use super::{closed, Admission, BoxError, ConnectionsShared, HttpBuilder, WatchedIo};
use crate::serve::DrainWatcher;
use crate::{CloseReason, ConnectionHandle, KeepAlive};

/// The ALPN protocol IDs of HTTP/2 and HTTP/1.1.
const H2: &[u8] = b"h2";
const HTTP_1_1: &[u8] = b"http/1.1";

/// The default handshake timeout: nginx's `ssl_handshake_timeout` is 60 s; a handshake takes a few
/// round trips, and a client that needs more than this is more likely holding a slot than slow.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Reads a certificate chain (leaf first) and its private key from PEM files into a
/// `rustls::ServerConfig` for [`Serve::tls`](super::Serve::tls): rustls' safe defaults (TLS 1.3 and
/// 1.2) with the `ring` provider, no client authentication, and ALPN `h2` and `http/1.1`.
///
/// The key may be PKCS#8, PKCS#1 (RSA) or SEC1 (EC). An unreadable file is the file's I/O error; a
/// file with no certificate or key, or a key that does not match the certificate, is
/// [`io::ErrorKind::InvalidData`]. Each error names the file.
///
/// ```
/// # fn main() -> std::io::Result<()> {
/// # let dir = std::env::temp_dir().join(format!("tower-keepalive-doc-{}", std::process::id()));
/// # std::fs::create_dir_all(&dir)?;
/// # let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
/// # let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
/// # std::fs::write(&cert_path, cert.cert.pem())?;
/// # std::fs::write(&key_path, cert.signing_key.serialize_pem())?;
/// let config = tower_keepalive::serve::tls::config_from_pem(&cert_path, &key_path)?;
/// assert_eq!(config.alpn_protocols, [b"h2".to_vec(), b"http/1.1".to_vec()]);
/// # std::fs::remove_dir_all(&dir)?;
/// # Ok(())
/// # }
/// ```
pub fn config_from_pem(
    cert_path: impl AsRef<Path>,
    key_path: impl AsRef<Path>,
) -> io::Result<ServerConfig> {
    let (cert_path, key_path) = (cert_path.as_ref(), key_path.as_ref());
    let certs = CertificateDer::pem_file_iter(cert_path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|err| pem_error(cert_path, err))?;
    if certs.is_empty() {
        return Err(invalid(cert_path, "no certificate found"));
    }
    let key = PrivateKeyDer::from_pem_file(key_path).map_err(|err| pem_error(key_path, err))?;
    let mut config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|err| invalid(cert_path, err))?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(|err| invalid(key_path, err))?;
    config.alpn_protocols = vec![H2.to_vec(), HTTP_1_1.to_vec()];
    Ok(config)
}

fn pem_error(path: &Path, err: rustls::pki_types::pem::Error) -> io::Error {
    match err {
        rustls::pki_types::pem::Error::Io(err) => {
            io::Error::new(err.kind(), format!("{}: {err}", path.display()))
        }
        rustls::pki_types::pem::Error::NoItemsFound => invalid(path, "nothing found in PEM"),
        err => invalid(path, err),
    }
}

fn invalid(path: &Path, err: impl std::fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("{}: {err}", path.display()),
    )
}

/// What a TLS connection's handshake settled, in the extensions of each of its requests on the serve
/// path (with [`PeerAddr`](super::PeerAddr), and turned off with it by
/// [`Serve::peer_addr(false)`](super::Serve::peer_addr)): the application protocol ALPN chose
/// (RFC 7301) and the server name the client sent (SNI, RFC 6066 section 3), for a server with several
/// names or a handler that logs how it was reached.
///
/// Read once per connection, at the end of its handshake, and shared by its requests: each request
/// costs a reference count and the extension's box.
///
/// ```no_run
/// use tower_keepalive::serve::tls::TlsInfo;
///
/// # async fn run() -> std::io::Result<()> {
/// let svc = tower::service_fn(|req: http::Request<hyper::body::Incoming>| async move {
///     let name = req.extensions().get::<TlsInfo>().and_then(|tls| tls.server_name());
///     let body = format!("you asked for {}", name.unwrap_or("no name"));
///     Ok::<_, std::convert::Infallible>(http::Response::new(body))
/// });
/// let listener = tokio::net::TcpListener::bind("0.0.0.0:443").await?;
/// let config = tower_keepalive::serve::tls::config_from_pem("cert.pem", "key.pem")?;
/// tower_keepalive::serve(listener, svc).tls(config).await?;
/// # Ok(())
/// # }
/// ```
///
/// With axum, as an extension: `Extension(tls): Extension<TlsInfo>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsInfo(Arc<TlsFacts>);

#[derive(Debug, PartialEq, Eq)]
struct TlsFacts {
    alpn_protocol: Option<Box<[u8]>>,
    server_name: Option<Box<str>>,
}

impl TlsInfo {
    fn new(connection: &rustls::ServerConnection) -> Self {
        TlsInfo(Arc::new(TlsFacts {
            alpn_protocol: connection.alpn_protocol().map(Box::from),
            server_name: connection.server_name().map(Box::from),
        }))
    }

    /// The protocol ALPN chose (`b"h2"`, `b"http/1.1"`), or `None` when the client offered none the
    /// server has.
    ///
    /// ```
    /// # fn f(tls: &tower_keepalive::serve::tls::TlsInfo) {
    /// let h2 = tls.alpn_protocol() == Some(b"h2");
    /// # }
    /// ```
    pub fn alpn_protocol(&self) -> Option<&[u8]> {
        self.0.alpn_protocol.as_deref()
    }

    /// The server name the client asked for (SNI), as rustls read it: a DNS name, lower case. `None`
    /// when the client sent none (as clients do when they connect to an IP address).
    ///
    /// ```
    /// # fn f(tls: &tower_keepalive::serve::tls::TlsInfo) {
    /// let name = tls.server_name().unwrap_or("default");
    /// # }
    /// ```
    pub fn server_name(&self) -> Option<&str> {
        self.0.server_name.as_deref()
    }
}

/// A TLS connection's service: puts the connection's [`TlsInfo`] into each request.
#[derive(Clone)]
struct WithTls<S> {
    inner: S,
    info: Option<TlsInfo>,
}

impl<S, B> Service<Request<B>> for WithTls<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> S::Future {
        if let Some(info) = &self.info {
            req.extensions_mut().insert(info.clone());
        }
        self.inner.call(req)
    }
}

/// The TLS settings of a [`Serve`](super::Serve).
#[derive(Clone)]
pub(super) struct Settings {
    pub(super) config: Option<Arc<ServerConfig>>,
    pub(super) handshake_timeout: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            config: None,
            handshake_timeout: HANDSHAKE_TIMEOUT,
        }
    }
}

impl Settings {
    /// The acceptor of a server with these settings, if it serves TLS; a config without ALPN protocols
    /// gets those `builder` serves.
    pub(super) fn acceptor(self, builder: &HttpBuilder) -> Option<Acceptor> {
        let mut config = self.config?;
        if config.alpn_protocols.is_empty() {
            let alpn = &mut Arc::make_mut(&mut config).alpn_protocols;
            if builder.is_http2_available() {
                alpn.push(H2.to_vec());
            }
            if builder.is_http1_available() {
                alpn.push(HTTP_1_1.to_vec());
            }
        }
        Some(Acceptor {
            acceptor: TlsAcceptor::from(config),
            handshake_timeout: self.handshake_timeout,
        })
    }
}

/// What each TLS connection's task needs to run its handshake.
#[derive(Clone)]
pub(super) struct Acceptor {
    acceptor: TlsAcceptor,
    handshake_timeout: Duration,
}

/// An accepted connection of a TLS server, before its handshake.
pub(super) struct Accepted {
    pub(super) acceptor: Acceptor,
    pub(super) handle: ConnectionHandle,
    pub(super) watcher: DrainWatcher,
    pub(super) permit: Option<Admission>,
    pub(super) shared: Arc<ConnectionsShared>,
    /// Whether requests carry the connection's [`TlsInfo`].
    pub(super) info: bool,
}

impl Accepted {
    /// The connection's task: the handshake, then the protocol ALPN chose, through the lifecycle.
    pub(super) async fn serve<I, S, B>(self, io: I, svc: KeepAlive<S>)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
        B: http_body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        let Accepted {
            acceptor,
            handle,
            watcher,
            permit,
            shared,
            info,
        } = self;
        // The idle timeout, the budget's shedding and a drain reach the connection from now on.
        watcher.watch_undriven(&handle);
        let Some(stream) = handshake(&acceptor, io, &handle).await else {
            handle.mark_undriven();
            let reason = handle.close_reason().unwrap_or(CloseReason::TlsHandshake);
            handle.report_closed(reason);
            return closed(&shared, &handle, reason, watcher, permit);
        };
        let info = info.then(|| TlsInfo::new(stream.get_ref().1));
        let svc = TowerToHyperService::new(WithTls {
            inner: super::ConnectionService { inner: svc },
            info,
        });
        // ALPN chose (RFC 7301); without it, HTTP/1.1 (RFC 9113 section 3.3: h2 over TLS needs ALPN).
        let start = if stream.get_ref().1.alpn_protocol() == Some(H2)
            && shared.builder.is_http2_available()
        {
            Start::Http2
        } else {
            Start::Http1
        };
        let conn = HttpConnection::new(
            shared.clone(),
            handle.clone(),
            WatchedIo::new(stream, handle.clone()),
            svc,
            start,
        );
        ConnectionTask::new(conn, handle, watcher, permit, shared).await;
    }
}

/// Runs the TLS handshake of `handle`'s connection. `None` if it failed or timed out (the close
/// reason is then [`CloseReason::TlsHandshake`]), or if the connection was told to close meanwhile
/// (idle timeout, budget, drain: the reason is theirs).
async fn handshake<I>(acceptor: &Acceptor, io: I, handle: &ConnectionHandle) -> Option<TlsStream<I>>
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    // On the heap, and only while it runs: rustls' handshake state is not kept for the connection's
    // life.
    let mut accept = Box::pin(tokio::time::timeout(
        acceptor.handshake_timeout,
        acceptor.acceptor.accept(io),
    ));
    let done = std::future::poll_fn(|cx| {
        if let Poll::Ready(done) = accept.as_mut().poll(cx) {
            return Poll::Ready(Some(done));
        }
        // Registered before the close is read: a close decided after this read wakes the task.
        handle.register_driver(cx.waker());
        if handle.is_closing() {
            return Poll::Ready(None);
        }
        Poll::Pending
    })
    .await;
    match done {
        Some(Ok(Ok(stream))) => return Some(stream),
        Some(Ok(Err(err))) => tracing::debug!(error = %err, "TLS handshake failed"),
        Some(Err(_)) => tracing::debug!(
            timeout = ?acceptor.handshake_timeout,
            "TLS handshake timed out"
        ),
        None => tracing::debug!(
            reason = handle.close_reason().map(CloseReason::as_str),
            "connection closed during its TLS handshake"
        ),
    }
    handle.mark_closing(CloseReason::TlsHandshake);
    None
}
