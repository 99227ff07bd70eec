//! The rollout controller: applies configs, drives each route's rollout, answers
//! commands, and persists every decision.
//!
//! It reads the data plane's cumulative counters every tick, keeps a short history
//! of them per route, and takes the difference over the analysis window, so canary
//! and stable are always compared over exactly the same interval. Decisions come from
//! the pure `canary_core::rollout::step`; this module only does the IO around it.
//! The lock here is never taken on the request path.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use canary_config::{Config, RouteConfig};
use canary_core::analysis::{judge, Verdict, VerdictResult, VersionWindow};
use canary_core::rollout::{self, Event, Input, Pause, Phase, Position, RolloutSpec, RolloutState};
use canary_core::Weight;
use canary_proxy::expo::{Exposition, Kind};
use canary_proxy::pool::now_ms as mono_ms;
use canary_proxy::{DataPlaneEvent, Proxy, RouteRuntime};
use serde::Serialize;

use crate::gate::CommandGate;
use crate::state_store::StateStore;
use crate::store::{ManualWeight, Store, StoreError};

/// Wall-clock milliseconds since the Unix epoch: persisted times must survive restarts.
pub fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A user command on a route.
#[derive(Clone, Debug, PartialEq)]
pub enum Command {
    Promote { full: bool },
    Abort { reason: String },
    Pause,
    Resume,
    Retry,
    SetWeight(Weight),
}

/// Why a command failed; the admin API maps each to a status code.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("unknown route {0:?}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("state store: {0}")]
    Store(#[from] StoreError),
}

#[derive(Clone, Debug)]
struct Sample {
    at_ms: u64,
    canary: VersionWindow,
    stable: VersionWindow,
}

struct RouteCtl {
    cfg: RouteConfig,
    runtime: Arc<RouteRuntime>,
    rollout: Option<RolloutState>,
    /// Weight set through the API on a route without a rollout; persisted in
    /// `<route>.weight.json` so a restart does not change the traffic split.
    manual: Option<ManualWeight>,
    samples: VecDeque<Sample>,
    last_verdict_ms: u64,
    verdicts: [u64; 3],
    aborts: BTreeMap<&'static str, u64>,
}

#[derive(Default)]
struct Inner {
    routes: Vec<RouteCtl>,
    applied: bool,
    reloads_ok: u64,
    reloads_failed: u64,
}

/// Cumulative counters of a route's canary and stable, from somewhere other than this
/// process's own data plane: in fleet mode, the sum over every member (`canary-fleet`).
pub trait Evidence: Send + Sync {
    /// `(canary, stable)` cumulative counts of `route`; `None` = use the local counters.
    fn counts(&self, route: &str) -> Option<(VersionWindow, VersionWindow)>;
}

/// The controller; cheap to share behind an `Arc`.
pub struct Controller {
    proxy: Arc<Proxy>,
    store: Arc<dyn StateStore>,
    evidence: Mutex<Option<Arc<dyn Evidence>>>,
    gate: Mutex<Option<Arc<dyn CommandGate>>>,
    inner: Mutex<Inner>,
}

/// One step of a plan, as the API shows it.
#[derive(Clone, Debug, Serialize)]
pub struct StepView {
    pub weight: f64,
    /// `"30s"` or `"manual"`.
    pub pause: String,
}

/// A route as `GET /api/v1/routes/{name}` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct RouteStatus {
    pub name: String,
    pub stable_version: String,
    pub canary_version: Option<String>,
    /// `rollout` (automatic), `manual` (canary, weight from config/API), `stable` (no canary).
    pub mode: &'static str,
    /// Current canary weight in percent.
    pub weight: f64,
    pub phase: Option<Phase>,
    pub step: Option<usize>,
    pub steps: Vec<StepView>,
    pub step_started_ms: Option<u64>,
    pub failed_verdicts: u32,
    pub last_verdict: Option<Verdict>,
    pub abort_reason: Option<String>,
    pub breaker_tripped: bool,
    pub canary_available: Option<bool>,
    pub fallbacks: u64,
    /// After promotion: the version the config should now name as stable.
    pub make_stable: Option<String>,
    pub message: String,
}

fn abort_category(reason: &str) -> &'static str {
    if reason.starts_with("analysis") {
        "analysis"
    } else if reason.starts_with("breaker") {
        "breaker"
    } else if reason.starts_with("canary unhealthy") {
        "canary_unhealthy"
    } else {
        "user"
    }
}

fn fmt_pause(p: Pause) -> String {
    match p {
        Pause::Manual => "manual".into(),
        Pause::For(ms) if ms % 1000 == 0 => format!("{}s", ms / 1000),
        Pause::For(ms) => format!("{ms}ms"),
    }
}

fn diff(a: &VersionWindow, b: &VersionWindow) -> VersionWindow {
    VersionWindow {
        requests: a.requests.saturating_sub(b.requests),
        failures: a.failures.saturating_sub(b.failures),
        latency: std::array::from_fn(|i| a.latency[i].saturating_sub(b.latency[i])),
    }
}

impl Controller {
    pub fn new(proxy: Arc<Proxy>, store: Store) -> Controller {
        Controller::with_store(proxy, Arc::new(store))
    }

    /// A controller persisting through any [`StateStore`] (fleet mode: etcd).
    pub fn with_store(proxy: Arc<Proxy>, store: Arc<dyn StateStore>) -> Controller {
        Controller {
            proxy,
            store,
            evidence: Mutex::new(None),
            gate: Mutex::new(None),
            inner: Mutex::new(Inner::default()),
        }
    }

    pub fn proxy(&self) -> &Arc<Proxy> {
        &self.proxy
    }

    pub fn store(&self) -> &dyn StateStore {
        &*self.store
    }

