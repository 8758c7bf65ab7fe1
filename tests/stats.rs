//! The counters, seen from a real server: a connection counts as closed when it ends, whoever keeps a
//! clone of its handle.

mod support;

use support::http1::*;
use support::server::*;
use tower_keepalive::{CloseReason, KeepAliveLayer};

/// `on_close` hands out the handle, which the test keeps (in the `Closed` it receives): the connection
/// is counted closed all the same, by the time `on_close` runs.
#[tokio::test]
async fn a_connection_counts_closed_when_it_ends_whoever_keeps_its_handle() {
    let layer = KeepAliveLayer::new();
    let stats = layer.stats();
    let mut server = start(layer).await;
    let mut client = RawClient::connect(server.addr).await;
    assert_eq!(client.get("/").await.status, 200);
    let mut other = RawClient::connect(server.addr).await;
    assert_eq!(other.get("/").await.status, 200);
    drop(client);
    let closed = server.next_close().await;
    assert_eq!(closed.reason, CloseReason::ClientClosed);
    let now = stats.snapshot();
    assert_eq!(
        (now.connections_opened(), now.connections_open()),
        (2, 1),
        "the closed connection still counted open while its handle is kept"
    );
    assert_eq!(now.closed(CloseReason::ClientClosed), 1);

    drop(other);
    let second = server.next_close().await;
    let now = stats.snapshot();
    assert_eq!(now.connections_open(), 0);
    assert_eq!(now.closed(CloseReason::ClientClosed), 2);
    // Kept to the end: their ends were not counted twice when they go.
    drop((closed, second));
    assert_eq!(stats.snapshot().closed(CloseReason::ClientClosed), 2);
}
