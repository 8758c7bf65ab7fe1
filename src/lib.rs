//! The HTTP keep-alive policy of nginx or Apache for any tower, hyper or axum server.
//!
//! Persistent connections save a TCP (and TLS) handshake per request, but each idle one holds memory, a
//! file descriptor and a slot. A server manages them with an idle timeout, a cap on requests per
//! connection, and the `Connection` / `Keep-Alive` fields that tell clients the rules. hyper emits no
//! `Keep-Alive` field, `axum::serve` runs without an idle timeout, and HTTP/2 has none in hyper at all.
//! This crate does that work, per connection.
//!
//! # What goes over the wire
//!
//! **HTTP/1.1** connections are persistent unless a side says `close` (RFC 9112 section 9.3). Each
//! response carries `Connection: keep-alive` and `Keep-Alive: timeout=T, max=R`: `T` is the idle timeout
//! in whole seconds rounded down (a client that honours it never finds its reused connection closed under
//! it), `R` the requests this connection still accepts after this one. The response that uses up the
//! limit says `Connection: close` and nothing about keep-alive; hyper then closes the connection after it,
//! and pipelined requests sent behind it are not processed (RFC 9112 section 9.6).
//!
//! **HTTP/1.0** connections are persistent only when the request carries the `keep-alive` connection
//! option (RFC 9112 section 9.3, Appendix C.2.2); then the same fields are sent. A response to an
//! HTTP/1.0 client whose length is not known in advance can only end by closing the connection, so it is
//! not kept alive.
//!
//! A request or response that says `Connection: close` closes the connection, and `close` wins over
//! `keep-alive` whatever the order. A close decided by anyone (client, inner service, hyper, a limit,
//! drain) is final: nothing turns it back into `keep-alive`. `101 Switching Protocols` responses are left
//! untouched (`Connection: upgrade` stays), so WebSockets keep working.
//!
//! **HTTP/2 and HTTP/3** have no connection-specific fields: `Connection`, `Keep-Alive`,
//! `Proxy-Connection`, `Transfer-Encoding`, `Upgrade`, `TE` and every field named in `Connection` are
//! removed from responses (RFC 9113 section 8.2.2, RFC 9110 section 7.6.1); Safari refuses a response
//! that carries them. Requests are still counted, and at the limit the connection is told to close
//! gracefully (GOAWAY).
//!
//! # Per connection
//!
//! A layer value is shared by every connection (hyper-util clones the service for each request; axum
//! applies `Router::layer` per route), so per-connection state lives in a [`ConnectionHandle`], created
//! once per accepted connection with [`KeepAliveLayer::connection`]. It reaches the layer bound to the
//! connection's service ([`KeepAliveLayer::bind`]) or as a request extension. Without one the layer still
//! rewrites headers, but cannot count requests, and says so once through `tracing`.
//!
//! The handle tracks what is in flight: a request is done when its response body has been fully sent or
//! dropped, not when the service's future resolves, so a streaming response keeps its connection busy.
//!
//! # Example: a hyper-util accept loop
//!
//! ```no_run
//! use std::convert::Infallible;
//! use bytes::Bytes;
//! use http::{Request, Response};
//! use http_body_util::Full;
//! use hyper_util::rt::{TokioExecutor, TokioIo};
//! use hyper_util::server::conn::auto;
//! use hyper_util::service::TowerToHyperService;
//! use tower::ServiceBuilder;
//! use tower_keepalive::KeepAliveLayer;
//!
//! # async fn run() -> std::io::Result<()> {
//! let keep_alive = KeepAliveLayer::new().max_requests(100);
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
//! loop {
//!     let (io, _) = listener.accept().await?;
//!     // One handle per connection: its own request count and idle state.
//!     let handle = keep_alive.connection();
//!     let svc = ServiceBuilder::new()
//!         .layer(keep_alive.bind(handle))
//!         .service_fn(|_req: Request<hyper::body::Incoming>| async {
//!             Ok::<_, Infallible>(Response::new(Full::new(Bytes::from("hello"))))
//!         });
//!     tokio::spawn(async move {
//!         let _ = auto::Builder::new(TokioExecutor::new())
//!             .serve_connection_with_upgrades(TokioIo::new(io), TowerToHyperService::new(svc))
//!             .await;
//!     });
//! }
//! # }
//! ```
//!
//! # Example: axum
//!
//! With axum the layer is added to the router, and the handle reaches it as a request extension:
//!
//! ```
//! use axum::{routing::get, Router};
//! use tower_keepalive::KeepAliveLayer;
//!
//! let app: Router = Router::new()
//!     .route("/", get(|| async { "hello" }))
//!     .layer(KeepAliveLayer::new());
//! ```
//!
//! # Feature flags
//!
//! - `serve`: the serve path ([`serve()`], [`ConnectionHandle::drive`], [`serve::Drain`]): the
//!   connection lifecycle over hyper-util (idle timeout, maximum age, GOAWAY, drain).
//! - `axum`: [`axum::KeepAliveListener`] and [`axum::into_make_service`], the same lifecycle for apps
//!   that keep `axum::serve`.
//! - `headers`: [`KeepAliveHeader`] implements `headers::Header`.

#![deny(
    missing_docs,
    unreachable_pub,
    rust_2018_idioms,
    missing_debug_implementations
)]
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

#[cfg(feature = "axum")]
#[cfg_attr(docsrs, doc(cfg(feature = "axum")))]
pub mod axum;
mod body;
mod connection;
mod future;
pub mod header;
mod layer;
mod policy;
#[cfg(feature = "serve")]
#[cfg_attr(docsrs, doc(cfg(feature = "serve")))]
pub mod serve;
mod service;
pub mod stats;

pub use body::ResponseBody;
pub use connection::{CloseReason, ConnectionHandle};
pub use future::ResponseFuture;
pub use header::{InvalidKeepAlive, KeepAliveHeader};
pub use layer::KeepAliveLayer;
pub use service::KeepAlive;
pub use stats::{Stats, StatsSnapshot};

#[cfg(feature = "serve")]
#[cfg_attr(docsrs, doc(cfg(feature = "serve")))]
pub use serve::serve;
