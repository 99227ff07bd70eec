//! Per-request measurements: plain atomics, no locks on the request path.
//!
//! The same cumulative counters feed `/metrics` and the rollout analysis (which takes
//! differences of two snapshots to get a sliding window), so there is one mechanism
//! and one source of truth.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use canary_core::analysis::VersionWindow;
use canary_core::latency::{bucket_index, EXPOSED_BOUNDS_US, LATENCY_BOUNDS_US, LATENCY_BUCKETS};

use crate::expo::{Exposition, Kind};

/// Why the proxy could not get an answer from an upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpstreamError {
    /// TCP connect failed or timed out → 502.
    Connect,
    /// No response headers within the request timeout → 504.
    Timeout,
    /// The upstream broke the protocol or closed the connection → 502.
    Protocol,
}

impl UpstreamError {
    const ALL: [UpstreamError; 3] = [
        UpstreamError::Connect,
        UpstreamError::Timeout,
        UpstreamError::Protocol,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamError::Connect => "connect",
            UpstreamError::Timeout => "timeout",
            UpstreamError::Protocol => "protocol",
        }
    }
}

/// Cumulative counters of one (route, version).
#[derive(Debug)]
pub struct VersionStats {
    pub route: String,
    pub version: String,
    /// Responses by status class 1xx..5xx (including 502/504 the proxy generated).
    status: [AtomicU64; 5],
    /// Requests that failed (5xx, connect error, timeout): what analysis calls a failure.
    failures: AtomicU64,
    upstream_errors: [AtomicU64; 3],
    /// Clients that went away before the answer: never blamed on the version.
    client_aborts: AtomicU64,
    /// Requests sent to a second instance after the first could not be connected to.
    retries: AtomicU64,
    latency: [AtomicU64; LATENCY_BUCKETS],
    latency_sum_us: AtomicU64,
}

impl VersionStats {
    pub fn new(route: &str, version: &str) -> VersionStats {
        VersionStats {
            route: route.to_string(),
            version: version.to_string(),
            status: Default::default(),
            failures: AtomicU64::new(0),
            upstream_errors: Default::default(),
            client_aborts: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            latency: std::array::from_fn(|_| AtomicU64::new(0)),
            latency_sum_us: AtomicU64::new(0),
        }
    }

    /// Records one answered request: a handful of relaxed atomic adds.
    #[inline]
    pub fn record(&self, status: u16, elapsed_us: u64) {
        let class = usize::from((status / 100).clamp(1, 5)) - 1;
        self.status[class].fetch_add(1, Relaxed);
        if status >= 500 {
            self.failures.fetch_add(1, Relaxed);
        }
        self.latency[bucket_index(elapsed_us)].fetch_add(1, Relaxed);
        self.latency_sum_us.fetch_add(elapsed_us, Relaxed);
    }

    /// Records why an upstream failed (in addition to [`record`](Self::record) of the
    /// 502/504 the client received).
    pub fn record_upstream_error(&self, e: UpstreamError) {
        self.upstream_errors[e as usize].fetch_add(1, Relaxed);
    }

    pub fn record_client_abort(&self) {
        self.client_aborts.fetch_add(1, Relaxed);
    }

    pub fn record_retry(&self) {
        self.retries.fetch_add(1, Relaxed);
    }

    /// The cumulative counts, for the analysis window.
    pub fn counts(&self) -> VersionWindow {
        VersionWindow {
            requests: self.status.iter().map(|c| c.load(Relaxed)).sum(),
            failures: self.failures.load(Relaxed),
            latency: std::array::from_fn(|i| self.latency[i].load(Relaxed)),
        }
    }
}

