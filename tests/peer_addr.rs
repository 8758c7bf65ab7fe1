//! The peer address on every request: axum's `ConnectInfo` and the crate's `PeerAddr`, on the serve
//! path (HTTP/1.1 and h2c) and on the `axum::serve` path.

#![cfg(feature = "axum")]

mod support;

use std::convert::Infallible;
use std::future::IntoFuture;
use std::net::SocketAddr;

use axum::extract::ConnectInfo;
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::WAIT;
use tokio::net::{TcpListener, TcpStream};
use tower_keepalive::serve::PeerAddr;

fn app() -> Router {
    Router::new().route(
        "/peer",
        get(|ConnectInfo(peer): ConnectInfo<SocketAddr>| async move { peer.to_string() }),
    )
}

/// A plain (non-axum) service answering the `PeerAddr` it finds.
async fn plain(req: Request<hyper::body::Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let body = match req.extensions().get::<PeerAddr<SocketAddr>>() {
        Some(PeerAddr(peer)) => peer.to_string(),
        None => "none".to_string(),
    };
    Ok(Response::new(Full::new(Bytes::from(body))))
}

async fn listener() -> (TcpListener, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    (listener, addr)
}

/// One GET of `/peer` over a new connection: the status, the body, and the client socket's own address.
async fn get_peer(addr: SocketAddr, h2: bool) -> (StatusCode, String, SocketAddr) {
    let tcp = tokio::time::timeout(WAIT, TcpStream::connect(addr))
        .await
        .expect("connect in time")
        .unwrap();
    let local = tcp.local_addr().unwrap();
    let req = Request::get(format!("http://{addr}/peer"))
        .body(Empty::<Bytes>::new())
        .unwrap();
    let res = if h2 {
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                .await
                .unwrap();
        tokio::spawn(conn);
        tokio::time::timeout(WAIT, sender.send_request(req)).await
    } else {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .unwrap();
        tokio::spawn(conn);
        tokio::time::timeout(WAIT, sender.send_request(req)).await
    };
    let res = res.expect("a response in time").unwrap();
    let status = res.status();
    let body = tokio::time::timeout(WAIT, res.into_body().collect())
        .await
        .expect("a body in time")
        .unwrap()
        .to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned(), local)
}

#[tokio::test]
async fn connect_info_on_the_serve_path_over_http1_and_h2c() {
    let (listener, addr) = listener().await;
    let server = tokio::spawn(tower_keepalive::serve(listener, app()).into_future());
    for h2 in [false, true] {
        let (status, body, local) = get_peer(addr, h2).await;
        assert_eq!(status, StatusCode::OK, "h2: {h2}, body: {body}");
        assert_eq!(body, local.to_string(), "h2: {h2}");
    }
    server.abort();
}

#[tokio::test]
async fn peer_addr_for_a_plain_service() {
    let (listener, addr) = listener().await;
    let svc = tower::service_fn(plain);
    let server = tokio::spawn(tower_keepalive::serve(listener, svc).into_future());
    for h2 in [false, true] {
        let (status, body, local) = get_peer(addr, h2).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, local.to_string(), "h2: {h2}");
    }
    server.abort();
}

#[tokio::test]
async fn turned_off_no_address_is_given() {
    let (listener, addr) = listener().await;
    let svc = tower::service_fn(plain);
    let server = tokio::spawn(
        tower_keepalive::serve(listener, svc)
            .peer_addr(false)
            .into_future(),
    );
    let (_, body, _) = get_peer(addr, false).await;
    assert_eq!(body, "none");
    server.abort();
}

#[tokio::test]
async fn connect_info_on_the_axum_serve_path() {
    use tower_keepalive::axum::{into_make_service, KeepAliveListener};
    let (tcp, addr) = listener().await;
    let listener = KeepAliveListener::new(tcp, Default::default());
    let server = tokio::spawn(axum::serve(listener, into_make_service(app())).into_future());
    for h2 in [false, true] {
        let (status, body, local) = get_peer(addr, h2).await;
        assert_eq!(status, StatusCode::OK, "h2: {h2}, body: {body}");
        assert_eq!(body, local.to_string(), "h2: {h2}");
    }
    server.abort();
}
