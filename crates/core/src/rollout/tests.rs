//! State machine tests with an injected clock and synthetic verdicts.

use proptest::prelude::*;

use super::*;
use crate::analysis::Summary;

const S: u64 = 1_000;

fn spec() -> RolloutSpec {
    let w = |p: f64| Weight::from_percent(p).unwrap();
    RolloutSpec {
        steps: vec![
            Step {
                weight: w(5.0),
                pause: Pause::For(30 * S),
            },
            Step {
                weight: w(25.0),
                pause: Pause::For(60 * S),
            },
            Step {
                weight: w(50.0),
                pause: Pause::Manual,
            },
            Step {
                weight: w(100.0),
                pause: Pause::For(30 * S),
            },
        ],
        analysis: AnalysisSpec {
            failure_limit: 2,
            ..AnalysisSpec::default()
        },
        interval_ms: 10 * S,
        window_ms: 60 * S,
        breaker: Some(BreakerSpec {
            consecutive_failures: 5,
            min_clients: 3,
        }),
    }
}

fn verdict(result: VerdictResult, at_ms: u64) -> Verdict {
    let sum = Summary {
        requests: 100,
        failures: 0,
        error_rate: 0.0,
        p99_ms: Some(1.0),
    };
    Verdict {
        result,
        at_ms,
        canary: sum.clone(),
        stable: sum,
        reasons: vec!["r".into()],
    }
}

fn tick(s: &RolloutState, sp: &RolloutSpec, r: Option<VerdictResult>, now: u64) -> RolloutState {
    step(
        s,
        sp,
        Input::Tick {
            verdict: r.map(|r| verdict(r, now)),
        },
        now,
    )
    .unwrap()
    .state
}

#[test]
fn healthy_rollout_goes_through_every_step_to_promoted() {
    let sp = spec();
    let (mut s, ev) = RolloutState::start(&sp, "v2", 0, Position::no_canary());
    assert_eq!(ev.kind, "start");
    assert_eq!(s.weight_bp, 500);
    // Pause not elapsed: holds even with a pass.
    s = tick(&s, &sp, Some(VerdictResult::Pass), 10 * S);
    assert_eq!(s.step, 0);
    s = tick(&s, &sp, Some(VerdictResult::Pass), 30 * S);
    assert_eq!(
        (s.step, s.weight_bp, s.phase),
        (1, 2500, Phase::Progressing)
    );
    s = tick(&s, &sp, Some(VerdictResult::Pass), 90 * S);
    assert_eq!((s.step, s.weight_bp, s.phase), (2, 5000, Phase::Waiting));
    // Manual gate: passing verdicts do not advance it.
    s = tick(&s, &sp, Some(VerdictResult::Pass), 900 * S);
    assert_eq!(s.phase, Phase::Waiting);
    let out = step(&s, &sp, Input::Promote { full: false }, 901 * S).unwrap();
    s = out.state;
    assert_eq!(
        (s.step, s.weight_bp, s.phase),
        (3, 10_000, Phase::Progressing)
    );
    s = tick(&s, &sp, Some(VerdictResult::Pass), 931 * S);
    assert_eq!(s.phase, Phase::Promoted);
    assert_eq!(s.weight(), Weight::FULL);
}

#[test]
fn inconclusive_holds_and_never_aborts() {
    let sp = spec();
    let (mut s, _) = RolloutState::start(&sp, "v2", 0, Position::no_canary());
    for i in 1..100 {
        s = tick(&s, &sp, Some(VerdictResult::Inconclusive), i * 10 * S);
    }
    assert_eq!((s.phase, s.step, s.weight_bp), (Phase::Progressing, 0, 500));
}

#[test]
fn stale_pass_from_before_the_step_does_not_advance() {
    let sp = spec();
    let (s, _) = RolloutState::start(&sp, "v2", 0, Position::no_canary());
    let mut s = tick(&s, &sp, Some(VerdictResult::Pass), 30 * S);
    assert_eq!(s.step, 1);
    // Step 1 began at 30 s; a later tick with no new verdict must not advance.
    s = tick(&s, &sp, None, 200 * S);
    assert_eq!(s.step, 1);
}

