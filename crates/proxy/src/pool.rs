//! Upstream instances and pools: balancing, passive ejection, active health checks.
//!
//! An [`Instance`] is kept by (route, version, address) across reloads, so its health
//! and ejection state survive a config change, and each pool judges an address on its
//! own traffic and checks. Everything on the request path is atomics.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use canary_config::{Ejection, HealthCheck};
use http::uri::Authority;
use http::HeaderValue;
use http_body_util::Empty;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use tokio::net::TcpStream;

use crate::headers::{
    PROTO_HTTP, PROTO_HTTPS, X_CANARY_ROUTE, X_CANARY_VERSION, X_FORWARDED_PROTO,
};
use crate::http2::WorkerClients;
use crate::metrics::VersionStats;
use crate::tls::PoolTls;
use crate::upstream::Upstream;
use crate::witness::{Spread, Witness};
use crate::worker::this_worker;
use canary_http1::conn::IdleList;
use canary_http1::fields::write_field;
use canary_http1::reuse::Reuse;
use hyper_rustls::HttpsConnector;

/// The data plane's monotonic clock (the controller reads it from here).
pub use crate::worker::now_ms;

/// One upstream instance (`host:port`).
#[derive(Debug)]
pub struct Instance {
    /// The route and version of the pool this instance belongs to (for logs).
    route: String,
    version: String,
    pub addr: String,
    pub authority: Authority,
    consecutive_failures: AtomicU32,
    /// The clients behind the current run of failures.
    spread: Spread,
    ejected_until_ms: AtomicU64,
    /// Ejections in a row without a success in between: the back-off exponent.
    ejection_streak: AtomicU32,
    ejections_total: AtomicU64,
    /// The active health check's view; true when the pool has no health check.
    check_healthy: AtomicBool,
    check_streak: AtomicU32,
    /// `Host` for a request that came without one.
    pub host_header: HeaderValue,
    /// Idle HTTP/1.1 connections, one list per data-plane worker.
    idle: Box<[Arc<IdleList<TcpStream>>]>,
}

impl Instance {
    /// An instance of `addr` (`host:port`) in the `route`/`version` pool, served by
    /// `workers` data-plane workers.
    pub fn new(route: &str, version: &str, addr: &str, workers: usize) -> Option<Instance> {
        Some(Instance {
            route: route.to_string(),
            version: version.to_string(),
            addr: addr.to_string(),
            authority: addr.parse().ok()?,
            host_header: HeaderValue::from_str(addr).ok()?,
            idle: {
                // One reuse state for every worker's list: an upstream seen sending
                // unasked-for bytes on one worker is held off on all.
                let reuse = Arc::new(Reuse::default());
                (0..workers.max(1))
                    .map(|_| Arc::new(IdleList::new(reuse.clone())))
                    .collect()
            },
            consecutive_failures: AtomicU32::new(0),
            spread: Spread::default(),
            ejected_until_ms: AtomicU64::new(0),
            ejection_streak: AtomicU32::new(0),
            ejections_total: AtomicU64::new(0),
            check_healthy: AtomicBool::new(true),
            check_streak: AtomicU32::new(0),
        })
    }

    /// The current worker's idle HTTP/1.1 connections to this instance.
    #[inline]
    pub fn idle(&self) -> &Arc<IdleList<TcpStream>> {
        this_worker(&self.idle)
    }

    /// Whether the instance may take a request now.
    #[inline]
    pub fn available(&self, now_ms: u64) -> bool {
        self.check_healthy.load(Relaxed) && self.ejected_until_ms.load(Relaxed) <= now_ms
    }

    /// Whether passive ejection currently holds the instance out.
    pub fn ejected(&self, now_ms: u64) -> bool {
        self.ejected_until_ms.load(Relaxed) > now_ms
    }

    pub fn ejections_total(&self) -> u64 {
        self.ejections_total.load(Relaxed)
    }

    /// Times this instance sent bytes nobody asked for over HTTP/1.1 (a late or
    /// second answer, more body than its framing said); each holds the reuse of its
    /// connections off for a while (`canary_http1::reuse`).
    pub fn unasked_bytes_total(&self) -> u64 {
        self.idle[0].reuse().unasked_total()
    }

    pub fn check_healthy(&self) -> bool {
        self.check_healthy.load(Relaxed)
    }

