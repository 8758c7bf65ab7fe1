//! The serve path's HTTP connection: tells HTTP/1 from h2c by the connection preface, drives hyper's own
//! HTTP/1 and HTTP/2 connections, and lets an idle HTTP/1 connection hibernate.
//!
//! **Hibernation.** Between two requests an HTTP/1 connection has nothing worth keeping but its socket:
//! hyper's connection still holds its read and write buffers (8 KB each) and its state, 17 KB or so,
//! for as long as the idle timeout. Once the connection has been idle for
//! [`Serve::hibernate_after`](super::Serve::hibernate_after), its timer asks it to hibernate, and
//! [`HttpConnection`] ends hyper's connection without closing the socket (a graceful shutdown, whose
//! IO shutdown the connection's [`WatchedIo`](super::WatchedIo) skips while hibernating), takes back
//! the socket, the service and any bytes hyper had read but not parsed (a request head in progress,
//! which go in front of the next read), and drops the rest. It then waits for the socket to turn
//! readable, and builds a new hyper connection on it when the next request's first bytes come. nginx
//! frees an idle keep-alive connection's buffers the same way.
//!
//! The keep-alive lifecycle does not see the difference: the connection's handle (its request count,
//! idle stamp, close flags) lives on, the timer still looks at it, and a close decided meanwhile (idle
//! timeout, maximum age, drain, lame duck, the budget's shedding) shuts the socket down as hyper would
//! have. Only an HTTP/1 connection hyper reports done at once when told to close while idle is taken
//! apart; one that is not (hyper still draining a request body the handler left unread) simply closes
//! after that exchange, as the close it was told then says. HTTP/2 connections (their HPACK tables,
//! settings and flow-control windows are state) and upgraded connections never hibernate.

use std::future::Future;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::HttpService;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::lifecycle::{BoxError, Driven};
use super::ConnectionsShared;
use crate::{CloseReason, ConnectionHandle};

/// The HTTP/2 connection preface (RFC 9113 section 3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// How much a waiting connection reads at once when its first bytes come: a whole request head most of
/// the time, so that hyper parses it without another read. On the stack of the poll, never kept.
const FIRST_READ: usize = 1024;

/// How a new connection starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Start {
    /// HTTP/1.1 or h2c with prior knowledge, told apart by the preface.
    Detect,
    /// HTTP/1 (TLS with ALPN `http/1.1`, or none; a server that serves HTTP/1 only).
    Http1,
    /// HTTP/2 (TLS with ALPN `h2`; a server that serves HTTP/2 only).
    Http2,
}

/// What a waiting connection does with the first bytes it reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Next {
    /// Chooses the protocol from them.
    Detect,
    /// Starts hyper's HTTP/1 connection on them: a new connection's first request.
    Http1,
    /// The same, for a connection that hibernated: the next request.
    Resume,
}

/// The socket and the service of a connection with no hyper connection around them.
struct Parked<I, S> {
    io: Rewind<I>,
    service: S,
}

/// The IO hyper's connections take on the serve path (the connection's `WatchedIo`).
pub(super) trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}

impl<I: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for I {}

/// What hyper's HTTP/1 and HTTP/2 connections ask of the service and its bodies, named once.
pub(super) trait Service:
    HttpService<Incoming, ResBody = Self::Body, Future: Send + 'static> + Send + 'static
{
    type Body: http_body::Body<Data: Send, Error: Into<BoxError>> + Send + 'static;
}

impl<S, B> Service for S
where
    S: HttpService<Incoming, ResBody = B> + Send + 'static,
    S::Future: Send + 'static,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    type Body = B;
}

type Http1<I, S> = http1::UpgradeableConnection<TokioIo<Rewind<I>>, S>;
type Http2<I, S> = http2::Connection<TokioIo<Rewind<I>>, S, TokioExecutor>;

enum State<I, S>
where
    S: HttpService<Incoming>,
{
    /// Waiting for bytes: a new connection's first, or a hibernating connection's next request.
    Waiting(Parked<I, S>, Next),
    Http1(Pin<Box<Http1<I, S>>>),
    Http2(Pin<Box<Http2<I, S>>>),
    /// Told to close while waiting: shutting the socket down (with the IO's lingering close).
    Closing(Rewind<I>),
    Done,
}

