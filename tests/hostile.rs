//! Hostile input on the wire, through the crate's serve path over raw TCP: whatever a peer sends in
//! `Connection`, `Keep-Alive` and friends, nothing panics, the connection ends correctly persistent or
//! closed, a client cannot get a protected field removed by naming it in `Connection`, and the server goes
//! on serving other clients; HTTP/2 clients that send PINGs and never acknowledge the server's are closed
//! after the idle timeout and its grace all the same. Property tests then check the `Connection` token
//! logic of the public `KeepAlive` service against a reference model.

mod support;

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONNECTION, HOST};
use http::{Request, Response, Version};
use http_body_util::Full;
use proptest::prelude::*;
use support::apps::{echo, echoed_names};
use support::http1::{http_get, RawClient, RawResponse};
use support::server::{assert_serves_others, send_until_closed, serve, TestServer};
use tower::{Layer, ServiceExt};
use tower_keepalive::{CloseReason, KeepAliveLayer};

/// The policy of every server here: the first response advertises `timeout=5, max=99`.
fn policy() -> KeepAliveLayer {
    KeepAliveLayer::new()
        .idle_timeout(Duration::from_secs(5))
        .max_requests(100)
}

/// A GET request with arbitrary bytes in its field lines: `GET {path} {version}`, a Host line, `lines`.
fn raw_get(path: &str, version: &str, lines: &[&[u8]]) -> Vec<u8> {
    let mut req = format!("GET {path} {version}\r\nHost: 127.0.0.1\r\n").into_bytes();
    for line in lines {
        req.extend_from_slice(line);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"\r\n");
    req
}

#[track_caller]
fn assert_kept_alive(res: &RawResponse, advert: &str) {
    assert!(res.status_line.ends_with(" 200 OK"), "{res:#?}");
    assert_eq!(res.values("connection"), ["keep-alive"], "{res:#?}");
    assert_eq!(res.values("keep-alive"), [advert], "{res:#?}");
}

#[track_caller]
fn assert_closing(res: &RawResponse) {
    assert!(res.status_line.ends_with(" 200 OK"), "{res:#?}");
    // Exactly one `close`, and nothing that says keep-alive.
    assert_eq!(res.values("connection"), ["close"], "{res:#?}");
    assert!(res.values("keep-alive").is_empty(), "{res:#?}");
}

/// Sends `request` twice on one connection: both answered and kept alive, then the client leaves and the
/// server reports the connection closed by the client after two requests. Returns the first response.
async fn assert_persistent_twice(server: &mut TestServer, request: &[u8]) -> RawResponse {
    let mut client = RawClient::connect(server.addr).await;
    let first = client.request(request).await;
    assert_kept_alive(&first, "timeout=5, max=99");
    let second = client.request(request).await;
    assert_kept_alive(&second, "timeout=5, max=98");
    assert_eq!(first.body, second.body);
    drop(client);
    let closed = server.next_close().await;
    assert_eq!(closed.reason, CloseReason::ClientClosed);
    assert_eq!(closed.handle.requests(), 2);
    assert_eq!(closed.handle.in_flight(), 0);
    first
}

/// Sends `request`: answered with `Connection: close`, then EOF; the server reports the connection closed
/// at the client's request after one request. Returns the response.
async fn assert_closes_after_one(server: &mut TestServer, request: &[u8]) -> RawResponse {
    let mut client = RawClient::connect(server.addr).await;
    let res = client.request(request).await;
    assert_closing(&res);
    client.expect_eof().await;
    let closed = server.next_close().await;
    assert_eq!(closed.reason, CloseReason::ClientClosed);
    assert_eq!(closed.handle.requests(), 1);
    assert_eq!(closed.handle.in_flight(), 0);
    res
}

/// Sends `request`, which hyper must refuse before the service sees it: it answers `status` and closes
/// the connection (or, when `may_cut` and the request is too big to be read whole, may just close it: the
/// reset for the unread rest can overtake the answer), and the server reports it closed on error with no
/// request counted.
async fn assert_refused(
    server: &mut TestServer,
    request: Vec<u8>,
    status: &str,
    may_cut: bool,
) -> String {
    let exchange = send_until_closed(server.addr, request).await;
    let text = exchange.text();
    assert!(
        text.starts_with(status) || (may_cut && text.is_empty()),
        "expected {status:?}, got {text:?}"
    );
    assert!(
        !text.to_ascii_lowercase().contains("keep-alive"),
        "a refused request advertised keep-alive: {text:?}"
    );
    let closed = server.next_close().await;
    assert_eq!(closed.reason, CloseReason::Error, "{text:?}");
    assert_eq!(closed.handle.requests(), 0);
    assert_eq!(closed.handle.in_flight(), 0);
    text
}

