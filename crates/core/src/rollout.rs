//! The rollout state machine: `step(state, input, now) -> new state + journal events`.
//!
//! One rollout per route and canary version. Inputs are analysis ticks (with an
//! optional verdict), user commands, the data-path breaker and canary-health reports.
//! Time is passed in as milliseconds since the Unix epoch so persisted state means the
//! same thing after a restart. The state is plain data (serde) so the controller can
//! persist it and resume it exactly.
//!
//! See `docs/rollouts.md` for the state diagram.

use serde::{Deserialize, Serialize};

use crate::analysis::{AnalysisSpec, Verdict, VerdictResult};
use crate::weight::Weight;

/// How long a step holds before it may advance.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pause {
    /// At least this many milliseconds, and until a passing verdict.
    For(u64),
    /// Until a user promotes.
    Manual,
}

/// One step of a rollout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Step {
    pub weight: Weight,
    pub pause: Pause,
}

/// A route's rollout plan, validated by the config crate (steps non-empty,
/// weights non-decreasing).
#[derive(Clone, Debug, PartialEq)]
pub struct RolloutSpec {
    pub steps: Vec<Step>,
    pub analysis: AnalysisSpec,
    /// How often a verdict is taken, ms.
    pub interval_ms: u64,
    /// The sliding window the verdict looks at, ms.
    pub window_ms: u64,
    /// The data-path breaker; `None` = off.
    pub breaker: Option<BreakerSpec>,
}

/// The most distinct clients a failure run is tracked for (`min_clients` at most): the
/// data plane keeps that many client fingerprints per route and instance.
pub const MAX_MIN_CLIENTS: u32 = 16;

/// The data-path breaker (`breaker`): aborts at once on a run of canary failures that
/// more than one client saw, so that no single client can end a rollout on purpose.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BreakerSpec {
    /// Canary failures in a row that trip it (at least 1).
    pub consecutive_failures: u32,
    /// Distinct clients the failures of the run must come from (1 = any); see
    /// `docs/rollouts.md` for what counts as a client.
    pub min_clients: u32,
}

/// Where a rollout is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// On a timed step; advances when the pause has elapsed and a fresh verdict passes.
    Progressing,
    /// On a `pause: manual` step, waiting for `promote`.
    Waiting,
    /// Held by a user (`pause` or a manual weight) until `resume`.
    Paused,
    /// All steps passed: the canary takes all traffic and should become stable.
    Promoted,
    /// Weight 0 until a new canary version or `retry`.
    Aborted,
}

impl Phase {
    /// The phase's name, as the API and the metrics show it.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Progressing => "progressing",
            Phase::Waiting => "waiting",
            Phase::Paused => "paused",
            Phase::Promoted => "promoted",
            Phase::Aborted => "aborted",
        }
    }

    /// Phases in which the canary is still on trial (analysis and breaker apply).
    pub fn is_active(self) -> bool {
        matches!(self, Phase::Progressing | Phase::Waiting | Phase::Paused)
    }

    /// All phases, for metrics.
    pub const ALL: [Phase; 5] = [
        Phase::Progressing,
        Phase::Waiting,
        Phase::Paused,
        Phase::Promoted,
        Phase::Aborted,
    ];
}

/// The persisted state of one route's rollout.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RolloutState {
    /// The canary version this rollout is for.
    pub canary_version: String,
    pub phase: Phase,
    /// Index of the current step.
    pub step: usize,
    /// The canary weight in basis points.
    pub weight_bp: u16,
    /// When the current step began (ms since the Unix epoch).
    pub step_started_ms: u64,
    /// Consecutive failed verdicts.
    pub failed_verdicts: u32,
    pub last_verdict: Option<Verdict>,
    /// Why the rollout was aborted.
    pub abort_reason: Option<String>,
}

/// What a user or the data plane asks of a rollout, or the clock ticking.
#[derive(Clone, Debug, PartialEq)]
pub enum Input {
    /// Time passed; `verdict` is the analysis taken at this tick, if any.
    Tick {
        verdict: Option<Verdict>,
    },
    /// Next step now; `full` goes straight to promoted.
    Promote {
        full: bool,
    },
    Abort {
        reason: String,
    },
    Pause,
    Resume,
    /// Start again from the first step after an abort.
    Retry,
    /// Set the weight by hand; holds automatic progress until `resume`.
    SetWeight(Weight),
    /// The data-path breaker saw this many consecutive canary failures, from this many
    /// distinct clients (`None`: a failure to connect to the canary was among them,
    /// which no client can cause, so the number of clients did not matter).
    Breaker {
        failures: u32,
        clients: Option<u32>,
    },
    /// No healthy canary instance while the rollout needs canary traffic.
    CanaryUnhealthy,
}