#[test]
fn failure_limit_consecutive_fails_abort() {
    let sp = spec();
    let (s, _) = RolloutState::start(&sp, "v2", 0, Position::no_canary());
    let s = tick(&s, &sp, Some(VerdictResult::Fail), 10 * S);
    assert_eq!(s.phase, Phase::Progressing);
    let s = tick(&s, &sp, Some(VerdictResult::Pass), 20 * S);
    assert_eq!(s.failed_verdicts, 0, "a pass resets the count");
    let s = tick(&s, &sp, Some(VerdictResult::Fail), 30 * S);
    let out = step(
        &s,
        &sp,
        Input::Tick {
            verdict: Some(verdict(VerdictResult::Fail, 40 * S)),
        },
        40 * S,
    )
    .unwrap();
    assert_eq!(out.state.phase, Phase::Aborted);
    assert_eq!(out.state.weight_bp, 0);
    assert!(out.state.abort_reason.unwrap().starts_with("analysis"));
    assert!(
        out.events[0].verdict.is_some(),
        "abort carries its evidence"
    );
}

#[test]
fn breaker_and_unhealthy_abort_with_their_reason() {
    let sp = spec();
    let (s, _) = RolloutState::start(&sp, "v2", 0, Position::no_canary());
    let trip = |clients| {
        step(
            &s,
            &sp,
            Input::Breaker {
                failures: 5,
                clients,
            },
            1,
        )
        .unwrap()
        .state
    };
    let b = trip(Some(3));
    assert_eq!(b.phase, Phase::Aborted);
    assert_eq!(
        b.abort_reason.as_deref(),
        Some("breaker: 5 consecutive canary failures from 3 clients")
    );
    assert_eq!(
        trip(None).abort_reason.as_deref(),
        Some("breaker: 5 consecutive canary failures, connection failures among them")
    );
    assert_eq!(
        trip(Some(1)).abort_reason.as_deref(),
        Some("breaker: 5 consecutive canary failures")
    );
    let u = step(&s, &sp, Input::CanaryUnhealthy, 1).unwrap().state;
    assert!(u.abort_reason.unwrap().starts_with("canary unhealthy"));
}

#[test]
fn commands_rejected_where_they_make_no_sense() {
    let sp = spec();
    let (s, _) = RolloutState::start(&sp, "v2", 0, Position::no_canary());
    assert!(step(&s, &sp, Input::Resume, 1).is_err());
    assert!(step(&s, &sp, Input::Retry, 1).is_err());
    let a = step(&s, &sp, Input::Abort { reason: "".into() }, 1)
        .unwrap()
        .state;
    assert!(step(&a, &sp, Input::Abort { reason: "x".into() }, 2).is_err());
    assert!(step(&a, &sp, Input::Promote { full: true }, 2).is_err());
    assert!(step(&a, &sp, Input::SetWeight(Weight::FULL), 2).is_err());
    let r = step(&a, &sp, Input::Retry, 3).unwrap().state;
    assert_eq!((r.phase, r.step, r.weight_bp), (Phase::Progressing, 0, 500));
}

#[test]
fn full_promotion_from_an_early_step_ends_on_the_last_step() {
    let sp = spec();
    let last = sp.steps.len() - 1;
    let (s, _) = RolloutState::start(&sp, "v2", 0, Position::no_canary());
    assert_eq!(s.step, 0);
    let paused = step(&s, &sp, Input::Pause, 1).unwrap().state;
    for from in [s, paused] {
        let out = step(&from, &sp, Input::Promote { full: true }, 2).unwrap();
        let p = out.state;
        assert_eq!(
            (p.phase, p.step, p.weight_bp),
            (Phase::Promoted, last, 10_000)
        );
        assert_eq!(out.events[0].to.step, Some(last), "{:?}", out.events);
    }
}

