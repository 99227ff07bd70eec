//! The validated configuration: what the rest of `canary` consumes.
//!
//! Only this crate can build these values (through [`crate::parse`] / [`crate::load`]),
//! so everything downstream may assume they are valid: names unique, weights in range,
//! steps non-empty and non-decreasing, upstream lists non-empty.

use std::net::SocketAddr;
use std::path::PathBuf;

use canary_core::rollout::RolloutSpec;
use canary_core::{Route, Weight};

/// A whole, validated config file.
#[derive(Clone, Debug)]
pub struct Config {
    /// Where the proxy listens (`listen`).
    pub listen: SocketAddr,
    /// Where the admin API and `/metrics` listen (`admin`, default `127.0.0.1:9901`).
    pub admin: SocketAddr,
    /// Where rollout state and the journal are persisted (`state_dir`, default `./canary-state`).
    pub state_dir: PathBuf,
    /// Name of the environment variable holding the admin token (`admin_token_env`).
    pub admin_token_env: Option<String>,
    /// Data-plane worker threads (`workers`), each with its own runtime and
    /// `SO_REUSEPORT` listener; `None` = one per core.
    pub workers: Option<usize>,
    /// Client-side limits (`limits`).
    pub limits: Limits,
    /// Routes in file order; the first match wins. Empty in a local file with `fleet`:
    /// the routes then come from the fleet document in etcd ([`crate::parse_document`]).
    pub routes: Vec<RouteConfig>,
    /// Fleet mode (`fleet`): routes and rollout state live in etcd.
    pub fleet: Option<FleetConfig>,
}

/// The `fleet` block: where the fleet's etcd is and who this member is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FleetConfig {
    /// etcd client endpoints, `host:port` (`etcd`), non-empty.
    pub etcd: Vec<String>,
    /// The key prefix of this fleet (`prefix`), e.g. `/canary/prod`: starts with `/`,
    /// no trailing `/`.
    pub prefix: String,
    /// This member's name (`member`), unique in the fleet; default: the host name.
    pub member: String,
    /// Lease TTL of the leader and member keys (`lease_ttl`, whole seconds, at least
    /// 2 s: etcd's minimum; default 3 s).
    pub lease_ttl_ms: u64,
    /// Where the other members reach this member's admin API (`advertise`; default:
    /// the `admin` address).
    pub advertise: SocketAddr,
}

/// Limits on what clients may send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest request header block accepted (`max_header_bytes`, default 16 KiB) → 431 above.
    pub max_header_bytes: usize,
    /// Time a client has to send its request headers (`header_timeout`, default 10 s).
    pub header_timeout_ms: u64,
    /// Most concurrent client connections (`max_connections`, default 10 000).
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_header_bytes: 16 * 1024,
            header_timeout_ms: 10_000,
            max_connections: 10_000,
        }
    }
}

/// One route.
#[derive(Clone, Debug)]
pub struct RouteConfig {
    /// Matching, rules and sticky settings, as the core decides with them.
    pub route: Route,
    pub stable: PoolConfig,
    /// `None`: the route has no canary (then `route.has_canary` is false).
    pub canary: Option<PoolConfig>,
    /// The configured canary weight (`weight`, percent). Used when the route has no
    /// `rollout`; with a rollout, the rollout sets the weight.
    pub weight: Weight,
    /// The automatic rollout plan (`rollout`), if any.
    pub rollout: Option<RolloutSpec>,
    pub timeouts: Timeouts,
    pub ejection: Ejection,
}

/// One version's pool of instances.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolConfig {
    /// The version label (`version`), e.g. `v1`; sent in `x-canary-version`.
    pub version: String,
    /// `host:port` of each instance (`upstreams`), non-empty, no duplicates.
    pub upstreams: Vec<String>,
    /// Speak HTTP/2 cleartext to these instances (`http2: true`), e.g. for gRPC.
    pub http2: bool,
    /// Optional active health check (`health_check`).
    pub health_check: Option<HealthCheck>,
}

/// Active HTTP health check of each instance of a pool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    /// Path requested with GET (`path`, default `/healthz`); 2xx is healthy.
    pub path: String,
    /// `interval`, default 5 s.
    pub interval_ms: u64,
    /// `timeout`, default 2 s.
    pub timeout_ms: u64,
    /// Consecutive failures that mark an instance unhealthy (`unhealthy_threshold`, default 2).
    pub unhealthy_threshold: u32,
    /// Consecutive successes that mark it healthy again (`healthy_threshold`, default 1).
    pub healthy_threshold: u32,
}

/// Upstream timeouts (`timeouts`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// TCP connect (`connect`, default 1 s) → 502 when exceeded.
    pub connect_ms: u64,
    /// From sending the request to the response headers (`request`, default 30 s) → 504.
    pub request_ms: u64,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect_ms: 1_000,
            request_ms: 30_000,
        }
    }
}

/// Passive ejection of failing instances (`ejection`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ejection {
    /// Consecutive failures (connect error, timeout, 5xx) that eject an instance
    /// (`consecutive_failures`, default 5; 0 disables ejection).
    pub consecutive_failures: u32,
    /// First ejection period (`base`, default 10 s); doubles on each repeated ejection.
    pub base_ms: u64,
    /// Longest ejection period (`max`, default 5 min).
    pub max_ms: u64,
}

impl Default for Ejection {
    fn default() -> Self {
        Ejection {
            consecutive_failures: 5,
            base_ms: 10_000,
            max_ms: 300_000,
        }
    }
}