impl Input {
    fn name(&self) -> &'static str {
        match self {
            Input::Tick { .. } => "tick",
            Input::Promote { .. } => "promote",
            Input::Abort { .. } => "abort",
            Input::Pause => "pause",
            Input::Resume => "resume",
            Input::Retry => "retry",
            Input::SetWeight(_) => "weight",
            Input::Breaker { .. } => "breaker",
            Input::CanaryUnhealthy => "canary unhealthy",
        }
    }
}

/// A point in a rollout, for the journal.
///
/// `phase` and `step` are `None` on a route without a rollout (a manual weight, or the
/// config's weight changing), where only the weight means something; they are then
/// left out of the JSON. `no_canary` marks a route without a canary at all (all traffic
/// to stable, weight 0): before its first canary, or after the canary was made stable
/// or removed. It is only written when true, so the other entries keep their format.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Position {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<usize>,
    pub weight: f64,
    #[serde(default, skip_serializing_if = "is_false")]
    pub no_canary: bool,
}

fn is_false(b: &bool) -> bool {
    !b
}

impl Position {
    /// A route with a canary but without a rollout, at `weight`.
    pub fn manual(weight: Weight) -> Position {
        Position {
            phase: None,
            step: None,
            weight: weight.percent(),
            no_canary: false,
        }
    }

    /// A route without a canary: everything goes to stable.
    pub fn no_canary() -> Position {
        Position {
            no_canary: true,
            ..Position::manual(Weight::ZERO)
        }
    }
}

impl Event {
    /// A change of the canary weight on a route without a rollout: set through the API,
    /// or the config's weight changing (which also clears an API override).
    pub fn manual_weight(
        at_ms: u64,
        canary_version: &str,
        from: Weight,
        to: Weight,
        reason: String,
    ) -> Event {
        Event {
            at_ms,
            canary_version: canary_version.to_string(),
            kind: "weight".into(),
            from: Position::manual(from),
            to: Position::manual(to),
            reason,
            verdict: None,
        }
    }
}

/// One journal entry: a transition or a failed verdict, with the evidence.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub at_ms: u64,
    pub canary_version: String,
    /// `start`, `advance`, `promote`, `abort`, `pause`, `resume`, `retry`, `weight`, `verdict`
    /// (and, written by the controller, `complete`, `end`).
    pub kind: String,
    pub from: Position,
    pub to: Position,
    pub reason: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verdict: Option<Verdict>,
}

/// A command that is not allowed in the current phase (HTTP 409).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejected(pub String);

impl std::fmt::Display for Rejected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Rejected {}

impl RolloutState {
    /// A fresh rollout of `canary_version` at the first step. `before` is where the
    /// route was until now, for the journal's `start` entry: the rollout of the version
    /// it replaces, the canary's weight without a rollout, or no canary at all.
    pub fn start(
        spec: &RolloutSpec,
        canary_version: &str,
        now_ms: u64,
        before: Position,
    ) -> (RolloutState, Event) {
        let mut s = RolloutState {
            canary_version: canary_version.to_string(),
            phase: Phase::Progressing,
            step: 0,
            weight_bp: 0,
            step_started_ms: now_ms,
            failed_verdicts: 0,
            last_verdict: None,
            abort_reason: None,
        };
        s.enter_step(spec, 0, now_ms);
        let ev = s.event(
            now_ms,
            "start",
            before,
            format!("new canary version {canary_version}"),
            None,
        );
        (s, ev)
    }

    /// How far in the future a persisted step start may lie and still be believed: a
    /// clock stepped back a little (NTP after a reboot) is not a forged file.
    pub const CLOCK_SLACK_MS: u64 = 60_000;

    /// Checks a persisted state before it is resumed under `spec` at `now_ms`: a file
    /// that parses but cannot be true (edited by hand or by an attacker) is refused
    /// like a corrupt one rather than guessed at. Returns why it cannot be true.
    pub fn check(&self, spec: &RolloutSpec, now_ms: u64) -> Result<(), String> {
        if self.step >= spec.steps.len() {
            return Err(format!(
                "step {} is beyond the plan, which has {} step{}",
                self.step + 1,
                spec.steps.len(),
                if spec.steps.len() == 1 { "" } else { "s" }
            ));
        }
        if Weight::from_basis_points(self.weight_bp).is_none() {
            return Err(format!("weight_bp {} is over 10000 (100%)", self.weight_bp));
        }
        if self.step_started_ms > now_ms.saturating_add(Self::CLOCK_SLACK_MS) {
            return Err(format!(
                "the step began {} s in the future",
                (self.step_started_ms - now_ms) / 1000
            ));
        }
        Ok(())
    }

