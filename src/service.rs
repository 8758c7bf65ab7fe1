use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response, Version};
use http_body::Body;
use tower_service::Service;

use crate::config::Config;
use crate::policy::{self, Plan};
use crate::{CloseReason, ConnectionHandle, KeepAliveLayer, ResponseBody, ResponseFuture};

/// Middleware that applies a keep-alive policy to every response of a connection.
///
/// Built by [`KeepAliveLayer`]; see the [crate-level documentation](crate) for what it does on the wire.
///
/// # Example
///
/// ```
/// use http::{Request, Response, Version};
/// use http_body_util::Full;
/// use bytes::Bytes;
/// use tower::{ServiceBuilder, ServiceExt};
/// use tower_keepalive::KeepAliveLayer;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), std::convert::Infallible> {
/// let layer = KeepAliveLayer::new().max_requests(2);
/// let handle = layer.connection();
/// let svc = ServiceBuilder::new()
///     .layer(layer.bind(handle))
///     .service_fn(|_req: Request<Full<Bytes>>| async {
///         Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from("hi"))))
///     });
///
/// let res = svc.clone().oneshot(Request::new(Full::default())).await?;
/// assert_eq!(res.headers()["keep-alive"], "timeout=5, max=1");
///
/// // The second request uses up the limit: the connection closes after it.
/// let res = svc.oneshot(Request::new(Full::default())).await?;
/// assert_eq!(res.headers()["connection"], "close");
/// assert!(res.headers().get("keep-alive").is_none());
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct KeepAlive<S> {
    inner: S,
    binding: Binding,
}

/// What a `KeepAlive` knows of its connection: one pointer, so that the clone hyper-util makes of the
/// service for every request touches one reference count.
#[derive(Clone, Debug)]
enum Binding {
    /// Bound to a connection, whose handle carries the policy it was made with.
    Connection(ConnectionHandle),
    /// The layer's policy; the handle, if any, comes with each request.
    Unbound(Arc<Config>),
}

impl<S> KeepAlive<S> {
    /// Wraps `inner` with the default policy. The connection's handle is looked up in each request's
    /// extensions.
    ///
    /// ```
    /// use tower_keepalive::KeepAlive;
    /// let svc = KeepAlive::new(tower::service_fn(|_req: http::Request<()>| async {
    ///     Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Empty::<bytes::Bytes>::new()))
    /// }));
    /// ```
    pub fn new(inner: S) -> Self {
        Self::from_layer(inner, &KeepAliveLayer::new())
    }

    /// A [`KeepAliveLayer`] with the default policy.
    ///
    /// ```
    /// let layer = tower_keepalive::KeepAlive::<()>::layer();
    /// ```
    pub fn layer() -> KeepAliveLayer {
        KeepAliveLayer::new()
    }

    /// Takes from `layer` only what the service keeps: its handle if bound, its policy otherwise.
    pub(crate) fn from_layer(inner: S, layer: &KeepAliveLayer) -> Self {
        match &layer.handle {
            Some(handle) => Self::bound(inner, handle.clone()),
            None => KeepAlive {
                inner,
                binding: Binding::Unbound(layer.config.clone()),
            },
        }
    }

    /// Bound to the connection of `handle`, whose policy it follows.
    pub(crate) fn bound(inner: S, handle: ConnectionHandle) -> Self {
        KeepAlive {
            inner,
            binding: Binding::Connection(handle),
        }
    }

    /// The connection's handle, when bound to one.
    #[cfg_attr(not(feature = "serve"), allow(dead_code))]
    pub(crate) fn bound_handle(&self) -> Option<&ConnectionHandle> {
        match &self.binding {
            Binding::Connection(handle) => Some(handle),
            Binding::Unbound(_) => None,
        }
    }

