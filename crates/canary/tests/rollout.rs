//! The rollout controller end to end: a healthy canary promoted step by step, the
//! breaker (what it counts, what it does not, retry re-arming it, a reloaded limit),
//! the analysis (absolute and relative limits), inconclusive holds, pauses, an
//! unhealthy or fully ejected canary pool, reloads, and `kill -9` mid-rollout; a manual
//! weight on a route without a rollout surviving `kill -9` until the file's weight changes.
//!
//! Timings are short (pauses of 1 s, verdicts every 500 ms over 3 s) so the file runs
//! in well under a minute of wall time per test; waits are generous upper bounds,
//! never performance assertions.

mod common;

use std::time::{Duration, Instant};

use common::{addrs, metric_value, share, versions_for, Canary, Load, LoadSpec, Upstream};
use serde_json::Value;

/// Analysis that judges quickly: a verdict every 500 ms over the last 3 s.
const FAST_ANALYSIS: &str = "{interval: 500ms, window: 3s, min_requests: 20, max_error_rate: 0.01}";
/// Analysis that never has enough canary requests to judge (always inconclusive).
const NO_ANALYSIS: &str = "{interval: 500ms, window: 3s, min_requests: 1000000}";

/// Sends testers to the canary whatever the weight.
const TESTER_RULE: &str =
    "    rules:\n      - header: {name: x-canary, value: always}\n        to: canary\n";

/// A route `web` with stable `v1`, canary `v2`, sticky by `x-user-id`, and a rollout.
/// `extra` is appended to the route (indented by four spaces).
fn rollout_config(
    v1: &Upstream,
    v2: &Upstream,
    steps: &str,
    analysis: &str,
    breaker: u32,
    extra: &str,
) -> String {
    format!(
        "routes:\n  - name: web\n    stable: {{version: v1, upstreams: {}}}\n    canary: {{version: v2, upstreams: {}}}\n    sticky: {{header: x-user-id}}\n{extra}    rollout:\n      steps: {steps}\n      analysis: {analysis}\n      breaker: {{consecutive_failures: {breaker}, min_clients: 1}}\n",
        addrs(&[v1]),
        addrs(&[v2]),
    )
}

/// The route's journal, oldest first.
async fn journal(c: &Canary, route: &str) -> Vec<Value> {
    let (code, v) = c.admin_get(&format!("/api/v1/routes/{route}/events")).await;
    assert_eq!(code, 200, "events of {route}: {v}");
    v.as_array().cloned().unwrap_or_default()
}

fn kinds(events: &[Value]) -> Vec<&str> {
    events.iter().filter_map(|e| e["kind"].as_str()).collect()
}

/// Background load of distinct users for up to `secs` seconds.
fn load(c: &Canary, concurrency: usize, secs: u64) -> Load {
    Load::start(
        c.listen,
        LoadSpec {
            concurrency,
            max_requests: 1_000_000,
            max_duration: Duration::from_secs(secs),
            pause: Duration::from_millis(2),
            path: "/".into(),
        },
    )
}

