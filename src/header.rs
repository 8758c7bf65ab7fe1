//! The `Keep-Alive` header field: [`KeepAliveHeader`] and its parse error.

use std::{fmt, str::FromStr, time::Duration};

use http::{HeaderMap, HeaderName, HeaderValue};

static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");

/// The value of a `Keep-Alive` header field: `timeout=5, max=100`.
///
/// `Keep-Alive` carries hints about a persistent HTTP/1.x connection: how
/// long an idle connection is kept open (`timeout`, in seconds) and how many
/// more requests it will serve (`max`). It was defined by [RFC 2068, section
/// 19.7.1.1][rfc2068] and is described as historic in [RFC 7230, Appendix
/// A.1.2][rfc7230]. [RFC 9110, section 7.6.1][rfc9110] makes it a
/// connection-specific field: a sender lists it in `Connection`, and
/// intermediaries drop it when forwarding. [RFC 9113, section
/// 8.2.2][rfc9113] forbids it in HTTP/2 (and HTTP/3 does the same), so it
/// should only be sent on HTTP/1.x responses.
///
/// The parameters are advisory; a client may close earlier, and a server is
/// free to close an idle connection sooner than it announced.
///
/// [rfc2068]: https://www.rfc-editor.org/rfc/rfc2068#section-19.7.1.1
/// [rfc7230]: https://www.rfc-editor.org/rfc/rfc7230#appendix-A.1.2
/// [rfc9110]: https://www.rfc-editor.org/rfc/rfc9110#section-7.6.1
/// [rfc9113]: https://www.rfc-editor.org/rfc/rfc9113#section-8.2.2
///
/// Both parameters are optional. Parsing is lenient where that is harmless
/// (case, whitespace, empty list elements, unknown parameters) and strict
/// where a lenient reading could be wrong (malformed syntax, bad numbers,
/// repeated parameters).
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use tower_keepalive::KeepAliveHeader;
///
/// let value: KeepAliveHeader = "timeout=5, max=100".parse()?;
/// assert_eq!(value.timeout(), Some(Duration::from_secs(5)));
/// assert_eq!(value.max(), Some(100));
/// assert_eq!(value.to_string(), "timeout=5, max=100");
/// # Ok::<(), tower_keepalive::InvalidKeepAlive>(())
/// ```
///
/// In a header map, announcing a policy and reading one back:
///
/// ```
/// use std::time::Duration;
/// use http::{header, HeaderMap, HeaderValue};
/// use tower_keepalive::KeepAliveHeader;
///
/// // Announce a policy on a response.
/// let policy = KeepAliveHeader::new()
///     .with_timeout(Duration::from_secs(5))
///     .with_max(100);
/// let mut headers = HeaderMap::new();
/// headers.insert(header::CONNECTION, HeaderValue::from_static("keep-alive"));
/// headers.insert("keep-alive", policy.to_header_value());
/// assert_eq!(headers["keep-alive"], "timeout=5, max=100");
///
/// // Read one back; unknown parameters are ignored.
/// headers.insert("keep-alive", HeaderValue::from_static("Timeout=5, foo=bar"));
/// let parsed = KeepAliveHeader::from_headers(&headers)?;
/// assert_eq!(parsed, Some(KeepAliveHeader::new().with_timeout_secs(5)));
/// # Ok::<(), tower_keepalive::InvalidKeepAlive>(())
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct KeepAliveHeader {
    timeout: Option<u64>,
    max: Option<u64>,
}

impl KeepAliveHeader {
    /// A value with no parameters.
    ///
    /// # Example
    ///
    /// ```
    /// use tower_keepalive::KeepAliveHeader;
    ///
    /// let value = KeepAliveHeader::new();
    /// assert_eq!(value.timeout(), None);
    /// assert_eq!(value.max(), None);
    /// assert_eq!(value.to_string(), "");
    /// ```
    #[must_use]
    pub const fn new() -> Self {
        Self {
            timeout: None,
            max: None,
        }
    }