    /// The inner service.
    ///
    /// ```
    /// let svc = tower_keepalive::KeepAlive::new(());
    /// let () = *svc.get_ref();
    /// ```
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    ///
    /// ```
    /// let mut svc = tower_keepalive::KeepAlive::new(1);
    /// *svc.get_mut() += 1;
    /// ```
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Consumes the middleware, returning the inner service.
    ///
    /// ```
    /// let svc = tower_keepalive::KeepAlive::new(7);
    /// assert_eq!(svc.into_inner(), 7);
    /// ```
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for KeepAlive<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: Body,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    #[inline(always)]
    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        // Bound: borrowed, no reference count touched. From the extensions: cloned, as the request is
        // modified below.
        let found;
        let (handle, config) = match &self.binding {
            Binding::Connection(handle) => (Some(handle), handle.config()),
            Binding::Unbound(config) => {
                found = req.extensions().get::<ConnectionHandle>().cloned();
                if found.is_none() {
                    warn_no_handle_once();
                }
                // The policy the connection was made with governs it; the layer's own only without a
                // handle.
                let handle = found.as_ref();
                (handle, handle.map_or(&**config, ConnectionHandle::config))
            }
        };
        let (plan, guard) = plan(req.version(), req.method(), req.headers(), handle, config);
        if matches!(plan, Plan::Refuse) {
            // Answered 503; the serve paths reset the stream with REFUSED_STREAM instead.
            tracing::debug!("HTTP/2 stream past the connection's maximum requests; refused");
            return ResponseFuture::refused();
        }
        if config.strip_request {
            policy::strip_request_hop_by_hop(req.headers_mut(), &config.protected);
        }
        ResponseFuture::new(self.inner.call(req), plan, guard)
    }
}

/// Decides on the request side: counts the request, and for HTTP/1 whether this response may keep the
/// connection alive so far.
/// Not generic: the service's own code stays small enough to inline, and the request is not moved for it.
fn plan(
    version: Version,
    method: &http::Method,
    headers: &http::HeaderMap,
    handle: Option<&ConnectionHandle>,
    config: &Config,
) -> (Plan, Option<crate::connection::InFlight>) {
    let (count, guard) = match handle {
        // HTTP/2 past the maximum: refused uncounted, so that the connection does not look busy (the
        // count is the requests served).
        Some(h)
            if (version == Version::HTTP_2 || version == Version::HTTP_3)
                && config.max_requests.is_some_and(|max| h.requests() >= max) =>
        {
            return (Plan::Refuse, None);
        }
        Some(h) => {
            let (n, guard) = h.start_request();
            (Some(n), Some(guard))
        }
        None => (None, None),
    };

    if version == Version::HTTP_2 || version == Version::HTTP_3 {
        if let (Some(h), Some(n)) = (handle, count) {
            h.mark_http2();
            if config.max_requests.is_some_and(|max| n > max) {
                // Streams that started together with the last allowed one: refused as well.
                return (Plan::Refuse, None);
            }
            if config.max_requests.is_some_and(|max| n >= max) {
                h.close(CloseReason::MaxRequests);
            } else if h.is_past_max_age() {
                h.close(CloseReason::MaxAge);
            } else if let Some(reason) = h.config().control.shutdown_reason() {
                // A connection opened during the lame-duck period: its first streams are served, and
                // GOAWAY follows them (RFC 9113 section 6.8); those it opened before are already closing.
                if !h.close(reason) {
                    h.request_driver();
                }
            }
        }
        return (Plan::Strip, guard);
    }
    if version != Version::HTTP_11 && version != Version::HTTP_10 {
        return (Plan::Pass, guard);
    }

    let http10 = version == Version::HTTP_10;
    let mut close = policy::request_persistence(version, headers, config.http10).err();
    if close.is_none() && !config.keep_alive_enabled() {
        close = Some(CloseReason::Idle);
    }
    let remaining = match (config.max_requests, count) {
        (Some(max), Some(n)) => {
            if n >= max && close.is_none() {
                close = Some(CloseReason::MaxRequests);
            }
            Some(max.saturating_sub(n))
        }
        _ => None,
    };
    let advert = match handle {
        // Behind the one check a connection without a maximum age makes anyway: the clock, the
        // shortened advert and the promise to keep are for connections with one.
        Some(h) if close.is_none() && h.has_max_age() => match h.max_age_advert(remaining) {
            Ok(advert) => advert,
            Err(reason) => {
                close = Some(reason);
                None
            }
        },
        _ => match close {
            None if config.advertise => config.advert(remaining),
            _ => None,
        },
    };
    let plan = Plan::Http1 {
        http10,
        head: policy::is_head(method),
        close,
        advert,
    };
    (plan, guard)
}

fn warn_no_handle_once() {
    static WARNED: AtomicBool = AtomicBool::new(false);
    if !WARNED.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            "tower-keepalive: a request reached KeepAlive without a ConnectionHandle; headers are \
             still rewritten, but requests are not counted and idle connections are not closed. Bind a \
             handle per connection (KeepAliveLayer::bind) or insert one into request extensions."
        );
    }
}
