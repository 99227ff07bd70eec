//! The control side of `canary`: the rollout controller, its persisted state and
//! journal, config reloading, and the admin API.
//!
//! # Layout
//! - [`controller`]: applies configs, drives rollouts with the pure core's state
//!   machine, answers commands. Never on the request path.
//! - [`plane`]: the [`DataPlane`] seam the controller drives: the proxy, or an
//!   application's tower layer (`canary-tower`).
//! - [`store`]: atomic state files and the append-only journal in `state_dir`.
//! - [`state_store`]: the [`state_store::StateStore`] seam: file store here, etcd in
//!   `canary-fleet`.
//! - [`gate`]: the seam through which fleet mode routes the admin API's commands.
//! - [`admin`]: the axum router for `/api/v1`, `/metrics`, `/healthz`, `/readyz`.
//! - [`listener`]: the admin listener's accept loop, with its own connection budget
//!   and header timeout so it can never starve the data plane.
//! - [`history`]: the dashboard's bounded time series per route, filled by the
//!   controller's tick with the analysis' own functions.
//! - [`live`]: the broadcast of status changes, points and journal entries that the
//!   admin API's stream (`GET /api/v1/stream`) forwards.
//! - [`source`]: the config file source: reload on file change (watching the
//!   directories of the file and of the symlinks leading to it, since editors
//!   replace files and ConfigMaps swap links) and on SIGHUP.

#![forbid(unsafe_code)]

pub mod admin;
pub mod controller;
pub mod gate;
pub mod history;
pub mod listener;
pub mod live;
pub mod plane;
pub mod source;
pub mod state_store;
pub mod store;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

pub use controller::{Command, ControlError, Controller, Evidence, RouteStatus};
pub use plane::DataPlane;
pub use state_store::StateStore;

/// How often the controller samples counters and steps rollouts. Verdicts are taken
/// at each route's own `analysis.interval`; this only bounds how late a pause ends
/// or an unhealthy canary pool is noticed.
pub const TICK: Duration = Duration::from_millis(250);

/// Runs the controller loop until `shutdown` resolves: ticks, and data-plane events
/// (breaker trips, canary unavailable) as soon as they arrive.
pub async fn run_controller(controller: Arc<Controller>, shutdown: impl Future<Output = ()>) {
    let mut events = controller.proxy().take_events();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = tick.tick() => controller.tick(),
            Some(ev) = async { match events.as_mut() { Some(rx) => rx.recv().await, None => std::future::pending().await } } => {
                controller.on_event(ev);
            }
            () = &mut shutdown => break,
        }
    }
}
