//! The lifecycle's tests on the wire again, with hibernation forced on: every server these files start
//! hibernates an idle HTTP/1 connection 1 ms after its last response (`support::server`'s
//! `FORCED_HIBERNATION`, set for this test binary by its name), where by default it waits a second. A
//! connection is then taken apart and made again around almost every idle moment of every test, and
//! each test must still see exactly what it sees without hibernation: the idle timeout, maximum
//! requests and age, the drain, lame duck, the budget's shedding, the header and send timeouts, the
//! `Keep-Alive` and `Connection` fields, a client's close.

// Each file below declares `mod support;` for itself, as it does in its own binary.
#![allow(clippy::duplicate_mod)]

#[path = "budget.rs"]
mod budget;
#[path = "client_close.rs"]
mod client_close;
#[path = "drain.rs"]
mod drain;
#[path = "header_timeout.rs"]
mod header_timeout;
#[path = "http1_fields.rs"]
mod http1_fields;
#[path = "idle.rs"]
mod idle;
#[path = "lame_duck.rs"]
mod lame_duck;
#[path = "lame_duck_races.rs"]
mod lame_duck_races;
#[path = "max_age.rs"]
mod max_age;
#[path = "max_requests.rs"]
mod max_requests;
#[path = "send_timeout.rs"]
mod send_timeout;

mod support;

/// This binary does force hibernation on: a server started as the files above start theirs has a
/// connection hibernating within moments of its response.
#[tokio::test]
async fn servers_of_this_binary_hibernate_at_once() {
    use support::http1::RawClient;
    use support::server::{TestServer, FORCED_HIBERNATION};

    assert_eq!(
        FORCED_HIBERNATION,
        Some(std::time::Duration::from_millis(1))
    );
    let layer = tower_keepalive::KeepAliveLayer::new();
    let stats = layer.stats();
    let server = TestServer::builder(layer).start();
    let mut client = RawClient::connect(server.addr).await;
    assert_eq!(client.get("/").await.status, 200);
    support::within_for(
        "the connection to hibernate",
        std::time::Duration::from_secs(1),
        async {
            while stats.snapshot().connections_hibernating() != 1 {
                tokio::time::sleep(support::ms(1)).await;
            }
        },
    )
    .await;
}