#[test]
fn journal_positions_keep_their_format_and_manual_ones_have_only_a_weight() {
    // A line written before positions could lack a phase still reads.
    let old = r#"{"at_ms":1,"canary_version":"v2","kind":"pause",
        "from":{"phase":"progressing","step":1,"weight":25.0},
        "to":{"phase":"paused","step":1,"weight":25.0},"reason":"paused by user"}"#;
    let ev: Event = serde_json::from_str(old).unwrap();
    assert_eq!((ev.to.phase, ev.to.step), (Some(Phase::Paused), Some(1)));
    let w = |p: f64| Weight::from_percent(p).unwrap();
    let m = Event::manual_weight(5, "v2", w(10.0), w(30.0), "by user".into());
    let json = serde_json::to_value(&m).unwrap();
    assert_eq!(json["kind"], "weight");
    assert_eq!(json["from"], serde_json::json!({"weight": 10.0}));
    assert_eq!(json["to"], serde_json::json!({"weight": 30.0}));
    assert_eq!(serde_json::from_value::<Event>(json).unwrap(), m);
    // A route without a canary says so; the other positions do not grow a field.
    let json = serde_json::to_value(Position::no_canary()).unwrap();
    assert_eq!(json, serde_json::json!({"weight": 0.0, "no_canary": true}));
    assert!(
        !serde_json::from_str::<Position>(r#"{"weight":0.0}"#)
            .unwrap()
            .no_canary
    );
}

#[test]
fn a_start_entry_shows_the_state_before_the_new_rollout_not_a_made_up_one() {
    let sp = spec();
    let (v2, _) = RolloutState::start(&sp, "v2", 0, Position::no_canary());
    let aborted = step(&v2, &sp, Input::Abort { reason: "r".into() }, S)
        .unwrap()
        .state;
    let (v3, ev) = RolloutState::start(&sp, "v3", 2 * S, aborted.position());
    assert_eq!(ev.kind, "start");
    assert_eq!(ev.canary_version, "v3");
    assert_eq!(
        (ev.from.phase, ev.from.step, ev.from.weight),
        (Some(Phase::Aborted), Some(0), 0.0),
        "{ev:?}"
    );
    assert_eq!(ev.to, v3.position());
    // Replacing a rollout in progress shows its step and weight.
    let v3 = step(&v3, &sp, Input::Promote { full: false }, 3 * S)
        .unwrap()
        .state;
    let (_, ev) = RolloutState::start(&sp, "v4", 4 * S, v3.position());
    assert_eq!(ev.from, v3.position());
    assert_eq!(ev.from.step, Some(1), "{ev:?}");
    assert!(ev.from.weight > 0.0, "{ev:?}");
}

#[test]
fn abort_after_promotion_rolls_back() {
    let sp = spec();
    let (s, _) = RolloutState::start(&sp, "v2", 0, Position::no_canary());
    let p = step(&s, &sp, Input::Promote { full: true }, 1)
        .unwrap()
        .state;
    assert_eq!(p.phase, Phase::Promoted);
    let a = step(
        &p,
        &sp,
        Input::Abort {
            reason: "bad".into(),
        },
        2,
    )
    .unwrap()
    .state;
    assert_eq!((a.phase, a.weight_bp), (Phase::Aborted, 0));
}

#[test]
fn manual_weight_pauses_and_resume_never_lowers_it() {
    let sp = spec();
    let (s, _) = RolloutState::start(&sp, "v2", 0, Position::no_canary());
    let m = step(
        &s,
        &sp,
        Input::SetWeight(Weight::from_percent(30.0).unwrap()),
        5 * S,
    )
    .unwrap()
    .state;
    assert_eq!((m.phase, m.weight_bp), (Phase::Paused, 3000));
    // Paused: a passing verdict after the pause does not advance.
    let m = tick(&m, &sp, Some(VerdictResult::Pass), 100 * S);
    assert_eq!((m.phase, m.weight_bp), (Phase::Paused, 3000));
    let r = step(&m, &sp, Input::Resume, 101 * S).unwrap().state;
    assert_eq!((r.phase, r.step, r.weight_bp), (Phase::Waiting, 2, 5000));
}

#[test]
fn pause_keeps_served_time_on_resume() {
    let sp = spec();
    let (s, _) = RolloutState::start(&sp, "v2", 0, Position::no_canary());
    let p = step(&s, &sp, Input::Pause, 10 * S).unwrap().state;
    let r = step(&p, &sp, Input::Resume, 20 * S).unwrap().state;
    assert_eq!(
        (r.phase, r.step, r.step_started_ms),
        (Phase::Progressing, 0, 0)
    );
}

