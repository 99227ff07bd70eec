//! The `canary` data plane: a hyper/tokio reverse proxy.
//!
//! Request path: accept → match a route → rules → sticky bucket vs weight → pick an
//! available instance of that version → forward → record the outcome → answer with
//! `x-canary-version`. The routing table and pools come from an immutable
//! [`Snapshot`] swapped atomically on reload (`arc-swap`); requests in flight keep the
//! snapshot they started with. The per-route weight and breaker live in
//! [`RouteRuntime`] atomics so the controller and the breaker change them without a
//! swap, and the data plane never waits on the controller.
//!
//! # Layout
//! - [`server`]: workers, `SO_REUSEPORT` listeners, the accept loop, connection limits,
//!   graceful shutdown.
//! - `connection`: one client connection: the own HTTP/1.1 reader, else a hand-over
//!   to hyper.
//! - `parking`: idle keep-alive connections, held by one task per listener.
//! - [`forward`]: the per-request handler: route → decide → pick → send → classify →
//!   record → answer.
//! - `request`: the request as read (its body, fields, host, the core's facts).
//! - `headers`: the proxy's header policy: the fields it sets, drops and generates.
//! - [`body`]: [`ProxyBody`], the body of every answer.
//! - `upstream`: the seam over the upstream protocols (`enum Upstream`).
//! - `http2`: upstreams through hyper's client (HTTP/2, and TLS pools).
//! - [`tls`]: TLS on the listener (handshake, ALPN) and the TLS pools' connector;
//!   certificates and rustls configs are the crate `canary_tls`'s.
//!
//! HTTP/1.1 on the wire (RFC 9112: the request-head reader, the upstream exchange,
//! body framing, idle connections) is the crate `canary_http1`, which knows nothing of
//! routes, versions, `X-Canary-*` fields or the config; Cargo keeps it that way.
//! - [`pool`]: instances, balancing, ejection, health checks.
//! - [`snapshot`]: building a snapshot from a validated config, reusing instances,
//!   clients and counters by name across reloads.
//! - [`runtime`]: per-route weight, breaker and events to the controller.
//! - [`witness`]: the distinct clients behind a run of failures, so that one client
//!   alone can neither trip the breaker nor eject an instance.
//! - `worker`: which worker a thread is, the data plane's clock.
//! - [`metrics`], [`expo`]: lock-free counters and their Prometheus text encoding.
//! - [`timers`]: the timers on waits a slow peer could make endless (body, send,
//!   upstream idle, HTTP/2 idle), counted by kind.
//! - `woken`: a wait polled only after it woke its task (a connection's stop and
//!   idle waits beside hyper's connection).

pub mod body;
mod connection;
pub mod expo;
pub mod forward;
mod headers;
mod http2;
pub mod metrics;
mod parking;
pub mod pool;
mod request;
pub mod runtime;
pub mod server;
pub mod snapshot;
pub mod timers;
pub mod tls;
mod upstream;
pub mod witness;
mod woken;
mod worker;

pub use body::ProxyBody;
pub use request::{ClientBody, ConnInfo};
pub use runtime::{DataPlaneEvent, RouteRuntime};
pub use snapshot::{Proxy, Snapshot};
