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
//! - [`snapshot`]: building a snapshot from a validated config, reusing instances,
//!   clients and counters by name across reloads.
//! - [`forward`]: the per-request handler.
//! - [`pool`]: instances, balancing, ejection, health checks.
//! - [`upstream`]: pooled HTTP/1.1 connections to the instances, per worker.
//! - [`runtime`]: per-route weight, breaker and events to the controller.
//! - [`metrics`], [`expo`]: lock-free counters and their Prometheus text encoding.
//! - [`server`]: the accept loop, connection limits, graceful shutdown.

pub mod expo;
pub mod forward;
mod h1;
pub mod metrics;
pub mod pool;
pub mod runtime;
pub mod server;
pub mod snapshot;
pub mod upstream;

pub use runtime::{DataPlaneEvent, RouteRuntime};
pub use snapshot::{Proxy, Snapshot};