    #[inline]
    pub fn record_success(&self) {
        if self.consecutive_failures.load(Relaxed) != 0 {
            self.consecutive_failures.store(0, Relaxed);
            self.spread.clear();
        }
        if self.ejection_streak.load(Relaxed) != 0 {
            self.ejection_streak.store(0, Relaxed);
        }
    }

    /// Ends a passive ejection at once and forgets its back-off (a rollout is retried:
    /// the canary gets a fresh chance). Active health checks still apply.
    pub fn clear_ejection(&self) {
        self.consecutive_failures.store(0, Relaxed);
        self.spread.clear();
        self.ejection_streak.store(0, Relaxed);
        self.ejected_until_ms.store(0, Relaxed);
    }

    /// Counts a failure seen by `witness`; ejects after `spec.consecutive_failures` in
    /// a row from at least `spec.min_clients` distinct clients (see [`Spread`]), for
    /// `base × 2^streak` capped at `max`. Returns whether this call ejected it.
    pub fn record_failure(&self, spec: &Ejection, now_ms: u64, witness: Witness) -> bool {
        if spec.consecutive_failures == 0 {
            return false;
        }
        let n = self.consecutive_failures.fetch_add(1, Relaxed) + 1;
        let clients = self.spread.note(witness);
        if n < spec.consecutive_failures
            || self.ejected(now_ms)
            || !Spread::enough(clients, spec.min_clients)
        {
            return false;
        }
        self.consecutive_failures.store(0, Relaxed);
        self.spread.clear();
        let streak = self.ejection_streak.fetch_add(1, Relaxed).min(16);
        let period = spec
            .base_ms
            .saturating_mul(1 << streak)
            .min(spec.max_ms.max(spec.base_ms));
        self.ejected_until_ms.store(now_ms + period, Relaxed);
        self.ejections_total.fetch_add(1, Relaxed);
        tracing::warn!(
            route = %self.route,
            version = %self.version,
            upstream = %self.addr,
            failures = n,
            ejected_ms = period,
            "upstream ejected"
        );
        true
    }

    /// Applies one active health-check result with the configured thresholds.
    pub fn record_check(&self, ok: bool, spec: &HealthCheck) {
        let healthy = self.check_healthy.load(Relaxed);
        if ok == healthy {
            self.check_streak.store(0, Relaxed);
            return;
        }
        let streak = self.check_streak.fetch_add(1, Relaxed) + 1;
        let threshold = if ok {
            spec.healthy_threshold
        } else {
            spec.unhealthy_threshold
        };
        if streak >= threshold.max(1) {
            self.check_healthy.store(ok, Relaxed);
            self.check_streak.store(0, Relaxed);
            tracing::warn!(
                route = %self.route,
                version = %self.version,
                upstream = %self.addr,
                healthy = ok,
                "health check changed state"
            );
        }
    }

    /// Marks healthy again (a pool without health checks).
    pub fn reset_check(&self) {
        self.check_healthy.store(true, Relaxed);
        self.check_streak.store(0, Relaxed);
    }
}

/// One version's instances on one route.
#[derive(Debug)]
pub struct Pool {
    pub version: String,
    pub version_header: HeaderValue,
    /// The route's name, as `X-Canary-Route` carries it.
    pub route_header: HeaderValue,
    /// The request fields that are the same for every request through this pool,
    /// `X-Forwarded-Proto`, `X-Canary-Version` and `X-Canary-Route`, as the lines an
    /// HTTP/1.1 exchange writes: one copy per request instead of three fields written
    /// in four pieces each (~2% of a request's instructions). A pool belongs to one
    /// route, so the route's name can be part of them. Two copies: for requests that
    /// came over cleartext (`X-Forwarded-Proto: http`) and over TLS (`https`).
    request_lines: [Bytes; 2],
    pub instances: Vec<Arc<Instance>>,
    /// The forwarding client of an `http2: true` or `tls` pool; `None` for a
    /// cleartext HTTP/1.1 pool, whose connections are in its instances' idle lists.
    pub client: Option<PoolClient>,
    pub stats: Arc<VersionStats>,
    pub ejection: Ejection,
    pub health_check: Option<HealthCheck>,
    next: AtomicUsize,
}

/// How a pool that goes through hyper's client reaches its instances.
#[derive(Clone, Debug)]
pub struct PoolClient {
    pub clients: WorkerClients,
    /// HTTP/2 (h2c, or h2 by ALPN over TLS); else HTTP/1.1 (over TLS).
    pub http2: bool,
    /// TLS to the instances (`tls` on the pool).
    pub tls: bool,
}