#[tokio::test]
async fn thousands_of_connection_tokens_keep_a_connection_alive_and_strip_only_what_they_may() {
    let mut server = serve(policy().strip_request_hop_by_hop(true), echo()).await;

    // 4000 tokens in one field line, about 55 KB: within the serve path's 64 KiB head. One of them names
    // a field the request carries; it is removed, and nothing else is.
    let tokens: Vec<String> = (0..4000).map(|i| format!("x-token-{i}")).collect();
    let connection = format!("Connection: keep-alive, {}", tokens.join(", "));
    let request = raw_get(
        "/",
        "HTTP/1.1",
        &[connection.as_bytes(), b"X-Token-17: named", b"X-Kept: yes"],
    );
    let res = assert_persistent_twice(&mut server, &request).await;
    assert_eq!(echoed_names(&res.body), ["host", "x-kept"], "{res:#?}");

    // The same list with `close` as its very last token: close wins however far down it is.
    let request = raw_get(
        "/",
        "HTTP/1.1",
        &[format!("{connection}, close").as_bytes()],
    );
    assert_closes_after_one(&mut server, &request).await;

    // One token of 60 000 bytes: it names no field of the request, so nothing goes.
    let long = format!("Connection: keep-alive, {}", "a".repeat(60_000));
    let request = raw_get("/", "HTTP/1.1", &[long.as_bytes(), b"X-Kept: yes"]);
    let res = assert_persistent_twice(&mut server, &request).await;
    assert_eq!(echoed_names(&res.body), ["host", "x-kept"], "{res:#?}");

    assert_serves_others(&mut server).await;
    server.finish().await;
}

#[tokio::test]
async fn connection_over_hyper_limits_is_refused_and_others_are_served() {
    let mut server = serve(policy(), echo()).await;

    // One field line longer than the whole head buffer (64 KiB on the serve path, 400 KB in hyper).
    let huge = format!("Connection: {}", "keep-alive, ".repeat(50_000));
    assert_refused(
        &mut server,
        raw_get("/", "HTTP/1.1", &[huge.as_bytes()]),
        "HTTP/1.1 431 Request Header Fields Too Large\r\n",
        true,
    )
    .await;
    assert_serves_others(&mut server).await;

    // More field lines than hyper accepts (100), all of them `Connection`.
    let lines: Vec<&[u8]> = vec![b"Connection: keep-alive, x-a"; 150];
    assert_refused(
        &mut server,
        raw_get("/", "HTTP/1.1", &lines),
        "HTTP/1.1 431 Request Header Fields Too Large\r\n",
        false,
    )
    .await;
    assert_serves_others(&mut server).await;

    server.finish().await;
}