#[test]
fn a_failed_verdict_while_paused_still_counts() {
    let sp = spec();
    let (s, _) = RolloutState::start(&sp, "v2", 0, Position::no_canary());
    let p = step(&s, &sp, Input::Pause, 1).unwrap().state;
    let p = tick(&p, &sp, Some(VerdictResult::Fail), 10 * S);
    let p = tick(&p, &sp, Some(VerdictResult::Fail), 20 * S);
    assert_eq!(p.phase, Phase::Aborted);
}

fn any_input() -> impl Strategy<Value = Input> {
    let result = prop_oneof![
        Just(VerdictResult::Pass),
        Just(VerdictResult::Fail),
        Just(VerdictResult::Inconclusive)
    ];
    prop_oneof![
        4 => proptest::option::of(result).prop_map(|r| Input::Tick { verdict: r.map(|r| verdict(r, 0)) }),
        1 => any::<bool>().prop_map(|full| Input::Promote { full }),
        1 => Just(Input::Abort { reason: "x".into() }),
        1 => Just(Input::Pause),
        1 => Just(Input::Resume),
        1 => Just(Input::Retry),
        1 => (0u16..=10_000).prop_map(|bp| Input::SetWeight(Weight::from_basis_points(bp).unwrap())),
        1 => Just(Input::Breaker { failures: 5, clients: Some(3) }),
        1 => Just(Input::CanaryUnhealthy),
    ]
}

/// Stamps a tick's verdict with the time it is applied at.
fn at(input: Input, now: u64) -> Input {
    match input {
        Input::Tick {
            verdict: Some(mut v),
        } => {
            v.at_ms = now;
            Input::Tick { verdict: Some(v) }
        }
        other => other,
    }
}

proptest! {
    #[test]
    fn failing_or_inconclusive_verdict_never_raises_the_weight(
        inputs in proptest::collection::vec((any_input(), 0u64..120_000), 0..40),
        last in prop_oneof![Just(VerdictResult::Fail), Just(VerdictResult::Inconclusive)],
    ) {
        let sp = spec();
        let (mut s, _) = RolloutState::start(&sp, "v2", 0, Position::no_canary());
        let mut now = 0;
        for (input, dt) in inputs {
            now += dt;
            if let Ok(o) = step(&s, &sp, at(input, now), now) { s = o.state; }
        }
        now += 1_000_000;
        let o = step(&s, &sp, Input::Tick { verdict: Some(verdict(last, now)) }, now).unwrap();
        prop_assert!(o.state.weight_bp <= s.weight_bp);
    }

    #[test]
    fn aborted_is_terminal_until_retry(
        inputs in proptest::collection::vec((any_input(), 0u64..120_000), 0..40),
    ) {
        let sp = spec();
        let (s, _) = RolloutState::start(&sp, "v2", 0, Position::no_canary());
        let mut s = step(&s, &sp, Input::Abort { reason: "x".into() }, 0).unwrap().state;
        let mut now = 0;
        for (input, dt) in inputs {
            now += dt;
            let is_retry = input == Input::Retry;
            if let Ok(o) = step(&s, &sp, at(input, now), now) { s = o.state; }
            if is_retry { break; }
            prop_assert_eq!(s.phase, Phase::Aborted);
            prop_assert_eq!(s.weight_bp, 0);
        }
    }

    #[test]
    fn persisted_state_resumes_identically(
        inputs in proptest::collection::vec((any_input(), 0u64..120_000), 0..40),
        next in any_input(),
    ) {
        let sp = spec();
        let (mut s, _) = RolloutState::start(&sp, "v2", 0, Position::no_canary());
        let mut now = 0;
        for (input, dt) in inputs {
            now += dt;
            if let Ok(o) = step(&s, &sp, at(input, now), now) { s = o.state; }
        }
        // What the controller writes to disk and reads back after kill -9.
        let json = serde_json::to_string(&s).unwrap();
        let restored: RolloutState = serde_json::from_str(&json).unwrap();
        prop_assert_eq!(&restored, &s);
        now += 5_000;
        let a = step(&s, &sp, at(next.clone(), now), now);
        let b = step(&restored, &sp, at(next, now), now);
        prop_assert_eq!(a, b);
    }

    #[test]
    fn weight_only_moves_along_the_plan_without_a_user(
        results in proptest::collection::vec(proptest::option::of(prop_oneof![
            Just(VerdictResult::Pass), Just(VerdictResult::Fail), Just(VerdictResult::Inconclusive)
        ]), 0..60),
    ) {
        let sp = spec();
        let (mut s, _) = RolloutState::start(&sp, "v2", 0, Position::no_canary());
        let mut now = 0;
        for r in results {
            now += 10 * S;
            let before = s.weight_bp;
            s = tick(&s, &sp, r, now);
            prop_assert!(s.weight_bp >= before || s.phase == Phase::Aborted);
            let planned = sp.steps.iter().any(|st| st.weight.basis_points() == s.weight_bp);
            prop_assert!(planned || s.weight_bp == 0 || s.phase == Phase::Promoted);
        }
    }

    #[test]
    fn promoted_is_always_on_the_last_step(
        inputs in proptest::collection::vec((any_input(), 0u64..120_000), 0..40),
    ) {
        let sp = spec();
        let (mut s, _) = RolloutState::start(&sp, "v2", 0, Position::no_canary());
        let mut now = 0;
        for (input, dt) in inputs {
            now += dt;
            if let Ok(o) = step(&s, &sp, at(input, now), now) {
                s = o.state;
                for ev in &o.events {
                    if ev.to.phase == Some(Phase::Promoted) {
                        prop_assert_eq!(ev.to.step, Some(sp.steps.len() - 1));
                    }
                }
            }
            if s.phase == Phase::Promoted {
                prop_assert_eq!(s.step, sp.steps.len() - 1);
                prop_assert_eq!(s.weight_bp, 10_000);
            }
        }
    }
}

