//! Per-route live state shared by the data plane and the controller.
//!
//! Kept by route name across reloads. The weight is an atomic rather than part of
//! the immutable snapshot so that the breaker can cut canary traffic from inside
//! the data path in one store, without waiting on the controller.

use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, AtomicU64, Ordering::Relaxed};

use canary_core::Weight;
use tokio::sync::mpsc::UnboundedSender;

/// Something the data plane tells the controller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DataPlaneEvent {
    /// The breaker cut canary traffic after this many consecutive canary failures.
    BreakerTripped { route: String, failures: u32 },
    /// A canary-bound request found no available canary instance.
    CanaryUnavailable { route: String },
}

/// Live state of one route.
#[derive(Debug)]
pub struct RouteRuntime {
    pub name: String,
    weight_bp: AtomicU16,
    /// Consecutive canary failures that trip the breaker; 0 = disarmed.
    breaker_limit: AtomicU32,
    breaker_run: AtomicU32,
    tripped: AtomicBool,
    unavailable_reported: AtomicBool,
    fallbacks: AtomicU64,
    events: UnboundedSender<DataPlaneEvent>,
}

impl RouteRuntime {
    pub fn new(name: &str, events: UnboundedSender<DataPlaneEvent>) -> RouteRuntime {
        RouteRuntime {
            name: name.to_string(),
            weight_bp: AtomicU16::new(0),
            breaker_limit: AtomicU32::new(0),
            breaker_run: AtomicU32::new(0),
            tripped: AtomicBool::new(false),
            unavailable_reported: AtomicBool::new(false),
            fallbacks: AtomicU64::new(0),
            events,
        }
    }

    /// The canary weight requests are routed with now.
    #[inline]
    pub fn weight(&self) -> Weight {
        Weight::from_basis_points(self.weight_bp.load(Relaxed)).unwrap_or(Weight::ZERO)
    }

    /// Sets the weight. While the breaker is tripped the weight stays 0 until
    /// [`arm_breaker`](Self::arm_breaker)
    /// clears the trip, so a controller tick racing a trip cannot undo it.
    pub fn set_weight(&self, w: Weight) {
        if !self.tripped.load(Relaxed) {
            self.weight_bp.store(w.basis_points(), Relaxed);
        }
    }

    /// Arms the breaker at `limit` consecutive canary failures (0 disarms) and clears
    /// any previous trip.
    pub fn arm_breaker(&self, limit: u32) {
        self.breaker_limit.store(limit, Relaxed);
        self.breaker_run.store(0, Relaxed);
        self.tripped.store(false, Relaxed);
        self.unavailable_reported.store(false, Relaxed);
    }

    /// Whether the breaker has tripped since it was last armed.
    pub fn tripped(&self) -> bool {
        self.tripped.load(Relaxed)
    }

    /// The consecutive canary failures the breaker trips at; 0 = disarmed.
    pub fn breaker_limit(&self) -> u32 {
        self.breaker_limit.load(Relaxed)
    }

    /// Whether a rollout is watching this route (breaker armed).
    #[inline]
    pub fn breaker_armed(&self) -> bool {
        self.breaker_limit.load(Relaxed) > 0
    }

    /// A canary request succeeded.
    #[inline]
    pub fn canary_success(&self) {
        if self.breaker_run.load(Relaxed) != 0 {
            self.breaker_run.store(0, Relaxed);
        }
    }

    /// A canary request failed: at the limit, cut canary traffic at once and tell the
    /// controller.
    #[inline]
    pub fn canary_failure(&self) {
        let limit = self.breaker_limit.load(Relaxed);
        let run = self.breaker_run.fetch_add(1, Relaxed) + 1;
        if limit > 0 && run >= limit && !self.tripped.swap(true, Relaxed) {
            self.weight_bp.store(0, Relaxed);
            tracing::warn!(route = %self.name, failures = run, "breaker tripped: canary traffic stopped");
            let _ = self.events.send(DataPlaneEvent::BreakerTripped {
                route: self.name.clone(),
                failures: run,
            });
        }
    }

    /// A canary-bound request went to stable for lack of an available canary instance.
    pub fn fallback(&self) {
        self.fallbacks.fetch_add(1, Relaxed);
        if self.breaker_armed() && !self.unavailable_reported.swap(true, Relaxed) {
            let _ = self.events.send(DataPlaneEvent::CanaryUnavailable {
                route: self.name.clone(),
            });
        }
    }

    pub fn fallbacks(&self) -> u64 {
        self.fallbacks.load(Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn breaker_trips_once_at_the_limit_and_holds_weight_zero() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let r = RouteRuntime::new("web", tx);
        r.set_weight(Weight::from_percent(25.0).unwrap());
        r.arm_breaker(3);
        r.canary_failure();
        r.canary_failure();
        r.canary_success();
        r.canary_failure();
        r.canary_failure();
        assert_eq!(r.weight().basis_points(), 2500);
        r.canary_failure();
        assert_eq!(r.weight(), Weight::ZERO);
        r.canary_failure();
        assert_eq!(
            rx.try_recv().unwrap(),
            DataPlaneEvent::BreakerTripped {
                route: "web".into(),
                failures: 3
            }
        );
        assert!(rx.try_recv().is_err(), "one event per trip");
        r.set_weight(Weight::FULL);
        assert_eq!(
            r.weight(),
            Weight::ZERO,
            "a tick racing the trip cannot undo it"
        );
        r.arm_breaker(3);
        r.set_weight(Weight::FULL);
        assert_eq!(r.weight(), Weight::FULL);
    }

    #[test]
    fn disarmed_breaker_never_trips() {
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        let r = RouteRuntime::new("web", tx);
        r.set_weight(Weight::FULL);
        for _ in 0..100 {
            r.canary_failure();
        }
        assert_eq!(r.weight(), Weight::FULL);
    }
}
