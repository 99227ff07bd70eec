//! The analysis: canary against stable over the same window → a verdict.
//!
//! The caller (the controller) measures both versions over the same sliding window
//! and passes the counts in; this module only does arithmetic, so a verdict can be
//! reproduced from the numbers in the journal.

use serde::{Deserialize, Serialize};

use crate::latency::{quantile_us, LATENCY_BUCKETS};

/// Requests of one version within the analysis window.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VersionWindow {
    /// Requests answered or failed, not counting clients that went away.
    pub requests: u64,
    /// Failed requests: 5xx answers, connect errors, timeouts.
    pub failures: u64,
    /// Latency histogram, bucketed by [`crate::latency::LATENCY_BOUNDS_US`].
    pub latency: [u64; LATENCY_BUCKETS],
}

impl Default for VersionWindow {
    fn default() -> Self {
        VersionWindow {
            requests: 0,
            failures: 0,
            latency: [0; LATENCY_BUCKETS],
        }
    }
}

/// Limits an analysis checks. Absent limits are not checked.
#[derive(Clone, Debug, PartialEq)]
pub struct AnalysisSpec {
    /// Fewer canary requests than this in the window → inconclusive.
    pub min_requests: u64,
    /// The canary's error rate (failures / requests, 0–1) may be at most this.
    pub max_error_rate: Option<f64>,
    /// The canary's p99 latency may be at most this many milliseconds.
    pub max_p99_latency_ms: Option<f64>,
    /// Canary error rate may exceed stable's by at most this (absolute difference).
    pub max_error_rate_increase: Option<f64>,
    /// Canary p99 may be at most this factor of stable's p99.
    pub max_latency_increase: Option<f64>,
    /// p99 differences below this many milliseconds never fail the relative check:
    /// sub-millisecond jitter is not a regression.
    pub latency_noise_floor_ms: f64,
    /// Consecutive failed verdicts that abort the rollout.
    pub failure_limit: u32,
}

impl Default for AnalysisSpec {
    fn default() -> Self {
        AnalysisSpec {
            min_requests: 50,
            max_error_rate: Some(0.01),
            max_p99_latency_ms: None,
            max_error_rate_increase: None,
            max_latency_increase: None,
            latency_noise_floor_ms: 5.0,
            failure_limit: 2,
        }
    }
}

/// The outcome of one analysis.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VerdictResult {
    Pass,
    Fail,
    /// Not enough evidence: holds the step, never advances, never aborts.
    Inconclusive,
}

impl VerdictResult {
    pub fn as_str(self) -> &'static str {
        match self {
            VerdictResult::Pass => "pass",
            VerdictResult::Fail => "fail",
            VerdictResult::Inconclusive => "inconclusive",
        }
    }
}

/// The numbers of one version behind a verdict.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub requests: u64,
    pub failures: u64,
    pub error_rate: f64,
    /// p99 latency in milliseconds; absent without requests.
    pub p99_ms: Option<f64>,
}

impl Summary {
    /// Summarises a window.
    pub fn of(w: &VersionWindow) -> Summary {
        let error_rate = if w.requests == 0 {
            0.0
        } else {
            w.failures as f64 / w.requests as f64
        };
        Summary {
            requests: w.requests,
            failures: w.failures,
            error_rate,
            p99_ms: quantile_us(&w.latency, 0.99).map(|us| us / 1000.0),
        }
    }
}

/// A verdict with its evidence.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    pub result: VerdictResult,
    /// When it was taken (ms since the Unix epoch, as passed in).
    pub at_ms: u64,
    pub canary: Summary,
    pub stable: Summary,
    /// Each limit that failed, e.g. `error rate 0.0500 > max_error_rate 0.0100`;
    /// for an inconclusive verdict, why.
    pub reasons: Vec<String>,
}

