use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderName;
use tower_layer::Layer;

use crate::config::Config;
use crate::stats::Stats;
use crate::{ConnectionHandle, KeepAlive};

/// Applies a server's keep-alive policy to every response, per connection.
///
/// See the [crate-level documentation](crate) for what goes over the wire.
///
/// Defaults: idle timeout 5 s (as Apache and Node.js), at most 1000 requests per connection (as nginx),
/// advertised with a `Keep-Alive` header, HTTP/1.0 keep-alive honoured, no maximum connection age.
///
/// # Example
///
/// ```
/// use std::time::Duration;
/// use http::{Request, Response};
/// use http_body_util::Full;
/// use bytes::Bytes;
/// use tower::{ServiceBuilder, ServiceExt};
/// use tower_keepalive::KeepAliveLayer;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), std::convert::Infallible> {
/// let layer = KeepAliveLayer::new()
///     .idle_timeout(Duration::from_secs(10))
///     .max_requests(100);
///
/// // One handle per accepted connection; bind it to that connection's service.
/// let handle = layer.connection();
/// let svc = ServiceBuilder::new()
///     .layer(layer.bind(handle.clone()))
///     .service_fn(|_req: Request<Full<Bytes>>| async {
///         Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from("hi"))))
///     });
///
/// let res = svc.oneshot(Request::new(Full::default())).await?;
/// assert_eq!(res.headers()["connection"], "keep-alive");
/// assert_eq!(res.headers()["keep-alive"], "timeout=10, max=99");
/// assert_eq!(handle.requests(), 1);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct KeepAliveLayer {
    pub(crate) config: Arc<Config>,
    pub(crate) handle: Option<ConnectionHandle>,
}

impl Default for KeepAliveLayer {
    fn default() -> Self {
        Self::new()
    }
}

/// The idle timeout behind a balancer whose own is `lb_idle`: a tenth more, at least 5 s more, rounded
/// up to whole seconds (the advert is whole seconds, rounded down: a fraction would be lost from it).
fn idle_behind(lb_idle: Duration) -> Duration {
    let margin = (lb_idle / 10).max(Duration::from_secs(5));
    let total = lb_idle.saturating_add(margin);
    let secs = total
        .as_secs()
        .saturating_add(u64::from(total.subsec_nanos() != 0));
    Duration::from_secs(secs)
}

impl KeepAliveLayer {
    /// The default policy: idle timeout 5 s, 1000 requests per connection, advertised.
    ///
    /// ```
    /// let layer = tower_keepalive::KeepAliveLayer::new();
    /// assert_eq!(layer.get_idle_timeout(), std::time::Duration::from_secs(5));
    /// assert_eq!(layer.get_max_requests(), Some(1000));
    /// ```
    pub fn new() -> Self {
        KeepAliveLayer {
            config: Arc::new(Config::default()),
            handle: None,
        }
    }

    /// A policy for a server behind a load balancer (or a reverse proxy) whose idle timeout towards its
    /// backends is `lb_idle`: the idle timeout is `lb_idle` plus a margin (a tenth of it, at least 5 s,
    /// in whole seconds), and requests per connection are unlimited. The maximum age stays as set (none
    /// by default).
    ///
    /// The rule: a backend keeps an idle connection open longer than the balancer in front of it. The
    /// balancer then always closes an idle connection first; the other way round, the balancer may send a
    /// request on a connection the backend is closing at that moment, and the client gets a 502 (the
    /// request was sent, so a non-idempotent one is not retried). With a 60 s balancer (AWS ALB, nginx
    /// upstream `keepalive_timeout`) the timeout is 66 s; with GCP's 600 s, 660 s. Node.js raised its
    /// default from 5 s to 65 s for this; nginx's own `keepalive_timeout` is 75 s.
    ///
    /// The crate's default idle timeout stays 5 s, for servers that clients reach directly: every idle
    /// connection holds memory and a file descriptor, and browsers keep connections open as long as
    /// they are allowed. Behind a balancer the few connections it keeps are worth keeping; use this.
    ///
    /// A balancer's connection carries many clients' requests, so no maximum number of requests closes
    /// it (a close on a response is safe, but makes the balancer reconnect for nothing).
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_keepalive::KeepAliveLayer;
    ///
    /// // AWS ALB's idle timeout is 60 s.
    /// let layer = KeepAliveLayer::behind_load_balancer(Duration::from_secs(60));
    /// assert_eq!(layer.get_idle_timeout(), Duration::from_secs(66));
    /// assert_eq!(layer.get_max_requests(), None);
    /// ```
    pub fn behind_load_balancer(lb_idle: Duration) -> Self {
        Self::new()
            .idle_timeout(idle_behind(lb_idle))
            .unlimited_requests()
    }

