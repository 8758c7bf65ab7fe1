//! The connection's socket, as both serve paths see it: one wrapper, three jobs.
//!
//! - **Writes watched.** The keep-alive layer sees a response as done when its body has yielded its last
//!   frame; hyper may still hold that frame (all of a large body given in one piece) and be writing it
//!   out to a slow client. The wrapper tells the connection's handle when writes find the socket full
//!   and when they go through again, so such a connection is not taken for idle and cut.
//! - **A half-close answered** (RFC 9112 section 9.6). A client that shuts down its sending side after its
//!   request (scripts, `nc`, some proxies and load tools) has finished sending, not gone away. hyper,
//!   unless `half_close` is set on its HTTP/1 builder (which `axum::serve` does not let us do), takes an
//!   end of stream read while it still owes a response for the connection's end, and drops the response.
//!   So while a request without a body is in flight, the wrapper decides the close
//!   ([`CloseReason::ClientClosed`], so a response still to come says `Connection: close`) and holds the
//!   end of stream back until the connection is idle. hyper takes a request off the wire a moment
//!   before its service sees it (hyper-util's glue calls the tower service when its future is first
//!   polled), so an end of stream read with nothing in flight is looked at once more, on the next read.
//!   A request with a body is not held: the end of stream may have cut the body short, and the handler
//!   must hear of that (the serve paths tell the IO which requests have a body; a hand-written loop
//!   does not, and holds nothing). An end of stream on an idle connection goes through, and hyper
//!   closes it without waiting for any timeout.
//! - **A lingering close** (RFC 9112 section 9.6, nginx's `lingering_close`). Closing a socket with input
//!   unread, or receiving input after closing it, makes the kernel reset the connection, and a reset
//!   throws away the responses the client has not read yet: the usual victim is a client that pipelines
//!   requests past the connection's last. So when hyper shuts the connection down, the wrapper shuts
//!   down its sending side (the end of stream follows the last response byte), then reads and discards
//!   whatever the client still sends until the client closes its side too, or bounds are reached (see
//!   [`BOUNDS`]); only then does it report the shutdown done and let hyper drop the socket. No linger
//!   when the client has closed its side already; nor, with nothing from the client waiting, when the
//!   connection has been idle for a second (no response is on its way for a reset to destroy) or the
//!   client itself asked to close after a request without a body (it sends nothing more).
//!
//! The timer for the last two is made when one of them begins, never for every connection.

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
    /// How long an end of stream read while a request is in flight is held back at most. Past it,
    /// hyper gets it and ends the exchange as it would have: a client that half-closed and one that
    /// went away look the same on the wire, and a handler that takes this long (a long poll) should
    /// not run on for a client that is gone. nginx's `send_timeout` and `proxy_read_timeout` (60 s)
    /// bound such waits.
    pub(crate) hold_eof: Duration,
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

/// The bounds of every connection's end: an end of stream held for 60 s at most while a request is in
/// flight; a linger over after 2 s with nothing from the client, 10 s in all, or 4 MiB discarded,
/// whichever comes first, and none after 1 s idle.
pub(crate) const BOUNDS: Bounds = Bounds {
    hold_eof: Duration::from_secs(60),
    quiet: Duration::from_secs(2),
    total: Duration::from_secs(10),
    bytes: 4 * 1024 * 1024,
    idle: Duration::from_secs(1),
};