/// Judges the canary window against the stable window.
///
/// Relative limits need a stable baseline: when stable has fewer than `min_requests`
/// in the window (e.g. at 100 % canary), only the absolute limits are checked.
pub fn judge(
    spec: &AnalysisSpec,
    canary: &VersionWindow,
    stable: &VersionWindow,
    at_ms: u64,
) -> Verdict {
    let c = Summary::of(canary);
    let s = Summary::of(stable);
    let mut reasons = Vec::new();
    if canary.requests < spec.min_requests {
        reasons.push(format!(
            "{} canary requests < min_requests {}",
            canary.requests, spec.min_requests
        ));
        return Verdict {
            result: VerdictResult::Inconclusive,
            at_ms,
            canary: c,
            stable: s,
            reasons,
        };
    }
    if let Some(max) = spec.max_error_rate {
        if c.error_rate > max {
            reasons.push(format!(
                "error rate {:.4} > max_error_rate {max:.4}",
                c.error_rate
            ));
        }
    }
    if let (Some(max), Some(p99)) = (spec.max_p99_latency_ms, c.p99_ms) {
        if p99 > max {
            reasons.push(format!("p99 {p99:.1}ms > max_p99_latency {max:.1}ms"));
        }
    }
    let baseline = stable.requests >= spec.min_requests;
    if let (Some(inc), true) = (spec.max_error_rate_increase, baseline) {
        if c.error_rate > s.error_rate + inc {
            reasons.push(format!(
                "error rate {:.4} > stable {:.4} + max_error_rate_increase {inc:.4}",
                c.error_rate, s.error_rate
            ));
        }
    }
    if let (Some(factor), true, Some(cp), Some(sp)) =
        (spec.max_latency_increase, baseline, c.p99_ms, s.p99_ms)
    {
        if cp > sp * factor && cp - sp > spec.latency_noise_floor_ms {
            reasons.push(format!(
                "p99 {cp:.1}ms > stable p99 {sp:.1}ms × max_latency_increase {factor}"
            ));
        }
    }
    let result = if reasons.is_empty() {
        VerdictResult::Pass
    } else {
        VerdictResult::Fail
    };
    Verdict {
        result,
        at_ms,
        canary: c,
        stable: s,
        reasons,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::latency::bucket_index;

    fn window(requests: u64, failures: u64, latency_us: u64) -> VersionWindow {
        let mut w = VersionWindow {
            requests,
            failures,
            ..Default::default()
        };
        w.latency[bucket_index(latency_us)] = requests;
        w
    }

    fn spec() -> AnalysisSpec {
        AnalysisSpec {
            min_requests: 50,
            max_error_rate: Some(0.01),
            max_p99_latency_ms: Some(500.0),
            max_error_rate_increase: Some(0.005),
            max_latency_increase: Some(1.5),
            latency_noise_floor_ms: 5.0,
            failure_limit: 2,
        }
    }

    #[test]
    fn too_few_requests_is_inconclusive() {
        let v = judge(&spec(), &window(49, 49, 1_000), &window(1000, 0, 1_000), 7);
        assert_eq!(v.result, VerdictResult::Inconclusive);
        assert_eq!(v.at_ms, 7);
    }

    #[test]
    fn healthy_canary_passes() {
        let v = judge(
            &spec(),
            &window(100, 0, 10_000),
            &window(1000, 0, 10_000),
            0,
        );
        assert_eq!(v.result, VerdictResult::Pass, "{:?}", v.reasons);
    }

    #[test]
    fn absolute_error_rate_fails() {
        let v = judge(&spec(), &window(100, 5, 1_000), &window(1000, 50, 1_000), 0);
        assert_eq!(v.result, VerdictResult::Fail);
        assert!(v.reasons[0].contains("max_error_rate"), "{:?}", v.reasons);
    }

    #[test]
    fn relative_latency_regression_fails() {
        let v = judge(
            &spec(),
            &window(100, 0, 100_000),
            &window(1000, 0, 20_000),
            0,
        );
        assert_eq!(v.result, VerdictResult::Fail);
        assert!(
            v.reasons.iter().any(|r| r.contains("max_latency_increase")),
            "{:?}",
            v.reasons
        );
    }

    #[test]
    fn sub_floor_latency_difference_passes() {
        // 2 ms vs 0.5 ms is 4× but below the 5 ms noise floor.
        let v = judge(&spec(), &window(100, 0, 2_000), &window(1000, 0, 500), 0);
        assert_eq!(v.result, VerdictResult::Pass, "{:?}", v.reasons);
    }

    #[test]
    fn relative_limits_need_a_stable_baseline() {
        let v = judge(&spec(), &window(100, 0, 100_000), &window(3, 0, 1_000), 0);
        assert_eq!(v.result, VerdictResult::Pass, "{:?}", v.reasons);
    }

    /// `requests` at `fast_us`, of them `slow` at `slow_us` instead.
    fn with_slow(requests: u64, fast_us: u64, slow: u64, slow_us: u64) -> VersionWindow {
        let mut w = window(requests - slow, 0, fast_us);
        w.requests = requests;
        w.latency[bucket_index(slow_us)] += slow;
        w
    }

    #[test]
    fn one_slow_request_among_few_does_not_decide_the_latency_checks() {
        let stable = window(800, 0, 6_000);
        // 79 requests: the usual p99 rank is 79, the slow one itself.
        let v = judge(&spec(), &with_slow(79, 1_000, 1, 70_000), &stable, 0);
        assert_eq!(v.result, VerdictResult::Pass, "{:?}", v.reasons);
        assert!(v.canary.p99_ms.unwrap() <= 1.0, "{:?}", v.canary);
        let v = judge(&spec(), &with_slow(79, 1_000, 1, 700_000), &stable, 0);
        assert_eq!(
            v.result,
            VerdictResult::Pass,
            "over max_p99_latency: {:?}",
            v.reasons
        );
        // Two slow ones of 79 (2.5%) are a slow p99.
        let v = judge(&spec(), &with_slow(79, 1_000, 2, 70_000), &stable, 0);
        assert_eq!(v.result, VerdictResult::Fail);
        assert!(
            v.reasons[0].contains("max_latency_increase"),
            "{:?}",
            v.reasons
        );
    }

    #[test]
    fn from_100_requests_the_p99_is_the_usual_one() {
        // Rank ⌈0.99·n⌉: a fast request while at most 1% are slow, a slow one beyond.
        for (n, slow, is_slow) in [
            (100, 1, false),
            (100, 2, true),
            (250, 2, false),
            (250, 3, true),
            (1000, 10, false),
            (1000, 11, true),
        ] {
            let p99 = Summary::of(&with_slow(n, 1_000, slow, 70_000))
                .p99_ms
                .unwrap();
            assert_eq!(
                p99 > 60.0,
                is_slow,
                "{n} requests, {slow} slow: p99 {p99} ms"
            );
        }
        // One request: itself.
        assert_eq!(Summary::of(&window(1, 0, 70_000)).p99_ms, Some(75.0));
        assert_eq!(Summary::of(&window(0, 0, 0)).p99_ms, None);
    }
}
