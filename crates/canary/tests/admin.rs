//! The admin API and the CLI end to end: every endpoint and its error codes, the
//! bearer token, every CLI verb and its exit codes, the refusal to expose an
//! unauthenticated admin listener, and `canary demo`.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{addrs, free_port, run_canary, Canary, Upstream};
use http::Method;
use serde_json::Value;

const TOKEN: &str = "s3cret-token";
const TOKEN_ENV: (&str, &str) = ("CANARY_ADMIN_TOKEN", TOKEN);
const BEARER: (&str, &str) = ("authorization", "Bearer s3cret-token");

/// Three routes: `plain` (a canary without a rollout, on `/plain`), `solo` (no
/// canary, on `/solo`) and `web` (a rollout whose second step is manual, on the rest).
/// Admin calls need the token.
fn config(v1: &Upstream, v2: &Upstream) -> String {
    let (s, c) = (addrs(&[v1]), addrs(&[v2]));
    format!(
        "admin_token_env: CANARY_ADMIN_TOKEN
routes:
  - name: plain
    path_prefix: /plain
    stable: {{version: v1, upstreams: {s}}}
    canary: {{version: v2, upstreams: {c}}}
  - name: solo
    path_prefix: /solo
    stable: {{version: v1, upstreams: {s}}}
  - name: web
    stable: {{version: v1, upstreams: {s}}}
    canary: {{version: v2, upstreams: {c}}}
    sticky: {{header: x-user-id}}
    rollout:
      steps: [{{weight: 10, pause: 1h}}, {{weight: 50, pause: manual}}, {{weight: 100, pause: 1h}}]
      analysis: {{interval: 500ms, window: 3s, min_requests: 1000000}}
"
    )
}

async fn start() -> (Upstream, Upstream, Canary) {
    let v1 = Upstream::start("v1").await;
    let v2 = Upstream::start("v2").await;
    let c = Canary::start_with(&config(&v1, &v2), &[TOKEN_ENV]).await;
    (v1, v2, c)
}

/// A mutating call with the right token.
async fn call(c: &Canary, method: Method, path: &str, body: &str) -> (u16, Value) {
    c.admin(method, path, body, &[BEARER]).await
}

async fn post(c: &Canary, path: &str, body: &str) -> (u16, Value) {
    call(c, Method::POST, path, body).await
}

