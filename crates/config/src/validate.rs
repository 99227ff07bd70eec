//! Stage 2: raw structs → validated [`Config`], collecting every problem.
//!
//! Each check records a [`Diagnostic`] at the location of the offending value and
//! carries on with a placeholder, so one run reports everything that is wrong. The
//! placeholders never escape: any diagnostic turns the whole result into an error.
//! Messages say what is wrong and what is allowed, prefixed with the key's path
//! (`routes[0].stable.upstreams[1]`).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use canary_core::analysis::AnalysisSpec;
use canary_core::rollout::{BreakerSpec, Pause, RolloutSpec, Step, MAX_MIN_CLIENTS};
use canary_core::{Route, Rule, RuleMatch, Sticky, Target, Weight};
use ipnet::IpNet;
use serde_saphyr::Location;

use crate::syntax::{
    host_pattern, is_dns_name, is_env_name, is_route_name, is_token, is_version, network, upstream,
};

use crate::error::{ConfigError, Diagnostic};
use crate::model::{
    Config, Dashboard, Ejection, FleetConfig, HealthCheck, Limits, PoolConfig, RouteConfig,
    Timeouts, Underscores,
};
mod tls;

use crate::raw::{
    List, RawAnalysis, RawConfig, RawDashboard, RawEjection, RawFleet, RawHealthCheck, RawLimits,
    RawPool, RawRollout, RawRoute, RawRule, RawStep, RawSticky, RawTimeouts, StringList,
    UnknownKey, UnknownKeys, S,
};

/// Default admin address (`admin`).
pub(crate) const DEFAULT_ADMIN: SocketAddr =
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1)), 9901);
/// Default state directory (`state_dir`).
pub(crate) const DEFAULT_STATE_DIR: &str = "./canary-state";
/// Default rollout breaker (`rollout.breaker.consecutive_failures`).
pub(crate) const DEFAULT_BREAKER_FAILURES: u32 = 5;
/// Default distinct clients a failure run needs (`breaker.min_clients`,
/// `ejection.min_clients`): more than one, so no single client trips the breaker or
/// ejects an instance on purpose; few enough that a real outage on a quiet service
/// still trips it within a handful of requests.
pub(crate) const DEFAULT_MIN_CLIENTS: u32 = 3;
/// Default analysis interval and window.
pub(crate) const DEFAULT_ANALYSIS_INTERVAL_MS: u64 = 10_000;
pub(crate) const DEFAULT_ANALYSIS_WINDOW_MS: u64 = 60_000;
/// Smallest accepted `limits.max_header_bytes`.
pub(crate) const MIN_HEADER_BYTES: i64 = 1024;
/// Largest accepted `limits.max_header_bytes` (1 GiB): the proxy keeps where a head's
/// fields are as 32-bit offsets, and no head needs more.
pub(crate) const MAX_HEADER_BYTES: i64 = 1 << 30;

/// Bounds of `dashboard.history`.
pub(crate) const MIN_HISTORY_MS: u64 = 60_000;
pub(crate) const MAX_HISTORY_MS: u64 = 24 * 3_600_000;

/// Default `fleet.lease_ttl`.
pub(crate) const DEFAULT_LEASE_TTL_MS: u64 = 3_000;

/// The keys of a local file that a fleet document must not carry: each member's own.
const PROCESS_KEYS: &[&str] = &[
    "listen",
    "admin",
    "state_dir",
    "admin_token_env",
    "workers",
    "limits",
    "fleet",
    "dashboard",
    "tls",
    "http_redirect",
    "admin_tls",
];

const DURATION_HINT: &str = "use e.g. 500ms, 30s, 1m or 1h 30m";

/// Validates a parsed file. `root` is the whole document (its location is where
/// missing top-level keys are reported).
pub(crate) fn validate(file: &str, root: S<RawConfig>) -> Result<Config, ConfigError> {
    let mut c = Checker::new(file);
    let raw = &root.value;
    let empty = raw.listen.is_none()
        && raw.admin.is_none()
        && raw.state_dir.is_none()
        && raw.admin_token_env.is_none()
        && raw.workers.is_none()
        && raw.limits.is_none()
        && raw.dashboard.is_none()
        && raw.routes.is_none()
        && raw.tls.is_none()
        && raw.http_redirect.is_none()
        && raw.admin_tls.is_none()
        && raw.fleet.is_none()
        && raw.unknown.is_empty();
    if empty {
        return Err(ConfigError::single(
            file,
            1,
            1,
            "the config is empty; it needs at least `listen` and `routes`",
        ));
    }
    let mut unknown = Vec::new();
    raw.unknown_keys("", &mut unknown);
    for key in unknown {
        c.unknown_key(key);
    }
    let config = c.config(root);
    if c.diagnostics.is_empty() {
        Ok(config)
    } else {
        // File order; `sort_by_key` is stable, so problems at one spot keep their order.
        c.diagnostics.sort_by_key(|d| (d.line, d.column));
        Err(ConfigError {
            diagnostics: c.diagnostics,
        })
    }
}

/// Validates a fleet document: `routes` only, every route checked as in a file.
pub(crate) fn validate_document(
    file: &str,
    root: S<RawConfig>,
) -> Result<Vec<RouteConfig>, ConfigError> {
    let mut c = Checker::new(file);
    let at = root.referenced;
    let raw = root.value;
    let mut unknown = Vec::new();
    raw.unknown_keys("", &mut unknown);
    for key in unknown {
        c.unknown_key(key);
    }
    let present: [(&str, Option<Location>); 11] = [
        ("listen", raw.listen.as_ref().map(|v| v.referenced)),
        ("admin", raw.admin.as_ref().map(|v| v.referenced)),
        ("state_dir", raw.state_dir.as_ref().map(|v| v.referenced)),
        (
            "admin_token_env",
            raw.admin_token_env.as_ref().map(|v| v.referenced),
        ),
        ("workers", raw.workers.as_ref().map(|v| v.referenced)),
        ("limits", raw.limits.as_ref().map(|v| v.referenced)),
        ("fleet", raw.fleet.as_ref().map(|v| v.referenced)),
        ("dashboard", raw.dashboard.as_ref().map(|v| v.referenced)),
        ("tls", raw.tls.as_ref().map(|v| v.referenced)),
        (
            "http_redirect",
            raw.http_redirect.as_ref().map(|v| v.referenced),
        ),
        ("admin_tls", raw.admin_tls.as_ref().map(|v| v.referenced)),
    ];
    debug_assert_eq!(present.len(), PROCESS_KEYS.len());
    for (key, loc) in present {
        if let Some(loc) = loc {
            c.err(
                loc,
                format!(
                    "{key}: a process setting does not belong in the fleet document; it \
                     stays in each member's own config file (the document holds `routes` only)"
                ),
            );
        }
    }
    let routes = match raw.routes {
        None => {
            c.err(
                at,
                "missing required key `routes` (a fleet document is a non-empty `routes` list)"
                    .into(),
            );
            Vec::new()
        }
        Some(list) if list.value.is_empty() => {
            c.err(
                list.referenced,
                "routes: the list is empty; at least one route is required".into(),
            );
            Vec::new()
        }
        Some(list) => c.routes(list),
    };
    if c.diagnostics.is_empty() {
        Ok(routes)
    } else {
        c.diagnostics.sort_by_key(|d| (d.line, d.column));
        Err(ConfigError {
            diagnostics: c.diagnostics,
        })
    }
}

