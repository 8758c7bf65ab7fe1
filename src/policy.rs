//! The persistence decision: what a request asks for, what a response allows, and the header rewrite.
//!
//! Pure functions over header maps, so that the rules can be tested and fuzzed without a connection.

use http::header::{
    Entry, HeaderMap, HeaderName, HeaderValue, CONNECTION, CONTENT_LENGTH, TE, TRANSFER_ENCODING,
    UPGRADE,
};
use http::{Method, StatusCode, Version};

use crate::config::Advert;
use crate::CloseReason;

pub(crate) static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
/// The same, to insert: a constant is built in place, where cloning the static calls through `Bytes`.
const KEEP_ALIVE_OWNED: HeaderName = HeaderName::from_static("keep-alive");
pub(crate) static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

const CLOSE_VALUE: HeaderValue = HeaderValue::from_static("close");
const KEEP_ALIVE_VALUE: HeaderValue = HeaderValue::from_static("keep-alive");

/// The connection options of a message (RFC 9110 section 7.6.1): the tokens of every `Connection` field
/// line, case-insensitive, comma-separated, optional whitespace and empty elements allowed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct ConnectionTokens {
    pub(crate) close: bool,
    pub(crate) keep_alive: bool,
    pub(crate) upgrade: bool,
    /// Any other token: a field name the sender wants removed at the next hop.
    pub(crate) other: bool,
}

impl ConnectionTokens {
    pub(crate) fn parse(headers: &HeaderMap) -> Self {
        Self::of_lines(headers.get_all(CONNECTION).iter())
    }

    /// The same over the given `Connection` field lines.
    fn of_lines<'a>(lines: impl Iterator<Item = &'a HeaderValue>) -> Self {
        let mut tokens = ConnectionTokens::default();
        for value in lines {
            // hyper reads only field lines of visible ASCII: a `keep-alive` on any other line does not keep
            // its connection open, so it must not be advertised either. A `close` there still counts:
            // closing is always safe.
            let readable = value.to_str().is_ok();
            for token in split_tokens(value.as_bytes()) {
                if token.eq_ignore_ascii_case(b"close") {
                    tokens.close = true;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    tokens.keep_alive |= readable;
                } else if token.eq_ignore_ascii_case(b"upgrade") {
                    tokens.upgrade = true;
                } else {
                    tokens.other = true;
                }
            }
        }
        tokens
    }
}

/// The non-empty elements of a comma-separated list, without their surrounding whitespace.
pub(crate) fn split_tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(|t| t.trim_ascii())
        .filter(|t| !t.is_empty())
}

/// What the request side decided, carried to the response.
#[derive(Debug)]
pub(crate) enum Plan {
    /// HTTP/1.0 or HTTP/1.1.
    Http1 {
        http10: bool,
        head: bool,
        /// `None`: persistent so far, `Some(reason)`: this response is the last.
        close: Option<CloseReason>,
        advert: Option<Advert>,
    },
    /// HTTP/2 and HTTP/3: connection-specific fields never leave (RFC 9113 section 8.2.2).
    Strip,
    /// HTTP/2 and HTTP/3, a stream past the connection's maximum requests, which a client that ignores
    /// the GOAWAY (or never acknowledges the PING of hyper's graceful close, which keeps new streams
    /// coming) still opens: answered `503 Service Unavailable` without calling the inner service, so
    /// that no more than the maximum is ever served on one connection. The serve paths reset such a
    /// stream with `REFUSED_STREAM` instead (`future::RefusingFuture`, `body::RefusedStream`).
    Refuse,
    /// HTTP/0.9 and anything unknown: left alone.
    Pass,
}

/// Whether the client asks for a persistent connection (RFC 9112 section 9.3), and if not, why.
pub(crate) fn request_persistence(
    version: Version,
    headers: &HeaderMap,
    http10_allowed: bool,
) -> Result<(), CloseReason> {
    let tokens = ConnectionTokens::parse(headers);
    let persistent = match version {
        Version::HTTP_11 => !tokens.close,
        Version::HTTP_10 => http10_allowed && tokens.keep_alive && !tokens.close,
        _ => false,
    };
    if persistent {
        Ok(())
    } else {
        Err(CloseReason::ClientClosed)
    }
}