    /// The serve path's header timeout (`Serve::header_timeout`), carried by the policy so that every
    /// connection handle sees it.
    #[cfg(feature = "serve")]
    pub(crate) fn with_header_timeout(mut self, timeout: Option<std::time::Duration>) -> Self {
        if self.config.header_timeout != timeout {
            Arc::make_mut(&mut self.config).header_timeout = timeout;
        }
        self
    }

    /// The same policy with HTTP/1 hibernation after `after` idle (the serve path's setting).
    #[cfg(feature = "serve")]
    pub(crate) fn with_hibernation(mut self, after: Option<std::time::Duration>) -> Self {
        if self.config.hibernate_after != after {
            Arc::make_mut(&mut self.config).hibernate_after = after;
        }
        self
    }

    fn update(mut self, f: impl FnOnce(&mut Config)) -> Self {
        let config = Arc::make_mut(&mut self.config);
        f(config);
        config.policy_changed();
        self
    }

    /// How long a connection may stay idle (nothing in flight, every response body sent) before it is
    /// closed. Advertised in whole seconds, rounded down, so that the advertised value is never more
    /// than what is enforced: a timeout under one second advertises `timeout=0`, which tells clients not
    /// to reuse the connection. `Duration::ZERO` turns keep-alive off: every response says
    /// `Connection: close`.
    ///
    /// The layer advertises the timeout; closing idle connections is the job of whoever drives the
    /// connection (the crate's serve path, or your accept loop with the connection handle).
    ///
    /// ```
    /// use std::time::Duration;
    /// let layer = tower_keepalive::KeepAliveLayer::new().idle_timeout(Duration::from_secs(75));
    /// assert_eq!(layer.get_idle_timeout(), Duration::from_secs(75));
    /// ```
    pub fn idle_timeout(self, timeout: Duration) -> Self {
        self.update(|c| c.idle_timeout = timeout)
    }

    /// The most requests one connection serves (at least 1). The response to the last one says
    /// `Connection: close` (HTTP/1) or the connection gets GOAWAY after it (HTTP/2).
    ///
    /// On HTTP/2 the maximum holds whatever the client does: a stream opened past it (a client that
    /// ignores the GOAWAY, or never acknowledges the PING of hyper's graceful close, which keeps new
    /// streams coming until it does, or a well-behaved client whose stream was in transit when the
    /// GOAWAY went out) is refused without calling the inner service:
    ///
    /// - on the crate's serve paths ([`serve`](crate::serve()), and `axum::serve` with
    ///   [`KeepAliveListener`](crate::axum::KeepAliveListener)), the stream is reset with
    ///   `REFUSED_STREAM` (RFC 9113 section 8.7): the request was not processed, and clients retry it
    ///   on another connection by themselves. Under `axum::serve` the reset comes from the response
    ///   body (its services cannot fail): h2 drops the 503 head queued before it, but on a
    ///   multi-threaded runtime the connection's task may, rarely, write that head out first (the
    ///   client then reads a 503 whose body fails with `REFUSED_STREAM`), and a refused stream does not
    ///   keep the connection open: when the last allowed response is written first, the connection
    ///   may end (without GOAWAY, as everywhere on this path) before the stream's reset is sent;
    /// - with the layer alone (your own accept loop), the stream is answered `503 Service
    ///   Unavailable`, which clients do not retry by themselves: a tower service cannot make hyper
    ///   reset a stream with a chosen code.
    ///
    /// ```
    /// let layer = tower_keepalive::KeepAliveLayer::new().max_requests(100);
    /// assert_eq!(layer.get_max_requests(), Some(100));
    /// ```
    pub fn max_requests(self, max: u64) -> Self {
        self.update(|c| c.max_requests = Some(max.max(1)))
    }

