use std::pin::Pin;
use std::task::{ready, Context, Poll};

use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use crate::connection::InFlight;

pin_project! {
    /// Response body of [`KeepAlive`](crate::KeepAlive): the request stays in flight until this body has
    /// yielded its last frame, failed, or been dropped (the client went away).
    ///
    /// ```
    /// use http_body::Body;
    /// use tower::{Service, ServiceExt};
    /// use tower_keepalive::{KeepAlive, KeepAliveLayer};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let layer = KeepAliveLayer::new();
    /// let handle = layer.connection();
    /// let mut svc = tower::Layer::layer(&layer.bind(handle.clone()), tower::service_fn(|_req: http::Request<()>| async {
    ///     Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(bytes::Bytes::from("hi"))))
    /// }));
    /// let res = svc.ready().await.unwrap().call(http::Request::new(())).await.unwrap();
    /// assert_eq!(handle.in_flight(), 1); // the body is not sent yet
    /// drop(res);
    /// assert_eq!(handle.in_flight(), 0);
    /// # }
    /// ```
    pub struct ResponseBody<B> {
        // `None`: the empty body of a refused request, which is how the serve paths tell a refusal (a
        // check of one discriminant, nothing on the response of an ordinary request).
        #[pin]
        inner: Option<B>,
        guard: Option<InFlight>,
        // HTTP/2: output waits on hyper (counted in the connection's handle): made, or a frame handed
        // over, and not polled since. For the send timeout.
        waiting: bool,
    }

    impl<B> PinnedDrop for ResponseBody<B> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if *this.waiting {
                if let Some(guard) = this.guard.as_ref() {
                    guard.handle().body_done_waiting(false);
                }
            }
        }
    }
}

impl<B> ResponseBody<B> {
    pub(crate) fn new(inner: B, guard: Option<InFlight>) -> Self {
        ResponseBody {
            inner: Some(inner),
            guard,
            waiting: false,
        }
    }

    /// No body at all: a refused request's (see `Plan::Refuse`).
    pub(crate) fn refused() -> Self {
        ResponseBody {
            inner: None,
            guard: None,
            waiting: false,
        }
    }

    /// Whether this is the body of a request the layer refused without calling the inner service.
    #[cfg(feature = "serve")]
    #[inline]
    pub(crate) fn is_refused(&self) -> bool {
        self.inner.is_none()
    }

    /// An HTTP/2 response's body: its output is counted as waiting whenever hyper has not taken it.
    pub(crate) fn new_http2(inner: B, guard: Option<InFlight>) -> Self {
        let waiting = match &guard {
            Some(guard) => {
                guard.handle().body_waiting();
                true
            }
            None => false,
        };
        ResponseBody {
            inner: Some(inner),
            guard,
            waiting,
        }
    }
}

impl<B> std::fmt::Debug for ResponseBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseBody")
            .field("in_flight", &self.guard.is_some())
            .finish()
    }
}

impl<B: Body> Body for ResponseBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let mut this = self.project();
        if std::mem::take(this.waiting) {
            if let Some(guard) = this.guard.as_ref() {
                guard.handle().body_done_waiting(true);
            }
        }
        let Some(mut inner) = this.inner.as_mut().as_pin_mut() else {
            return Poll::Ready(None);
        };
        let frame = ready!(inner.as_mut().poll_frame(cx));
        // Finished on the end, on an error, or on the frame after which the body says it is done (with an
        // exact length the consumer may never poll again).
        let done = match &frame {
            None | Some(Err(_)) => true,
            Some(Ok(_)) => inner.is_end_stream(),
        };
        if done {
            this.guard.take();
        } else if let Some(guard) = this.guard.as_ref() {
            // Counted only for HTTP/2 bodies: `new_http2` made the first mark, or none was made.
            if guard.handle().is_http2() {
                guard.handle().body_waiting();
                *this.waiting = true;
            }
        }
        Poll::Ready(frame)
    }

    #[inline]
    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(B::is_end_stream)
    }

    #[inline]
    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), B::size_hint)
    }
}

/// The body of a refused HTTP/2 stream under `axum::serve`, whose services cannot fail: it fails when
/// first polled with `REFUSED_STREAM`, and hyper resets the stream with that code. hyper has queued the
/// response head by then, but h2 drops what of a stream it has not yet written when the stream is reset,
/// so the client normally sees the reset alone (see `KeepAliveLayer::max_requests` for when it does not).
#[cfg(feature = "axum")]
#[derive(Debug)]
pub(crate) struct RefusedStream;

#[cfg(feature = "axum")]
impl Body for RefusedStream {
    type Data = bytes::Bytes;
    type Error = h2::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Poll::Ready(Some(Err(crate::future::refused_stream())))
    }
}
