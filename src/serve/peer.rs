//! The peer address on every request of the serve path: [`PeerAddr`], axum's `ConnectInfo`, and
//! tonic's `TcpConnectInfo`.

use std::task::{Context, Poll};

use http::{Extensions, Request};
use tower_service::Service;

/// The address of the client a request came from (the listener's `Addr`: a `SocketAddr` for TCP),
/// in the extensions of every request the serve path hands to its service. For services that are not
/// axum handlers; with feature `axum`, the same address is there as
/// `axum::extract::ConnectInfo<A>` too, so that axum's `ConnectInfo` extractor works under
/// [`serve`](crate::serve()) as it does under `into_make_service_with_connect_info`; and with feature
/// `tonic`, for a TCP listener, as tonic's `TcpConnectInfo`, which a tonic service's
/// `Request::remote_addr()` reads.
///
/// Behind a proxy this is the proxy's address: the client's is in `Forwarded` (RFC 7239) or
/// `X-Forwarded-For`, as far as the proxy is trusted.
///
/// Turn it off with [`Serve::peer_addr(false)`](crate::serve::Serve::peer_addr).
///
/// ```no_run
/// use std::net::SocketAddr;
/// use tower_keepalive::serve::PeerAddr;
///
/// # async fn run() -> std::io::Result<()> {
/// let svc = tower::service_fn(|req: http::Request<hyper::body::Incoming>| async move {
///     let peer = req.extensions().get::<PeerAddr<SocketAddr>>().map(|p| p.0.to_string());
///     Ok::<_, std::convert::Infallible>(http::Response::new(peer.unwrap_or_default()))
/// });
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
/// tower_keepalive::serve(listener, svc).await?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PeerAddr<A = std::net::SocketAddr>(pub A);

/// The per-connection service of the serve path (and of `axum::into_make_service`), with the peer
/// address of the connection to put into each request.
#[derive(Clone, Debug)]
pub(crate) struct WithPeer<S, A> {
    inner: S,
    // `None`: turned off (`Serve::peer_addr(false)`).
    peer: Option<A>,
    // The connection's local address, for tonic's `TcpConnectInfo` (its remote address is `peer`).
    #[cfg(feature = "tonic")]
    local: Option<std::net::SocketAddr>,
}

impl<S, A> WithPeer<S, A> {
    pub(crate) fn new(inner: S, peer: Option<A>) -> Self {
        WithPeer {
            inner,
            peer,
            #[cfg(feature = "tonic")]
            local: None,
        }
    }

    /// The connection's local address, for tonic's `Request::local_addr()`.
    #[cfg(feature = "tonic")]
    pub(crate) fn with_local_addr(mut self, local: Option<std::net::SocketAddr>) -> Self {
        self.local = local;
        self
    }
}

impl<S, A, B> Service<Request<B>> for WithPeer<S, A>
where
    S: Service<Request<B>>,
    A: Clone + Send + Sync + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        if let Some(peer) = &self.peer {
            insert(req.extensions_mut(), peer);
            #[cfg(feature = "tonic")]
            insert_tonic(req.extensions_mut(), peer, self.local);
        }
        self.inner.call(req)
    }
}

/// Puts `peer` into a request's extensions, as every type a handler may look for it under. Costs the
/// extension map (when the request has none yet) and one box per type: see the `tests/alloc.rs` figures
/// in [`Serve::peer_addr`](crate::serve::Serve::peer_addr).
fn insert<A: Clone + Send + Sync + 'static>(extensions: &mut Extensions, peer: &A) {
    extensions.insert(PeerAddr(peer.clone()));
    #[cfg(feature = "axum")]
    extensions.insert(::axum::extract::ConnectInfo(peer.clone()));
}

/// Puts tonic's `TcpConnectInfo` into a request's extensions, for a TCP peer (a `SocketAddr`; the
/// check is a type-id comparison): what tonic's `Request::remote_addr()` and `local_addr()` read, as
/// under tonic's own server. One more box per request.
#[cfg(feature = "tonic")]
fn insert_tonic<A: 'static>(
    extensions: &mut Extensions,
    peer: &A,
    local: Option<std::net::SocketAddr>,
) {
    if let Some(remote) = (peer as &dyn std::any::Any).downcast_ref::<std::net::SocketAddr>() {
        extensions.insert(tonic::transport::server::TcpConnectInfo {
            local_addr: local,
            remote_addr: Some(*remote),
        });
    }
}

/// The local address of each connection a listener accepts, for tonic's `Request::local_addr()`:
/// the listener's own address, read once, unless it is a wildcard (`0.0.0.0`, `[::]`), when only the
/// accepted socket knows which of the host's addresses the client reached (one `getsockname` per
/// connection, none per request).
#[cfg(feature = "tonic")]
#[derive(Debug)]
pub(crate) struct LocalAddr(Option<std::net::SocketAddr>);

#[cfg(feature = "tonic")]
impl LocalAddr {
    /// For a connection accepted by a listener not at hand (`axum::serve`'s): its socket says.
    #[cfg(feature = "axum")]
    pub(crate) fn unknown() -> Self {
        LocalAddr(None)
    }

    pub(crate) fn of<L: super::Listener>(listener: &L) -> Self {
        let addr = listener.local_addr().ok();
        let addr = addr
            .as_ref()
            .and_then(|addr| (addr as &dyn std::any::Any).downcast_ref::<std::net::SocketAddr>());
        LocalAddr(addr.copied())
    }

    pub(crate) fn of_connection<Io: 'static>(&self, io: &Io) -> Option<std::net::SocketAddr> {
        match self.0 {
            Some(addr) if !addr.ip().is_unspecified() => Some(addr),
            _ => (io as &dyn std::any::Any)
                .downcast_ref::<tokio::net::TcpStream>()?
                .local_addr()
                .ok(),
        }
    }
}
