use std::fmt;
use std::io::Write;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue};
use tower_layer::Layer;

use crate::stats::{Counters, Stats, PRESSURE_STEPS};
use crate::{ConnectionHandle, KeepAlive, KeepAliveHeader};

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

/// The policy, shared by a layer, its clones and the connection handles made from it.
#[derive(Clone)]
pub(crate) struct Config {
    pub(crate) idle_timeout: Duration,
    pub(crate) max_requests: Option<u64>,
    pub(crate) advertise: bool,
    pub(crate) http10: bool,
    pub(crate) max_age: Option<Duration>,
    pub(crate) max_age_jitter: f64,
    pub(crate) strip_request: bool,
    pub(crate) protected: Arc<[HeaderName]>,
    pub(crate) stats: Arc<Counters>,
    adverts: OnceLock<&'static [HeaderValue]>,
}

impl Default for KeepAliveLayer {
    fn default() -> Self {
        Self::new()
    }
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
            config: Arc::new(Config {
                idle_timeout: Duration::from_secs(5),
                max_requests: Some(1000),
                advertise: true,
                http10: true,
                max_age: None,
                max_age_jitter: 0.1,
                strip_request: false,
                protected: crate::policy::PROTECTED_REQUEST_FIELDS
                    .iter()
                    .map(|name| HeaderName::from_static(name))
                    .collect(),
                stats: Arc::default(),
                adverts: OnceLock::new(),
            }),
            handle: None,
        }
    }

    fn update(mut self, f: impl FnOnce(&mut Config)) -> Self {
        let config = Arc::make_mut(&mut self.config);
        f(config);
        config.adverts = OnceLock::new();
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

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("idle_timeout", &self.idle_timeout)
            .field("max_requests", &self.max_requests)
            .field("advertise", &self.advertise)
            .field("http10", &self.http10)
            .field("max_age", &self.max_age)
            .field("max_age_jitter", &self.max_age_jitter)
            .field("strip_request", &self.strip_request)
            .finish_non_exhaustive()
    }
}

impl<S> Layer<S> for KeepAliveLayer {
    type Service = KeepAlive<S>;

    fn layer(&self, inner: S) -> Self::Service {
        KeepAlive::from_layer(inner, self)
    }
}

/// The `Keep-Alive` values for the last [`ADVERT_TABLE`] counts of a connection under one policy:
/// `values[r]` is the value for `max=r` (for an unlimited policy, the one value). Built the first time a
/// policy is used, formatted once into one leaked buffer, and kept for the process's lifetime (about 60
/// bytes a value: 60 KB for the default 1000, at most 250 KB), so that a response takes its value by
/// copying a pointer: no allocation, no reference count shared by every connection on every core.
fn interned_adverts(timeout_secs: u64, max: Option<u64>) -> &'static [HeaderValue] {
    type Key = (u64, Option<u64>);
    static TABLES: std::sync::Mutex<Vec<(Key, &'static [HeaderValue])>> =
        std::sync::Mutex::new(Vec::new());
    let key = (timeout_secs, max.map(|m| m.min(ADVERT_TABLE)));
    // A poisoned lock still holds consistent data: entries are only ever pushed whole.
    let mut tables = TABLES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, adverts)) = tables.iter().find(|(k, _)| *k == key) {
        return adverts;
    }
    let mut buf = Vec::new();
    let mut ends = Vec::new();
    let timeout = Duration::from_secs(timeout_secs);
    let mut push = |remaining: Option<u64>| {
        // Writing into a Vec cannot fail.
        let _ = write!(buf, "{}", advert_header(timeout, remaining));
        ends.push(buf.len());
    };
    match key.1 {
        None => push(None),
        Some(max) => (0..max).for_each(|r| push(Some(r))),
    }
    let buf: &'static [u8] = Vec::leak(buf);
    let mut start = 0;
    let values: Vec<HeaderValue> = ends
        .into_iter()
        .map(|end| {
            let value = HeaderValue::from_maybe_shared(Bytes::from_static(&buf[start..end]));
            start = end;
            // Formatted from digits and ASCII punctuation: always a valid value.
            value.unwrap_or(HeaderValue::from_static(""))
        })
        .collect();
    let adverts: &'static [HeaderValue] = Vec::leak(values);
    tables.push((key, adverts));
    adverts
}

const ADVERT_TABLE: u64 = 4096;

impl Config {
    pub(crate) fn keep_alive_enabled(&self) -> bool {
        !self.idle_timeout.is_zero()
    }

