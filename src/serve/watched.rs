//! The connection's socket, as both serve paths see it: one wrapper, two jobs.
//!
//! - **Writes watched.** The keep-alive layer sees a response as done when its body has yielded its last
//!   frame; hyper may still hold that frame (all of a large body given in one piece) and be writing it
//!   out to a slow client. The wrapper tells the connection's handle when writes find the socket full
//!   and when they go through again, so such a connection is not taken for idle and cut.
//! - **A lingering close** (RFC 9112 section 9.6, nginx's `lingering_close`). Closing a socket with input
//!   unread, or receiving input after closing it, makes the kernel reset the connection, and a reset
//!   throws away the responses the client has not read yet: the usual victim is a client that pipelines
//!   requests past the connection's last. So when hyper shuts the connection down, the wrapper shuts
//!   down its sending side (the end of stream follows the last response byte), then reads and discards
//!   whatever the client still sends until the client closes its side too, or bounds are reached (see
//!   [`BOUNDS`]); only then does it report the shutdown done and let hyper drop the socket. No linger
//!   when the client has closed its side already, nor when the connection has been idle for a second
//!   and nothing from the client is waiting: then no response is on its way for a reset to destroy.
//!
//! The linger's timer is made when a linger begins, never for every connection.

use std::future::Future;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::{CloseReason, ConnectionHandle};

/// How long the wrapper waits on the client, at the end of a connection.
#[derive(Debug)]
pub(crate) struct Bounds {
    /// A linger ends once the client has sent nothing for this long (nginx's `lingering_timeout`, 5 s).
    /// Shorter than nginx: what a client sent before it saw the end of our stream arrives within a round
    /// trip or two, and a client that says nothing is not about to.
    pub(crate) quiet: Duration,
    /// A linger ends this long after it began, whatever the client sends (nginx's `lingering_time`,
    /// 30 s).
    pub(crate) total: Duration,
    /// A linger ends once it has discarded this many bytes: reading without end costs the server CPU.
    pub(crate) bytes: usize,
    /// No linger for a connection idle at least this long, with nothing from the client waiting:
    /// closed at its idle timeout, say. Its responses went out a while ago (a client reads what it is
    /// sent within a round trip or two), so none is left for a reset to destroy, and a request the
    /// client sends at this very moment is lost either way. nginx does not linger on those either.
    pub(crate) idle: Duration,
}

/// The bounds of every connection's end: a linger over after 2 s with nothing from the client, 10 s in
/// all, or 4 MiB discarded, whichever comes first, and none after 1 s idle.
pub(crate) const BOUNDS: Bounds = Bounds {
    quiet: Duration::from_secs(2),
    total: Duration::from_secs(10),
    bytes: 4 * 1024 * 1024,
    idle: Duration::from_secs(1),
};

pin_project! {
    /// A connection's IO, for both serve paths: reports its writes to the connection's
    /// [`ConnectionHandle`], and closes with a linger. The serve path wraps every connection in it, and
    /// so does the `axum::serve` path's `KeepAliveIo`; wrap your IO in it too when you drive connections
    /// yourself ([`ConnectionHandle::drive`]).
    ///
    /// - A response hyper is still writing out to a slow client (a large body given in one piece) is
    ///   never taken for an idle connection and cut: the connection is busy until its last byte has
    ///   been written to the socket.
    /// - When hyper shuts the connection down (HTTP/1 at its end, unless driven with
    ///   `poll_without_shutdown`), the sending side is shut down after the last response byte, then
    ///   whatever the client still sends is read and discarded until it closes its side too
    ///   (RFC 9112 section 9.6's lingering close, nginx's `lingering_close`): closing with input unread
    ///   would make the kernel reset the connection, and a reset destroys the responses the client has
    ///   not read yet (pipelined requests past the connection's last). The linger ends after 2 s with
    ///   nothing from the client, after 10 s in all, or once 4 MiB have been discarded, whichever
    ///   comes first. It is skipped when the client had closed its side already, and when the
    ///   connection had been idle for 1 s with nothing from the client waiting (an idle connection
    ///   closed at its timeout: no response is on its way); an upgraded connection's end is left to
    ///   the upgraded protocol.
    ///
    /// A timer is made only when a linger begins; the wrapper adds one pointer to the IO.
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
        // Made when a linger begins.
        wait: Option<Pin<Box<Wait>>>,
    }
}

pin_project! {
    /// A wait at the end of the connection: its timer, and what it waits for.
    struct Wait {
        #[pin]
        timer: Sleep,
        phase: Phase,
    }
}

