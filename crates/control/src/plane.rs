//! The seam between the controller and a data plane.
//!
//! The controller needs only a few things from whatever serves the requests: build
//! its routes from a config, hand out each route's [`RouteRuntime`] (weight and
//! breaker), the cumulative counters of both versions, whether the canary can take
//! requests, and the data plane's events and metrics. [`DataPlane`] names exactly
//! those, so the same controller drives the reverse proxy ([`Proxy`], in the binary)
//! and an application that embeds `canary` as a tower layer (`canary-tower`).

use std::sync::Arc;

use canary_config::Config;

use crate::controller::{instances, Pools};
use canary_core::analysis::VersionWindow;
use canary_proxy::expo::Exposition;
use canary_proxy::pool::now_ms;
use canary_proxy::{DataPlaneEvent, Proxy, RouteRuntime};
use tokio::sync::mpsc::UnboundedReceiver;

/// What the controller reads from and writes to the data plane. Never called on the
/// request path.
pub trait DataPlane: Send + Sync + 'static {
    /// Builds (or rebuilds) the data plane's routes from a validated config. Route
    /// runtimes and counters are kept by name; weights are left to the controller.
    fn apply(&self, config: &Config);

    /// The live weight and breaker of a route, if it has been configured.
    fn runtime(&self, route: &str) -> Option<Arc<RouteRuntime>>;

    /// The cumulative counts of a route's canary and stable versions, in that order;
    /// `None` for an unknown route or one without a canary.
    fn counts(&self, route: &str) -> Option<(VersionWindow, VersionWindow)>;

    /// Whether the route's canary can take requests now; `None` without a canary.
    fn canary_available(&self, route: &str) -> Option<bool>;

    /// Forgets the passive ejections of the route's canary (a retried rollout starts
    /// clean). A data plane without ejection does nothing.
    fn clear_canary_ejections(&self, route: &str);

    /// The receiver of data-plane events (breaker trips, canary unavailable); the
    /// first call takes it, later calls get `None`.
    fn take_events(&self) -> Option<UnboundedReceiver<DataPlaneEvent>>;

    /// Writes the data plane's metric families.
    fn encode_metrics(&self, e: &mut Exposition);

    /// Each instance of the route's stable and canary pools, as the dashboard shows
    /// them; empty for a data plane without instances (an embedded layer).
    fn pools(&self, _route: &str) -> Pools {
        Pools::default()
    }
}

impl DataPlane for Proxy {
    fn apply(&self, config: &Config) {
        Proxy::apply(self, config);
    }

    fn runtime(&self, route: &str) -> Option<Arc<RouteRuntime>> {
        Proxy::runtime(self, route)
    }

    fn counts(&self, route: &str) -> Option<(VersionWindow, VersionWindow)> {
        let snap = self.snapshot();
        let (_, entry) = snap.route(route)?;
        let canary = entry.canary.as_ref()?;
        Some((canary.stats.counts(), entry.stable.stats.counts()))
    }

    fn pools(&self, route: &str) -> Pools {
        let snap = self.snapshot();
        let mono = now_ms();
        let entry = snap.route(route).map(|(_, e)| e);
        Pools {
            stable: instances(entry.map(|e| &*e.stable), mono),
            canary: instances(entry.and_then(|e| e.canary.as_deref()), mono),
        }
    }

    fn canary_available(&self, route: &str) -> Option<bool> {
        let snap = self.snapshot();
        let (_, entry) = snap.route(route)?;
        entry.canary.as_ref().map(|p| p.any_available(now_ms()))
    }

    fn clear_canary_ejections(&self, route: &str) {
        let snap = self.snapshot();
        if let Some(pool) = snap.route(route).and_then(|(_, e)| e.canary.as_ref()) {
            for i in &pool.instances {
                i.clear_ejection();
            }
        }
    }

    fn take_events(&self) -> Option<UnboundedReceiver<DataPlaneEvent>> {
        Proxy::take_events(self)
    }

    fn encode_metrics(&self, e: &mut Exposition) {
        Proxy::encode_metrics(self, e);
    }
}