#[tokio::test]
async fn non_ascii_and_invalid_bytes_in_connection_and_keep_alive() {
    let mut server = serve(policy(), echo()).await;

    // obs-text (bytes 0x80 to 0xFF) is allowed in field values: none of these tokens is `close`, so an
    // HTTP/1.1 connection stays persistent, and a `Keep-Alive` full of them is ignored.
    for lines in [
        &[&b"Connection: keep-alive, \xff\xfe\x80, clos\xe9"[..]][..],
        &[
            &b"Connection: cl\xc3\xb6se"[..],
            &b"Keep-Alive: timeout=\xff5, max=\x80"[..],
        ][..],
        &[&b"Connection: \xe2\x80\x8bclose"[..]][..], // a zero-width space glued to `close`
        &[&b"Connection: close\xa0"[..]][..],         // NBSP is not whitespace in HTTP
        &[&b"Keep-Alive: \"\xff\", timeout=\xf0\x9f\x92\xa5"[..]][..],
    ] {
        let res = assert_persistent_twice(&mut server, &raw_get("/", "HTTP/1.1", lines)).await;
        assert!(echoed_names(&res.body).contains(&"host".to_string()));
    }
    // obs-text next to a real `close` token does not hide it.
    assert_closes_after_one(
        &mut server,
        &raw_get("/", "HTTP/1.1", &[b"Connection: \xff\xff, close, \x80"]),
    )
    .await;
    // HTTP/1.0 asks for keep-alive on a line with obs-text: hyper does not read such a line, and closes the
    // connection after the response; so the response must say `close`, not advertise keep-alive.
    assert_closes_after_one(
        &mut server,
        &raw_get("/", "HTTP/1.0", &[b"Connection: \xfe, Keep-Alive, \x81"]),
    )
    .await;
    // The same request with `keep-alive` on a clean line of its own is kept alive.
    assert_persistent_twice(
        &mut server,
        &raw_get(
            "/",
            "HTTP/1.0",
            &[b"Connection: \xfe, \x81", b"Connection: Keep-Alive"],
        ),
    )
    .await;

    // Control bytes and obsolete line folding are not valid field values: hyper refuses the request.
    for line in [
        &b"Connection: close\x01"[..],
        &b"Connection: keep-alive\x00, close"[..],
        &b"Keep-Alive: timeout=5\x7f"[..],
        &b"Connection: keep-alive\r\n close"[..],
        &b"Connection: keep-alive\rclose"[..],
    ] {
        assert_refused(
            &mut server,
            raw_get("/", "HTTP/1.1", &[line]),
            "HTTP/1.1 400 Bad Request\r\n",
            false,
        )
        .await;
        assert_serves_others(&mut server).await;
    }
    server.finish().await;
}

#[tokio::test]
async fn many_connection_field_lines_with_empty_ones() {
    let mut server = serve(policy().strip_request_hop_by_hop(true), echo()).await;

    // 90 `Connection` lines (hyper takes 100 fields): empty values, lone commas, whitespace, and one
    // `keep-alive` in the middle. HTTP/1.1 stays persistent.
    let mut lines: Vec<&[u8]> = Vec::new();
    for i in 0..90 {
        lines.push(match i % 5 {
            0 => b"Connection:",
            1 => b"Connection: ,",
            2 => b"Connection:  , ,\t,",
            3 => b"Connection:\t",
            _ => b"Connection: ,,,x-gone,,",
        });
    }
    lines[45] = b"Connection: , Keep-Alive ,";
    lines.push(b"X-Gone: named in Connection");
    let res = assert_persistent_twice(&mut server, &raw_get("/", "HTTP/1.1", &lines)).await;
    assert_eq!(echoed_names(&res.body), ["host"], "{res:#?}");

    // HTTP/1.0: persistent because of that one `keep-alive`...
    assert_persistent_twice(&mut server, &raw_get("/", "HTTP/1.0", &lines)).await;
    // ...and not without it.
    let mut no_keep_alive = lines.clone();
    no_keep_alive[45] = b"Connection:";
    let mut client = RawClient::connect(server.addr).await;
    let res = client
        .request(raw_get("/", "HTTP/1.0", &no_keep_alive))
        .await;
    assert_closing(&res);
    client.expect_eof().await;
    let closed = server.next_close().await;
    assert_eq!(closed.reason, CloseReason::ClientClosed);

    // One `close` hidden among the empty lines closes, in either version.
    let mut with_close = lines.clone();
    with_close[77] = b"Connection: ,close,";
    for version in ["HTTP/1.1", "HTTP/1.0"] {
        assert_closes_after_one(&mut server, &raw_get("/", version, &with_close)).await;
    }

    assert_serves_others(&mut server).await;
    server.finish().await;
}

