//! The rollout controller: applies configs, drives each route's rollout, answers
//! commands, and persists every decision.
//!
//! It reads the data plane's cumulative counters every tick, keeps a short history
//! of them per route, and takes the difference over the analysis window, so canary
//! and stable are always compared over exactly the same interval. Decisions come from
//! the pure `canary_core::rollout::step`; this module only does the IO around it.
//! The lock here is never taken on the request path.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use canary_config::{Config, RouteConfig};
use canary_core::analysis::{
    checks, judge, AnalysisSpec, Check, Verdict, VerdictResult, VersionWindow,
};
use canary_core::rollout::{self, Event, Input, Pause, Phase, Position, RolloutSpec, RolloutState};
use canary_core::Weight;
use canary_proxy::expo::{Exposition, Kind};
use canary_proxy::{DataPlaneEvent, RouteRuntime};
use serde::Serialize;

use crate::gate::CommandGate;
use crate::history::{self, History, PointView};
use crate::live::{Live, Update};
use crate::plane::DataPlane;
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
    /// Go to the next step now; with `full`, straight to 100 % (promoted).
    Promote {
        /// Skip the remaining steps.
        full: bool,
    },
    /// Abort the rollout: weight 0 until a new canary version or `Retry`.
    Abort {
        /// Why, for the journal and `canary status`.
        reason: String,
    },
    /// Hold the rollout at its current step and weight.
    Pause,
    /// Continue a paused rollout.
    Resume,
    /// Start an aborted rollout again from its first step.
    Retry,
    /// Set the canary weight by hand (a rollout is paused by it).
    SetWeight(Weight),
}

/// Why a command failed; the admin API maps each to a status code.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// No route of that name (404).
    #[error("unknown route {0:?}")]
    NotFound(String),
    /// The route's state refuses the command, e.g. promoting an aborted rollout (409).
    #[error("{0}")]
    Conflict(String),
    /// The state directory could not be read or written (500).
    // No `#[from]`: that would make the store error this one's `source()` too, and a
    // chain printer (anyhow's `{:#}`) would print it twice.
    #[error("state store: {0}")]
    Store(StoreError),
    /// A change that could not be saved was not made (see `Controller::commit`).
    #[error("nothing changed: the new state could not be saved: {0}")]
    NotSaved(StoreError),
}

impl ControlError {
    /// The HTTP status the admin API answers this error with.
    pub fn http_status(&self) -> u16 {
        match self {
            ControlError::NotFound(_) => 404,
            ControlError::Conflict(_) => 409,
            ControlError::Store(_) => 500,
            ControlError::NotSaved(_) => 503,
        }
    }
}

impl From<StoreError> for ControlError {
    fn from(e: StoreError) -> Self {
        ControlError::Store(e)
    }
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
    /// The state in memory is not the one on disk: the error of the last attempt to
    /// save it and when that was (wall ms). The controller tries again every
    /// [`SAVE_RETRY_MS`] until it is saved.
    unsaved: Option<(String, u64)>,
    /// The dashboard's chart points (routes with a canary).
    history: History,
    /// What live viewers last saw of the status, to send only changes.
    seen: Option<String>,
}

/// How often an unsaved rollout state is written again.
const SAVE_RETRY_MS: u64 = 5_000;

#[derive(Default)]
struct Inner {
    routes: Vec<RouteCtl>,
    applied: bool,
    reloads_ok: u64,
    reloads_failed: u64,
    /// `dashboard.history` of the applied config.
    history_ms: u64,
}

/// Cumulative counters of a route's canary and stable, from somewhere other than this
/// process's own data plane: in fleet mode, the sum over every member (`canary-fleet`).
pub trait Evidence: Send + Sync {
    /// `(canary, stable)` cumulative counts of `route`; `None` = use the local counters.
    fn counts(&self, route: &str) -> Option<(VersionWindow, VersionWindow)>;
}

/// The controller; cheap to share behind an `Arc`.
pub struct Controller {
    /// The data plane: the proxy in the binary, an application's layer when embedded.
    proxy: Arc<dyn DataPlane>,
    store: Arc<dyn StateStore>,
    evidence: Mutex<Option<Arc<dyn Evidence>>>,
    gate: Mutex<Option<Arc<dyn CommandGate>>>,
    inner: Mutex<Inner>,
    /// Writes to the state directory that failed (state files and journal).
    write_failures: AtomicU64,
    live: Live,
}