#[test]
fn a_persisted_state_beyond_the_plan_or_starting_in_the_future_is_refused() {
    let sp = spec();
    let now = 1_000_000 * S;
    let (s, _) = RolloutState::start(&sp, "v2", now, Position::no_canary());
    assert_eq!(s.check(&sp, now), Ok(()));
    // The last step is fine; one past it is not.
    let last = RolloutState {
        step: 3,
        ..s.clone()
    };
    assert_eq!(last.check(&sp, now), Ok(()));
    let beyond = RolloutState {
        step: 4,
        ..s.clone()
    };
    let e = beyond.check(&sp, now).unwrap_err();
    assert!(
        e.contains("step 5 is beyond the plan, which has 4 steps"),
        "{e}"
    );
    // A clock stepped back a little is believed; a start in a year is not.
    let skewed = RolloutState {
        step_started_ms: now + 30 * S,
        ..s.clone()
    };
    assert_eq!(skewed.check(&sp, now), Ok(()));
    let future = RolloutState {
        step_started_ms: now + 365 * 86_400 * S,
        ..s.clone()
    };
    let e = future.check(&sp, now).unwrap_err();
    assert!(e.contains("in the future"), "{e}");
    let heavy = RolloutState {
        weight_bp: 10_001,
        ..s
    };
    assert!(heavy.check(&sp, now).is_err());
}

#[test]
fn setting_the_same_weight_twice_journals_it_once() {
    let sp = spec();
    let (s, _) = RolloutState::start(&sp, "v2", 0, Position::no_canary());
    let w = Weight::from_percent(35.0).unwrap();
    let first = step(&s, &sp, Input::SetWeight(w), 1).unwrap();
    assert_eq!(first.events.len(), 1);
    assert_eq!(first.state.phase, Phase::Paused);
    let again = step(&first.state, &sp, Input::SetWeight(w), 2).unwrap();
    assert!(again.events.is_empty(), "{:?}", again.events);
    assert_eq!(again.state, first.state);
    // Another weight while paused is a change again.
    let other = Weight::from_percent(40.0).unwrap();
    assert_eq!(
        step(&first.state, &sp, Input::SetWeight(other), 3)
            .unwrap()
            .events
            .len(),
        1
    );
}