#[tokio::test]
async fn absurd_request_keep_alive_values_are_ignored() {
    let absurd: [&[u8]; 12] = [
        b"Keep-Alive: timeout=99999999999999999999",
        b"Keep-Alive: timeout=-1, max=-1",
        b"Keep-Alive: timeout=\"5\", max=\"1000000\"",
        b"Keep-Alive: timeout=1, timeout=2",
        b"Keep-Alive:",
        b"Keep-Alive: timeout",
        b"Keep-Alive: max=0, timeout=0",
        b"Keep-Alive: \"unterminated",
        b"Keep-Alive: ,,,=,=5,",
        b"Keep-Alive: timeout=1e9, max=0x10",
        b"Keep-Alive: 300",
        b"Keep-Alive: timeout=18446744073709551616",
    ];
    let mut server = serve(policy(), echo()).await;
    for line in absurd {
        // The server's own advert, whatever the client said; HTTP/1.0 with keep-alive as well.
        assert_persistent_twice(&mut server, &raw_get("/", "HTTP/1.1", &[line])).await;
        assert_persistent_twice(
            &mut server,
            &raw_get("/", "HTTP/1.0", &[line, b"Connection: keep-alive"]),
        )
        .await;
        // Duplicated on two lines.
        assert_persistent_twice(&mut server, &raw_get("/", "HTTP/1.1", &[line, line])).await;
        // It never overrides a `close`.
        assert_closes_after_one(
            &mut server,
            &raw_get("/", "HTTP/1.1", &[line, b"Connection: close"]),
        )
        .await;
    }
    assert_serves_others(&mut server).await;
    server.finish().await;

    // With request stripping on, the app never sees the client's `Keep-Alive`.
    let mut server = serve(policy().strip_request_hop_by_hop(true), echo()).await;
    for line in absurd {
        let res = assert_persistent_twice(&mut server, &raw_get("/", "HTTP/1.1", &[line])).await;
        assert_eq!(echoed_names(&res.body), ["host"], "{res:#?}");
    }
    server.finish().await;
}

#[tokio::test]
async fn keep_alive_and_close_together_close_in_either_order() {
    let mut server = serve(policy(), echo()).await;
    let cases: [&[&[u8]]; 6] = [
        &[b"Connection: keep-alive, close"],
        &[b"Connection: close, keep-alive"],
        &[b"Connection: Close ,KEEP-ALIVE"],
        &[b"Connection: keep-alive", b"Connection: close"],
        &[b"Connection: close", b"Connection: keep-alive"],
        &[b"Connection: keep-alive,close,keep-alive"],
    ];
    for lines in cases {
        for version in ["HTTP/1.1", "HTTP/1.0"] {
            assert_closes_after_one(&mut server, &raw_get("/", version, lines)).await;
        }
    }
    // An app that says `close` as well: still exactly one `close` on the wire.
    assert_closes_after_one(
        &mut server,
        &raw_get("/close", "HTTP/1.1", &[b"Connection: keep-alive, close"]),
    )
    .await;
    assert_serves_others(&mut server).await;
    server.finish().await;
}

#[tokio::test]
async fn http10_with_transfer_encoding_is_never_kept_alive() {
    let mut server = serve(policy(), echo()).await;
    // RFC 9112 section 6.1: an HTTP/1.0 message with Transfer-Encoding has faulty framing; the server must
    // close the connection. hyper refuses it with 400 before the app sees it.
    for extra in [
        &b"Connection: keep-alive\r\n"[..],
        &b""[..],
        &b"Content-Length: 5\r\n"[..],
    ] {
        let mut request =
            b"POST / HTTP/1.0\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n".to_vec();
        request.extend_from_slice(extra);
        request.extend_from_slice(b"\r\n5\r\nhello\r\n0\r\n\r\n");
        // A second request pipelined behind it must not be answered.
        request
            .extend_from_slice(http_get("/", "HTTP/1.0", &["Connection: keep-alive"]).as_bytes());
        let text =
            assert_refused(&mut server, request, "HTTP/1.1 400 Bad Request\r\n", false).await;
        // Only one answer: nothing behind the refused request ran.
        assert_eq!(text.matches("HTTP/1.").count(), 1, "{text:?}");
        assert_serves_others(&mut server).await;
    }
    server.finish().await;
}

/// The request fields a client names in `Connection` to get them removed on the way to the app.
const NAMED: &[u8] = b"Connection: keep-alive, Host, Authorization, Cookie, Content-Length, \
X-Forwarded-For, Forwarded, X-Hop, X-Tenant";

