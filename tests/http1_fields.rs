//! HTTP/1.x on the wire: what the layer makes hyper send, byte for byte, and when the connection closes.

mod support;

use std::time::Duration;

use support::apps::fields;
use support::http1::{assert_head, http_get, RawResponse};
use support::hyper_loop::start_server;
use tower_keepalive::{CloseReason, KeepAliveLayer};

const OK_11: &str = "HTTP/1.1 200 OK";
const OK_10: &str = "HTTP/1.0 200 OK";

fn advert(res: &RawResponse) -> Option<&str> {
    res.header("keep-alive")
}

#[tokio::test]
async fn http11_counts_down_then_closes_at_max_requests() {
    let mut server = start_server(KeepAliveLayer::new().max_requests(3), fields()).await;
    let (mut client, handle) = server.connect().await;

    let res = client.request(http_get("/", "HTTP/1.1", &[])).await;
    assert_head(
        &res,
        OK_11,
        &[
            ("connection", "keep-alive"),
            ("keep-alive", "timeout=5, max=2"),
            ("content-length", "5"),
        ],
    );
    assert_eq!(res.body_str(), "hello");
    assert_eq!(handle.requests(), 1);
    assert_eq!(handle.close_reason(), None);

    // A body of unknown length (chunked) does not change the countdown.
    let res = client.request(http_get("/stream", "HTTP/1.1", &[])).await;
    assert_head(
        &res,
        OK_11,
        &[
            ("connection", "keep-alive"),
            ("keep-alive", "timeout=5, max=1"),
            ("transfer-encoding", "chunked"),
        ],
    );
    assert_eq!(res.body_str(), "hello world");
    assert_eq!(handle.close_reason(), None);

    let res = client.request(http_get("/", "HTTP/1.1", &[])).await;
    assert_head(
        &res,
        OK_11,
        &[("connection", "close"), ("content-length", "5")],
    );
    assert_eq!(res.body_str(), "hello");
    client.expect_eof().await;

    assert_eq!(handle.requests(), 3);
    assert_eq!(handle.in_flight(), 0);
    assert_eq!(handle.close_reason(), Some(CloseReason::MaxRequests));
}

#[tokio::test]
async fn advertised_timeout_is_whole_seconds_rounded_down() {
    let cases = [
        (
            KeepAliveLayer::new().idle_timeout(Duration::from_millis(1500)),
            "timeout=1, max=999",
        ),
        // Under a second: `timeout=0`, never more than what is enforced.
        (
            KeepAliveLayer::new().idle_timeout(Duration::from_millis(300)),
            "timeout=0, max=999",
        ),
        (
            KeepAliveLayer::new()
                .idle_timeout(Duration::from_secs(75))
                .max_requests(10),
            "timeout=75, max=9",
        ),
        (KeepAliveLayer::new().unlimited_requests(), "timeout=5"),
    ];
    for (layer, advert) in cases {
        let mut server = start_server(layer, fields()).await;
        let (mut client, handle) = server.connect().await;
        let res = client.request(http_get("/", "HTTP/1.1", &[])).await;
        assert_head(
            &res,
            OK_11,
            &[
                ("connection", "keep-alive"),
                ("keep-alive", advert),
                ("content-length", "5"),
            ],
        );
        // Still open: the next request on it is answered.
        let res = client.request(http_get("/", "HTTP/1.1", &[])).await;
        assert_eq!(res.header("connection"), Some("keep-alive"), "{res:#?}");
        assert_eq!(handle.requests(), 2);
    }
}

#[tokio::test]
async fn unlimited_requests_never_count_down() {
    let mut server = start_server(KeepAliveLayer::new().unlimited_requests(), fields()).await;
    let (mut client, handle) = server.connect().await;
    for _ in 0..20 {
        let res = client.request(http_get("/", "HTTP/1.1", &[])).await;
        assert_eq!(res.header("keep-alive"), Some("timeout=5"), "{res:#?}");
    }
    assert_eq!(handle.requests(), 20);
    assert_eq!(handle.close_reason(), None);
}

