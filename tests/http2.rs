//! HTTP/2 (h2c, prior knowledge, on the same port as HTTP/1) and HTTP/3 requests: no connection-specific
//! field leaves, and every stream is counted on its connection's handle.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use futures_util::StreamExt;
use http::{HeaderMap, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::apps::{fields, route, App};
use support::hyper_loop::{start_server, start_server_without_handles, Server};
use support::within;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tower::util::BoxCloneService;
use tower::{Layer, ServiceExt};
use tower_keepalive::{CloseReason, ConnectionHandle, KeepAliveLayer};

/// Every field that must not appear in an HTTP/2 or HTTP/3 response of `/hop`.
const CONNECTION_SPECIFIC: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "upgrade",
    "transfer-encoding",
    "te",
    // Named in the first and the second `Connection` field line.
    "x-custom",
    "x-other",
];

/// Opens an h2c connection (prior knowledge) and returns its sender with the server side's handle.
async fn connect_h2(server: &mut Server) -> (SendRequest<Empty<Bytes>>, ConnectionHandle) {
    let stream = within("connect", TcpStream::connect(server.addr))
        .await
        .unwrap();
    let handle = server.next_conn().await;
    let (sender, conn) = within(
        "the h2 handshake",
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    (sender, handle)
}

/// GET `path` on an h2 connection; returns the status, the fields and the whole body.
async fn h2_get(
    sender: &mut SendRequest<Empty<Bytes>>,
    addr: SocketAddr,
    path: &str,
) -> (StatusCode, HeaderMap, Bytes) {
    within("the sender to be ready", sender.ready())
        .await
        .unwrap();
    let req = Request::get(format!("http://{addr}{path}"))
        .body(Empty::new())
        .unwrap();
    let res = within("a response", sender.send_request(req))
        .await
        .unwrap();
    assert_eq!(res.version(), Version::HTTP_2);
    let (parts, body) = res.into_parts();
    let body = within("the response body", body.collect())
        .await
        .unwrap()
        .to_bytes();
    (parts.status, parts.headers, body)
}

#[track_caller]
fn assert_stripped(headers: &HeaderMap) {
    for name in CONNECTION_SPECIFIC {
        assert!(!headers.contains_key(name), "{name} sent: {headers:#?}");
    }
    assert_eq!(headers["x-kept"], "yes");
    assert_eq!(headers["content-type"], "text/plain");
}

#[tokio::test]
async fn connection_specific_fields_never_reach_an_h2_client() {
    let mut server = start_server(KeepAliveLayer::new(), fields()).await;
    let (mut sender, handle) = connect_h2(&mut server).await;
    let (status, headers, body) = h2_get(&mut sender, server.addr, "/hop").await;
    assert_eq!(status, StatusCode::OK);
    assert_stripped(&headers);
    assert_eq!(body, "hop");
    assert_eq!(handle.requests(), 1);
    // `Connection` is not an HTTP/2 signal: nothing closes.
    assert_eq!(handle.close_reason(), None);
}

/// The control case for the test above: hyper alone removes the fields named in the first `Connection`
/// line only, so `X-Other` (named in the second) reaches the client. The layer is what removes it there.
/// If a hyper release starts removing it too, this control has served its purpose and can go.
#[tokio::test]
async fn without_the_layer_a_field_named_on_a_second_connection_line_leaks() {
    let mut server = start_server_without_handles(fields()).await;
    let (mut sender, _handle) = connect_h2(&mut server).await;
    let (_, headers, _) = h2_get(&mut sender, server.addr, "/hop").await;
    assert_eq!(
        headers.get("x-other").map(|v| v.as_bytes()),
        Some(&b"2"[..])
    );
    assert!(!headers.contains_key("x-custom"));
}

/// Without hyper in the way: the layer itself strips the fields when the request is HTTP/2 or HTTP/3.
#[tokio::test]
async fn the_layer_strips_h2_and_h3_responses_itself() {
    for version in [Version::HTTP_2, Version::HTTP_3] {
        let layer = KeepAliveLayer::new().max_requests(10);
        let handle = layer.connection();
        let svc = layer
            .bind(handle.clone())
            .layer(tower::service_fn(|_req: Request<()>| async {
                Ok::<_, Infallible>(route("/hop"))
            }));
        let req = Request::builder().version(version).body(()).unwrap();
        let res = within("the service", svc.oneshot(req)).await.unwrap();
        assert_stripped(res.headers());
        assert_eq!(res.headers().len(), 2, "{version:?}: {:#?}", res.headers());
        assert_eq!(handle.requests(), 1);
        assert_eq!(handle.in_flight(), 1, "the body is not sent yet");
        let body = res.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "hop");
        assert_eq!(handle.in_flight(), 0);
        assert_eq!(handle.close_reason(), None);

        // An app's `Connection: close` is stripped too, and closes nothing.
        let svc = layer
            .bind(handle.clone())
            .layer(tower::service_fn(|_req: Request<()>| async {
                Ok::<_, Infallible>(route("/close"))
            }));
        let req = Request::builder().version(version).body(()).unwrap();
        let res = within("the service", svc.oneshot(req)).await.unwrap();
        assert!(
            res.headers().is_empty(),
            "{version:?}: {:#?}",
            res.headers()
        );
        assert_eq!(handle.close_reason(), None);
    }
}

