//! `canary` inside an application: a [`tower::Layer`] that splits users between a
//! stable and a canary version of a service, for axum and hyper.
//!
//! Ship v2 of a handler in the same binary as v1, behind a canary. The layer sends
//! each user to one version by the same decision the `canary` proxy makes (rules,
//! then a sticky bucket of the user's key against the weight, so a user stays on one
//! version and raising the weight only moves users from stable to canary), marks the
//! response with `x-canary-version`, and counts every request per version in the
//! proxy's Prometheus metrics. The binary's rollout controller runs in-process as a
//! tokio task: it walks the rollout's steps, compares the canary with stable, aborts
//! on a failing analysis or when the breaker sees too many consecutive canary
//! failures, and keeps its state in a directory so a restart resumes where it was.
//! Its admin router is the binary's `/api/v1`, so `canary status --admin ...` and the
//! other CLI verbs work against the application.
//!
//! # Example
//!
//! A stable and a canary handler at `/`, a rollout that starts at 10 % and waits for
//! `canary promote web`, a breaker at 5 consecutive failures, and the admin API with
//! `/metrics` on a loopback address:
//!
//! ```no_run
//! use axum::{routing::get, Router};
//! use canary_tower::{Canary, Rollout, RouteSpec};
//!
//! #[tokio::main]
//! async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let canary = Canary::builder()
//!         .state_dir("./canary-state")
//!         .route(
//!             RouteSpec::new("web", "v1", "v2")
//!                 .rollout(Rollout::new().manual_step(10.0).breaker(5)),
//!         )
//!         .start()?;
//!
//!     // v1 is the stable handler; the layer puts v2 beside it.
//!     let app = Router::new()
//!         .route("/", get(|| async { "v1" }))
//!         .layer(canary.layer("web", get(|| async { "v2" })));
//!
//!     // The admin API (`canary status --admin http://127.0.0.1:3001`) and /metrics.
//!     let admin = tokio::net::TcpListener::bind("127.0.0.1:3001").await?;
//!     tokio::spawn(async move { canary.serve_admin(admin).await });
//!
//!     let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
//!     axum::serve(listener, app).await?;
//!     Ok(())
//! }
//! ```
//!
//! `curl -H 'x-user-id: alice' localhost:3000/` answers `v1` or `v2`, the same for
//! alice every time, with `x-canary-version` saying which. A client without
//! `x-user-id` and without a `canary_id` cookie gets a generated id in a `canary_id`
//! cookie (`Set-Cookie`), as from the proxy.
//!
//! # Layer or split service
//!
//! [`Canary::layer`] gives a [`CanaryLayer`]: the service it wraps is stable, the one
//! it holds is the canary. That is the shape axum's `Router::layer`,
//! `MethodRouter::layer` and `tower::ServiceBuilder` expect, and it reads as the
//! change it is ("put v2 beside this"), the way tower-http's layers read. For a plain
//! hyper server, or when both versions are built in one place, [`Canary::split`]
//! makes the same [`Split`] service from both.
//!
//! # What is the proxy's, and what differs
//!
//! - The decision is `canary_core`'s `Route::decide`, with the sticky key from
//!   `Route::sticky_key`: the same user with the same key and weight lands on the same
//!   version behind the proxy and behind the layer. The default sticky key is the
//!   `x-user-id` header, else the `canary_id` cookie ([`RouteSpec::sticky_header`],
//!   [`RouteSpec::sticky_cookie`]). Rules are the proxy's ([`RuleMatch`]); a
//!   [`RuleMatch::Source`] rule sees the client address when the server puts it in
//!   the request (axum's `into_make_service_with_connect_info::<SocketAddr>()`, or a
//!   `SocketAddr` extension).
//! - The weight and breaker are the proxy's `RouteRuntime`, the counters its
//!   `VersionStats`, the controller `canary_control::Controller`: the same steps,
//!   analysis, journal and admin API.
//! - Host and path matching are left to the application's router. A 5xx answer or a
//!   service error counts as a failure; there are no upstream instances, so no
//!   ejection and no `canary_upstream_*` metrics, and the canary is never
//!   "unavailable".
//! - Routes are fixed when the [`Canary`] starts (there is no config file to reload).
//!
//! # Cost
//!
//! Per request: the core's decision (tens of nanoseconds), a clock read, a few
//! relaxed atomic adds, and `x-canary-version` inserted into the response's header
//! map. Nothing is allocated for a request with a sticky key (tested with a counting
//! allocator); a request without one allocates its `Set-Cookie` value. The
//! `layer` bench (`cargo bench -p canary-tower`) reports the overhead over calling
//! the service directly.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod embedded;
mod error;
mod facts;
mod plane;
mod spec;
mod split;

pub use canary_control::{Command, ControlError, RouteStatus};
pub use canary_core::analysis::AnalysisSpec;
pub use canary_core::rollout::Phase;
pub use canary_core::{RuleMatch, Target, Weight};
pub use embedded::{Canary, CanaryBuilder, Metrics, DEFAULT_STATE_DIR};
pub use error::Error;
pub use spec::{Rollout, RouteSpec, DEFAULT_STICKY_COOKIE, DEFAULT_STICKY_HEADER};
pub use split::{CanaryLayer, ResponseFuture, Split, X_CANARY_VERSION};