/// Asserts an error answer: the status and a JSON `error` message containing `needle`.
fn assert_error(got: (u16, Value), status: u16, needle: &str) {
    let (code, v) = got;
    assert_eq!(code, status, "{v}");
    let msg = v["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error message: {v}"));
    assert!(
        msg.contains(needle),
        "error {msg:?} does not mention {needle:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_admin_endpoint_its_happy_path_and_its_error_codes() {
    let (_v1, _v2, c) = start().await;

    // Reads need no token.
    let (code, _) = c.admin_get("/healthz").await;
    assert_eq!(code, 200);
    let (code, _) = c.admin_get("/readyz").await;
    assert_eq!(code, 200);
    let (code, list) = c.admin_get("/api/v1/routes").await;
    assert_eq!(code, 200, "{list}");
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["plain", "solo", "web"]);
    let modes: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["mode"].as_str().unwrap())
        .collect();
    assert_eq!(modes, ["manual", "stable", "rollout"]);
    assert!(c.metrics().await.contains("canary_rollout_phase"));
    let web = c.status("web").await;
    assert_eq!(web["phase"], "progressing");
    assert_eq!(web["weight"], 10.0);
    assert_eq!(web["steps"][1]["pause"], "manual", "{web:#}");
    assert_eq!(web["steps"][0]["pause"], "3600s", "{web:#}");
    let (code, evs) = c.admin_get("/api/v1/routes/web/events").await;
    assert_eq!(code, 200);
    assert_eq!(evs[0]["kind"], "start", "{evs}");
    let (code, evs) = c.admin_get("/api/v1/routes/web/events?limit=1").await;
    assert_eq!((code, evs.as_array().map(Vec::len)), (200, Some(1)));
    assert_error(c.admin_get("/api/v1/routes/nope").await, 404, "nope");
    assert_error(c.admin_get("/api/v1/routes/nope/events").await, 404, "nope");
    assert_error(
        c.admin_get("/api/v1/nothing").await,
        404,
        "no such endpoint",
    );
    // Every error is JSON, including the ones the router makes.
    assert_error(
        c.admin_get("/api/v1/routes/web/events?limit=many").await,
        400,
        "limit",
    );
    assert_error(c.admin_get("/api/v1/routes/web/pause").await, 405, "method");
    assert_error(
        call(&c, Method::DELETE, "/api/v1/routes/web", "").await,
        405,
        "method",
    );

    // Every mutating call needs the token: missing, wrong, or not a bearer token.
    let mutations: [(Method, &str, &str); 7] = [
        (Method::PUT, "/api/v1/routes/web/weight", r#"{"weight":30}"#),
        (Method::POST, "/api/v1/routes/web/promote", ""),
        (Method::POST, "/api/v1/routes/web/abort", ""),
        (Method::POST, "/api/v1/routes/web/pause", ""),
        (Method::POST, "/api/v1/routes/web/resume", ""),
        (Method::POST, "/api/v1/routes/web/retry", ""),
        (Method::POST, "/api/v1/routes/nope/pause", ""),
    ];
    for (m, path, body) in &mutations {
        for headers in [
            &[][..],
            &[("authorization", "Bearer wrong")][..],
            &[("authorization", "Bearer s3cret-token-and-more")][..],
            &[("authorization", "s3cret-token")][..],
            &[("authorization", "Basic s3cret-token")][..],
        ] {
            let got = c.admin(m.clone(), path, body, headers).await;
            assert_error(got, 401, "token");
        }
    }
    let s = c.status("web").await;
    assert_eq!(
        s["phase"], "progressing",
        "a rejected call changed state: {s:#}"
    );
    assert_eq!(c.status("web").await["weight"], 10.0);
    // The token is case-sensitive, the scheme is not.
    let upper = [("authorization", "Bearer S3CRET-TOKEN")];
    let got = c
        .admin(Method::POST, "/api/v1/routes/web/pause", "", &upper)
        .await;
    assert_error(got, 401, "token");
    let lower = [("authorization", "bearer s3cret-token")];
    let (code, v) = c
        .admin(Method::POST, "/api/v1/routes/web/pause", "", &lower)
        .await;
    assert_eq!((code, v["phase"].as_str()), (200, Some("paused")), "{v}");
    let (code, v) = c
        .admin(Method::POST, "/api/v1/routes/web/resume", "", &lower)
        .await;
    assert_eq!(
        (code, v["phase"].as_str()),
        (200, Some("progressing")),
        "{v}"
    );

    // pause / resume, and 409 when they make no sense.
    let (code, v) = post(&c, "/api/v1/routes/web/pause", "").await;
    assert_eq!((code, v["phase"].as_str()), (200, Some("paused")), "{v}");
    assert_error(
        post(&c, "/api/v1/routes/web/pause", "").await,
        409,
        "paused",
    );
    let (code, v) = post(&c, "/api/v1/routes/web/resume", "").await;
    assert_eq!(
        (code, v["phase"].as_str()),
        (200, Some("progressing")),
        "{v}"
    );
    assert_error(
        post(&c, "/api/v1/routes/web/resume", "").await,
        409,
        "cannot resume",
    );
    assert_error(
        post(&c, "/api/v1/routes/web/retry", "").await,
        409,
        "cannot retry",
    );

    // weight: bad bodies are 400, a good one pauses at that weight.
    let weight = "/api/v1/routes/web/weight";
    for bad in [
        "{",
        "not json",
        r#"{"weight":"ten"}"#,
        r#"{"wieght":30}"#,
        "{}",
    ] {
        assert_error(call(&c, Method::PUT, weight, bad).await, 400, "");
    }
    assert_error(call(&c, Method::PUT, weight, "").await, 400, "weight");
    for out in ["150", "-1", "12.345"] {
        let got = call(&c, Method::PUT, weight, &format!(r#"{{"weight":{out}}}"#)).await;
        assert_error(got, 400, "out of range");
    }
    assert_error(
        call(
            &c,
            Method::PUT,
            "/api/v1/routes/nope/weight",
            r#"{"weight":30}"#,
        )
        .await,
        404,
        "nope",
    );
    let (code, v) = call(&c, Method::PUT, weight, r#"{"weight":30}"#).await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["phase"], "paused", "{v:#}");
    assert_eq!(v["weight"], 30.0, "{v:#}");
    // Resume after a manual weight: the first step at or above it (50, manual).
    let (code, v) = post(&c, "/api/v1/routes/web/resume", "").await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(
        (v["phase"].as_str(), v["step"].as_u64()),
        (Some("waiting"), Some(1)),
        "{v:#}"
    );
    assert_eq!(v["weight"], 50.0, "{v:#}");

    // promote: next step; bad promote bodies are 400.
    assert_error(
        post(&c, "/api/v1/routes/web/promote", r#"{"full":"yes"}"#).await,
        400,
        "",
    );
    assert_error(
        post(&c, "/api/v1/routes/web/promote", r#"{"fast":true}"#).await,
        400,
        "",
    );
    let (code, v) = post(&c, "/api/v1/routes/web/promote", "").await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(
        (v["phase"].as_str(), v["step"].as_u64()),
        (Some("progressing"), Some(2)),
        "{v:#}"
    );
    assert_eq!(v["weight"], 100.0);

    // abort with a reason; abort again is 409; retry restarts at step 1.
    assert_error(
        post(&c, "/api/v1/routes/web/abort", r#"{"reason":7}"#).await,
        400,
        "",
    );
    let (code, v) = post(&c, "/api/v1/routes/web/abort", r#"{"reason":"bad build"}"#).await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["phase"], "aborted");
    assert_eq!(v["weight"], 0.0);
    assert_eq!(v["abort_reason"], "user: bad build");
    assert_error(
        post(&c, "/api/v1/routes/web/abort", "").await,
        409,
        "cannot abort",
    );
    assert_error(
        post(&c, "/api/v1/routes/web/promote", "").await,
        409,
        "cannot promote",
    );
    assert_error(
        post(&c, "/api/v1/routes/web/pause", "").await,
        409,
        "cannot pause",
    );
    assert_error(
        call(&c, Method::PUT, weight, r#"{"weight":5}"#).await,
        409,
        "aborted",
    );
    let (code, v) = post(&c, "/api/v1/routes/web/retry", "").await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(
        (v["phase"].as_str(), v["step"].as_u64()),
        (Some("progressing"), Some(0)),
        "{v:#}"
    );
    assert_eq!(v["weight"], 10.0);
    assert!(v["abort_reason"].is_null(), "{v:#}");

    // promote --full, then the rollback button.
    let (code, v) = post(&c, "/api/v1/routes/web/promote", r#"{"full":true}"#).await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["phase"], "promoted");
    assert_eq!(v["weight"], 100.0);
    // From the first step: a full promotion ends on the last step.
    assert_eq!(v["step"], 2, "{v:#}");
    assert_eq!(v["make_stable"], "v2");
    assert_error(
        post(&c, "/api/v1/routes/web/promote", "").await,
        409,
        "promoted",
    );
    let (code, v) = post(&c, "/api/v1/routes/web/abort", "").await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["abort_reason"], "aborted by user");
    assert_eq!(v["weight"], 0.0);

    let (_, evs) = c.admin_get("/api/v1/routes/web/events").await;
    let kinds: Vec<&str> = evs
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        [
            "start", "pause", "resume", "pause", "resume", "weight", "resume", "advance", "abort",
            "retry", "promote", "abort"
        ],
        "{evs:#}"
    );

    // A canary without a rollout: only the weight can be set.
    let (code, v) = call(
        &c,
        Method::PUT,
        "/api/v1/routes/plain/weight",
        r#"{"weight":100}"#,
    )
    .await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(
        (v["mode"].as_str(), v["weight"].as_f64()),
        (Some("manual"), Some(100.0))
    );
    let r = c.get("/plain", &[("x-user-id", "p")]).await;
    assert_eq!(r.version(), Some("v2"));
    assert_error(
        post(&c, "/api/v1/routes/plain/pause", "").await,
        409,
        "no rollout",
    );
    // No canary at all.
    assert_error(
        call(
            &c,
            Method::PUT,
            "/api/v1/routes/solo/weight",
            r#"{"weight":1}"#,
        )
        .await,
        409,
        "no canary",
    );
    assert_error(
        post(&c, "/api/v1/routes/solo/promote", "").await,
        409,
        "no canary",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_configured_mutations_need_no_authorization() {
    let v1 = Upstream::start("v1").await;
    let v2 = Upstream::start("v2").await;
    // admin_token_env names a variable that is not set: no token is required.
    let c = Canary::start(&config(&v1, &v2)).await;
    let (code, v) = c.admin_post("/api/v1/routes/web/pause", "").await;
    assert_eq!(code, 200, "{v}");
}

/// Runs a CLI verb against `c` with the token in the environment.
async fn cli(c: &Canary, args: &[&str]) -> (i32, String, String) {
    c.cli_env(args, &[TOKEN_ENV]).await
}

fn ok(out: (i32, String, String)) -> String {
    let (code, stdout, stderr) = out;
    assert_eq!(code, 0, "stdout:\n{stdout}\nstderr:\n{stderr}");
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_cli_verb_and_its_exit_codes() {
    let (_v1, _v2, c) = start().await;

    // status: table for all routes, a single route, --json.
    let out = ok(c.cli(&["status"]).await);
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("ROUTE"), "{out}");
    for h in [
        "MODE", "STABLE", "CANARY", "WEIGHT", "PHASE", "STEP", "VERDICT",
    ] {
        assert!(lines[0].contains(h), "{out}");
    }
    assert_eq!(lines.len(), 4, "{out}");
    let web: Vec<&str> = lines[3].split_whitespace().collect();
    assert_eq!(
        web[..7],
        ["web", "rollout", "v1", "v2", "10%", "progressing", "1/3"],
        "{out}"
    );
    assert!(lines[1].starts_with("plain"), "{out}");
    assert!(lines[2].starts_with("solo"), "{out}");
    let out = ok(c.cli(&["status", "web"]).await);
    assert!(
        out.contains("steps: *10% (3600s) → 50% (manual) → 100% (3600s)"),
        "{out}"
    );
    let url = format!("dashboard: http://{}/ui/routes/web", c.admin);
    assert!(out.lines().any(|l| l == url), "{out}");
    let out = ok(c.cli(&["status", "web", "--json"]).await);
    let v: Value = serde_json::from_str(&out).expect("status --json is JSON");
    assert_eq!(v["name"], "web");
    let out = ok(c.cli(&["status", "--json"]).await);
    let v: Value = serde_json::from_str(&out).expect("status --json is JSON");
    assert_eq!(v.as_array().map(Vec::len), Some(3));

    // Mutations without the token: exit 3 with the API's message.
    let (code, _, err) = c.cli(&["pause", "web"]).await;
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("401"), "{err}");
    let (code, _, err) = c
        .cli_env(&["pause", "web"], &[("CANARY_ADMIN_TOKEN", "wrong")])
        .await;
    assert_eq!(code, 3, "{err}");
    // --token-env names another variable.
    let out = ok(c
        .cli_env(
            &["pause", "web", "--token-env", "MY_TOKEN"],
            &[("MY_TOKEN", TOKEN)],
        )
        .await);
    assert!(out.contains("web: paused"), "{out}");
    let out = ok(cli(&c, &["resume", "web"]).await);
    assert!(out.contains("web: progressing at 10% (step 1/3)"), "{out}");
    // Resume when not paused: refused (409) → exit 3.
    let (code, _, err) = cli(&c, &["resume", "web"]).await;
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("409"), "{err}");

    // wait times out on a step that needs a promote: exit 2.
    let out = ok(cli(&c, &["weight", "web", "40"]).await);
    assert!(out.contains("web: weight 40% (paused)"), "{out}");
    let out = ok(cli(&c, &["resume", "web"]).await);
    assert!(out.contains("waiting at 50% (step 2/3)"), "{out}");
    let t = Instant::now();
    let (code, out, err) = cli(&c, &["wait", "web", "--timeout", "2s"]).await;
    assert_eq!(code, 2, "{out}{err}");
    assert!(
        t.elapsed() >= Duration::from_secs(2),
        "returned early: {out}"
    );
    assert!(out.contains("timed out after 2s"), "{out}");

    let out = ok(cli(&c, &["promote", "web"]).await);
    assert!(out.contains("web: progressing at 100% (step 3/3)"), "{out}");
    let out = ok(cli(&c, &["abort", "web", "--reason", "smoke test failed"]).await);
    assert!(out.contains("web: aborted, weight 0%"), "{out}");
    assert_eq!(
        c.status("web").await["abort_reason"],
        "user: smoke test failed"
    );
    // wait on an aborted rollout: exit 1.
    let (code, out, err) = cli(&c, &["wait", "web"]).await;
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains("aborted — user: smoke test failed"), "{out}");

    let out = ok(cli(&c, &["retry", "web"]).await);
    assert!(out.contains("web: progressing at 10% (step 1/3)"), "{out}");
    let out = ok(cli(&c, &["pause", "web"]).await);
    assert!(out.contains("web: paused at 10%"), "{out}");
    let out = ok(cli(&c, &["promote", "web", "--full"]).await);
    assert!(out.contains("web: promoted at 100% (step 3/3)"), "{out}");
    let (code, out, err) = cli(&c, &["wait", "web", "--timeout", "5s"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("web: promoted — promoted: make v2 the stable version"),
        "{out}"
    );

    // events: one line per entry, evidence lines for verdicts; --json.
    let out = ok(c.cli(&["events", "web"]).await);
    let kinds: Vec<&str> = out
        .lines()
        .filter(|l| !l.starts_with(' '))
        .filter_map(|l| l.split_whitespace().nth(1))
        .collect();
    assert_eq!(
        kinds,
        [
            "start", "pause", "resume", "weight", "resume", "advance", "abort", "retry", "pause",
            "promote"
        ],
        "{out}"
    );
    assert!(out.contains("user: smoke test failed"), "{out}");
    let out = ok(c.cli(&["events", "web", "--json", "--limit", "2"]).await);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v.as_array().map(Vec::len), Some(2), "{out}");
    assert_eq!(v[1]["kind"], "promote");

    // Unknown route: exit 3 for every verb.
    for args in [
        &["status", "nope"][..],
        &["weight", "nope", "5"],
        &["promote", "nope"],
        &["abort", "nope"],
        &["pause", "nope"],
        &["resume", "nope"],
        &["retry", "nope"],
        &["events", "nope"],
        &["wait", "nope", "--timeout", "1s"],
    ] {
        let (code, out, err) = cli(&c, args).await;
        assert_eq!(code, 3, "{args:?}: {out}{err}");
        assert!(err.contains("nope"), "{args:?}: {err}");
    }
    // wait on a route without a rollout: exit 3.
    let (code, _, err) = cli(&c, &["wait", "plain", "--timeout", "1s"]).await;
    assert_eq!(code, 3, "{err}");
    // The admin URL from CANARY_ADMIN.
    let url = format!("http://{}", c.admin);
    let (code, out, err) = run_canary(&["status", "web"], &[("CANARY_ADMIN", &url)], None).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with("ROUTE"), "{out}");
    // An admin API that is not there: exit 3.
    let dead = format!("http://127.0.0.1:{}", free_port());
    let (code, _, err) = run_canary(&["status", "--admin", &dead], &[], None).await;
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("cannot reach the admin API"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_for_the_version_of_a_canary_without_a_rollout_exits_3_at_once_not_1_removed() {
    let (_v1, _v2, c) = start().await;
    // `plain` has v2 as a canary at a fixed weight and never had a rollout.
    let t = Instant::now();
    let (code, out, err) = cli(
        &c,
        &["wait", "plain", "--version", "v2", "--timeout", "20s"],
    )
    .await;
    assert_eq!(code, 3, "{out}{err}");
    assert!(err.contains("no rollout to wait for"), "{err}");
    assert!(!out.contains("removed"), "{out}");
    // At once, not after the timeout.
    assert!(t.elapsed() < Duration::from_secs(20), "{out}{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_errors_exit_3_not_2_which_wait_uses_for_timed_out() {
    for args in [
        &["wait", "web", "--timeout", "bogus"][..],
        &["wait", "web", "--timeout", "10"],
        &["wait"],
        &["weight", "web", "abc"],
        // A negative weight goes to the API for its "out of range" (see `cli.md`).
        &["weight", "web", "nan"],
        &["status", "--no-such-flag"],
        &["no-such-verb"],
        &["validate"],
        &[],
    ] {
        let (code, out, err) = run_canary(args, &[], None).await;
        assert_eq!(code, 3, "{args:?}: {out}{err}");
        assert!(
            err.contains("Usage") || err.contains("--help"),
            "{args:?}: {err}"
        );
    }
    // Help and version still print to stdout and succeed.
    for args in [
        &["--help"][..],
        &["help", "wait"],
        &["wait", "--help"],
        &["--version"],
    ] {
        let (code, out, err) = run_canary(args, &[], None).await;
        assert_eq!(code, 0, "{args:?}: {out}{err}");
        assert!(
            out.contains("canary") || out.contains("Usage"),
            "{args:?}: {out}"
        );
        assert_eq!(err, "", "{args:?}");
    }
}

/// Runs `canary` with its stdout a pipe whose reader is gone, as in `canary events web |
/// head -c 10` once `head` has exited: (exit code, stderr).
async fn run_into_a_closed_pipe(args: &[&str]) -> (i32, String) {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        // The write end of a pipe whose read end is closed: the stdin of a process that
        // has exited (so no write can land in the pipe's buffer before it closes).
        let mut reader = Command::new(env!("CARGO_BIN_EXE_canary"))
            .arg("--version")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn the reader");
        let pipe = reader.stdin.take().expect("its stdin");
        reader.wait().expect("the reader exits");
        let out = Command::new(env!("CARGO_BIN_EXE_canary"))
            .args(&args)
            .env_remove("CANARY_ADMIN_TOKEN")
            .env_remove("CANARY_ADMIN")
            .stdin(Stdio::null())
            .stdout(Stdio::from(pipe))
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn canary")
            .wait_with_output()
            .expect("canary exits");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
    .await
    .expect("cli task")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_into_a_closed_pipe_is_dropped_without_a_panic_and_keeps_the_exit_code() {
    let (_v1, _v2, c) = start().await;
    let admin = format!("http://{}", c.admin);
    for (args, want) in [
        (&["events", "web", "--json"][..], 0),
        (&["events", "web"], 0),
        (&["status", "web"], 0),
        (&["status"], 0),
        (&["--help"], 0),
        // `wait` still reports its outcome (timed out), not success or a crash.
        (&["wait", "web", "--timeout", "1s"], 2),
    ] {
        let mut all = args.to_vec();
        if args[0] != "--help" {
            all.extend(["--admin", admin.as_str()]);
        }
        let (code, err) = run_into_a_closed_pipe(&all).await;
        assert_eq!(code, want, "{args:?}: {err}");
        assert_eq!(err, "", "{args:?}");
    }
    // An error still goes to stderr with its exit code.
    let (code, err) = run_into_a_closed_pipe(&["status", "nope", "--admin", &admin]).await;
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("unknown route"), "{err}");
}

/// `canary wait` in the background against `c` (no token: it only reads).
fn spawn_wait(c: &Canary, args: &[&str]) -> tokio::task::JoinHandle<(i32, String, String)> {
    let admin = format!("http://{}", c.admin);
    let mut all: Vec<String> = ["wait", "web", "--timeout", "30s", "--admin", &admin]
        .iter()
        .map(|s| s.to_string())
        .collect();
    all.extend(args.iter().map(|s| s.to_string()));
    tokio::spawn(async move {
        let args: Vec<&str> = all.iter().map(String::as_str).collect();
        run_canary(&args, &[], None).await
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_follows_the_version_it_saw_to_stable_and_reports_a_replaced_one() {
    let (v1, v2, c) = start().await;
    let base = config(&v1, &v2);
    let web_at = base.find("  - name: web").expect("web route");
    let (head, web) = base.split_at(web_at);
    // The rollout done: the config names v2 as stable and drops the canary.
    let v2_stable = format!(
        "{head}  - name: web\n    stable: {{version: v2, upstreams: {}}}\n",
        addrs(&[&v2])
    );
    let canary = |v: &str| {
        format!(
            "{head}{}",
            web.replace("version: v2", &format!("version: {v}"))
        )
    };

    // Completes while waiting: exit 0, not 3.
    let waiter = spawn_wait(&c, &[]);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    c.write_config(&v2_stable);
    let (code, out, err) = waiter.await.unwrap();
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("web: progressing, step 1/3, weight 10%"),
        "{out}"
    );
    assert!(out.contains("web: v2 is stable: rollout complete"), "{out}");

    // Started after it completed: nothing to follow without --version (3); with the
    // version it is done at once (0); a version not deployed yet is waited for (2).
    c.wait_status("web", "stable", Duration::from_secs(10), |s| {
        s["mode"] == "stable"
    })
    .await;
    let (code, out, err) = cli(&c, &["wait", "web", "--timeout", "5s"]).await;
    assert_eq!(code, 3, "{out}{err}");
    assert!(
        err.contains("no rollout") && err.contains("--version"),
        "{err}"
    );
    let (code, out, err) = cli(&c, &["wait", "web", "--version", "v2", "--timeout", "5s"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("web: v2 is stable"), "{out}");
    let (code, out, err) = cli(&c, &["wait", "web", "--version", "v3", "--timeout", "1s"]).await;
    assert_eq!(code, 2, "{out}{err}");

    // Replaced under it: a pipeline waiting for v3 learns that v4 took its place (1).
    c.write_config(&canary("v3"));
    c.wait_status("web", "rolling out v3", Duration::from_secs(10), |s| {
        s["canary_version"] == "v3" && s["phase"] == "progressing"
    })
    .await;
    let waiter = spawn_wait(&c, &[]);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    c.write_config(&canary("v4"));
    let (code, out, err) = waiter.await.unwrap();
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.contains("web: v3 will not be promoted: the canary is now v4"),
        "{out}"
    );
    // The journal says where each rollout started from: no canary after v2 was made
    // stable, then v3's rollout, which v4 replaced.
    c.wait_status("web", "rolling out v4", Duration::from_secs(10), |s| {
        s["canary_version"] == "v4"
    })
    .await;
    let out = ok(c.cli(&["events", "web"]).await);
    let lines: Vec<&str> = out.lines().filter(|l| !l.starts_with(' ')).collect();
    let n = lines.len();
    assert!(n >= 4, "{out}");
    assert!(
        lines[n - 3].contains("end      progressing 10% → stable"),
        "{out}"
    );
    assert!(
        lines[n - 2].contains("start    stable → progressing 10%  new canary version v3"),
        "{out}"
    );
    assert!(
        lines[n - 1].contains("start    progressing 10% → progressing 10%  new canary version v4; replaces the rollout of v3"),
        "{out}"
    );

    // --version waits for a config that is not applied yet, then follows it.
    let waiter = spawn_wait(&c, &["--version", "v5"]);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    c.write_config(&canary("v5"));
    c.wait_status("web", "rolling out v5", Duration::from_secs(10), |s| {
        s["canary_version"] == "v5"
    })
    .await;
    let (code, v) = post(&c, "/api/v1/routes/web/promote", r#"{"full":true}"#).await;
    assert_eq!(code, 200, "{v}");
    let (code, out, err) = waiter.await.unwrap();
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("canary v4"), "saw v4 go by: {out}");
    assert!(out.contains("web: promoted"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_exits_0_when_the_rollout_gets_promoted_while_waiting() {
    let (_v1, _v2, c) = start().await;
    let admin = format!("http://{}", c.admin);
    let waiter = tokio::spawn(async move {
        run_canary(
            &["wait", "web", "--timeout", "30s", "--admin", &admin],
            &[],
            None,
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (code, v) = post(&c, "/api/v1/routes/web/promote", r#"{"full":true}"#).await;
    assert_eq!(code, 200, "{v}");
    let (code, out, err) = waiter.await.unwrap();
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("web: progressing, step 1/3, weight 10%"),
        "{out}"
    );
    assert!(out.contains("web: promoted"), "{out}");
}

/// Starts `canary serve` with `text` as its config; returns the child.
fn spawn_serve(dir: &std::path::Path, text: &str, env: &[(&str, &str)]) -> std::process::Child {
    let path = dir.join("canary.yaml");
    std::fs::write(&path, text).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_canary"));
    cmd.arg("serve")
        .arg("--config")
        .arg(&path)
        .current_dir(dir)
        .env_remove("CANARY_ADMIN_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn().expect("spawn canary serve")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_refuses_a_non_loopback_admin_listener_without_a_token() {
    let v1 = Upstream::start("v1").await;
    let dir = tempfile::tempdir().unwrap();
    let admin_port = free_port();
    let text = format!(
        "listen: 127.0.0.1:{}\nadmin: 0.0.0.0:{admin_port}\nstate_dir: {}\nadmin_token_env: CANARY_ADMIN_TOKEN\nroutes:\n  - name: web\n    stable: {{version: v1, upstreams: {}}}\n",
        free_port(),
        dir.path().join("state").display(),
        addrs(&[&v1]),
    );
    // No token: refuses, with a message saying why and what to do.
    for env in [&[][..], &[("CANARY_ADMIN_TOKEN", "")][..]] {
        let mut child = spawn_serve(dir.path(), &text, env);
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("canary serve did not refuse to start");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!status.success(), "{err}");
        assert!(err.contains("not on loopback"), "{err}");
        assert!(err.contains("admin_token_env"), "{err}");
    }

    // With the token set it starts; requests go to 127.0.0.1 only.
    let mut child = spawn_serve(dir.path(), &text, &[TOKEN_ENV]);
    let http = common::client();
    let base = format!("http://127.0.0.1:{admin_port}");
    let deadline = Instant::now() + Duration::from_secs(10);
    let ready = loop {
        if child.try_wait().unwrap().is_some() {
            break false;
        }
        let r = common::send(&http, Method::GET, &format!("{base}/readyz"), &[], "").await;
        if r.is_ok_and(|r| r.status == 200) {
            break true;
        }
        if Instant::now() > deadline {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let r = common::send(
        &http,
        Method::GET,
        &format!("{base}/api/v1/routes"),
        &[],
        "",
    )
    .await;
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    assert!(
        ready,
        "did not start with a token:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(r.unwrap().status, 200);
}

/// Runs `canary demo --exit` on free loopback ports (port 0: the demo binds them
/// itself, so no other test can take them in between): (exit code, stdout, stderr,
/// seconds).
async fn demo(extra: &[&str]) -> (i32, String, String, f64) {
    let mut args = vec![
        "demo",
        "--exit",
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(extra);
    let t = Instant::now();
    let (code, out, err) = run_canary(&args, &[], None).await;
    (code, out, err, t.elapsed().as_secs_f64())
}

fn entries(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .expect("read tmp")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect()
}

#[tokio::test]
async fn a_demo_whose_port_is_taken_fails_clearly_and_leaves_no_temp_dir() {
    // Someone else (here a plain listener, in the report a `canary serve`) has the port.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let tmp = tempfile::tempdir().expect("tmp");
    let tmp_s = tmp.path().to_string_lossy().into_owned();
    for flag in ["--listen", "--admin"] {
        let other = if flag == "--listen" {
            "--admin"
        } else {
            "--listen"
        };
        let args = ["demo", "--exit", flag, &addr, other, "127.0.0.1:0"];
        let (code, out, err) = run_canary(&args, &[("TMPDIR", &tmp_s)], None).await;
        assert_eq!(code, 1, "{flag}: {out}\n{err}");
        assert!(err.contains(&format!("{flag} {addr}")), "{flag}: {err}");
        assert!(err.contains("in use"), "{flag}: {err}");
        assert!(!out.contains("proxy on"), "{flag}: {out}");
        assert_eq!(entries(tmp.path()), Vec::<String>::new(), "{flag}");
    }
}

/// Kills the child if the test fails before it exits.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn an_interrupted_demo_stops_and_removes_its_temp_dir() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut child = Child(
        Command::new(env!("CARGO_BIN_EXE_canary"))
            .args(["demo", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
            .env("TMPDIR", tmp.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn canary demo"),
    );
    let stdout = child.0.stdout.take().expect("stdout");
    let started = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .any(|l| l.starts_with("canary demo: v1 on"))
    })
    .await
    .expect("reader");
    assert!(started, "the demo did not start");
    assert_eq!(entries(tmp.path()).len(), 1, "the demo's temp dir");
    let pid = child.0.id().to_string();
    let killed = Command::new("kill").args(["-INT", &pid]).status();
    assert!(killed.is_ok_and(|s| s.success()), "kill -INT {pid}");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.0.try_wait().expect("wait") {
            break s;
        }
        assert!(Instant::now() < deadline, "the demo did not stop on SIGINT");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        status.code(),
        Some(1),
        "interrupted before the end: {status}"
    );
    assert_eq!(
        entries(tmp.path()),
        Vec::<String>::new(),
        "temp dir left behind"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_promotes_v2_and_rolls_back_a_faulty_or_slow_canary_for_the_right_reason() {
    // All at once: each takes tens of seconds, mostly waiting.
    let (healthy, faulty, slow) = tokio::join!(
        demo(&[]),
        demo(&["--faulty-canary"]),
        demo(&["--slow-canary"])
    );

    let (code, out, err, secs) = healthy;
    eprintln!("demo: exit {code} after {secs:.1} s");
    assert_eq!(code, 0, "demo failed:\n{out}\n{err}");
    assert!(out.contains("v2 promoted"), "{out}");

    let (code, out, err, secs) = faulty;
    eprintln!("demo --faulty-canary: exit {code} after {secs:.1} s");
    for l in out
        .lines()
        .filter(|l| l.contains("rolled back") || l.contains("users saw"))
    {
        eprintln!("  {l}");
    }
    assert_eq!(code, 0, "faulty demo failed:\n{out}\n{err}");
    assert!(out.contains("v2 rolled back: breaker"), "{out}");

    let (code, out, err, secs) = slow;
    eprintln!("demo --slow-canary: exit {code} after {secs:.1} s");
    assert_eq!(code, 0, "slow demo failed:\n{out}\n{err}");
    assert!(out.contains("v2 rolled back: analysis"), "{out}");
    assert!(out.contains("max_latency_increase"), "{out}");
}

#[tokio::test]
async fn a_state_dir_deleted_while_serving_is_recreated_and_pause_tells_the_truth() {
    let (_v1, _v2, mut c) = start().await;
    let state = c.dir.path().join("state");
    std::fs::remove_dir_all(&state).expect("rm -rf state_dir");
    let (code, v) = post(&c, "/api/v1/routes/web/pause", "").await;
    assert_eq!((code, v["phase"].as_str()), (200, Some("paused")), "{v}");
    assert_eq!(v["unsaved"], Value::Null, "{v}");
    assert!(
        state.join("web.state.json").exists(),
        "state_dir not recreated"
    );
    assert!(c.log().contains("recreated"), "{}", c.log());
    // After a restart the pause is still there.
    c.kill9();
    c.restart().await;
    assert_eq!(c.status("web").await["phase"], "paused");
}