#[tokio::test]
async fn advertise_false_sends_connection_keep_alive_only() {
    let layer = KeepAliveLayer::new().advertise(false).max_requests(3);
    let mut server = start_server(layer, fields()).await;
    let (mut client, handle) = server.connect().await;

    let res = client.request(http_get("/", "HTTP/1.1", &[])).await;
    assert_head(
        &res,
        OK_11,
        &[("connection", "keep-alive"), ("content-length", "5")],
    );
    // The app's own `Keep-Alive` would advertise a policy we do not have: it goes too.
    let res = client.request(http_get("/ka99", "HTTP/1.1", &[])).await;
    assert_head(
        &res,
        OK_11,
        &[("connection", "keep-alive"), ("content-length", "5")],
    );
    // The limit is still enforced.
    let res = client.request(http_get("/", "HTTP/1.1", &[])).await;
    assert_head(
        &res,
        OK_11,
        &[("connection", "close"), ("content-length", "5")],
    );
    client.expect_eof().await;
    assert_eq!(handle.close_reason(), Some(CloseReason::MaxRequests));
}

#[tokio::test]
async fn zero_idle_timeout_turns_keep_alive_off() {
    let layer = KeepAliveLayer::new().idle_timeout(Duration::ZERO);
    let mut server = start_server(layer, fields()).await;
    let (mut client, handle) = server.connect().await;
    let res = client.request(http_get("/", "HTTP/1.1", &[])).await;
    assert_head(
        &res,
        OK_11,
        &[("connection", "close"), ("content-length", "5")],
    );
    client.expect_eof().await;
    assert_eq!(handle.requests(), 1);
    assert!(handle.close_reason().is_some());
}

#[tokio::test]
async fn pipelined_requests_past_the_limit_are_never_processed() {
    let mut server = start_server(KeepAliveLayer::new().max_requests(2), fields()).await;
    let (mut client, handle) = server.connect().await;

    let pipelined = [
        http_get("/", "HTTP/1.1", &[]),
        http_get("/stream", "HTTP/1.1", &[]),
        http_get("/close", "HTTP/1.1", &[]),
        http_get("/ka99", "HTTP/1.1", &[]),
    ]
    .concat();
    client.send(pipelined).await;

    let res = client.read_response().await;
    assert_head(
        &res,
        OK_11,
        &[
            ("connection", "keep-alive"),
            ("keep-alive", "timeout=5, max=1"),
            ("content-length", "5"),
        ],
    );
    assert_eq!(res.body_str(), "hello");
    let res = client.read_response().await;
    assert_head(
        &res,
        OK_11,
        &[("connection", "close"), ("transfer-encoding", "chunked")],
    );
    assert_eq!(res.body_str(), "hello world");
    // Nothing for the third and fourth requests: EOF right after the second response.
    client.expect_eof().await;

    assert_eq!(handle.requests(), 2);
    assert_eq!(handle.in_flight(), 0);
    assert_eq!(handle.close_reason(), Some(CloseReason::MaxRequests));
}

#[tokio::test]
async fn pipelined_requests_behind_a_client_close_are_never_processed() {
    let mut server = start_server(KeepAliveLayer::new(), fields()).await;
    let (mut client, handle) = server.connect().await;

    let pipelined = [
        http_get("/", "HTTP/1.1", &[]),
        http_get("/", "HTTP/1.1", &["Connection: close"]),
        http_get("/", "HTTP/1.1", &[]),
    ]
    .concat();
    client.send(pipelined).await;

    let res = client.read_response().await;
    assert_eq!(res.header("keep-alive"), Some("timeout=5, max=999"));
    let res = client.read_response().await;
    assert_head(
        &res,
        OK_11,
        &[("connection", "close"), ("content-length", "5")],
    );
    client.expect_eof().await;
    assert_eq!(handle.requests(), 2);
    assert_eq!(handle.close_reason(), Some(CloseReason::ClientClosed));
}

#[tokio::test]
async fn client_close_wins_in_every_spelling() {
    let mut server = start_server(KeepAliveLayer::new(), fields()).await;
    let spellings: [&[&str]; 7] = [
        &["Connection: close"],
        &["Connection: keep-alive, close"],
        &["Connection: close, keep-alive"],
        &["Connection: CLOSE"],
        &["Connection: , Close ,"],
        &["Connection: keep-alive", "Connection: close"],
        &["Connection: close", "Connection: keep-alive"],
    ];
    for lines in spellings {
        let (mut client, handle) = server.connect().await;
        // A first request keeps the connection alive; the one that says close ends it.
        let res = client.request(http_get("/", "HTTP/1.1", &[])).await;
        assert_eq!(res.header("connection"), Some("keep-alive"));

        let res = client.request(http_get("/", "HTTP/1.1", lines)).await;
        assert_head(
            &res,
            OK_11,
            &[("connection", "close"), ("content-length", "5")],
        );
        client.expect_eof().await;
        assert_eq!(handle.requests(), 2, "{lines:?}");
        assert_eq!(
            handle.close_reason(),
            Some(CloseReason::ClientClosed),
            "{lines:?}"
        );
    }
}