#[tokio::test]
async fn streams_are_counted_per_connection() {
    let mut server = start_server(KeepAliveLayer::new(), fields()).await;
    let addr = server.addr;
    let (mut first, first_handle) = connect_h2(&mut server).await;
    let (mut second, second_handle) = connect_h2(&mut server).await;

    for path in ["/", "/stream", "/hop"] {
        let (status, headers, _) = h2_get(&mut first, addr, path).await;
        assert_eq!(status, StatusCode::OK);
        assert!(!headers.contains_key("keep-alive"), "{headers:#?}");
        assert!(!headers.contains_key("connection"), "{headers:#?}");
    }
    assert_eq!(first_handle.requests(), 3);

    // Five concurrent streams on the same connection.
    let concurrent = (0..5).map(|_| {
        let mut sender = first.clone();
        async move { h2_get(&mut sender, addr, "/stream").await }
    });
    for (status, _, body) in futures_util::future::join_all(concurrent).await {
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, "hello world");
    }
    assert_eq!(first_handle.requests(), 8);
    assert_eq!(first_handle.in_flight(), 0);

    for _ in 0..2 {
        h2_get(&mut second, addr, "/").await;
    }
    assert_eq!(second_handle.requests(), 2);
    assert_eq!(second_handle.in_flight(), 0);
    assert_eq!(first_handle.requests(), 8);
    assert_eq!(first_handle.close_reason(), None);
    assert_eq!(second_handle.close_reason(), None);
}

#[tokio::test]
async fn h2_connection_is_told_to_close_at_max_requests() {
    let mut server = start_server(KeepAliveLayer::new().max_requests(3), fields()).await;
    let addr = server.addr;
    let (mut sender, handle) = connect_h2(&mut server).await;
    for n in 1..=3u64 {
        assert_eq!(handle.close_reason(), None, "before request {n}");
        let (status, headers, _) = h2_get(&mut sender, addr, "/").await;
        assert_eq!(status, StatusCode::OK);
        // The limit is said with GOAWAY by whoever drives the connection, never in fields.
        assert!(!headers.contains_key("connection"), "{headers:#?}");
        assert!(!headers.contains_key("keep-alive"), "{headers:#?}");
        assert_eq!(handle.requests(), n);
    }
    assert_eq!(handle.close_reason(), Some(CloseReason::MaxRequests));
}

/// Sends `()` when dropped.
struct DropSignal(mpsc::UnboundedSender<()>);

impl Drop for DropSignal {
    fn drop(&mut self) {
        let _ = self.0.send(());
    }
}

/// The test app, plus `/endless`: one chunk, then a body that never ends; `dropped` hears when the server
/// drops it.
fn app_with_endless(dropped: mpsc::UnboundedSender<()>) -> App {
    BoxCloneService::new(tower::service_fn(move |req: Request<Incoming>| {
        let signal = DropSignal(dropped.clone());
        async move {
            if req.uri().path() != "/endless" {
                return Ok::<_, Infallible>(route(req.uri().path()));
            }
            let first = Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"first")));
            let frames = futures_util::stream::iter([first])
                .chain(futures_util::stream::pending())
                .map(move |frame| {
                    let _ = &signal;
                    frame
                });
            Ok(Response::new(BodyExt::boxed(StreamBody::new(frames))))
        }
    }))
}

/// A stream the client resets is no longer in flight: the body is dropped and its count released, and the
/// connection goes on serving.
#[tokio::test]
async fn a_reset_stream_is_no_longer_in_flight() {
    let (dropped_tx, mut dropped) = mpsc::unbounded_channel();
    let mut server = start_server(KeepAliveLayer::new(), app_with_endless(dropped_tx)).await;
    let addr = server.addr;
    let (mut sender, handle) = connect_h2(&mut server).await;

    within("the sender to be ready", sender.ready())
        .await
        .unwrap();
    let req = Request::get(format!("http://{addr}/endless"))
        .body(Empty::new())
        .unwrap();
    let res = within("a response", sender.send_request(req))
        .await
        .unwrap();
    let mut body = res.into_body();
    let frame = within("the first chunk", body.frame())
        .await
        .expect("body ended")
        .unwrap();
    assert_eq!(frame.into_data().unwrap(), "first");
    assert_eq!(handle.in_flight(), 1);
    assert_eq!(handle.idle_since(), None);

    // Dropping the body resets the stream (RST_STREAM CANCEL).
    drop(body);
    within("the server to drop the body", dropped.recv())
        .await
        .unwrap();
    assert_eq!(handle.in_flight(), 0);
    assert!(handle.idle_since().is_some());

    let (status, _, body) = h2_get(&mut sender, addr, "/").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, "hello");
    assert_eq!(handle.requests(), 2);
    assert_eq!(handle.in_flight(), 0);
    assert_eq!(handle.close_reason(), None);
}