    /// No limit on the requests one connection serves; `Keep-Alive` then carries no `max=`.
    ///
    /// ```
    /// let layer = tower_keepalive::KeepAliveLayer::new().unlimited_requests();
    /// assert_eq!(layer.get_max_requests(), None);
    /// ```
    pub fn unlimited_requests(self) -> Self {
        self.update(|c| c.max_requests = None)
    }

    /// Whether HTTP/1.x responses carry `Keep-Alive: timeout=T, max=R` (default `true`). `Connection`
    /// is written either way.
    ///
    /// ```
    /// let layer = tower_keepalive::KeepAliveLayer::new().advertise(false);
    /// ```
    pub fn advertise(self, advertise: bool) -> Self {
        self.update(|c| c.advertise = advertise)
    }

    /// Whether an HTTP/1.0 client that asks for `Connection: keep-alive` gets it (default `true`).
    /// HTTP/1.0 connections are persistent only on request (RFC 9112 section 9.3); with `false` they
    /// always close after one response.
    ///
    /// ```
    /// let layer = tower_keepalive::KeepAliveLayer::new().http10_keep_alive(false);
    /// ```
    pub fn http10_keep_alive(self, enabled: bool) -> Self {
        self.update(|c| c.http10 = enabled)
    }

    /// The most time one connection may live (off by default): this rebalances long-lived clients
    /// across instances behind a load balancer. Each connection's age is spread by the jitter
    /// ([`max_age_jitter`](Self::max_age_jitter)) so that connections opened together do not all
    /// reconnect together.
    ///
    /// The close is never a surprise to a client that trusts the advert. On HTTP/1:
    ///
    /// - as the maximum age nears, `Keep-Alive: timeout=` shrinks to the whole seconds left before it
    ///   (it is never more than the idle timeout, and never promises the connection past its age);
    /// - the first response planned with less than a second left says `Connection: close` instead, and
    ///   the connection closes after it (RFC 9112 section 9.6); so does the next response of a
    ///   connection still busy at its maximum age: a request in flight is never cut;
    /// - a connection idle at its maximum age is closed once the timeout its last response advertised
    ///   has run out, counted from the end of that response, never before: a request the client sends
    ///   meanwhile is answered (with `close`), not reset under it (RFC 9112 section 9.3.1: a client
    ///   may retry such a request only if it is idempotent). With [`advertise(false)`](Self::advertise)
    ///   the same timeout is kept, unsaid.
    ///
    /// So a connection may outlive its maximum age by the request in flight and up to one advertised
    /// timeout. HTTP/2 connections get GOAWAY at the maximum age, and the streams in flight finish.
    ///
    /// The layer decides what each response says; closing the idle connection is the job of whoever
    /// drives it (the crate's serve path, or your accept loop with the connection handle).
    ///
    /// ```
    /// use std::time::Duration;
    /// use bytes::Bytes;
    /// use http::{Request, Response};
    /// use http_body_util::Full;
    /// use tower::{ServiceBuilder, ServiceExt};
    /// use tower_keepalive::KeepAliveLayer;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), std::convert::Infallible> {
    /// let layer = KeepAliveLayer::new().max_age(Duration::from_secs(300));
    /// assert_eq!(layer.get_max_age(), Some(Duration::from_secs(300)));
    ///
    /// // A connection 3.9 s from its maximum age: 3 whole seconds left, so not the idle timeout's 5.
    /// let layer = layer.max_age(Duration::from_millis(3900)).max_age_jitter(0.0);
    /// let svc = ServiceBuilder::new()
    ///     .layer(layer.bind(layer.connection()))
    ///     .service_fn(|_req: Request<Full<Bytes>>| async {
    ///         Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from("hi"))))
    ///     });
    /// let res = svc.oneshot(Request::new(Full::default())).await?;
    /// assert_eq!(res.headers()["keep-alive"], "timeout=3, max=999");
    /// # Ok(())
    /// # }
    /// ```
    pub fn max_age(self, max_age: Duration) -> Self {
        self.update(|c| c.max_age = Some(max_age))
    }

    /// The spread of each connection's maximum age, as a fraction: `0.1` (the default, as gRPC) gives
    /// each connection an age uniformly spread in ±10 % of [`max_age`](Self::max_age). Clamped to
    /// `0.0..=1.0`.
    ///
    /// ```
    /// let layer = tower_keepalive::KeepAliveLayer::new().max_age_jitter(0.0);
    /// ```
    pub fn max_age_jitter(self, fraction: f64) -> Self {
        let fraction = if fraction.is_nan() {
            0.0
        } else {
            fraction.clamp(0.0, 1.0)
        };
        self.update(|c| c.max_age_jitter = fraction)
    }

