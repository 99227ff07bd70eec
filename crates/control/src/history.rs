//! The dashboard's time series: a bounded in-memory ring per route with a canary,
//! filled by the controller's tick (never on the request path, never by a request).
//!
//! Every [`SAMPLE_MS`] the controller hands in both versions' cumulative counters; the
//! ring keeps those samples for one analysis window, and every [`STEP_MS`] turns them
//! into one [`Point`]: requests per second over the last step, and error rate, p50 and
//! p99 over the trailing analysis window, taken with the analysis' own difference and
//! [`Summary::of`] / [`quantile_us`]. So the charts show the numbers the analysis
//! judges (the verdict markers carry the verdict's own numbers).
//!
//! Memory (docs/dashboard.md#memory): a point is 48 bytes (`f32` values, `NaN` for
//! "no requests"), so one hour at one point per 2 s is 1,801 points ≈ 86 KB per route
//! with a canary; plus the cumulative samples of one analysis window (one per second,
//! 2 × 51 latency buckets, 856 bytes each: ≈ 52 KB for a 1-minute window), plus one
//! verdict marker per analysis interval (64 bytes each). Lost on restart, like counters.

use std::collections::VecDeque;

use canary_core::analysis::{Summary, Verdict, VerdictResult, VersionWindow};
use canary_core::latency::quantile_us;
use serde::Serialize;

/// How often cumulative counters are sampled (as the controller's own analysis does).
pub const SAMPLE_MS: u64 = 1_000;
/// One chart point every this many milliseconds.
pub const STEP_MS: u64 = 2_000;
/// The trailing window of routes without a rollout (no analysis window of their own).
pub const DEFAULT_WINDOW_MS: u64 = 60_000;

/// One version's numbers at one point; `NaN` where there were no requests.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct VersionPoint {
    /// Requests per second over the last step.
    pub rps: f32,
    /// Failed / all over the trailing window, as a fraction.
    pub error_rate: f32,
    pub p50_ms: f32,
    pub p99_ms: f32,
}

/// One column of the series.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Point {
    /// Wall-clock ms since the Unix epoch.
    pub t: u64,
    /// Canary weight, percent.
    pub weight: f32,
    pub stable: VersionPoint,
    pub canary: VersionPoint,
}

/// A verdict as a marker on the charts, with the numbers it was taken on.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct VerdictMark {
    pub at_ms: u64,
    pub result: VerdictResult,
    pub canary_error_rate: f64,
    pub stable_error_rate: f64,
    pub canary_p99_ms: Option<f64>,
    pub stable_p99_ms: Option<f64>,
}

impl From<&Verdict> for VerdictMark {
    fn from(v: &Verdict) -> Self {
        VerdictMark {
            at_ms: v.at_ms,
            result: v.result,
            canary_error_rate: v.canary.error_rate,
            stable_error_rate: v.stable.error_rate,
            canary_p99_ms: v.canary.p99_ms,
            stable_p99_ms: v.stable.p99_ms,
        }
    }
}

#[derive(Clone, Debug)]
struct Sample {
    at_ms: u64,
    canary: VersionWindow,
    stable: VersionWindow,
}

/// The ring of one route.
#[derive(Debug)]
pub struct History {
    /// How long points and verdicts are kept (`dashboard.history`).
    keep_ms: u64,
    samples: VecDeque<Sample>,
    points: VecDeque<Point>,
    verdicts: VecDeque<VerdictMark>,
    /// The sample the last point's rates were taken from.
    last_point_sample: Option<Sample>,
}

fn diff(a: &VersionWindow, b: &VersionWindow) -> VersionWindow {
    VersionWindow {
        requests: a.requests.saturating_sub(b.requests),
        failures: a.failures.saturating_sub(b.failures),
        latency: std::array::from_fn(|i| a.latency[i].saturating_sub(b.latency[i])),
    }
}

fn opt(v: Option<f64>) -> f32 {
    v.map_or(f32::NAN, |v| v as f32)
}

impl History {
    /// An empty ring keeping `keep_ms` of points.
    pub fn new(keep_ms: u64) -> History {
        History {
            keep_ms,
            samples: VecDeque::new(),
            points: VecDeque::new(),
            verdicts: VecDeque::new(),
            last_point_sample: None,
        }
    }

    /// The most points the ring holds.
    pub fn capacity(&self) -> usize {
        (self.keep_ms / STEP_MS) as usize + 1
    }

    /// Forgets everything (a new canary version: its numbers start from zero).
    pub fn clear(&mut self) {
        self.samples.clear();
        self.points.clear();
        self.verdicts.clear();
        self.last_point_sample = None;
    }