/// This machine's host name, the default member name; `canary` when it has none that
/// is a valid member name.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| is_route_name(h))
        .unwrap_or_else(|| "canary".to_string())
}

struct Checker {
    file: String,
    /// The config file's directory: relative file paths in it start here.
    base: PathBuf,
    /// When certificates are checked for expiry.
    now: SystemTime,
    diagnostics: Vec<Diagnostic>,
}

impl Checker {
    /// A checker for `file`: relative paths in it start at its directory, and
    /// certificates are judged against the time now.
    fn new(file: &str) -> Checker {
        Checker {
            file: file.to_string(),
            base: Path::new(file)
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_default(),
            now: SystemTime::now(),
            diagnostics: Vec::new(),
        }
    }

    fn err(&mut self, at: Location, message: String) {
        self.diagnostics.push(Diagnostic {
            file: self.file.clone(),
            line: at.line(),
            column: at.column(),
            message,
        });
    }

    /// A key that is not part of the format: likely a typo, so name the closest key.
    fn unknown_key(&mut self, k: UnknownKey) {
        let mut message = format!(
            "{}: unknown field `{}`, expected one of {}",
            k.path,
            k.key,
            k.expected.join(", ")
        );
        if let Some(near) = closest(&k.key, k.expected) {
            message.push_str(&format!(" (did you mean `{near}`?)"));
        }
        self.err(k.at, message);
    }

    fn config(&mut self, root: S<RawConfig>) -> Config {
        let at = root.referenced;
        let raw = root.value;

        let listen = match &raw.listen {
            Some(v) => self.socket_addr("listen", v),
            None => {
                self.err(
                    at,
                    "missing required key `listen` (the address the proxy listens on, \
                     e.g. 127.0.0.1:8080)"
                        .into(),
                );
                None
            }
        };
        let admin = match &raw.admin {
            Some(v) => self.socket_addr("admin", v),
            None => Some(DEFAULT_ADMIN),
        };
        if let (Some(l), Some(a)) = (listen, admin) {
            // Port 0 (tests) asks the OS for a free port each time, so it never clashes.
            let where_ = raw.admin.as_ref().or(raw.listen.as_ref());
            if let (true, Some(v)) = (l == a && l.port() != 0, where_) {
                self.err(
                    v.referenced,
                    format!(
                        "admin: {a} is also the `listen` address; the admin API needs its \
                         own address (default 127.0.0.1:9901)"
                    ),
                );
            }
        }

        let state_dir = match &raw.state_dir {
            Some(v) if v.value.trim().is_empty() => {
                self.err(
                    v.referenced,
                    "state_dir: must not be empty (a directory path, default ./canary-state)"
                        .into(),
                );
                PathBuf::new()
            }
            Some(v) => PathBuf::from(&v.value),
            None => PathBuf::from(DEFAULT_STATE_DIR),
        };

        let admin_token_env = raw.admin_token_env.as_ref().map(|v| {
            if !is_env_name(&v.value) {
                self.err(
                    v.referenced,
                    format!(
                        "admin_token_env: {:?} is not an environment variable name \
                         (letters, digits and '_', not starting with a digit); \
                         give the variable's name, not the token",
                        v.value
                    ),
                );
            }
            v.value.clone()
        });

        let workers = raw.workers.as_ref().map(|v| {
            self.int("workers", v, 1, 4096, "a whole number from 1 to 4096")
                .unwrap_or(1) as usize
        });

        let limits = match raw.limits {
            Some(l) => self.limits(l.value),
            None => Limits::default(),
        };

        let dashboard = match raw.dashboard {
            Some(d) => self.dashboard(d.value),
            None => Dashboard::default(),
        };

        let fleet = raw
            .fleet
            .map(|f| self.fleet(f, admin.unwrap_or(DEFAULT_ADMIN)));
        let routes = match raw.routes {
            Some(list) if fleet.is_some() => {
                self.err(
                    list.referenced,
                    "routes: with `fleet` the routes come from etcd (<prefix>/config), not \
                     from this file; remove `routes` here and push them with \
                     `canary fleet push FILE --etcd HOST:PORT --prefix P`"
                        .into(),
                );
                Vec::new()
            }
            None if fleet.is_some() => Vec::new(),
            None => {
                self.err(
                    at,
                    "missing required key `routes` (a non-empty list of routes)".into(),
                );
                Vec::new()
            }
            Some(list) if list.value.is_empty() => {
                self.err(
                    list.referenced,
                    "routes: the list is empty; at least one route is required".into(),
                );
                Vec::new()
            }
            Some(list) => self.routes(list),
        };

        let tls = raw.tls.map(|t| self.tls("tls", t));
        let admin_tls = raw.admin_tls.map(|t| self.tls("admin_tls", t));
        let http_redirect = raw.http_redirect.as_ref().and_then(|v| {
            if tls.is_none() {
                self.err(
                    v.referenced,
                    "http_redirect: needs `tls` (it sends plain-HTTP clients to the HTTPS \
                     listener); add `tls` or remove `http_redirect`"
                        .into(),
                );
            }
            let addr = self.socket_addr("http_redirect", v)?;
            let clash = [("listen", listen), ("admin", admin)]
                .into_iter()
                .find(|(_, a)| *a == Some(addr) && addr.port() != 0);
            if let Some((key, _)) = clash {
                self.err(
                    v.referenced,
                    format!("http_redirect: {addr} is also the `{key}` address; it needs its own"),
                );
            }
            Some(addr)
        });

        Config {
            listen: listen.unwrap_or(DEFAULT_ADMIN),
            admin: admin.unwrap_or(DEFAULT_ADMIN),
            state_dir,
            admin_token_env,
            workers,
            limits,
            dashboard,
            routes,
            tls,
            http_redirect,
            admin_tls,
            fleet,
        }
    }

