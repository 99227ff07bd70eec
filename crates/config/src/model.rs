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
    /// The built-in dashboard and the admin listener's browser rules (`dashboard`).
    pub dashboard: Dashboard,
    /// Routes in file order; the first match wins.
    pub routes: Vec<RouteConfig>,
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
    /// Longest wait for the next bytes of a request body a client is sending
    /// (`body_timeout`, default 60 s, nginx's `client_body_timeout`).
    pub body_timeout_ms: u64,
    /// Longest wait for a client to take more of a response (`send_timeout`, default
    /// 60 s, nginx's `send_timeout`).
    pub send_timeout_ms: u64,
    /// An HTTP/2 client connection with no open stream for this long is closed with
    /// GOAWAY (`http2_idle_timeout`, default 60 s).
    pub http2_idle_timeout_ms: u64,
    /// What happens to a request field whose name holds `_`
    /// (`headers_with_underscores`, default `drop`).
    pub headers_with_underscores: Underscores,
}

/// What the proxy does with a request field whose name holds an underscore
/// (`X_Forwarded_For`): CGI/WSGI-style backends fold `_` and `-` into one, so such a
/// field could stand in for one the proxy sets or checks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Underscores {
    /// Leave the field out of the upstream request (nginx's default).
    #[default]
    Drop,
    /// Answer `400` (Envoy's edge setting).
    Reject,
    /// Pass it on (for backends that need such names and do not fold them).
    Allow,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_header_bytes: 16 * 1024,
            header_timeout_ms: 10_000,
            max_connections: 10_000,
            body_timeout_ms: 60_000,
            send_timeout_ms: 60_000,
            http2_idle_timeout_ms: 60_000,
            headers_with_underscores: Underscores::Drop,
        }
    }
}

/// The dashboard on the admin listener, and which `Host` names that listener answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dashboard {
    /// Serve the dashboard at `/ui/` (`enabled`, default true). The API is unchanged.
    pub enabled: bool,
    /// Show no mutation control in the page (`read_only`, default false). The API still
    /// takes commands (with the token, when one is set).
    pub read_only: bool,
    /// Host names the admin listener answers besides `localhost`, `*.localhost` and IP
    /// addresses (`allowed_hosts`): lower case, without port or trailing dot.
    pub allowed_hosts: Vec<String>,
    /// How far back the charts' history reaches (`history`, default 1 h, 1 m to 24 h).
    pub history_ms: u64,
}

impl Default for Dashboard {
    fn default() -> Self {
        Dashboard {
            enabled: true,
            read_only: false,
            allowed_hosts: Vec::new(),
            history_ms: 3_600_000,
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
    /// Longest wait for the next bytes of a response body the upstream is sending
    /// (`idle`, default 60 s, nginx's `proxy_read_timeout`): the response is cut.
    pub idle_ms: u64,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect_ms: 1_000,
            request_ms: 30_000,
            idle_ms: 60_000,
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
    /// Distinct clients the failures must come from (`min_clients`, default 3, at
    /// most `consecutive_failures`); failures to connect count regardless.
    pub min_clients: u32,
}

impl Default for Ejection {
    fn default() -> Self {
        Ejection {
            consecutive_failures: 5,
            base_ms: 10_000,
            max_ms: 300_000,
            min_clients: 3,
        }
    }
}