    /// How long the streams still open at a connection's maximum age may run on (default: off, they
    /// run to their end, however long). Past [`max_age`](Self::max_age) and this grace period, a
    /// connection that still has a request in flight is closed hard: on HTTP/2, after the GOAWAY that
    /// the maximum age sent (RFC 9113 section 6.8), the streams left open see the connection end; on
    /// HTTP/1, a response still being sent is cut. gRPC's `MAX_CONNECTION_AGE_GRACE`: with a maximum age
    /// it makes long-lived streams (gRPC streaming calls, server-sent events) move to other backends,
    /// and bounds how long an old connection holds on. An idle connection is never cut by it.
    ///
    /// Carried out by whoever drives the connection: the serve path and
    /// [`ConnectionHandle::drive`](crate::ConnectionHandle::drive) (not the `axum::serve` path).
    ///
    /// ```
    /// use std::time::Duration;
    /// let layer = tower_keepalive::KeepAliveLayer::new()
    ///     .max_age(Duration::from_secs(30 * 60))
    ///     .max_age_grace(Duration::from_secs(30));
    /// assert_eq!(layer.get_max_age_grace(), Some(Duration::from_secs(30)));
    /// ```
    pub fn max_age_grace(self, grace: Duration) -> Self {
        self.update(|c| c.max_age_grace = Some(grace))
    }

    /// The send timeout (default 60 s, as nginx's `send_timeout`): the longest a connection may have
    /// output waiting to be written while none of it goes out. Past it the connection is dropped, with
    /// [`CloseReason::SendTimeout`](crate::CloseReason::SendTimeout): a client that requested a response
    /// and does not read it cannot hold its connection, and its slot in the server's budget, forever.
    /// Each write that makes progress starts the time again, so a slow client that keeps reading is
    /// never cut, however long the response.
    ///
    /// "Output waiting" is a response whose body has handed over a frame that was not yet taken, or the
    /// socket refusing a write: for HTTP/1, a response written to a client that does not read; for
    /// HTTP/2, streams stuck on a closed flow-control window (RFC 9113 section 5.2), whose bodies hyper
    /// does not poll at all while the window is shut. On HTTP/2, progress is a stalled body being
    /// polled again or a write that goes through a full socket: the PING and SETTINGS acknowledgements a
    /// client can make the server write do not count. Not seen: data of a body that has ended and sits in
    /// h2's buffers (a large body given as one frame); a connection closing with nothing else in flight
    /// gets the send timeout as its grace period for it.
    ///
    /// A stall counts from the write the socket refused (on HTTP/2 without a full socket, from when the
    /// connection's timer first sees the stalled body). The timer first looks at a busy connection at its
    /// idle deadline, then twice per send timeout: the cut comes at the send timeout, or at that first
    /// look if it is later (an idle timeout longer than the send timeout).
    ///
    /// Enforced by whoever drives the connection: both of the crate's serve paths, and
    /// [`ConnectionHandle::drive`](crate::ConnectionHandle::drive) with the IO wrapped in
    /// `serve::WatchedIo`. A setting of the policy rather than of the server for that reason: it travels
    /// with each connection's handle, as the idle timeout does.
    ///
    /// ```
    /// use std::time::Duration;
    /// let layer = tower_keepalive::KeepAliveLayer::new().send_timeout(Duration::from_secs(30));
    /// assert_eq!(layer.get_send_timeout(), Some(Duration::from_secs(30)));
    /// ```
    pub fn send_timeout(self, timeout: Duration) -> Self {
        self.update(|c| c.send_timeout = Some(timeout))
    }

    /// No send timeout: a client that does not read its response keeps the connection until something
    /// else closes it (not recommended on a public server).
    ///
    /// ```
    /// let layer = tower_keepalive::KeepAliveLayer::new().no_send_timeout();
    /// assert_eq!(layer.get_send_timeout(), None);
    /// ```
    pub fn no_send_timeout(self) -> Self {
        self.update(|c| c.send_timeout = None)
    }

