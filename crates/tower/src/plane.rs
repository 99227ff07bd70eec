//! The in-process data plane: each route's live state (weight and breaker, the
//! counters of both versions) for the layer to read and record into, and the
//! [`DataPlane`] the controller drives.
//!
//! It holds the same parts the proxy holds per route — `RouteRuntime` for the weight
//! and breaker, `VersionStats` for the counters — so the breaker, the analysis's
//! input and the metric families are the proxy's own, not copies.

use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use canary_config::{Config, RouteConfig};
use canary_control::DataPlane;
use canary_core::analysis::VersionWindow;
use canary_core::Route;
use canary_proxy::expo::{Exposition, Kind};
use canary_proxy::metrics::{encode_versions, VersionStats};
use canary_proxy::{DataPlaneEvent, RouteRuntime};
use http::HeaderValue;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

/// Everything a request on one route needs, built once.
#[derive(Debug)]
pub(crate) struct RouteState {
    /// The core's route: rules and sticky key (host and path matching are the
    /// application router's job).
    pub(crate) route: Route,
    pub(crate) runtime: Arc<RouteRuntime>,
    pub(crate) stable: Arc<VersionStats>,
    pub(crate) canary: Arc<VersionStats>,
    /// `x-canary-version` values, shared (cloning one is a reference count).
    pub(crate) stable_header: HeaderValue,
    pub(crate) canary_header: HeaderValue,
    /// `name=` of the sticky cookie a generated id is set in.
    pub(crate) cookie_prefix: Bytes,
}

/// A shared header value: `HeaderValue::from_str` copies into a `Bytes` that
/// allocates its shared form on the first clone, so that clone happens here, once,
/// and never on a request.
fn shared_value(s: &str) -> HeaderValue {
    let v = HeaderValue::from_str(s).expect("versions are checked by RouteSpec");
    drop(v.clone());
    v
}

impl RouteState {
    fn new(rc: &RouteConfig, events: UnboundedSender<DataPlaneEvent>) -> RouteState {
        let name = rc.route.name.as_str();
        let canary = rc.canary.as_ref().map_or("", |c| c.version.as_str());
        RouteState {
            route: rc.route.clone(),
            runtime: Arc::new(RouteRuntime::new(name, events)),
            stable: Arc::new(VersionStats::new(name, &rc.stable.version)),
            canary: Arc::new(VersionStats::new(name, canary)),
            stable_header: shared_value(&rc.stable.version),
            canary_header: shared_value(canary),
            cookie_prefix: Bytes::from(format!("{}=", rc.route.sticky.cookie)),
        }
    }
}

/// The routes of one embedded canary.
pub(crate) struct Plane {
    routes: Mutex<Vec<Arc<RouteState>>>,
    events_tx: UnboundedSender<DataPlaneEvent>,
    events_rx: Mutex<Option<UnboundedReceiver<DataPlaneEvent>>>,
}

impl Plane {
    pub(crate) fn new() -> Plane {
        let (tx, rx) = unbounded_channel();
        Plane {
            routes: Mutex::new(Vec::new()),
            events_tx: tx,
            events_rx: Mutex::new(Some(rx)),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Arc<RouteState>>> {
        self.routes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The state of a route, for a layer to hold.
    pub(crate) fn route(&self, name: &str) -> Option<Arc<RouteState>> {
        self.lock().iter().find(|r| r.route.name == name).cloned()
    }

    /// The names of the routes, in declaration order.
    pub(crate) fn names(&self) -> Vec<String> {
        self.lock().iter().map(|r| r.route.name.clone()).collect()
    }
}

impl DataPlane for Plane {
    /// Registers the config's routes. An embedded canary's routes are fixed when it
    /// starts (layers hold their route's state), so a route already known is kept.
    fn apply(&self, config: &Config) {
        let mut routes = self.lock();
        for rc in &config.routes {
            if !routes.iter().any(|r| r.route.name == rc.route.name) {
                routes.push(Arc::new(RouteState::new(rc, self.events_tx.clone())));
            }
        }
    }

    fn runtime(&self, route: &str) -> Option<Arc<RouteRuntime>> {
        self.route(route).map(|r| r.runtime.clone())
    }

    fn counts(&self, route: &str) -> Option<(VersionWindow, VersionWindow)> {
        self.route(route)
            .map(|r| (r.canary.counts(), r.stable.counts()))
    }

    /// The canary is the application's own service: always there to be called.
    fn canary_available(&self, route: &str) -> Option<bool> {
        self.route(route).map(|_| true)
    }

    /// No instances, so nothing is ever ejected.
    fn clear_canary_ejections(&self, _route: &str) {}

    fn take_events(&self) -> Option<UnboundedReceiver<DataPlaneEvent>> {
        self.events_rx.lock().ok()?.take()
    }

    /// The proxy's per-version families (`canary_requests_total`,
    /// `canary_request_failures_total`, `canary_upstream_errors_total`,
    /// `canary_client_aborts_total`, `canary_request_duration_seconds`) and its
    /// per-route ones (`canary_route_weight_percent`, `canary_fallbacks_total`,
    /// `canary_breaker_tripped`). The upstream-instance families are left out: an
    /// embedded canary has no instances.
    fn encode_metrics(&self, e: &mut Exposition) {
        let routes = self.lock().clone();
        let stats: Vec<Arc<VersionStats>> = routes
            .iter()
            .flat_map(|r| [r.stable.clone(), r.canary.clone()])
            .collect();
        encode_versions(e, &stats);
        e.family(
            "canary_route_weight_percent",
            "Current canary weight of each route, in percent.",
            Kind::Gauge,
        );
        for r in &routes {
            e.sample(
                "canary_route_weight_percent",
                &[("route", r.route.name.as_str())],
                r.runtime.weight().percent(),
            );
        }
        e.family(
            "canary_fallbacks_total",
            "Canary-bound requests sent to stable because no canary instance was available.",
            Kind::Counter,
        );
        for r in &routes {
            e.sample(
                "canary_fallbacks_total",
                &[("route", r.route.name.as_str())],
                r.runtime.fallbacks() as f64,
            );
        }
        e.family(
            "canary_breaker_tripped",
            "1 while a route's breaker holds canary traffic at 0.",
            Kind::Gauge,
        );
        for r in &routes {
            e.sample(
                "canary_breaker_tripped",
                &[("route", r.route.name.as_str())],
                u8::from(r.runtime.tripped()),
            );
        }
    }
}
