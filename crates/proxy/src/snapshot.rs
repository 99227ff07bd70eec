//! Snapshots: the immutable routing state requests read, and the [`Proxy`] that
//! builds and swaps them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use arc_swap::ArcSwap;
use bytes::Bytes;
use canary_config::{Config, Limits, PoolConfig, RouteConfig, Timeouts};
use canary_core::{Route, RouteTable};
use http::HeaderValue;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tokio::task::JoinHandle;

use crate::expo::{Exposition, Kind};
use crate::http2::WorkerClients;
use crate::metrics::{encode_versions, VersionStats};
use crate::pool::{health_check_loop, Instance, Pool, PoolClient};
use crate::runtime::{DataPlaneEvent, RouteRuntime};
use crate::tls::PoolTls;
use crate::worker::now_ms;

/// One route as the data plane serves it.
#[derive(Debug)]
pub struct RouteEntry {
    pub runtime: Arc<RouteRuntime>,
    pub stable: Arc<Pool>,
    pub canary: Option<Arc<Pool>>,
    pub timeouts: Timeouts,
    /// `name=` of the sticky cookie a generated id is set in; `None` if the name is not
    /// a valid header value (config validation allows only cookie-name tokens).
    pub cookie_prefix: Option<Bytes>,
}

/// Everything a request needs, immutable once built.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub table: RouteTable,
    /// Parallel to `table.routes`.
    pub entries: Vec<RouteEntry>,
    pub limits: Limits,
}

impl Snapshot {
    /// The route and its entry for a name.
    pub fn route(&self, name: &str) -> Option<(&Route, &RouteEntry)> {
        let i = self.table.routes.iter().position(|r| r.name == name)?;
        Some((&self.table.routes[i], &self.entries[i]))
    }
}

/// State kept across snapshots, keyed by name, touched only when building or scraping.
#[derive(Default)]
struct Registry {
    /// Keyed by (route, version, address): each pool owns its instances' health and
    /// ejection state, so two pools that name the same address (one health-checked,
    /// one not) never overwrite each other's view.
    instances: HashMap<(String, String, String), Arc<Instance>>,
    /// HTTP/2 forwarding clients by connect timeout.
    clients: HashMap<u64, WorkerClients>,
    stats: HashMap<(String, String), Arc<VersionStats>>,
    stats_order: Vec<Arc<VersionStats>>,
    runtimes: HashMap<String, Arc<RouteRuntime>>,
    health_tasks: Vec<JoinHandle<()>>,
}

/// The data plane: owns the current snapshot and what survives reloads.
pub struct Proxy {
    snapshot: ArcSwap<Snapshot>,
    registry: Mutex<Registry>,
    events_tx: UnboundedSender<DataPlaneEvent>,
    events_rx: Mutex<Option<UnboundedReceiver<DataPlaneEvent>>>,
    /// The limits of the first config: the listener is built with them, so a reload
    /// must not change them half-way (they are documented as needing a restart).
    limits: OnceLock<Limits>,
    pub(crate) unrouted: std::sync::atomic::AtomicU64,
    /// Data-plane workers: one forwarding client per worker and pool kind.
    workers: usize,
}

impl Default for Proxy {
    fn default() -> Self {
        Proxy::new()
    }
}

impl Proxy {
    /// A proxy for one data-plane worker.
    pub fn new() -> Proxy {
        Proxy::with_workers(1)
    }

    /// A proxy served by `workers` data-plane threads (see `server::spawn_workers`).
    pub fn with_workers(workers: usize) -> Proxy {
        let (tx, rx) = unbounded_channel();
        Proxy {
            snapshot: ArcSwap::from_pointee(Snapshot::default()),
            registry: Mutex::new(Registry::default()),
            events_tx: tx,
            events_rx: Mutex::new(Some(rx)),
            limits: OnceLock::new(),
            unrouted: Default::default(),
            workers: workers.max(1),
        }
    }

