//! The upgrade share of the connection budget: a request asking to switch protocols is refused with
//! `503` when the connections that hold an upgrade slot already take the share.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Buf;
use http::header::UPGRADE;
use http::{HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tower_service::Service;

use super::budget::Budget;
use crate::ConnectionHandle;

/// Whether `req` may hand its connection over to another protocol, as hyper lets an HTTP/1.1 request
/// do: one with `Upgrade` (RFC 9110 section 7.8), other than to `h2c`, which hyper never switches to
/// (curl asks for it by default), or a `CONNECT` (a tunnel, RFC 9110 section 9.3.6). A method compare
/// and one header lookup for an ordinary request. HTTP/2's extended CONNECT (RFC 8441) is not one: its
/// WebSocket is a stream of a connection that stays HTTP/2 and keeps its own room.
pub(crate) fn asks_to_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && (req.method() == Method::CONNECT
            || req
                .headers()
                .get(UPGRADE)
                .is_some_and(|to| !to.as_bytes().eq_ignore_ascii_case(b"h2c")))
}

/// The connection of an upgrade request, put into its extensions by the serve path's connection
/// service (only for such requests: the others pay nothing), for [`Gate`] to charge its budget.
#[derive(Clone)]
pub(crate) struct UpgradeOf(pub(crate) ConnectionHandle);

/// Answers an upgrade request with `503 Service Unavailable` (RFC 9110 section 15.6.4), instead of
/// calling the service, when the connections holding an upgrade slot already take the budget's share:
/// the client learns at once that no upgrade is to be had here now, and the room left is kept for
/// HTTP. Decided before the service runs, so never after a `101` went out.
#[derive(Clone)]
pub(crate) struct Gate<S> {
    inner: S,
    budget: Option<Arc<Budget>>,
}

impl<S> Gate<S> {
    pub(crate) fn new(inner: S, budget: Option<Arc<Budget>>) -> Self {
        Gate { inner, budget }
    }
}

impl<S, ReqB, B> Service<Request<ReqB>> for Gate<S>
where
    S: Service<Request<ReqB>, Response = Response<B>>,
{
    type Response = Response<GateBody<B>>;
    type Error = S::Error;
    type Future = GateFuture<S::Future>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    #[inline]
    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        if let Some(budget) = &self.budget {
            if asks_to_upgrade(&req) {
                let allowed = req
                    .extensions()
                    .get::<UpgradeOf>()
                    .is_none_or(|conn| budget.allow_upgrade(&conn.0));
                if !allowed {
                    return GateFuture::Refused {
                        status: StatusCode::SERVICE_UNAVAILABLE,
                    };
                }
            }
        }
        GateFuture::Inner {
            future: self.inner.call(req),
        }
    }
}

pin_project! {
    #[project = GateFutureProj]
    pub(crate) enum GateFuture<F> {
        Inner { #[pin] future: F },
        Refused { status: StatusCode },
    }
}

impl<F, B, E> Future for GateFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<GateBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            GateFutureProj::Inner { future } => future
                .poll(cx)
                .map(|res| res.map(|res| res.map(|body| GateBody::Inner { body }))),
            GateFutureProj::Refused { status } => {
                let mut res = Response::new(GateBody::Empty);
                *res.status_mut() = *status;
                // Upgrades may be free again soon; HTTP is served now.
                res.headers_mut()
                    .insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
                Poll::Ready(Ok(res))
            }
        }
    }
}

pin_project! {
    /// The service's body, or the empty body of a refusal.
    #[project = GateBodyProj]
    pub(crate) enum GateBody<B> {
        Inner { #[pin] body: B },
        Empty,
    }
}

impl<B: Body> Body for GateBody<B>
where
    B::Data: Buf,
{
    type Data = B::Data;
    type Error = B::Error;

    #[inline]
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        match self.project() {
            GateBodyProj::Inner { body } => body.poll_frame(cx),
            GateBodyProj::Empty => Poll::Ready(None),
        }
    }

    #[inline]
    fn is_end_stream(&self) -> bool {
        match self {
            GateBody::Inner { body } => body.is_end_stream(),
            GateBody::Empty => true,
        }
    }

    #[inline]
    fn size_hint(&self) -> SizeHint {
        match self {
            GateBody::Inner { body } => body.size_hint(),
            GateBody::Empty => SizeHint::with_exact(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(version: Version, method: Method, upgrade: Option<&'static str>) -> Request<()> {
        let mut req = Request::new(());
        *req.version_mut() = version;
        *req.method_mut() = method;
        if let Some(to) = upgrade {
            req.headers_mut()
                .insert(UPGRADE, HeaderValue::from_static(to));
        }
        req
    }

    #[test]
    fn only_requests_that_can_take_over_the_connection_ask_to_upgrade() {
        const HTTP_10: Version = Version::HTTP_10;
        const HTTP_11: Version = Version::HTTP_11;
        const HTTP_2: Version = Version::HTTP_2;
        assert!(asks_to_upgrade(&request(
            HTTP_11,
            Method::GET,
            Some("websocket")
        )));
        assert!(asks_to_upgrade(&request(HTTP_11, Method::CONNECT, None)));
        assert!(!asks_to_upgrade(&request(HTTP_11, Method::GET, None)));
        assert!(!asks_to_upgrade(&request(
            HTTP_11,
            Method::GET,
            Some("h2c")
        )));
        assert!(!asks_to_upgrade(&request(
            HTTP_11,
            Method::GET,
            Some("H2C")
        )));
        assert!(!asks_to_upgrade(&request(
            HTTP_10,
            Method::GET,
            Some("websocket")
        )));
        assert!(!asks_to_upgrade(&request(HTTP_2, Method::CONNECT, None)));
    }
}
