//! The serve path's `connection` span, as a `tracing` subscriber sees it: OpenTelemetry's attribute
//! names for the peer and the protocol.

mod support;

use support::http1::*;
use support::logs::Logs;
use support::server::*;
use tower_keepalive::{CloseReason, KeepAliveLayer};

/// The line of the `connection closed` event.
fn closed_line(logs: &Logs) -> String {
    let logs = logs.text();
    logs.lines()
        .find(|line| line.contains("connection closed"))
        .unwrap_or_else(|| panic!("no `connection closed` event in:\n{logs}"))
        .to_string()
}

#[tokio::test]
async fn a_tcp_connection_span_names_its_peer_address_port_and_protocol() {
    let logs = Logs::default();
    let _guard = logs.subscribe(tracing::Level::DEBUG);
    let mut server = start(KeepAliveLayer::new()).await;
    let mut client = RawClient::connect(server.addr).await;
    let port = client.stream_mut().local_addr().unwrap().port();
    assert_eq!(client.get("/").await.status, 200);
    drop(client);
    assert_eq!(server.next_close().await.reason, CloseReason::ClientClosed);
    let line = closed_line(&logs);
    assert!(line.contains("connection{"), "{line}");
    // fmt lists the fields given at the span's creation first, then those recorded after.
    for field in [
        r#"network.protocol.name="http""#.to_string(),
        "network.peer.address=127.0.0.1 ".to_string(),
        format!("network.peer.port={port}}}"),
    ] {
        assert!(line.contains(&field), "{field} in {line}");
    }
}

#[cfg(unix)]
#[tokio::test]
async fn a_unix_connection_span_names_its_peer_as_it_can() {
    let logs = Logs::default();
    let _guard = logs.subscribe(tracing::Level::DEBUG);
    let (path, listener) = UnixPath::bind("tracing");
    let mut server = TestServer::builder(KeepAliveLayer::new())
        .listener(listener)
        .start();
    let mut client = path.connect().await;
    assert_eq!(client.get("/").await.status, 200);
    drop(client);
    assert_eq!(server.next_close().await.reason, CloseReason::ClientClosed);
    drop(path);
    let line = closed_line(&logs);
    // A client socket without a name: its `Debug` form, and no port.
    assert!(
        line.contains(r#"network.peer.address="(unnamed)""#),
        "{line}"
    );
    assert!(!line.contains("network.peer.port"), "{line}");
}
