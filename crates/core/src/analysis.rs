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

/// The result of one check of a verdict.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckResult {
    Pass,
    Fail,
    /// Not judged: the limit is not configured, there is no stable baseline, no
    /// latency was measured, or too few canary requests made the verdict inconclusive.
    Skipped,
}

/// One limit of the analysis, as a verdict report lists it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Check {
    /// The setting checked: `min_requests`, `max_error_rate`, `max_p99_latency`,
    /// `max_error_rate_increase`, `max_latency_increase`.
    pub name: &'static str,
    /// The canary's value (requests, error rate as a fraction, or p99 in ms).
    pub canary: Option<f64>,
    /// Stable's value, where the check compares with it.
    pub stable: Option<f64>,
    /// The limit the canary's value was held to: the setting, or for the relative
    /// checks the limit it works out to against stable's value.
    pub limit: Option<f64>,
    pub result: CheckResult,
    /// For a failure the verdict's reason; for a skipped check, why.
    pub note: String,
}

/// Every check of the analysis for these two summaries, in a fixed order. [`judge`]
/// decides with exactly these checks (a verdict fails when one of them fails), so a
/// report built from a verdict's numbers shows what decided it.
pub fn checks(spec: &AnalysisSpec, c: &Summary, s: &Summary) -> Vec<Check> {
    use CheckResult::{Fail, Pass, Skipped};
    let check = |name, canary, stable, limit, failed: Option<String>| Check {
        name,
        canary,
        stable,
        limit,
        result: if failed.is_some() { Fail } else { Pass },
        note: failed.unwrap_or_default(),
    };
    let skipped = |name, canary, stable, limit, why: &str| Check {
        name,
        canary,
        stable,
        limit,
        result: Skipped,
        note: why.to_string(),
    };
    let enough = c.requests >= spec.min_requests;
    let mut out = vec![check(
        "min_requests",
        Some(c.requests as f64),
        None,
        Some(spec.min_requests as f64),
        (!enough).then(|| {
            format!(
                "{} canary requests < min_requests {}",
                c.requests, spec.min_requests
            )
        }),
    )];
    let baseline = s.requests >= spec.min_requests;
    let not_judged = "not judged: too few canary requests";
    let no_baseline = "no stable baseline (fewer than min_requests stable requests)";
    let not_set = "not configured";

    let (name, cv) = ("max_error_rate", Some(c.error_rate));
    out.push(match spec.max_error_rate {
        None => skipped(name, cv, None, None, not_set),
        Some(max) if !enough => skipped(name, cv, None, Some(max), not_judged),
        Some(max) => check(
            name,
            cv,
            None,
            Some(max),
            (c.error_rate > max)
                .then(|| format!("error rate {:.4} > max_error_rate {max:.4}", c.error_rate)),
        ),
    });

    let name = "max_p99_latency";
    out.push(match (spec.max_p99_latency_ms, c.p99_ms) {
        (None, _) => skipped(name, c.p99_ms, None, None, not_set),
        (Some(max), _) if !enough => skipped(name, c.p99_ms, None, Some(max), not_judged),
        (Some(max), None) => skipped(name, None, None, Some(max), "no latency measured"),
        (Some(max), Some(p99)) => check(
            name,
            Some(p99),
            None,
            Some(max),
            (p99 > max).then(|| format!("p99 {p99:.1}ms > max_p99_latency {max:.1}ms")),
        ),
    });

    let (name, sv) = ("max_error_rate_increase", Some(s.error_rate));
    out.push(match spec.max_error_rate_increase {
        None => skipped(name, cv, sv, None, not_set),
        Some(inc) if !enough => skipped(name, cv, sv, Some(s.error_rate + inc), not_judged),
        Some(_) if !baseline => skipped(name, cv, sv, None, no_baseline),
        Some(inc) => check(
            name,
            cv,
            sv,
            Some(s.error_rate + inc),
            (c.error_rate > s.error_rate + inc).then(|| {
                format!(
                    "error rate {:.4} > stable {:.4} + max_error_rate_increase {inc:.4}",
                    c.error_rate, s.error_rate
                )
            }),
        ),
    });

    let name = "max_latency_increase";
    // The relative limit never fails a difference within the noise floor.
    let limit = |sp: f64, factor: f64| (sp * factor).max(sp + spec.latency_noise_floor_ms);
    out.push(match (spec.max_latency_increase, c.p99_ms, s.p99_ms) {
        (None, cp, sp) => skipped(name, cp, sp, None, not_set),
        (Some(f), cp, sp) if !enough => {
            skipped(name, cp, sp, sp.map(|sp| limit(sp, f)), not_judged)
        }
        (Some(_), cp, sp) if !baseline => skipped(name, cp, sp, None, no_baseline),
        (Some(f), Some(cp), Some(sp)) => check(
            name,
            Some(cp),
            Some(sp),
            Some(limit(sp, f)),
            (cp > sp * f && cp - sp > spec.latency_noise_floor_ms).then(|| {
                format!("p99 {cp:.1}ms > stable p99 {sp:.1}ms × max_latency_increase {f}")
            }),
        ),
        (Some(_), cp, sp) => skipped(name, cp, sp, None, "no latency measured"),
    });
    out
}