    /// Takes analysis counters from `evidence` instead of the local data plane.
    pub fn set_evidence(&self, evidence: Arc<dyn Evidence>) {
        *self.evidence.lock().unwrap_or_else(|p| p.into_inner()) = Some(evidence);
    }

    /// Routes the admin API's commands through `gate` (fleet mode).
    pub fn set_gate(&self, gate: Arc<dyn CommandGate>) {
        *self.gate.lock().unwrap_or_else(|p| p.into_inner()) = Some(gate);
    }

    /// The command gate, if one is set.
    pub fn gate(&self) -> Option<Arc<dyn CommandGate>> {
        self.gate.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Fleet mode: takes a route's rollout state and manual weight as the store now
    /// holds them (written by the leader) and puts the data plane in line, without
    /// persisting anything. A breaker tripped here keeps the canary at 0 until the
    /// state is no longer active or is a new attempt.
    pub fn adopt(
        &self,
        route: &str,
        rollout: Option<RolloutState>,
        manual: Option<ManualWeight>,
    ) -> bool {
        let mut inner = self.lock();
        let Some(ctl) = inner.routes.iter_mut().find(|c| c.cfg.route.name == route) else {
            return false;
        };
        if ctl.rollout == rollout && ctl.manual == manual {
            return false;
        }
        let was = ctl.rollout.as_ref().filter(|s| s.phase.is_active());
        // A new attempt (a new version, or a retry of a rollout that was not active)
        // re-arms the breaker; a later step of the same attempt keeps a local trip
        // until the leader has recorded the abort.
        let rearm = rollout.as_ref().is_some_and(|s| {
            s.phase.is_active() && was.is_none_or(|w| w.canary_version != s.canary_version)
        });
        let new_attempt = rearm;
        ctl.rollout = rollout;
        ctl.manual = manual;
        if new_attempt {
            ctl.samples.clear();
        }
        sync_runtime(ctl, rearm);
        true
    }

    /// Fleet mode, on becoming the leader: the analysis starts a fresh window (this
    /// process has no history of the fleet's counters), so the first verdict comes one
    /// interval from now, never from data it did not see.
    pub fn fresh_windows(&self) {
        let now = wall_ms();
        let mut inner = self.lock();
        for ctl in inner.routes.iter_mut() {
            ctl.samples.clear();
            ctl.last_verdict_ms = now;
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a config has been applied (readiness).
    pub fn ready(&self) -> bool {
        self.lock().applied
    }

    /// Counts a rejected reload for `/metrics`.
    pub fn reload_failed(&self) {
        self.lock().reloads_failed += 1;
    }

    /// Applies a validated config: swaps the data plane's snapshot, then starts,
    /// resumes or ends each route's rollout and sets its weight.
    pub fn apply(&self, config: &Config) -> Result<(), ControlError> {
        let now = wall_ms();
        self.proxy.apply(config);
        let mut inner = self.lock();
        let first = !inner.applied;
        let mut old: Vec<RouteCtl> = std::mem::take(&mut inner.routes);
        let mut routes = Vec::with_capacity(config.routes.len());
        // The first error; every route is applied regardless.
        let mut result = Ok(());
        for rc in &config.routes {
            let name = rc.route.name.clone();
            let runtime = self
                .proxy
                .runtime(&name)
                .expect("apply registers every route");
            let prev = old
                .iter()
                .position(|c| c.cfg.route.name == name)
                .map(|i| old.swap_remove(i));
            let (mut ctl, before) = match prev {
                Some(mut p) => {
                    let before = manual_split(&p);
                    let same_versions = p.cfg.stable.version == rc.stable.version
                        && p.cfg.canary.as_ref().map(|c| &c.version)
                            == rc.canary.as_ref().map(|c| &c.version);
                    if !same_versions {
                        p.samples.clear();
                    }
                    p.cfg = rc.clone();
                    p.runtime = runtime;
                    (p, before)
                }
                None => {
                    let loaded = self
                        .store
                        .load_manual(&name)
                        .and_then(|m| Ok((m, self.store.load(&name)?)));
                    let (manual, rollout) = match loaded {
                        Ok(l) => l,
                        Err(e) => {
                            // Unreadable state: no guessing. At startup `serve` refuses
                            // to start; on a reload this route is left out of the
                            // controller (the data plane keeps its weight) and the
                            // other routes are applied.
                            tracing::error!(route = %name, error = %e, "cannot read the route's state");
                            result = result.and(Err(e.into()));
                            continue;
                        }
                    };
                    // Before a restart, a persisted manual weight was the split.
                    let before = manual
                        .as_ref()
                        .map(|m| (m.canary_version.clone(), bp_weight(m.weight_bp)));
                    let ctl = RouteCtl {
                        cfg: rc.clone(),
                        runtime,
                        rollout,
                        manual,
                        samples: VecDeque::new(),
                        last_verdict_ms: 0,
                        verdicts: [0; 3],
                        aborts: BTreeMap::new(),
                    };
                    (ctl, before)
                }
            };
            // A state directory that cannot be written must not lose the route: the
            // controller keeps driving it from memory (see `reconcile`).
            let reconciled = self.reconcile(&mut ctl, now, first, before);
            result = result.and(reconciled);
            routes.push(ctl);
        }
        inner.routes = routes;
        inner.applied = true;
        inner.reloads_ok += u64::from(!first);
        result
    }

    /// Brings a route's rollout (or manual weight) in line with its (new) config.
    /// `before` is the route's split without a rollout before this config (canary
    /// version and weight), to journal what the new config changes.
    fn reconcile(
        &self,
        ctl: &mut RouteCtl,
        now: u64,
        first: bool,
        before: Option<(String, Weight)>,
    ) -> Result<(), ControlError> {
        let name = ctl.cfg.route.name.clone();
        let prev_phase = ctl.rollout.as_ref().map(|s| s.phase);
        // Where the route was before this config, for the `start` entry of a new rollout:
        // the rollout it replaces, else its canary without a rollout, else no canary.
        let prev_position = match (&ctl.rollout, &before) {
            (Some(s), _) => (s.position(), Some(s.canary_version.clone())),
            (None, Some((_, w))) => (Position::manual(*w), None),
            (None, None) => (Position::no_canary(), None),
        };
        let mut events = Vec::new();
        // A manual weight holds only on a route with a canary and no rollout, and only
        // while the file's weight is the one it was set over: the file wins when it
        // changes (also while `canary` was stopped).
        let mut cleared = None;
        // Store errors are reported after the data plane is in line with the new state.
        let mut persisted = Ok(());
        if let Some(m) = &ctl.manual {
            let why = match (&ctl.cfg.canary, &ctl.cfg.rollout) {
                (None, _) => Some("the route has no canary".to_string()),
                (Some(_), Some(_)) => Some("the route has a rollout".to_string()),
                // A share chosen for one build says nothing about the next: a new canary
                // version starts from the file's weight, never from a leftover 100 %.
                (Some(c), None) if c.version != m.canary_version => Some(format!(
                    "the canary version changed from {} to {}",
                    m.canary_version, c.version
                )),
                (Some(_), None) if m.config_weight_bp != ctl.cfg.weight.basis_points() => {
                    Some(format!("the config's weight changed to {}", ctl.cfg.weight))
                }
                _ => None,
            };
            let w = bp_weight(m.weight_bp);
            match why {
                Some(why) => {
                    tracing::info!(route = %name, weight = %w, "manual weight cleared: {why}");
                    cleared = Some(format!("manual weight {w} cleared: {why}"));
                    ctl.manual = None;
                    persisted = persisted.and(self.store.save_manual(&name, None));
                }
                None if first => {
                    tracing::info!(route = %name, weight = %w, "restoring manual weight")
                }
                None => {}
            }
        }
        if let (Some(spec), Some(st)) = (&ctl.cfg.rollout, ctl.rollout.as_mut()) {
            // The plan was shortened under a running rollout: hold at its last step with
            // the current weight (never jump to 100).
            st.step = st.step.min(spec.steps.len().saturating_sub(1));
        }
        match (&ctl.cfg.rollout, &ctl.cfg.canary) {
            (Some(spec), Some(canary)) => match &ctl.rollout {
                Some(s) if s.canary_version == canary.version => {
                    if first {
                        tracing::info!(route = %name, phase = s.phase.as_str(), step = s.step, weight = %s.weight(), "resuming persisted rollout");
                    }
                    // A breaker trip not yet seen by the event loop must not be undone.
                    if ctl.runtime.tripped() && s.phase.is_active() {
                        let failures = ctl
                            .cfg
                            .rollout
                            .as_ref()
                            .and_then(|r| r.breaker_failures)
                            .unwrap_or(0);
                        let out = rollout::step(s, spec, Input::Breaker { failures }, now)
                            .map_err(|e| ControlError::Conflict(e.0))?;
                        events.extend(out.events);
                        ctl.rollout = Some(out.state);
                    }
                }
                _ => {
                    let (mut from, mut replaced) = prev_position;
                    // One edit can make the promoted version stable and bring the next
                    // canary: the first rollout completed, then the new one starts from
                    // a route without a canary.
                    if let Some(old) = ctl.rollout.as_ref().filter(|s| made_stable(s, &ctl.cfg)) {
                        events.push(complete_event(old, now, Position::no_canary()));
                        from = Position::no_canary();
                        replaced = None;
                    }
                    let (s, mut ev) = RolloutState::start(spec, &canary.version, now, from);
                    if let Some(old) = replaced {
                        ev.reason = format!("{}; replaces the rollout of {old}", ev.reason);
                    }
                    tracing::info!(route = %name, version = %canary.version, weight = %s.weight(), "rollout started");
                    events.push(ev);
                    ctl.rollout = Some(s);
                    ctl.samples.clear();
                    ctl.last_verdict_ms = 0;
                }
            },
            (None, Some(_)) | (_, None) => {
                if let Some(s) = ctl.rollout.take() {
                    let done = ctl.cfg.canary.is_none() && made_stable(&s, &ctl.cfg);
                    // The route keeps its canary at the config's weight, or has none.
                    let to = match manual_split(ctl) {
                        Some((_, w)) => Position::manual(w),
                        None => Position::no_canary(),
                    };
                    let ev = if done {
                        complete_event(&s, now, to)
                    } else {
                        Event {
                            at_ms: now,
                            canary_version: s.canary_version.clone(),
                            kind: "end".into(),
                            from: s.position(),
                            to,
                            reason: "rollout removed from config".to_string(),
                            verdict: None,
                        }
                    };
                    tracing::info!(route = %name, "{}", ev.reason);
                    events.push(ev);
                }
            }
        }
        // The journal explains every change of the split, also on routes without a
        // rollout (a rollout's own events explain the rest).
        let after = manual_split(ctl);
        let reason = match (&before, &after) {
            (Some((v0, a)), Some((v1, b))) if a != b || v0 != v1 => {
                let mut why = Vec::new();
                why.extend(cleared.clone());
                if v0 != v1 {
                    why.push(format!("canary version {v0} → {v1}"));
                }
                if cleared.is_none() && a != b {
                    why.push(format!("config weight {a} → {b}"));
                }
                Some(why.join("; "))
            }
            (Some((_, a)), None) if ctl.cfg.canary.is_none() && *a != Weight::ZERO => Some(
                cleared
                    .clone()
                    .unwrap_or_else(|| "canary removed from config".into()),
            ),
            (None, Some((v1, b))) if !first && prev_phase.is_none() && *b != Weight::ZERO => {
                Some(format!("canary {v1} added by config at {b}"))
            }
            _ => None,
        };
        if let Some(reason) = reason {
            let (v0, a) = before.clone().unwrap_or_default();
            let (v1, b) = after.clone().unwrap_or((v0, Weight::ZERO));
            let mut ev = Event::manual_weight(now, &v1, a, b, reason);
            // The canary added or removed: that side had none.
            if before.is_none() {
                ev.from = Position::no_canary();
            }
            if after.is_none() {
                ev.to = Position::no_canary();
            }
            events.push(ev);
        }
        let fresh = prev_phase.is_none() || events.iter().any(|e| e.kind == "start");
        // The data plane first, as in `commit`: a failing disk must not leave the
        // weight of the old config in place.
        sync_runtime(ctl, fresh || first);
        persisted
            .and(self.store.append(&name, &events))
            .and(self.store.save(&name, ctl.rollout.as_ref()))?;
        Ok(())
    }

    /// One controller tick: sample counters, take due verdicts, check canary health,
    /// and step every active rollout.
    pub fn tick(&self) {
        let now = wall_ms();
        let snap = self.proxy.snapshot();
        let mono = mono_ms();
        let evidence = self
            .evidence
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut inner = self.lock();
        for ctl in inner.routes.iter_mut() {
            let (Some(spec), Some(state)) = (ctl.cfg.rollout.clone(), ctl.rollout.clone()) else {
                continue;
            };
            if !state.phase.is_active() {
                continue;
            }
            let Some((_, entry)) = snap.route(&ctl.cfg.route.name) else {
                continue;
            };
            let Some(canary_pool) = &entry.canary else {
                continue;
            };
            let due = now.saturating_sub(ctl.last_verdict_ms) >= spec.interval_ms;
            // One sample a second is plenty for windows of seconds to minutes.
            if due || ctl.samples.back().is_none_or(|b| now >= b.at_ms + 1_000) {
                let (canary, stable) = evidence
                    .as_ref()
                    .and_then(|e| e.counts(&ctl.cfg.route.name))
                    .unwrap_or_else(|| (canary_pool.stats.counts(), entry.stable.stats.counts()));
                ctl.samples.push_back(Sample {
                    at_ms: now,
                    canary,
                    stable,
                });
            }
            while ctl.samples.len() > 2 && ctl.samples[1].at_ms + spec.window_ms <= now {
                ctl.samples.pop_front();
            }
            let mut verdict = None;
            if due {
                let (Some(base), Some(last)) = (ctl.samples.front(), ctl.samples.back()) else {
                    continue;
                };
                let v = judge(
                    &spec.analysis,
                    &diff(&last.canary, &base.canary),
                    &diff(&last.stable, &base.stable),
                    now,
                );
                ctl.verdicts[match v.result {
                    VerdictResult::Pass => 0,
                    VerdictResult::Fail => 1,
                    VerdictResult::Inconclusive => 2,
                }] += 1;
                ctl.last_verdict_ms = now;
                verdict = Some(v);
            }
            let input = if let Some(trip) = pending_trip(ctl) {
                // The breaker tripped and its event is still queued: it wins over this
                // tick, whose promote (last step) would otherwise re-open the canary.
                trip
            } else if state.weight_bp > 0 && !canary_pool.any_available(mono) {
                Input::CanaryUnhealthy
            } else {
                Input::Tick { verdict }
            };
            self.apply_input(ctl, &spec, input, now);
        }
    }

    fn apply_input(&self, ctl: &mut RouteCtl, spec: &RolloutSpec, input: Input, now: u64) {
        let Some(state) = &ctl.rollout else { return };
        let Ok(out) = rollout::step(state, spec, input, now) else {
            return;
        };
        if let Err(e) = self.commit(ctl, out) {
            tracing::error!(route = %ctl.cfg.route.name, error = %e, "could not persist rollout state");
        }
    }

    /// Persists a step's outcome, journals it, and applies it to the data plane.
    fn commit(&self, ctl: &mut RouteCtl, out: rollout::Outcome) -> Result<(), StoreError> {
        let name = ctl.cfg.route.name.clone();
        let was_active = ctl.rollout.as_ref().is_some_and(|s| s.phase.is_active());
        for ev in &out.events {
            if ev.kind == "abort" {
                *ctl.aborts.entry(abort_category(&ev.reason)).or_default() += 1;
                tracing::warn!(route = %name, reason = %ev.reason, "rollout aborted");
            } else {
                tracing::info!(route = %name, kind = %ev.kind, weight = ev.to.weight, phase = ev.to.phase.map_or("-", Phase::as_str), reason = %ev.reason, "rollout");
            }
        }
        let changed = ctl.rollout.as_ref() != Some(&out.state);
        ctl.rollout = Some(out.state);
        // Apply to the data plane first: an abort must cut traffic even if the disk fails.
        let now_active = ctl.rollout.as_ref().is_some_and(|s| s.phase.is_active());
        if now_active && !was_active {
            self.clear_canary_ejections(&name);
        }
        sync_runtime(ctl, now_active && !was_active);
        self.store.append(&name, &out.events)?;
        if changed {
            self.store.save(&name, ctl.rollout.as_ref())?;
        }
        Ok(())
    }

    /// A retried rollout starts with a clean slate: the passive ejections that came with
    /// the failures of the previous attempt would otherwise abort it at once as
    /// `canary unhealthy` (for up to `ejection.max`). If the canary is still broken,
    /// the re-armed breaker catches it again.
    fn clear_canary_ejections(&self, route: &str) {
        let snap = self.proxy.snapshot();
        if let Some(pool) = snap.route(route).and_then(|(_, e)| e.canary.as_ref()) {
            for i in &pool.instances {
                i.clear_ejection();
            }
        }
    }

    /// Handles an event from the data plane.
    pub fn on_event(&self, ev: DataPlaneEvent) {
        let now = wall_ms();
        let mut inner = self.lock();
        let (route, input) = match ev {
            DataPlaneEvent::BreakerTripped { route, failures } => {
                (route, Input::Breaker { failures })
            }
            DataPlaneEvent::CanaryUnavailable { route } => {
                // The failures that tripped the breaker may also have ejected the last
                // canary instance: the breaker is the cause to report.
                if let Some(ctl) = inner.routes.iter_mut().find(|c| c.cfg.route.name == route) {
                    if let (Some(spec), Some(trip)) = (ctl.cfg.rollout.clone(), pending_trip(ctl)) {
                        self.apply_input(ctl, &spec, trip, now);
                        return;
                    }
                }
                // Only an abort if the pool really has no available instance.
                let snap = self.proxy.snapshot();
                let down = snap
                    .route(&route)
                    .and_then(|(_, e)| e.canary.as_ref())
                    .is_some_and(|p| !p.any_available(mono_ms()));
                if !down {
                    return;
                }
                (route, Input::CanaryUnhealthy)
            }
        };
        if let Some(ctl) = inner.routes.iter_mut().find(|c| c.cfg.route.name == route) {
            if let Some(spec) = ctl.cfg.rollout.clone() {
                self.apply_input(ctl, &spec, input, now);
            }
        }
    }

    /// Runs a user command.
    pub fn command(&self, route: &str, cmd: Command) -> Result<RouteStatus, ControlError> {
        let now = wall_ms();
        let mut inner = self.lock();
        let ctl = inner
            .routes
            .iter_mut()
            .find(|c| c.cfg.route.name == route)
            .ok_or_else(|| ControlError::NotFound(route.to_string()))?;
        match (&ctl.cfg.rollout, &ctl.rollout, &ctl.cfg.canary) {
            (Some(spec), Some(_), Some(_)) => {
                let spec = spec.clone();
                if let Some(trip) = pending_trip(ctl) {
                    // The breaker acted first: the command applies to the aborted rollout
                    // (a promote must not re-open a canary that just broke).
                    self.apply_input(ctl, &spec, trip, now);
                }
                let Some(state) = &ctl.rollout else {
                    unreachable!("matched above")
                };
                let input = match cmd.clone() {
                    Command::Promote { full } => Input::Promote { full },
                    Command::Abort { reason } => Input::Abort { reason },
                    Command::Pause => Input::Pause,
                    Command::Resume => Input::Resume,
                    Command::Retry => Input::Retry,
                    Command::SetWeight(w) => Input::SetWeight(w),
                };
                let out = rollout::step(state, &spec, input, now)
                    .map_err(|e| ControlError::Conflict(e.0))?;
                self.commit(ctl, out)?;
            }
            (_, _, Some(canary)) => match cmd {
                Command::SetWeight(w) => {
                    let from = ctl
                        .manual
                        .as_ref()
                        .map_or(ctl.cfg.weight, |m| bp_weight(m.weight_bp));
                    let m = ManualWeight {
                        weight_bp: w.basis_points(),
                        config_weight_bp: ctl.cfg.weight.basis_points(),
                        canary_version: canary.version.clone(),
                        set_ms: now,
                    };
                    // Persisted first: a weight the API confirmed must survive a restart.
                    self.store.save_manual(route, Some(&m))?;
                    let ev = Event::manual_weight(
                        now,
                        &canary.version,
                        from,
                        w,
                        format!(
                            "weight set to {w} by user; kept until the config's weight changes"
                        ),
                    );
                    ctl.manual = Some(m);
                    ctl.runtime.set_weight(w);
                    tracing::info!(route, weight = %w, "weight set by user");
                    self.store.append(route, &[ev])?;
                }
                _ => {
                    return Err(ControlError::Conflict(format!(
                        "route {route:?} has no rollout; only its weight can be set"
                    )))
                }
            },
            (_, _, None) => {
                return Err(ControlError::Conflict(format!(
                    "route {route:?} has no canary"
                )))
            }
        }
        Ok(self.status_of(ctl))
    }

    /// All routes' status, in config order.
    pub fn statuses(&self) -> Vec<RouteStatus> {
        let inner = self.lock();
        inner.routes.iter().map(|c| self.status_of(c)).collect()
    }

    /// One route's status.
    pub fn status(&self, route: &str) -> Option<RouteStatus> {
        let inner = self.lock();
        inner
            .routes
            .iter()
            .find(|c| c.cfg.route.name == route)
            .map(|c| self.status_of(c))
    }

    /// Whether the route exists.
    pub fn has_route(&self, route: &str) -> bool {
        self.lock().routes.iter().any(|c| c.cfg.route.name == route)
    }

    fn status_of(&self, c: &RouteCtl) -> RouteStatus {
        let snap = self.proxy.snapshot();
        let canary_available = snap
            .route(&c.cfg.route.name)
            .and_then(|(_, e)| e.canary.as_ref())
            .map(|p| p.any_available(mono_ms()));
        let s = c.rollout.as_ref();
        let mode = match (&c.cfg.canary, s) {
            (None, _) => "stable",
            (Some(_), Some(_)) => "rollout",
            (Some(_), None) => "manual",
        };
        let make_stable = s
            .filter(|s| s.phase == Phase::Promoted)
            .map(|s| s.canary_version.clone());
        let message = match (s, &c.cfg.canary) {
            (Some(s), _) => match s.phase {
                Phase::Progressing => format!(
                    "step {}/{}: waiting for the pause and a passing analysis",
                    s.step + 1,
                    c.cfg.rollout.as_ref().map_or(0, |r| r.steps.len())
                ),
                Phase::Waiting => format!(
                    "step {}: waiting for `canary promote {}`",
                    s.step + 1,
                    c.cfg.route.name
                ),
                Phase::Paused => format!("paused: `canary resume {}` continues", c.cfg.route.name),
                Phase::Promoted => format!(
                    "promoted: make {} the stable version in the config and remove the canary",
                    s.canary_version
                ),
                Phase::Aborted => format!(
                    "aborted ({}): fix the canary and deploy a new version, or `canary retry {}`",
                    s.abort_reason.as_deref().unwrap_or("?"),
                    c.cfg.route.name
                ),
            },
            (None, Some(_)) if c.manual.is_some() => {
                "canary weight set through the API (until the config's weight changes)".into()
            }
            (None, Some(_)) => "canary weight set by the config".into(),
            (None, None) => "no canary".into(),
        };
        RouteStatus {
            name: c.cfg.route.name.clone(),
            stable_version: c.cfg.stable.version.clone(),
            canary_version: c.cfg.canary.as_ref().map(|p| p.version.clone()),
            mode,
            weight: c.runtime.weight().percent(),
            phase: s.map(|s| s.phase),
            step: s.map(|s| s.step),
            steps: c
                .cfg
                .rollout
                .iter()
                .flat_map(|r| r.steps.iter())
                .map(|st| StepView {
                    weight: st.weight.percent(),
                    pause: fmt_pause(st.pause),
                })
                .collect(),
            step_started_ms: s.map(|s| s.step_started_ms),
            failed_verdicts: s.map_or(0, |s| s.failed_verdicts),
            last_verdict: s.and_then(|s| s.last_verdict.clone()),
            abort_reason: s.and_then(|s| s.abort_reason.clone()),
            breaker_tripped: c.runtime.tripped(),
            canary_available,
            fallbacks: c.runtime.fallbacks(),
            make_stable,
            message,
        }
    }

    /// The journal of a route, oldest first.
    pub fn events(&self, route: &str, limit: usize) -> Result<Vec<Event>, ControlError> {
        if !self.has_route(route) {
            return Err(ControlError::NotFound(route.to_string()));
        }
        Ok(self.store.events(route, limit)?)
    }

    /// Writes the controller's metric families.
    pub fn encode_metrics(&self, e: &mut Exposition) {
        let inner = self.lock();
        e.family(
            "canary_rollout_phase",
            "1 for the current phase of each route's rollout.",
            Kind::Gauge,
        );
        for c in &inner.routes {
            if let Some(s) = &c.rollout {
                for p in Phase::ALL {
                    e.sample(
                        "canary_rollout_phase",
                        &[("route", c.cfg.route.name.as_str()), ("phase", p.as_str())],
                        u8::from(s.phase == p),
                    );
                }
            }
        }
        e.family(
            "canary_rollout_step",
            "Index (0-based) of the current step of each route's rollout.",
            Kind::Gauge,
        );
        for c in &inner.routes {
            if let Some(s) = &c.rollout {
                e.sample(
                    "canary_rollout_step",
                    &[("route", c.cfg.route.name.as_str())],
                    s.step as f64,
                );
            }
        }
        e.family(
            "canary_analysis_verdicts_total",
            "Analysis verdicts by result.",
            Kind::Counter,
        );
        for c in inner.routes.iter().filter(|c| c.cfg.rollout.is_some()) {
            for (i, r) in ["pass", "fail", "inconclusive"].iter().enumerate() {
                e.sample(
                    "canary_analysis_verdicts_total",
                    &[("route", c.cfg.route.name.as_str()), ("result", *r)],
                    c.verdicts[i] as f64,
                );
            }
        }
        e.family(
            "canary_rollout_aborts_total",
            "Rollout aborts by reason (analysis, breaker, canary_unhealthy, user).",
            Kind::Counter,
        );
        for c in inner.routes.iter().filter(|c| c.cfg.rollout.is_some()) {
            for r in ["analysis", "breaker", "canary_unhealthy", "user"] {
                let n = c.aborts.get(r).copied().unwrap_or(0);
                e.sample(
                    "canary_rollout_aborts_total",
                    &[("route", c.cfg.route.name.as_str()), ("reason", r)],
                    n as f64,
                );
            }
        }
        e.family(
            "canary_config_reloads_total",
            "Config reloads by result.",
            Kind::Counter,
        );
        e.sample(
            "canary_config_reloads_total",
            &[("result", "success")],
            inner.reloads_ok as f64,
        );
        e.sample(
            "canary_config_reloads_total",
            &[("result", "failure")],
            inner.reloads_failed as f64,
        );
    }
}

/// The breaker input for a trip the data plane has made but the controller has not
/// handled yet (its event is still queued), if the rollout is still on trial.
fn pending_trip(ctl: &RouteCtl) -> Option<Input> {
    let active = ctl.rollout.as_ref().is_some_and(|s| s.phase.is_active());
    (active && ctl.runtime.tripped()).then(|| Input::Breaker {
        failures: ctl
            .cfg
            .rollout
            .as_ref()
            .and_then(|r| r.breaker_failures)
            .unwrap_or(0),
    })
}

fn bp_weight(bp: u16) -> Weight {
    Weight::from_basis_points(bp).unwrap_or(Weight::ZERO)
}

/// Whether `cfg` names the version of a promoted rollout as stable: it is complete.
fn made_stable(s: &RolloutState, cfg: &RouteConfig) -> bool {
    s.phase == Phase::Promoted && s.canary_version == cfg.stable.version
}

/// The journal entry of a promoted rollout whose version the config now names stable.
fn complete_event(s: &RolloutState, now: u64, to: Position) -> Event {
    Event {
        at_ms: now,
        canary_version: s.canary_version.clone(),
        kind: "complete".into(),
        from: s.position(),
        to,
        reason: format!("{} is now stable: rollout complete", s.canary_version),
        verdict: None,
    }
}

/// The canary version and weight of a route with a canary and no rollout: the manual
/// weight if one is set, else the config's.
fn manual_split(ctl: &RouteCtl) -> Option<(String, Weight)> {
    match (&ctl.cfg.canary, &ctl.rollout) {
        (Some(c), None) => Some((
            c.version.clone(),
            ctl.manual
                .as_ref()
                .map_or(ctl.cfg.weight, |m| bp_weight(m.weight_bp)),
        )),
        _ => None,
    }
}

/// Puts the route's weight and breaker in the data plane in line with its state.
fn sync_runtime(ctl: &RouteCtl, rearm: bool) {
    match (&ctl.rollout, &ctl.cfg.canary) {
        (Some(s), Some(_)) => {
            let limit = ctl
                .cfg
                .rollout
                .as_ref()
                .and_then(|r| r.breaker_failures)
                .unwrap_or(0);
            if !s.phase.is_active() {
                ctl.runtime.arm_breaker(0);
            } else if rearm || !ctl.runtime.tripped() && ctl.runtime.breaker_limit() != limit {
                // Also when a reload changed the limit: the new one applies at once.
                ctl.runtime.arm_breaker(limit);
            }
            ctl.runtime.set_weight(s.weight());
        }
        (None, Some(_)) => {
            ctl.runtime.arm_breaker(0);
            ctl.runtime
                .set_weight(manual_split(ctl).map_or(ctl.cfg.weight, |(_, w)| w));
        }
        (_, None) => {
            ctl.runtime.arm_breaker(0);
            ctl.runtime.set_weight(Weight::ZERO);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One step at 50 % that passes at once (no pause, no minimum sample), breaker at 3.
    const CONFIG: &str = r#"listen: 127.0.0.1:1
routes:
  - name: web
    stable: {version: v1, upstreams: ["127.0.0.1:1"]}
    canary: {version: v2, upstreams: ["127.0.0.1:2"]}
    rollout:
      steps: [{weight: 50, pause: 0}]
      analysis: {min_requests: 0}
      breaker: {consecutive_failures: 3}
"#;

    fn controller() -> (tempfile::TempDir, Controller) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("store");
        let c = Controller::new(Arc::new(Proxy::new()), store);
        let cfg = canary_config::parse("test.yaml", CONFIG).expect("config");
        c.apply(&cfg).expect("apply");
        (dir, c)
    }

    /// Trips the breaker in the data plane. No controller loop runs in these tests, so
    /// the trip's event stays queued, as in the instant before the loop handles it.
    fn trip(c: &Controller) {
        let rt = c.proxy().runtime("web").expect("runtime");
        for _ in 0..3 {
            rt.canary_failure();
        }
        assert!(rt.tripped());
        assert_eq!(rt.weight(), Weight::ZERO);
    }

    #[tokio::test]
    async fn a_reload_that_cannot_write_the_state_dir_keeps_every_route_and_applies_it() {
        let (dir, c) = controller();
        // The journal cannot be appended to: its path is a directory.
        let journal = dir.path().join("web.events.jsonl");
        std::fs::remove_file(&journal).expect("journal of the first rollout");
        std::fs::create_dir(&journal).expect("mkdir");
        // A new canary version starts a new rollout, whose `start` cannot be journaled.
        let cfg = canary_config::parse("test.yaml", &CONFIG.replace("version: v2", "version: v3"))
            .expect("config");
        let err = c.apply(&cfg).expect_err("the journal write fails");
        assert!(matches!(err, ControlError::Store(_)), "{err}");
        let s = c.status("web").expect("the route is still known");
        assert_eq!(s.canary_version.as_deref(), Some("v3"), "{s:?}");
        assert_eq!(
            (s.phase, s.weight),
            (Some(Phase::Progressing), 50.0),
            "{s:?}"
        );
        // Commands still reach it.
        c.command("web", Command::Pause)
            .expect_err("journal still unwritable");
        assert_eq!(c.status("web").expect("status").phase, Some(Phase::Paused));
    }

    /// Fleet mode: a member whose breaker tripped keeps its canary at 0 while the store
    /// still shows the same attempt active, and follows the store again once the leader
    /// recorded the abort and then a retry.
    #[tokio::test]
    async fn adopt_keeps_a_local_trip_until_the_store_shows_the_abort_then_follows_a_retry() {
        let (_dir, c) = controller();
        let active = c.store().load("web").expect("load").expect("state");
        trip(&c);
        let mut later = active.clone();
        later.weight_bp = 7_500;
        assert!(c.adopt("web", Some(later), None));
        assert_eq!(c.status("web").expect("status").weight, 0.0);
        let mut aborted = active.clone();
        aborted.phase = Phase::Aborted;
        aborted.weight_bp = 0;
        assert!(c.adopt("web", Some(aborted.clone()), None));
        let rt = c.proxy().runtime("web").expect("runtime");
        assert!(!rt.tripped());
        assert_eq!(rt.weight(), Weight::ZERO);
        // Adopting what is already held changes nothing.
        assert!(!c.adopt("web", Some(aborted), None));
        let mut retried = active;
        retried.step_started_ms += 1;
        assert!(c.adopt("web", Some(retried), None));
        assert_eq!(rt.weight().percent(), 50.0);
        assert!(rt.breaker_armed());
        assert!(!c.adopt("nope", None, None));
    }

    #[tokio::test]
    async fn a_tick_racing_a_breaker_trip_aborts_instead_of_promoting() {
        let (_dir, c) = controller();
        trip(&c);
        // Let the clock move past the step's start, so the tick's verdict is fresh and
        // would promote.
        std::thread::sleep(std::time::Duration::from_millis(5));
        c.tick();
        let s = c.status("web").expect("status");
        assert_eq!(s.phase, Some(Phase::Aborted), "{s:?}");
        assert!(
            s.abort_reason
                .as_deref()
                .unwrap_or("")
                .starts_with("breaker"),
            "{s:?}"
        );
        assert_eq!(s.weight, 0.0, "{s:?}");
    }

    #[tokio::test]
    async fn a_promote_racing_a_breaker_trip_is_refused_and_the_canary_stays_cut() {
        let (_dir, c) = controller();
        trip(&c);
        let err = c
            .command("web", Command::Promote { full: true })
            .expect_err("promote after a trip");
        assert!(matches!(err, ControlError::Conflict(_)), "{err}");
        let s = c.status("web").expect("status");
        assert_eq!(s.phase, Some(Phase::Aborted), "{s:?}");
        assert_eq!(s.weight, 0.0, "{s:?}");
    }

    fn apply(c: &Controller, text: &str) {
        let cfg = canary_config::parse("test.yaml", text).expect("config");
        c.apply(&cfg).expect("apply");
    }

    fn last_event(c: &Controller) -> Event {
        c.events("web", 1000)
            .expect("events")
            .pop()
            .expect("an entry")
    }

    #[tokio::test]
    async fn a_start_entry_shows_the_state_it_replaces_not_progressing_at_0() {
        let (_dir, c) = controller();
        // The first rollout of a new route: before it, everything went to stable.
        let ev = last_event(&c);
        assert_eq!(
            (ev.kind.as_str(), ev.from.clone()),
            ("start", Position::no_canary())
        );
        c.command(
            "web",
            Command::Abort {
                reason: "bad".into(),
            },
        )
        .expect("abort");
        // A new version after an abort: from aborted at 0 %.
        apply(&c, &CONFIG.replace("version: v2", "version: v3"));
        let ev = last_event(&c);
        assert_eq!(
            (ev.kind.as_str(), ev.canary_version.as_str()),
            ("start", "v3")
        );
        assert_eq!(
            (ev.from.phase, ev.from.step, ev.from.weight),
            (Some(Phase::Aborted), Some(0), 0.0),
            "{ev:?}"
        );
        assert!(ev.reason.contains("replaces the rollout of v2"), "{ev:?}");
        // A new version replacing one in progress: from its step and weight.
        apply(&c, &CONFIG.replace("version: v2", "version: v4"));
        let ev = last_event(&c);
        assert_eq!(ev.canary_version, "v4");
        assert_eq!(
            (ev.from.phase, ev.from.step, ev.from.weight),
            (Some(Phase::Progressing), Some(0), 50.0),
            "{ev:?}"
        );
        // A canary without a rollout that gets one: from its weight.
        // The route without its rollout: v5 as a canary at 20 %.
        let (head, _) = CONFIG.split_once("    rollout:").expect("rollout section");
        let manual = format!(
            "{}    weight: 20\n",
            head.replace("version: v2", "version: v5")
        );
        apply(&c, &manual);
        apply(&c, &CONFIG.replace("version: v2", "version: v5"));
        let ev = last_event(&c);
        let twenty = Weight::from_percent(20.0).expect("weight");
        assert_eq!(ev.kind, "start", "{ev:?}");
        assert_eq!(ev.from, Position::manual(twenty), "{ev:?}");
    }

    #[tokio::test]
    async fn one_edit_that_makes_v2_stable_and_adds_v3_journals_v2_complete_then_v3_start() {
        let (_dir, c) = controller();
        c.command("web", Command::Promote { full: true })
            .expect("promote");
        let next = CONFIG
            .replace("version: v2", "version: v3")
            .replace("version: v1", "version: v2");
        apply(&c, &next);
        let events = c.events("web", 1000).expect("events");
        let n = events.len();
        let (complete, start) = (&events[n - 2], &events[n - 1]);
        assert_eq!(
            (complete.kind.as_str(), complete.canary_version.as_str()),
            ("complete", "v2"),
            "{complete:?}"
        );
        assert_eq!(complete.from.phase, Some(Phase::Promoted), "{complete:?}");
        assert_eq!(complete.to, Position::no_canary(), "{complete:?}");
        assert_eq!(
            (start.kind.as_str(), start.canary_version.as_str()),
            ("start", "v3"),
            "{start:?}"
        );
        assert_eq!(start.from, Position::no_canary(), "{start:?}");
        assert!(!start.reason.contains("replaces"), "{start:?}");
    }

    #[tokio::test]
    async fn a_complete_entry_ends_on_no_canary_not_on_a_manual_0() {
        let (_dir, c) = controller();
        c.command("web", Command::Promote { full: true })
            .expect("promote");
        let stable = "listen: 127.0.0.1:1
routes:
  - name: web
    stable: {version: v2, upstreams: [\"127.0.0.1:2\"]}
";
        apply(&c, stable);
        let ev = last_event(&c);
        assert_eq!(ev.kind, "complete", "{ev:?}");
        assert_eq!(ev.from.phase, Some(Phase::Promoted), "{ev:?}");
        assert_eq!(ev.to, Position::no_canary(), "{ev:?}");
    }
}
