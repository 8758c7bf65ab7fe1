//! The apps the test servers serve: [`fields`] (connection-specific fields of every kind, for the field
//! rewriting), [`echo`] (echoes the request's fields, for hostile input) and [`timed`] (slow, streaming,
//! large and WebSocket routes, for the lifecycle) and [`bulk`] (bodies larger than the socket buffers, and
//! a counted route, for clients that hold a connection by not reading).

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::response::Response as AxumResponse;
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONNECTION};
use http::{Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use tokio::sync::mpsc;
use tower::util::BoxCloneService;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// A body that cannot fail.
pub type Body = BoxBody<Bytes, Infallible>;
pub type App = BoxCloneService<Request<Incoming>, Response<Body>, Infallible>;
/// A body that may fail, as a faulty handler's does.
pub type FallibleBody = BoxBody<Bytes, BoxError>;
pub type FallibleApp = BoxCloneService<Request<Incoming>, Response<FallibleBody>, Infallible>;

/// The app of the field-rewriting tests (HTTP/1 and h2c), for the layer on its own.
///
/// - `/`: `hello`, length known in advance.
/// - `/stream`: `hello world` in two chunks, length unknown.
/// - `/close`: the app itself says `Connection: close`.
/// - `/hop`: connection-specific fields of every kind, two `Connection` field lines naming `X-Custom` and
///   `X-Other`, plus `X-Kept` and `Content-Type` that must survive.
/// - `/ka99`: the app sends its own `Keep-Alive: timeout=99, max=1000`.
/// - `/ka99-conn`: the same with `Connection: Keep-Alive`.
pub fn fields() -> App {
    BoxCloneService::new(tower::service_fn(|req: Request<Incoming>| async move {
        Ok::<_, Infallible>(route(req.uri().path()))
    }))
}

pub fn route(path: &str) -> Response<Body> {
    let full = |s: &'static str| Full::new(Bytes::from_static(s.as_bytes())).boxed();
    match path {
        "/" => Response::new(full("hello")),
        "/stream" => {
            let chunks = [Bytes::from_static(b"hello "), Bytes::from_static(b"world")]
                .map(|chunk| Ok::<_, Infallible>(Frame::data(chunk)));
            Response::new(StreamBody::new(futures_util::stream::iter(chunks)).boxed())
        }
        "/close" => with_headers(full("bye"), &[("connection", "close")]),
        "/hop" => with_headers(
            full("hop"),
            &[
                ("connection", "X-Custom"),
                ("connection", "X-Other"),
                ("x-custom", "1"),
                ("x-other", "2"),
                ("keep-alive", "timeout=99"),
                ("proxy-connection", "keep-alive"),
                ("upgrade", "foo"),
                ("te", "trailers"),
                ("x-kept", "yes"),
                ("content-type", "text/plain"),
            ],
        ),
        "/ka99" => with_headers(full("hello"), &[("keep-alive", "timeout=99, max=1000")]),
        "/ka99-conn" => with_headers(
            full("hello"),
            &[
                ("connection", "Keep-Alive"),
                ("keep-alive", "timeout=99, max=1000"),
            ],
        ),
        _ => {
            let mut res = Response::new(full("not found"));
            *res.status_mut() = StatusCode::NOT_FOUND;
            res
        }
    }
}

fn with_headers(body: Body, headers: &[(&'static str, &'static str)]) -> Response<Body> {
    let mut res = Response::new(body);
    for (name, value) in headers {
        res.headers_mut().append(
            HeaderName::from_static(name),
            HeaderValue::from_static(value),
        );
    }
    res
}

/// A body of known length.
pub fn full(bytes: impl Into<Bytes>) -> FallibleBody {
    Full::new(bytes.into()).map_err(|e| match e {}).boxed()
}

/// The app of the hostile-input tests: answers with the request's fields, one `name: value` line each (values that are
/// not UTF-8 shown lossily), with a known length. `/close` adds `Connection: close` from the app.
pub fn echo() -> FallibleApp {
    BoxCloneService::new(tower::service_fn(|req: Request<Incoming>| async move {
        let mut text = String::new();
        for (name, value) in req.headers() {
            text.push_str(name.as_str());
            text.push_str(": ");
            text.push_str(&String::from_utf8_lossy(value.as_bytes()));
            text.push('\n');
        }
        let mut res = Response::new(full(text));
        if req.uri().path() == "/close" {
            res.headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
        }
        Ok::<_, Infallible>(res)
    }))
}

/// The field names in an [`echo`] body.
pub fn echoed_names(body: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(body)
        .lines()
        .filter_map(|line| line.split_once(": ").map(|(name, _)| name.to_string()))
        .collect()
}

/// The app of the lifecycle tests (idle, maximum requests and age, drain, lame duck):
///
/// - `/`: `hello`;
/// - `/slow?ms=N`: reports `"slow"`, then answers `slept` after N ms;
/// - `/stream?chunks=N&ms=M`: reports `"stream"`, then a body of N chunks `chunk {i}\n`, M ms apart;
/// - `/big?bytes=N`: N bytes of `x`, length known;
/// - `/ws`: a WebSocket echo.
pub fn timed(started: mpsc::UnboundedSender<&'static str>) -> Router {
    Router::new()
        .route("/", get(|| async { "hello" }))
        .route("/slow", get(slow))
        .route("/stream", get(stream))
        .route("/big", get(big))
        .route("/ws", get(ws))
        .with_state(started)
}

type Started = State<mpsc::UnboundedSender<&'static str>>;

fn param(q: &HashMap<String, String>, name: &str) -> u64 {
    q.get(name)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("missing ?{name}="))
}