    /// Sets the `timeout` parameter, in seconds.
    ///
    /// # Example
    ///
    /// ```
    /// use tower_keepalive::KeepAliveHeader;
    ///
    /// const VALUE: KeepAliveHeader = KeepAliveHeader::new().with_timeout_secs(5);
    /// assert_eq!(VALUE.to_string(), "timeout=5");
    /// ```
    #[must_use]
    pub const fn with_timeout_secs(mut self, secs: u64) -> Self {
        self.timeout = Some(secs);
        self
    }

    /// Sets the `timeout` parameter from a [`Duration`].
    ///
    /// The header carries whole seconds, so the duration is rounded down; a
    /// sub-second duration becomes `timeout=0`. Rounding down keeps the
    /// announced timeout from outlasting the real one.
    ///
    /// # Example
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_keepalive::KeepAliveHeader;
    ///
    /// let value = KeepAliveHeader::new().with_timeout(Duration::from_millis(5_900));
    /// assert_eq!(value.timeout_secs(), Some(5));
    /// ```
    #[must_use]
    pub fn with_timeout(self, timeout: Duration) -> Self {
        self.with_timeout_secs(timeout.as_secs())
    }

    /// Sets the `max` parameter: how many more requests the connection serves.
    ///
    /// # Example
    ///
    /// ```
    /// use tower_keepalive::KeepAliveHeader;
    ///
    /// let value = KeepAliveHeader::new().with_max(100);
    /// assert_eq!(value.to_string(), "max=100");
    /// ```
    #[must_use]
    pub const fn with_max(mut self, max: u64) -> Self {
        self.max = Some(max);
        self
    }

    /// The `timeout` parameter as a [`Duration`], if present.
    ///
    /// # Example
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_keepalive::KeepAliveHeader;
    ///
    /// let value = KeepAliveHeader::new().with_timeout_secs(5);
    /// assert_eq!(value.timeout(), Some(Duration::from_secs(5)));
    /// ```
    pub fn timeout(&self) -> Option<Duration> {
        self.timeout.map(Duration::from_secs)
    }

    /// The `timeout` parameter in seconds, if present.
    ///
    /// # Example
    ///
    /// ```
    /// use tower_keepalive::KeepAliveHeader;
    ///
    /// let value = KeepAliveHeader::new().with_timeout_secs(5);
    /// assert_eq!(value.timeout_secs(), Some(5));
    /// ```
    pub const fn timeout_secs(&self) -> Option<u64> {
        self.timeout
    }

    /// The `max` parameter, if present.
    ///
    /// # Example
    ///
    /// ```
    /// use tower_keepalive::KeepAliveHeader;
    ///
    /// let value = KeepAliveHeader::new().with_max(100);
    /// assert_eq!(value.max(), Some(100));
    /// ```
    pub const fn max(&self) -> Option<u64> {
        self.max
    }

    /// Parse one field value (bytes as on the wire).
    ///
    /// The value is a comma-separated list of `name[=value]` parameters.
    /// Names are case-insensitive, values are tokens or quoted-strings, and
    /// unknown parameters are skipped. `timeout` and `max` need a value of
    /// decimal digits that fits in a `u64`, and may appear at most once.
    ///
    /// # Errors
    ///
    /// Returns [`InvalidKeepAlive`] if the value is not a well-formed list,
    /// if `timeout` or `max` lacks a valid number, or if either is repeated.
    ///
    /// # Example
    ///
    /// ```
    /// use tower_keepalive::KeepAliveHeader;
    ///
    /// let value = KeepAliveHeader::parse(b"MAX = 3, foo=\"a,b\", timeout=\"5\"")?;
    /// assert_eq!(value, KeepAliveHeader::new().with_timeout_secs(5).with_max(3));
    ///
    /// assert!(KeepAliveHeader::parse(b"timeout=-1").is_err());
    /// assert!(KeepAliveHeader::parse(b"max=1, max=2").is_err());
    /// # Ok::<(), tower_keepalive::InvalidKeepAlive>(())
    /// ```
    pub fn parse(value: &[u8]) -> Result<Self, InvalidKeepAlive> {
        let mut out = Self::new();
        out.parse_into(value)?;
        Ok(out)
    }