    fn fleet(&mut self, raw: S<RawFleet>, admin: SocketAddr) -> FleetConfig {
        let at = raw.referenced;
        let r = raw.value;
        let mut etcd = Vec::new();
        match &r.etcd {
            None => self.err(
                at,
                "fleet: missing required key `etcd` (a list of etcd endpoints, \
                 e.g. [\"127.0.0.1:2379\"])"
                    .into(),
            ),
            Some(list) if list.value.is_empty() => self.err(
                list.referenced,
                "fleet.etcd: the list is empty; give at least one \"host:port\"".into(),
            ),
            Some(list) => {
                for (j, e) in list.value.iter().enumerate() {
                    match upstream(&e.value) {
                        Ok(()) => etcd.push(e.value.clone()),
                        Err(why) => self.err(
                            e.referenced,
                            format!("fleet.etcd[{j}]: {:?} {why}", e.value),
                        ),
                    }
                }
            }
        }
        let prefix = match &r.prefix {
            Some(p) => {
                let v = &p.value;
                let ok = v.len() > 1
                    && v.starts_with('/')
                    && !v.ends_with('/')
                    && !v.contains("//")
                    && v.bytes().all(|b| b.is_ascii_graphic());
                if !ok {
                    self.err(
                        p.referenced,
                        format!(
                            "fleet.prefix: {v:?} is not a key prefix (starts with '/', no \
                             trailing '/', no spaces, e.g. /canary/prod)"
                        ),
                    );
                }
                v.clone()
            }
            None => {
                self.err(
                    at,
                    "fleet: missing required key `prefix` (the fleet's etcd key prefix, \
                     e.g. /canary/prod)"
                        .into(),
                );
                String::new()
            }
        };
        let member = match &r.member {
            Some(m) => {
                if !is_route_name(&m.value) {
                    self.err(
                        m.referenced,
                        format!(
                            "fleet.member: {:?} is not a member name (letters, digits, '_', \
                             '.' and '-'; unique in the fleet)",
                            m.value
                        ),
                    );
                }
                m.value.clone()
            }
            None => host_name(),
        };
        let lease_ttl_ms = match &r.lease_ttl {
            Some(v) => {
                let ms = self.duration("fleet.lease_ttl", v, false);
                if ms != 0 && (ms < 2_000 || !ms.is_multiple_of(1_000)) {
                    self.err(
                        v.referenced,
                        format!(
                            "fleet.lease_ttl: {:?} must be whole seconds, at least 2s \
                             (etcd's smallest lease)",
                            v.value
                        ),
                    );
                }
                ms
            }
            None => DEFAULT_LEASE_TTL_MS,
        };
        let advertise = match &r.advertise {
            Some(v) => self.socket_addr("fleet.advertise", v).unwrap_or(admin),
            None => admin,
        };
        FleetConfig {
            etcd,
            prefix,
            member,
            lease_ttl_ms,
            advertise,
        }
    }

    fn dashboard(&mut self, raw: RawDashboard) -> Dashboard {
        let d = Dashboard::default();
        let mut allowed_hosts = Vec::new();
        for (i, h) in raw
            .allowed_hosts
            .iter()
            .flat_map(|l| l.value.iter())
            .enumerate()
        {
            match allowed_host(&h.value) {
                Ok(name) => allowed_hosts.push(name),
                Err(why) => self.err(
                    h.referenced,
                    format!("dashboard.allowed_hosts[{i}]: {:?} {why}", h.value),
                ),
            }
        }
        let history_ms = match &raw.history {
            Some(v) => {
                let ms = self.duration("dashboard.history", v, false);
                if ms != 0 && !(MIN_HISTORY_MS..=MAX_HISTORY_MS).contains(&ms) {
                    self.err(
                        v.referenced,
                        format!(
                            "dashboard.history: {:?} is out of range (from 1m to 24h; \
                             memory grows with it, about 80 KB per canary route per hour)",
                            v.value
                        ),
                    );
                }
                ms.clamp(MIN_HISTORY_MS, MAX_HISTORY_MS)
            }
            None => d.history_ms,
        };
        Dashboard {
            enabled: raw.enabled.unwrap_or(d.enabled),
            read_only: raw.read_only.unwrap_or(d.read_only),
            allowed_hosts,
            history_ms,
        }
    }

    fn limits(&mut self, raw: RawLimits) -> Limits {
        let d = Limits::default();
        Limits {
            max_header_bytes: match &raw.max_header_bytes {
                Some(v) => self
                    .int(
                        "limits.max_header_bytes",
                        v,
                        MIN_HEADER_BYTES,
                        MAX_HEADER_BYTES,
                        "a number of bytes, from 1024 to 1073741824 (1 GiB)",
                    )
                    .map_or(d.max_header_bytes, |n| n as usize),
                None => d.max_header_bytes,
            },
            header_timeout_ms: self.duration_or(
                "limits.header_timeout",
                raw.header_timeout.as_ref(),
                d.header_timeout_ms,
                false,
            ),
            body_timeout_ms: self.duration_or(
                "limits.body_timeout",
                raw.body_timeout.as_ref(),
                d.body_timeout_ms,
                false,
            ),
            send_timeout_ms: self.duration_or(
                "limits.send_timeout",
                raw.send_timeout.as_ref(),
                d.send_timeout_ms,
                false,
            ),
            http2_idle_timeout_ms: self.duration_or(
                "limits.http2_idle_timeout",
                raw.http2_idle_timeout.as_ref(),
                d.http2_idle_timeout_ms,
                false,
            ),
            max_connections: match &raw.max_connections {
                Some(v) => self
                    .int(
                        "limits.max_connections",
                        v,
                        1,
                        i64::from(u32::MAX),
                        "a whole number, at least 1",
                    )
                    .map_or(d.max_connections, |n| n as usize),
                None => d.max_connections,
            },
            headers_with_underscores: match &raw.headers_with_underscores {
                Some(v) => match v.value.as_str() {
                    "drop" => Underscores::Drop,
                    "reject" => Underscores::Reject,
                    "allow" => Underscores::Allow,
                    other => {
                        self.err(
                            v.referenced,
                            format!(
                                "limits.headers_with_underscores: {other:?} is not one of \
                                 drop, reject, allow"
                            ),
                        );
                        d.headers_with_underscores
                    }
                },
                None => d.headers_with_underscores,
            },
        }
    }