/// Judges the canary window against the stable window.
///
/// Relative limits need a stable baseline: when stable has fewer than `min_requests`
/// in the window (e.g. at 100 % canary), only the absolute limits are checked. The
/// checks themselves are [`checks`].
pub fn judge(
    spec: &AnalysisSpec,
    canary: &VersionWindow,
    stable: &VersionWindow,
    at_ms: u64,
) -> Verdict {
    let c = Summary::of(canary);
    let s = Summary::of(stable);
    let all = checks(spec, &c, &s);
    let failed = |name: &str| {
        all.iter()
            .any(|k| k.name == name && k.result == CheckResult::Fail)
    };
    let result = if failed("min_requests") {
        VerdictResult::Inconclusive
    } else if all.iter().any(|k| k.result == CheckResult::Fail) {
        VerdictResult::Fail
    } else {
        VerdictResult::Pass
    };
    let reasons = all
        .into_iter()
        .filter(|k| k.result == CheckResult::Fail)
        .map(|k| k.note)
        .collect();
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

    #[test]
    fn checks_list_every_limit_with_values_and_agree_with_the_verdict() {
        let v = judge(
            &spec(),
            &window(100, 5, 100_000),
            &window(1000, 0, 20_000),
            0,
        );
        let all = checks(&spec(), &v.canary, &v.stable);
        let names: Vec<&str> = all.iter().map(|k| k.name).collect();
        assert_eq!(
            names,
            [
                "min_requests",
                "max_error_rate",
                "max_p99_latency",
                "max_error_rate_increase",
                "max_latency_increase"
            ]
        );
        let failed: Vec<&str> = all
            .iter()
            .filter(|k| k.result == CheckResult::Fail)
            .map(|k| k.note.as_str())
            .collect();
        assert_eq!(failed, v.reasons);
        assert_eq!(all[1].canary, Some(0.05));
        assert_eq!(all[1].limit, Some(0.01));
        assert_eq!(all[3].stable, Some(0.0));
        assert!((all[3].limit.unwrap() - 0.005).abs() < 1e-12);
        // p99 100 ms vs stable 20 ms × 1.5 = 30 ms (above the 5 ms floor).
        assert!((all[4].limit.unwrap() - all[4].stable.unwrap() * 1.5).abs() < 1e-9);
        assert_eq!(all[0].result, CheckResult::Pass);
    }

    #[test]
    fn checks_skip_what_was_not_judged() {
        let v = judge(&spec(), &window(10, 0, 1_000), &window(1000, 0, 1_000), 0);
        let all = checks(&spec(), &v.canary, &v.stable);
        assert_eq!(all[0].result, CheckResult::Fail);
        assert!(all[1..].iter().all(|k| k.result == CheckResult::Skipped));
        assert_eq!(v.result, VerdictResult::Inconclusive);
        // No baseline: the relative checks are skipped, the absolute ones judged.
        let v = judge(&spec(), &window(100, 0, 1_000), &window(3, 0, 1_000), 0);
        let all = checks(&spec(), &v.canary, &v.stable);
        let res: Vec<CheckResult> = all.iter().map(|k| k.result).collect();
        use CheckResult::{Pass, Skipped};
        assert_eq!(res, [Pass, Pass, Pass, Skipped, Skipped]);
        assert!(all[3].note.contains("no stable baseline"));
        let bare = AnalysisSpec {
            max_error_rate: None,
            ..AnalysisSpec::default()
        };
        assert_eq!(
            checks(&bare, &v.canary, &v.stable)[1].note,
            "not configured"
        );
    }
}
