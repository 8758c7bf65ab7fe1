//! The policy: what a [`KeepAliveLayer`](crate::KeepAliveLayer) was configured with, shared by its
//! clones and every connection handle made from it, and the `Keep-Alive` values it advertises.

use std::fmt;
use std::io::Write;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue};

use crate::control::{Control, PRESSURE_STEPS};
use crate::stats::Counters;
use crate::KeepAliveHeader;

/// The policy, shared by a layer, its clones and the connection handles made from it.
#[derive(Clone)]
pub(crate) struct Config {
    pub(crate) idle_timeout: Duration,
    pub(crate) max_requests: Option<u64>,
    pub(crate) advertise: bool,
    pub(crate) http10: bool,
    pub(crate) max_age: Option<Duration>,
    pub(crate) max_age_jitter: f64,
    pub(crate) max_age_grace: Option<Duration>,
    pub(crate) strip_request: bool,
    pub(crate) protected: Arc<[HeaderName]>,
    pub(crate) stats: Arc<Counters>,
    /// The server's pressure and shutdown phase, set by the serve paths.
    pub(crate) control: Arc<Control>,
    /// The longest a request head may take (serve path only, `Serve::header_timeout`); `None` for a
    /// layer used on its own, which sees no reads.
    pub(crate) header_timeout: Option<Duration>,
    /// How long output may wait with nothing of it going out before the connection is dropped
    /// (`KeepAliveLayer::send_timeout`); `None`: no limit.
    pub(crate) send_timeout: Option<Duration>,
    /// How long an HTTP/1 connection stays idle before it hibernates (serve path only,
    /// `Serve::hibernate_after`); `None`: never.
    pub(crate) hibernate_after: Option<Duration>,
    adverts: OnceLock<&'static [HeaderValue]>,
}

/// nginx's `send_timeout`.
pub(crate) const DEFAULT_SEND_TIMEOUT: Duration = Duration::from_secs(60);

/// The fields a request's `Connection` may not get removed by default: an attacker who could strip them
/// on the way to the app could get around its trust decisions (Apache CVE-2022-31813 dropped
/// `X-Forwarded-*` this way, Go CVE-2021-33197 any field).
pub(crate) const PROTECTED_REQUEST_FIELDS: [&str; 13] = [
    "host",
    "authorization",
    "cookie",
    "content-length",
    "content-type",
    "content-encoding",
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-forwarded-port",
    "x-real-ip",
    "via",
];

impl Default for Config {
    /// Idle timeout 5 s (as Apache and Node.js), 1000 requests per connection (as nginx), advertised,
    /// HTTP/1.0 keep-alive honoured, no maximum age (±10 % jitter once one is set), a 60 s send timeout.
    fn default() -> Self {
        Config {
            idle_timeout: Duration::from_secs(5),
            max_requests: Some(1000),
            advertise: true,
            http10: true,
            max_age: None,
            max_age_jitter: 0.1,
            max_age_grace: None,
            strip_request: false,
            protected: PROTECTED_REQUEST_FIELDS
                .iter()
                .map(|name| HeaderName::from_static(name))
                .collect(),
            stats: Arc::default(),
            control: Arc::default(),
            header_timeout: None,
            send_timeout: Some(DEFAULT_SEND_TIMEOUT),
            hibernate_after: None,
            adverts: OnceLock::new(),
        }
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
            .field("max_age_grace", &self.max_age_grace)
            .field("strip_request", &self.strip_request)
            .field("header_timeout", &self.header_timeout)
            .field("send_timeout", &self.send_timeout)
            .field("hibernate_after", &self.hibernate_after)
            .finish_non_exhaustive()
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
    /// The policy was changed: the advert table is built anew for it when next needed.
    pub(crate) fn policy_changed(&mut self) {
        self.adverts = OnceLock::new();
    }

    pub(crate) fn keep_alive_enabled(&self) -> bool {
        !self.idle_timeout.is_zero()
    }

    /// The idle timeout in force now: shortened in proportion to the server's connection pressure.
    #[cfg_attr(not(feature = "serve"), allow(dead_code))]
    pub(crate) fn effective_idle_timeout(&self) -> Duration {
        scaled_timeout(self.idle_timeout, self.control.pressure())
    }

    /// The header timeout in force now, if there is one: shortened under connection pressure as the
    /// idle timeout is.
    #[cfg_attr(not(feature = "serve"), allow(dead_code))]
    pub(crate) fn effective_header_timeout(&self) -> Option<Duration> {
        let timeout = self.header_timeout?;
        Some(scaled_timeout(timeout, self.control.pressure()))
    }

    /// The `Keep-Alive` value for a response after which the connection accepts `remaining` more
    /// requests (`None`: unlimited).
    pub(crate) fn advert(&self, remaining: Option<u64>) -> Option<Advert> {
        let pressure = self.control.pressure();
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
        let pressure = self.control.pressure();
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
    use crate::KeepAliveLayer;

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
        c.control.set_pressure(8);
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
}