/// One connection of the serve path, plain or TLS, as the lifecycle drives it: hyper's HTTP/1 or HTTP/2
/// connection, made once the first bytes tell which, and taken apart and made again around idle
/// periods of HTTP/1 (see the [module docs](self)).
pub(super) struct HttpConnection<I, S>
where
    S: HttpService<Incoming>,
{
    shared: Arc<ConnectionsShared>,
    handle: ConnectionHandle,
    state: State<I, S>,
    /// hyper's HTTP/1 connection was made since the lifecycle last asked, may hibernate from now on, or
    /// did not when asked to: its timer is to look again within the hibernation delay.
    http1_started: bool,
    /// The connection's request count when hyper's HTTP/1 connection was made: until a request has
    /// started on it, hyper is on its first head and cannot be taken apart.
    requests_at_start: u64,
    /// Asked to hibernate before its first request: may once that request has started.
    rearm: bool,
}

// Nothing of the connection is ever pinned in place: hyper's connections are boxed, the IO and the
// service are moved between states.
impl<I, S> Unpin for HttpConnection<I, S> where S: HttpService<Incoming> {}

impl<I, S> HttpConnection<I, S>
where
    S: HttpService<Incoming>,
{
    /// Takes the socket and the service out of a waiting connection (leaving it `Done` until the caller
    /// gives it its next state), counting a hibernating one awake.
    fn take_waiting(&mut self) -> Option<Parked<I, S>> {
        match std::mem::replace(&mut self.state, State::Done) {
            State::Waiting(parked, next) => {
                if next == Next::Resume {
                    self.handle.set_hibernating(false);
                    self.handle.config().stats.hibernating(false);
                }
                Some(parked)
            }
            other => {
                self.state = other;
                None
            }
        }
    }
}

impl<I, S> Drop for HttpConnection<I, S>
where
    S: HttpService<Incoming>,
{
    fn drop(&mut self) {
        if matches!(self.state, State::Waiting(_, Next::Resume)) {
            self.handle.config().stats.hibernating(false);
        }
    }
}

impl<I: Io, S: Service> HttpConnection<I, S> {
    /// A connection on `io` (the connection's [`WatchedIo`](super::WatchedIo)), serving `service`.
    pub(super) fn new(
        shared: Arc<ConnectionsShared>,
        handle: ConnectionHandle,
        io: I,
        service: S,
        start: Start,
    ) -> Self {
        let parked = Parked {
            io: Rewind::new(io),
            service,
        };
        let state = match start {
            Start::Detect => State::Waiting(parked, Next::Detect),
            Start::Http1 => State::Waiting(parked, Next::Http1),
            Start::Http2 => State::Http2(Box::pin(
                shared
                    .builder
                    .h2()
                    .serve_connection(TokioIo::new(parked.io), parked.service),
            )),
        };
        HttpConnection {
            shared,
            handle,
            state,
            http1_started: false,
            requests_at_start: 0,
            rearm: false,
        }
    }

    /// Makes hyper's HTTP/1 connection on what a waiting connection has read.
    fn start_http1(&mut self, parked: Parked<I, S>) {
        self.http1_started = true;
        self.requests_at_start = self.handle.requests();
        self.rearm = false;
        let conn = self
            .shared
            .builder
            .h1()
            .serve_connection(TokioIo::new(parked.io), parked.service)
            .with_upgrades();
        self.state = State::Http1(Box::pin(conn));
    }

    /// Takes hyper's idle HTTP/1 connection apart, keeping the socket, the service and the bytes read
    /// but not parsed. `Ready(None)` when it hibernated; `Pending` when hyper was not idle (it now closes
    /// after the exchange in progress); `Ready(Some(result))` when the connection ended.
    fn hibernate(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<(), BoxError>>> {
        let handle = &self.handle;
        let State::Http1(conn) = &mut self.state else {
            return Poll::Ready(None);
        };
        if handle.is_closing() {
            handle.set_hibernates(false);
            return Poll::Ready(None);
        }
        // hyper's connection is still on its first head (a new connection's, or the one that woke
        // it): told to close now, it would close after that request. It may once the request starts.
        if handle.requests() == self.requests_at_start {
            handle.set_hibernates(false);
            self.rearm = true;
            return Poll::Ready(None);
        }
        // A request began since the timer asked: it asks again once the connection is idle, and is
        // told to look again soon (it counted on this hibernation).
        if handle.idle_since().is_none() {
            self.http1_started = true;
            return Poll::Ready(None);
        }
        handle.set_hibernates(false);
        // hyper closes an idle connection at once when told to close, and shuts its IO down, which the
        // IO skips while this flag is up: the socket stays open.
        handle.set_parking(true);
        conn.as_mut().graceful_shutdown();
        let polled = conn.as_mut().poll(cx);
        handle.set_parking(false);
        match polled {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(err)) => return Poll::Ready(Some(Err(err.into()))),
            Poll::Pending => {
                // Still reading a request body the handler did not read (hyper drains it to reuse the
                // connection): keep-alive is off now, and it closes after that.
                tracing::debug!("idle connection busy in hyper; closing it instead of hibernating");
                handle.mark_closing(CloseReason::Idle);
                return Poll::Pending;
            }
        }
        let conn = match std::mem::replace(&mut self.state, State::Done) {
            State::Http1(conn) => conn,
            other => {
                self.state = other;
                return Poll::Ready(None);
            }
        };
        // `None`: upgraded in that poll, which an idle connection is not; it is over for HTTP.
        let Some(parts) = Pin::into_inner(conn).into_parts() else {
            return Poll::Ready(Some(Ok(())));
        };
        let mut io = parts.io.into_inner();
        // hyper's read buffer (8 KB) goes; what it held and had not parsed does not.
        io.unread(&parts.read_buf);
        drop(parts.read_buf);
        let parked = Parked {
            io,
            service: parts.service,
        };
        if holds_a_whole_head(&parked.io.prefix) {
            // A request hyper had read and not yet parsed (it yields to the runtime between pipelined
            // requests): no byte may be coming to wake the connection for it.
            self.start_http1(parked);
            return Poll::Ready(None);
        }
        self.state = State::Waiting(parked, Next::Resume);
        handle.set_hibernating(true);
        handle.config().stats.hibernating(true);
        tracing::trace!("connection hibernating");
        Poll::Ready(None)
    }
}

