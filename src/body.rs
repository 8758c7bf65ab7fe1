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
        #[pin]
        inner: B,
        guard: Option<InFlight>,
    }
}

impl<B> ResponseBody<B> {
    pub(crate) fn new(inner: B, guard: Option<InFlight>) -> Self {
        ResponseBody { inner, guard }
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
        let frame = ready!(this.inner.as_mut().poll_frame(cx));
        // Finished on the end, on an error, or on the frame after which the body says it is done (with an
        // exact length the consumer may never poll again).
        let done = match &frame {
            None | Some(Err(_)) => true,
            Some(Ok(_)) => this.inner.is_end_stream(),
        };
        if done {
            this.guard.take();
        }
        Poll::Ready(frame)
    }

    #[inline]
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    #[inline]
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