enum Phase {
    /// Shut down for writing; reading and discarding until the client closes, the timer fires (nothing
    /// from the client for a while) or a bound is reached.
    Lingering { ends_at: Instant, discarded: usize },
    /// The linger is over: the shutdown is complete.
    Done,
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
        WatchedIo {
            inner,
            handle,
            wait: None,
        }
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

    #[cfg(feature = "axum")]
    pub(crate) fn handle(&self) -> &ConnectionHandle {
        &self.handle
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
        self.project().inner.poll_read(cx, buf)
    }
}

impl<I: AsyncRead + AsyncWrite> WatchedIo<I> {
    /// Tells the handle how a write went (`poll`; a flush that goes through says nothing, as a
    /// stream with its own buffer, TLS, may be the one still writing when it is pending).
    fn noted<T>(&self, poll: Poll<T>, write: bool) -> Poll<T> {
        if poll.is_pending() {
            self.handle.note_write(true);
        } else if write {
            self.handle.note_write(false);
        }
        poll
    }

    fn poll_shutdown_within(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bounds: &Bounds,
    ) -> Poll<io::Result<()>> {
        let mut this = self.project();
        match this.wait.as_ref().map(|wait| &wait.phase) {
            Some(Phase::Lingering { .. }) => {
                return linger(this.inner, this.wait, this.handle, cx, bounds)
            }
            Some(Phase::Done) => return Poll::Ready(Ok(())),
            None => {}
        }
        if this.handle.close_reason() == Some(CloseReason::Upgraded) {
            // The stream belongs to the upgraded protocol, and so does the way it ends.
            return this.inner.poll_shutdown(cx);
        }
        // The end of our stream, after the last response byte.
        ready!(this.inner.as_mut().poll_shutdown(cx))?;
        // One read before any timer: a client that has closed its side already (a half-close, or a
        // client that went away) needs no linger, nor one that sends nothing to a connection idle for
        // a while (see `Bounds::idle`).
        let mut discarded = 0;
        match discard(this.inner.as_mut(), cx, &mut discarded, bounds) {
            Drained::Over => return Poll::Ready(Ok(())),
            Drained::Quiet { read_any: false }
                if this
                    .handle
                    .idle_since()
                    .is_some_and(|since| since.elapsed() >= bounds.idle) =>
            {
                return Poll::Ready(Ok(()));
            }
            Drained::Quiet { .. } => {}
        }
        let now = Instant::now();
        let ends_at = now + bounds.total;
        let quiet_at = (now + bounds.quiet).min(ends_at);
        let phase = Phase::Lingering { ends_at, discarded };
        match this.wait.as_mut() {
            Some(wait) => {
                let wait = wait.as_mut().project();
                wait.timer.reset(quiet_at);
                *wait.phase = phase;
            }
            None => {
                *this.wait = Some(Box::pin(Wait {
                    timer: tokio::time::sleep_until(quiet_at),
                    phase,
                }));
            }
        }
        this.handle.set_lingering(true);
        linger(this.inner, this.wait, this.handle, cx, bounds)
    }
}

/// Lingers: discards what the client sends until it closes its side, it has been quiet for
/// `bounds.quiet`, the linger has lasted `bounds.total` or discarded `bounds.bytes`.
fn linger<I: AsyncRead>(
    mut inner: Pin<&mut I>,
    wait: &mut Option<Pin<Box<Wait>>>,
    handle: &ConnectionHandle,
    cx: &mut Context<'_>,
    bounds: &Bounds,
) -> Poll<io::Result<()>> {
    let Some(wait) = wait.as_mut() else {
        return Poll::Ready(Ok(()));
    };
    let mut wait = wait.as_mut().project();
    let Phase::Lingering { ends_at, discarded } = wait.phase else {
        return Poll::Ready(Ok(()));
    };
    let over = match discard(inner.as_mut(), cx, discarded, bounds) {
        Drained::Over => true,
        Drained::Quiet { read_any } => {
            if read_any {
                wait.timer
                    .as_mut()
                    .reset((Instant::now() + bounds.quiet).min(*ends_at));
            }
            wait.timer.poll(cx).is_ready()
        }
    };
    if !over {
        return Poll::Pending;
    }
    tracing::trace!(discarded = *discarded, "lingering close over");
    *wait.phase = Phase::Done;
    handle.set_lingering(false);
    Poll::Ready(Ok(()))
}

enum Drained {
    /// The client closed its side, the read failed, or the byte bound was reached: the linger is over.
    Over,
    /// Nothing more to read for now; `read_any`: something was read first.
    Quiet { read_any: bool },
}