    /// Parse every `Keep-Alive` field line of a header map as one
    /// comma-separated list. `Ok(None)` when absent.
    ///
    /// A parameter repeated across field lines is an error, just as it is
    /// within one line. Byte offsets in errors are relative to the field
    /// line they occur in.
    ///
    /// # Errors
    ///
    /// Returns [`InvalidKeepAlive`] if any field line is invalid; see
    /// [`KeepAliveHeader::parse`].
    ///
    /// # Example
    ///
    /// ```
    /// use http::{HeaderMap, HeaderValue};
    /// use tower_keepalive::KeepAliveHeader;
    ///
    /// let mut headers = HeaderMap::new();
    /// assert_eq!(KeepAliveHeader::from_headers(&headers)?, None);
    ///
    /// headers.append("keep-alive", HeaderValue::from_static("timeout=5"));
    /// headers.append("keep-alive", HeaderValue::from_static("max=100"));
    /// assert_eq!(
    ///     KeepAliveHeader::from_headers(&headers)?,
    ///     Some(KeepAliveHeader::new().with_timeout_secs(5).with_max(100)),
    /// );
    /// # Ok::<(), tower_keepalive::InvalidKeepAlive>(())
    /// ```
    pub fn from_headers(headers: &HeaderMap) -> Result<Option<Self>, InvalidKeepAlive> {
        Self::from_values(headers.get_all(&KEEP_ALIVE).iter())
    }

    /// Format as a [`HeaderValue`]: `timeout=5, max=100`.
    ///
    /// Missing parameters are omitted; with neither, the value is empty.
    ///
    /// # Example
    ///
    /// ```
    /// use tower_keepalive::KeepAliveHeader;
    ///
    /// let value = KeepAliveHeader::new().with_timeout_secs(5).with_max(100);
    /// assert_eq!(value.to_header_value(), "timeout=5, max=100");
    /// assert_eq!(KeepAliveHeader::new().to_header_value(), "");
    /// ```
    pub fn to_header_value(&self) -> HeaderValue {
        // Formatted on the stack, so that the value's own bytes are the one allocation. The longest
        // value, `timeout=<u64>, max=<u64>`, is 54 bytes.
        const CAP: usize = 64;
        let mut buf = [0u8; CAP];
        let mut out = &mut buf[..];
        let _ = std::io::Write::write_fmt(&mut out, format_args!("{self}"));
        let len = CAP - out.len();
        // ASCII letters, digits and punctuation only: always a valid value.
        HeaderValue::from_bytes(&buf[..len]).unwrap_or(HeaderValue::from_static(""))
    }

    fn from_values<'a>(
        values: impl IntoIterator<Item = &'a HeaderValue>,
    ) -> Result<Option<Self>, InvalidKeepAlive> {
        let mut values = values.into_iter().peekable();
        if values.peek().is_none() {
            return Ok(None);
        }
        let mut out = Self::new();
        // One accumulator for all lines, so a parameter repeated across lines
        // is caught exactly like one repeated within a line. Parsing line by
        // line matches joining them with commas, because a line with an
        // unterminated quote is rejected on its own.
        for value in values {
            out.parse_into(value.as_bytes())?;
        }
        Ok(Some(out))
    }

    fn parse_into(&mut self, value: &[u8]) -> Result<(), InvalidKeepAlive> {
        let mut cur = Cursor {
            bytes: value,
            pos: 0,
        };
        loop {
            cur.skip_ows();
            match cur.peek() {
                None => return Ok(()),
                Some(b',') => {
                    cur.pos += 1;
                    continue;
                }
                Some(_) => {}
            }

            let name = cur.token();
            if name.is_empty() {
                return Err(cur.unexpected(Expected::Name));
            }
            cur.skip_ows();
            let value = if cur.peek() == Some(b'=') {
                cur.pos += 1;
                cur.skip_ows();
                Some(cur.value()?)
            } else {
                None
            };
            cur.skip_ows();
            if !matches!(cur.peek(), None | Some(b',')) {
                return Err(cur.unexpected(Expected::Separator));
            }

            let (param, slot) = if name.eq_ignore_ascii_case(b"timeout") {
                (Param::Timeout, &mut self.timeout)
            } else if name.eq_ignore_ascii_case(b"max") {
                (Param::Max, &mut self.max)
            } else {
                continue;
            };
            if slot.is_some() {
                return Err(ErrorKind::Duplicate(param).into());
            }
            let value = value.ok_or(ErrorKind::MissingValue(param))?;
            *slot = Some(value.to_u64().ok_or(ErrorKind::InvalidNumber(param))?);
        }
    }
}