    /// Takes the cumulative counters at `now`; returns the new point when one is due.
    /// `window_ms` is the trailing window of error rate and latency (the route's
    /// analysis window), `weight` the canary weight now.
    pub fn record(
        &mut self,
        now: u64,
        canary: VersionWindow,
        stable: VersionWindow,
        weight: f64,
        window_ms: u64,
    ) -> Option<Point> {
        if self
            .samples
            .back()
            .is_some_and(|b| now < b.at_ms + SAMPLE_MS)
        {
            return None;
        }
        self.samples.push_back(Sample {
            at_ms: now,
            canary,
            stable,
        });
        // Keep the newest sample at or before `now - window` as the window's base (the
        // controller's analysis trims the same way).
        while self.samples.len() > 2 && self.samples[1].at_ms + window_ms <= now {
            self.samples.pop_front();
        }
        let due = self
            .points
            .back()
            .is_none_or(|p| now >= p.t + STEP_MS || now < p.t);
        if !due {
            return None;
        }
        let (base, last) = (self.samples.front()?, self.samples.back()?);
        let prev = self.last_point_sample.as_ref().unwrap_or(base);
        let secs = (last.at_ms.saturating_sub(prev.at_ms) as f32 / 1000.0).max(f32::EPSILON);
        let point = |last: &VersionWindow, base: &VersionWindow, prev: &VersionWindow| {
            let w = diff(last, base);
            let s = Summary::of(&w);
            let some = w.requests > 0;
            VersionPoint {
                rps: if std::ptr::eq(prev, last) {
                    f32::NAN
                } else {
                    last.requests.saturating_sub(prev.requests) as f32 / secs
                },
                error_rate: if some { s.error_rate as f32 } else { f32::NAN },
                p50_ms: opt(quantile_us(&w.latency, 0.5).map(|us| us / 1000.0)),
                p99_ms: opt(s.p99_ms),
            }
        };
        let p = Point {
            t: now,
            weight: weight as f32,
            canary: point(&last.canary, &base.canary, &prev.canary),
            stable: point(&last.stable, &base.stable, &prev.stable),
        };
        self.last_point_sample = Some(last.clone());
        self.points.push_back(p);
        while self.points.len() > self.capacity() {
            self.points.pop_front();
        }
        Some(p)
    }

    /// Notes a verdict for the markers.
    pub fn verdict(&mut self, v: &Verdict) {
        self.verdicts.push_back(VerdictMark::from(v));
        let oldest = v.at_ms.saturating_sub(self.keep_ms);
        while self.verdicts.front().is_some_and(|m| m.at_ms < oldest) {
            self.verdicts.pop_front();
        }
    }

    /// The points and verdicts of the last `window_ms` before `now`.
    pub fn since(&self, from_ms: u64) -> (Vec<Point>, Vec<VerdictMark>) {
        (
            self.points
                .iter()
                .filter(|p| p.t >= from_ms)
                .copied()
                .collect(),
            self.verdicts
                .iter()
                .filter(|v| v.at_ms >= from_ms)
                .cloned()
                .collect(),
        )
    }

    /// Points held now (for tests and the memory figure).
    pub fn len(&self) -> usize {
        self.points.len()
    }

    /// Whether no point is held.
    pub fn is_empty(&self) -> bool {
        self.points.is_empty()
    }
}

/// One version's columns of a series (uPlot takes columns; `null` for no requests).
#[derive(Debug, Default, Serialize)]
pub struct VersionColumns {
    pub rps: Vec<Option<f64>>,
    pub error_rate: Vec<Option<f64>>,
    pub p50_ms: Vec<Option<f64>>,
    pub p99_ms: Vec<Option<f64>>,
}

fn num(v: f32) -> Option<f64> {
    // Rounded to what f32 holds, so 0.05 prints as 0.05, not 0.05000000074505806.
    v.is_finite()
        .then(|| format!("{v}").parse::<f64>().unwrap_or(f64::from(v)))
}

impl VersionColumns {
    fn push(&mut self, p: &VersionPoint) {
        self.rps.push(num(p.rps));
        self.error_rate.push(num(p.error_rate));
        self.p50_ms.push(num(p.p50_ms));
        self.p99_ms.push(num(p.p99_ms));
    }
}

/// Points as columns: `t`, `weight`, and per version.
#[derive(Debug, Default, Serialize)]
pub struct Columns {
    pub t: Vec<u64>,
    pub weight: Vec<Option<f64>>,
    pub stable: VersionColumns,
    pub canary: VersionColumns,
}

impl Columns {
    pub fn of(points: &[Point]) -> Columns {
        let mut c = Columns::default();
        for p in points {
            c.t.push(p.t);
            c.weight.push(num(p.weight));
            c.stable.push(&p.stable);
            c.canary.push(&p.canary);
        }
        c
    }
}

/// One point as the stream sends it: the same fields as one column of a series.
#[derive(Debug, Serialize)]
pub struct PointView {
    pub route: String,
    pub t: u64,
    pub weight: Option<f64>,
    pub stable: VersionPointView,
    pub canary: VersionPointView,
}

