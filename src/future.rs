use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use http::{Response, Version};
use http_body::Body;
use pin_project_lite::pin_project;

use crate::connection::InFlight;
use crate::policy::{self, Plan};
use crate::{CloseReason, ConnectionHandle, ResponseBody};

pin_project! {
    /// Response future of [`KeepAlive`](crate::KeepAlive): rewrites the response's connection fields and
    /// moves the request's in-flight mark into the response body.
    ///
    /// ```
    /// use tower::{Service, ServiceExt};
    /// use tower_keepalive::{KeepAlive, ResponseFuture};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let mut svc = KeepAlive::new(tower::service_fn(|_req: http::Request<()>| async {
    ///     Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Empty::<bytes::Bytes>::new()))
    /// }));
    /// let future = svc.ready().await.unwrap().call(http::Request::new(()));
    /// let res = future.await.unwrap();
    /// assert_eq!(res.headers()["connection"], "keep-alive");
    /// # }
    /// ```
    pub struct ResponseFuture<F> {
        // `None`: the request was refused without calling the inner service (see `Plan::Refuse`).
        #[pin]
        inner: Option<F>,
        plan: Option<Plan>,
        guard: Option<InFlight>,
    }
}

impl<F> ResponseFuture<F> {
    pub(crate) fn new(inner: F, plan: Plan, guard: Option<InFlight>) -> Self {
        ResponseFuture {
            inner: Some(inner),
            plan: Some(plan),
            guard,
        }
    }

    /// A stream past the connection's maximum requests: `503 Service Unavailable` with no body at all
    /// (which the serve paths turn into a `REFUSED_STREAM` reset), the inner service not called.
    pub(crate) fn refused() -> Self {
        ResponseFuture {
            inner: None,
            plan: None,
            guard: None,
        }
    }
}

impl<F> std::fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("plan", &self.plan)
            .finish()
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: Body,
{
    type Output = Result<Response<ResponseBody<B>>, E>;

    #[inline(always)]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Some(inner) = this.inner.as_pin_mut() else {
            let mut res = Response::new(ResponseBody::refused());
            *res.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
            return Poll::Ready(Ok(res));
        };
        let result = ready!(inner.poll(cx));
        let guard = this.guard.take();
        let mut res = match result {
            Ok(res) => res,
            Err(err) => {
                // hyper ends an HTTP/1 connection on a service error; on HTTP/2 it resets that stream only,
                // and the connection serves on.
                if let (Some(guard), Some(Plan::Http1 { .. })) = (&guard, &*this.plan) {
                    guard.handle().mark_closing(CloseReason::Error);
                }
                return Poll::Ready(Err(err));
            }
        };
        let http2 = matches!(this.plan, Some(Plan::Strip));
        if let Some(plan) = this.plan.take() {
            let status = res.status();
            let exact_len = res.body().size_hint().exact();
            if finish(plan, status, res.headers_mut(), exact_len, guard.as_ref()) {
                // hyper keeps an HTTP/1.0 keep-alive connection open unless the response says
                // HTTP/1.0 as well as `close`.
                *res.version_mut() = Version::HTTP_10;
            }
        }
        Poll::Ready(Ok(res.map(|body| {
            if http2 {
                ResponseBody::new_http2(body, guard)
            } else {
                ResponseBody::new(body, guard)
            }
        })))
    }
}

/// The response side of the plan, not generic (see `service::plan`). Returns whether the response must
/// say HTTP/1.0.
fn finish(
    plan: Plan,
    status: http::StatusCode,
    headers: &mut http::HeaderMap,
    exact_len: Option<u64>,
    guard: Option<&InFlight>,
) -> bool {
    match plan {
        Plan::Http1 {
            http10,
            head,
            close,
            advert,
        } => {
            let handle = guard.map(InFlight::handle);
            // A close decided meanwhile (drain, max age, another request) is final.
            let close = close.or_else(|| handle.and_then(ConnectionHandle::pending_close));
            let decided = policy::finish_http1(
                status,
                headers,
                http10,
                close,
                |headers| policy::self_delimited(status, head, headers, exact_len),
                advert,
            );
            if let (Some(reason), Some(h)) = (decided, handle) {
                h.mark_closed_by_response(reason);
            }
            http10 && decided.is_some_and(|reason| reason != CloseReason::Upgraded)
        }
        Plan::Strip => {
            policy::strip_connection_fields(headers);
            false
        }
        Plan::Pass | Plan::Refuse => false,
    }
}

/// The error a refused HTTP/2 stream is reset with: `REFUSED_STREAM` (RFC 9113 section 8.7), which tells
/// the client that the request was not processed and may be retried, on another connection. hyper resets
/// a stream with the `h2::Reason` it finds in the source chain of a service or body error.
#[cfg(feature = "serve")]
pub(crate) fn refused_stream() -> h2::Error {
    h2::Error::from(h2::Reason::REFUSED_STREAM)
}

#[cfg(feature = "serve")]
pin_project! {
    /// Response future of the serve path's per-connection service: a stream the layer refused (see
    /// `Plan::Refuse`) becomes a service error carrying `REFUSED_STREAM`, so that hyper resets it with
    /// that code instead of writing the layer's 503.
    pub(crate) struct RefusingFuture<F> {
        #[pin]
        inner: ResponseFuture<F>,
    }
}

#[cfg(feature = "serve")]
impl<F> RefusingFuture<F> {
    pub(crate) fn new(inner: ResponseFuture<F>) -> Self {
        RefusingFuture { inner }
    }
}

#[cfg(feature = "serve")]
impl<F, B, E> Future for RefusingFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: Body,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Output = Result<Response<ResponseBody<B>>, Box<dyn std::error::Error + Send + Sync>>;

    #[inline(always)]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let res = ready!(self.project().inner.poll(cx)).map_err(Into::into)?;
        if res.body().is_refused() {
            // Boxed here, once per refusal: an ordinary response pays one check of its body.
            return Poll::Ready(Err(Box::new(refused_stream())));
        }
        Poll::Ready(Ok(res))
    }
}