impl<I: Io, S: Service> Future for HttpConnection<I, S> {
    type Output = Result<(), BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        loop {
            match &mut this.state {
                State::Http1(conn) => {
                    if this.rearm && this.handle.requests() != this.requests_at_start {
                        this.rearm = false;
                        this.http1_started = true;
                    }
                    if this.handle.take_hibernation_request(cx.waker()) {
                        match ready!(this.hibernate(cx)) {
                            None => continue,
                            Some(result) => return Poll::Ready(result),
                        }
                    }
                    return conn.as_mut().poll(cx).map_err(Into::into);
                }
                State::Http2(conn) => return conn.as_mut().poll(cx).map_err(Into::into),
                State::Waiting(parked, next) => {
                    let next = *next;
                    let protocol = match ready!(read_start(parked, next, cx)) {
                        Ok(Some(protocol)) => protocol,
                        // The client closed (or reset) the connection between requests; with part of
                        // a head read, hyper says what it thinks of that.
                        Ok(None) if parked.io.prefix.is_empty() => {
                            if let Some(parked) = this.take_waiting() {
                                this.state = State::Closing(parked.io);
                            }
                            continue;
                        }
                        Ok(None) => Start::Http1,
                        Err(err) => return Poll::Ready(Err(err.into())),
                    };
                    let Some(parked) = this.take_waiting() else {
                        continue;
                    };
                    if next == Next::Resume {
                        tracing::trace!("hibernating connection woken");
                    }
                    if protocol == Start::Http2 {
                        this.state = State::Http2(Box::pin(
                            this.shared
                                .builder
                                .h2()
                                .serve_connection(TokioIo::new(parked.io), parked.service),
                        ));
                    } else {
                        this.start_http1(parked);
                    }
                }
                State::Closing(io) => {
                    ready!(Pin::new(io).poll_shutdown(cx))?;
                    this.state = State::Done;
                    return Poll::Ready(Ok(()));
                }
                State::Done => return Poll::Ready(Ok(())),
            }
        }
    }
}

impl<I: Io, S: Service> Driven for HttpConnection<I, S> {
    type Error = BoxError;

    fn shut_down_gracefully(self: Pin<&mut Self>) {
        let this = self.get_mut();
        match &mut this.state {
            State::Http1(conn) => conn.as_mut().graceful_shutdown(),
            State::Http2(conn) => conn.as_mut().graceful_shutdown(),
            // Part of a head read: hyper gets it, and closes after that request (or the lifecycle's
            // grace period ends a head that never completes), as for a head begun before the close.
            State::Waiting(parked, _) if !parked.io.prefix.is_empty() => {
                let Some(parked) = this.take_waiting() else {
                    return;
                };
                this.start_http1(parked);
                // Closing: not to hibernate.
                this.http1_started = false;
                if let State::Http1(conn) = &mut this.state {
                    conn.as_mut().graceful_shutdown();
                }
            }
            State::Waiting(..) => {
                if let Some(parked) = this.take_waiting() {
                    this.state = State::Closing(parked.io);
                }
            }
            State::Closing(_) | State::Done => {}
        }
    }

    fn take_http1_started(self: Pin<&mut Self>) -> bool {
        std::mem::take(&mut self.get_mut().http1_started)
    }
}

/// Whether `bytes` hold the end of a request head (RFC 9112 section 2.1: the empty line; hyper takes a
/// bare LF for a line end too).
fn holds_a_whole_head(bytes: &[u8]) -> bool {
    bytes.windows(2).any(|pair| pair == b"\n\n") || bytes.windows(3).any(|three| three == b"\n\r\n")
}