    fn routes(&mut self, list: List<RawRoute>) -> Vec<RouteConfig> {
        // Route name → line of its first definition.
        let mut seen: HashMap<String, u64> = HashMap::new();
        let mut routes = Vec::with_capacity(list.value.len());
        for (i, raw) in list.value.into_iter().enumerate() {
            if let Some(name) = &raw.value.name {
                match seen.get(&name.value) {
                    Some(first) => self.err(
                        name.referenced,
                        format!(
                            "routes[{i}].name: duplicate route name {:?} (first defined at \
                             line {first}); route names must be unique",
                            name.value
                        ),
                    ),
                    None => {
                        seen.insert(name.value.clone(), name.referenced.line());
                    }
                }
            }
            routes.push(self.route(i, raw));
        }
        routes
    }

    fn route(&mut self, i: usize, raw: S<RawRoute>) -> RouteConfig {
        let p = format!("routes[{i}]");
        let at = raw.referenced;
        let r = raw.value;

        let name = match &r.name {
            Some(n) => {
                if !is_route_name(&n.value) {
                    self.err(
                        n.referenced,
                        format!(
                            "{p}.name: {:?} is not a valid route name (letters, digits, \
                             '_', '.' and '-' only; it appears in URLs and metric labels)",
                            n.value
                        ),
                    );
                }
                n.value.clone()
            }
            None => {
                self.err(
                    at,
                    format!("{p}: missing required key `name` (letters, digits, '_', '.' and '-')"),
                );
                String::new()
            }
        };
        let mut route = Route::new(name);

        if let Some(hosts) = &r.hosts {
            for (j, h) in hosts.value.iter().enumerate() {
                match host_pattern(&h.value) {
                    Ok(m) => route.hosts.push(m),
                    Err(why) => {
                        self.err(h.referenced, format!("{p}.hosts[{j}]: {:?} {why}", h.value))
                    }
                }
            }
        }

        if let Some(prefix) = &r.path_prefix {
            if !prefix.value.starts_with('/') || prefix.value.chars().any(char::is_whitespace) {
                self.err(
                    prefix.referenced,
                    format!(
                        "{p}.path_prefix: {:?} must start with '/' and contain no spaces \
                         (e.g. / or /api)",
                        prefix.value
                    ),
                );
            } else {
                route.path_prefix = prefix.value.clone();
            }
        }

        // Versions are compared before the pools are consumed.
        if let (Some(s), Some(c)) = (&r.stable, &r.canary) {
            if let (Some(sv), Some(cv)) = (&s.value.version, &c.value.version) {
                if sv.value == cv.value {
                    self.err(
                        cv.referenced,
                        format!(
                            "{p}.canary.version: {:?} is also the stable version; the \
                             canary must be a different version",
                            cv.value
                        ),
                    );
                }
            }
        }
        let stable = match r.stable {
            Some(s) => self.pool(&format!("{p}.stable"), s),
            None => {
                self.err(
                    at,
                    format!(
                        "{p}: missing required key `stable` (the pool serving the current \
                         version: version and upstreams)"
                    ),
                );
                placeholder_pool()
            }
        };
        let canary = r.canary.map(|c| self.pool(&format!("{p}.canary"), c));
        route.has_canary = canary.is_some();

        let weight = match &r.weight {
            Some(w) => self.weight(&format!("{p}.weight"), w),
            None => Weight::ZERO,
        };

        if let Some(sticky) = r.sticky {
            route.sticky = self.sticky(&p, sticky.value);
        }

        if let Some(rules) = r.rules {
            for (j, rule) in rules.value.into_iter().enumerate() {
                if let Some(rule) = self.rule(&format!("{p}.rules[{j}]"), rule) {
                    route.rules.push(rule);
                }
            }
        }

        let timeouts = match r.timeouts {
            Some(t) => self.timeouts(&p, t.value),
            None => Timeouts::default(),
        };
        let ejection = match r.ejection {
            Some(e) => self.ejection(&p, e.value),
            None => Ejection::default(),
        };

        let rollout = r.rollout.map(|ro| {
            if canary.is_none() {
                self.err(
                    ro.referenced,
                    format!(
                        "{p}.rollout: a rollout needs a canary; add a `canary` pool to this \
                         route or remove `rollout`"
                    ),
                );
            }
            self.rollout(&format!("{p}.rollout"), ro)
        });

        RouteConfig {
            route,
            stable,
            canary,
            weight,
            rollout,
            timeouts,
            ejection,
        }
    }

    fn pool(&mut self, p: &str, raw: S<RawPool>) -> PoolConfig {
        let at = raw.referenced;
        let r = raw.value;
        let version = match &r.version {
            Some(v) => {
                if !is_version(&v.value) {
                    self.err(
                        v.referenced,
                        format!(
                            "{p}.version: {:?} is not a valid version label (letters, digits, \
                             '_', '.', '+' and '-', not empty)",
                            v.value
                        ),
                    );
                }
                v.value.clone()
            }
            None => {
                self.err(
                    at,
                    format!("{p}: missing required key `version` (a label such as v1)"),
                );
                String::new()
            }
        };

        let mut upstreams: Vec<String> = Vec::new();
        match &r.upstreams {
            None => self.err(
                at,
                format!(
                    "{p}: missing required key `upstreams` (a non-empty list of \"host:port\")"
                ),
            ),
            Some(list) if list.value.is_empty() => self.err(
                list.referenced,
                format!("{p}.upstreams: the list is empty; give at least one \"host:port\""),
            ),
            Some(list) => {
                for (j, u) in list.value.iter().enumerate() {
                    if let Err(why) = upstream(&u.value) {
                        self.err(
                            u.referenced,
                            format!("{p}.upstreams[{j}]: {:?} {why}", u.value),
                        );
                    } else if let Some(k) = upstreams
                        .iter()
                        .position(|seen| seen.eq_ignore_ascii_case(&u.value))
                    {
                        self.err(
                            u.referenced,
                            format!(
                                "{p}.upstreams[{j}]: {:?} is listed twice (also \
                                 upstreams[{k}]); each instance once",
                                u.value
                            ),
                        );
                    }
                    // Keep indices aligned with the file for the duplicate message.
                    upstreams.push(u.value.clone());
                }
            }
        }

        let health_check = r
            .health_check
            .map(|h| self.health_check(&format!("{p}.health_check"), h.value));
        let tls = r.tls.map(|t| self.upstream_tls(&format!("{p}.tls"), t));

        PoolConfig {
            version,
            upstreams,
            http2: r.http2.unwrap_or(false),
            health_check,
            tls,
        }
    }