fn naming_request() -> Vec<u8> {
    raw_get(
        "/",
        "HTTP/1.1",
        &[
            NAMED,
            b"Connection: te, proxy-connection",
            b"Authorization: Bearer secret",
            b"Cookie: session=1",
            b"Content-Length: 0",
            b"X-Forwarded-For: 10.0.0.1",
            b"Forwarded: for=10.0.0.1",
            b"X-Hop: 1",
            b"X-Tenant: t1",
            b"Keep-Alive: timeout=9",
            b"TE: trailers",
            b"Upgrade: websocket",
            b"Proxy-Authorization: Basic eDp5",
            b"Proxy-Connection: keep-alive",
            b"Accept: */*",
        ],
    )
}

#[tokio::test]
async fn naming_protected_fields_in_connection_does_not_strip_them() {
    let mut server = serve(policy().strip_request_hop_by_hop(true), echo()).await;
    let res = assert_persistent_twice(&mut server, &naming_request()).await;
    let mut seen = echoed_names(&res.body);
    seen.sort_unstable();
    assert_eq!(
        seen,
        [
            "accept",
            "authorization",
            "content-length",
            "cookie",
            "forwarded",
            "host",
            "x-forwarded-for",
        ],
        "{}",
        String::from_utf8_lossy(&res.body)
    );
    // The values reach the app untouched.
    let body = String::from_utf8_lossy(&res.body);
    for line in [
        "host: 127.0.0.1",
        "authorization: Bearer secret",
        "cookie: session=1",
        "x-forwarded-for: 10.0.0.1",
        "forwarded: for=10.0.0.1",
    ] {
        assert!(body.lines().any(|l| l == line), "{line} missing: {body}");
    }

    // A request with a body: its `Content-Length` stays, and the body is read right.
    let mut client = RawClient::connect(server.addr).await;
    let res = client
        .request(
            b"POST / HTTP/1.1\r\nHost: a\r\nConnection: Content-Length, Host\r\nContent-Length: 5\r\n\r\nhello"
                .as_slice(),
        )
        .await;
    assert_kept_alive(&res, "timeout=5, max=99");
    let mut seen = echoed_names(&res.body);
    seen.sort_unstable();
    assert_eq!(seen, ["content-length", "host"]);
    drop(client);
    server.next_close().await;

    assert_serves_others(&mut server).await;
    server.finish().await;

    // Without stripping, nothing is removed at all.
    let mut server = serve(policy(), echo()).await;
    let res = assert_persistent_twice(&mut server, &naming_request()).await;
    let seen = echoed_names(&res.body);
    for name in [
        "x-hop",
        "connection",
        "keep-alive",
        "te",
        "proxy-authorization",
    ] {
        assert!(seen.iter().any(|s| s == name), "{name} removed: {seen:?}");
    }
    server.finish().await;
}

#[tokio::test]
async fn a_custom_protected_list_is_followed() {
    let tenant = HeaderName::from_static("x-tenant");
    let layer = policy()
        .strip_request_hop_by_hop(true)
        .protect_request_fields([HOST, tenant]);
    let mut server = serve(layer, echo()).await;
    let res = assert_persistent_twice(&mut server, &naming_request()).await;
    let mut seen = echoed_names(&res.body);
    seen.sort_unstable();
    // Only `Host` and `X-Tenant` are protected now: the rest that the client named are gone.
    assert_eq!(seen, ["accept", "host", "x-tenant"], "{seen:?}");
    assert_serves_others(&mut server).await;
    server.finish().await;

    // An empty list protects nothing, `Host` included.
    let layer = policy()
        .strip_request_hop_by_hop(true)
        .protect_request_fields([]);
    let mut server = serve(layer, echo()).await;
    let res = assert_persistent_twice(&mut server, &naming_request()).await;
    assert_eq!(echoed_names(&res.body), ["accept"], "{res:#?}");
    assert_serves_others(&mut server).await;
    server.finish().await;
}

// ---------------------------------------------------------------------------------------------------
// Property tests: the `Connection` token logic against a reference model, through the public service.

/// One list element as a client might write it.
#[derive(Clone, Debug)]
enum Token {
    Close,
    KeepAlive,
    Upgrade,
    /// Any other token (a field name, or junk that only looks like one of the above).
    Other(String),
    /// An empty list element.
    Empty,
}

