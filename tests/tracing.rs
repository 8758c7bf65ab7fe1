//! The serve path's `connection` span, as a `tracing` subscriber sees it: OpenTelemetry's attribute
//! names for the peer and the protocol.

mod support;

use std::io::Write;
use std::sync::{Arc, Mutex};

use support::http1::*;
use support::server::*;
use support::*;
use tower_keepalive::{CloseReason, KeepAliveLayer};

#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    /// A DEBUG subscriber writing here, for the calling thread (the test runtime's only one, so the
    /// server's tasks too).
    fn subscribe(&self) -> tracing::subscriber::DefaultGuard {
        let writer = self.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_max_level(tracing::Level::DEBUG)
            .with_ansi(false)
            .finish();
        tracing::subscriber::set_default(subscriber)
    }

    /// The line of the `connection closed` event.
    fn closed_line(&self) -> String {
        let logs = String::from_utf8(self.0.lock().unwrap().clone()).unwrap();
        logs.lines()
            .find(|line| line.contains("connection closed"))
            .unwrap_or_else(|| panic!("no `connection closed` event in:\n{logs}"))
            .to_string()
    }
}

#[tokio::test]
async fn a_tcp_connection_span_names_its_peer_address_port_and_protocol() {
    let logs = Logs::default();
    let _guard = logs.subscribe();
    let mut server = start(KeepAliveLayer::new()).await;
    let mut client = RawClient::connect(server.addr).await;
    let port = client.stream_mut().local_addr().unwrap().port();
    assert_eq!(client.get("/").await.status, 200);
    drop(client);
    assert_eq!(server.next_close().await.reason, CloseReason::ClientClosed);
    let line = logs.closed_line();
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
    let _guard = logs.subscribe();
    let dir = std::env::temp_dir().join(format!("tower-keepalive-tracing-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("sock");
    let _ = std::fs::remove_file(&path);
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let mut server = TestServer::builder(KeepAliveLayer::new())
        .listener(listener)
        .start();
    let stream = within("connect", tokio::net::UnixStream::connect(&path))
        .await
        .unwrap();
    let mut client = RawClient::new(stream);
    assert_eq!(client.get("/").await.status, 200);
    drop(client);
    assert_eq!(server.next_close().await.reason, CloseReason::ClientClosed);
    let _ = std::fs::remove_dir_all(&dir);
    let line = logs.closed_line();
    // A client socket without a name: its `Debug` form, and no port.
    assert!(
        line.contains(r#"network.peer.address="(unnamed)""#),
        "{line}"
    );
    assert!(!line.contains("network.peer.port"), "{line}");
}
