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
//! down as Apache does. With a [maximum age](KeepAliveLayer::max_age), `T` shrinks to the whole seconds
//! left as it nears, the response planned with less than a second left says `Connection: close`, and a
//! connection idle at its maximum age is closed only once its last `T` has run out. The response that uses up the limit says `Connection: close` and nothing about
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
//! | [send timeout](KeepAliveLayer::send_timeout) | yes | yes | yes, with [`serve::WatchedIo`] |
//! | drain on shutdown | [`with_graceful_shutdown`](serve::Serve::with_graceful_shutdown) | [`on_shutdown`](crate::axum::KeepAliveListener::on_shutdown) + axum's | [`serve::Drain`] |
//! | connection budget | [`connection_limits`](serve::Serve::connection_limits) | no | no |
//! | `tracing` span per connection | yes | no | yours |
//!
//! - **The serve path**, [`serve()`]: an accept loop over hyper's connection builders (HTTP/1.x and h2c
//!   on one port, HTTPS with the `tls` feature, idle HTTP/1 connections hibernating at nginx's memory cost) that applies the layer to the whole service itself, so every
//!   request is tracked. Takes an axum `Router` or any tower `Service`. See the [`serve` module](mod@serve)
//!   for the lifecycle and a full example.
//! - **Keeping `axum::serve`**: [`axum::KeepAliveListener`] wraps the listener and
//!   [`axum::into_make_service`] replaces `Router::into_make_service`; see the [`axum` module](mod@axum).
//! - **Your own hyper-util loop**: one handle per connection ([`KeepAliveLayer::connection`]), the layer
//!   bound to it ([`KeepAliveLayer::bind`]), the connection driven by [`ConnectionHandle::drive`] or by a
//!   [`serve::DrainWatcher`] for a server-wide drain (the example on [`serve::Drain`]).
//! - **The layer alone**, e.g. `Router::layer(KeepAliveLayer::new())` under a plain `axum::serve`:
//!   the connection fields are rewritten (the policy advertised, HTTP/2 peers kept clean), but nothing is
//!   counted and nothing closed, and the layer says so once through `tracing`.
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
//! # Observability
//!
//! [`KeepAliveLayer::stats`] gives live counters ([`Stats`]) shared by every connection made from the
//! layer; [`ConnectionHandle`] describes one connection; [`Serve::on_close`](serve::Serve::on_close)
//! reports each close with its [`CloseReason`]; the serve path runs each connection in a DEBUG
//! `connection` span; the `metrics` feature records connection metrics through the `metrics` facade.
//!
//! # Feature flags
//!
//! | Feature | Default | What it adds |
//! |---|---|---|
//! | `serve` | yes | [`serve()`], [`ConnectionHandle::drive`], [`serve::Drain`]: the connection lifecycle over hyper and hyper-util (idle timeout, maximum age, GOAWAY, drain, connection budget). |
//! | `axum` | no | [`axum::KeepAliveListener`] and [`axum::into_make_service`]: the lifecycle for apps that keep `axum::serve`, on the serve path's shared timer (enables `serve`). |
//! | `headers` | no | [`KeepAliveHeader`] implements `headers::Header`. |
//! | `metrics` | no | [`metrics`](mod@metrics): connection metrics through the `metrics` facade, recorded at connection events only. |
//! | `tls` | no | [`Serve::tls`](serve::Serve::tls): HTTPS on the serve path over rustls (ring), ALPN `h2` / `http/1.1` (enables `serve`). |
//!
//! Without default features the crate is the layer, the handle, the stats and the header type, over
//! `http`, `http-body`, `tower-layer`, `tower-service`, `bytes`, `pin-project-lite`, `tracing` and
//! tokio's `sync`.
//!
//! The README has the rest: the lifecycle in prose, the settings compared with nginx, Apache, Node.js
//! and Go, the examples, and the benchmarks.
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
#![cfg_attr(docsrs, feature(doc_cfg))]

#[cfg(feature = "axum")]
#[cfg_attr(docsrs, doc(cfg(feature = "axum")))]
pub mod axum;
mod body;
mod close;
mod config;
mod connection;
mod control;
mod future;
mod header;
mod layer;
#[cfg(feature = "metrics")]
#[cfg_attr(docsrs, doc(cfg(feature = "metrics")))]
pub mod metrics;
mod policy;
#[cfg(feature = "serve")]
#[cfg_attr(docsrs, doc(cfg(feature = "serve")))]
pub mod serve;
mod service;
mod stats;

pub use body::ResponseBody;
pub use close::CloseReason;
pub use connection::ConnectionHandle;
pub use future::ResponseFuture;
pub use header::{InvalidKeepAlive, KeepAliveHeader};
pub use layer::KeepAliveLayer;
pub use service::KeepAlive;
pub use stats::{Stats, StatsSnapshot};

#[cfg(feature = "serve")]
#[cfg_attr(docsrs, doc(cfg(feature = "serve")))]
pub use serve::serve;