    /// The snapshot requests are served from now.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    pub(crate) fn load(&self) -> arc_swap::Guard<Arc<Snapshot>> {
        self.snapshot.load()
    }

    /// The receiver of data-plane events (breaker trips, canary unavailable); once.
    pub fn take_events(&self) -> Option<UnboundedReceiver<DataPlaneEvent>> {
        self.events_rx.lock().ok()?.take()
    }

    /// The live state of a route, if it has ever been configured.
    pub fn runtime(&self, route: &str) -> Option<Arc<RouteRuntime>> {
        self.registry.lock().ok()?.runtimes.get(route).cloned()
    }

    /// Builds a snapshot from a validated config and swaps it in atomically.
    ///
    /// Instances, forwarding clients (with their keep-alive connections), counters and
    /// route runtimes are reused by name, so a reload keeps health state, pooled
    /// connections and weights. Health-check tasks are restarted. Must be called
    /// within a tokio runtime. Weights are not touched: the controller owns them.
    /// Limits stay those of the first config applied (changing them needs a restart).
    pub fn apply(&self, config: &Config) -> Arc<Snapshot> {
        let mut reg = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        for t in reg.health_tasks.drain(..) {
            t.abort();
        }
        let mut table = RouteTable::default();
        let mut entries = Vec::with_capacity(config.routes.len());
        for rc in &config.routes {
            entries.push(self.build_entry(&mut reg, rc, self.workers));
            table.routes.push(rc.route.clone());
        }
        // Forget the instances of pools the new config no longer has.
        let used: std::collections::HashSet<(&str, &str, &str)> = entries
            .iter()
            .flat_map(|e| std::iter::once(&e.stable).chain(e.canary.iter()))
            .flat_map(|p| {
                let route = p.stats.route.as_str();
                let version = p.version.as_str();
                p.instances
                    .iter()
                    .map(move |i| (route, version, i.addr.as_str()))
            })
            .collect();
        reg.instances
            .retain(|(r, v, a), _| used.contains(&(r.as_str(), v.as_str(), a.as_str())));
        let snap = Arc::new(Snapshot {
            table,
            entries,
            limits: self.limits.get_or_init(|| config.limits.clone()).clone(),
        });
        self.snapshot.store(snap.clone());
        snap
    }

    fn build_entry(&self, reg: &mut Registry, rc: &RouteConfig, workers: usize) -> RouteEntry {
        let name = rc.route.name.as_str();
        let runtime = reg
            .runtimes
            .entry(name.to_string())
            .or_insert_with(|| Arc::new(RouteRuntime::new(name, self.events_tx.clone())))
            .clone();
        let stable = Arc::new(build_pool(reg, rc, &rc.stable, workers));
        let canary = rc
            .canary
            .as_ref()
            .map(|p| Arc::new(build_pool(reg, rc, p, workers)));
        RouteEntry {
            runtime,
            stable,
            canary,
            timeouts: rc.timeouts,
            cookie_prefix: {
                let prefix = format!("{}=", rc.route.sticky.cookie);
                HeaderValue::from_str(&prefix)
                    .is_ok()
                    .then(|| Bytes::from(prefix))
            },
        }
    }

    /// Writes the data plane's metric families.
    pub fn encode_metrics(&self, e: &mut Exposition) {
        let snap = self.snapshot();
        let reg = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        encode_versions(e, &reg.stats_order);
        e.family(
            "canary_route_weight_percent",
            "Current canary weight of each route, in percent.",
            Kind::Gauge,
        );
        for (r, entry) in snap.table.routes.iter().zip(&snap.entries) {
            e.sample(
                "canary_route_weight_percent",
                &[("route", r.name.as_str())],
                entry.runtime.weight().percent(),
            );
        }
        e.family(
            "canary_fallbacks_total",
            "Canary-bound requests sent to stable because no canary instance was available.",
            Kind::Counter,
        );
        for (r, entry) in snap.table.routes.iter().zip(&snap.entries) {
            e.sample(
                "canary_fallbacks_total",
                &[("route", r.name.as_str())],
                entry.runtime.fallbacks() as f64,
            );
        }
        e.family(
            "canary_breaker_tripped",
            "1 while a route's breaker holds canary traffic at 0.",
            Kind::Gauge,
        );
        for (r, entry) in snap.table.routes.iter().zip(&snap.entries) {
            e.sample(
                "canary_breaker_tripped",
                &[("route", r.name.as_str())],
                u8::from(entry.runtime.tripped()),
            );
        }
        let now = now_ms();
        // The per-instance families: name, help, kind, and the sample.
        type PerInstance = (&'static str, &'static str, Kind, fn(&Instance, u64) -> f64);
        let per_instance: [PerInstance; 3] = [
            (
                "canary_upstream_healthy",
                "1 when an upstream instance can take requests (not ejected, passing health checks).",
                Kind::Gauge,
                |inst, now| f64::from(u8::from(inst.available(now))),
            ),
            (
                "canary_upstream_ejections_total",
                "Times an upstream instance was ejected for consecutive failures.",
                Kind::Counter,
                |inst, _| inst.ejections_total() as f64,
            ),
            (
                "canary_upstream_unasked_bytes_total",
                "Times an HTTP/1.1 upstream instance sent bytes nobody asked for (a late or second answer, more body than its framing said); its connections are then not reused for a while.",
                Kind::Counter,
                |inst, _| inst.unasked_bytes_total() as f64,
            ),
        ];
        let instances = pool_instances(&snap);
        for (name, help, kind, sample) in per_instance {
            e.family(name, help, kind);
            for (route, version, inst) in &instances {
                let labels = [
                    ("route", *route),
                    ("version", *version),
                    ("upstream", inst.addr.as_str()),
                ];
                e.sample(name, &labels, sample(inst, now));
            }
        }
        e.family(
            "canary_unrouted_requests_total",
            "Requests that matched no route (answered 404).",
            Kind::Counter,
        );
        e.sample(
            "canary_unrouted_requests_total",
            &[],
            self.unrouted.load(std::sync::atomic::Ordering::Relaxed) as f64,
        );
        // Which version of a route is stable and which is the canary: the per-version
        // families carry only the version's name, and dashboards and alerts join on
        // this (`* on (route, version) group_left (role) canary_route_version_info`).
        e.family(
            "canary_route_version_info",
            "1 for each version a route serves now, with its role: stable or canary.",
            Kind::Gauge,
        );
        for (r, entry) in snap.table.routes.iter().zip(&snap.entries) {
            let canary = entry.canary.iter().map(|p| (p, "canary"));
            for (pool, role) in std::iter::once((&entry.stable, "stable")).chain(canary) {
                let labels = [
                    ("route", r.name.as_str()),
                    ("version", pool.version.as_str()),
                    ("role", role),
                ];
                e.sample("canary_route_version_info", &labels, 1u8);
            }
        }
        e.family(
            "canary_timeouts_total",
            "Connections or answers cut by a timer, by kind: header (a request head not complete in time, on the proxy's own reader), body (limits.body_timeout), send (limits.send_timeout), upstream_idle (timeouts.idle), http2_idle (limits.http2_idle_timeout).",
            Kind::Counter,
        );
        for kind in crate::timers::Kind::ALL {
            e.sample(
                "canary_timeouts_total",
                &[("kind", kind.label())],
                crate::timers::TIMEOUTS.get(kind) as f64,
            );
        }
    }
}

