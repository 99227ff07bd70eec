//! Fleet-wide evidence: the leader's sum of every member's request counters.
//!
//! The leader pulls each member's cumulative per-route counters (`GET
//! /api/v1/fleet/sample`) every controller tick and records them here, keyed by
//! `(member, boot_id)`. Each key accumulates the increments between the values the
//! leader saw in its term, so traffic from before the term, or from before the leader
//! first reached a member, never lands in one window at once. A counter that went
//! down was reset (a new canary version gets new counters; a restarted member has a
//! new `boot_id` and so a new key): its new value is all increment, as Prometheus'
//! `rate()` reads a reset. The sum over keys is therefore monotone, which is what the
//! controller's windowed differences need. Pure data, no IO.

use std::collections::BTreeMap;
use std::sync::Mutex;

use canary_control::Evidence;
use canary_core::analysis::VersionWindow;
use canary_core::latency::LATENCY_BUCKETS;
use serde::{Deserialize, Serialize};

/// One version's cumulative counters, as the sample endpoint sends them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub requests: u64,
    pub failures: u64,
    pub latency: Vec<u64>,
}

impl From<&VersionWindow> for Counts {
    fn from(w: &VersionWindow) -> Counts {
        Counts {
            requests: w.requests,
            failures: w.failures,
            latency: w.latency.to_vec(),
        }
    }
}

impl Counts {
    fn window(&self) -> VersionWindow {
        VersionWindow {
            requests: self.requests,
            failures: self.failures,
            latency: std::array::from_fn(|i| self.latency.get(i).copied().unwrap_or(0)),
        }
    }
}

/// A route's counters on one member: canary and stable from the same moment.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteCounts {
    pub canary: Counts,
    pub stable: Counts,
}

/// What `GET /api/v1/fleet/sample` answers.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Sample {
    pub member: String,
    pub boot_id: String,
    pub applied_revision: i64,
    pub routes: BTreeMap<String, RouteCounts>,
}

/// One version's counters on one member: the last value seen and the increments
/// accumulated since the first.
struct Series {
    prev: Counts,
    acc: VersionWindow,
}

impl Series {
    fn new(first: &Counts) -> Series {
        Series {
            prev: first.clone(),
            acc: Counts::default().window(),
        }
    }

    fn record(&mut self, now: &Counts) {
        let (n, p) = (now.window(), self.prev.window());
        let reset = n.requests < p.requests
            || n.failures < p.failures
            || n.latency.iter().zip(p.latency.iter()).any(|(a, b)| a < b);
        add(&mut self.acc, &if reset { n } else { sub(&n, &p) });
        self.prev = now.clone();
    }
}

/// A member in one run of its process: `(member, boot_id)`.
type MemberBoot = (String, String);

/// A route's (canary, stable) series on one member run.
type Versions = (Series, Series);

/// The leader's running sums for one term: per member run, per route, (canary, stable).
#[derive(Default)]
pub struct Aggregator {
    series: Mutex<BTreeMap<MemberBoot, BTreeMap<String, Versions>>>,
}

fn sub(a: &VersionWindow, b: &VersionWindow) -> VersionWindow {
    VersionWindow {
        requests: a.requests.saturating_sub(b.requests),
        failures: a.failures.saturating_sub(b.failures),
        latency: std::array::from_fn(|i| a.latency[i].saturating_sub(b.latency[i])),
    }
}

fn add(a: &mut VersionWindow, b: &VersionWindow) {
    a.requests += b.requests;
    a.failures += b.failures;
    for i in 0..LATENCY_BUCKETS {
        a.latency[i] += b.latency[i];
    }
}

impl Aggregator {
    /// Forgets everything: a new term starts from new baselines.
    pub fn reset(&self) {
        self.series
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// Records a member's sample.
    pub fn record(&self, s: &Sample) {
        let mut series = self.series.lock().unwrap_or_else(|p| p.into_inner());
        let routes = series
            .entry((s.member.clone(), s.boot_id.clone()))
            .or_default();
        for (route, c) in &s.routes {
            match routes.get_mut(route) {
                Some((canary, stable)) => {
                    canary.record(&c.canary);
                    stable.record(&c.stable);
                }
                None => {
                    routes.insert(
                        route.clone(),
                        (Series::new(&c.canary), Series::new(&c.stable)),
                    );
                }
            }
        }
    }
}

impl Evidence for Aggregator {
    fn counts(&self, route: &str) -> Option<(VersionWindow, VersionWindow)> {
        let series = self.series.lock().unwrap_or_else(|p| p.into_inner());
        let zero = || Counts::default().window();
        let mut total: Option<(VersionWindow, VersionWindow)> = None;
        for routes in series.values() {
            let Some((canary, stable)) = routes.get(route) else {
                continue;
            };
            let t = total.get_or_insert_with(|| (zero(), zero()));
            add(&mut t.0, &canary.acc);
            add(&mut t.1, &stable.acc);
        }
        total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(member: &str, boot: &str, canary: u64, stable: u64) -> Sample {
        let c = |n| Counts {
            requests: n,
            failures: n / 10,
            latency: vec![n],
        };
        Sample {
            member: member.into(),
            boot_id: boot.into(),
            applied_revision: 1,
            routes: [(
                "web".to_string(),
                RouteCounts {
                    canary: c(canary),
                    stable: c(stable),
                },
            )]
            .into(),
        }
    }

    fn totals(a: &Aggregator) -> (u64, u64) {
        let (c, s) = a.counts("web").expect("counts");
        (c.requests, s.requests)
    }

    #[test]
    fn the_sum_counts_every_member_from_when_the_leader_first_saw_it() {
        let a = Aggregator::default();
        assert!(a.counts("web").is_none());
        a.record(&sample("p1", "b1", 100, 900));
        a.record(&sample("p2", "b2", 50, 500));
        assert_eq!(
            totals(&a),
            (0, 0),
            "history before the term is not evidence"
        );
        a.record(&sample("p1", "b1", 110, 990));
        a.record(&sample("p2", "b2", 70, 600));
        assert_eq!(totals(&a), (30, 190));
        let (c, _) = a.counts("web").expect("counts");
        assert_eq!((c.failures, c.latency[0]), (3, 30));
        assert!(a.counts("api").is_none());
    }

    #[test]
    fn a_restarted_member_never_makes_the_sum_go_down() {
        let a = Aggregator::default();
        a.record(&sample("p1", "b1", 100, 100));
        a.record(&sample("p1", "b1", 200, 300));
        assert_eq!(totals(&a), (100, 200));
        // p1 restarts: counters from 0 under a new boot id.
        a.record(&sample("p1", "b9", 0, 0));
        assert_eq!(totals(&a), (100, 200));
        a.record(&sample("p1", "b9", 5, 7));
        assert_eq!(totals(&a), (105, 207));
        // Regression: a new canary version restarts its counters on a running member;
        // that was read as "below the baseline" and hid the new version's traffic.
        a.record(&sample("p1", "b9", 2, 17));
        assert_eq!(totals(&a), (107, 217));
        a.reset();
        assert!(a.counts("web").is_none());
    }
}
