//! Connection metrics through the [`metrics`](https://docs.rs/metrics) facade (feature `metrics`).
//!
//! With the feature on, every connection made from a [`KeepAliveLayer`] (on the serve path, the
//! `axum::serve` path or your own accept loop) records to whatever recorder the process installed:
//! `metrics-exporter-prometheus`, an OpenTelemetry bridge, or none (then each call is a no-op). They
//! are recorded at connection events only (accepted, closed, queued or shed at the connection budget's
//! hard limit), never per request: the requests of a connection are read from its handle when it
//! closes. Without the feature none of this is compiled in.
//!
//! # Names
//!
//! The names are OpenTelemetry's semantic conventions for HTTP servers (as for Kestrel's
//! `kestrel.active_connections`, `kestrel.connection.duration`, `kestrel.queued_connections`), in the
//! form OpenTelemetry gives them in Prometheus: `tower_keepalive_` in place of `kestrel.`, the unit as a
//! suffix (`_seconds`), and `_total` on counters. They are written that way in the facade itself, since
//! `metrics-exporter-prometheus` appends no suffix of its own and replaces dots with underscores
//! anyway; label names are plain words for the same reason.
//!
//! | Name | Type | Unit | Labels | What it counts |
//! |---|---|---|---|---|
//! | `tower_keepalive_active_connections` | gauge | connections | | Connections open now: up at accept, down at close. |
//! | `tower_keepalive_connection_duration_seconds` | histogram | seconds | `reason`, `protocol` | How long each closed connection was open, from accept to close. |
//! | `tower_keepalive_connection_requests` | histogram | requests | `protocol` | Requests each closed connection served. |
//! | `tower_keepalive_closed_connections_total` | counter | connections | `reason`, `protocol` | Connections closed. TLS handshake failures are those with `reason="tls_handshake"`. |
//! | `tower_keepalive_queued_connections_total` | counter | connections | | Connections accepted at the budget's hard limit ([`Serve::connection_limits`]), which waited for room before being served. |
//! | `tower_keepalive_shed_connections_total` | counter | connections | | Idle connections closed at the hard limit to make room for a new one (they count in `closed_connections_total` with `reason="pressure"` too). |
//! | `tower_keepalive_idle_connections` | gauge | connections | | Open connections with nothing in flight; set by [`record_snapshot`]. |
//! | `tower_keepalive_hibernating_connections` | gauge | connections | | Idle HTTP/1 connections hibernating (holding their socket and little else, [`Serve::hibernate_after`](crate::serve::Serve::hibernate_after)); set by [`record_snapshot`]. |
//! | `tower_keepalive_active_requests` | gauge | requests | | Requests whose response is not fully sent yet; set by [`record_snapshot`]. |
//! | `tower_keepalive_connection_pressure` | gauge | ratio | | How short of connections the server is, `0` to `1`; set by [`record_snapshot`]. |
//!
//! Labels:
//!
//! - `reason`: the connection's [`CloseReason`], as [`CloseReason::as_str`] gives it (`idle`,
//!   `max_requests`, `max_age`, `client_closed`, `service`, `drain`, `error`, `upgraded`, `pressure`,
//!   `tls_handshake`, `lame_duck`, `header_timeout`, `send_timeout`).
//! - `protocol`: `http2` for a connection that carried an HTTP/2 request, `http1` for one that carried
//!   requests and none of them HTTP/2, `none` for one closed before its first request (a silent client,
//!   a failed TLS handshake).
//!
//! The open-connections gauge has no `protocol` label: a connection is counted at accept, before
//! anything tells HTTP/1 from HTTP/2 (the preface is read later), and moving it
//! to a protocol at its first request would add a check to every request's path. The protocol is known
//! at close, so it labels the duration histogram, the requests histogram and the closes counter.
//!
//! There is no `rejected_connections` counter: the budget turns nobody away. At its hard limit a new
//! client makes room by shedding an idle connection, or waits (queued) while every connection is busy.
//!
//! # Idle connections and requests in flight
//!
//! Whether a connection is idle changes with every request, so no facade call follows it. The
//! [`Stats`](crate::Stats) counters track it already: [`record_snapshot`] copies a
//! [`StatsSnapshot`]'s gauges into the facade. Call it before each scrape (in the `/metrics` handler,
//! as `examples/metrics.rs` does) or on a timer.
//!
//! # Scope
//!
//! The facade's metrics are process-wide, where [`Stats`](crate::Stats) belongs to one layer: two
//! servers in one process add to the same counters and gauges, and [`record_snapshot`] sets the gauges
//! from the one snapshot it is given. Use one layer per process, or tell servers apart with the
//! recorder's global labels.
//!
//! Most exporters render a histogram as a summary unless given buckets; with
//! `metrics-exporter-prometheus`, for example:
//!
//! ```
//! use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
//!
//! let builder = PrometheusBuilder::new()
//!     .set_buckets_for_metric(
//!         Matcher::Full("tower_keepalive_connection_duration_seconds".into()),
//!         &[0.1, 1.0, 5.0, 15.0, 60.0, 300.0, 3600.0],
//!     )
//!     .unwrap()
//!     .set_buckets_for_metric(
//!         Matcher::Full("tower_keepalive_connection_requests".into()),
//!         &[1.0, 2.0, 5.0, 10.0, 100.0, 1000.0],
//!     )
//!     .unwrap();
//! let recorder = builder.build_recorder();
//! # drop(recorder);
//! ```
//!
//! [`KeepAliveLayer`]: crate::KeepAliveLayer
//! [`Serve::connection_limits`]: crate::serve::Serve::connection_limits