    /// The idle timeout in force now: shortened in proportion to the server's connection pressure.
    pub(crate) fn effective_idle_timeout(&self) -> Duration {
        scaled_timeout(self.idle_timeout, self.stats.pressure())
    }

    /// The `Keep-Alive` value for a response after which the connection accepts `remaining` more
    /// requests (`None`: unlimited).
    pub(crate) fn advert(&self, remaining: Option<u64>) -> Option<Advert> {
        let pressure = self.stats.pressure();
        if pressure > 0 {
            // Under pressure the advertised timeout shrinks with the enforced one; rare, so formatted.
            let timeout = scaled_timeout(self.idle_timeout, pressure);
            return Some(Advert::format(timeout, remaining));
        }
        self.table_advert(remaining)
    }

    /// For a response on a connection whose maximum age is `left` away: the timeout it promises, in
    /// whole seconds, and its `Keep-Alive` value (`None` when not advertised). The timeout is the one
    /// [`advert`](Self::advert) gives, cut to the whole seconds left, so that a client that trusts it
    /// never reuses the connection past its maximum age. `None` when less than a second is left: the
    /// response must say `close` instead.
    pub(crate) fn advert_within(
        &self,
        remaining: Option<u64>,
        left: Duration,
    ) -> Option<(u64, Option<Advert>)> {
        let pressure = self.stats.pressure();
        let timeout = scaled_timeout(self.idle_timeout, pressure);
        let secs = timeout_within(timeout, left)?;
        let advert = if !self.advertise {
            None
        } else if pressure == 0 && secs == timeout.as_secs() {
            self.table_advert(remaining)
        } else {
            // Cut short by the maximum age: only in the last idle timeout of a connection's life.
            Some(Advert::format(Duration::from_secs(secs), remaining))
        };
        Some((secs, advert))
    }

    /// The `Keep-Alive` value for the configured timeout, from the interned table where it has one.
    #[inline]
    fn table_advert(&self, remaining: Option<u64>) -> Option<Advert> {
        let adverts = *self
            .adverts
            .get_or_init(|| interned_adverts(self.idle_timeout.as_secs(), self.max_requests));
        let index = match (remaining, self.max_requests) {
            (None, None) => 0,
            (Some(r), Some(_)) if r < adverts.len() as u64 => r as usize,
            // Beyond the table, or no count to go with a limit (no handle): formatted on the spot.
            _ => return Some(Advert::format(self.idle_timeout, remaining)),
        };
        adverts.get(index).map(Advert::Table)
    }
}

/// A `Keep-Alive` value decided with the request: from the interned table, or formatted when the
/// response is written. Small, so that the response future carrying it stays small.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Advert {
    Table(&'static HeaderValue),
    /// `remaining`: `u64::MAX` for no maximum (a remaining count is always below it).
    Format {
        timeout_secs: u64,
        remaining: u64,
    },
}

impl Advert {
    fn format(timeout: Duration, remaining: Option<u64>) -> Self {
        // Advertised in whole seconds: the formatted value floors the timeout anyway.
        Advert::Format {
            timeout_secs: timeout.as_secs(),
            remaining: remaining.unwrap_or(u64::MAX),
        }
    }

    pub(crate) fn value(self) -> HeaderValue {
        match self {
            Advert::Table(value) => value.clone(),
            Advert::Format {
                timeout_secs,
                remaining,
            } => advert_header(
                Duration::from_secs(timeout_secs),
                (remaining != u64::MAX).then_some(remaining),
            )
            .to_header_value(),
        }
    }
}

/// The `timeout=` of a response planned `left` before its connection's maximum age, under the idle
/// timeout `timeout`: whole seconds rounded down, never more than are left; `None` when less than one
/// second is left, where `timeout=0` would tell the client only that it must not reuse the connection.
fn timeout_within(timeout: Duration, left: Duration) -> Option<u64> {
    let left = left.as_secs();
    (left > 0).then(|| timeout.as_secs().min(left))
}

/// `timeout` shortened by `pressure` steps out of [`PRESSURE_STEPS`]. Never below one step: at the hard
/// limit a connection idle for a sixteenth of the timeout yields, one that has just been answered does
/// not (its client may be sending the next request right now).
pub(crate) fn scaled_timeout(timeout: Duration, pressure: u32) -> Duration {
    let left = PRESSURE_STEPS.saturating_sub(pressure).max(1);
    timeout * left / PRESSURE_STEPS
}