/// Reads a waiting connection's first bytes into its IO's rewind buffer, and says what they start
/// (`None`: the client closed first).
fn read_start<I: AsyncRead + Unpin, S>(
    parked: &mut Parked<I, S>,
    next: Next,
    cx: &mut Context<'_>,
) -> Poll<io::Result<Option<Start>>> {
    loop {
        let mut chunk = [MaybeUninit::<u8>::uninit(); FIRST_READ];
        let mut buf = ReadBuf::uninit(&mut chunk);
        ready!(Pin::new(&mut parked.io.inner).poll_read(cx, &mut buf))?;
        if buf.filled().is_empty() {
            return Poll::Ready(Ok(None));
        }
        parked.io.unread(buf.filled());
        if next != Next::Detect {
            return Poll::Ready(Ok(Some(Start::Http1)));
        }
        let seen = &parked.io.prefix[..];
        let n = seen.len().min(PREFACE.len());
        if seen[..n] != PREFACE[..n] {
            return Poll::Ready(Ok(Some(Start::Http1)));
        }
        if n == PREFACE.len() {
            return Poll::Ready(Ok(Some(Start::Http2)));
        }
        // The start of a preface, so far: read on.
    }
}

/// An IO with bytes put back in front of it: what was read to tell the protocol, or what hyper had read
/// and not parsed when its connection was taken apart.
pub(super) struct Rewind<I> {
    prefix: Bytes,
    inner: I,
}

impl<I> Rewind<I> {
    fn new(inner: I) -> Self {
        Rewind {
            prefix: Bytes::new(),
            inner,
        }
    }

    /// Puts `bytes` in front of what is still to be read.
    fn unread(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        self.prefix = if self.prefix.is_empty() {
            Bytes::copy_from_slice(bytes)
        } else {
            // Rare: a preface or head that came in pieces.
            let mut joined = Vec::with_capacity(self.prefix.len() + bytes.len());
            joined.extend_from_slice(&self.prefix);
            joined.extend_from_slice(bytes);
            Bytes::from(joined)
        };
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Rewind<I> {
    #[inline]
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            if self.prefix.is_empty() {
                // An empty `Bytes` still owns its buffer.
                self.prefix = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Rewind<I> {
    #[inline]
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    #[inline]
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    #[inline]
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    #[inline]
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    #[inline]
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `read_start` makes of `input` sent in pieces of `chunk` bytes, and the bytes it kept.
    async fn start_of(input: &'static [u8], chunk: usize) -> (Option<Start>, Vec<u8>) {
        let (mut client, server) = tokio::io::duplex(64);
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            for part in input.chunks(chunk) {
                let _ = client.write_all(part).await;
                let _ = client.flush().await;
                tokio::task::yield_now().await;
            }
        });
        let mut parked = Parked {
            io: Rewind::new(server),
            service: (),
        };
        let start = std::future::poll_fn(|cx| read_start(&mut parked, Next::Detect, cx))
            .await
            .unwrap();
        (start, parked.io.prefix.to_vec())
    }

    #[test]
    fn a_whole_head_is_told_from_part_of_one() {
        assert!(holds_a_whole_head(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"));
        assert!(holds_a_whole_head(b"GET / HTTP/1.1\nHost: x\n\nGET"));
        assert!(!holds_a_whole_head(b"GET / HTTP/1.1\r\nHost: x\r\n"));
        assert!(!holds_a_whole_head(b""));
    }

    #[tokio::test]
    async fn the_http2_preface_is_told_whole_or_in_pieces() {
        let input = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04";
        for chunk in [1, 5, 24, 64] {
            let (start, kept) = start_of(input, chunk).await;
            assert_eq!(start, Some(Start::Http2), "chunk {chunk}");
            // Nothing read is lost: hyper reads it first.
            assert!(input.starts_with(&kept) && kept.len() >= PREFACE.len());
        }
    }

    #[tokio::test]
    async fn http1_is_told_even_when_it_starts_like_the_preface() {
        for input in [&b"GET / HTTP/1.1\r\n\r\n"[..], b"PRI * HTTP/1.1\r\n\r\n"] {
            for chunk in [1, 3, 64] {
                let (start, kept) = start_of(input, chunk).await;
                assert_eq!(start, Some(Start::Http1), "chunk {chunk}");
                assert!(input.starts_with(&kept) && !kept.is_empty());
            }
        }
        // The client goes away after the start of a preface: what it sent is kept for hyper.
        assert_eq!(start_of(b"PR", 1).await, (None, b"PR".to_vec()));
    }
}