pin_project! {
    /// A connection's IO, for both serve paths: reports its writes to the connection's
    /// [`ConnectionHandle`], answers a client that half-closes after its request, and closes with a
    /// linger. The serve path wraps every connection in it, and so does the `axum::serve` path's
    /// `KeepAliveIo`; wrap your IO in it too when you drive connections yourself
    /// ([`ConnectionHandle::drive`]).
    ///
    /// - A response hyper is still writing out to a slow client (a large body given in one piece) is
    ///   never taken for an idle connection and cut: the connection is busy until its last byte has
    ///   been written to the socket.
    /// - A client that half-closes (shuts down its sending side) after a request without a body is
    ///   answered (RFC 9112 section 9.6: it has finished sending). The close is decided
    ///   ([`CloseReason::ClientClosed`]: a response not begun yet says `Connection: close`), the end
    ///   of stream is held back from hyper while the request is in flight, and hyper sees it once the
    ///   connection is idle, or after 60 s if the response never comes. A client that goes away in the
    ///   middle of such a request looks the same on the wire, so it is noticed when its response is
    ///   written, or at those 60 s. On an idle connection the end of stream goes through, and the
    ///   connection closes at once. It is not held during a request with a body, which it may have cut
    ///   short; nor on HTTP/2 and upgraded connections. Only the crate's serve paths tell the IO
    ///   which requests have a body: in a hand-written loop nothing is held (set hyper's
    ///   `http1().half_close(true)` there instead).
    /// - When hyper shuts the connection down (HTTP/1 at its end, unless driven with
    ///   `poll_without_shutdown`), the sending side is shut down after the last response byte, then
    ///   whatever the client still sends is read and discarded until it closes its side too
    ///   (RFC 9112 section 9.6's lingering close, nginx's `lingering_close`): closing with input unread
    ///   would make the kernel reset the connection, and a reset destroys the responses the client has
    ///   not read yet (pipelined requests past the connection's last). The linger ends after 2 s with
    ///   nothing from the client, after 10 s in all, or once 4 MiB have been discarded, whichever
    ///   comes first. It is skipped when the client had closed its side already; and, with nothing
    ///   from the client waiting, when the connection had been idle for 1 s (an idle connection
    ///   closed at its timeout: no response is on its way) or the client asked to close
    ///   (`Connection: close`, HTTP/1.0) after a request without a body, as it sends nothing more.
    ///   An upgraded connection's end is left to the upgraded protocol.
    ///
    /// A timer is made only when one of these waits begins; the wrapper adds one pointer to the IO.
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
        // Made when an end of stream is held back or a linger begins.
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
    /// The client's end of stream came while a request was in flight: hyper gets it once the
    /// connection is idle, or when the timer fires.
    HeldEof,
    /// The connection became idle while the end of stream was held, and its task was woken to read it.
    EofDue,
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

impl<I: AsyncRead> WatchedIo<I> {
    fn poll_read_within(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
        bounds: &Bounds,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        if let Some(wait) = this.wait.as_mut() {
            if matches!(wait.phase, Phase::HeldEof | Phase::EofDue) {
                return held_eof(wait.as_mut(), this.handle, cx);
            }
        }
        let handle = &*this.handle;
        if handle.peer_eof() {
            // Read on an earlier poll (see below): whatever request hyper had taken off the wire has
            // reached the service by now.
            return hold_or_give_eof(this.wait, handle, cx, bounds);
        }
        let before = buf.filled().len();
        ready!(this.inner.poll_read(cx, buf))?;
        if buf.filled().len() != before {
            // The first bytes of an idle period start a request head, for the header timeout.
            handle.note_read();
            return Poll::Ready(Ok(()));
        }
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        if handle.is_http2() || handle.close_reason() == Some(CloseReason::Upgraded) {
            return Poll::Ready(Ok(()));
        }
        handle.set_peer_eof();
        if holds_eof(handle) {
            return hold_or_give_eof(this.wait, handle, cx, bounds);
        }
        // hyper may have just taken a request off the wire that its service has not seen yet:
        // hyper-util's service glue calls the tower service (and so the keep-alive layer) when its
        // future is first polled, right after this read, in the same turn. Decide on the next read,
        // once it has.
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

/// After the client's end of stream: holds it back from hyper if it must be (see [`holds_eof`]),
/// deciding the close, or gives it.
fn hold_or_give_eof(
    wait: &mut Option<Pin<Box<Wait>>>,
    handle: &ConnectionHandle,
    cx: &mut Context<'_>,
    bounds: &Bounds,
) -> Poll<io::Result<()>> {
    if !holds_eof(handle) {
        return Poll::Ready(Ok(()));
    }
    tracing::debug!("client half-closed while its response is due; holding the end of stream");
    // The connection ends after this response: it says so. (Decided only now: a client that sends
    // half a head and leaves has had a protocol error, not a close of its own.)
    handle.close(CloseReason::ClientClosed);
    let wait = wait.insert(Box::pin(Wait {
        timer: tokio::time::sleep(bounds.hold_eof),
        phase: Phase::HeldEof,
    }));
    held_eof(wait.as_mut(), handle, cx)
}

/// Whether an end of stream read now must be held back from hyper, which would end the exchange without
/// its response: on an HTTP/1 connection, a request in flight that has no body (with a body, the end of
/// stream may have cut it short, and the handler waits for the rest until hyper tells it), or the end
/// of a response still being written out.
fn holds_eof(handle: &ConnectionHandle) -> bool {
    if handle.is_http2() || handle.close_reason() == Some(CloseReason::Upgraded) {
        return false;
    }
    if handle.in_flight() > 0 {
        handle.request_is_bodiless()
    } else {
        handle.idle_since().is_none()
    }
}

/// The end of stream once the connection is idle or the hold has lasted its bound, `Pending` until then.
fn held_eof(
    wait: Pin<&mut Wait>,
    handle: &ConnectionHandle,
    cx: &mut Context<'_>,
) -> Poll<io::Result<()>> {
    let wait = wait.project();
    if matches!(wait.phase, Phase::EofDue)
        || handle.idle_since().is_some()
        || wait.timer.poll(cx).is_ready()
    {
        return Poll::Ready(Ok(()));
    }
    // Woken by the timer, or by a write that finds the connection idle (see `noted`).
    Poll::Pending
}

impl<I: AsyncRead> AsyncRead for WatchedIo<I> {
    #[inline]
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.poll_read_within(cx, buf, &BOUNDS)
    }
}

impl<I: AsyncRead + AsyncWrite> WatchedIo<I> {
    /// Tells the handle how a write went (`poll`; a flush that goes through says nothing, as a
    /// stream with its own buffer, TLS, may be the one still writing when it is pending). With an end of
    /// stream held back, the connection's last write is where it becomes idle, and nothing else would
    /// wake hyper to read the end of stream (its read is pending on us): this wakes it, once.
    fn noted<T>(self: Pin<&mut Self>, cx: &mut Context<'_>, poll: Poll<T>, write: bool) -> Poll<T> {
        let this = self.project();
        if poll.is_pending() {
            this.handle.note_write(true);
        } else if write {
            this.handle.note_write(false);
        }
        if let Some(wait) = this.wait.as_mut() {
            let wait = wait.as_mut().project();
            if matches!(wait.phase, Phase::HeldEof) && this.handle.idle_since().is_some() {
                *wait.phase = Phase::EofDue;
                cx.waker().wake_by_ref();
            }
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
            Some(Phase::HeldEof | Phase::EofDue) | None => {}
        }
        if this.handle.close_reason() == Some(CloseReason::Upgraded) {
            // The stream belongs to the upgraded protocol, and so does the way it ends.
            return this.inner.poll_shutdown(cx);
        }
        if this.handle.is_parking() {
            // hyper's connection is being taken apart around an idle socket that stays open
            // (hibernation, `serve::conn`): its end is not the connection's.
            return Poll::Ready(Ok(()));
        }
        // The end of our stream, after the last response byte.
        ready!(this.inner.as_mut().poll_shutdown(cx))?;
        // One read before any timer: a client that has closed its side already (a half-close, or a
        // client that went away) needs no linger; nor, with nothing waiting, does one that will send
        // nothing more (see `needs_no_linger`).
        let mut discarded = 0;
        match discard(this.inner.as_mut(), cx, &mut discarded, bounds) {
            Drained::Over => return Poll::Ready(Ok(())),
            Drained::Quiet { read_any: false } if needs_no_linger(this.handle, bounds) => {
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

/// Whether a connection whose client has nothing waiting to be read can close without a linger: it
/// has been idle for a while (see [`Bounds::idle`]), or the client asked to close after a request
/// without a body (a client that sends `close` sends no further request, RFC 9112 section 9.6, and no
/// body of that request is still on its way).
fn needs_no_linger(handle: &ConnectionHandle, bounds: &Bounds) -> bool {
    handle
        .idle_since()
        .is_some_and(|since| since.elapsed() >= bounds.idle)
        || (handle.close_reason() == Some(CloseReason::ClientClosed)
            && handle.request_is_bodiless())
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
        self.noted(cx, poll, true)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = self.as_mut().project().inner.poll_write_vectored(cx, bufs);
        self.noted(cx, poll, true)
    }

    #[inline]
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = self.as_mut().project().inner.poll_flush(cx);
        self.noted(cx, poll, false)
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
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::{Wake, Waker};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const SHORT: Bounds = Bounds {
        hold_eof: Duration::from_millis(300),
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

    struct Wakes(AtomicUsize);

    impl Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A waker that counts its wake-ups.
    fn counting_waker() -> (Arc<Wakes>, Waker) {
        let wakes = Arc::new(Wakes(AtomicUsize::new(0)));
        (wakes.clone(), Waker::from(wakes))
    }

    /// One read of up to 16 bytes, with the default bounds: how many came.
    fn read_once<I: AsyncRead>(
        io: Pin<&mut WatchedIo<I>>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<usize>> {
        let mut chunk = [0u8; 16];
        let mut buf = ReadBuf::new(&mut chunk);
        io.poll_read_within(cx, &mut buf, &BOUNDS)
            .map_ok(|()| buf.filled().len())
    }

    #[tokio::test]
    async fn an_end_of_stream_is_held_while_busy_and_given_once_idle() {
        let (io, client) = watched();
        let mut io = std::pin::pin!(io);
        let (_, in_flight) = io.handle.start_request();
        io.handle.note_request_body(false);
        drop(client);
        let (wakes, waker) = counting_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(
            read_once(io.as_mut(), &mut cx).is_pending(),
            "given while busy"
        );
        assert_eq!(io.handle.close_reason(), Some(CloseReason::ClientClosed));
        // Still busy: a write wakes nobody.
        let _ = io.as_mut().poll_write(&mut cx, b"HTTP/1.1 200 OK\r\n");
        assert_eq!(wakes.0.load(Ordering::Relaxed), 0);
        assert!(read_once(io.as_mut(), &mut cx).is_pending());
        // The last response body ends; hyper writes its last bytes: that wakes the read, once.
        drop(in_flight);
        let _ = io.as_mut().poll_write(&mut cx, b"hello");
        let _ = io.as_mut().poll_flush(&mut cx);
        assert_eq!(wakes.0.load(Ordering::Relaxed), 1);
        assert!(matches!(
            read_once(io.as_mut(), &mut cx),
            Poll::Ready(Ok(0))
        ));
    }

    #[tokio::test]
    async fn a_held_end_of_stream_is_given_after_its_bound() {
        let (mut io, client) = watched();
        let (_, _in_flight) = io.handle.start_request();
        io.handle.note_request_body(false);
        drop(client);
        let began = std::time::Instant::now();
        let mut chunk = [0u8; 16];
        let mut io = Pin::new(&mut io);
        let n = tokio::time::timeout(
            Duration::from_secs(5),
            poll_fn(|cx| {
                let mut buf = ReadBuf::new(&mut chunk);
                io.as_mut()
                    .poll_read_within(cx, &mut buf, &SHORT)
                    .map_ok(|()| buf.filled().len())
            }),
        )
        .await
        .expect("the hold is bounded")
        .unwrap();
        assert_eq!(n, 0);
        assert!(began.elapsed() >= SHORT.hold_eof);
    }

    #[tokio::test]
    async fn an_end_of_stream_during_a_request_with_a_body_goes_through() {
        let (io, client) = watched();
        let mut io = std::pin::pin!(io);
        let (_, _in_flight) = io.handle.start_request();
        // It may end a body the client cut short: hyper must see it to fail the request.
        io.handle.note_request_body(true);
        drop(client);
        let mut chunk = [0u8; 16];
        let n = poll_fn(|cx| {
            let mut buf = ReadBuf::new(&mut chunk);
            io.as_mut()
                .poll_read_within(cx, &mut buf, &SHORT)
                .map_ok(|()| buf.filled().len())
        })
        .await
        .unwrap();
        assert_eq!(n, 0);
    }

    #[tokio::test]
    async fn an_end_of_stream_waits_one_poll_for_the_request_hyper_has_taken_off_the_wire() {
        let (io, client) = watched();
        let mut io = std::pin::pin!(io);
        drop(client);
        let (wakes, waker) = counting_waker();
        let mut cx = Context::from_waker(&waker);
        // Nothing in flight yet: one more turn, for the service to see the request.
        assert!(read_once(io.as_mut(), &mut cx).is_pending());
        assert_eq!(wakes.0.load(Ordering::Relaxed), 1);
        // It did: a request without a body, in flight. The end of stream is held back.
        let (_, in_flight) = io.handle.start_request();
        io.handle.note_request_body(false);
        assert!(read_once(io.as_mut(), &mut cx).is_pending());
        assert_eq!(io.handle.close_reason(), Some(CloseReason::ClientClosed));
        drop(in_flight);
        assert!(matches!(
            read_once(io.as_mut(), &mut cx),
            Poll::Ready(Ok(0))
        ));

        // With no request at all, the end of stream comes on that next read.
        let (io, client) = watched();
        let mut io = std::pin::pin!(io);
        drop(client);
        assert!(read_once(io.as_mut(), &mut cx).is_pending());
        assert!(matches!(
            read_once(io.as_mut(), &mut cx),
            Poll::Ready(Ok(0))
        ));
        assert_eq!(io.handle.close_reason(), None);
    }

    #[tokio::test]
    async fn no_linger_when_the_client_asked_to_close_after_a_request_without_a_body() {
        let (mut io, _client) = watched();
        drop(io.handle.start_request());
        io.handle.note_request_body(false);
        io.handle.close(CloseReason::ClientClosed);
        assert!(shutdown(&mut io).await < SHORT.quiet);
        // With a body, the rest of it may still be on its way: linger.
        let (mut io, _client) = watched();
        drop(io.handle.start_request());
        io.handle.note_request_body(true);
        io.handle.close(CloseReason::ClientClosed);
        assert!(shutdown(&mut io).await >= SHORT.quiet);
    }
}