impl fmt::Display for KeepAliveHeader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.timeout, self.max) {
            (Some(timeout), Some(max)) => write!(f, "timeout={timeout}, max={max}"),
            (Some(timeout), None) => write!(f, "timeout={timeout}"),
            (None, Some(max)) => write!(f, "max={max}"),
            (None, None) => Ok(()),
        }
    }
}

impl FromStr for KeepAliveHeader {
    type Err = InvalidKeepAlive;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s.as_bytes())
    }
}

impl TryFrom<&HeaderValue> for KeepAliveHeader {
    type Error = InvalidKeepAlive;

    fn try_from(value: &HeaderValue) -> Result<Self, Self::Error> {
        Self::parse(value.as_bytes())
    }
}

/// Decodes all `Keep-Alive` field lines as one list and encodes one line.
///
/// # Example
///
/// ```
/// use headers::HeaderMapExt;
/// use http::HeaderMap;
/// use tower_keepalive::KeepAliveHeader;
///
/// let mut headers = HeaderMap::new();
/// headers.typed_insert(KeepAliveHeader::new().with_timeout_secs(5));
/// assert_eq!(headers["keep-alive"], "timeout=5");
/// assert_eq!(
///     headers.typed_get::<KeepAliveHeader>(),
///     Some(KeepAliveHeader::new().with_timeout_secs(5)),
/// );
/// ```
#[cfg(feature = "headers")]
#[cfg_attr(docsrs, doc(cfg(feature = "headers")))]
impl headers::Header for KeepAliveHeader {
    fn name() -> &'static HeaderName {
        &KEEP_ALIVE
    }

    fn decode<'i, I>(values: &mut I) -> Result<Self, headers::Error>
    where
        I: Iterator<Item = &'i HeaderValue>,
    {
        // No field lines means no header, which `decode` cannot express.
        Self::from_values(values)
            .ok()
            .flatten()
            .ok_or_else(headers::Error::invalid)
    }

    fn encode<E: Extend<HeaderValue>>(&self, values: &mut E) {
        values.extend(std::iter::once(self.to_header_value()));
    }
}