/// Writes the per-version families for all stats.
pub fn encode_versions(e: &mut Exposition, stats: &[std::sync::Arc<VersionStats>]) {
    const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];
    e.family(
        "canary_requests_total",
        "Requests answered, by route, version and status class.",
        Kind::Counter,
    );
    for s in stats {
        for (i, class) in CLASSES.iter().enumerate() {
            let labels = [
                ("route", s.route.as_str()),
                ("version", s.version.as_str()),
                ("class", *class),
            ];
            e.sample(
                "canary_requests_total",
                &labels,
                s.status[i].load(Relaxed) as f64,
            );
        }
    }
    e.family(
        "canary_request_failures_total",
        "Failed requests (5xx, connect errors, timeouts) as the analysis counts them.",
        Kind::Counter,
    );
    for s in stats {
        let labels = [("route", s.route.as_str()), ("version", s.version.as_str())];
        e.sample(
            "canary_request_failures_total",
            &labels,
            s.failures.load(Relaxed) as f64,
        );
    }
    e.family(
        "canary_upstream_errors_total",
        "Requests the upstream did not answer, by cause.",
        Kind::Counter,
    );
    for s in stats {
        for kind in UpstreamError::ALL {
            let labels = [
                ("route", s.route.as_str()),
                ("version", s.version.as_str()),
                ("kind", kind.as_str()),
            ];
            e.sample(
                "canary_upstream_errors_total",
                &labels,
                s.upstream_errors[kind as usize].load(Relaxed) as f64,
            );
        }
    }
    e.family(
        "canary_client_aborts_total",
        "Requests whose client went away before the answer.",
        Kind::Counter,
    );
    for s in stats {
        let labels = [("route", s.route.as_str()), ("version", s.version.as_str())];
        e.sample(
            "canary_client_aborts_total",
            &labels,
            s.client_aborts.load(Relaxed) as f64,
        );
    }
    e.family(
        "canary_retries_total",
        "Requests sent to a second instance of the same version after the first could not be connected to.",
        Kind::Counter,
    );
    for s in stats {
        let labels = [("route", s.route.as_str()), ("version", s.version.as_str())];
        e.sample(
            "canary_retries_total",
            &labels,
            s.retries.load(Relaxed) as f64,
        );
    }
    e.family(
        "canary_request_duration_seconds",
        "Time to the upstream's response headers.",
        Kind::Histogram,
    );
    for s in stats {
        let counts: [u64; LATENCY_BUCKETS] = std::array::from_fn(|i| s.latency[i].load(Relaxed));
        let mut cumulative = 0u64;
        let mut exposed = EXPOSED_BOUNDS_US.iter().peekable();
        for (i, c) in counts.iter().enumerate() {
            cumulative += c;
            let Some(&bound) = LATENCY_BOUNDS_US.get(i) else {
                break;
            };
            if exposed.peek() == Some(&&bound) {
                exposed.next();
                let le = format!("{}", bound as f64 / 1e6);
                let labels = [
                    ("route", s.route.as_str()),
                    ("version", s.version.as_str()),
                    ("le", le.as_str()),
                ];
                e.sample(
                    "canary_request_duration_seconds_bucket",
                    &labels,
                    cumulative as f64,
                );
            }
        }
        let total: u64 = counts.iter().sum();
        let labels = [
            ("route", s.route.as_str()),
            ("version", s.version.as_str()),
            ("le", "+Inf"),
        ];
        e.sample(
            "canary_request_duration_seconds_bucket",
            &labels,
            total as f64,
        );
        let labels = [("route", s.route.as_str()), ("version", s.version.as_str())];
        e.sample(
            "canary_request_duration_seconds_sum",
            &labels,
            s.latency_sum_us.load(Relaxed) as f64 / 1e6,
        );
        e.sample(
            "canary_request_duration_seconds_count",
            &labels,
            total as f64,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_feed_the_analysis() {
        let s = VersionStats::new("web", "v2");
        s.record(200, 1_000);
        s.record(503, 2_000);
        s.record(404, 500);
        let c = s.counts();
        assert_eq!((c.requests, c.failures), (3, 1));
        assert_eq!(c.latency.iter().sum::<u64>(), 3);
    }

    #[test]
    fn histogram_is_cumulative_and_ends_with_inf() {
        let s = std::sync::Arc::new(VersionStats::new("web", "v1"));
        s.record(200, 400);
        s.record(200, 20_000_000);
        let mut e = Exposition::new();
        encode_versions(&mut e, &[s]);
        let text = e.finish();
        assert!(text.contains("canary_request_duration_seconds_bucket{route=\"web\",version=\"v1\",le=\"0.0005\"} 1"), "{text}");
        assert!(text.contains("le=\"10\"} 1"), "{text}");
        assert!(text.contains("le=\"30\"} 2"), "{text}");
        assert!(text.contains("le=\"+Inf\"} 2"), "{text}");
        assert!(
            text.contains("canary_requests_total{route=\"web\",version=\"v1\",class=\"2xx\"} 2")
        );
    }
}