async fn slow(State(started): Started, Query(q): Query<HashMap<String, String>>) -> &'static str {
    let _ = started.send("slow");
    tokio::time::sleep(Duration::from_millis(param(&q, "ms"))).await;
    "slept"
}

async fn stream(State(started): Started, Query(q): Query<HashMap<String, String>>) -> AxumResponse {
    let _ = started.send("stream");
    let (chunks, ms) = (param(&q, "chunks"), param(&q, "ms"));
    let body = futures_util::stream::unfold(0, move |i| async move {
        if i == chunks {
            return None;
        }
        if i > 0 {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        Some((
            Ok::<_, Infallible>(Bytes::from(format!("chunk {i}\n"))),
            i + 1,
        ))
    });
    Response::new(axum::body::Body::from_stream(body))
}

/// The body `/stream?chunks=N` sends.
pub fn stream_body(chunks: u64) -> String {
    (0..chunks).map(|i| format!("chunk {i}\n")).collect()
}

async fn big(Query(q): Query<HashMap<String, String>>) -> Vec<u8> {
    vec![b'x'; param(&q, "bytes") as usize]
}

async fn ws(upgrade: WebSocketUpgrade) -> AxumResponse {
    upgrade.on_upgrade(ws_echo)
}

async fn ws_echo(mut socket: WebSocket) {
    use axum::extract::ws::Message;
    while let Some(Ok(msg)) = socket.recv().await {
        let echoed = matches!(msg, Message::Text(_) | Message::Binary(_));
        if matches!(msg, Message::Close(_)) || (echoed && socket.send(msg).await.is_err()) {
            break;
        }
    }
}

/// The app of the send-timeout tests:
///
/// - `/`: `hello`;
/// - `/count`: `counted`, counting its runs in `hits`;
/// - `/big?bytes=N`: N bytes of `x` streamed in 64 KiB frames, so that a body far larger than the socket
///   buffers is never held whole.
pub fn bulk(hits: Arc<AtomicUsize>) -> Router {
    Router::new()
        .route("/", get(|| async { "hello" }))
        .route(
            "/count",
            get(move || async move {
                hits.fetch_add(1, Ordering::SeqCst);
                "counted"
            }),
        )
        .route("/big", get(big_stream))
}

async fn big_stream(Query(q): Query<HashMap<String, String>>) -> AxumResponse {
    const FRAME: u64 = 64 * 1024;
    let frame = Bytes::from(vec![b'x'; FRAME as usize]);
    let body = futures_util::stream::unfold(param(&q, "bytes"), move |left| {
        let frame = frame.clone();
        async move {
            let n = left.min(FRAME);
            (n != 0).then(|| (Ok::<_, Infallible>(frame.slice(..n as usize)), left - n))
        }
    });
    Response::new(axum::body::Body::from_stream(body))
}