fn token() -> impl Strategy<Value = Token> {
    prop_oneof![
        3 => Just(Token::Close),
        3 => Just(Token::KeepAlive),
        1 => Just(Token::Upgrade),
        2 => Just(Token::Empty),
        3 => prop_oneof![
            Just("closed".to_string()),
            Just("keep-alive2".to_string()),
            Just("keepalive".to_string()),
            Just("x-close".to_string()),
            Just("te".to_string()),
            Just("X-Probe".to_string()),
            "[a-zA-Z0-9!#$%&'*+.^_`|~-]{1,12}",
        ]
        .prop_map(Token::Other),
    ]
}

/// `word` with the case of each letter flipped where `mask` says so.
fn recase(word: &str, mask: u64) -> String {
    word.chars()
        .enumerate()
        .map(|(i, c)| {
            if mask >> (i % 64) & 1 == 1 {
                c.to_ascii_uppercase()
            } else {
                c.to_ascii_lowercase()
            }
        })
        .collect()
}

/// A request's `Connection` field lines: the tokens with random case and whitespace, split over lines.
fn connection_lines() -> impl Strategy<Value = (Vec<Token>, Vec<String>)> {
    prop::collection::vec(
        (token(), any::<u64>(), "[ \t]{0,2}", "[ \t]{0,2}", 0u8..4),
        0..12,
    )
    .prop_map(|elements| {
        let mut lines = vec![String::new()];
        let mut tokens = Vec::new();
        for (token, mask, before, after, split) in elements {
            let word = match &token {
                Token::Close => recase("close", mask),
                Token::KeepAlive => recase("keep-alive", mask),
                Token::Upgrade => recase("upgrade", mask),
                Token::Other(other) => other.clone(),
                Token::Empty => String::new(),
            };
            // `split == 0`: this element starts a new field line.
            if split == 0 {
                lines.push(String::new());
            }
            let line = lines.last_mut().unwrap();
            if !line.is_empty() || split == 1 {
                line.push(',');
            }
            line.push_str(&before);
            line.push_str(&word);
            line.push_str(&after);
            tokens.push(token);
        }
        (tokens, lines)
    })
}

/// The reference model (RFC 9112 section 9.3): `close` anywhere closes; HTTP/1.0 is persistent only with
/// `keep-alive`; HTTP/1.1 is persistent unless `close`.
fn model_persistent(version: Version, tokens: &[Token]) -> bool {
    let close = tokens.iter().any(|t| matches!(t, Token::Close));
    let keep_alive = tokens.iter().any(|t| matches!(t, Token::KeepAlive));
    match version {
        Version::HTTP_11 => !close,
        _ => keep_alive && !close,
    }
}

