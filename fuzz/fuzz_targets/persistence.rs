//! The layer's persistence decision and header rewrite, through the public `KeepAlive` service bound to
//! a connection handle: a request of any version with arbitrary `Connection` / `Keep-Alive` lines (any
//! bytes a `HeaderValue` accepts), an inner response with arbitrary status and fields, any policy and any
//! state of the connection. Checks:
//!
//! - never `keep-alive` and `close` together in the response's `Connection`;
//! - no `Keep-Alive` on a closing response;
//! - a close decided before (by the client, the connection, a limit) is never turned back;
//! - HTTP/2 and HTTP/3 responses carry no connection-specific field;
//! - `101 Switching Protocols` is left untouched;
//! - the handle's in-flight count is back to zero once the body is finished or dropped.

#![no_main]

use std::convert::Infallible;
use std::future::Future;
use std::pin::{pin, Pin};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONNECTION};
use http::{HeaderMap, Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use tower_keepalive::{CloseReason, KeepAliveHeader, KeepAliveLayer};
use tower_layer::Layer;
use tower_service::Service;

#[derive(Arbitrary, Debug)]
enum RequestField {
    Connection,
    KeepAlive,
    Other,
}

#[derive(Arbitrary, Debug)]
enum ResponseField {
    Connection,
    KeepAlive,
    ContentLength,
    TransferEncoding,
    Upgrade,
    ProxyConnection,
    Te,
    /// A field that a `Connection` token may name.
    XHop,
}

#[derive(Arbitrary, Debug)]
enum BodyKind {
    Empty,
    /// Known length.
    Full(Vec<u8>),
    /// Unknown length, one chunk.
    Stream(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
struct Input {
    version: u8,
    head: bool,
    request: Vec<(RequestField, Vec<u8>)>,
    status: u16,
    response: Vec<(ResponseField, Vec<u8>)>,
    body: BodyKind,
    /// 0: unlimited.
    max_requests: u8,
    idle_ms: u16,
    advertise: bool,
    http10_keep_alive: bool,
    strip_request: bool,
    /// Requests served on the connection before this one.
    earlier: u8,
    /// A close decided before this request: by drain, say.
    closing: bool,
    /// Finish the body (`true`) or drop it unread.
    finish_body: bool,
}

/// A response body of the three kinds above.
struct TestBody {
    data: Option<Bytes>,
    exact: bool,
}

impl Body for TestBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.data.take().map(|d| Ok(Frame::data(d))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        match (&self.data, self.exact) {
            (None, _) => SizeHint::with_exact(0),
            (Some(d), true) => SizeHint::with_exact(d.len() as u64),
            (Some(_), false) => SizeHint::default(),
        }
    }
}

/// Polls once: everything here is ready at once.
fn now<F: Future>(fut: F) -> F::Output {
    let mut cx = Context::from_waker(Waker::noop());
    match pin!(fut).poll(&mut cx) {
        Poll::Ready(out) => out,
        Poll::Pending => panic!("not ready at once"),
    }
}

/// The tokens of every `Connection` line, lower-cased.
fn tokens(headers: &HeaderMap) -> Vec<Vec<u8>> {
    headers
        .get_all(CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(|t| t.trim_ascii().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect()
}

fuzz_target!(|input: Input| {
    let version = match input.version % 5 {
        0 => Version::HTTP_09,
        1 => Version::HTTP_10,
        2 => Version::HTTP_11,
        3 => Version::HTTP_2,
        _ => Version::HTTP_3,
    };
    let Ok(status) = StatusCode::from_u16(input.status) else {
        return;
    };

    let mut layer = KeepAliveLayer::new()
        .idle_timeout(Duration::from_millis(u64::from(input.idle_ms)))
        .advertise(input.advertise)
        .http10_keep_alive(input.http10_keep_alive)
        .strip_request_hop_by_hop(input.strip_request);
    layer = match input.max_requests {
        0 => layer.unlimited_requests(),
        n => layer.max_requests(u64::from(n)),
    };
    let handle = layer.connection();
    let bound = layer.bind(handle.clone());

    // Earlier requests on the same connection, each finished.
    for _ in 0..input.earlier % 8 {
        let mut svc = bound.layer(tower_service_fn(|| {
            Response::new(TestBody {
                data: None,
                exact: true,
            })
        }));
        let req = Request::builder().version(version).body(()).unwrap();
        drop(now(svc.call(req)).unwrap());
    }
    if input.closing {
        handle.close(CloseReason::Drain);
    }
    let closing_before = handle.is_closing();
    assert_eq!(handle.in_flight(), 0);

    let mut req = Request::builder()
        .version(version)
        .method(if input.head { "HEAD" } else { "GET" })
        .body(())
        .unwrap();
    for (field, value) in &input.request {
        let Ok(value) = HeaderValue::from_bytes(value) else {
            continue;
        };
        let name = match field {
            RequestField::Connection => CONNECTION,
            RequestField::KeepAlive => HeaderName::from_static("keep-alive"),
            RequestField::Other => HeaderName::from_static("x-hop"),
        };
        req.headers_mut().append(name, value);
    }
    let request_close = tokens(req.headers()).iter().any(|t| t == b"close");

    let mut res = Response::new(match &input.body {
        BodyKind::Empty => TestBody {
            data: None,
            exact: true,
        },
        BodyKind::Full(d) => TestBody {
            data: Some(Bytes::from(d.clone())),
            exact: true,
        },
        BodyKind::Stream(d) => TestBody {
            data: Some(Bytes::from(d.clone())),
            exact: false,
        },
    });
    *res.status_mut() = status;
    for (field, value) in &input.response {
        let Ok(value) = HeaderValue::from_bytes(value) else {
            continue;
        };
        let name = match field {
            ResponseField::Connection => CONNECTION,
            ResponseField::KeepAlive => HeaderName::from_static("keep-alive"),
            ResponseField::ContentLength => http::header::CONTENT_LENGTH,
            ResponseField::TransferEncoding => http::header::TRANSFER_ENCODING,
            ResponseField::Upgrade => http::header::UPGRADE,
            ResponseField::ProxyConnection => HeaderName::from_static("proxy-connection"),
            ResponseField::Te => http::header::TE,
            ResponseField::XHop => HeaderName::from_static("x-hop"),
        };
        res.headers_mut().append(name, value);
    }
    let original = res.headers().clone();
    let named: Vec<HeaderName> = tokens(&original)
        .iter()
        .filter_map(|t| HeaderName::from_bytes(t).ok())
        .collect();

    let mut svc = bound.layer(tower_service_fn(move || {
        // Handed out once.
        std::mem::replace(&mut res, Response::new(TestBody { data: None, exact: true }))
    }));
    let out = now(svc.call(req)).unwrap();
    let (parts, mut body) = out.into_parts();
    let headers = &parts.headers;
    let conn = tokens(headers);
    let says_close = conn.iter().any(|t| t == b"close");
    let says_keep_alive = conn.iter().any(|t| t == b"keep-alive");

    match version {
        Version::HTTP_2 | Version::HTTP_3 => {
            for name in [
                "connection",
                "keep-alive",
                "proxy-connection",
                "transfer-encoding",
                "upgrade",
                "te",
            ] {
                assert!(!headers.contains_key(name), "{name} in {version:?}: {headers:?}");
            }
            for name in &named {
                assert!(!headers.contains_key(name), "{name} (named) in {version:?}: {headers:?}");
            }
        }
        Version::HTTP_10 | Version::HTTP_11 if status == StatusCode::SWITCHING_PROTOCOLS => {
            assert_eq!(headers, &original, "101 rewritten");
        }
        Version::HTTP_10 | Version::HTTP_11 => {
            assert!(
                !(says_close && says_keep_alive),
                "keep-alive and close together: {headers:?}"
            );
            assert!(says_close || says_keep_alive, "no decision on the wire: {headers:?}");
            assert_eq!(says_close, handle.is_closing(), "wire and handle disagree: {headers:?}");
            if says_close {
                assert!(!headers.contains_key("keep-alive"), "Keep-Alive on close: {headers:?}");
                if version == Version::HTTP_10 {
                    assert_eq!(parts.version, Version::HTTP_10);
                }
            }
            if closing_before || request_close {
                assert!(says_close, "a close was turned back: {headers:?}");
            }
            if says_keep_alive && input.advertise {
                let values: Vec<_> = headers.get_all("keep-alive").iter().collect();
                assert_eq!(values.len(), 1, "{headers:?}");
                let advert = KeepAliveHeader::parse(values[0].as_bytes()).unwrap();
                assert_eq!(
                    advert.timeout_secs(),
                    Some(u64::from(input.idle_ms) / 1000),
                    "{headers:?}"
                );
            }
        }
        _ => {}
    }

    // Done means the body is finished or dropped.
    if input.finish_body {
        let mut cx = Context::from_waker(Waker::noop());
        while let Poll::Ready(Some(_)) = Pin::new(&mut body).poll_frame(&mut cx) {}
        assert_eq!(handle.in_flight(), 0, "finished body still in flight");
    }
    drop(body);
    assert_eq!(handle.in_flight(), 0);
});

/// A service answering every request with `make()`, ready at once.
fn tower_service_fn<F>(make: F) -> ServiceFn<F> {
    ServiceFn(make)
}

#[derive(Clone)]
struct ServiceFn<F>(F);

impl<F> Service<Request<()>> for ServiceFn<F>
where
    F: FnMut() -> Response<TestBody>,
{
    type Response = Response<TestBody>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Response<TestBody>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _req: Request<()>) -> Self::Future {
        std::future::ready(Ok((self.0)()))
    }
}
