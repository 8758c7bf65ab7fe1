//! The HTTP keep-alive policy of nginx or Apache for any [tower], [hyper] or [axum] server.
//!
//! Persistent connections save a TCP (and TLS) handshake for every request after the first, but each
//! open connection holds memory, a file descriptor and a slot, busy or idle, and a client that keeps one
//! connection forever never moves to another instance behind a load balancer. A server manages them with
//! an idle timeout, a cap on requests per connection, perhaps a maximum age, the `Connection` /
//! `Keep-Alive` fields that tell clients the rules, and a graceful close when it shuts down. hyper emits
//! no `Keep-Alive` field and counts no requests, `axum::serve` runs without an idle timeout, and hyper has
//! no idle timeout for HTTP/2 at all. This crate does that work, per connection:
//!
//! - [`KeepAliveLayer`], a tower layer: counts requests per connection, decides when a connection is
//!   kept alive, and writes (or removes) the connection fields of every response;
//! - a serve path, [`serve()`], that drives each connection through its lifecycle: idle timeout, maximum
//!   requests and age, GOAWAY for HTTP/2, drain on shutdown, a connection budget;
//! - the same lifecycle for apps that keep `axum::serve` ([`axum`], feature `axum`) and for
//!   hand-written hyper-util accept loops ([`ConnectionHandle::drive`], [`serve::Drain`]);
//! - [`KeepAliveHeader`], a typed `Keep-Alive` value for servers and clients;
//! - counters ([`Stats`]), a close callback and `tracing` spans to see it all at work.
//!
//! # Keep-alive in HTTP/1.0, HTTP/1.1 and HTTP/2
//!
//! **HTTP/1.0** opened one connection per request, and the server ended each response by closing the
//! connection. Persistent connections came later as an extension that both sides must ask for: the
//! client sends `Connection: keep-alive`, a server that agrees answers with `Connection: keep-alive` as
//! well, and the connection carries another request ([RFC 9112, appendix C.2.2][rfc9112-c22]). The
//! server may describe its policy in a `Keep-Alive: timeout=5, max=100` field, from [RFC 2068, section
//! 19.7.1.1][rfc2068]. An HTTP/1.0 client cannot read chunked transfer coding, so only a response whose
//! length is known in advance can be followed by another on the same connection.
//!
//! **HTTP/1.1** connections are persistent by default ([RFC 9112, section 9.3][rfc9112-93]). Either side
//! ends one with the `close` connection option: a server that sends `Connection: close` closes the
//! connection after that response and processes no further request received on it, pipelined or not
//! ([section 9.6][rfc9112-96]). A server may close an idle connection whenever it likes ([section
//! 9.5][rfc9112-95]); a client that sends a request at that very moment sees the connection reset, and
//! can retry on its own only if the request is idempotent ([section 9.3.1][rfc9112-931]). That race is
//! why servers keep advertising their idle timeout with `Keep-Alive` on HTTP/1.1 too: clients that read it
//! (Node.js's undici, for one) stop reusing a connection before the server's deadline.
//!
//! `Connection` and the fields it names belong to one hop, not to the message: they describe the
//! connection between two peers, and an intermediary removes them, together with `Keep-Alive`,
//! `Proxy-Connection`, `TE`, `Transfer-Encoding` and `Upgrade`, before it forwards a message ([RFC 9110,
//! section 7.6.1][rfc9110-761]).
//!
//! **HTTP/2** multiplexes many requests, one stream each, over one long-lived connection, and has no
//! connection-specific fields: a message that carries `Connection`, `Keep-Alive`, `Proxy-Connection`,
//! `Transfer-Encoding` or `Upgrade`, or `TE` with anything but `trailers`, is malformed ([RFC 9113,
//! section 8.2.2][rfc9113-822]); HTTP/3 has the same rule ([RFC 9114, section 4.2][rfc9114-42]). A server
//! closes an HTTP/2 connection gracefully with a GOAWAY frame ([RFC 9113, section 6.8][rfc9113-68]): it
//! names the last stream the server will process, the streams in flight finish, and the client opens new
//! ones on a new connection. Idle connections may be closed, after a GOAWAY ([section 9.1][rfc9113-91]).
//!
//! # What goes over the wire
//!
//! **HTTP/1.1**: each response carries `Connection: keep-alive` and `Keep-Alive: timeout=T, max=R`. `T`
//! is the idle timeout in whole seconds rounded down (a client that honours it never finds its reused
//! connection closed under it), `R` the requests this connection still accepts after this one, counting
//! down as Apache does. The response that uses up the limit says `Connection: close` and nothing about
//! keep-alive; hyper then closes the connection after it, and pipelined requests sent behind it are not
//! processed. On the crate's serve paths they are read and dropped until the client closes its side (a
//! lingering close, [RFC 9112, section 9.6][rfc9112-96]): closing with them unread would make the kernel
//! reset the connection and destroy the responses the client has not read yet.
//!
//! ```text
//! GET / HTTP/1.1          HTTP/1.1 200 OK
//!                         connection: keep-alive
//!                         keep-alive: timeout=5, max=2
//! GET / HTTP/1.1          HTTP/1.1 200 OK
//!                         connection: keep-alive
//!                         keep-alive: timeout=5, max=1
//! GET / HTTP/1.1          HTTP/1.1 200 OK
//!                         connection: close
//!                         (the server closes the connection)
//! ```
//!
//! **HTTP/1.0**: kept alive only when the request carries the `keep-alive` connection option and the
//! response has a length known in advance; then the same fields are sent, and at the limit the
//! connection really closes. Otherwise the response says `Connection: close`.
//!
//! **Either HTTP/1 version**: a request or response that says `Connection: close` closes the connection,
//! and `close` wins over `keep-alive` whatever the order. A close decided by anyone (client, inner
//! service, hyper, a limit, drain) is final: nothing turns it back into `keep-alive`. `101 Switching
//! Protocols` responses are left untouched (`Connection: upgrade` stays), so WebSockets keep working.
//! With [`strip_request_hop_by_hop`](KeepAliveLayer::strip_request_hop_by_hop), for proxies, the
//! hop-by-hop fields of each request are removed before the inner service sees it.
//!
//! **HTTP/2 and HTTP/3**: `Connection`, `Keep-Alive`, `Proxy-Connection`, `Transfer-Encoding`,
//! `Upgrade`, `TE` and every field named in `Connection` are removed from responses, including those the
//! inner service set: Safari refuses a response that carries them. Requests are still counted, and at the
//! limit the connection is marked closing, for whoever drives it to send GOAWAY.
//!
//! # One handle per connection
//!
//! A layer value is shared by every connection: hyper-util clones the service for each request, and
//! axum applies `Router::layer` to each route separately. So the state of one connection lives in a
//! [`ConnectionHandle`], created once per accepted connection with [`KeepAliveLayer::connection`]. It
//! reaches the layer bound to the connection's service ([`KeepAliveLayer::bind`]) or as a request
//! extension. Without one the layer still rewrites headers, but counts nothing and closes nothing, and
//! says so once through `tracing`.
//!
//! The handle tracks what is in flight: a request is done when its response body has been fully sent or
//! dropped, not when the service's future resolves, so a streaming response keeps its connection busy.
//!
//! # Three ways to serve
//!
//! The layer decides what each response says; closing a connection that stays idle, or is too old, or
//! whose server shuts down, is the job of whoever drives the connection. Pick the way that fits:
//!
//! | | [`serve()`] | `axum::serve` + [`axum`] | your hyper-util loop |
//! |---|---|---|---|
//! | feature | `serve` (default) | `axum` | `serve` |
//! | idle timeout, max requests, max age | yes | yes | yes, with [`ConnectionHandle::drive`] |
//! | idle HTTP/2 closed with GOAWAY | yes | closed without GOAWAY | yes |
//! | drain on shutdown | [`with_graceful_shutdown`](serve::Serve::with_graceful_shutdown) | [`on_shutdown`](crate::axum::KeepAliveListener::on_shutdown) + axum's | [`serve::Drain`] |
//! | connection budget | [`connection_limits`](serve::Serve::connection_limits) | no | no |
//! | `tracing` span per connection | yes | no | yours |
//!
//! ## 1. The serve path
//!
//! [`serve()`] takes a listener and an axum `Router` or any tower `Service` (`Clone + Send`; an error
//! from it ends the connection, as hyper does), and serves HTTP/1.x and h2c on one port, over hyper-util's auto builder. It applies the
//! layer to the whole service itself, so every request is tracked: do not add the layer to the router as
//! well. See the [`serve` module](mod@serve) for the lifecycle in detail.
//!
//! ```no_run
//! # #[cfg(feature = "serve")]
//! # async fn run() -> std::io::Result<()> {
//! use std::time::Duration;
//! use axum::{routing::get, Router};
//! use tower_keepalive::KeepAliveLayer;
//!
//! let app = Router::new().route("/", get(|| async { "hello" }));
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
//! tower_keepalive::serve(listener, app)
//!     .keep_alive(KeepAliveLayer::new().idle_timeout(Duration::from_secs(10)).max_requests(1000))
//!     .with_graceful_shutdown(async { let _ = tokio::signal::ctrl_c().await; })
//!     .drain_timeout(Duration::from_secs(30))
//!     .on_close(|conn, reason| println!("closed ({reason}) after {} requests", conn.requests()))
//!     .await
//! # }
//! ```
//!
//! ## 2. Keeping `axum::serve` (feature `axum`)
//!
//! [`axum::KeepAliveListener`] wraps the listener: each connection's IO
//! carries its handle, and the listener keeps one timer for all of them. [`axum::into_make_service`]
//! replaces `Router::into_make_service` and binds the layer to each connection.
//!
//! ```no_run
//! # #[cfg(feature = "axum")]
//! # async fn run() -> std::io::Result<()> {
//! use std::time::Duration;
//! use axum::{routing::get, Router};
//! use tower_keepalive::axum::{into_make_service, KeepAliveListener};
//! use tower_keepalive::KeepAliveLayer;
//!
//! let app = Router::new().route("/", get(|| async { "hello" }));
//! let tcp = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
//! let listener = KeepAliveListener::new(tcp, KeepAliveLayer::new().idle_timeout(Duration::from_secs(10)));
//! let shutdown = listener.on_shutdown(async { let _ = tokio::signal::ctrl_c().await; });
//! axum::serve(listener, into_make_service(app))
//!     .with_graceful_shutdown(shutdown)
//!     .await
//! # }
//! ```
//!
//! ## 3. A hand-written hyper-util accept loop
//!
//! One handle per accepted connection, the layer bound to it, and the connection driven by
//! [`ConnectionHandle::drive`], or by a [`serve::DrainWatcher`] for a server-wide graceful drain:
//!
//! ```no_run
//! # #[cfg(feature = "serve")]
//! # async fn run() -> std::io::Result<()> {
//! use std::time::Duration;
//! use hyper_util::rt::{TokioExecutor, TokioIo};
//! use hyper_util::server::conn::auto;
//! use hyper_util::service::TowerToHyperService;
//! use tower::ServiceBuilder;
//! use tower_keepalive::{serve::Drain, KeepAliveLayer};
//!
//! let keep_alive = KeepAliveLayer::new().max_requests(100);
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
//! let drain = Drain::new();
//! let mut shutdown = std::pin::pin!(tokio::signal::ctrl_c());
//! loop {
//!     let (io, _peer) = tokio::select! {
//!         accepted = listener.accept() => accepted?,
//!         _ = &mut shutdown => break,
//!     };
//!     // One handle per connection: its own request count and idle state.
//!     let handle = keep_alive.connection();
//!     let svc = ServiceBuilder::new()
//!         .layer(keep_alive.bind(handle.clone()))
//!         .service_fn(|_req: http::Request<hyper::body::Incoming>| async {
//!             Ok::<_, std::convert::Infallible>(http::Response::new(String::from("hello")))
//!         });
//!     let watcher = drain.watcher();
//!     tokio::spawn(async move {
//!         let builder = auto::Builder::new(TokioExecutor::new());
//!         let conn = builder
//!             .serve_connection_with_upgrades(TokioIo::new(io), TowerToHyperService::new(svc));
//!         // Idle timeout, max age, GOAWAY, and a graceful close when the server drains.
//!         let reason = watcher.drive(handle, conn).await;
//!         println!("connection closed: {reason}");
//!     });
//! }
//! // Idle connections close now, busy ones after their response; stragglers dropped after 30 s.
//! drain.drain(Some(Duration::from_secs(30))).await;
//! # Ok(())
//! # }
//! ```
//!
//! Without `drive`, the bound layer still counts requests and closes at the limit, but nothing closes
//! an idle connection: hyper's HTTP/1 `header_read_timeout` does so only with a `Timer` set, silently,
//! and on its own schedule, and HTTP/2 has no idle timeout in hyper.
//!
//! ## The layer alone
//!
//! `Router::layer(KeepAliveLayer::new())` under a plain `axum::serve` (or any stack where no handle
//! reaches the layer) rewrites the connection fields, advertising the policy and keeping them from
//! HTTP/2 peers, but counts nothing and closes nothing. Use one of the three ways above for the rest.
//!
//! # Observability
//!
//! - **Counters**: [`KeepAliveLayer::stats`] is a live view, shared by every connection made from the
//!   layer: connections opened, open and idle, requests started and in flight, closes by
//!   [`CloseReason`], the distribution of requests per connection, and the connection pressure. Per
//!   request, a few counters in a shard owned by the thread move with plain loads and stores (no lock,
//!   no locked instruction): cheap enough to leave on. A layer, its clones and the layers built from it
//!   share one set of counters: use one layer per server. `examples/metrics.rs` exports a
//!   [`StatsSnapshot`] in the Prometheus text format.
//! - **Each connection**: [`ConnectionHandle`] gives its request count, what is in flight, since when
//!   it is idle, its age, and its [`CloseReason`] once decided. On the serve path,
//!   [`Serve::on_close`](serve::Serve::on_close) hands you the handle and the reason of every connection
//!   that closes.
//! - **`tracing`**: the serve path runs each connection in a `connection` span (level DEBUG, with the
//!   `peer` address) and logs a DEBUG `connection closed` event with its `reason` and `requests`;
//!   persistent accept errors (out of file descriptors) are logged at ERROR. The layer warns once when a request reaches it without a
//!   connection handle. In your own accept loop, instrument each connection task with a span of your
//!   own (`examples/hyper_util.rs`).
//!
//! ```
//! use tower_keepalive::{CloseReason, KeepAliveLayer};
//!
//! let layer = KeepAliveLayer::new().max_requests(100);
//! let stats = layer.stats();
//! let conn = layer.connection(); // as an accept loop would
//! conn.close(CloseReason::Drain);
//! drop(conn);
//! let now = stats.snapshot();
//! assert_eq!((now.connections_opened(), now.connections_open()), (1, 0));
//! assert_eq!(now.closed(CloseReason::Drain), 1);
//! ```
//!
//! # Feature flags
//!
//! | Feature | Default | What it adds |
//! |---|---|---|
//! | `serve` | yes | [`serve()`], [`ConnectionHandle::drive`], [`serve::Drain`]: the connection lifecycle over hyper and hyper-util (idle timeout, maximum age, GOAWAY, drain, connection budget). |
//! | `axum` | no | [`axum::KeepAliveListener`] and [`axum::into_make_service`]: the lifecycle for apps that keep `axum::serve`, on the serve path's shared timer (enables `serve`). |
//! | `headers` | no | [`KeepAliveHeader`] implements `headers::Header`. |
//!
//! Without default features the crate is the layer, the handle, the stats and the header type, over
//! `http`, `http-body`, `tower-layer`, `tower-service`, `bytes`, `pin-project-lite`, `tracing` and
//! tokio's `sync`.
//!
//! # Examples
//!
//! In `examples/`: `axum` (a `Router` on the serve path), `axum_serve` (keeping `axum::serve`),
//! `hyper_util` (an accept loop with a drain), `service_builder` (beside tower-http's compression, trace
//! and timeout layers), `websocket`, `reverse_proxy` (hop-by-hop stripping), `client_hint` (a client
//! reading `Keep-Alive`), `metrics` (Prometheus text at `/metrics`), `demo` (what goes over the wire,
//! checked) and `server` (a configurable server for trying things by hand).
//!
//! [tower]: https://docs.rs/tower
//! [hyper]: https://docs.rs/hyper
//! [axum]: https://docs.rs/axum
//! [rfc2068]: https://www.rfc-editor.org/rfc/rfc2068#section-19.7.1.1
//! [rfc9110-761]: https://www.rfc-editor.org/rfc/rfc9110#section-7.6.1
//! [rfc9112-93]: https://www.rfc-editor.org/rfc/rfc9112#section-9.3
//! [rfc9112-931]: https://www.rfc-editor.org/rfc/rfc9112#section-9.3.1
//! [rfc9112-95]: https://www.rfc-editor.org/rfc/rfc9112#section-9.5
//! [rfc9112-96]: https://www.rfc-editor.org/rfc/rfc9112#section-9.6
//! [rfc9112-c22]: https://www.rfc-editor.org/rfc/rfc9112#appendix-C.2.2
//! [rfc9113-68]: https://www.rfc-editor.org/rfc/rfc9113#section-6.8
//! [rfc9113-822]: https://www.rfc-editor.org/rfc/rfc9113#section-8.2.2
//! [rfc9113-91]: https://www.rfc-editor.org/rfc/rfc9113#section-9.1
//! [rfc9114-42]: https://www.rfc-editor.org/rfc/rfc9114#section-4.2

#![deny(
    missing_docs,
    unreachable_pub,
    rust_2018_idioms,
    missing_debug_implementations
)]
#![forbid(unsafe_code)]
// The connection lifecycle's bookkeeping (idle limits, write tracking, pressure) is read by the serve
// path; a layer-only build keeps it but does not use all of it.
#![cfg_attr(not(feature = "serve"), allow(dead_code))]
#![cfg_attr(docsrs, feature(doc_cfg))]

#[cfg(feature = "axum")]
#[cfg_attr(docsrs, doc(cfg(feature = "axum")))]
pub mod axum;
mod body;
mod clock;
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
