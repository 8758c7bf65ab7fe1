//! Why a connection closed: [`CloseReason`].

use std::fmt;

/// Why a connection was, or is being, closed.
///
/// The first decision is final: once a reason is recorded for a connection, later ones are ignored, and
/// nothing turns a closing connection back into a persistent one.
///
/// # Example
///
/// ```
/// use tower_keepalive::{CloseReason, KeepAliveLayer};
///
/// let handle = KeepAliveLayer::new().connection();
/// assert_eq!(handle.close_reason(), None);
/// handle.close(CloseReason::Drain);
/// handle.close(CloseReason::Idle); // too late: drain was decided first
/// assert_eq!(handle.close_reason(), Some(CloseReason::Drain));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CloseReason {
    /// Nothing was in flight for longer than the idle timeout. Also the reason when keep-alive is off (a
    /// zero idle timeout) and nothing else closed the connection first.
    Idle,
    /// The connection served its maximum number of requests.
    MaxRequests,
    /// The connection reached its maximum age.
    MaxAge,
    /// The client asked to close (`Connection: close`, an HTTP/1.0 request without `keep-alive`), went
    /// away, or closed its sending side (a half-close: it is answered first, on the crate's serve paths).
    ClientClosed,
    /// The inner service asked to close (its response said `Connection: close`), or its response to an
    /// HTTP/1.0 client had no length known in advance, so only closing the connection can end it.
    Service,
    /// The server is shutting down: the drain, after the listener closed.
    Drain,
    /// The connection failed: an I/O or protocol error, or an error from the inner service.
    Error,
    /// The connection was upgraded (`101 Switching Protocols`, a WebSocket): HTTP is over on it and the
    /// upgraded protocol owns it from then on.
    Upgraded,
    /// The server was short of connections (above its soft connection limit): idle connections were
    /// closed early, longest idle first, to admit new clients.
    Pressure,
    /// The TLS handshake failed or did not finish within the handshake timeout (the serve path with
    /// feature `tls`): the connection never spoke HTTP.
    TlsHandshake,
    /// The server was in its lame-duck period ([`Serve::lame_duck`](crate::serve::Serve::lame_duck),
    /// [`KeepAliveListener::lame_duck`](crate::axum::KeepAliveListener::lame_duck)): shutting down, but
    /// still accepting and serving while the load balancer takes it out of rotation, and keeping no
    /// connection alive. Closes decided once the drain has begun say [`Drain`](Self::Drain).
    LameDuck,
    /// A request head took longer than the header timeout, counted from its first byte (from the
    /// accept, for a connection's first request): a slow or stalled client, maybe a slowloris attack
    /// (the serve path, [`Serve::header_timeout`](crate::serve::Serve::header_timeout)).
    HeaderTimeout,
    /// The client stopped taking the response: output was waiting to be written and nothing of it went
    /// out for the send timeout ([`KeepAliveLayer::send_timeout`](crate::KeepAliveLayer::send_timeout),
    /// nginx's `send_timeout`). The connection is dropped, not closed gracefully: a client that does
    /// not read would not read a close either.
    SendTimeout,
}

impl CloseReason {
    pub(crate) const COUNT: usize = 13;
    pub(crate) const ALL: [CloseReason; Self::COUNT] = [
        CloseReason::Idle,
        CloseReason::MaxRequests,
        CloseReason::MaxAge,
        CloseReason::ClientClosed,
        CloseReason::Service,
        CloseReason::Drain,
        CloseReason::Error,
        CloseReason::Upgraded,
        CloseReason::Pressure,
        CloseReason::TlsHandshake,
        CloseReason::LameDuck,
        CloseReason::HeaderTimeout,
        CloseReason::SendTimeout,
    ];

    /// A short lower-case name, stable for logs and metrics labels (`"idle"`, `"max_requests"`, ...).
    ///
    /// ```
    /// assert_eq!(tower_keepalive::CloseReason::MaxAge.as_str(), "max_age");
    /// ```
    pub const fn as_str(self) -> &'static str {
        match self {
            CloseReason::Idle => "idle",
            CloseReason::MaxRequests => "max_requests",
            CloseReason::MaxAge => "max_age",
            CloseReason::ClientClosed => "client_closed",
            CloseReason::Service => "service",
            CloseReason::Drain => "drain",
            CloseReason::Error => "error",
            CloseReason::Upgraded => "upgraded",
            CloseReason::Pressure => "pressure",
            CloseReason::TlsHandshake => "tls_handshake",
            CloseReason::LameDuck => "lame_duck",
            CloseReason::HeaderTimeout => "header_timeout",
            CloseReason::SendTimeout => "send_timeout",
        }
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }

    pub(crate) fn to_u8(self) -> u8 {
        // 0 is "open"; reasons are stored one past their index.
        self as u8 + 1
    }

    pub(crate) fn from_u8(value: u8) -> Option<Self> {
        Self::ALL.get(usize::from(value).checked_sub(1)?).copied()
    }
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