    fn health_check(&mut self, p: &str, r: RawHealthCheck) -> HealthCheck {
        let path = match &r.path {
            Some(v) if !v.value.starts_with('/') || v.value.chars().any(char::is_whitespace) => {
                self.err(
                    v.referenced,
                    format!(
                        "{p}.path: {:?} must start with '/' and contain no spaces \
                         (e.g. /healthz)",
                        v.value
                    ),
                );
                String::new()
            }
            Some(v) => v.value.clone(),
            None => "/healthz".to_string(),
        };
        let interval_ms =
            self.duration_or(&format!("{p}.interval"), r.interval.as_ref(), 5_000, false);
        let timeout_ms =
            self.duration_or(&format!("{p}.timeout"), r.timeout.as_ref(), 2_000, false);
        if timeout_ms >= interval_ms && interval_ms > 0 && timeout_ms > 0 {
            // Point at whichever of the two the user wrote (timeout preferred).
            if let Some(at) = r.timeout.as_ref().or(r.interval.as_ref()) {
                self.err(
                    at.referenced,
                    format!(
                        "{p}.timeout: {} must be shorter than the interval ({})",
                        ms(timeout_ms),
                        ms(interval_ms)
                    ),
                );
            }
        }
        let threshold = |c: &mut Checker, key: &str, v: Option<&S<i64>>, default: u32| match v {
            Some(v) => c
                .int(
                    &format!("{p}.{key}"),
                    v,
                    1,
                    i64::from(u32::MAX),
                    "a whole number, at least 1",
                )
                .map_or(default, |n| n as u32),
            None => default,
        };
        HealthCheck {
            path,
            interval_ms,
            timeout_ms,
            unhealthy_threshold: threshold(
                self,
                "unhealthy_threshold",
                r.unhealthy_threshold.as_ref(),
                2,
            ),
            healthy_threshold: threshold(
                self,
                "healthy_threshold",
                r.healthy_threshold.as_ref(),
                1,
            ),
        }
    }

    fn weight(&mut self, p: &str, v: &S<f64>) -> Weight {
        match Weight::from_percent(v.value) {
            Some(w) => w,
            None => {
                self.err(
                    v.referenced,
                    format!(
                        "{p}: {} is out of range (0–100, at most two decimals)",
                        crate::number_text(v.value)
                    ),
                );
                Weight::ZERO
            }
        }
    }

    fn sticky(&mut self, p: &str, r: RawSticky) -> Sticky {
        let mut sticky = Sticky::default();
        if let Some(h) = &r.header {
            if is_token(&h.value) {
                sticky.header = Some(h.value.to_ascii_lowercase());
            } else {
                self.err(
                    h.referenced,
                    format!(
                        "{p}.sticky.header: {:?} is not a valid HTTP header name \
                         (letters, digits and !#$%&'*+-.^_`|~)",
                        h.value
                    ),
                );
            }
        }
        if let Some(c) = &r.cookie {
            if is_token(&c.value) {
                sticky.cookie = c.value.clone();
            } else {
                self.err(
                    c.referenced,
                    format!(
                        "{p}.sticky.cookie: {:?} is not a valid cookie name \
                         (letters, digits and !#$%&'*+-.^_`|~)",
                        c.value
                    ),
                );
            }
        }
        sticky
    }

    /// A rule, or `None` when it is invalid (already reported).
    fn rule(&mut self, p: &str, raw: S<RawRule>) -> Option<Rule> {
        let at = raw.referenced;
        let r = raw.value;

        let to = match &r.to {
            Some(t) => match t.value.as_str() {
                "canary" => Some(Target::Canary),
                "stable" => Some(Target::Stable),
                other => {
                    self.err(
                        t.referenced,
                        format!("{p}.to: {other:?} is not a target (canary or stable)"),
                    );
                    None
                }
            },
            None => {
                self.err(
                    at,
                    format!("{p}: missing required key `to` (canary or stable)"),
                );
                None
            }
        };

        let given: Vec<&str> = [
            r.header.is_some().then_some("header"),
            r.cookie.is_some().then_some("cookie"),
            r.query.is_some().then_some("query"),
            r.source.is_some().then_some("source"),
        ]
        .into_iter()
        .flatten()
        .collect();
        if given.len() != 1 {
            let found = if given.is_empty() {
                "none".to_string()
            } else {
                given.join(" and ")
            };
            self.err(
                at,
                format!(
                    "{p}: a rule needs exactly one of header, cookie, query or source \
                     (found {found})"
                ),
            );
            return None;
        }

        let matcher = if let Some(h) = r.header {
            self.header_match(&format!("{p}.header"), h)
        } else if let Some(c) = r.cookie {
            let p = format!("{p}.cookie");
            let name = self.cookie_name(&p, c.referenced, c.value.name.as_ref());
            let value = match &c.value.value {
                Some(v) => Some(v.value.clone()),
                None => {
                    self.err(
                        c.referenced,
                        format!("{p}: missing required key `value` (the cookie's exact value)"),
                    );
                    None
                }
            };
            name.zip(value)
                .map(|(name, value)| RuleMatch::Cookie { name, value })
        } else if let Some(q) = r.query {
            let p = format!("{p}.query");
            let name = match &q.value.name {
                Some(n) if n.value.is_empty() || n.value.contains(['&', '=', '#', ' ']) => {
                    self.err(
                        n.referenced,
                        format!(
                            "{p}.name: {:?} is not a query parameter name (not empty, no \
                             '&', '=', '#' or spaces)",
                            n.value
                        ),
                    );
                    None
                }
                Some(n) => Some(n.value.clone()),
                None => {
                    self.err(
                        q.referenced,
                        format!("{p}: missing required key `name` (the query parameter)"),
                    );
                    None
                }
            };
            name.map(|name| RuleMatch::Query {
                name,
                value: q.value.value.map(|v| v.value),
            })
        } else if let Some(s) = r.source {
            self.source(&format!("{p}.source"), s)
                .map(RuleMatch::Source)
        } else {
            None
        };

        Some(Rule {
            matcher: matcher?,
            to: to?,
        })
    }