    /// The current weight.
    pub fn weight(&self) -> Weight {
        Weight::from_basis_points(self.weight_bp).unwrap_or(Weight::ZERO)
    }

    /// Where this rollout is, as the journal shows it.
    pub fn position(&self) -> Position {
        Position {
            phase: Some(self.phase),
            step: Some(self.step),
            weight: self.weight().percent(),
            no_canary: false,
        }
    }

    fn event(
        &self,
        at_ms: u64,
        kind: &str,
        from: Position,
        reason: String,
        verdict: Option<Verdict>,
    ) -> Event {
        Event {
            at_ms,
            canary_version: self.canary_version.clone(),
            kind: kind.to_string(),
            from,
            to: self.position(),
            reason,
            verdict,
        }
    }

    fn enter_step(&mut self, spec: &RolloutSpec, step: usize, now_ms: u64) {
        self.step = step.min(spec.steps.len().saturating_sub(1));
        let st = spec.steps.get(self.step);
        self.weight_bp = st.map_or(0, |s| s.weight.basis_points());
        self.phase = match st.map(|s| s.pause) {
            Some(Pause::Manual) => Phase::Waiting,
            _ => Phase::Progressing,
        };
        self.step_started_ms = now_ms;
        self.failed_verdicts = 0;
    }

    /// Promoted means every step is done: the step is the last one, so status and
    /// `canary_rollout_step` say so also after `promote --full` from an early step.
    fn promote_fully(&mut self, spec: &RolloutSpec) {
        self.step = spec.steps.len().saturating_sub(1);
        self.phase = Phase::Promoted;
        self.weight_bp = Weight::FULL.basis_points();
    }

    fn abort(&mut self, reason: String) {
        self.phase = Phase::Aborted;
        self.weight_bp = 0;
        self.abort_reason = Some(reason);
    }

    /// Advances one step, or to promoted after the last one.
    fn advance(&mut self, spec: &RolloutSpec, now_ms: u64) {
        if self.step + 1 >= spec.steps.len() {
            self.promote_fully(spec);
        } else {
            self.enter_step(spec, self.step + 1, now_ms);
        }
    }
}

/// The result of a step: the new state and what to write in the journal.
#[derive(Clone, Debug, PartialEq)]
pub struct Outcome {
    pub state: RolloutState,
    pub events: Vec<Event>,
}