fn run_case(version: Version, lines: &[String]) -> (http::HeaderMap, Option<CloseReason>, Version) {
    let layer = KeepAliveLayer::new()
        .idle_timeout(Duration::from_secs(5))
        .unlimited_requests();
    let handle = layer.connection();
    let svc = layer
        .bind(handle.clone())
        .layer(tower::service_fn(|_req: Request<()>| async {
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
        }));
    let mut req = Request::builder().version(version).body(()).unwrap();
    for line in lines {
        req.headers_mut()
            .append(CONNECTION, HeaderValue::from_str(line).unwrap());
    }
    // The service is ready at once and answers at once: no runtime needed.
    let res = futures_util::FutureExt::now_or_never(svc.oneshot(req))
        .expect("the service answers at once")
        .unwrap();
    let reason = handle.close_reason();
    let (parts, body) = res.into_parts();
    assert_eq!(handle.in_flight(), 1);
    drop(body);
    assert_eq!(handle.in_flight(), 0);
    (parts.headers, reason, parts.version)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 2000,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn persistence_follows_the_reference_model(
        (tokens, lines) in connection_lines(),
        http10 in any::<bool>(),
    ) {
        let version = if http10 { Version::HTTP_10 } else { Version::HTTP_11 };
        let (headers, reason, res_version) = run_case(version, &lines);
        let connection: Vec<&[u8]> = headers.get_all(CONNECTION).iter().map(|v| v.as_bytes()).collect();
        if model_persistent(version, &tokens) {
            prop_assert_eq!(reason, None);
            prop_assert_eq!(connection, [&b"keep-alive"[..]]);
            prop_assert_eq!(&headers["keep-alive"], "timeout=5");
        } else {
            prop_assert_eq!(reason, Some(CloseReason::ClientClosed));
            prop_assert_eq!(connection, [&b"close"[..]]);
            prop_assert!(!headers.contains_key("keep-alive"));
            // hyper keeps an HTTP/1.0 keep-alive connection open unless the response says HTTP/1.0.
            if http10 {
                prop_assert_eq!(res_version, Version::HTTP_10);
            }
        }
    }

    /// The same requests with request stripping on: the decision does not change, the inner service
    /// never sees `Connection`, and a token that is a field name removes exactly that field.
    #[test]
    fn stripping_does_not_change_the_decision(
        (tokens, lines) in connection_lines(),
        http10 in any::<bool>(),
    ) {
        let version = if http10 { Version::HTTP_10 } else { Version::HTTP_11 };
        let layer = KeepAliveLayer::new().strip_request_hop_by_hop(true).unlimited_requests();
        let handle = layer.connection();
        let svc = layer.bind(handle.clone()).layer(tower::service_fn(|req: Request<()>| async move {
            let names: Vec<String> = req.headers().keys().map(|k| k.to_string()).collect();
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(names.join(",")))))
        }));
        let mut req = Request::builder().version(version).header("x-probe", "1").body(()).unwrap();
        for line in &lines {
            req.headers_mut().append(CONNECTION, HeaderValue::from_str(line).unwrap());
        }
        let named_probe = tokens.iter().any(|t| matches!(t, Token::Other(o) if o.eq_ignore_ascii_case("x-probe")));
        let res = futures_util::FutureExt::now_or_never(svc.oneshot(req)).unwrap().unwrap();
        let persistent = handle.close_reason().is_none();
        prop_assert_eq!(persistent, model_persistent(version, &tokens));
        let seen = futures_util::FutureExt::now_or_never(http_body_util::BodyExt::collect(res.into_body()))
            .unwrap()
            .unwrap()
            .to_bytes();
        let seen = String::from_utf8(seen.to_vec()).unwrap();
        prop_assert!(!seen.split(',').any(|n| n == "connection"), "{}", seen);
        prop_assert_eq!(seen.split(',').any(|n| n == "x-probe"), !named_probe, "{}", seen);
        prop_assert_eq!(handle.in_flight(), 0);
    }
}

/// A request head over 64 KiB is refused with 431 as soon as the buffer is full, whether or not the head
/// would ever end, instead of being buffered to hyper's ~400 KB; the server keeps serving.
#[tokio::test]
async fn a_request_head_over_64_kib_is_refused_with_431() {
    let mut server = serve(policy(), echo()).await;
    // Within the limit: served.
    let fine = format!("X-Big: {}", "a".repeat(60 * 1024));
    let mut client = RawClient::connect(server.addr).await;
    let res = client.request(http_get("/", "HTTP/1.1", &[&fine])).await;
    assert!(res.status_line.ends_with(" 200 OK"), "{res:#?}");
    drop(client);
    server.next_close().await;
    // 100 KiB of fields: refused.
    let big = format!("X-Big: {}", "a".repeat(100 * 1024));
    assert_refused(
        &mut server,
        raw_get("/", "HTTP/1.1", &[big.as_bytes()]),
        "HTTP/1.1 431 Request Header Fields Too Large\r\n",
        true,
    )
    .await;
    // A head that never ends (400 KB sent, the write side kept open): refused once 64 KiB of it have
    // arrived, long before the 5 s idle timeout would drop it.
    let mut endless = b"GET / HTTP/1.1\r\nHost: x\r\n".to_vec();
    for _ in 0..400 {
        endless.extend_from_slice(format!("X-More: {}\r\n", "b".repeat(1000)).as_bytes());
    }
    let began = std::time::Instant::now();
    assert_refused(
        &mut server,
        endless,
        "HTTP/1.1 431 Request Header Fields Too Large\r\n",
        true,
    )
    .await;
    let took = began.elapsed();
    assert!(took < Duration::from_secs(3), "refused after {took:?}");
    assert_serves_others(&mut server).await;
    server.finish().await;
}