    fn header_match(&mut self, p: &str, h: S<crate::raw::RawHeaderMatch>) -> Option<RuleMatch> {
        let at = h.referenced;
        let h = h.value;
        let name = match &h.name {
            Some(n) if is_token(&n.value) => Some(n.value.to_ascii_lowercase()),
            Some(n) => {
                self.err(
                    n.referenced,
                    format!(
                        "{p}.name: {:?} is not a valid HTTP header name \
                         (letters, digits and !#$%&'*+-.^_`|~)",
                        n.value
                    ),
                );
                None
            }
            None => {
                self.err(
                    at,
                    format!("{p}: missing required key `name` (the header name)"),
                );
                None
            }
        };
        let count = usize::from(h.value.is_some())
            + usize::from(h.regex.is_some())
            + usize::from(h.present.is_some());
        if count != 1 {
            self.err(
                at,
                format!(
                    "{p}: give exactly one of `value` (exact match), `regex` or \
                     `present: true`"
                ),
            );
            return None;
        }
        let name = name?;
        if let Some(v) = h.value {
            Some(RuleMatch::HeaderEquals {
                name,
                value: v.value,
            })
        } else if let Some(re) = h.regex {
            match regex::bytes::Regex::new(&re.value) {
                Ok(regex) => Some(RuleMatch::HeaderRegex { name, regex }),
                Err(e) => {
                    self.err(
                        re.referenced,
                        format!(
                            "{p}.regex: {:?} is not a valid regular expression: {}",
                            re.value,
                            regex_error(&e)
                        ),
                    );
                    None
                }
            }
        } else if let Some(present) = h.present {
            if present.value {
                Some(RuleMatch::HeaderPresent { name })
            } else {
                self.err(
                    present.referenced,
                    format!(
                        "{p}.present: only `present: true` is allowed (to route requests \
                         without the header, add a rule for the other target)"
                    ),
                );
                None
            }
        } else {
            None
        }
    }

    fn cookie_name(&mut self, p: &str, at: Location, n: Option<&S<String>>) -> Option<String> {
        match n {
            Some(n) if is_token(&n.value) => Some(n.value.clone()),
            Some(n) => {
                self.err(
                    n.referenced,
                    format!(
                        "{p}.name: {:?} is not a valid cookie name \
                         (letters, digits and !#$%&'*+-.^_`|~)",
                        n.value
                    ),
                );
                None
            }
            None => {
                self.err(
                    at,
                    format!("{p}: missing required key `name` (the cookie name)"),
                );
                None
            }
        }
    }

    fn source(&mut self, p: &str, s: S<StringList>) -> Option<Vec<IpNet>> {
        let items: Vec<(String, Location, String)> = match s.value {
            StringList::One(v) => vec![(v, s.referenced, p.to_string())],
            StringList::Many(list) => list
                .into_iter()
                .enumerate()
                .map(|(j, v)| (v.value, v.referenced, format!("{p}[{j}]")))
                .collect(),
        };
        if items.is_empty() {
            self.err(
                s.referenced,
                format!("{p}: the list is empty; give at least one network (e.g. 10.0.0.0/8)"),
            );
            return None;
        }
        let mut nets = Vec::with_capacity(items.len());
        let mut ok = true;
        for (text, at, path) in items {
            match network(&text) {
                Some(net) => nets.push(net),
                None => {
                    ok = false;
                    self.err(
                        at,
                        format!(
                            "{path}: {text:?} is not an IP network (a CIDR like 10.0.0.0/8 \
                             or fd00::/8, or a single address like 192.168.1.7)"
                        ),
                    );
                }
            }
        }
        ok.then_some(nets)
    }

    fn timeouts(&mut self, p: &str, r: RawTimeouts) -> Timeouts {
        let d = Timeouts::default();
        Timeouts {
            connect_ms: self.duration_or(
                &format!("{p}.timeouts.connect"),
                r.connect.as_ref(),
                d.connect_ms,
                false,
            ),
            request_ms: self.duration_or(
                &format!("{p}.timeouts.request"),
                r.request.as_ref(),
                d.request_ms,
                false,
            ),
            idle_ms: self.duration_or(
                &format!("{p}.timeouts.idle"),
                r.idle.as_ref(),
                d.idle_ms,
                false,
            ),
        }
    }

    fn ejection(&mut self, p: &str, r: RawEjection) -> Ejection {
        let d = Ejection::default();
        let consecutive_failures = match &r.consecutive_failures {
            Some(v) => self
                .int(
                    &format!("{p}.ejection.consecutive_failures"),
                    v,
                    0,
                    i64::from(u32::MAX),
                    "a whole number; 0 disables ejection",
                )
                .map_or(d.consecutive_failures, |n| n as u32),
            None => d.consecutive_failures,
        };
        let base_ms = self.duration_or(
            &format!("{p}.ejection.base"),
            r.base.as_ref(),
            d.base_ms,
            false,
        );
        let max_ms = self.duration_or(
            &format!("{p}.ejection.max"),
            r.max.as_ref(),
            d.max_ms,
            false,
        );
        if max_ms < base_ms {
            if let Some(at) = r.max.as_ref().or(r.base.as_ref()) {
                self.err(
                    at.referenced,
                    format!(
                        "{p}.ejection.max: {} is shorter than base ({}); max must be at \
                         least base",
                        ms(max_ms),
                        ms(base_ms)
                    ),
                );
            }
        }
        let min_clients = self.min_clients(
            &format!("{p}.ejection"),
            r.min_clients,
            (consecutive_failures > 0).then_some(consecutive_failures),
        );
        Ejection {
            consecutive_failures,
            base_ms,
            max_ms,
            min_clients,
        }
    }

    fn rollout(&mut self, p: &str, raw: S<RawRollout>) -> RolloutSpec {
        let at = raw.referenced;
        let r = raw.value;

        let mut steps = Vec::new();
        match r.steps {
            None => self.err(
                at,
                format!(
                    "{p}: missing required key `steps` (a non-empty list of \
                     {{weight, pause}})"
                ),
            ),
            Some(list) if list.value.is_empty() => self.err(
                list.referenced,
                format!("{p}.steps: the list is empty; give at least one {{weight, pause}}"),
            ),
            Some(list) => {
                // The highest weight so far and the step that set it, for the order check.
                let mut highest: Option<(Weight, usize)> = None;
                for (j, raw) in list.value.into_iter().enumerate() {
                    let sp = format!("{p}.steps[{j}]");
                    let weight_at = raw.value.weight.as_ref().map(|w| w.referenced);
                    let (step, weight_ok) = self.step(&sp, raw);
                    if let (true, Some(at)) = (weight_ok, weight_at) {
                        match highest {
                            Some((prev, k)) if step.weight < prev => self.err(
                                at,
                                format!(
                                    "{sp}.weight: {} is lower than steps[{k}]'s {}; step \
                                     weights must not decrease",
                                    step.weight.percent(),
                                    prev.percent()
                                ),
                            ),
                            _ => highest = Some((step.weight, j)),
                        }
                    }
                    steps.push(step);
                }
            }
        }

        let (analysis, interval_ms, window_ms) = match r.analysis {
            Some(a) => self.analysis(&format!("{p}.analysis"), a.value),
            None => (
                AnalysisSpec::default(),
                DEFAULT_ANALYSIS_INTERVAL_MS,
                DEFAULT_ANALYSIS_WINDOW_MS,
            ),
        };

        let (failures, min_clients) = r
            .breaker
            .map(|b| (b.value.consecutive_failures, b.value.min_clients))
            .unwrap_or_default();
        let breaker_failures = match failures {
            Some(v) => self
                .int(
                    &format!("{p}.breaker.consecutive_failures"),
                    &v,
                    0,
                    i64::from(u32::MAX),
                    "a whole number; 0 disables the breaker",
                )
                .and_then(|n| (n > 0).then_some(n as u32)),
            None => Some(DEFAULT_BREAKER_FAILURES),
        };
        let min_clients = self.min_clients(&format!("{p}.breaker"), min_clients, breaker_failures);
        let breaker = breaker_failures.map(|consecutive_failures| BreakerSpec {
            consecutive_failures,
            min_clients,
        });

        RolloutSpec {
            steps,
            analysis,
            interval_ms,
            window_ms,
            breaker,
        }
    }