/// Whether the response's end is known without closing the connection: an HTTP/1.0 peer cannot read
/// chunked coding, so without a length the body ends only when the connection does (RFC 9112 section 6.3).
pub(crate) fn self_delimited(
    status: StatusCode,
    head: bool,
    headers: &HeaderMap,
    exact_len: Option<u64>,
) -> bool {
    head || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
        || exact_len.is_some()
        || headers.contains_key(CONTENT_LENGTH)
}

/// Rewrites an HTTP/1 response's connection fields. `close` is the decision so far (request side, the
/// connection's state); the response may still turn it into a close, never back. Returns the final
/// decision: `None` persistent, `Some(reason)` closing (`CloseReason::Upgraded` for a protocol switch,
/// left untouched). `self_delimited` is asked only for HTTP/1.0.
pub(crate) fn finish_http1(
    status: StatusCode,
    headers: &mut HeaderMap,
    http10: bool,
    mut close: Option<CloseReason>,
    self_delimited: impl FnOnce(&HeaderMap) -> bool,
    advert: Option<Advert>,
) -> Option<CloseReason> {
    if status == StatusCode::SWITCHING_PROTOCOLS {
        return Some(CloseReason::Upgraded);
    }
    if close.is_none() && http10 && !self_delimited(headers) {
        close = Some(CloseReason::Service);
    }
    // The usual response has no `Connection` of its own: one lookup both finds that and adds ours. When
    // it had one, the line added here takes part below as if the service had sent it: `keep-alive` is
    // what a persistent response ends up with anyway, and `close` what a closing one does.
    let ours = if close.is_none() {
        KEEP_ALIVE_VALUE
    } else {
        CLOSE_VALUE
    };
    if !headers.append(CONNECTION, ours) {
        match (close, advert) {
            (None, Some(advert)) => headers.insert(KEEP_ALIVE_OWNED, advert.value()),
            _ => headers.remove(&KEEP_ALIVE),
        };
        return close;
    }
    // The service's own lines: all but ours, the last.
    let lines = headers.get_all(CONNECTION).iter().count();
    let tokens = ConnectionTokens::of_lines(
        headers
            .get_all(CONNECTION)
            .iter()
            .take(lines.saturating_sub(1)),
    );
    if close.is_none() && tokens.close {
        close = Some(CloseReason::Service);
    }
    match close {
        None => {
            if tokens.keep_alive {
                // The service said `keep-alive` itself: ours would repeat it.
                let theirs: Vec<HeaderValue> = headers
                    .get_all(CONNECTION)
                    .iter()
                    .take(lines.saturating_sub(1))
                    .cloned()
                    .collect();
                if let Entry::Occupied(mut entry) = headers.entry(CONNECTION) {
                    // In place: the field keeps its position among the others.
                    let mut theirs = theirs.into_iter();
                    if let Some(first) = theirs.next() {
                        entry.insert(first);
                    }
                    for line in theirs {
                        entry.append(line);
                    }
                }
            }
            match advert {
                Some(advert) => headers.insert(KEEP_ALIVE_OWNED, advert.value()),
                None => headers.remove(&KEEP_ALIVE),
            };
        }
        Some(_) => {
            headers.remove(&KEEP_ALIVE);
            set_close(headers, tokens);
        }
    }
    close
}

/// `Connection: close`, keeping any other token the response carried (`upgrade`, field names).
fn set_close(headers: &mut HeaderMap, tokens: ConnectionTokens) {
    if !tokens.other && !tokens.upgrade {
        headers.insert(CONNECTION, CLOSE_VALUE);
        return;
    }
    let mut value = b"close".to_vec();
    for line in headers.get_all(CONNECTION) {
        for token in split_tokens(line.as_bytes()) {
            if !token.eq_ignore_ascii_case(b"close") && !token.eq_ignore_ascii_case(b"keep-alive") {
                value.extend_from_slice(b", ");
                value.extend_from_slice(token);
            }
        }
    }
    let value = HeaderValue::from_bytes(&value).unwrap_or(CLOSE_VALUE);
    headers.insert(CONNECTION, value);
}