/// Reads and drops what the client has sent, until there is nothing more to read for now.
fn discard<I: AsyncRead>(
    mut inner: Pin<&mut I>,
    cx: &mut Context<'_>,
    discarded: &mut usize,
    bounds: &Bounds,
) -> Drained {
    let mut chunk = [MaybeUninit::<u8>::uninit(); 8 * 1024];
    let mut read_any = false;
    loop {
        let mut buf = ReadBuf::uninit(&mut chunk);
        match inner.as_mut().poll_read(cx, &mut buf) {
            // The runtime's budget for this task also ends here: a client that sends without pause is
            // read on the next poll, not in one long loop.
            Poll::Pending => return Drained::Quiet { read_any },
            Poll::Ready(Err(_)) => return Drained::Over,
            Poll::Ready(Ok(())) => {
                let n = buf.filled().len();
                if n == 0 {
                    return Drained::Over;
                }
                read_any = true;
                *discarded = discarded.saturating_add(n);
                if *discarded >= bounds.bytes {
                    tracing::debug!("client still sending after the close; resetting it");
                    return Drained::Over;
                }
            }
        }
    }
}

impl<I: AsyncWrite + AsyncRead> AsyncWrite for WatchedIo<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = self.as_mut().project().inner.poll_write(cx, buf);
        self.noted(poll, true)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = self.as_mut().project().inner.poll_write_vectored(cx, bufs);
        self.noted(poll, true)
    }

    #[inline]
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = self.as_mut().project().inner.poll_flush(cx);
        self.noted(poll, false)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_shutdown_within(cx, &BOUNDS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::KeepAliveLayer;
    use std::future::poll_fn;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const SHORT: Bounds = Bounds {
        quiet: Duration::from_millis(200),
        total: Duration::from_millis(600),
        bytes: 64 * 1024,
        idle: Duration::from_millis(200),
    };

    fn watched() -> (WatchedIo<tokio::io::DuplexStream>, tokio::io::DuplexStream) {
        let (server, client) = tokio::io::duplex(16 * 1024);
        let handle = KeepAliveLayer::new().connection();
        (WatchedIo::new(server, handle), client)
    }

    async fn shutdown(io: &mut WatchedIo<tokio::io::DuplexStream>) -> Duration {
        let began = std::time::Instant::now();
        let mut io = Pin::new(io);
        tokio::time::timeout(
            Duration::from_secs(10),
            poll_fn(|cx| io.as_mut().poll_shutdown_within(cx, &SHORT)),
        )
        .await
        .expect("the linger is bounded")
        .expect("shutdown");
        began.elapsed()
    }

    #[tokio::test]
    async fn a_linger_ends_when_the_client_closes_and_is_skipped_after_its_end_of_stream() {
        let (mut io, mut client) = watched();
        client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let closer = tokio::spawn(async move {
            let mut rest = Vec::new();
            // Our end of stream reaches the client, which then closes its own side.
            client.read_to_end(&mut rest).await.unwrap();
            drop(client);
        });
        assert!(shutdown(&mut io).await < SHORT.quiet);
        assert!(!io.handle.is_lingering());
        closer.await.unwrap();
        // Nothing left to wait for: done at once, and for good.
        assert!(shutdown(&mut io).await < SHORT.quiet);
    }

    #[tokio::test]
    async fn a_linger_ends_after_a_quiet_spell() {
        let (mut io, _client) = watched();
        // Just done with a response.
        drop(io.handle.start_request());
        let took = shutdown(&mut io).await;
        assert!(took >= SHORT.quiet && took < SHORT.total, "{took:?}");
    }

    #[tokio::test]
    async fn no_linger_after_a_while_idle_with_nothing_sent() {
        let (mut io, _client) = watched();
        tokio::time::sleep(SHORT.idle).await;
        assert!(shutdown(&mut io).await < SHORT.quiet);
        assert!(!io.handle.is_lingering());
    }

    #[tokio::test]
    async fn a_linger_ends_after_its_total_time_whatever_the_client_sends() {
        let (mut io, mut client) = watched();
        let dribble = tokio::spawn(async move {
            while client.write_all(b"x").await.is_ok() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        let took = shutdown(&mut io).await;
        assert!(took >= SHORT.total, "{took:?}");
        dribble.abort();
    }

    #[tokio::test]
    async fn a_linger_ends_after_its_byte_bound() {
        let (mut io, mut client) = watched();
        let flood = tokio::spawn(async move {
            let junk = [b'x'; 4096];
            while client.write_all(&junk).await.is_ok() {}
        });
        assert!(shutdown(&mut io).await < SHORT.quiet);
        flood.abort();
    }
}