    /// `{p}.min_clients`: 1 to [`MAX_MIN_CLIENTS`], and no more than the failures of
    /// the run (`failures`; `None` when the mechanism is off, then anything valid goes).
    fn min_clients(&mut self, p: &str, v: Option<S<i64>>, failures: Option<u32>) -> u32 {
        let Some(v) = v else {
            return DEFAULT_MIN_CLIENTS.min(failures.unwrap_or(u32::MAX));
        };
        let Some(n) = self.int(
            &format!("{p}.min_clients"),
            &v,
            1,
            i64::from(MAX_MIN_CLIENTS),
            "1 to 16 distinct clients; 1 lets a single client trip it",
        ) else {
            return DEFAULT_MIN_CLIENTS;
        };
        let n = n as u32;
        if let Some(f) = failures.filter(|f| n > *f) {
            self.err(
                v.referenced,
                format!(
                    "{p}.min_clients: {n} is more than consecutive_failures ({f}); a run of {f} \
                     failures cannot come from {n} clients"
                ),
            );
        }
        n
    }

    /// One rollout step, and whether its weight is valid (for the order check).
    fn step(&mut self, p: &str, raw: S<RawStep>) -> (Step, bool) {
        let at = raw.referenced;
        let r = raw.value;
        let weight = match &r.weight {
            Some(w) => match Weight::from_percent(w.value) {
                Some(Weight::ZERO) => {
                    self.err(
                        w.referenced,
                        format!("{p}.weight: a step's weight must be above 0 (0.01–100)"),
                    );
                    None
                }
                Some(weight) => Some(weight),
                None => {
                    self.weight(&format!("{p}.weight"), w);
                    None
                }
            },
            None => {
                self.err(
                    at,
                    format!("{p}: missing required key `weight` (percent, 0.01–100)"),
                );
                None
            }
        };
        let pause = match &r.pause {
            Some(v) if v.value.trim() == "manual" => Pause::Manual,
            Some(v) => Pause::For(self.duration(&format!("{p}.pause"), v, true)),
            None => {
                self.err(
                    at,
                    format!("{p}: missing required key `pause` (a duration like 30s, or manual)"),
                );
                Pause::Manual
            }
        };
        let step = Step {
            weight: weight.unwrap_or(Weight::ZERO),
            pause,
        };
        (step, weight.is_some())
    }

    fn analysis(&mut self, p: &str, r: RawAnalysis) -> (AnalysisSpec, u64, u64) {
        let d = AnalysisSpec::default();
        let interval_ms = self.duration_or(
            &format!("{p}.interval"),
            r.interval.as_ref(),
            DEFAULT_ANALYSIS_INTERVAL_MS,
            false,
        );
        let window_ms = self.duration_or(
            &format!("{p}.window"),
            r.window.as_ref(),
            DEFAULT_ANALYSIS_WINDOW_MS,
            false,
        );
        if window_ms < interval_ms {
            if let Some(at) = r.window.as_ref().or(r.interval.as_ref()) {
                self.err(
                    at.referenced,
                    format!(
                        "{p}.window: {} is shorter than the interval ({}); the window must \
                         be at least the interval",
                        ms(window_ms),
                        ms(interval_ms)
                    ),
                );
            }
        }
        let min_requests = match &r.min_requests {
            Some(v) => self
                .int(
                    &format!("{p}.min_requests"),
                    v,
                    0,
                    i64::MAX,
                    "a whole number, 0 or more",
                )
                .map_or(d.min_requests, |n| n as u64),
            None => d.min_requests,
        };
        let max_error_rate = match &r.max_error_rate {
            Some(v) => self.fraction(&format!("{p}.max_error_rate"), v),
            None => d.max_error_rate,
        };
        let max_error_rate_increase = r
            .max_error_rate_increase
            .as_ref()
            .and_then(|v| self.fraction(&format!("{p}.max_error_rate_increase"), v));
        let max_latency_increase = r.max_latency_increase.as_ref().and_then(|v| {
            if v.value.is_finite() && v.value >= 1.0 {
                Some(v.value)
            } else {
                self.err(
                    v.referenced,
                    format!(
                        "{p}.max_latency_increase: {} is out of range (a factor of at least \
                         1, e.g. 1.5 = canary p99 at most 50 % above stable's)",
                        crate::number_text(v.value)
                    ),
                );
                None
            }
        });
        let max_p99_latency_ms = r
            .max_p99_latency
            .as_ref()
            .map(|v| self.duration_f64_ms(&format!("{p}.max_p99_latency"), v, false));
        let latency_noise_floor_ms = match &r.latency_noise_floor {
            Some(v) => self.duration_f64_ms(&format!("{p}.latency_noise_floor"), v, true),
            None => d.latency_noise_floor_ms,
        };
        let failure_limit = match &r.failure_limit {
            Some(v) => self
                .int(
                    &format!("{p}.failure_limit"),
                    v,
                    1,
                    i64::from(u32::MAX),
                    "a whole number, at least 1",
                )
                .map_or(d.failure_limit, |n| n as u32),
            None => d.failure_limit,
        };
        (
            AnalysisSpec {
                min_requests,
                max_error_rate,
                max_p99_latency_ms,
                max_error_rate_increase,
                max_latency_increase,
                latency_noise_floor_ms,
                failure_limit,
            },
            interval_ms,
            window_ms,
        )
    }

    // ---- scalar checks -------------------------------------------------------------