/// Removes every connection-specific field (RFC 9113 section 8.2.2, RFC 9110 section 7.6.1): those named
/// in `Connection`, then `Connection`, `Keep-Alive`, `Proxy-Connection`, `Transfer-Encoding`, `Upgrade`
/// and `TE`.
pub(crate) fn strip_connection_fields(headers: &mut HeaderMap) {
    let specific = [
        &CONNECTION_NAME,
        &KEEP_ALIVE,
        &PROXY_CONNECTION,
        &TRANSFER_ENCODING,
        &UPGRADE,
        &TE,
    ];
    // One pass over the few fields a response has, instead of a lookup per name: the usual response
    // carries none of them.
    if !headers.keys().any(|name| specific.contains(&name)) {
        return;
    }
    if headers.contains_key(CONNECTION) {
        remove_named_in_connection(headers, &[]);
        headers.remove(CONNECTION);
    }
    for name in &specific[1..] {
        headers.remove(*name);
    }
}

/// Removes the fields named in `Connection` (RFC 9110 section 7.6.1), sparing the `protected` names.
fn remove_named_in_connection(headers: &mut HeaderMap, protected: &[HeaderName]) {
    // Only names that are present and not protected: the list stays as short as the header map, whatever
    // the length of `Connection`.
    let named: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .flat_map(|line| split_tokens(line.as_bytes()))
        .filter_map(|token| HeaderName::from_bytes(token).ok())
        .filter(|name| headers.contains_key(name) && !protected.contains(name))
        .collect();
    for name in named {
        headers.remove(name);
    }
}

/// The request fields that are hop-by-hop whatever `Connection` says (RFC 9110 section 7.6.1), plus
/// `Proxy-Authorization`, which is meant for the proxy itself (RFC 9110 section 11.7.2).
fn standard_hop_by_hop() -> [&'static HeaderName; 7] {
    static PROXY_AUTHORIZATION: HeaderName = http::header::PROXY_AUTHORIZATION;
    [
        &KEEP_ALIVE,
        &PROXY_CONNECTION,
        &TE,
        &TRANSFER_ENCODING,
        &UPGRADE,
        &PROXY_AUTHORIZATION,
        &CONNECTION_NAME,
    ]
}

static CONNECTION_NAME: HeaderName = CONNECTION;

/// Removes a request's hop-by-hop fields before it is forwarded (RFC 9110 section 7.6.1): every field
/// named in `Connection`, then the standard set and `Connection` itself, sparing the `protected` names.
pub(crate) fn strip_request_hop_by_hop(headers: &mut HeaderMap, protected: &[HeaderName]) {
    if ConnectionTokens::parse(headers).other {
        remove_named_in_connection(headers, protected);
    }
    for name in standard_hop_by_hop() {
        if !protected.contains(name) {
            headers.remove(name);
        }
    }
}

