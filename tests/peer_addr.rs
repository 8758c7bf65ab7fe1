//! The peer address on every request: axum's `ConnectInfo` and the crate's `PeerAddr`, on the serve
//! path (HTTP/1.1 and h2c) and on the `axum::serve` path.

#![cfg(feature = "axum")]

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;

use axum::extract::ConnectInfo;
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use support::axum_serve::serve_axum;
use support::http1::RawClient;
use support::http2::H2;
use support::server::{serve, TestServer};
use tower_keepalive::serve::PeerAddr;
use tower_keepalive::KeepAliveLayer;

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

/// One GET of `/peer` over a new connection: the status, the body, and the client socket's own address.
async fn get_peer(addr: SocketAddr, h2: bool) -> (StatusCode, String, SocketAddr) {
    if h2 {
        let mut client = H2::connect(addr).await;
        let (status, body, _) = client.get("/peer").await;
        (
            status,
            String::from_utf8_lossy(&body).into_owned(),
            client.local,
        )
    } else {
        let mut client = RawClient::connect(addr).await;
        let local = client.stream_mut().local_addr().unwrap();
        let res = client.get("/peer").await;
        let status = StatusCode::from_u16(res.status).unwrap();
        (status, res.body_str().to_string(), local)
    }
}

#[tokio::test]
async fn connect_info_on_the_serve_path_over_http1_and_h2c() {
    let server = serve(KeepAliveLayer::new(), app()).await;
    for h2 in [false, true] {
        let (status, body, local) = get_peer(server.addr, h2).await;
        assert_eq!(status, StatusCode::OK, "h2: {h2}, body: {body}");
        assert_eq!(body, local.to_string(), "h2: {h2}");
    }
}

#[tokio::test]
async fn peer_addr_for_a_plain_service() {
    let server = serve(KeepAliveLayer::new(), tower::service_fn(plain)).await;
    for h2 in [false, true] {
        let (status, body, local) = get_peer(server.addr, h2).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, local.to_string(), "h2: {h2}");
    }
}

#[tokio::test]
async fn turned_off_no_address_is_given() {
    let server = TestServer::builder(KeepAliveLayer::new())
        .peer_addr(false)
        .serve(tower::service_fn(plain));
    let (_, body, _) = get_peer(server.addr, false).await;
    assert_eq!(body, "none");
}

#[tokio::test]
async fn connect_info_on_the_axum_serve_path() {
    let server = serve_axum(KeepAliveLayer::new(), app()).await;
    for h2 in [false, true] {
        let (status, body, local) = get_peer(server.addr, h2).await;
        assert_eq!(status, StatusCode::OK, "h2: {h2}, body: {body}");
        assert_eq!(body, local.to_string(), "h2: {h2}");
    }
}