    fn socket_addr(&mut self, p: &str, v: &S<String>) -> Option<SocketAddr> {
        match v.value.trim().parse() {
            Ok(a) => Some(a),
            Err(_) => {
                self.err(
                    v.referenced,
                    format!(
                        "{p}: {:?} is not a socket address (an IP and port such as \
                         127.0.0.1:8080, 0.0.0.0:80 or [::1]:8080; host names are not \
                         allowed here)",
                        v.value
                    ),
                );
                None
            }
        }
    }

    /// A whole number in `min..=max`; `allowed` describes the range for the message.
    fn int(&mut self, p: &str, v: &S<i64>, min: i64, max: i64, allowed: &str) -> Option<i64> {
        if (min..=max).contains(&v.value) {
            Some(v.value)
        } else {
            self.err(
                v.referenced,
                format!("{p}: {} is out of range ({allowed})", v.value),
            );
            None
        }
    }

    /// A rate in 0..=1.
    fn fraction(&mut self, p: &str, v: &S<f64>) -> Option<f64> {
        if (0.0..=1.0).contains(&v.value) {
            Some(v.value)
        } else {
            self.err(
                v.referenced,
                format!(
                    "{p}: {} is out of range (a fraction from 0 to 1, e.g. 0.01 = 1 %)",
                    crate::number_text(v.value)
                ),
            );
            None
        }
    }

    /// A duration in whole milliseconds. Reports and returns 0 when invalid.
    fn duration(&mut self, p: &str, v: &S<String>, allow_zero: bool) -> u64 {
        let Some(d) = self.parse_duration(p, v, allow_zero) else {
            return 0;
        };
        let millis = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        if millis == 0 && !d.is_zero() {
            self.err(
                v.referenced,
                format!(
                    "{p}: {:?} is shorter than the resolution of 1ms (give 0 or at least 1ms)",
                    v.value
                ),
            );
        }
        millis
    }

    /// A duration as fractional milliseconds (latency limits compare with p99 in ms).
    fn duration_f64_ms(&mut self, p: &str, v: &S<String>, allow_zero: bool) -> f64 {
        self.parse_duration(p, v, allow_zero)
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    }

    fn parse_duration(
        &mut self,
        p: &str,
        v: &S<String>,
        allow_zero: bool,
    ) -> Option<std::time::Duration> {
        match humantime::parse_duration(v.value.trim()) {
            Ok(d) if d.is_zero() && !allow_zero => {
                self.err(
                    v.referenced,
                    format!("{p}: must be greater than 0 ({DURATION_HINT})"),
                );
                None
            }
            Ok(d) => Some(d),
            Err(_) => {
                self.err(
                    v.referenced,
                    format!("{p}: {:?} is not a duration ({DURATION_HINT})", v.value),
                );
                None
            }
        }
    }

    /// An optional positive duration in ms, with a default when absent.
    fn duration_or(
        &mut self,
        p: &str,
        v: Option<&S<String>>,
        default_ms: u64,
        allow_zero: bool,
    ) -> u64 {
        match v {
            Some(v) => self.duration(p, v, allow_zero),
            None => default_ms,
        }
    }
}

/// A `dashboard.allowed_hosts` entry: a DNS name, stored lower case without a trailing
/// dot (the admin listener compares the `Host` header's name the same way).
fn allowed_host(s: &str) -> Result<String, &'static str> {
    if s.contains("://") || s.contains('/') {
        return Err(
            "is not a host name: give the name alone, without scheme or path \
                    (e.g. canary.example.com)",
        );
    }
    if s.contains(':') || s.contains('[') {
        return Err(
            "is not a host name: give the name without a port (any port is \
                    accepted; IP addresses are always allowed)",
        );
    }
    if s.starts_with("*.") {
        return Err("is a wildcard; list each name the admin listener is reached by");
    }
    if s.parse::<IpAddr>().is_ok() {
        return Err("is an IP address; IP addresses are always allowed, list names only");
    }
    if !is_dns_name(s) {
        return Err("is not a host name (letters, digits, '-' and '.', e.g. \
                    canary.example.com)");
    }
    Ok(s.strip_suffix('.').unwrap_or(s).to_ascii_lowercase())
}

/// The allowed key nearest to a mistyped one, if it is near enough to be the intended
/// one: at most one edit for short keys, two for longer ones (a swap of two neighbouring
/// letters, as in `wieght`, counts as one).
fn closest(key: &str, allowed: &[&'static str]) -> Option<&'static str> {
    let limit = if key.chars().count() <= 4 { 1 } else { 2 };
    allowed
        .iter()
        .map(|&a| (edit_distance(&key.to_ascii_lowercase(), a), a))
        .filter(|&(d, _)| d <= limit)
        .min_by_key(|&(d, _)| d)
        .map(|(_, a)| a)
}

/// Optimal string alignment distance: insertions, deletions, substitutions and swaps
/// of adjacent characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    // d[i][j]: distance between a[..i] and b[..j].
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(d[i - 2][j - 2] + 1);
            }
            d[i][j] = best;
        }
    }
    d[a.len()][b.len()]
}

fn placeholder_pool() -> PoolConfig {
    PoolConfig {
        version: String::new(),
        upstreams: Vec::new(),
        http2: false,
        health_check: None,
        tls: None,
    }
}

/// Formats milliseconds back into the config's duration syntax for messages.
fn ms(ms: u64) -> String {
    humantime::format_duration(std::time::Duration::from_millis(ms)).to_string()
}

/// The one-line reason of a regex error (its `Display` draws the pattern with a caret
/// over several lines; the caret is useless without the pattern's own position).
fn regex_error(e: &regex::Error) -> String {
    let text = e.to_string();
    text.lines()
        .find_map(|l| l.trim().strip_prefix("error: "))
        .or_else(|| text.lines().map(str::trim).find(|l| !l.is_empty()))
        .unwrap_or("invalid pattern")
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closest_key_catches_typos_only() {
        let route = RawRoute::FIELDS;
        assert_eq!(closest("wieght", route), Some("weight"));
        assert_eq!(closest("Weight", route), Some("weight"));
        assert_eq!(closest("path_prefx", route), Some("path_prefix"));
        assert_eq!(closest("host", route), Some("hosts"));
        assert_eq!(closest("upstreams", route), None);
        assert_eq!(closest("x", route), None);
        assert_eq!(edit_distance("", "ab"), 2);
        assert_eq!(edit_distance("ab", "ba"), 1);
    }

    #[test]
    #[allow(clippy::invalid_regex, reason = "the invalid pattern is the point")]
    fn regex_error_is_one_line() {
        let e = regex::bytes::Regex::new("(").unwrap_err();
        assert_eq!(regex_error(&e), "unclosed group");
    }
}