/// Every instance of the snapshot's pools with its route and version. The config
/// makes (route, version, address) unique: versions differ within a route and a pool
/// lists an address once.
fn pool_instances(snap: &Snapshot) -> Vec<(&str, &str, &Arc<Instance>)> {
    let mut out = Vec::new();
    for (r, entry) in snap.table.routes.iter().zip(&snap.entries) {
        for pool in std::iter::once(&entry.stable).chain(entry.canary.iter()) {
            for inst in &pool.instances {
                out.push((r.name.as_str(), pool.version.as_str(), inst));
            }
        }
    }
    out
}

fn build_pool(reg: &mut Registry, rc: &RouteConfig, pc: &PoolConfig, workers: usize) -> Pool {
    let instances: Vec<Arc<Instance>> = pc
        .upstreams
        .iter()
        .filter_map(|addr| {
            let key = (rc.route.name.clone(), pc.version.clone(), addr.clone());
            if let Some(i) = reg.instances.get(&key) {
                return Some(i.clone());
            }
            let inst = Arc::new(Instance::new(&rc.route.name, &pc.version, addr, workers)?);
            reg.instances.insert(key, inst.clone());
            Some(inst)
        })
        .collect();
    // Cleartext HTTP/1.1 pools keep their connections in their instances
    // (`upstream`). A TLS pool's client is built anew at every load (`crate::tls`);
    // h2c clients are shared per connect timeout and survive reloads.
    let tls = pc.tls.as_ref().map(|t| {
        PoolTls::new(
            t,
            &format!("route {} version {} tls", rc.route.name, pc.version),
        )
    });
    let client = match (&tls, pc.http2) {
        (Some(t), http2) => Some(PoolClient {
            clients: WorkerClients::with_tls(workers, rc.timeouts.connect_ms, Some(t), http2),
            http2,
            tls: true,
        }),
        (None, true) => Some(PoolClient {
            clients: reg
                .clients
                .entry(rc.timeouts.connect_ms)
                .or_insert_with(|| WorkerClients::new(workers, rc.timeouts.connect_ms))
                .clone(),
            http2: true,
            tls: false,
        }),
        (None, false) => None,
    };
    let key = (rc.route.name.clone(), pc.version.clone());
    let stats = match reg.stats.get(&key) {
        Some(s) => s.clone(),
        None => {
            let s = Arc::new(VersionStats::new(&key.0, &key.1));
            reg.stats.insert(key, s.clone());
            reg.stats_order.push(s.clone());
            s
        }
    };
    match &pc.health_check {
        Some(hc) => reg.health_tasks.push(tokio::spawn(health_check_loop(
            instances.clone(),
            hc.clone(),
            pc.http2,
            tls,
        ))),
        None => instances.iter().for_each(|i| i.reset_check()),
    }
    Pool::new(
        (&rc.route.name, &pc.version),
        instances,
        client,
        stats,
        rc.ejection,
        pc.health_check.clone(),
    )
}