/// Error for a `Keep-Alive` value that cannot be parsed.
///
/// # Example
///
/// ```
/// use tower_keepalive::KeepAliveHeader;
///
/// let err = KeepAliveHeader::parse(b"timeout=5, timeout=6").unwrap_err();
/// assert_eq!(
///     err.to_string(),
///     "invalid Keep-Alive header: `timeout` appears more than once",
/// );
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidKeepAlive {
    kind: ErrorKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ErrorKind {
    /// Offsets and the offending byte identify the problem without echoing
    /// attacker-controlled input of unbounded length.
    Syntax {
        expected: Expected,
        at: usize,
        found: Option<u8>,
    },
    UnterminatedQuote {
        at: usize,
    },
    MissingValue(Param),
    InvalidNumber(Param),
    Duplicate(Param),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expected {
    Name,
    Value,
    Separator,
    QuotedText,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Param {
    Timeout,
    Max,
}

impl From<ErrorKind> for InvalidKeepAlive {
    fn from(kind: ErrorKind) -> Self {
        Self { kind }
    }
}

impl fmt::Display for InvalidKeepAlive {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("invalid Keep-Alive header: ")?;
        match self.kind {
            ErrorKind::Syntax {
                expected,
                at,
                found,
            } => {
                let expected = match expected {
                    Expected::Name => "a parameter name",
                    Expected::Value => "a token or quoted-string",
                    Expected::Separator => "`,` or the end of the value",
                    Expected::QuotedText => "quoted-string text",
                };
                write!(f, "expected {expected} at byte {at}, found ")?;
                match found {
                    Some(byte) => write!(f, "`{}`", byte.escape_ascii()),
                    None => f.write_str("the end of the value"),
                }
            }
            ErrorKind::UnterminatedQuote { at } => {
                write!(f, "quoted-string starting at byte {at} is not terminated")
            }
            ErrorKind::MissingValue(param) => write!(f, "`{}` has no value", param.name()),
            ErrorKind::InvalidNumber(param) => write!(
                f,
                "`{}` must be decimal digits no greater than {}",
                param.name(),
                u64::MAX
            ),
            ErrorKind::Duplicate(param) => {
                write!(f, "`{}` appears more than once", param.name())
            }
        }
    }
}

impl std::error::Error for InvalidKeepAlive {}

impl Param {
    fn name(self) -> &'static str {
        match self {
            Self::Timeout => "timeout",
            Self::Max => "max",
        }
    }
}

/// A parameter value as it appears on the wire.
enum Value<'a> {
    Token(&'a [u8]),
    /// Between the quotes, with `\` escapes still in place.
    Quoted(&'a [u8]),
}

impl Value<'_> {
    fn to_u64(&self) -> Option<u64> {
        match *self {
            Self::Token(token) => parse_u64(token.iter().copied()),
            Self::Quoted(raw) => {
                let mut raw = raw.iter().copied();
                // `Cursor::value` guarantees every `\` is followed by a byte.
                parse_u64(std::iter::from_fn(|| match raw.next()? {
                    b'\\' => raw.next(),
                    b => Some(b),
                }))
            }
        }
    }
}

fn parse_u64(mut digits: impl Iterator<Item = u8>) -> Option<u64> {
    let digit = |b: u8| b.is_ascii_digit().then(|| u64::from(b - b'0'));
    let first = digit(digits.next()?)?;
    digits.try_fold(first, |n, b| n.checked_mul(10)?.checked_add(digit(b)?))
}

struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.pos).copied()
    }

    fn unexpected(&self, expected: Expected) -> InvalidKeepAlive {
        ErrorKind::Syntax {
            expected,
            at: self.pos,
            found: self.peek(),
        }
        .into()
    }

    fn skip_ows(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t')) {
            self.pos += 1;
        }
    }

    fn token(&mut self) -> &'a [u8] {
        let start = self.pos;
        while self.peek().is_some_and(is_tchar) {
            self.pos += 1;
        }
        &self.bytes[start..self.pos]
    }

    fn value(&mut self) -> Result<Value<'a>, InvalidKeepAlive> {
        if self.peek() != Some(b'"') {
            let token = self.token();
            return if token.is_empty() {
                Err(self.unexpected(Expected::Value))
            } else {
                Ok(Value::Token(token))
            };
        }

        let open = self.pos;
        self.pos += 1;
        loop {
            match self.peek() {
                None => return Err(ErrorKind::UnterminatedQuote { at: open }.into()),
                Some(b'"') => {
                    let inner = &self.bytes[open + 1..self.pos];
                    self.pos += 1;
                    return Ok(Value::Quoted(inner));
                }
                Some(b'\\') => {
                    self.pos += 1;
                    match self.peek() {
                        None => return Err(ErrorKind::UnterminatedQuote { at: open }.into()),
                        Some(b) if is_quoted_text(b) || b == b'"' || b == b'\\' => self.pos += 1,
                        Some(_) => return Err(self.unexpected(Expected::QuotedText)),
                    }
                }
                Some(b) if is_quoted_text(b) => self.pos += 1,
                Some(_) => return Err(self.unexpected(Expected::QuotedText)),
            }
        }
    }
}

