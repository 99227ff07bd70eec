//! Per-route live state shared by the data plane and the controller.
//!
//! Kept by route name across reloads. The weight is an atomic rather than part of
//! the immutable snapshot so that the breaker can cut canary traffic from inside
//! the data path in one store, without waiting on the controller.

use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, AtomicU64, Ordering::Relaxed};

use canary_core::Weight;
use tokio::sync::mpsc::UnboundedSender;

use crate::witness::{Spread, Witness};

/// `trip_clients` when an unreachable canary was among the failures.
const UNREACHABLE: u32 = u32::MAX;

/// Something the data plane tells the controller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DataPlaneEvent {
    /// The breaker cut canary traffic after this many consecutive canary failures,
    /// from this many distinct clients (`None`: an unreachable canary among them).
    BreakerTripped {
        route: String,
        failures: u32,
        clients: Option<u32>,
    },
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
    /// Distinct clients the failures of a run must come from.
    breaker_min_clients: AtomicU32,
    breaker_run: AtomicU32,
    /// The clients behind the current run.
    spread: Spread,
    /// The run reached the limit from too few clients, and that was logged.
    held_logged: AtomicBool,
    tripped: AtomicBool,
    /// The failures and clients of the last trip (for the controller).
    trip_failures: AtomicU32,
    trip_clients: AtomicU32,
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
            breaker_min_clients: AtomicU32::new(1),
            breaker_run: AtomicU32::new(0),
            spread: Spread::default(),
            held_logged: AtomicBool::new(false),
            tripped: AtomicBool::new(false),
            trip_failures: AtomicU32::new(0),
            trip_clients: AtomicU32::new(0),
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

    /// Arms the breaker at `limit` consecutive canary failures (0 disarms) from at
    /// least `min_clients` distinct clients, and clears any previous trip.
    pub fn arm_breaker(&self, limit: u32, min_clients: u32) {
        self.breaker_limit.store(limit, Relaxed);
        self.breaker_min_clients.store(min_clients.max(1), Relaxed);
        self.breaker_run.store(0, Relaxed);
        self.spread.clear();
        self.held_logged.store(false, Relaxed);
        self.tripped.store(false, Relaxed);
        self.unavailable_reported.store(false, Relaxed);
    }

    /// Whether the breaker has tripped since it was last armed.
    pub fn tripped(&self) -> bool {
        self.tripped.load(Relaxed)
    }

    /// The consecutive canary failures the breaker trips at (0 = disarmed), and the
    /// distinct clients they must come from.
    pub fn breaker_limit(&self) -> (u32, u32) {
        (
            self.breaker_limit.load(Relaxed),
            self.breaker_min_clients.load(Relaxed),
        )
    }

    /// The failures and clients of the trip, while tripped.
    pub fn trip(&self) -> Option<(u32, Option<u32>)> {
        self.tripped().then(|| {
            let c = self.trip_clients.load(Relaxed);
            (
                self.trip_failures.load(Relaxed),
                (c != UNREACHABLE).then_some(c),
            )
        })
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
            self.spread.clear();
            self.held_logged.store(false, Relaxed);
        }
    }

    /// A canary request failed, seen by `witness`: at the limit, and once the run's
    /// failures come from enough clients, cut canary traffic at once and tell the
    /// controller.
    #[inline]
    pub fn canary_failure(&self, witness: Witness) {
        let limit = self.breaker_limit.load(Relaxed);
        let run = self.breaker_run.fetch_add(1, Relaxed) + 1;
        if limit == 0 {
            return;
        }
        let clients = self.spread.note(witness);
        if run < limit {
            return;
        }
        let min = self.breaker_min_clients.load(Relaxed);
        if !Spread::enough(clients, min) {
            if !self.held_logged.swap(true, Relaxed) {
                tracing::warn!(route = %self.name, failures = run, clients = clients.unwrap_or(0), min_clients = min, "breaker held: the canary failures come from too few clients");
            }
            return;
        }
        if !self.tripped.swap(true, Relaxed) {
            self.weight_bp.store(0, Relaxed);
            self.trip_failures.store(run, Relaxed);
            self.trip_clients
                .store(clients.unwrap_or(UNREACHABLE), Relaxed);
            tracing::warn!(route = %self.name, failures = run, clients = clients.unwrap_or(0), "breaker tripped: canary traffic stopped");
            let _ = self.events.send(DataPlaneEvent::BreakerTripped {
                route: self.name.clone(),
                failures: run,
                clients,
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
    use crate::witness::ClientId;

    fn client(i: u8) -> Witness {
        let key = [i];
        Witness::Client(ClientId::new([192, 0, 2, i].into(), Some(&key)))
    }

    #[test]
    fn breaker_trips_once_at_the_limit_and_holds_weight_zero() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let r = RouteRuntime::new("web", tx);
        r.set_weight(Weight::from_percent(25.0).unwrap());
        r.arm_breaker(3, 1);
        r.canary_failure(client(1));
        r.canary_failure(client(1));
        r.canary_success();
        r.canary_failure(client(1));
        r.canary_failure(client(1));
        assert_eq!(r.weight().basis_points(), 2500);
        r.canary_failure(client(1));
        assert_eq!(r.weight(), Weight::ZERO);
        r.canary_failure(client(1));
        assert_eq!(
            rx.try_recv().unwrap(),
            DataPlaneEvent::BreakerTripped {
                route: "web".into(),
                failures: 3,
                clients: Some(1),
            }
        );
        assert_eq!(r.trip(), Some((3, Some(1))));
        assert!(rx.try_recv().is_err(), "one event per trip");
        r.set_weight(Weight::FULL);
        assert_eq!(
            r.weight(),
            Weight::ZERO,
            "a tick racing the trip cannot undo it"
        );
        r.arm_breaker(3, 1);
        r.set_weight(Weight::FULL);
        assert_eq!(r.weight(), Weight::FULL);
        assert_eq!(r.trip(), None);
    }

    #[test]
    fn one_client_cannot_trip_the_breaker_however_many_keys_it_sends() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let r = RouteRuntime::new("web", tx);
        r.set_weight(Weight::from_percent(25.0).unwrap());
        r.arm_breaker(5, 3);
        let ip = [198, 51, 100, 9].into();
        for k in 0..100u32 {
            let key = k.to_be_bytes();
            r.canary_failure(Witness::Client(ClientId::new(ip, Some(&key))));
        }
        assert_eq!(r.weight().basis_points(), 2500, "tripped by one client");
        assert!(rx.try_recv().is_err());
        // Two more clients see the canary fail in the same run: it is the canary.
        r.canary_failure(client(1));
        assert_eq!(r.weight().basis_points(), 2500);
        r.canary_failure(client(2));
        assert_eq!(r.weight(), Weight::ZERO);
        assert_eq!(
            rx.try_recv().unwrap(),
            DataPlaneEvent::BreakerTripped {
                route: "web".into(),
                failures: 102,
                clients: Some(3),
            }
        );
    }

    #[test]
    fn an_unreachable_canary_trips_the_breaker_with_one_client() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let r = RouteRuntime::new("web", tx);
        r.set_weight(Weight::FULL);
        r.arm_breaker(3, 3);
        r.canary_failure(client(1));
        r.canary_failure(Witness::Unreachable);
        r.canary_failure(client(1));
        assert_eq!(r.weight(), Weight::ZERO);
        assert!(matches!(
            rx.try_recv(),
            Ok(DataPlaneEvent::BreakerTripped { clients: None, .. })
        ));
    }

    #[test]
    fn disarmed_breaker_never_trips() {
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        let r = RouteRuntime::new("web", tx);
        r.set_weight(Weight::FULL);
        for i in 0..100 {
            r.canary_failure(client(i));
        }
        assert_eq!(r.weight(), Weight::FULL);
    }
}
