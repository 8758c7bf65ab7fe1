//! The peer address on every request of the serve path: [`PeerAddr`], and axum's `ConnectInfo`.

use std::task::{Context, Poll};

use http::{Extensions, Request};
use tower_service::Service;

/// The address of the client a request came from (the listener's `Addr`: a `SocketAddr` for TCP),
/// in the extensions of every request the serve path hands to its service. For services that are not
/// axum handlers; with feature `axum`, the same address is there as
/// `axum::extract::ConnectInfo<A>` too, so that axum's `ConnectInfo` extractor works under
/// [`serve`](crate::serve()) as it does under `into_make_service_with_connect_info`.
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
}

impl<S, A> WithPeer<S, A> {
    pub(crate) fn new(inner: S, peer: Option<A>) -> Self {
        WithPeer { inner, peer }
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