fn advert_header(timeout: Duration, remaining: Option<u64>) -> KeepAliveHeader {
    let header = KeepAliveHeader::new().with_timeout(timeout);
    match remaining {
        Some(r) => header.with_max(r),
        None => header,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adverts_come_from_the_table_and_beyond_it() {
        let layer = KeepAliveLayer::new()
            .idle_timeout(Duration::from_millis(7900))
            .max_requests(10_000);
        let c = &layer.config;
        assert_eq!(c.advert(Some(0)).unwrap().value(), "timeout=7, max=0");
        assert_eq!(c.advert(Some(1)).unwrap().value(), "timeout=7, max=1");
        assert_eq!(c.advert(Some(4095)).unwrap().value(), "timeout=7, max=4095");
        assert_eq!(c.advert(Some(4096)).unwrap().value(), "timeout=7, max=4096");
        assert_eq!(c.advert(Some(9999)).unwrap().value(), "timeout=7, max=9999");

        let unlimited = KeepAliveLayer::new()
            .idle_timeout(Duration::from_millis(300))
            .unlimited_requests();
        assert_eq!(unlimited.config.advert(None).unwrap().value(), "timeout=0");
    }

    #[test]
    fn the_advertised_timeout_never_outlasts_the_maximum_age() {
        let t = Duration::from_millis(2500);
        // Far from the maximum age: the idle timeout, floored.
        assert_eq!(timeout_within(t, Duration::from_secs(60)), Some(2));
        assert_eq!(timeout_within(t, Duration::from_millis(2000)), Some(2));
        // Closer: the whole seconds left.
        assert_eq!(timeout_within(t, Duration::from_millis(1999)), Some(1));
        assert_eq!(timeout_within(t, Duration::from_millis(1000)), Some(1));
        // Under a second left: no advert, the response says `close`.
        assert_eq!(timeout_within(t, Duration::from_millis(999)), None);
        assert_eq!(timeout_within(t, Duration::ZERO), None);
        // A sub-second idle timeout advertises `timeout=0` as it always does.
        assert_eq!(
            timeout_within(Duration::from_millis(500), Duration::from_secs(9)),
            Some(0)
        );
    }

    #[test]
    fn adverts_within_a_maximum_age_come_from_the_table_until_cut_short() {
        let layer = KeepAliveLayer::new()
            .idle_timeout(Duration::from_secs(5))
            .max_requests(10);
        let c = &layer.config;
        let (secs, advert) = c.advert_within(Some(3), Duration::from_secs(30)).unwrap();
        assert_eq!(secs, 5);
        assert!(matches!(advert, Some(Advert::Table(_))), "{advert:?}");
        assert_eq!(advert.unwrap().value(), "timeout=5, max=3");

        let (secs, advert) = c
            .advert_within(Some(3), Duration::from_millis(3900))
            .unwrap();
        assert_eq!(secs, 3);
        assert!(matches!(advert, Some(Advert::Format { .. })), "{advert:?}");
        assert_eq!(advert.unwrap().value(), "timeout=3, max=3");

        assert!(c
            .advert_within(Some(3), Duration::from_millis(900))
            .is_none());

        // Not advertised: the promise is still what the response would have said.
        let quiet = layer.advertise(false);
        let (secs, advert) = quiet
            .config
            .advert_within(Some(3), Duration::from_millis(1500))
            .unwrap();
        assert_eq!((secs, advert.is_none()), (1, true));
    }

    #[test]
    fn adverts_within_a_maximum_age_shrink_with_pressure_too() {
        let layer = KeepAliveLayer::new()
            .idle_timeout(Duration::from_secs(16))
            .unlimited_requests();
        let c = &layer.config;
        c.stats.set_pressure(8);
        let (secs, advert) = c.advert_within(None, Duration::from_secs(60)).unwrap();
        assert_eq!(secs, 8);
        assert_eq!(advert.unwrap().value(), "timeout=8");
        let (secs, advert) = c.advert_within(None, Duration::from_millis(6500)).unwrap();
        assert_eq!(secs, 6);
        assert_eq!(advert.unwrap().value(), "timeout=6");
    }

    #[test]
    fn pressure_shrinks_the_timeout_to_a_sixteenth() {
        let t = Duration::from_secs(16);
        assert_eq!(scaled_timeout(t, 0), t);
        assert_eq!(scaled_timeout(t, 8), Duration::from_secs(8));
        assert_eq!(scaled_timeout(t, 15), Duration::from_secs(1));
        assert_eq!(scaled_timeout(t, 16), Duration::from_secs(1));
        assert_eq!(scaled_timeout(t, 99), Duration::from_secs(1));
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