use ::metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Unit,
};

use crate::connection::clock;
use crate::{CloseReason, StatsSnapshot};

const ACTIVE_CONNECTIONS: &str = "tower_keepalive_active_connections";
const CONNECTION_DURATION: &str = "tower_keepalive_connection_duration_seconds";
const CONNECTION_REQUESTS: &str = "tower_keepalive_connection_requests";
const CLOSED_CONNECTIONS: &str = "tower_keepalive_closed_connections_total";
const QUEUED_CONNECTIONS: &str = "tower_keepalive_queued_connections_total";
const SHED_CONNECTIONS: &str = "tower_keepalive_shed_connections_total";
const IDLE_CONNECTIONS: &str = "tower_keepalive_idle_connections";
const HIBERNATING_CONNECTIONS: &str = "tower_keepalive_hibernating_connections";
const ACTIVE_REQUESTS: &str = "tower_keepalive_active_requests";
const CONNECTION_PRESSURE: &str = "tower_keepalive_connection_pressure";

/// Gives the recorder each metric's description and unit (the `# HELP` lines of a Prometheus scrape,
/// for the metrics recorded so far). Call it once, after installing the recorder; the metrics are
/// recorded whether or not it was called.
///
/// ```
/// let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
/// let handle = recorder.handle();
/// metrics::with_local_recorder(&recorder, || {
///     tower_keepalive::metrics::describe();
///     // A connection opened and closed: the exporter renders the metrics that were recorded.
///     drop(tower_keepalive::KeepAliveLayer::new().connection());
/// });
/// let scrape = handle.render();
/// assert!(scrape.contains("# HELP tower_keepalive_active_connections Connections open now."));
/// assert!(scrape.contains("tower_keepalive_active_connections 0"));
/// ```
pub fn describe() {
    describe_gauge!(ACTIVE_CONNECTIONS, Unit::Count, "Connections open now.");
    describe_histogram!(
        CONNECTION_DURATION,
        Unit::Seconds,
        "How long each closed connection was open, by close reason and protocol."
    );
    describe_histogram!(
        CONNECTION_REQUESTS,
        Unit::Count,
        "Requests each closed connection served, by protocol."
    );
    describe_counter!(
        CLOSED_CONNECTIONS,
        Unit::Count,
        "Connections closed, by close reason and protocol."
    );
    describe_counter!(
        QUEUED_CONNECTIONS,
        Unit::Count,
        "Connections accepted at the hard connection limit that waited for room."
    );
    describe_counter!(
        SHED_CONNECTIONS,
        Unit::Count,
        "Idle connections closed at the hard connection limit to admit new ones."
    );
    describe_gauge!(
        IDLE_CONNECTIONS,
        Unit::Count,
        "Open connections with nothing in flight (sampled)."
    );
    describe_gauge!(
        HIBERNATING_CONNECTIONS,
        Unit::Count,
        "Idle HTTP/1 connections hibernating, holding little but their socket (sampled)."
    );
    describe_gauge!(
        ACTIVE_REQUESTS,
        Unit::Count,
        "Requests whose response is not fully sent yet (sampled)."
    );
    describe_gauge!(
        CONNECTION_PRESSURE,
        "How short of connections the server is, 0 to 1 (sampled)."
    );
}