/// `Serve::http_builder` reaches hyper: a tighter HTTP/1 buffer turns a 20 KB head that the default
/// accepts into a 431, and the server keeps serving.
#[tokio::test]
async fn http_builder_limits_reach_hyper() {
    use axum::routing::get;
    let app = axum::Router::new().route("/", get(|| async { "hello" }));
    let big = format!("X-Big: {}", "a".repeat(20 * 1024));
    let mut statuses = Vec::new();
    for tight in [false, true] {
        let mut builder = TestServer::builder(KeepAliveLayer::new());
        if tight {
            builder = builder.http_builder(|builder| {
                builder.http1().max_buf_size(8 * 1024);
            });
        }
        let server = builder.serve(app.clone());
        let addr = server.addr;
        let mut client = RawClient::connect(addr).await;
        let res = client.request(http_get("/", "HTTP/1.1", &[&big])).await;
        statuses.push(res.status_line.clone());
        // Another client is still served.
        let mut other = RawClient::connect(addr).await;
        let res = other.request(http_get("/", "HTTP/1.1", &[])).await;
        assert_eq!(res.body_str(), "hello");
    }
    assert_eq!(
        statuses,
        [
            "HTTP/1.1 200 OK",
            "HTTP/1.1 431 Request Header Fields Too Large"
        ]
    );
}

// HTTP/2 clients that keep a connection writing with PINGs of their own and never acknowledge the
// server's, on both serve paths.
#[cfg(feature = "axum")]
mod pingers {
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use crate::support::apps::bulk;
    use crate::support::both::{serve_on, Path, Server};
    use crate::support::http2::{RawH2, DATA, GOAWAY};
    use crate::support::{SLACK, WAIT};
    use tower_keepalive::KeepAliveLayer;

    async fn start(path: Path, layer: KeepAliveLayer) -> Server {
        serve_on(path, layer, bulk(Arc::new(AtomicUsize::new(0)))).await
    }

    /// A client that opens no stream and sends PINGs without acknowledging the server's is closed after the
    /// idle timeout and a short grace period: the acknowledgements the server writes do not push the grace
    /// on.
    async fn h2_pinger_without_streams_is_closed(path: Path) {
        let idle = Duration::from_secs(1);
        let server = start(path, KeepAliveLayer::new().idle_timeout(idle)).await;
        let began = Instant::now();
        let mut client = RawH2::connect(server.addr).await.never_acknowledge_pings();
        let (frames, closed) = client.ping_until_closed(idle + WAIT).await;
        let took = closed - began;
        assert!(took >= idle, "{path:?}: closed after {took:?}");
        // The idle timeout, then (serve path) a grace of one second after GOAWAY.
        assert!(
            took < idle + Duration::from_secs(1) + SLACK,
            "{path:?}: closed after {took:?}"
        );
        if let Path::Serve = path {
            assert!(frames.iter().any(|f| f.kind == GOAWAY), "{frames:?}");
        }
    }

    #[tokio::test]
    async fn h2_pinger_without_streams_is_closed_after_the_idle_timeout_serve() {
        h2_pinger_without_streams_is_closed(Path::Serve).await;
    }

    #[tokio::test]
    async fn h2_pinger_without_streams_is_closed_after_the_idle_timeout_axum() {
        h2_pinger_without_streams_is_closed(Path::Axum).await;
    }

    /// The same after a request: the grace after GOAWAY is then the send timeout (for response data h2
    /// may still hold), and it is not pushed on by PINGs either.
    #[tokio::test]
    async fn h2_pinger_after_a_request_is_closed_after_the_idle_timeout_and_its_grace() {
        let idle = Duration::from_secs(1);
        let grace = Duration::from_secs(2);
        let server = start(
            Path::Serve,
            KeepAliveLayer::new().idle_timeout(idle).send_timeout(grace),
        )
        .await;
        let mut client = RawH2::connect(server.addr).await.never_acknowledge_pings();
        client.get(1).await;
        let began = Instant::now();
        let (frames, closed) = client.ping_until_closed(idle + grace + WAIT).await;
        assert!(
            frames.iter().any(|f| f.kind == DATA && f.stream == 1),
            "{frames:?}"
        );
        assert!(frames.iter().any(|f| f.kind == GOAWAY), "{frames:?}");
        let took = closed - began;
        assert!(took >= idle, "closed after {took:?}");
        assert!(took < idle + grace + SLACK, "closed after {took:?}");
    }
}