impl Pool {
    pub fn new(
        (route, version): (&str, &str),
        instances: Vec<Arc<Instance>>,
        client: Option<PoolClient>,
        stats: Arc<VersionStats>,
        ejection: Ejection,
        health_check: Option<HealthCheck>,
    ) -> Pool {
        let value =
            |s: &str| HeaderValue::from_str(s).unwrap_or(HeaderValue::from_static("unknown"));
        let (version_header, route_header) = (value(version), value(route));
        let lines = |proto: &HeaderValue| {
            let mut lines = Vec::with_capacity(80);
            for (name, value) in [
                (&X_FORWARDED_PROTO, proto),
                (&X_CANARY_VERSION, &version_header),
                (&X_CANARY_ROUTE, &route_header),
            ] {
                write_field(&mut lines, name.as_str().as_bytes(), value.as_bytes());
            }
            Bytes::from(lines)
        };
        let request_lines = [lines(&PROTO_HTTP), lines(&PROTO_HTTPS)];
        Pool {
            version: version.to_string(),
            version_header,
            route_header,
            request_lines,
            instances,
            client,
            stats,
            ejection,
            health_check,
            next: AtomicUsize::new(0),
        }
    }

    /// Whether the pool speaks HTTP/2 to its instances.
    #[inline]
    pub fn is_http2(&self) -> bool {
        self.client.as_ref().is_some_and(|c| c.http2)
    }

    /// Whether the pool speaks TLS to its instances.
    #[inline]
    pub fn is_tls(&self) -> bool {
        self.client.as_ref().is_some_and(|c| c.tls)
    }

    /// Whether requests go through hyper's client (HTTP/2 or TLS), not the proxy's
    /// own HTTP/1.1 exchange.
    #[inline]
    pub fn via_client(&self) -> bool {
        self.client.is_some()
    }

    /// The fixed request lines for a request that came over TLS (`tls`) or not.
    #[inline]
    pub fn request_lines(&self, tls: bool) -> &Bytes {
        &self.request_lines[usize::from(tls)]
    }

    /// How a request reaches `instance` of this pool (connecting within `connect_ms`
    /// when a new HTTP/1.1 connection is needed).
    #[inline]
    pub(crate) fn upstream<'a>(&'a self, instance: &'a Instance, connect_ms: u64) -> Upstream<'a> {
        match &self.client {
            Some(c) => Upstream::Client {
                client: c.clients.get(),
                authority: &instance.authority,
                host: &instance.host_header,
                others: self.instances.len() > 1,
            },
            None => Upstream::Http1 {
                idle: instance.idle(),
                addr: &instance.addr,
                connect_ms,
            },
        }
    }

    /// The next available instance, round robin; `None` when none is available.
    #[inline]
    pub fn pick(&self, now_ms: u64) -> Option<&Arc<Instance>> {
        let n = self.instances.len();
        let start = self.next.fetch_add(1, Relaxed);
        (0..n)
            .map(|i| &self.instances[(start + i) % n])
            .find(|inst| inst.available(now_ms))
    }

    /// The next available instance other than `not`, round robin (where a request
    /// goes when `not` failed it).
    pub fn pick_other(&self, now_ms: u64, not: &Instance) -> Option<&Arc<Instance>> {
        let n = self.instances.len();
        let start = self.next.fetch_add(1, Relaxed);
        (0..n)
            .map(|i| &self.instances[(start + i) % n])
            .find(|inst| !std::ptr::eq(Arc::as_ptr(inst), not) && inst.available(now_ms))
    }

    /// Whether at least one instance is available.
    pub fn any_available(&self, now_ms: u64) -> bool {
        self.instances.iter().any(|i| i.available(now_ms))
    }
}