/// Sets the gauges that change with every request from a snapshot of the layer's counters:
/// `tower_keepalive_idle_connections`, `tower_keepalive_hibernating_connections`,
/// `tower_keepalive_active_requests` and
/// `tower_keepalive_connection_pressure`. See the [module docs](self).
///
/// ```
/// let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
/// let handle = recorder.handle();
/// let layer = tower_keepalive::KeepAliveLayer::new();
/// let stats = layer.stats();
/// let _conn = layer.connection(); // open, and idle until its first request
/// metrics::with_local_recorder(&recorder, || {
///     tower_keepalive::metrics::record_snapshot(&stats.snapshot());
/// });
/// assert!(handle.render().contains("tower_keepalive_idle_connections 1"));
/// ```
pub fn record_snapshot(snapshot: &StatsSnapshot) {
    gauge!(IDLE_CONNECTIONS).set(snapshot.connections_idle() as f64);
    gauge!(HIBERNATING_CONNECTIONS).set(snapshot.connections_hibernating() as f64);
    gauge!(ACTIVE_REQUESTS).set(snapshot.in_flight() as f64);
    gauge!(CONNECTION_PRESSURE).set(snapshot.pressure());
}

/// A connection was accepted (its handle made).
pub(crate) fn connection_opened() {
    gauge!(ACTIVE_CONNECTIONS).increment(1.0);
}

/// A connection closed for `reason` after `requests`; it was opened at `opened_ns` (a [`clock`]
/// reading) and carried HTTP/2 if `http2`.
pub(crate) fn connection_closed(reason: CloseReason, requests: u64, opened_ns: u64, http2: bool) {
    let protocol = protocol(http2, requests);
    let seconds = clock::now_ns().saturating_sub(opened_ns) as f64 / 1e9;
    gauge!(ACTIVE_CONNECTIONS).decrement(1.0);
    let labels = [("reason", reason.as_str()), ("protocol", protocol)];
    counter!(CLOSED_CONNECTIONS, &labels).increment(1);
    histogram!(CONNECTION_DURATION, &labels).record(seconds);
    histogram!(CONNECTION_REQUESTS, "protocol" => protocol).record(requests as f64);
}

/// The connection budget was at its hard limit for a new client: `first` on the client's first look
/// (it is queued from then on), `shed` when an idle connection was closed to make room for it.
#[cfg(feature = "serve")]
pub(crate) fn at_hard_limit(first: bool, shed: bool) {
    if first {
        counter!(QUEUED_CONNECTIONS).increment(1);
    }
    if shed {
        counter!(SHED_CONNECTIONS).increment(1);
    }
}

fn protocol(http2: bool, requests: u64) -> &'static str {
    match (http2, requests) {
        (true, _) => "http2",
        (false, 0) => "none",
        (false, _) => "http1",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol_is_known_once_a_request_was_seen() {
        assert_eq!(protocol(false, 0), "none");
        assert_eq!(protocol(false, 3), "http1");
        assert_eq!(protocol(true, 1), "http2");
    }
}