#[tokio::test]
async fn http10_without_keep_alive_closes() {
    let mut server = start_server(KeepAliveLayer::new(), fields()).await;
    let (mut client, handle) = server.connect().await;
    let res = client.request(http_get("/", "HTTP/1.0", &[])).await;
    assert_head(
        &res,
        OK_10,
        &[("connection", "close"), ("content-length", "5")],
    );
    assert_eq!(res.body_str(), "hello");
    client.expect_eof().await;
    assert_eq!(handle.close_reason(), Some(CloseReason::ClientClosed));

    // The option is not a substring match.
    let (mut client, handle) = server.connect().await;
    let res = client
        .request(http_get("/", "HTTP/1.0", &["Connection: keep-alive-ish"]))
        .await;
    assert_eq!(res.header("connection"), Some("close"), "{res:#?}");
    assert_eq!(res.header("keep-alive"), None, "{res:#?}");
    client.expect_eof().await;
    assert_eq!(handle.close_reason(), Some(CloseReason::ClientClosed));
}

#[tokio::test]
async fn http10_keep_alive_is_honoured_then_closed_at_the_limit() {
    let mut server = start_server(KeepAliveLayer::new().max_requests(2), fields()).await;
    let (mut client, handle) = server.connect().await;

    let res = client
        .request(http_get("/", "HTTP/1.0", &["Connection: keep-alive"]))
        .await;
    assert_head(
        &res,
        OK_10,
        &[
            ("connection", "keep-alive"),
            ("keep-alive", "timeout=5, max=1"),
            ("content-length", "5"),
        ],
    );
    assert_eq!(res.body_str(), "hello");

    // The connection stayed open: the second request is answered, and closes it.
    let res = client
        .request(http_get("/", "HTTP/1.0", &["Connection: Keep-Alive"]))
        .await;
    assert_head(
        &res,
        OK_10,
        &[("connection", "close"), ("content-length", "5")],
    );
    client.expect_eof().await;
    assert_eq!(handle.requests(), 2);
    assert_eq!(handle.close_reason(), Some(CloseReason::MaxRequests));
}

#[tokio::test]
async fn http10_keep_alive_can_be_refused() {
    let layer = KeepAliveLayer::new().http10_keep_alive(false);
    let mut server = start_server(layer, fields()).await;
    let (mut client, handle) = server.connect().await;
    let res = client
        .request(http_get("/", "HTTP/1.0", &["Connection: keep-alive"]))
        .await;
    assert_head(
        &res,
        OK_10,
        &[("connection", "close"), ("content-length", "5")],
    );
    client.expect_eof().await;
    assert_eq!(handle.close_reason(), Some(CloseReason::ClientClosed));
}

#[tokio::test]
async fn http10_body_of_unknown_length_ends_at_eof() {
    let mut server = start_server(KeepAliveLayer::new(), fields()).await;
    let (mut client, handle) = server.connect().await;
    let res = client
        .request(http_get("/stream", "HTTP/1.0", &["Connection: keep-alive"]))
        .await;
    // No length and no chunked coding for an HTTP/1.0 peer: the close delimits the body.
    assert_head(&res, OK_10, &[("connection", "close")]);
    assert_eq!(res.body_str(), "hello world");
    assert!(client.saw_eof());
    client.expect_eof().await;
    assert_eq!(handle.close_reason(), Some(CloseReason::Service));

    // A HEAD response has no body to delimit: the connection stays alive.
    let (mut client, handle) = server.connect().await;
    client
        .send(
            http_get("/stream", "HTTP/1.0", &["Connection: keep-alive"]).replacen("GET", "HEAD", 1),
        )
        .await;
    let res = client.read_head_response().await;
    assert_head(
        &res,
        OK_10,
        &[
            ("connection", "keep-alive"),
            ("keep-alive", "timeout=5, max=999"),
        ],
    );
    let res = client
        .request(http_get("/", "HTTP/1.0", &["Connection: keep-alive"]))
        .await;
    assert_eq!(res.header("keep-alive"), Some("timeout=5, max=998"));
    assert_eq!(handle.close_reason(), None);
}

