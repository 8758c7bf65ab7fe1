//! The connection's socket, watched for writes.
//!
//! The keep-alive layer sees a response as done when its body has yielded its last frame; hyper may
//! still hold that frame (all of a large body given in one piece) and be writing it out to a slow client.
//! Cutting the connection then would truncate the response, so the serve path tells the connection's
//! handle when writes find the socket full and when they go through again.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::ConnectionHandle;

pin_project! {
    /// A connection's IO that reports its writes to the connection's [`ConnectionHandle`], so that a
    /// response hyper is still writing out to a slow client is never taken for an idle connection and
    /// cut. The serve path wraps every connection in it; wrap your IO in it too when you drive
    /// connections yourself ([`ConnectionHandle::drive`]).
    ///
    /// ```no_run
    /// use hyper_util::rt::TokioIo;
    /// use tower_keepalive::serve::WatchedIo;
    ///
    /// # async fn f(stream: tokio::net::TcpStream) {
    /// let layer = tower_keepalive::KeepAliveLayer::new();
    /// let handle = layer.connection();
    /// let io = TokioIo::new(WatchedIo::new(stream, handle.clone()));
    /// // builder.serve_connection_with_upgrades(io, service) ... handle.drive(conn)
    /// # }
    /// ```
    pub struct WatchedIo<I> {
        #[pin]
        inner: I,
        handle: ConnectionHandle,
    }
}

impl<I> WatchedIo<I> {
    /// Wraps `inner`, the IO of the connection `handle` belongs to.
    ///
    /// ```no_run
    /// # async fn f(stream: tokio::net::TcpStream) {
    /// let handle = tower_keepalive::KeepAliveLayer::new().connection();
    /// let io = tower_keepalive::serve::WatchedIo::new(stream, handle);
    /// # }
    /// ```
    pub fn new(inner: I, handle: ConnectionHandle) -> Self {
        WatchedIo { inner, handle }
    }

    /// The wrapped IO.
    ///
    /// ```no_run
    /// # async fn f(stream: tokio::net::TcpStream) {
    /// # let handle = tower_keepalive::KeepAliveLayer::new().connection();
    /// let io = tower_keepalive::serve::WatchedIo::new(stream, handle);
    /// let peer = io.get_ref().peer_addr();
    /// # }
    /// ```
    pub fn get_ref(&self) -> &I {
        &self.inner
    }
}

impl<I: std::fmt::Debug> std::fmt::Debug for WatchedIo<I> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WatchedIo")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<I: AsyncRead> AsyncRead for WatchedIo<I> {
    #[inline]
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let poll = this.inner.poll_read(cx, buf);
        // The first bytes of an idle period start a request head, for the header timeout.
        if buf.filled().len() > before {
            this.handle.note_read();
        }
        poll
    }
}

impl<I: AsyncWrite> AsyncWrite for WatchedIo<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let poll = this.inner.poll_write(cx, buf);
        this.handle.note_write(poll.is_pending());
        poll
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let poll = this.inner.poll_write_vectored(cx, bufs);
        this.handle.note_write(poll.is_pending());
        poll
    }

    #[inline]
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        let poll = this.inner.poll_flush(cx);
        // A stream with its own buffer (TLS) may be the one still writing.
        if poll.is_pending() {
            this.handle.note_write(true);
        }
        poll
    }

    #[inline]
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}