    /// The send timeout, `None` when off (see [`send_timeout`](Self::send_timeout)).
    ///
    /// ```
    /// use std::time::Duration;
    /// let layer = tower_keepalive::KeepAliveLayer::new();
    /// assert_eq!(layer.get_send_timeout(), Some(Duration::from_secs(60)));
    /// ```
    pub fn get_send_timeout(&self) -> Option<Duration> {
        self.config.send_timeout
    }

    /// Whether to remove the hop-by-hop fields of each request before the inner service sees it (default
    /// `false`): for proxies, which must not forward them (RFC 9110 section 7.6.1). Removed: every field
    /// named in `Connection`, then `Connection`, `Keep-Alive`, `Proxy-Connection`, `TE`,
    /// `Transfer-Encoding`, `Upgrade` and `Proxy-Authorization`; this happens before anything the inner
    /// service adds, such as `X-Forwarded-For`.
    ///
    /// A client cannot get a protected field removed by naming it in `Connection`; see
    /// [`protect_request_fields`](Self::protect_request_fields) for the list.
    ///
    /// ```
    /// let layer = tower_keepalive::KeepAliveLayer::new().strip_request_hop_by_hop(true);
    /// ```
    pub fn strip_request_hop_by_hop(self, strip: bool) -> Self {
        self.update(|c| c.strip_request = strip)
    }

    /// Replaces the request fields that hop-by-hop stripping never removes. The default list protects what
    /// an app bases trust decisions on: `Host`, `Authorization`, `Cookie`, `Content-Length`,
    /// `Content-Type`, `Content-Encoding`, `Forwarded`, `X-Forwarded-For`, `X-Forwarded-Host`,
    /// `X-Forwarded-Proto`, `X-Forwarded-Port`, `X-Real-IP` and `Via`. Apache's CVE-2022-31813 and Go's
    /// CVE-2021-33197 came from letting a client's `Connection` remove such fields.
    ///
    /// ```
    /// use http::header::{HeaderName, AUTHORIZATION, COOKIE, HOST};
    ///
    /// let layer = tower_keepalive::KeepAliveLayer::new()
    ///     .strip_request_hop_by_hop(true)
    ///     .protect_request_fields([HOST, AUTHORIZATION, COOKIE, HeaderName::from_static("x-tenant")]);
    /// assert_eq!(layer.get_protected_request_fields().len(), 4);
    /// ```
    pub fn protect_request_fields(self, fields: impl IntoIterator<Item = HeaderName>) -> Self {
        let fields: Arc<[HeaderName]> = fields.into_iter().collect();
        self.update(|c| c.protected = fields)
    }

    /// The request fields that hop-by-hop stripping never removes.
    ///
    /// ```
    /// let layer = tower_keepalive::KeepAliveLayer::new();
    /// assert!(layer.get_protected_request_fields().contains(&http::header::HOST));
    /// ```
    pub fn get_protected_request_fields(&self) -> &[HeaderName] {
        &self.config.protected
    }

    /// The idle timeout.
    ///
    /// ```
    /// assert_eq!(tower_keepalive::KeepAliveLayer::new().get_idle_timeout().as_secs(), 5);
    /// ```
    pub fn get_idle_timeout(&self) -> Duration {
        self.config.idle_timeout
    }

    /// The maximum requests per connection, `None` when unlimited.
    ///
    /// ```
    /// assert_eq!(tower_keepalive::KeepAliveLayer::new().get_max_requests(), Some(1000));
    /// ```
    pub fn get_max_requests(&self) -> Option<u64> {
        self.config.max_requests
    }

    /// The maximum connection age before jitter, `None` when unlimited.
    ///
    /// ```
    /// assert_eq!(tower_keepalive::KeepAliveLayer::new().get_max_age(), None);
    /// ```
    pub fn get_max_age(&self) -> Option<Duration> {
        self.config.max_age
    }

    /// The grace period after the maximum age, `None` when off (see
    /// [`max_age_grace`](Self::max_age_grace)).
    ///
    /// ```
    /// assert_eq!(tower_keepalive::KeepAliveLayer::new().get_max_age_grace(), None);
    /// ```
    pub fn get_max_age_grace(&self) -> Option<Duration> {
        self.config.max_age_grace
    }