/// `tchar` from RFC 9110, section 5.6.2.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// `qdtext` from RFC 9110, section 5.6.4, which also covers what may follow
/// a `\` apart from `"` and `\` themselves.
fn is_quoted_text(b: u8) -> bool {
    matches!(b, b'\t' | b' ' | 0x21 | 0x23..=0x5B | 0x5D..=0x7E | 0x80..=0xFF)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::{collection::vec, prelude::*};

    fn ka(timeout: Option<u64>, max: Option<u64>) -> KeepAliveHeader {
        KeepAliveHeader { timeout, max }
    }

    fn ok(value: &str) -> KeepAliveHeader {
        KeepAliveHeader::parse(value.as_bytes())
            .unwrap_or_else(|e| panic!("{value:?} should parse: {e}"))
    }

    fn err(value: &[u8]) -> ErrorKind {
        match KeepAliveHeader::parse(value) {
            Ok(v) => panic!("{value:?} should not parse, got {v:?}"),
            Err(e) => e.kind,
        }
    }

    #[test]
    fn parses_both_params_in_any_order() {
        assert_eq!(ok("timeout=5, max=100"), ka(Some(5), Some(100)));
        assert_eq!(ok("max=100,timeout=5"), ka(Some(5), Some(100)));
        assert_eq!(ok("timeout=5"), ka(Some(5), None));
        assert_eq!(ok("max=0"), ka(None, Some(0)));
    }

    #[test]
    fn names_are_case_insensitive_and_bws_is_allowed() {
        assert_eq!(ok("TIMEOUT = 5"), ka(Some(5), None));
        assert_eq!(ok("Timeout=5, MaX\t=\t7"), ka(Some(5), Some(7)));
    }

    #[test]
    fn quoted_values_are_unquoted() {
        assert_eq!(ok(r#"timeout="5""#), ka(Some(5), None));
        assert_eq!(ok(r#"max="1\2""#), ka(None, Some(12)));
        assert_eq!(
            err(br#"timeout="""#),
            ErrorKind::InvalidNumber(Param::Timeout)
        );
        assert_eq!(
            err(br#"timeout=" 5""#),
            ErrorKind::InvalidNumber(Param::Timeout)
        );
    }

    #[test]
    fn unknown_params_are_skipped() {
        assert_eq!(ok("timeout=5, foo, bar=baz, max=3"), ka(Some(5), Some(3)));
        assert_eq!(ok(r#"foo="x,max=9", max=1"#), ka(None, Some(1)));
        assert_eq!(ok(r#"foo="a\"b,max=9", max=1"#), ka(None, Some(1)));
        assert_eq!(ok("timeouts=5, maximum=6, foo=-1"), ka(None, None));
    }

    #[test]
    fn empty_elements_and_ows_are_ignored() {
        assert_eq!(ok(", ,timeout=5,"), ka(Some(5), None));
        assert_eq!(ok("\ttimeout=5\t,\tmax=3\t"), ka(Some(5), Some(3)));
        assert_eq!(ok(""), KeepAliveHeader::new());
        assert_eq!(ok(" \t , ,"), KeepAliveHeader::new());
    }

    #[test]
    fn numbers_must_be_digits_that_fit() {
        assert_eq!(ok("timeout=005"), ka(Some(5), None));
        assert_eq!(ok("max=18446744073709551615"), ka(None, Some(u64::MAX)));
        for bad in [
            "max=18446744073709551616",
            "timeout=99999999999999999999",
            "timeout=-1",
            "timeout=+5",
            "timeout=1.5",
            "timeout=5s",
        ] {
            assert!(
                matches!(err(bad.as_bytes()), ErrorKind::InvalidNumber(_)),
                "{bad}"
            );
        }
        assert!(matches!(
            err(b"timeout="),
            ErrorKind::Syntax {
                expected: Expected::Value,
                found: None,
                ..
            }
        ));
        assert!(matches!(
            err(b"timeout=,max=1"),
            ErrorKind::Syntax {
                expected: Expected::Value,
                ..
            }
        ));
    }

    #[test]
    fn known_params_need_a_value() {
        assert_eq!(err(b"timeout"), ErrorKind::MissingValue(Param::Timeout));
        assert_eq!(err(b"max, timeout=5"), ErrorKind::MissingValue(Param::Max));
    }

    #[test]
    fn duplicates_are_rejected() {
        assert_eq!(
            err(b"timeout=5, timeout=5"),
            ErrorKind::Duplicate(Param::Timeout)
        );
        assert_eq!(err(b"max=1,MAX=2"), ErrorKind::Duplicate(Param::Max));
        assert_eq!(err(b"max=1,max"), ErrorKind::Duplicate(Param::Max));
    }

    #[test]
    fn malformed_syntax_is_rejected() {
        assert_eq!(
            err(br#"foo="abc, max=1"#),
            ErrorKind::UnterminatedQuote { at: 4 }
        );
        assert_eq!(err(br#"foo="abc\"#), ErrorKind::UnterminatedQuote { at: 4 });
        let syntax = |value: &[u8], want: Expected, at: usize| match err(value) {
            ErrorKind::Syntax {
                expected, at: got, ..
            } => {
                assert_eq!((expected, got), (want, at), "{value:?}");
            }
            other => panic!("{value:?}: {other:?}"),
        };
        syntax(b"=5", Expected::Name, 0);
        syntax(b"max=1, \"x\"", Expected::Name, 7);
        syntax(b"timeout=5 6", Expected::Separator, 10);
        syntax(b"timeout=5;max=1", Expected::Separator, 9);
        syntax(b"foo=\"a\"b", Expected::Separator, 7);
        syntax(b"max=1\x00", Expected::Separator, 5);
        syntax(b"\x01max=1", Expected::Name, 0);
        syntax(b"foo=\"a\x7fb\"", Expected::QuotedText, 6);
        syntax(b"foo=\"a\\\nb\"", Expected::QuotedText, 7);
        syntax(b"foo=a\rb", Expected::Separator, 5);
    }

    #[test]
    fn non_ascii_is_only_allowed_in_quoted_strings() {
        fn syntax_at(value: &[u8], at: usize) {
            assert!(
                matches!(err(value), ErrorKind::Syntax { at: got, .. } if got == at),
                "{value:?}"
            );
        }

        syntax_at(b"m\xc3\xa4x=1", 1);
        syntax_at(b"max=\xc3\xa4", 4);
        syntax_at("timeout=５".as_bytes(), 8);
        assert_eq!(ok("foo=\"ä\", max=1"), ka(None, Some(1)));
    }

    #[test]
    fn error_messages_stay_short() {
        let long = format!("timeout=5{}", "x".repeat(10_000));
        let e = KeepAliveHeader::parse(format!("{long}\"").as_bytes()).unwrap_err();
        assert!(e.to_string().len() < 100, "{e}");
        let e = KeepAliveHeader::parse(b"max=1 \xff").unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid Keep-Alive header: expected `,` or the end of the value at byte 6, found `\\xff`"
        );
    }

    #[test]
    fn from_headers_joins_field_lines() {
        let mut headers = HeaderMap::new();
        assert_eq!(KeepAliveHeader::from_headers(&headers), Ok(None));

        headers.append("keep-alive", HeaderValue::from_static("timeout=5, foo"));
        headers.append("Keep-Alive", HeaderValue::from_static(""));
        headers.append("keep-alive", HeaderValue::from_static("max=100"));
        assert_eq!(
            KeepAliveHeader::from_headers(&headers),
            Ok(Some(ka(Some(5), Some(100))))
        );

        headers.append("keep-alive", HeaderValue::from_static("timeout=6"));
        assert_eq!(
            KeepAliveHeader::from_headers(&headers).map_err(|e| e.kind),
            Err(ErrorKind::Duplicate(Param::Timeout))
        );
    }

    #[test]
    fn formats_present_params_only() {
        assert_eq!(ka(Some(5), Some(100)).to_string(), "timeout=5, max=100");
        assert_eq!(ka(None, Some(100)).to_header_value(), "max=100");
        assert_eq!(KeepAliveHeader::new().to_header_value(), "");
        assert_eq!(
            KeepAliveHeader::new()
                .with_timeout(Duration::from_millis(999))
                .timeout_secs(),
            Some(0)
        );
    }

    #[test]
    fn conversions() {
        let value = HeaderValue::from_static("timeout=5");
        assert_eq!(KeepAliveHeader::try_from(&value), Ok(ka(Some(5), None)));
        assert_eq!("max=2".parse::<KeepAliveHeader>(), Ok(ka(None, Some(2))));
    }

    #[cfg(feature = "headers")]
    #[test]
    fn typed_header_round_trips() {
        use headers::HeaderMapExt;

        let mut headers = HeaderMap::new();
        assert_eq!(headers.typed_get::<KeepAliveHeader>(), None);

        headers.typed_insert(ka(Some(5), Some(100)));
        assert_eq!(headers["keep-alive"], "timeout=5, max=100");
        assert_eq!(headers.typed_get(), Some(ka(Some(5), Some(100))));

        headers.append("keep-alive", HeaderValue::from_static("max=1"));
        assert!(headers.typed_try_get::<KeepAliveHeader>().is_err());

        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.append("keep-alive", HeaderValue::from_static("max=1"));
        assert_eq!(headers.typed_get(), Some(ka(Some(5), Some(1))));
    }

    /// One way to write a known parameter: OWS around `=`, leading zeros,
    /// optional quoting.
    fn spelling() -> impl Strategy<Value = (String, String, usize, bool)> {
        ("[ \t]{0,2}", "[ \t]{0,2}", 0..3usize, any::<bool>())
    }

    fn spell(name: &str, n: u64, (a, b, zeros, quoted): &(String, String, usize, bool)) -> String {
        let digits = format!("{}{n}", "0".repeat(*zeros));
        let value = if *quoted {
            format!("\"{digits}\"")
        } else {
            digits
        };
        format!("{name}{a}={b}{value}")
    }

    fn unknown_param() -> impl Strategy<Value = String> {
        prop_oneof![
            "x-[a-zA-Z0-9]{0,6}",
            "x-[a-z]{0,6}[ \t]{0,2}=[ \t]{0,2}[a-z0-9.-]{1,6}",
            r#"x-[a-z]{0,6}="([a-z ,=;]|\\"){0,6}""#,
        ]
    }

    /// A valid value in some spelling, with the header it must parse to.
    fn variation() -> impl Strategy<Value = (KeepAliveHeader, String)> {
        (
            any::<Option<u64>>(),
            any::<Option<u64>>(),
            "[tT][iI][mM][eE][oO][uU][tT]",
            "[mM][aA][xX]",
            spelling(),
            spelling(),
            vec(unknown_param(), 0..4),
        )
            .prop_flat_map(
                |(timeout, max, t_name, m_name, t_spell, m_spell, mut params)| {
                    params.extend(timeout.map(|n| spell(&t_name, n, &t_spell)));
                    params.extend(max.map(|n| spell(&m_name, n, &m_spell)));
                    let seps = vec("[ \t]{0,2},([ \t]{0,2},)?[ \t]{0,2}", params.len() + 1);
                    (Just(ka(timeout, max)), Just(params).prop_shuffle(), seps)
                },
            )
            .prop_map(|(expected, params, seps)| {
                let mut value = String::new();
                for (param, sep) in params.iter().zip(&seps) {
                    value.push_str(sep);
                    value.push_str(param);
                }
                (expected, value)
            })
    }

    proptest! {
        #[test]
        fn parse_never_panics(bytes in vec(any::<u8>(), 0..64)) {
            let _ = KeepAliveHeader::parse(&bytes);
        }

        #[test]
        fn parse_never_panics_on_near_misses(value in r#"([tTmMaxo= \t,"\\0-9\-]|\x80|\x00){0,40}"#) {
            if let Err(e) = KeepAliveHeader::parse(value.as_bytes()) {
                prop_assert!(e.to_string().len() < 120);
            }
        }

        #[test]
        fn format_then_parse_round_trips(timeout in any::<Option<u64>>(), max in any::<Option<u64>>()) {
            let header = ka(timeout, max);
            prop_assert_eq!(KeepAliveHeader::try_from(&header.to_header_value()), Ok(header));
            prop_assert_eq!(header.to_string().parse(), Ok(header));
        }

        #[test]
        fn spelling_variations_parse_the_same((expected, value) in variation()) {
            prop_assert_eq!(KeepAliveHeader::parse(value.as_bytes()), Ok(expected));
        }
    }
}