/// Runs the active health checks of one pool until aborted, the way the pool's
/// traffic goes: `http2` checks with HTTP/2 (h2c, or h2 over TLS), since such
/// upstreams (gRPC) may not speak HTTP/1.1; `tls` with the pool's TLS settings.
pub async fn health_check_loop(
    instances: Vec<Arc<Instance>>,
    spec: HealthCheck,
    http2: bool,
    tls: Option<PoolTls>,
) {
    let connector = crate::tls::connector(spec.timeout_ms, tls.as_ref(), http2);
    let client: Client<HttpsConnector<HttpConnector>, Empty<Bytes>> =
        Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(0)
            .http2_only(http2)
            .build(connector);
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut tick = tokio::time::interval(Duration::from_millis(spec.interval_ms.max(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        for inst in &instances {
            let uri = format!("{scheme}://{}{}", inst.addr, spec.path);
            let Ok(req) = http::Request::get(uri)
                .header("user-agent", "canary-health-check")
                .body(Empty::new())
            else {
                inst.record_check(false, &spec);
                continue;
            };
            let res =
                tokio::time::timeout(Duration::from_millis(spec.timeout_ms), client.request(req))
                    .await;
            let ok = matches!(&res, Ok(Ok(r)) if r.status().is_success());
            inst.record_check(ok, &spec);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::witness::ClientId;

    fn ejection() -> Ejection {
        Ejection {
            consecutive_failures: 3,
            base_ms: 1_000,
            max_ms: 3_000,
            min_clients: 1,
        }
    }

    /// A failure seen by client `i` (its own address and key).
    fn client(i: u8) -> Witness {
        Witness::Client(ClientId::new([192, 0, 2, i].into(), Some(&[i])))
    }

    #[test]
    fn ejects_after_consecutive_failures_with_backoff() {
        let i = Instance::new("r", "v1", "127.0.0.1:1", 1).unwrap();
        let spec = ejection();
        let c = client(1);
        assert!(!i.record_failure(&spec, 0, c));
        i.record_success();
        assert!(!i.record_failure(&spec, 0, c));
        assert!(!i.record_failure(&spec, 0, c));
        assert!(i.record_failure(&spec, 0, c));
        assert!(!i.available(999));
        assert!(i.available(1_000));
        // Fails again after returning: twice as long.
        for _ in 0..3 {
            i.record_failure(&spec, 1_000, c);
        }
        assert!(!i.available(2_999));
        assert!(i.available(3_000));
        // Capped at max.
        for _ in 0..3 {
            i.record_failure(&spec, 3_000, c);
        }
        assert!(i.available(6_000));
    }

    #[test]
    fn one_client_cannot_eject_an_instance_but_an_unreachable_one_is_ejected() {
        let spec = Ejection {
            min_clients: 3,
            ..ejection()
        };
        let i = Instance::new("r", "v1", "127.0.0.1:1", 1).unwrap();
        for _ in 0..50 {
            assert!(!i.record_failure(&spec, 0, client(1)));
        }
        assert!(i.available(0));
        assert!(!i.record_failure(&spec, 0, client(2)));
        assert!(
            i.record_failure(&spec, 0, client(3)),
            "three clients saw it fail"
        );
        // The next run starts afresh: its clients are counted again.
        assert!(!i.record_failure(&spec, 1_000, client(1)));
        assert!(!i.record_failure(&spec, 1_000, client(1)));
        assert!(!i.record_failure(&spec, 1_000, client(1)));
        assert!(i.record_failure(&spec, 1_000, Witness::Unreachable));
    }

    #[test]
    fn health_thresholds() {
        let i = Instance::new("r", "v1", "127.0.0.1:1", 1).unwrap();
        let spec = HealthCheck {
            path: "/".into(),
            interval_ms: 1,
            timeout_ms: 1,
            unhealthy_threshold: 2,
            healthy_threshold: 1,
        };
        i.record_check(false, &spec);
        assert!(i.check_healthy());
        i.record_check(false, &spec);
        assert!(!i.check_healthy());
        i.record_check(true, &spec);
        assert!(i.check_healthy());
    }

    #[test]
    fn round_robin_skips_unavailable() {
        let a = Arc::new(Instance::new("r", "v1", "127.0.0.1:1", 1).unwrap());
        let b = Arc::new(Instance::new("r", "v1", "127.0.0.1:2", 1).unwrap());
        let spec = Ejection {
            consecutive_failures: 1,
            base_ms: 10_000,
            max_ms: 10_000,
            min_clients: 1,
        };
        a.record_failure(&spec, 0, client(1));
        let pool = Pool::new(
            ("r", "v1"),
            vec![a, b],
            None,
            Arc::new(VersionStats::new("r", "v1")),
            spec,
            None,
        );
        for _ in 0..4 {
            assert_eq!(pool.pick(1).unwrap().addr, "127.0.0.1:2");
        }
        pool.instances[1].record_failure(&spec, 1, client(1));
        assert!(pool.pick(2).is_none());
        assert!(!pool.any_available(2));
    }
}
