//! A gRPC server (tonic) on `tower_keepalive::serve`, h2c, with a policy for long-lived gRPC channels.
//!
//! ```text
//! cargo run --example grpc --features tonic -- [--addr 127.0.0.1:50051] [--self-test]
//! ```
//!
//! It serves `grpc.health.v1.Health` from tonic-health (generated code shipped in the crate: no
//! protoc needed) behind a tonic interceptor that logs each call's `remote_addr()`, which works
//! because the serve path puts tonic's connect info into every request (feature `tonic`). Try it with
//! `grpcurl -plaintext ADDR grpc.health.v1.Health/Check`. The first line on stdout is
//! `listening on http://ADDR`.
//!
//! With `--self-test` it calls itself once with a tonic `Channel`, prints the status and the address
//! the server saw, and exits 0 (1 on a failure).
//!
//! The policy, for gRPC:
//!
//! - **idle timeout 5 min** (the crate's default is 5 s, for browsers): a gRPC channel is kept open
//!   between calls, and an idle one closed with GOAWAY costs the client a new handshake on its next
//!   call (tonic's `Channel` reconnects by itself). HTTP/2 PINGs from a client's keep-alive do not
//!   count as activity: only calls do. Behind a load balancer, use
//!   `KeepAliveLayer::behind_load_balancer(lb_idle)` instead;
//! - **unlimited requests**: every call is an HTTP/2 stream, and the default 1000 requests per
//!   connection would send a busy channel GOAWAY every 1000 calls;
//! - **max age 30 min, ±10 % jitter, 30 s grace** (gRPC's `MAX_CONNECTION_AGE` and
//!   `MAX_CONNECTION_AGE_GRACE`): a channel holds its connection, so without a max age clients never
//!   move to instances added since; the jitter keeps clients that connected together from
//!   reconnecting together, and the grace lets server-streaming calls run on after the GOAWAY, then
//!   cuts them (a streaming client reconnects and resumes).

use std::net::SocketAddr;
use std::time::Duration;

use tonic::service::interceptor::InterceptedService;
use tonic::transport::Endpoint;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::health_server::HealthServer;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::server::{HealthReporter, HealthService};
use tower_keepalive::KeepAliveLayer;

fn usage() -> ! {
    eprintln!("usage: grpc [--addr ADDR] [--self-test]");
    std::process::exit(2)
}

/// The keep-alive policy for a gRPC server that clients reach directly (see the module docs).
fn policy() -> KeepAliveLayer {
    KeepAliveLayer::new()
        .idle_timeout(Duration::from_secs(5 * 60))
        .unlimited_requests()
        .max_age(Duration::from_secs(30 * 60))
        .max_age_jitter(0.1)
        .max_age_grace(Duration::from_secs(30))
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let mut addr = SocketAddr::from(([127, 0, 0, 1], 50051));
    let mut self_test = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--addr" => match args.next().and_then(|a| a.parse().ok()) {
                Some(a) => addr = a,
                None => usage(),
            },
            "--self-test" => self_test = true,
            _ => usage(),
        }
    }

    let reporter = HealthReporter::new();
    let health = HealthServer::new(HealthService::from_health_reporter(reporter));
    // tonic builds each call's `Request` from the HTTP request's extensions, where the serve path
    // put the connection's addresses.
    let svc = InterceptedService::new(health, |req: tonic::Request<()>| {
        if let Some(peer) = req.remote_addr() {
            println!("call from {peer}");
        }
        Ok(req)
    });

    let listener = tokio::net::TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    println!("listening on http://{addr}");
    let server = tower_keepalive::serve(listener, svc)
        .keep_alive(policy())
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        // Long enough for the streams of a max-age grace to end.
        .drain_timeout(Duration::from_secs(30));

    if !self_test {
        return server.await;
    }
    let server = tokio::spawn(std::future::IntoFuture::into_future(server));
    let ok = tokio::time::timeout(Duration::from_secs(10), check(addr))
        .await
        .unwrap_or_else(|_| Err("timed out".to_string()));
    server.abort();
    match ok {
        Ok(()) => Ok(()),
        Err(err) => {
            eprintln!("self-test failed: {err}");
            std::process::exit(1)
        }
    }
}

/// One health check of the whole server, with a tonic `Channel`.
async fn check(addr: SocketAddr) -> Result<(), String> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}")).map_err(|e| e.to_string())?;
    let channel = endpoint.connect().await.map_err(|e| e.to_string())?;
    let res = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .map_err(|status| status.to_string())?;
    let status = res.into_inner().status();
    println!("status: {}", status.as_str_name());
    if status == ServingStatus::Serving {
        Ok(())
    } else {
        Err(format!("status {}", status.as_str_name()))
    }
}