/// Whether a request's method makes the response bodiless on the wire.
pub(crate) fn is_head(method: &Method) -> bool {
    method == Method::HEAD
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(lines: &[(&str, &str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in lines {
            headers.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        headers
    }

    #[test]
    fn tokens_are_case_insensitive_lists_over_several_lines() {
        let t = ConnectionTokens::parse(&map(&[
            ("connection", " , Keep-Alive ,,"),
            ("connection", ""),
            ("connection", "X-Foo,\tCLOSE"),
        ]));
        assert_eq!(
            t,
            ConnectionTokens {
                close: true,
                keep_alive: true,
                upgrade: false,
                other: true
            }
        );
        assert_eq!(
            ConnectionTokens::parse(&HeaderMap::new()),
            ConnectionTokens::default()
        );
        // A token is a whole list element, not a substring.
        let t = ConnectionTokens::parse(&map(&[("connection", "closed, keep-alive-ish")]));
        assert!(!t.close && !t.keep_alive && t.other);
    }

    #[test]
    fn close_wins_over_keep_alive_in_either_order() {
        for value in ["keep-alive, close", "close, keep-alive"] {
            let h = map(&[("connection", value)]);
            assert!(request_persistence(Version::HTTP_11, &h, true).is_err());
            assert!(request_persistence(Version::HTTP_10, &h, true).is_err());
        }
    }

    #[test]
    fn http10_is_persistent_only_on_request() {
        let none = HeaderMap::new();
        let ka = map(&[("connection", "keep-alive")]);
        assert!(request_persistence(Version::HTTP_10, &none, true).is_err());
        assert!(request_persistence(Version::HTTP_10, &ka, true).is_ok());
        assert!(request_persistence(Version::HTTP_10, &ka, false).is_err());
        assert!(request_persistence(Version::HTTP_11, &none, true).is_ok());
    }

    #[test]
    fn response_close_is_final_and_keeps_other_tokens() {
        let mut h = map(&[
            ("connection", "keep-alive, X-Foo"),
            ("keep-alive", "timeout=99"),
        ]);
        let out = finish_http1(
            StatusCode::OK,
            &mut h,
            false,
            Some(CloseReason::Drain),
            |_| true,
            None,
        );
        assert_eq!(out, Some(CloseReason::Drain));
        assert_eq!(
            h.get_all(CONNECTION).iter().collect::<Vec<_>>(),
            ["close, X-Foo"]
        );
        assert!(!h.contains_key(&KEEP_ALIVE));
    }

    #[test]
    fn persistent_response_keeps_its_own_lines_in_place_and_says_keep_alive_once() {
        let lines = |h: &HeaderMap| h.get_all(CONNECTION).iter().cloned().collect::<Vec<_>>();
        // Said by the service already, on its second line: not said again, and `Connection` stays first.
        let mut h = map(&[
            ("connection", "X-Foo"),
            ("content-type", "text/plain"),
            ("connection", "Keep-Alive"),
        ]);
        assert_eq!(
            finish_http1(StatusCode::OK, &mut h, false, None, |_| true, None),
            None
        );
        assert_eq!(lines(&h), ["X-Foo", "Keep-Alive"]);
        assert_eq!(h.keys().next(), Some(&CONNECTION));
        // Not said: added after the service's own.
        let mut h = map(&[("connection", "X-Foo")]);
        assert_eq!(
            finish_http1(StatusCode::OK, &mut h, false, None, |_| true, None),
            None
        );
        assert_eq!(lines(&h), ["X-Foo", "keep-alive"]);
        // The service's `close` turns the response into the last, ours notwithstanding.
        let mut h = map(&[("connection", "close")]);
        let out = finish_http1(StatusCode::OK, &mut h, false, None, |_| true, None);
        assert_eq!(out, Some(CloseReason::Service));
        assert_eq!(lines(&h), ["close"]);
    }

    #[test]
    fn switching_protocols_is_untouched() {
        let mut h = map(&[("connection", "upgrade"), ("upgrade", "websocket")]);
        let before = h.clone();
        let out = finish_http1(
            StatusCode::SWITCHING_PROTOCOLS,
            &mut h,
            false,
            None,
            |_| true,
            None,
        );
        assert_eq!(out, Some(CloseReason::Upgraded));
        assert_eq!(h, before);
    }

    #[test]
    fn http10_without_length_closes() {
        let mut h = HeaderMap::new();
        let out = finish_http1(StatusCode::OK, &mut h, true, None, |_| false, None);
        assert_eq!(out, Some(CloseReason::Service));
        assert_eq!(h[CONNECTION], "close");
    }

    #[test]
    fn request_strip_spares_protected_fields() {
        let protected: Vec<HeaderName> = crate::config::PROTECTED_REQUEST_FIELDS
            .iter()
            .map(|n| HeaderName::from_static(n))
            .collect();
        let mut h = map(&[
            (
                "connection",
                "keep-alive, X-Forwarded-For, Authorization, x-hop, Host, Cookie",
            ),
            ("connection", "content-length, forwarded"),
            ("host", "example.com"),
            ("authorization", "Bearer t"),
            ("cookie", "a=b"),
            ("content-length", "3"),
            ("forwarded", "for=1.2.3.4"),
            ("x-forwarded-for", "1.2.3.4"),
            ("x-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("upgrade", "websocket"),
            ("proxy-authorization", "Basic x"),
            ("accept", "*/*"),
        ]);
        strip_request_hop_by_hop(&mut h, &protected);
        let mut left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        assert_eq!(
            left,
            [
                "accept",
                "authorization",
                "content-length",
                "cookie",
                "forwarded",
                "host",
                "x-forwarded-for"
            ]
        );
    }

    #[test]
    fn strip_removes_named_and_connection_specific_fields() {
        let mut h = map(&[
            ("connection", "keep-alive, X-Hop"),
            ("x-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
            ("te", "trailers"),
            ("content-type", "text/plain"),
        ]);
        strip_connection_fields(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("content-type"));
    }
}
