//! The fleet's figures for `/metrics`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

use canary_proxy::expo::{Exposition, Kind};

/// Upper bounds (seconds) of the apply-delay histogram.
const DELAY_BOUNDS: [f64; 11] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// Counters the member's tasks update.
#[derive(Default)]
pub struct Metrics {
    pub leader_changes: AtomicU64,
    pub fenced: AtomicU64,
    pub config_errors: AtomicU64,
    pub scrape_failures: AtomicU64,
    reloads: Mutex<BTreeMap<&'static str, u64>>,
    delay_buckets: [AtomicU64; 11],
    delay_sum_ms: AtomicU64,
    delay_count: AtomicU64,
}

impl Metrics {
    pub fn reload(&self, reason: &'static str) {
        *self
            .reloads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(reason)
            .or_default() += 1;
    }

    /// One state applied `ms` after the leader wrote it (wall clocks: exact on one
    /// host, needs NTP across hosts).
    pub fn observe_delay(&self, ms: u64) {
        let s = ms as f64 / 1000.0;
        for (i, b) in DELAY_BOUNDS.iter().enumerate() {
            if s <= *b {
                self.delay_buckets[i].fetch_add(1, Relaxed);
            }
        }
        self.delay_sum_ms.fetch_add(ms, Relaxed);
        self.delay_count.fetch_add(1, Relaxed);
    }

    pub fn encode(&self, e: &mut Exposition, gauges: &[(&str, &str, f64)]) {
        for (name, help, v) in gauges {
            e.family(name, help, Kind::Gauge);
            e.sample(name, &[], *v);
        }
        let counters = [
            (
                "canary_fleet_leader_changes_total",
                "Times this member started or stopped leading.",
                &self.leader_changes,
            ),
            (
                "canary_fleet_fenced_writes_total",
                "Leader writes refused because another member leads.",
                &self.fenced,
            ),
            (
                "canary_fleet_config_errors_total",
                "Fleet documents rejected by validation.",
                &self.config_errors,
            ),
            (
                "canary_fleet_scrape_failures_total",
                "Member counter pulls that failed (leader only).",
                &self.scrape_failures,
            ),
        ];
        for (name, help, v) in counters {
            e.family(name, help, Kind::Counter);
            e.sample(name, &[], v.load(Relaxed) as f64);
        }
        e.family(
            "canary_fleet_reloads_total",
            "Full reads of the fleet's keys, by reason (start, reconnect, compacted, revision_back, stalled, canceled).",
            Kind::Counter,
        );
        for (reason, n) in self
            .reloads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            e.sample(
                "canary_fleet_reloads_total",
                &[("reason", reason)],
                *n as f64,
            );
        }
        let name = "canary_fleet_apply_delay_seconds";
        e.family(
            name,
            "From the leader's write of a rollout state to this member applying it.",
            Kind::Histogram,
        );
        for (i, b) in DELAY_BOUNDS.iter().enumerate() {
            let le = b.to_string();
            e.sample(
                &format!("{name}_bucket"),
                &[("le", le.as_str())],
                self.delay_buckets[i].load(Relaxed) as f64,
            );
        }
        let count = self.delay_count.load(Relaxed) as f64;
        e.sample(&format!("{name}_bucket"), &[("le", "+Inf")], count);
        e.sample(
            &format!("{name}_sum"),
            &[],
            self.delay_sum_ms.load(Relaxed) as f64 / 1000.0,
        );
        e.sample(&format!("{name}_count"), &[], count);
    }
}