#[derive(Debug, Serialize)]
pub struct VersionPointView {
    pub rps: Option<f64>,
    pub error_rate: Option<f64>,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

impl From<&VersionPoint> for VersionPointView {
    fn from(p: &VersionPoint) -> Self {
        VersionPointView {
            rps: num(p.rps),
            error_rate: num(p.error_rate),
            p50_ms: num(p.p50_ms),
            p99_ms: num(p.p99_ms),
        }
    }
}

impl PointView {
    pub fn new(route: &str, p: &Point) -> PointView {
        PointView {
            route: route.to_string(),
            t: p.t,
            weight: num(p.weight),
            stable: (&p.stable).into(),
            canary: (&p.canary).into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use canary_core::analysis::{judge, AnalysisSpec};
    use canary_core::latency::bucket_index;

    /// Cumulative counters after `n` requests, `f` of them failed, all at `us`.
    fn cum(n: u64, f: u64, us: u64) -> VersionWindow {
        let mut w = VersionWindow {
            requests: n,
            failures: f,
            ..Default::default()
        };
        w.latency[bucket_index(us)] = n;
        w
    }

    #[test]
    fn points_are_the_analysis_numbers_over_the_trailing_window() {
        let mut h = History::new(3_600_000);
        let window = 10_000;
        let mut last = None;
        // 100 req/s on each version; the canary fails 5 of them a second, from t=5 s.
        for s in 0..=20u64 {
            let cf = s.saturating_sub(5) * 5;
            let p = h.record(
                s * 1000,
                cum(s * 100, cf, 20_000),
                cum(s * 100, 0, 2_000),
                25.0,
                window,
            );
            if p.is_some() {
                last = p;
            }
        }
        let p = last.expect("points");
        assert_eq!(p.t, 20_000);
        assert_eq!(p.weight, 25.0);
        assert!((p.canary.rps - 100.0).abs() < 1e-3, "{p:?}");
        // The same window the analysis takes: 10 s → 1000 requests, 50 failed.
        let spec = AnalysisSpec::default();
        let v = judge(
            &spec,
            &diff(&cum(2000, 75, 20_000), &cum(1000, 25, 20_000)),
            &diff(&cum(2000, 0, 2_000), &cum(1000, 0, 2_000)),
            20_000,
        );
        assert_eq!(
            f64::from(p.canary.error_rate),
            v.canary.error_rate as f32 as f64
        );
        assert_eq!(p.canary.p99_ms, v.canary.p99_ms.unwrap() as f32);
        assert_eq!(p.stable.error_rate, 0.0);
        assert!(p.stable.p50_ms > 0.0 && p.stable.p50_ms <= p.stable.p99_ms);
    }

    #[test]
    fn no_requests_is_nan_and_null_in_the_columns() {
        let mut h = History::new(60_000);
        for s in 0..5u64 {
            h.record(s * 1000, cum(0, 0, 0), cum(s * 10, 0, 1_000), 0.0, 60_000);
        }
        let (points, _) = h.since(0);
        let last = points.last().expect("a point");
        assert!(last.canary.error_rate.is_nan() && last.canary.p99_ms.is_nan());
        let c = Columns::of(&points);
        assert_eq!(c.canary.error_rate.last(), Some(&None));
        assert_eq!(c.stable.error_rate.last(), Some(&Some(0.0)));
        assert_eq!(c.t.len(), c.weight.len());
    }

    #[test]
    fn the_ring_is_bounded_by_its_history() {
        let keep = 60_000;
        let mut h = History::new(keep);
        for s in 0..1_000u64 {
            h.record(s * 1000, cum(s, 0, 1_000), cum(s, 0, 1_000), 5.0, 60_000);
        }
        assert_eq!(h.len(), h.capacity());
        assert_eq!(h.capacity(), 31);
        // The cumulative samples stay within one window.
        assert!(h.samples.len() <= 62, "{}", h.samples.len());
        for i in 0..1_000u64 {
            let v = judge(
                &AnalysisSpec::default(),
                &cum(0, 0, 0),
                &cum(0, 0, 0),
                i * 10_000,
            );
            h.verdict(&v);
        }
        assert!(h.verdicts.len() <= 7, "{}", h.verdicts.len());
        // One point per step, never more often.
        let mut h = History::new(keep);
        let n = (0..100u64)
            .filter_map(|i| h.record(i * 250, cum(i, 0, 1), cum(i, 0, 1), 1.0, 60_000))
            .count();
        assert_eq!(n, 13);
    }

    #[test]
    fn the_sizes_in_the_docs_hold() {
        assert_eq!(std::mem::size_of::<Point>(), 48);
        assert_eq!(std::mem::size_of::<Sample>(), 856);
        assert_eq!(std::mem::size_of::<VerdictMark>(), 64);
        assert_eq!(History::new(3_600_000).capacity(), 1_801);
    }
}