#[tokio::test]
async fn inner_service_close_is_sent_once_and_closes() {
    let mut server = start_server(KeepAliveLayer::new(), fields()).await;

    let (mut client, handle) = server.connect().await;
    let res = client.request(http_get("/close", "HTTP/1.1", &[])).await;
    assert_head(
        &res,
        OK_11,
        &[("connection", "close"), ("content-length", "3")],
    );
    assert_eq!(res.body_str(), "bye");
    client.expect_eof().await;
    assert_eq!(handle.close_reason(), Some(CloseReason::Service));

    // The same to an HTTP/1.0 keep-alive client: hyper needs the 1.0 status line to close.
    let (mut client, handle) = server.connect().await;
    let res = client
        .request(http_get("/close", "HTTP/1.0", &["Connection: keep-alive"]))
        .await;
    assert_head(
        &res,
        OK_10,
        &[("connection", "close"), ("content-length", "3")],
    );
    client.expect_eof().await;
    assert_eq!(handle.close_reason(), Some(CloseReason::Service));
}

#[tokio::test]
async fn a_close_decided_elsewhere_is_final() {
    let mut server = start_server(KeepAliveLayer::new(), fields()).await;
    let (mut client, handle) = server.connect().await;
    let res = client.request(http_get("/", "HTTP/1.1", &[])).await;
    assert_eq!(res.header("connection"), Some("keep-alive"));

    // Drain decided between requests; the app's own `Connection: Keep-Alive` cannot undo it.
    assert!(handle.close(CloseReason::Drain));
    let res = client
        .request(http_get("/ka99-conn", "HTTP/1.1", &[]))
        .await;
    assert_head(
        &res,
        OK_11,
        &[("connection", "close"), ("content-length", "5")],
    );
    client.expect_eof().await;
    assert_eq!(handle.close_reason(), Some(CloseReason::Drain));
}

#[tokio::test]
async fn connections_count_down_separately() {
    let mut server = start_server(KeepAliveLayer::new().max_requests(3), fields()).await;
    let (mut a, handle_a) = server.connect().await;
    let (mut b, handle_b) = server.connect().await;

    let res = a.request(http_get("/", "HTTP/1.1", &[])).await;
    assert_eq!(advert(&res), Some("timeout=5, max=2"));
    let res = a.request(http_get("/", "HTTP/1.1", &[])).await;
    assert_eq!(advert(&res), Some("timeout=5, max=1"));
    // B's first request is B's first, whatever A did.
    let res = b.request(http_get("/", "HTTP/1.1", &[])).await;
    assert_eq!(advert(&res), Some("timeout=5, max=2"));

    // Both in flight at once.
    a.send(http_get("/", "HTTP/1.1", &[])).await;
    b.send(http_get("/", "HTTP/1.1", &[])).await;
    let res_b = b.read_response().await;
    let res_a = a.read_response().await;
    assert_eq!(res_a.header("connection"), Some("close"));
    assert_eq!(advert(&res_a), None);
    assert_eq!(res_b.header("connection"), Some("keep-alive"));
    assert_eq!(advert(&res_b), Some("timeout=5, max=1"));
    a.expect_eof().await;

    assert_eq!(handle_a.requests(), 3);
    assert_eq!(handle_a.close_reason(), Some(CloseReason::MaxRequests));
    assert_eq!(handle_b.requests(), 2);
    assert_eq!(handle_b.close_reason(), None);

    let res = b.request(http_get("/", "HTTP/1.1", &[])).await;
    assert_eq!(res.header("connection"), Some("close"));
    b.expect_eof().await;
    assert_eq!(handle_b.close_reason(), Some(CloseReason::MaxRequests));
}

#[tokio::test]
async fn inner_keep_alive_fields_are_replaced_by_ours() {
    let mut server = start_server(KeepAliveLayer::new().max_requests(3), fields()).await;
    let (mut client, handle) = server.connect().await;

    let res = client.request(http_get("/ka99", "HTTP/1.1", &[])).await;
    assert_head(
        &res,
        OK_11,
        &[
            ("keep-alive", "timeout=5, max=2"),
            ("connection", "keep-alive"),
            ("content-length", "5"),
        ],
    );
    // The app already said `Connection: Keep-Alive`: not said twice.
    let res = client
        .request(http_get("/ka99-conn", "HTTP/1.1", &[]))
        .await;
    assert_head(
        &res,
        OK_11,
        &[
            ("connection", "Keep-Alive"),
            ("keep-alive", "timeout=5, max=1"),
            ("content-length", "5"),
        ],
    );
    // At the limit the app's keep-alive fields give way to `close`.
    let res = client
        .request(http_get("/ka99-conn", "HTTP/1.1", &[]))
        .await;
    assert_head(
        &res,
        OK_11,
        &[("connection", "close"), ("content-length", "5")],
    );
    client.expect_eof().await;
    assert_eq!(handle.close_reason(), Some(CloseReason::MaxRequests));
}