/// Applies one input to a rollout.
///
/// Pure: the same state, spec, input and time always give the same outcome.
/// Commands that make no sense in the current phase are [`Rejected`]; ticks,
/// breaker and health reports never are (they are no-ops when they do not apply).
pub fn step(
    state: &RolloutState,
    spec: &RolloutSpec,
    input: Input,
    now_ms: u64,
) -> Result<Outcome, Rejected> {
    let mut s = state.clone();
    let from = s.position();
    let mut events = Vec::new();
    let phase = s.phase;
    let reject = |what: &str| {
        Err(Rejected(format!(
            "cannot {what}: rollout is {}",
            phase.as_str()
        )))
    };
    let kind = input.name();
    match input {
        Input::Tick { verdict } => {
            if !phase.is_active() {
                return Ok(Outcome { state: s, events });
            }
            if let Some(v) = verdict {
                match v.result {
                    VerdictResult::Fail => {
                        s.failed_verdicts += 1;
                        let limit = spec.analysis.failure_limit.max(1);
                        let why = v.reasons.join("; ");
                        if s.failed_verdicts >= limit {
                            s.last_verdict = Some(v.clone());
                            s.abort(format!("analysis: {why}"));
                            events.push(s.event(
                                now_ms,
                                "abort",
                                from,
                                format!(
                                    "analysis failed {}/{limit} in a row: {why}",
                                    s.failed_verdicts
                                ),
                                Some(v),
                            ));
                            return Ok(Outcome { state: s, events });
                        }
                        events.push(s.event(
                            now_ms,
                            "verdict",
                            from.clone(),
                            format!("analysis failed {}/{limit}: {why}", s.failed_verdicts),
                            Some(v.clone()),
                        ));
                    }
                    VerdictResult::Pass => s.failed_verdicts = 0,
                    VerdictResult::Inconclusive => {}
                }
                s.last_verdict = Some(v);
            }
            if s.phase == Phase::Progressing {
                let pause_over = match spec.steps.get(s.step).map(|st| st.pause) {
                    Some(Pause::For(ms)) => now_ms >= s.step_started_ms.saturating_add(ms),
                    _ => false,
                };
                let fresh_pass = s.last_verdict.as_ref().is_some_and(|v| {
                    v.result == VerdictResult::Pass && v.at_ms > s.step_started_ms
                });
                if pause_over && fresh_pass {
                    let v = s.last_verdict.clone();
                    s.advance(spec, now_ms);
                    let kind = if s.phase == Phase::Promoted {
                        "promote"
                    } else {
                        "advance"
                    };
                    events.push(s.event(
                        now_ms,
                        kind,
                        from,
                        "pause elapsed and analysis passed".into(),
                        v,
                    ));
                }
            }
        }
        Input::Promote { full } => {
            if !phase.is_active() {
                return reject("promote");
            }
            if full {
                s.promote_fully(spec);
            } else {
                s.advance(spec, now_ms);
            }
            let kind = if s.phase == Phase::Promoted {
                "promote"
            } else {
                "advance"
            };
            let why = if full {
                "promoted by user (full)"
            } else {
                "promoted by user"
            };
            events.push(s.event(now_ms, kind, from, why.into(), None));
        }
        Input::Abort { reason } => {
            // Abort is allowed after promotion too: it is the rollback button.
            if phase == Phase::Aborted {
                return reject("abort");
            }
            let reason = if reason.trim().is_empty() {
                "aborted by user".to_string()
            } else {
                reason
            };
            s.abort(reason.clone());
            events.push(s.event(now_ms, kind, from, reason, None));
        }
        Input::Breaker { failures, clients } => {
            if phase.is_active() {
                let reason = match clients {
                    Some(1) => format!("breaker: {failures} consecutive canary failures"),
                    Some(n) => {
                        format!("breaker: {failures} consecutive canary failures from {n} clients")
                    }
                    None => format!(
                        "breaker: {failures} consecutive canary failures, connection failures among them"
                    ),
                };
                s.abort(reason.clone());
                events.push(s.event(now_ms, "abort", from, reason, None));
            }
        }
        Input::CanaryUnhealthy => {
            if phase.is_active() && s.weight_bp > 0 {
                let reason = "canary unhealthy: no healthy canary instance".to_string();
                s.abort(reason.clone());
                events.push(s.event(now_ms, "abort", from, reason, None));
            }
        }
        Input::Pause => {
            if !matches!(phase, Phase::Progressing | Phase::Waiting) {
                return reject("pause");
            }
            s.phase = Phase::Paused;
            events.push(s.event(now_ms, kind, from, "paused by user".into(), None));
        }
        Input::Resume => {
            if phase != Phase::Paused {
                return reject("resume");
            }
            // Resume at the first step whose weight is at least the current one, so
            // resuming never lowers the weight (which would move canary users back).
            let w = s.weight_bp;
            let target = spec
                .steps
                .iter()
                .position(|st| st.weight.basis_points() >= w);
            match target {
                Some(i) if i == s.step && spec.steps[i].weight.basis_points() == w => {
                    // Same step, untouched weight: keep the time already served.
                    let started = s.step_started_ms;
                    s.enter_step(spec, i, now_ms);
                    s.step_started_ms = started;
                }
                Some(i) => s.enter_step(spec, i, now_ms),
                None => s.enter_step(spec, spec.steps.len().saturating_sub(1), now_ms),
            }
            if s.weight_bp < w {
                s.weight_bp = w;
            }
            events.push(s.event(now_ms, kind, from, "resumed by user".into(), None));
        }
        Input::Retry => {
            if phase != Phase::Aborted {
                return reject("retry");
            }
            s.abort_reason = None;
            s.last_verdict = None;
            s.enter_step(spec, 0, now_ms);
            events.push(s.event(now_ms, kind, from, "retried by user".into(), None));
        }
        Input::SetWeight(w) => {
            if !phase.is_active() {
                return reject("set the weight");
            }
            if phase == Phase::Paused && s.weight_bp == w.basis_points() {
                // Already paused at this weight: nothing changes, nothing to journal
                // (it used to write `paused 35% → paused 35%`).
                return Ok(Outcome { state: s, events });
            }
            s.weight_bp = w.basis_points();
            s.phase = Phase::Paused;
            events.push(s.event(
                now_ms,
                kind,
                from,
                format!("weight set to {w} by user; paused"),
                None,
            ));
        }
    }
    Ok(Outcome { state: s, events })
}

#[cfg(test)]
mod tests;