    /// The counters of every connection made from this layer: connections open and idle, requests in
    /// flight and served, closes by reason, requests per connection. See [`Stats`].
    ///
    /// The counters, like the server's connection pressure and drain state, belong to the layer value
    /// and are shared by its clones and by layers derived from it with builder methods: use one layer
    /// per server.
    ///
    /// ```
    /// let layer = tower_keepalive::KeepAliveLayer::new();
    /// let stats = layer.stats();
    /// let _conn = layer.connection();
    /// assert_eq!(stats.snapshot().connections_open(), 1);
    /// ```
    pub fn stats(&self) -> Stats {
        Stats {
            counters: self.config.stats.clone(),
            control: self.config.control.clone(),
        }
    }

    /// Creates the state of one new connection. Call it once per accepted connection, then bind the
    /// handle to that connection's service ([`bind`](Self::bind)) or insert it into its requests'
    /// extensions.
    ///
    /// ```
    /// let layer = tower_keepalive::KeepAliveLayer::new();
    /// let a = layer.connection();
    /// let b = layer.connection();
    /// // Two connections, two separate counts.
    /// assert_eq!(a.requests() + b.requests(), 0);
    /// ```
    pub fn connection(&self) -> ConnectionHandle {
        ConnectionHandle::new(self.config.clone())
    }

    /// This layer bound to one connection: the services it makes use `handle` for every request, with no
    /// lookup in request extensions. The handle's own policy (from the layer that made it) applies.
    ///
    /// ```
    /// let layer = tower_keepalive::KeepAliveLayer::new();
    /// let handle = layer.connection();
    /// let per_connection = layer.bind(handle);
    /// ```
    pub fn bind(&self, handle: ConnectionHandle) -> Self {
        KeepAliveLayer {
            config: handle.shared.config.clone(),
            handle: Some(handle),
        }
    }
}

impl fmt::Debug for KeepAliveLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeepAliveLayer")
            .field("config", &self.config)
            .field("bound", &self.handle.is_some())
            .finish()
    }
}

impl<S> Layer<S> for KeepAliveLayer {
    type Service = KeepAlive<S>;

    fn layer(&self, inner: S) -> Self::Service {
        KeepAlive::from_layer(inner, self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn behind_a_balancer_the_idle_timeout_outlasts_the_balancers() {
        let secs = |s| Duration::from_secs(s);
        for (lb, ours) in [
            (0, 5),
            (10, 15),
            (60, 66),
            (350, 385),
            (600, 660),
            (3600, 3960),
        ] {
            let layer = KeepAliveLayer::behind_load_balancer(secs(lb));
            assert_eq!(layer.get_idle_timeout(), secs(ours), "behind {lb} s");
            assert_eq!(layer.get_max_requests(), None);
            assert_eq!(layer.get_max_age(), None);
        }
        // A fraction of a second is rounded up: what is advertised (whole seconds, rounded down)
        // stays above the balancer's timeout.
        let layer = KeepAliveLayer::behind_load_balancer(Duration::from_millis(60_500));
        assert_eq!(layer.get_idle_timeout(), secs(67));
        assert_eq!(layer.config.advert(None).unwrap().value(), "timeout=67");
        // The maximum age is kept when set afterwards, and builder methods still apply.
        let layer = KeepAliveLayer::behind_load_balancer(secs(60)).max_age(secs(600));
        assert_eq!(layer.get_max_age(), Some(secs(600)));
        assert_eq!(layer.get_idle_timeout(), secs(66));
        // Saturates instead of overflowing.
        assert!(KeepAliveLayer::behind_load_balancer(Duration::MAX).get_idle_timeout() >= secs(1));
    }

    #[test]
    fn builder_changes_reset_the_table() {
        let layer = KeepAliveLayer::new().max_requests(3);
        assert_eq!(
            layer.config.advert(Some(2)).unwrap().value(),
            "timeout=5, max=2"
        );
        let layer = layer.idle_timeout(Duration::from_secs(9));
        assert_eq!(
            layer.config.advert(Some(2)).unwrap().value(),
            "timeout=9, max=2"
        );
    }

    #[test]
    fn max_requests_is_at_least_one_and_jitter_is_clamped() {
        let layer = KeepAliveLayer::new()
            .max_requests(0)
            .max_age_jitter(f64::NAN);
        assert_eq!(layer.get_max_requests(), Some(1));
        assert_eq!(layer.config.max_age_jitter, 0.0);
        let layer = layer.max_age_jitter(5.0);
        assert_eq!(layer.config.max_age_jitter, 1.0);
    }
}