/// One step of a plan, as the API shows it.
#[derive(Clone, Debug, Serialize)]
pub struct StepView {
    /// The step's canary weight in percent.
    pub weight: f64,
    /// `"30s"` or `"manual"`.
    pub pause: String,
}

/// A route as `GET /api/v1/routes/{name}` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct RouteStatus {
    /// The route's name.
    pub name: String,
    /// The stable version's label.
    pub stable_version: String,
    /// The canary version's label; `None` without a canary.
    pub canary_version: Option<String>,
    /// `rollout` (automatic), `manual` (canary, weight from config/API), `stable` (no canary).
    pub mode: &'static str,
    /// Current canary weight in percent.
    pub weight: f64,
    /// The rollout's phase; `None` without a rollout.
    pub phase: Option<Phase>,
    /// The current step (0-based); `None` without a rollout.
    pub step: Option<usize>,
    /// The rollout's plan.
    pub steps: Vec<StepView>,
    /// When the current step began (ms since the Unix epoch).
    pub step_started_ms: Option<u64>,
    /// Consecutive failed verdicts.
    pub failed_verdicts: u32,
    /// The latest analysis verdict.
    pub last_verdict: Option<Verdict>,
    /// Why the rollout was aborted.
    pub abort_reason: Option<String>,
    /// Whether the breaker holds canary traffic at 0 now.
    pub breaker_tripped: bool,
    /// Why the route's current state is not saved in `state_dir` (it holds in memory
    /// and is written again every few seconds); `None` when it is saved.
    pub unsaved: Option<String>,
    /// Whether the canary can take requests; `None` without a canary.
    pub canary_available: Option<bool>,
    /// Canary-bound requests sent to stable for lack of an available canary.
    pub fallbacks: u64,
    /// After promotion: the version the config should now name as stable.
    pub make_stable: Option<String>,
    /// What the route is doing and what to do next, in a sentence.
    pub message: String,
    /// The commands the API accepts now (`promote`, `promote_full`, `pause`, `resume`,
    /// `abort`, `retry`, `weight`): each is one the rollout's state machine would not
    /// refuse with 409, so the dashboard never copies the rules.
    pub actions: Vec<&'static str>,
    /// The rollout's analysis settings (`null` without a rollout).
    pub analysis: Option<AnalysisView>,
    /// Every check of `last_verdict`, with canary value, stable value, limit and result.
    pub last_verdict_checks: Vec<Check>,
    /// Each instance of each pool.
    pub pools: Pools,
}

/// A rollout's analysis settings, as the API shows them.
#[derive(Clone, Debug, Serialize)]
pub struct AnalysisView {
    pub interval_ms: u64,
    pub window_ms: u64,
    pub min_requests: u64,
    pub max_error_rate: Option<f64>,
    pub max_p99_latency_ms: Option<f64>,
    pub max_error_rate_increase: Option<f64>,
    pub max_latency_increase: Option<f64>,
    pub latency_noise_floor_ms: f64,
    pub failure_limit: u32,
    /// `breaker.consecutive_failures`; `null` when the breaker is off.
    pub breaker_failures: Option<u32>,
    /// `breaker.min_clients`; `null` when the breaker is off.
    pub breaker_min_clients: Option<u32>,
}

impl AnalysisView {
    fn of(r: &RolloutSpec) -> AnalysisView {
        let a: &AnalysisSpec = &r.analysis;
        AnalysisView {
            interval_ms: r.interval_ms,
            window_ms: r.window_ms,
            min_requests: a.min_requests,
            max_error_rate: a.max_error_rate,
            max_p99_latency_ms: a.max_p99_latency_ms,
            max_error_rate_increase: a.max_error_rate_increase,
            max_latency_increase: a.max_latency_increase,
            latency_noise_floor_ms: a.latency_noise_floor_ms,
            failure_limit: a.failure_limit,
            breaker_failures: r.breaker.map(|b| b.consecutive_failures),
            breaker_min_clients: r.breaker.map(|b| b.min_clients),
        }
    }
}

/// The instances of a route's pools.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Pools {
    pub stable: Vec<InstanceView>,
    pub canary: Vec<InstanceView>,
}

/// One instance: whether it takes requests, and why not.
#[derive(Clone, Debug, Serialize)]
pub struct InstanceView {
    pub upstream: String,
    /// Takes requests now (not ejected, health check passing).
    pub available: bool,
    /// Held out by passive ejection.
    pub ejected: bool,
    /// The active health check's view (true without a health check).
    pub check_healthy: bool,
    pub ejections: u64,
}