fn phase_is(s: &Value, phase: &str) -> bool {
    s["phase"] == phase
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthy_canary_is_promoted_through_every_step_and_completes_when_made_stable() {
    let v1 = Upstream::start("v1").await;
    let v2 = Upstream::start("v2").await;
    let body = rollout_config(
        &v1,
        &v2,
        "[{weight: 10, pause: 1s}, {weight: 50, pause: 1s}, {weight: 100, pause: 1s}]",
        FAST_ANALYSIS,
        5,
        "",
    );
    let c = Canary::start(&body).await;
    let s = c.status("web").await;
    assert_eq!(s["mode"], "rollout", "{s:#}");
    assert_eq!(s["phase"], "progressing", "{s:#}");
    assert_eq!(s["step"], 0, "{s:#}");
    assert_eq!(s["weight"], 10.0, "{s:#}");

    let started = Instant::now();
    let traffic = load(&c, 4, 60);
    let s = c
        .wait_status("web", "promoted", Duration::from_secs(45), |s| {
            phase_is(s, "promoted")
        })
        .await;
    eprintln!(
        "healthy rollout promoted after {:.1} s",
        started.elapsed().as_secs_f64()
    );
    traffic.stop().await;
    assert_eq!(s["weight"], 100.0, "{s:#}");
    assert_eq!(s["make_stable"], "v2", "{s:#}");
    assert_eq!(s["step"], 2, "{s:#}");

    let evs = journal(&c, "web").await;
    assert_eq!(
        kinds(&evs),
        ["start", "advance", "advance", "promote"],
        "{evs:#?}"
    );
    let mut last_weight = 0.0;
    for (prev, e) in evs.iter().zip(&evs[1..]) {
        let v = &e["verdict"];
        assert_eq!(v["result"], "pass", "{e:#}");
        let n = v["canary"]["requests"].as_u64().unwrap_or(0);
        assert!(n >= 20, "evidence below min_requests: {e:#}");
        // The verdict behind each step change was taken after that step began.
        assert!(
            v["at_ms"].as_u64() > prev["at_ms"].as_u64(),
            "stale verdict: {prev:#} then {e:#}"
        );
        assert!(
            e["at_ms"].as_u64().unwrap() >= prev["at_ms"].as_u64().unwrap() + 1000,
            "step held less than its pause: {prev:#} then {e:#}"
        );
        let w = e["to"]["weight"].as_f64().unwrap();
        if e["kind"] == "advance" {
            assert!(w > last_weight, "weights must rise: {evs:#?}");
        }
        last_weight = w;
        assert_eq!(e["reason"], "pause elapsed and analysis passed", "{e:#}");
    }
    assert_eq!(evs[3]["to"]["phase"], "promoted");
    assert_eq!(evs[3]["to"]["weight"], 100.0);

    let m = c.metrics().await;
    let phase = |p: &str| {
        metric_value(
            &m,
            "canary_rollout_phase",
            &[("route", "web"), ("phase", p)],
        )
    };
    assert_eq!(phase("promoted"), Some(1.0), "{m}");
    for p in ["progressing", "waiting", "paused", "aborted"] {
        assert_eq!(phase(p), Some(0.0), "phase {p}: {m}");
    }
    assert_eq!(
        metric_value(&m, "canary_rollout_step", &[("route", "web")]),
        Some(2.0)
    );
    let verdicts = |r: &str| {
        metric_value(
            &m,
            "canary_analysis_verdicts_total",
            &[("route", "web"), ("result", r)],
        )
    };
    assert!(verdicts("pass").unwrap_or(0.0) >= 3.0, "{m}");
    assert_eq!(verdicts("fail"), Some(0.0), "{m}");
    for r in ["analysis", "breaker", "canary_unhealthy", "user"] {
        assert_eq!(
            metric_value(
                &m,
                "canary_rollout_aborts_total",
                &[("route", "web"), ("reason", r)]
            ),
            Some(0.0),
            "aborts {r}: {m}"
        );
    }

    // Finish: v2 becomes stable, the canary goes away.
    c.write_config(&format!(
        "routes:\n  - name: web\n    stable: {{version: v2, upstreams: {}}}\n",
        addrs(&[&v2])
    ));
    let s = c
        .wait_status("web", "stable on v2", Duration::from_secs(10), |s| {
            s["mode"] == "stable" && s["stable_version"] == "v2"
        })
        .await;
    assert!(s["phase"].is_null(), "{s:#}");
    let evs = journal(&c, "web").await;
    let last = evs.last().expect("journal");
    assert_eq!(last["kind"], "complete", "{evs:#?}");
    assert_eq!(last["canary_version"], "v2");
    let r = c.get("/", &[("x-user-id", "anyone")]).await;
    assert_eq!(r.version(), Some("v2"));
}

/// Samples of `version` answered with a 5xx.
fn errors_from(samples: &[common::Sample], version: &str) -> Vec<common::Sample> {
    samples
        .iter()
        .filter(|s| s.version.as_deref() == Some(version) && s.status >= 500)
        .cloned()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breaker_aborts_a_failing_canary_within_about_n_requests_and_retry_rearms_it() {
    const N: u64 = 5;
    const CONCURRENCY: usize = 4;
    let v1 = Upstream::start("v1").await;
    let v2 = Upstream::start("v2").await;
    let body = rollout_config(
        &v1,
        &v2,
        "[{weight: 50, pause: manual}]",
        NO_ANALYSIS,
        N as u32,
        "",
    );
    let c = Canary::start(&body).await;
    let traffic = load(&c, CONCURRENCY, 40);
    let deadline = Instant::now() + Duration::from_secs(10);
    while v2.requests() < 50 {
        assert!(Instant::now() < deadline, "no canary traffic: {}", c.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let before = v2.requests();
    let t0 = Instant::now();
    v2.set_status(500);
    let s = c
        .wait_status("web", "aborted", Duration::from_secs(10), |s| {
            phase_is(s, "aborted")
        })
        .await;
    let reason = s["abort_reason"].as_str().unwrap_or("");
    assert!(reason.starts_with("breaker"), "reason {reason:?}: {s:#}");
    assert_eq!(s["weight"], 0.0, "{s:#}");

    // Keep the load going for several controller ticks: nothing more reaches v2.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after_abort = v2.requests();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        v2.requests(),
        after_abort,
        "the canary still gets traffic after the breaker aborted it"
    );
    let s = c.status("web").await;
    assert_eq!(s["weight"], 0.0, "a tick undid the trip: {s:#}");
    let samples = traffic.stop().await;

    let reached = after_abort - before;
    let errs = errors_from(&samples, "v2");
    let last_v2 = samples
        .iter()
        .filter(|s| s.version.as_deref() == Some("v2"))
        .map(|s| s.done)
        .max()
        .expect("v2 samples");
    let first_err = errs.iter().map(|s| s.done).min().expect("v2 errors");
    eprintln!(
        "breaker N={N}, concurrency {CONCURRENCY}: {reached} requests reached the broken canary; \
         users saw {} v2 errors; last v2 answer {:.0} ms after the fault was injected \
         ({:.0} ms after the first error answer)",
        errs.len(),
        last_v2.saturating_duration_since(t0).as_secs_f64() * 1000.0,
        last_v2.saturating_duration_since(first_err).as_secs_f64() * 1000.0,
    );
    assert!(
        reached <= N + CONCURRENCY as u64,
        "{reached} requests reached the broken canary (N = {N}, concurrency {CONCURRENCY})"
    );
    assert!(reached >= N, "the breaker tripped before {N} failures");
    assert!(
        last_v2.saturating_duration_since(t0) < Duration::from_secs(5),
        "the canary kept getting traffic"
    );

    let m = c.metrics().await;
    assert_eq!(
        metric_value(
            &m,
            "canary_rollout_aborts_total",
            &[("route", "web"), ("reason", "breaker")]
        ),
        Some(1.0),
        "{m}"
    );
    let evs = journal(&c, "web").await;
    let abort = evs
        .iter()
        .find(|e| e["kind"] == "abort")
        .expect("abort event");
    assert!(
        abort["reason"]
            .as_str()
            .unwrap_or("")
            .starts_with("breaker"),
        "{abort:#}"
    );

    // Retry re-arms the breaker: the canary is fixed, retried, and breaks again.
    v2.set_status(200);
    let (code, v) = c.admin_post("/api/v1/routes/web/retry", "").await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["phase"], "waiting", "{v:#}");
    assert_eq!(v["weight"], 50.0, "{v:#}");
    assert_eq!(v["breaker_tripped"], false, "{v:#}");
    let traffic = load(&c, CONCURRENCY, 30);
    let start = v2.requests();
    let deadline = Instant::now() + Duration::from_secs(10);
    while v2.requests() < start + 30 {
        assert!(
            Instant::now() < deadline,
            "no canary traffic after retry: {:#}",
            c.status("web").await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    v2.set_status(500);
    let s = c
        .wait_status("web", "aborted again", Duration::from_secs(10), |s| {
            phase_is(s, "aborted")
        })
        .await;
    traffic.stop().await;
    assert!(
        s["abort_reason"]
            .as_str()
            .unwrap_or("")
            .starts_with("breaker"),
        "{s:#}"
    );
    let evs = journal(&c, "web").await;
    assert_eq!(
        kinds(&evs),
        ["start", "abort", "retry", "abort"],
        "{evs:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breaker_does_not_count_clients_that_hang_up() {
    hang_ups_are_not_canary_failures(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breaker_does_not_count_clients_that_hang_up_with_an_http2_canary() {
    hang_ups_are_not_canary_failures(true).await;
}

/// Every request goes to the canary (rule); the canary is slow, the clients give up
/// before it answers or in the middle of their request body. Those are not canary
/// failures. `http2`: the proxy talks h2c to the canary.
async fn hang_ups_are_not_canary_failures(http2: bool) {
    let v1 = Upstream::start("v1").await;
    let v2 = Upstream::start("v2").await;
    v2.set_delay_ms(400);
    let mut body = rollout_config(
        &v1,
        &v2,
        "[{weight: 10, pause: manual}]",
        NO_ANALYSIS,
        3,
        TESTER_RULE,
    );
    if http2 {
        body = body.replace(
            "canary: {version: v2,",
            "canary: {version: v2, http2: true,",
        );
    }
    let c = Canary::start(&body).await;
    let http = common::client();
    for i in 0..8 {
        let r = tokio::time::timeout(
            Duration::from_millis(100),
            common::send(
                &http,
                http::Method::GET,
                &c.url("/"),
                &[("x-canary", "always"), ("x-user-id", &format!("gone-{i}"))],
                "",
            ),
        )
        .await;
        assert!(r.is_err(), "the client was meant to give up first");
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    let s = c.status("web").await;
    assert_eq!(
        s["phase"], "waiting",
        "clients that timed out tripped the breaker: {s:#}"
    );
    let m = c.metrics().await;
    let aborts = metric_value(
        &m,
        "canary_client_aborts_total",
        &[("route", "web"), ("version", "v2")],
    );
    assert!(
        aborts.unwrap_or(0.0) >= 8.0,
        "client aborts not counted: {m}"
    );

    // A client that hangs up in the middle of its request body.
    for _ in 0..4 {
        use tokio::io::AsyncWriteExt;
        let mut s = tokio::net::TcpStream::connect(c.listen).await.unwrap();
        s.write_all(
            b"POST / HTTP/1.1\r\nhost: x\r\nx-canary: always\r\ncontent-length: 1000\r\n\r\npartial",
        )
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(s);
    }
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let s = c.status("web").await;
    assert_eq!(
        s["phase"],
        "waiting",
        "a client hang-up tripped the breaker: {s:#}\n{}",
        c.log()
    );
    assert_eq!(s["breaker_tripped"], false, "{s:#}");
    let m = c.metrics().await;
    let aborts = metric_value(
        &m,
        "canary_client_aborts_total",
        &[("route", "web"), ("version", "v2")],
    );
    assert!(
        aborts.unwrap_or(0.0) >= 12.0,
        "client aborts not counted: {m}"
    );
    let failures: f64 = ["5xx"]
        .iter()
        .filter_map(|cl| {
            metric_value(
                &m,
                "canary_requests_total",
                &[("route", "web"), ("version", "v2"), ("class", cl)],
            )
        })
        .sum();
    assert_eq!(failures, 0.0, "hang-ups counted as canary 5xx: {m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn analysis_aborts_a_canary_with_too_many_errors_until_a_new_version() {
    let v1 = Upstream::start("v1").await;
    let v2 = Upstream::start("v2").await;
    v2.fail_every(10);
    let config = |version: &str| {
        rollout_config(
            &v1,
            &v2,
            "[{weight: 50, pause: 30s}, {weight: 100, pause: 30s}]",
            "{interval: 500ms, window: 3s, min_requests: 20, max_error_rate: 0.05, failure_limit: 2}",
            0,
            TESTER_RULE,
        )
        .replace("version: v2", &format!("version: {version}"))
    };
    let mut c = Canary::start(&config("v2")).await;
    let traffic = load(&c, 4, 40);
    let s = c
        .wait_status("web", "aborted", Duration::from_secs(30), |s| {
            phase_is(s, "aborted")
        })
        .await;
    traffic.stop().await;
    let reason = s["abort_reason"].as_str().unwrap_or("");
    assert!(reason.starts_with("analysis"), "reason {reason:?}: {s:#}");
    assert!(reason.contains("max_error_rate"), "reason {reason:?}");
    assert_eq!(s["weight"], 0.0);
    let evs = journal(&c, "web").await;
    assert_eq!(kinds(&evs), ["start", "verdict", "abort"], "{evs:#?}");
    let abort = &evs[2];
    assert_eq!(abort["verdict"]["result"], "fail", "{abort:#}");
    let rate = abort["verdict"]["canary"]["error_rate"].as_f64().unwrap();
    assert!(
        (0.05..0.2).contains(&rate),
        "canary error rate {rate}: {abort:#}"
    );
    assert!(
        abort["reason"]
            .as_str()
            .unwrap()
            .starts_with("analysis failed 2/2"),
        "{abort:#}"
    );
    let m = c.metrics().await;
    assert_eq!(
        metric_value(
            &m,
            "canary_rollout_aborts_total",
            &[("route", "web"), ("reason", "analysis")]
        ),
        Some(1.0),
        "{m}"
    );
    assert!(
        metric_value(
            &m,
            "canary_analysis_verdicts_total",
            &[("route", "web"), ("result", "fail")]
        ) >= Some(2.0),
        "{m}"
    );

    // Aborted is sticky: rules still reach the canary, a restart and a reload with the
    // same version keep it aborted; a new canary version starts a new rollout.
    let r = c
        .get("/", &[("x-canary", "always"), ("x-user-id", "tester")])
        .await;
    assert_eq!(
        r.version(),
        Some("v2"),
        "rules must still apply after an abort"
    );
    c.restart().await;
    let s = c.status("web").await;
    assert_eq!(
        (s["phase"].as_str(), s["weight"].as_f64()),
        (Some("aborted"), Some(0.0)),
        "{s:#}"
    );
    c.write_config(&config("v2").replace("pause: 30s}]", "pause: 20s}]"));
    c.wait_status("web", "reloaded", Duration::from_secs(10), |s| {
        s["steps"][1]["pause"] == "20s"
    })
    .await;
    assert_eq!(c.status("web").await["phase"], "aborted");
    c.write_config(&config("v3"));
    let s = c
        .wait_status("web", "rolling out v3", Duration::from_secs(10), |s| {
            s["canary_version"] == "v3"
        })
        .await;
    assert_eq!(
        (s["phase"].as_str(), s["step"].as_u64()),
        (Some("progressing"), Some(0)),
        "{s:#}"
    );
    assert_eq!(s["weight"], 50.0, "{s:#}");
    let evs = journal(&c, "web").await;
    assert_eq!(
        kinds(&evs),
        ["start", "verdict", "abort", "start"],
        "{evs:#?}"
    );
    assert_eq!(evs[3]["canary_version"], "v3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_paused_by_a_manual_weight_is_still_aborted_by_the_breaker() {
    let v1 = Upstream::start("v1").await;
    let v2 = Upstream::start("v2").await;
    let body = rollout_config(&v1, &v2, "[{weight: 10, pause: 1h}]", NO_ANALYSIS, 5, "");
    let c = Canary::start(&body).await;
    let (code, v) = c
        .admin_put("/api/v1/routes/web/weight", r#"{"weight":40}"#)
        .await;
    assert_eq!((code, v["phase"].as_str()), (200, Some("paused")), "{v}");
    v2.set_status(503);
    let traffic = load(&c, 4, 30);
    let s = c
        .wait_status("web", "aborted", Duration::from_secs(10), |s| {
            phase_is(s, "aborted")
        })
        .await;
    traffic.stop().await;
    assert!(
        s["abort_reason"]
            .as_str()
            .unwrap_or("")
            .starts_with("breaker"),
        "{s:#}"
    );
    assert_eq!(s["weight"], 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn analysis_aborts_a_latency_regression_relative_to_stable() {
    let v1 = Upstream::start("v1").await;
    let v2 = Upstream::start("v2").await;
    v2.set_delay_ms(60);
    let body = rollout_config(
        &v1,
        &v2,
        "[{weight: 50, pause: 30s}]",
        "{interval: 500ms, window: 3s, min_requests: 20, max_error_rate: 0.01, max_latency_increase: 1.5, failure_limit: 2}",
        5,
        "",
    );
    let c = Canary::start(&body).await;
    let traffic = load(&c, 8, 40);
    let s = c
        .wait_status("web", "aborted", Duration::from_secs(30), |s| {
            phase_is(s, "aborted")
        })
        .await;
    traffic.stop().await;
    let reason = s["abort_reason"].as_str().unwrap_or("");
    assert!(reason.starts_with("analysis"), "reason {reason:?}: {s:#}");
    assert!(reason.contains("max_latency_increase"), "reason {reason:?}");
    let v = &s["last_verdict"];
    let (cp, sp) = (
        v["canary"]["p99_ms"].as_f64().unwrap(),
        v["stable"]["p99_ms"].as_f64().unwrap(),
    );
    eprintln!("latency regression: canary p99 {cp:.1} ms, stable p99 {sp:.1} ms");
    assert!(cp >= 50.0 && cp > sp * 1.5, "{v:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_traffic_the_verdict_is_inconclusive_and_the_step_holds() {
    let v1 = Upstream::start("v1").await;
    let v2 = Upstream::start("v2").await;
    let body = rollout_config(
        &v1,
        &v2,
        "[{weight: 10, pause: 1s}, {weight: 50, pause: 1s}]",
        FAST_ANALYSIS,
        5,
        "",
    );
    let c = Canary::start(&body).await;
    // Three times the pause, many verdicts: no evidence, no progress, no abort.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let s = c.status("web").await;
    assert_eq!(s["phase"], "progressing", "{s:#}");
    assert_eq!(s["step"], 0, "{s:#}");
    assert_eq!(s["weight"], 10.0, "{s:#}");
    assert_eq!(s["last_verdict"]["result"], "inconclusive", "{s:#}");
    assert!(
        s["last_verdict"]["reasons"][0]
            .as_str()
            .unwrap_or("")
            .contains("min_requests 20"),
        "{s:#}"
    );
    let m = c.metrics().await;
    let verdicts = |r: &str| {
        metric_value(
            &m,
            "canary_analysis_verdicts_total",
            &[("route", "web"), ("result", r)],
        )
    };
    assert!(verdicts("inconclusive").unwrap_or(0.0) >= 3.0, "{m}");
    assert_eq!(verdicts("pass"), Some(0.0), "{m}");
    assert_eq!(verdicts("fail"), Some(0.0), "{m}");
    assert_eq!(kinds(&journal(&c, "web").await), ["start"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_pool_failing_health_checks_aborts_as_canary_unhealthy() {
    let v1 = Upstream::start("v1").await;
    let v2 = Upstream::start("v2").await;
    let v2b = Upstream::start("v2").await;
    let body = format!(
        "routes:\n  - name: web\n    stable: {{version: v1, upstreams: {}}}\n    canary:\n      version: v2\n      upstreams: {}\n      health_check: {{interval: 200ms, timeout: 100ms, unhealthy_threshold: 1}}\n    rollout:\n      steps: [{{weight: 25, pause: 30s}}]\n      analysis: {NO_ANALYSIS}\n",
        addrs(&[&v1]),
        addrs(&[&v2, &v2b]),
    );
    let c = Canary::start(&body).await;
    // One instance down is not enough.
    v2.set_healthy(false);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let s = c.status("web").await;
    assert_eq!(s["phase"], "progressing", "{s:#}");
    v2b.set_healthy(false);
    let s = c
        .wait_status("web", "aborted", Duration::from_secs(10), |s| {
            phase_is(s, "aborted")
        })
        .await;
    let reason = s["abort_reason"].as_str().unwrap_or("");
    assert!(
        reason.starts_with("canary unhealthy"),
        "reason {reason:?}: {s:#}"
    );
    assert_eq!(s["weight"], 0.0);
    assert_eq!(s["canary_available"], false);
    let m = c.metrics().await;
    assert_eq!(
        metric_value(
            &m,
            "canary_rollout_aborts_total",
            &[("route", "web"), ("reason", "canary_unhealthy")]
        ),
        Some(1.0),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_pool_fully_ejected_aborts_as_canary_unhealthy_without_a_breaker() {
    let v1 = Upstream::start("v1").await;
    let v2 = Upstream::start("v2").await;
    let body = rollout_config(
        &v1,
        &v2,
        "[{weight: 50, pause: 1h}]",
        NO_ANALYSIS,
        0,
        "    ejection: {consecutive_failures: 3, base: 30s, max: 1m, min_clients: 1}\n",
    );
    let c = Canary::start(&body).await;
    v2.set_status(502);
    let traffic = load(&c, 4, 30);
    let s = c
        .wait_status("web", "aborted", Duration::from_secs(10), |s| {
            phase_is(s, "aborted")
        })
        .await;
    let samples = traffic.stop().await;
    let reason = s["abort_reason"].as_str().unwrap_or("");
    assert!(
        reason.starts_with("canary unhealthy"),
        "reason {reason:?}: {s:#}"
    );
    assert_eq!(s["weight"], 0.0);
    // Requests bound for the ejected canary went to stable, not to an error.
    let failed = samples
        .iter()
        .filter(|x| x.status != 200 && x.version.as_deref() != Some("v2"));
    assert_eq!(failed.count(), 0, "stable answers failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_changes_the_breaker_limit_applies_it_to_the_running_rollout() {
    let v1 = Upstream::start("v1").await;
    let v2 = Upstream::start("v2").await;
    let config = |breaker| {
        rollout_config(
            &v1,
            &v2,
            "[{weight: 50, pause: 1h}]",
            NO_ANALYSIS,
            breaker,
            "",
        )
    };
    let c = Canary::start(&config(1000)).await;
    c.write_config(&config(3));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = c.metrics().await;
        if metric_value(&m, "canary_config_reloads_total", &[("result", "success")]) == Some(1.0) {
            break;
        }
        assert!(Instant::now() < deadline, "reload not applied: {}", c.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let s = c.status("web").await;
    assert_eq!(
        (s["phase"].as_str(), s["step"].as_u64()),
        (Some("progressing"), Some(0)),
        "{s:#}"
    );
    v2.set_status(500);
    let traffic = load(&c, 4, 30);
    let s = c
        .wait_status(
            "web",
            "aborted by the reloaded breaker",
            Duration::from_secs(10),
            |s| phase_is(s, "aborted"),
        )
        .await;
    traffic.stop().await;
    assert_eq!(
        s["abort_reason"], "breaker: 3 consecutive canary failures",
        "{s:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_rollout_holds_despite_passing_verdicts_and_resume_continues() {
    let v1 = Upstream::start("v1").await;
    let v2 = Upstream::start("v2").await;
    let steps = "[{weight: 10, pause: 1s}, {weight: 50, pause: 1s}, {weight: 100, pause: 1h}]";
    let c = Canary::start(&rollout_config(&v1, &v2, steps, FAST_ANALYSIS, 5, "")).await;
    let (code, v) = c.admin_post("/api/v1/routes/web/pause", "").await;
    assert_eq!((code, v["phase"].as_str()), (200, Some("paused")), "{v}");
    let traffic = load(&c, 4, 30);
    c.wait_status("web", "judged passing", Duration::from_secs(15), |s| {
        s["last_verdict"]["result"] == "pass"
    })
    .await;
    // Well past the 1 s pause, with passing verdicts: still held.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let s = c.status("web").await;
    assert_eq!(
        (s["phase"].as_str(), s["step"].as_u64()),
        (Some("paused"), Some(0)),
        "{s:#}"
    );
    assert_eq!(s["weight"], 10.0, "{s:#}");
    assert_eq!(s["last_verdict"]["result"], "pass", "{s:#}");

    let (code, v) = c.admin_post("/api/v1/routes/web/resume", "").await;
    assert_eq!(
        (code, v["phase"].as_str()),
        (200, Some("progressing")),
        "{v}"
    );
    c.wait_status("web", "at step 2", Duration::from_secs(15), |s| {
        s["step"] == 1
    })
    .await;
    traffic.stop().await;
    let evs = journal(&c, "web").await;
    assert_eq!(
        kinds(&evs),
        ["start", "pause", "resume", "advance"],
        "{evs:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_resumes_the_same_step_and_weight_and_a_reload_does_not_restart_it() {
    let v1 = Upstream::start("v1").await;
    let v2 = Upstream::start("v2").await;
    let steps = "[{weight: 10, pause: 1s}, {weight: 30, pause: manual}, {weight: 100, pause: 1s}]";
    let body = rollout_config(&v1, &v2, steps, FAST_ANALYSIS, 5, "");
    let mut c = Canary::start(&body).await;
    let traffic = load(&c, 4, 40);
    c.wait_status("web", "waiting at 30%", Duration::from_secs(30), |s| {
        phase_is(s, "waiting") && s["weight"] == 30.0
    })
    .await;
    traffic.stop().await;

    let users: Vec<String> = (0..2000).map(|i| format!("k9-{i}")).collect();
    let check = |s: &Value, phase: &str| {
        assert_eq!(s["phase"], phase, "{s:#}");
        assert_eq!(s["step"], 1, "{s:#}");
        assert_eq!(s["weight"], 30.0, "{s:#}");
    };

    c.kill9();
    c.restart().await;
    check(&c.status("web").await, "waiting");
    let got = versions_for(&c, "/", "x-user-id", &users, 8).await;
    let pct = share(&got, "v2");
    eprintln!("after kill -9 (waiting at 30%): {pct:.1}% of users on v2");
    assert!(
        (24.0..=36.0).contains(&pct),
        "v2 share {pct}% after restart"
    );

    // Paused, then killed again.
    let (code, v) = c.admin_post("/api/v1/routes/web/pause", "").await;
    assert_eq!(code, 200, "{v}");
    c.kill9();
    c.restart().await;
    check(&c.status("web").await, "paused");
    let again = versions_for(&c, "/", "x-user-id", &users, 8).await;
    assert_eq!(got, again, "users changed version across the restart");

    // A reload with the same canary version (a new rule) keeps the rollout where it is.
    c.write_config(&rollout_config(
        &v1,
        &v2,
        steps,
        FAST_ANALYSIS,
        5,
        TESTER_RULE,
    ));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = c
            .get("/", &[("x-canary", "always"), ("x-user-id", "k9-0")])
            .await;
        if r.version() == Some("v2") {
            break;
        }
        assert!(Instant::now() < deadline, "reload not applied: {}", c.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    check(&c.status("web").await, "paused");
    let evs = journal(&c, "web").await;
    assert_eq!(
        kinds(&evs),
        ["start", "advance", "pause"],
        "a reload or restart changed the rollout: {evs:#?}"
    );

    // Resume continues with the manual step still waiting; promote finishes it.
    let (code, v) = c.admin_post("/api/v1/routes/web/resume", "").await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["phase"], "waiting", "{v:#}");
    assert_eq!(v["weight"], 30.0, "{v:#}");
}

/// A route `web` with a canary and no rollout, at the file's `weight`; without a canary
/// when `weight` is `None`.
fn manual_config(v1: &Upstream, v2: &Upstream, weight: Option<f64>) -> String {
    let mut body = format!(
        "routes:\n  - name: web\n    stable: {{version: v1, upstreams: {}}}\n    sticky: {{header: x-user-id}}\n",
        addrs(&[v1])
    );
    if let Some(w) = weight {
        body.push_str(&format!(
            "    canary: {{version: v2, upstreams: {}}}\n    weight: {w}\n",
            addrs(&[v2])
        ));
    }
    body
}

/// The route's last journal entry, which must be a `weight` entry from `from` to `to`
/// whose reason contains `why`.
async fn assert_last_weight_entry(c: &Canary, from: f64, to: f64, why: &str) {
    let evs = journal(c, "web").await;
    let e = evs.last().unwrap_or_else(|| panic!("empty journal"));
    assert_eq!(e["kind"], "weight", "{evs:#?}");
    assert_eq!(
        (e["from"]["weight"].as_f64(), e["to"]["weight"].as_f64()),
        (Some(from), Some(to)),
        "{e:#}"
    );
    assert!(
        e["from"]["phase"].is_null() && e["to"]["step"].is_null(),
        "{e:#}"
    );
    assert!(e["reason"].as_str().unwrap_or("").contains(why), "{e:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manual_weight_survives_kill_9_until_the_file_weight_changes_or_the_canary_goes() {
    let v1 = Upstream::start("v1").await;
    let v2 = Upstream::start("v2").await;
    let mut c = Canary::start(&manual_config(&v1, &v2, Some(10.0))).await;
    let weight_file = c.dir.path().join("state").join("web.weight.json");
    assert!(!weight_file.exists());
    let set = |w: u32| format!(r#"{{"weight":{w}}}"#);

    // Set by hand, journaled, persisted; kill -9 keeps it.
    let (code, v) = c.admin_put("/api/v1/routes/web/weight", &set(30)).await;
    assert_eq!(code, 200, "{v}");
    assert_last_weight_entry(&c, 10.0, 30.0, "by user").await;
    assert!(weight_file.exists());
    let (code, out, err) = c.cli(&["events", "web"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("weight   manual 10% → manual 30%  weight set to 30%"),
        "{out}"
    );
    let users: Vec<String> = (0..2000).map(|i| format!("mw-{i}")).collect();
    let got = versions_for(&c, "/", "x-user-id", &users, 8).await;
    c.kill9();
    c.restart().await;
    let s = c.status("web").await;
    assert_eq!(
        (s["mode"].as_str(), s["weight"].as_f64()),
        (Some("manual"), Some(30.0)),
        "{s:#}"
    );
    let again = versions_for(&c, "/", "x-user-id", &users, 8).await;
    assert_eq!(got, again, "users changed version across the restart");
    let pct = share(&again, "v2");
    assert!(
        (24.0..=36.0).contains(&pct),
        "v2 share {pct}% after restart"
    );

    // A reload that changes something else keeps it; changing the file's weight wins.
    c.write_config(&format!(
        "{}    timeouts: {{request: 20s}}\n",
        manual_config(&v1, &v2, Some(10.0))
    ));
    assert!(
        c.wait_log("config reloaded", Duration::from_secs(10)).await,
        "no reload: {}",
        c.log()
    );
    assert_eq!(c.status("web").await["weight"], 30.0);
    c.write_config(&manual_config(&v1, &v2, Some(20.0)));
    c.wait_weight("web", 20.0).await;
    assert_last_weight_entry(&c, 30.0, 20.0, "config's weight changed to 20%").await;
    assert!(!weight_file.exists());

    // Also when the file changes while canary is down.
    let (code, v) = c.admin_put("/api/v1/routes/web/weight", &set(40)).await;
    assert_eq!(code, 200, "{v}");
    c.kill9();
    c.write_config(&manual_config(&v1, &v2, Some(25.0)));
    c.restart().await;
    assert_eq!(c.status("web").await["weight"], 25.0);
    assert_last_weight_entry(&c, 40.0, 25.0, "config's weight changed to 25%").await;
    assert!(!weight_file.exists());

    // Losing the canary clears it: the canary back at the file's weight, not the old 50.
    let (code, v) = c.admin_put("/api/v1/routes/web/weight", &set(50)).await;
    assert_eq!(code, 200, "{v}");
    c.write_config(&manual_config(&v1, &v2, None));
    c.wait_status("web", "without a canary", Duration::from_secs(10), |s| {
        s["mode"] == "stable"
    })
    .await;
    assert_last_weight_entry(&c, 50.0, 0.0, "no canary").await;
    assert!(!weight_file.exists());
    c.write_config(&manual_config(&v1, &v2, Some(25.0)));
    c.wait_weight("web", 25.0).await;
    assert_last_weight_entry(&c, 0.0, 25.0, "added by config").await;
    c.kill9();
    c.restart().await;
    assert_eq!(c.status("web").await["weight"], 25.0);

    // A new canary version does not inherit a share chosen for the previous one.
    let (code, v) = c.admin_put("/api/v1/routes/web/weight", &set(100)).await;
    assert_eq!(code, 200, "{v}");
    c.write_config(&manual_config(&v1, &v2, Some(25.0)).replace("version: v2", "version: v3"));
    c.wait_weight("web", 25.0).await;
    assert_last_weight_entry(&c, 100.0, 25.0, "canary version changed from v2 to v3").await;
    assert!(!weight_file.exists());
}

/// One GET to the proxy from the local address `from` (any 127.0.0.0/8 address is this
/// host's on Linux), with sticky key `user` and the tester header: the status code.
async fn get_from(c: &Canary, from: [u8; 4], user: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind(std::net::SocketAddr::from((from, 0)))
        .expect("bind a loopback address");
    let mut s = socket.connect(c.listen).await.expect("connect");
    let req = format!(
        "GET / HTTP/1.1\r\nHost: web\r\nx-user-id: {user}\r\nx-canary: always\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
        .await
        .expect("an answer")
        .expect("read");
    let head = String::from_utf8_lossy(&buf);
    head.get(9..12)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {head:?}"))
}

#[tokio::test]
async fn one_client_with_many_sticky_keys_cannot_trip_the_breaker_or_eject_the_canary() {
    let v1 = Upstream::start("v1").await;
    let v2 = Upstream::start("v2").await;
    // The defaults: breaker at 5 failures from 3 clients, ejection likewise.
    let c = Canary::start(&format!(
        "routes:\n  - name: web\n    stable: {{version: v1, upstreams: {}}}\n    canary: {{version: v2, upstreams: {}}}\n    sticky: {{header: x-user-id}}\n{TESTER_RULE}    rollout:\n      steps: [{{weight: 10, pause: 1h}}]\n      analysis: {NO_ANALYSIS}\n",
        addrs(&[&v1]),
        addrs(&[&v2]),
    ))
    .await;
    // An endpoint that answers 500 to this client's input, whatever key it claims.
    v2.set_status(500);
    for i in 0..20 {
        assert_eq!(
            get_from(&c, [127, 0, 0, 1], &format!("attacker-{i}")).await,
            500
        );
    }
    let s = c.status("web").await;
    assert_eq!(
        s["phase"], "progressing",
        "one client aborted the rollout: {s:#}"
    );
    assert_eq!(
        s["canary_available"], true,
        "one client ejected the canary: {s:#}"
    );
    assert!(
        c.wait_log("breaker held", Duration::from_secs(10)).await,
        "{}",
        c.log()
    );
    // Two more clients (own address, own key) see it fail in the same run: that is
    // the canary, and the breaker cuts it.
    assert_eq!(get_from(&c, [127, 0, 0, 2], "bob").await, 500);
    assert_eq!(get_from(&c, [127, 0, 0, 3], "carol").await, 500);
    let s = c
        .wait_status(
            "web",
            "aborted by the breaker",
            Duration::from_secs(10),
            |s| s["phase"] == "aborted",
        )
        .await;
    assert_eq!(
        s["abort_reason"], "breaker: 22 consecutive canary failures from 3 clients",
        "{s:#}"
    );
}