pub(crate) fn instances(pool: Option<&canary_proxy::pool::Pool>, mono: u64) -> Vec<InstanceView> {
    pool.map(|p| {
        p.instances
            .iter()
            .map(|i| InstanceView {
                upstream: i.addr.clone(),
                available: i.available(mono),
                ejected: i.ejected(mono),
                check_healthy: i.check_healthy(),
                ejections: i.ejections_total(),
            })
            .collect()
    })
    .unwrap_or_default()
}

/// A route's chart data, as `GET /api/v1/routes/{name}/series` sends it.
#[derive(Debug, Serialize)]
pub struct Series {
    pub route: String,
    pub step_ms: u64,
    /// The trailing window of `error_rate` and `p*_ms`.
    pub analysis_window_ms: u64,
    /// How far back the ring reaches (`dashboard.history`).
    pub history_ms: u64,
    #[serde(flatten)]
    pub columns: history::Columns,
    pub verdicts: Vec<history::VerdictMark>,
}

/// The commands the state machine accepts for this rollout now: tried on the pure
/// `rollout::step`, which is where the 409 rules live.
fn rollout_actions(s: &RolloutState, spec: &RolloutSpec, now: u64) -> Vec<&'static str> {
    let tries: [(&'static str, Input); 7] = [
        ("promote", Input::Promote { full: false }),
        ("promote_full", Input::Promote { full: true }),
        ("pause", Input::Pause),
        ("resume", Input::Resume),
        (
            "abort",
            Input::Abort {
                reason: String::new(),
            },
        ),
        ("retry", Input::Retry),
        ("weight", Input::SetWeight(Weight::ZERO)),
    ];
    tries
        .into_iter()
        .filter(|(_, input)| rollout::step(s, spec, input.clone(), now).is_ok())
        .map(|(name, _)| name)
        .collect()
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
    /// A controller driving `proxy` (any [`DataPlane`]: the binary's `Proxy`, or an
    /// embedding application's layer), persisting into `store`.
    pub fn new<P: DataPlane>(proxy: Arc<P>, store: Store) -> Controller {
        Controller::with_store(proxy, Arc::new(store))
    }

    /// A controller persisting through any [`StateStore`] (fleet mode: etcd).
    pub fn with_store<P: DataPlane>(proxy: Arc<P>, store: Arc<dyn StateStore>) -> Controller {
        Controller {
            proxy,
            store,
            evidence: Mutex::new(None),
            gate: Mutex::new(None),
            inner: Mutex::new(Inner::default()),
            write_failures: AtomicU64::new(0),
            live: Live::default(),
        }
    }

    /// The data plane this controller drives.
    pub fn proxy(&self) -> &Arc<dyn DataPlane> {
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

    /// A new live viewer of status changes, chart points and journal entries.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Update> {
        self.live.subscribe()
    }

    /// Appends to a route's journal and tells live viewers.
    /// Live viewers hear of the entries even when the disk fails: the change they
    /// describe stands (the failed write is logged and counted by the caller).
    fn journal(&self, route: &str, events: &[Event]) -> Result<(), StoreError> {
        let written = self.store.append(route, events);
        for e in events {
            self.live
                .send(Update::Event(route.to_string(), Arc::new(e.clone())));
        }
        written
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
        inner.history_ms = config.dashboard.history_ms;
        let history_ms = inner.history_ms;
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
                        p.history.clear();
                    }
                    p.cfg = rc.clone();
                    p.runtime = runtime;
                    (p, before)
                }
                None => {
                    let loaded = self
                        .store
                        .load_manual(&name)
                        .and_then(|m| Ok((m, self.store.load(&name)?)))
                        .and_then(|(m, s)| {
                            self.check_loaded(rc, s.as_ref(), now)?;
                            Ok((m, s))
                        });
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
                        unsaved: None,
                        history: History::new(history_ms),
                        seen: None,
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
                    if let Some(trip) = pending_trip(ctl) {
                        let out = rollout::step(s, spec, trip, now)
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
        let journaled = self.wrote(persisted.and(self.journal(&name, &events)));
        let saved = self.save_state(ctl, now);
        journaled.and(saved)?;
        Ok(())
    }

    /// Refuses a persisted rollout that is about to be resumed but cannot be true (a
    /// step beyond the plan, a step that starts in the future), like a corrupt file.
    /// A state for another canary version is not resumed (a new rollout replaces it),
    /// so its step is not held against the new plan.
    fn check_loaded(
        &self,
        rc: &RouteConfig,
        s: Option<&RolloutState>,
        now: u64,
    ) -> Result<(), StoreError> {
        let (Some(s), Some(spec), Some(canary)) = (s, &rc.rollout, &rc.canary) else {
            return Ok(());
        };
        if s.canary_version != canary.version {
            return Ok(());
        }
        s.check(spec, now).map_err(|reason| StoreError::Invalid {
            path: self.store.state_path(&rc.route.name),
            reason,
        })
    }

    /// Counts and logs a failed write to the state directory, and passes it on.
    fn wrote(&self, r: Result<(), StoreError>) -> Result<(), StoreError> {
        if let Err(e) = &r {
            self.write_failures.fetch_add(1, Relaxed);
            tracing::error!(error = %e, "cannot write to the state directory");
        }
        r
    }

    /// Saves the route's rollout state; on failure the route is marked unsaved (status,
    /// `canary_state_unsaved`) and [`tick`](Self::tick) tries again.
    fn save_state(&self, ctl: &mut RouteCtl, now: u64) -> Result<(), StoreError> {
        let r = self.wrote(self.store.save(&ctl.cfg.route.name, ctl.rollout.as_ref()));
        match &r {
            Ok(()) => {
                if ctl.unsaved.take().is_some() {
                    tracing::info!(route = %ctl.cfg.route.name, "rollout state saved again");
                }
            }
            Err(e) => ctl.unsaved = Some((e.to_string(), now)),
        }
        r
    }

    /// Writes an unsaved state again, at most every [`SAVE_RETRY_MS`].
    fn retry_save(&self, ctl: &mut RouteCtl, now: u64) {
        if ctl
            .unsaved
            .as_ref()
            .is_some_and(|(_, at)| now >= at.saturating_add(SAVE_RETRY_MS))
        {
            let _ = self.save_state(ctl, now);
        }
    }

    /// One controller tick: sample counters, take due verdicts, check canary health,
    /// and step every active rollout.
    pub fn tick(&self) {
        let now = wall_ms();
        let evidence = self
            .evidence
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut inner = self.lock();
        for ctl in inner.routes.iter_mut() {
            self.retry_save(ctl, now);
            self.chart(ctl, now);
            let (Some(spec), Some(state)) = (ctl.cfg.rollout.clone(), ctl.rollout.clone()) else {
                continue;
            };
            if !state.phase.is_active() {
                continue;
            }
            let Some((canary, stable)) = self.proxy.counts(&ctl.cfg.route.name) else {
                continue;
            };
            let due = now.saturating_sub(ctl.last_verdict_ms) >= spec.interval_ms;
            // One sample a second is plenty for windows of seconds to minutes.
            if due || ctl.samples.back().is_none_or(|b| now >= b.at_ms + 1_000) {
                let (canary, stable) = evidence
                    .as_ref()
                    .and_then(|e| e.counts(&ctl.cfg.route.name))
                    .unwrap_or((canary, stable));
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
                ctl.history.verdict(&v);
                verdict = Some(v);
            }
            let input = if let Some(trip) = pending_trip(ctl) {
                // The breaker tripped and its event is still queued: it wins over this
                // tick, whose promote (last step) would otherwise re-open the canary.
                trip
            } else if state.weight_bp > 0
                && self.proxy.canary_available(&ctl.cfg.route.name) == Some(false)
            {
                Input::CanaryUnhealthy
            } else {
                Input::Tick { verdict }
            };
            self.apply_input(ctl, &spec, input, now);
        }
        for ctl in inner.routes.iter_mut() {
            self.tell_status(ctl);
        }
    }

    /// Takes the dashboard's chart sample of a route with a canary (every route, with
    /// or without a rollout) and sends a new point to live viewers.
    fn chart(&self, ctl: &mut RouteCtl, now: u64) {
        let Some((canary, stable)) = self.proxy.counts(&ctl.cfg.route.name) else {
            return;
        };
        let window = ctl
            .cfg
            .rollout
            .as_ref()
            .map_or(history::DEFAULT_WINDOW_MS, |r| r.window_ms);
        let point = ctl
            .history
            .record(now, canary, stable, ctl.runtime.weight().percent(), window);
        if let Some(p) = point {
            self.live.send(Update::Point(Arc::new(PointView::new(
                &ctl.cfg.route.name,
                &p,
            ))));
        }
    }

    /// Tells live viewers when what a route's status shows has changed.
    fn tell_status(&self, ctl: &mut RouteCtl) {
        let now = serde_json::to_string(&self.status_of(ctl)).ok();
        if now != ctl.seen {
            ctl.seen = now;
            self.live.send(Update::Status(ctl.cfg.route.name.clone()));
        }
    }

    /// A route's chart points and verdict markers of the last `window_ms`.
    pub fn series(&self, route: &str, window_ms: u64) -> Option<Series> {
        let inner = self.lock();
        let ctl = inner.routes.iter().find(|c| c.cfg.route.name == route)?;
        let (points, verdicts) = ctl.history.since(wall_ms().saturating_sub(window_ms));
        Some(Series {
            route: route.to_string(),
            step_ms: history::STEP_MS,
            analysis_window_ms: ctl
                .cfg
                .rollout
                .as_ref()
                .map_or(history::DEFAULT_WINDOW_MS, |r| r.window_ms),
            history_ms: inner.history_ms,
            columns: history::Columns::of(&points),
            verdicts,
        })
    }

    fn apply_input(&self, ctl: &mut RouteCtl, spec: &RolloutSpec, input: Input, now: u64) {
        let Some(state) = &ctl.rollout else { return };
        let Ok(out) = rollout::step(state, spec, input, now) else {
            return;
        };
        // A failure is logged where it happens; an unsaved raise is simply tried again
        // at the next tick.
        let _ = self.commit(ctl, out, now);
    }

    /// Persists a step's outcome, journals it, and applies it to the data plane.
    ///
    /// Fails only when nothing changed, so an answer never denies a change that was
    /// made. A change that gives the canary more (a higher weight, promotion, a retry)
    /// is saved first and made only once saved: made but unsaved, a restart would take
    /// it back and move users from the canary to stable. Any other change (an abort, a
    /// pause, a failed verdict) is made first and saved after, so a failing disk cannot
    /// keep a broken canary serving; if that save fails the change holds, the route is
    /// marked unsaved and the save is tried again (see [`save_state`](Self::save_state)).
    fn commit(
        &self,
        ctl: &mut RouteCtl,
        out: rollout::Outcome,
        now: u64,
    ) -> Result<(), ControlError> {
        let name = ctl.cfg.route.name.clone();
        let changed = ctl.rollout.as_ref() != Some(&out.state);
        let first = changed
            && ctl
                .rollout
                .as_ref()
                .is_some_and(|old| gives_canary_more(old, &out.state));
        if first {
            if let Err(e) = self.wrote(self.store.save(&name, Some(&out.state))) {
                return Err(ControlError::NotSaved(e));
            }
        }
        let was_active = ctl.rollout.as_ref().is_some_and(|s| s.phase.is_active());
        for ev in &out.events {
            if ev.kind == "abort" {
                *ctl.aborts.entry(abort_category(&ev.reason)).or_default() += 1;
                // `?`: quoted and escaped, so a reason sent through the API cannot forge
                // a log line.
                tracing::warn!(route = %name, reason = ?ev.reason, "rollout aborted");
            } else {
                tracing::info!(route = %name, kind = %ev.kind, weight = ev.to.weight, phase = ev.to.phase.map_or("-", Phase::as_str), reason = ?ev.reason, "rollout");
            }
        }
        let changed = ctl.rollout.as_ref() != Some(&out.state);
        ctl.rollout = Some(out.state);
        // Apply to the data plane first: an abort must cut traffic even if the disk fails.
        let now_active = ctl.rollout.as_ref().is_some_and(|s| s.phase.is_active());
        if now_active && !was_active {
            // A retried rollout is judged on fresh evidence only, as a new version is:
            // the samples from before the abort hold the failures that caused it.
            ctl.samples.clear();
            ctl.last_verdict_ms = 0;
            self.clear_canary_ejections(&name);
        }
        sync_runtime(ctl, now_active && !was_active);
        if first {
            if ctl.unsaved.take().is_some() {
                tracing::info!(route = %name, "rollout state saved again");
            }
        } else if changed {
            let _ = self.save_state(ctl, now);
        }
        // A lost journal entry is logged and counted; the change it describes stands.
        let _ = self.wrote(self.journal(&name, &out.events));
        Ok(())
    }

    /// A retried rollout starts with a clean slate: the passive ejections that came with
    /// the failures of the previous attempt would otherwise abort it at once as
    /// `canary unhealthy` (for up to `ejection.max`). If the canary is still broken,
    /// the re-armed breaker catches it again.
    fn clear_canary_ejections(&self, route: &str) {
        self.proxy.clear_canary_ejections(route);
    }

    /// Handles an event from the data plane.
    pub fn on_event(&self, ev: DataPlaneEvent) {
        let now = wall_ms();
        let mut inner = self.lock();
        let (route, input) = match ev {
            DataPlaneEvent::BreakerTripped {
                route,
                failures,
                clients,
            } => (route, Input::Breaker { failures, clients }),
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
                let down = self.proxy.canary_available(&route) == Some(false);
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
                self.commit(ctl, out, now)?;
            }
            (_, _, Some(canary)) => match cmd {
                Command::SetWeight(w) => {
                    let from = ctl
                        .manual
                        .as_ref()
                        .map_or(ctl.cfg.weight, |m| bp_weight(m.weight_bp));
                    if from == w {
                        // The split is already this: nothing to save or journal.
                        return Ok(self.status_of(ctl));
                    }
                    let m = ManualWeight {
                        weight_bp: w.basis_points(),
                        config_weight_bp: ctl.cfg.weight.basis_points(),
                        canary_version: canary.version.clone(),
                        set_ms: now,
                    };
                    // Persisted first: a weight the API confirmed must survive a restart.
                    self.wrote(self.store.save_manual(route, Some(&m)))
                        .map_err(ControlError::NotSaved)?;
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
                    let _ = self.wrote(self.journal(route, &[ev]));
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
        let canary_available = self.proxy.canary_available(&c.cfg.route.name);
        let pools = self.proxy.pools(&c.cfg.route.name);
        let actions = match (&c.cfg.canary, &c.rollout, &c.cfg.rollout) {
            (None, _, _) => Vec::new(),
            (Some(_), Some(s), Some(spec)) => rollout_actions(s, spec, wall_ms()),
            (Some(_), _, _) => vec!["weight"],
        };
        let analysis = c.cfg.rollout.as_ref().map(AnalysisView::of);
        let last_verdict_checks = match (
            &c.cfg.rollout,
            c.rollout.as_ref().and_then(|s| s.last_verdict.as_ref()),
        ) {
            (Some(r), Some(v)) => checks(&r.analysis, &v.canary, &v.stable),
            _ => Vec::new(),
        };
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
            unsaved: c.unsaved.as_ref().map(|(e, _)| e.clone()),
            canary_available,
            fallbacks: c.runtime.fallbacks(),
            make_stable,
            message,
            actions,
            analysis,
            last_verdict_checks,
            pools,
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
            "canary_state_write_failures_total",
            "Writes to state_dir (state files, journal) that failed.",
            Kind::Counter,
        );
        e.sample(
            "canary_state_write_failures_total",
            &[],
            self.write_failures.load(Relaxed) as f64,
        );
        e.family(
            "canary_state_unsaved",
            "1 while a route's state in memory could not be saved to state_dir.",
            Kind::Gauge,
        );
        for c in &inner.routes {
            e.sample(
                "canary_state_unsaved",
                &[("route", c.cfg.route.name.as_str())],
                u8::from(c.unsaved.is_some()),
            );
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

/// Whether going from `old` to `new` gives the canary more than it had: more traffic,
/// the end of its trial (promotion), or a new trial (retry).
fn gives_canary_more(old: &RolloutState, new: &RolloutState) -> bool {
    new.weight_bp > old.weight_bp
        || (new.phase == Phase::Promoted && old.phase != Phase::Promoted)
        || (new.phase.is_active() && !old.phase.is_active())
}

/// The breaker input for a trip the data plane has made but the controller has not
/// handled yet (its event is still queued), if the rollout is still on trial.
fn pending_trip(ctl: &RouteCtl) -> Option<Input> {
    let active = ctl.rollout.as_ref().is_some_and(|s| s.phase.is_active());
    let (failures, clients) = ctl.runtime.trip().filter(|_| active)?;
    Some(Input::Breaker { failures, clients })
}

/// The route's breaker as the data plane takes it: (consecutive failures, 0 = off;
/// distinct clients).
fn breaker_limit(ctl: &RouteCtl) -> (u32, u32) {
    ctl.cfg
        .rollout
        .as_ref()
        .and_then(|r| r.breaker)
        .map_or((0, 1), |b| (b.consecutive_failures, b.min_clients))
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
            let (limit, min_clients) = breaker_limit(ctl);
            if !s.phase.is_active() {
                ctl.runtime.arm_breaker(0, 1);
            } else if rearm
                || !ctl.runtime.tripped() && ctl.runtime.breaker_limit() != (limit, min_clients)
            {
                // Also when a reload changed the limit: the new one applies at once.
                ctl.runtime.arm_breaker(limit, min_clients);
            }
            ctl.runtime.set_weight(s.weight());
        }
        (None, Some(_)) => {
            ctl.runtime.arm_breaker(0, 1);
            ctl.runtime
                .set_weight(manual_split(ctl).map_or(ctl.cfg.weight, |(_, w)| w));
        }
        (_, None) => {
            ctl.runtime.arm_breaker(0, 1);
            ctl.runtime.set_weight(Weight::ZERO);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use canary_proxy::Proxy;

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
        let (dir, c, _) = controller_and_proxy();
        (dir, c)
    }

    /// A controller over a proxy the test can also reach directly.
    fn controller_and_proxy() -> (tempfile::TempDir, Controller, Arc<Proxy>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("store");
        let proxy = Arc::new(Proxy::new());
        let c = Controller::new(proxy.clone(), store);
        let cfg = canary_config::parse("test.yaml", CONFIG).expect("config");
        c.apply(&cfg).expect("apply");
        (dir, c, proxy)
    }

    /// Trips the breaker in the data plane. No controller loop runs in these tests, so
    /// the trip's event stays queued, as in the instant before the loop handles it.
    fn trip(c: &Controller) {
        let rt = c.proxy().runtime("web").expect("runtime");
        // Three clients (the default `min_clients`), each with its own address and key.
        for i in 1..=3u8 {
            let id = canary_proxy::witness::ClientId::new([192, 0, 2, i].into(), Some(&[i]));
            rt.canary_failure(canary_proxy::witness::Witness::Client(id));
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
        // Commands still reach it, and a pause that was made is answered as made: only
        // its journal entry is lost (logged and counted).
        let s = c.command("web", Command::Pause).expect("pause");
        assert_eq!(s.phase, Some(Phase::Paused));
        assert!(c.write_failures.load(Relaxed) >= 2);
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
        assert_eq!(
            s.abort_reason.as_deref(),
            Some("breaker: 3 consecutive canary failures from 3 clients"),
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

    /// Records `n` canary answers with `status` in the data plane's counters.
    fn canary_answers(proxy: &Proxy, n: usize, status: u16) {
        let snap = proxy.snapshot();
        let (_, entry) = snap.route("web").expect("route");
        let pool = entry.canary.as_ref().expect("canary pool");
        for _ in 0..n {
            pool.stats.record(status, 1_000);
        }
    }

    /// Takes a verdict at the next tick, whatever the interval.
    fn verdict_due(c: &Controller) {
        c.lock().routes[0].last_verdict_ms = 0;
        c.tick();
    }

    #[tokio::test]
    async fn a_retried_rollout_is_not_judged_on_the_failures_that_aborted_it() {
        let analysis = "      steps: [{weight: 50, pause: 1h}]
      analysis: {min_requests: 5, max_error_rate: 0.01, failure_limit: 1}
";
        let text = CONFIG.replace(
            "      steps: [{weight: 50, pause: 0}]\n      analysis: {min_requests: 0}\n",
            analysis,
        );
        assert!(text.contains("pause: 1h"), "{text}");
        let (_dir, c, proxy) = controller_and_proxy();
        apply(&c, &text);
        verdict_due(&c);
        canary_answers(&proxy, 10, 500);
        verdict_due(&c);
        let s = c.status("web").expect("status");
        assert_eq!(s.phase, Some(Phase::Aborted), "{s:?}");
        c.command("web", Command::Retry).expect("retry");
        // The fixed canary answers every request after the retry.
        verdict_due(&c);
        canary_answers(&proxy, 10, 200);
        verdict_due(&c);
        let s = c.status("web").expect("status");
        assert_eq!(s.phase, Some(Phase::Progressing), "{s:?}");
        let v = s.last_verdict.expect("a verdict after the retry");
        assert_eq!(v.result, VerdictResult::Pass, "{v:?}");
        assert_eq!((v.canary.requests, v.canary.failures), (10, 0), "{v:?}");
    }

    #[tokio::test]
    async fn a_deleted_state_dir_is_recreated_and_a_pause_answers_what_happened() {
        let (dir, c) = controller();
        std::fs::remove_dir_all(dir.path()).expect("rm -rf state_dir");
        let s = c.command("web", Command::Pause).expect("pause");
        assert_eq!((s.phase, s.unsaved), (Some(Phase::Paused), None));
        let on_disk = c.store().load("web").expect("load").expect("state");
        assert_eq!(on_disk.phase, Phase::Paused);
        assert_eq!(last_event(&c).kind, "pause");
    }

    fn metrics(c: &Controller) -> String {
        let mut e = Exposition::new();
        c.encode_metrics(&mut e);
        e.finish()
    }

    #[tokio::test]
    async fn a_change_that_cannot_be_saved_is_refused_or_reported_never_half_made() {
        let (dir, c) = controller();
        // The state file cannot be replaced: its path is a non-empty directory.
        let state = dir.path().join("web.state.json");
        std::fs::remove_file(&state).expect("state file");
        std::fs::create_dir_all(state.join("x")).expect("mkdir");
        // Promoting gives the canary more: refused, and nothing changed.
        let err = c
            .command("web", Command::Promote { full: true })
            .expect_err("promote cannot be saved");
        assert!(matches!(err, ControlError::NotSaved(_)), "{err}");
        assert!(err.to_string().starts_with("nothing changed"), "{err}");
        let s = c.status("web").expect("status");
        assert_eq!((s.phase, s.weight), (Some(Phase::Progressing), 50.0));
        assert_eq!(
            c.proxy().runtime("web").expect("rt").weight().percent(),
            50.0
        );
        // Aborting takes the canary out: made, answered as made, marked unsaved.
        let s = c
            .command(
                "web",
                Command::Abort {
                    reason: "bad".into(),
                },
            )
            .expect("abort is made");
        assert_eq!((s.phase, s.weight), (Some(Phase::Aborted), 0.0));
        assert!(s.unsaved.is_some(), "{s:?}");
        assert_eq!(c.proxy().runtime("web").expect("rt").weight(), Weight::ZERO);
        let m = metrics(&c);
        assert!(m.contains("canary_state_unsaved{route=\"web\"} 1"), "{m}");
        assert!(m.contains("canary_state_write_failures_total 2"), "{m}");
        // The disk is back: the next retry saves the abort.
        std::fs::remove_dir_all(&state).expect("rmdir");
        c.tick();
        assert!(
            c.status("web").expect("status").unsaved.is_some(),
            "not yet due"
        );
        c.lock().routes[0].unsaved.as_mut().expect("unsaved").1 = 0;
        c.tick();
        assert_eq!(c.status("web").expect("status").unsaved, None);
        let on_disk = c.store().load("web").expect("load").expect("state");
        assert_eq!(on_disk.phase, Phase::Aborted);
        assert!(metrics(&c).contains("canary_state_unsaved{route=\"web\"} 0"));
    }

    #[tokio::test]
    async fn a_state_file_beyond_the_plan_or_from_the_future_is_refused_at_load() {
        let (dir, c) = controller();
        let mut s = c.store().load("web").expect("load").expect("state");
        drop(c);
        let cfg = canary_config::parse("test.yaml", CONFIG).expect("config");
        for (field, bad) in [("step", 7u64), ("step_started_ms", u64::MAX / 2)] {
            let mut forged = s.clone();
            match field {
                "step" => forged.step = bad as usize,
                _ => forged.step_started_ms = bad,
            }
            let store = Store::open(dir.path()).expect("store");
            store.save("web", Some(&forged)).expect("save");
            let c = Controller::new(Arc::new(Proxy::new()), store);
            let err = c.apply(&cfg).expect_err("forged state");
            let msg = err.to_string();
            assert!(msg.contains("invalid state file"), "{field}: {msg}");
            assert!(!c.has_route("web"), "{field}: the route is not guessed at");
        }
        // The same file for another canary version is replaced, not judged.
        s.canary_version = "v0".into();
        s.step = 7;
        let store = Store::open(dir.path()).expect("store");
        store.save("web", Some(&s)).expect("save");
        let c = Controller::new(Arc::new(Proxy::new()), store);
        c.apply(&cfg)
            .expect("a new rollout replaces the old version's");
        assert_eq!(c.status("web").expect("status").step, Some(0));
    }

    #[tokio::test]
    async fn setting_the_same_manual_weight_twice_journals_it_once() {
        let (_dir, c) = controller();
        let (head, _) = CONFIG.split_once("    rollout:").expect("rollout section");
        apply(&c, &format!("{head}    weight: 20\n"));
        let n = c.events("web", 1000).expect("events").len();
        let w = Weight::from_percent(35.0).expect("weight");
        c.command("web", Command::SetWeight(w)).expect("weight");
        c.command("web", Command::SetWeight(w))
            .expect("same weight");
        let events = c.events("web", 1000).expect("events");
        assert_eq!(events.len(), n + 1, "{events:?}");
        assert_eq!(c.status("web").expect("status").weight, 35.0);
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
