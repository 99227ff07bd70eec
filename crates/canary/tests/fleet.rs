//! Fleet mode end to end: real etcd (Debian's `etcd`, started here on loopback ports
//! with a temp data dir) and three `canary serve` members.
//!
//! Without an `etcd` binary on PATH the tests print why and pass, except under
//! `CI=true`, where they fail: CI installs etcd (scripts/test.sh).

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, run_canary, Canary, Upstream};
use serde_json::{json, Value};

/// An etcd cluster of one or more members on loopback; killed on drop.
struct Etcd {
    members: Vec<Option<Child>>,
    args: Vec<Vec<String>>,
    pub clients: Vec<String>,
    _dir: tempfile::TempDir,
}

fn have(bin: &str) -> bool {
    Command::new(bin)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// Whether etcd and etcdctl are here; under CI=true their absence is a failure.
fn etcd_available() -> bool {
    if have("etcd") && have("etcdctl") {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("etcd/etcdctl not found on PATH: scripts/test.sh extracts them (etcd-server, etcd-client)");
    }
    eprintln!("skipping: etcd/etcdctl not found on PATH (run scripts/test.sh, or apt-get install etcd-server etcd-client)");
    false
}

impl Etcd {
    fn start(n: usize) -> Etcd {
        let dir = tempfile::tempdir().expect("tempdir");
        let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
        let cluster: Vec<String> = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("e{i}=http://127.0.0.1:{peer}"))
            .collect();
        let token = format!("t{}", free_port());
        let mut args = Vec::new();
        let mut clients = Vec::new();
        for (i, (client, peer)) in ports.iter().enumerate() {
            let data: PathBuf = dir.path().join(format!("e{i}"));
            clients.push(format!("127.0.0.1:{client}"));
            args.push(vec![
                "--name".into(),
                format!("e{i}"),
                "--data-dir".into(),
                data.display().to_string(),
                "--listen-client-urls".into(),
                format!("http://127.0.0.1:{client}"),
                "--advertise-client-urls".into(),
                format!("http://127.0.0.1:{client}"),
                "--listen-peer-urls".into(),
                format!("http://127.0.0.1:{peer}"),
                "--initial-advertise-peer-urls".into(),
                format!("http://127.0.0.1:{peer}"),
                "--initial-cluster".into(),
                cluster.join(","),
                "--initial-cluster-token".into(),
                token.clone(),
                "--listen-metrics-urls".into(),
                format!("http://127.0.0.1:{}", free_port()),
            ]);
        }
        let mut e = Etcd {
            members: Vec::new(),
            args,
            clients,
            _dir: dir,
        };
        for i in 0..n {
            let c = e.spawn(i);
            e.members.push(Some(c));
        }
        e.wait_healthy();
        e
    }

    fn spawn(&self, i: usize) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self._dir.path().join(format!("e{i}.log")))
            .expect("etcd log");
        Command::new("etcd")
            .args(&self.args[i])
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn etcd")
    }

    fn endpoints(&self) -> String {
        self.clients.join(",")
    }

    fn ctl(&self, args: &[&str]) -> (bool, String) {
        let out = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg("--endpoints")
            .arg(self.endpoints())
            .arg("--command-timeout=3s")
            .args(args)
            .output()
            .expect("etcdctl");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    }

    fn wait_healthy(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.ctl(&["put", "/health-probe", "1"]).0 {
            if Instant::now() > deadline {
                let logs: Vec<String> = (0..self.args.len())
                    .map(|i| {
                        std::fs::read_to_string(self._dir.path().join(format!("e{i}.log")))
                            .unwrap_or_default()
                    })
                    .collect();
                panic!("etcd did not come up:\n{}", logs.join("\n----\n"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn stop(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends `sig` (`STOP`, `CONT`) to node `i`: a frozen node keeps its sockets open
    /// and answers nothing, the way a stalled disk or a paused VM looks to clients.
    fn signal(&self, i: usize, sig: &str) {
        signal(self.members[i].as_ref().expect("node running").id(), sig);
    }

    /// `etcdctl` with `input` on its standard input (`put KEY` reads the value there:
    /// a value of a megabyte does not fit in one command-line argument).
    fn ctl_stdin(&self, args: &[&str], input: &[u8]) -> (bool, String) {
        use std::io::Write;
        let mut child = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg("--endpoints")
            .arg(self.endpoints())
            .arg("--command-timeout=5s")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("etcdctl");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input)
            .expect("etcdctl stdin");
        let out = child.wait_with_output().expect("etcdctl");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    }

    /// Puts `kvs` through etcd's JSON gateway, `per_txn` keys per transaction.
    async fn bulk_put(&self, kvs: &[(String, String)], per_txn: usize) {
        let client = common::client();
        let url = format!("http://{}/v3/kv/txn", self.clients[0]);
        let b64 = |s: &str| data_encoding::BASE64.encode(s.as_bytes());
        for chunk in kvs.chunks(per_txn) {
            let ops: Vec<Value> = chunk
                .iter()
                .map(|(k, v)| json!({"requestPut": {"key": b64(k), "value": b64(v)}}))
                .collect();
            let body = json!({ "success": ops }).to_string();
            let r = common::send(&client, http::Method::POST, &url, &[], &body)
                .await
                .expect("etcd gateway txn");
            assert_eq!(r.status, 200, "{}", r.body);
        }
    }

    /// The store's current revision (from a read's header).
    fn revision(&self) -> i64 {
        let (ok, out) = self.ctl(&["get", "/health-probe", "-w", "json"]);
        assert!(ok, "{out}");
        let v: Value = serde_json::from_str(out.trim()).expect("etcdctl json");
        v["header"]["revision"].as_i64().expect("a revision")
    }

    /// Puts `n` small values through etcd's JSON gateway (one revision, so one watch
    /// response, each; a hundred etcdctl processes would take seconds).
    async fn small_puts(&self, key: &str, n: usize) {
        let client = common::client();
        let url = format!("http://{}/v3/kv/put", self.clients[0]);
        let b64 = |s: &str| data_encoding::BASE64.encode(s.as_bytes());
        for i in 0..n {
            let body = serde_json::json!({"key": b64(key), "value": b64(&i.to_string())});
            let r = common::send(&client, http::Method::POST, &url, &[], &body.to_string())
                .await
                .expect("etcd gateway put");
            assert_eq!(r.status, 200, "{}", r.body);
        }
    }

    fn restart(&mut self, i: usize) {
        self.stop(i);
        self.members[i] = Some(self.spawn(i));
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.stop(i);
        }
    }
}

/// `kill -s SIG PID`: `STOP` freezes a process with its sockets open (a paused VM, a
/// long GC pause, a swapped-out host), `CONT` wakes it.
fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args(["-s", sig, &pid.to_string()])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill -s {sig} {pid}");
    if sig == "STOP" {
        // The signal is delivered asynchronously: on a busy machine the process may
        // still answer a request for a moment. Wait until it is stopped (state T).
        let deadline = Instant::now() + Duration::from_secs(5);
        let stat = format!("/proc/{pid}/stat");
        loop {
            let text = std::fs::read_to_string(&stat).unwrap_or_default();
            // `pid (comm) S ...`: the state follows the last ')'.
            let state = text.rsplit_once(')').map(|(_, rest)| rest.trim_start());
            if state.is_some_and(|s| s.starts_with('T')) {
                break;
            }
            assert!(Instant::now() < deadline, "{pid} not stopped: {text}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

fn member_config(etcd: &Etcd, prefix: &str, name: &str) -> String {
    member_config_ttl(etcd, prefix, name, 2)
}

fn member_config_ttl(etcd: &Etcd, prefix: &str, name: &str, ttl_s: u32) -> String {
    let list: Vec<String> = etcd.clients.iter().map(|c| format!("\"{c}\"")).collect();
    format!(
        "fleet:\n  etcd: [{}]\n  prefix: {prefix}\n  member: {name}\n  lease_ttl: {ttl_s}s\n",
        list.join(", ")
    )
}

fn document(stable: &Upstream, canary: &Upstream, version: &str) -> String {
    format!(
        "routes:
  - name: web
    stable: {{version: v1, upstreams: [\"{}\"]}}
    canary: {{version: {version}, upstreams: [\"{}\"]}}
    rollout:
      steps: [{{weight: 10, pause: 1h}}, {{weight: 50, pause: 1h}}]
      analysis: {{interval: 500ms, window: 5s, min_requests: 0}}
      breaker: {{consecutive_failures: 3, min_clients: 1}}   # all test traffic is from 127.0.0.1
",
        stable.addr, canary.addr
    )
}

/// A route with a canary and no rollout: only a `weight` command writes its state, so
/// nothing but what the test does moves it.
fn document_manual(stable: &Upstream, canary: &Upstream) -> String {
    format!(
        "routes:
  - name: web
    stable: {{version: v1, upstreams: [\"{}\"]}}
    canary: {{version: v2, upstreams: [\"{}\"]}}
    weight: 10
",
        stable.addr, canary.addr
    )
}

async fn fleet(c: &Canary) -> Value {
    let (code, v) = c.admin_get("/api/v1/fleet").await;
    assert_eq!(code, 200, "{v}");
    v
}

/// Polls until `pred` holds for every member; panics with their views otherwise.
async fn wait_all(members: &[&Canary], what: &str, pred: impl Fn(&Value, &Value) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let mut ok = true;
        let mut views = Vec::new();
        for m in members {
            let f = fleet(m).await;
            let (_, s) = m.admin_get("/api/v1/routes/web").await;
            ok &= pred(&f, &s);
            views.push((f, s));
        }
        if ok {
            return;
        }
        if Instant::now() > deadline {
            // The essentials first: CI output is cut after a few kilobytes.
            let brief: Vec<String> = views
                .iter()
                .map(|(f, s)| {
                    format!(
                        "{} leader={} connected={} applied={} weight={} phase={}",
                        f["member"],
                        f["leader"],
                        f["connected"],
                        f["applied_revision"],
                        s["weight"],
                        s["phase"]
                    )
                })
                .collect();
            let logs: Vec<String> = members.iter().map(|m| m.log()).collect();
            panic!(
                "not {what} within 15s:\n{}\nlogs:\n{}\nviews: {views:#?}",
                brief.join("\n"),
                logs.join("\n----\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn push(etcd: &Etcd, dir: &std::path::Path, text: &str) -> (i32, String, String) {
    let file = dir.join("doc.yaml");
    std::fs::write(&file, text).expect("write doc");
    let f = file.display().to_string();
    let ep = etcd.endpoints();
    run_canary(
        &["fleet", "push", &f, "--etcd", &ep, "--prefix", "/canary/t"],
        &[],
        None,
    )
    .await
}

fn leader_of(v: &Value) -> Option<String> {
    v["leader"].as_str().map(str::to_string)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_members_follow_etcd_forward_commands_and_fail_over_on_the_same_step() {
    if !etcd_available() {
        return;
    }
    let etcd = Etcd::start(1);
    let (stable, canary) = (Upstream::start("v1").await, Upstream::start("v2").await);
    let mut members = Vec::new();
    for name in ["p1", "p2", "p3"] {
        members.push(Canary::start_unready(&member_config(&etcd, "/canary/t", name)).await);
    }
    let docs = tempfile::tempdir().expect("tempdir");

    // Before any document: not ready, and the reason is shown.
    for m in &members {
        let (code, _) = m.admin_get("/readyz").await;
        assert_eq!(code, 503);
    }
    let all: Vec<&Canary> = members.iter().collect();
    wait_all(&all, "waiting for a document", |f, _| {
        f["config_error"]
            .as_str()
            .is_some_and(|e| e.contains("no fleet document"))
    })
    .await;

    // An invalid document is refused by the push, with file:line:column; nothing written.
    let bad = document(&stable, &canary, "v2").replace("weight: 50", "weight: 500");
    let (code, _, err) = push(&etcd, docs.path(), &bad).await;
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("doc.yaml:6:") && err.contains("out of range"),
        "{err}"
    );
    let (_, got) = etcd.ctl(&["get", "/canary/t/config"]);
    assert!(!got.contains("routes"), "nothing written: {got}");
    // So is a process setting.
    let (code, _, err) = push(
        &etcd,
        docs.path(),
        &format!("listen: 127.0.0.1:1\n{}", document(&stable, &canary, "v2")),
    )
    .await;
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("doc.yaml:1:9: listen: a process setting"),
        "{err}"
    );

    // Bootstrap: every member serves the routes, one leader, the same revision.
    let (code, out, err) = push(&etcd, docs.path(), &document(&stable, &canary, "v2")).await;
    assert_eq!(code, 0, "{out}{err}");
    for m in members.iter_mut() {
        m.wait_until_ready().await;
    }
    let all: Vec<&Canary> = members.iter().collect();
    wait_all(&all, "on one leader and one revision", |f, s| {
        f["config_error"].is_null() && f["leader"].is_string() && s["weight"] == 10.0
    })
    .await;
    let views = [
        fleet(&members[0]).await,
        fleet(&members[1]).await,
        fleet(&members[2]).await,
    ];
    let leader = leader_of(&views[0]).expect("a leader");
    assert!(
        views
            .iter()
            .all(|v| leader_of(v).as_deref() == Some(leader.as_str())),
        "{views:#?}"
    );
    assert_eq!(
        views.iter().filter(|v| v["leading"] == true).count(),
        1,
        "{views:#?}"
    );
    let leader_i = ["p1", "p2", "p3"]
        .iter()
        .position(|n| *n == leader)
        .expect("known");
    let followers: Vec<usize> = (0..3).filter(|i| *i != leader_i).collect();
    wait_all(&all, "on the same applied revision", |f, _| {
        f["applied_revision"] == views[0]["applied_revision"]
            || f["applied_revision"].as_i64() >= views[0]["applied_revision"].as_i64()
    })
    .await;

    // A document put by other means that does not validate is applied nowhere.
    let garbled = document(&stable, &canary, "v9").replace("pause: 1h}]", "pause: soon}]");
    let (ok, out) = etcd.ctl(&["put", "/canary/t/config", &garbled]);
    assert!(ok, "{out}");
    wait_all(&all, "reporting the invalid document", |f, s| {
        f["config_error"]
            .as_str()
            .is_some_and(|e| e.contains("/canary/t/config@") && e.contains(":6:"))
            && s["canary_version"] == "v2"
    })
    .await;
    for m in &members {
        assert_eq!(m.get("/", &[]).await.status, 200);
    }

    // Weight changes through a follower reach every member's data plane.
    let f0 = &members[followers[0]];
    for (w, version) in [(100, "v2"), (0, "v1")] {
        let (code, _, err) = f0.cli(&["weight", "web", &w.to_string()]).await;
        assert_eq!(code, 0, "{err}");
        wait_all(&all, &format!("at weight {w}"), |_, s| {
            s["weight"] == f64::from(w)
        })
        .await;
        for m in &members {
            for _ in 0..10 {
                let r = m.get("/", &[]).await;
                assert_eq!(r.version(), Some(version), "{r:?}");
            }
        }
    }

    // A new version through a push starts a rollout everywhere; promote via a follower.
    let (code, out, err) = push(&etcd, docs.path(), &document(&stable, &canary, "v3")).await;
    assert_eq!(code, 0, "{out}{err}");
    wait_all(&all, "rolling out v3", |f, s| {
        f["config_error"].is_null() && s["canary_version"] == "v3" && s["weight"] == 10.0
    })
    .await;
    let (code, _, err) = f0.cli(&["promote", "web"]).await;
    assert_eq!(code, 0, "{err}");
    wait_all(&all, "on step 2", |_, s| {
        s["step"] == 1 && s["weight"] == 50.0
    })
    .await;
    let started = members[leader_i].status("web").await["step_started_ms"].clone();

    // The leader's verdicts count traffic that only went through the followers.
    for i in &followers {
        for _ in 0..20 {
            assert_eq!(members[*i].get("/", &[]).await.status, 200);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let s = members[leader_i].status("web").await;
        let n = s["last_verdict"]["canary"]["requests"]
            .as_u64()
            .unwrap_or(0)
            + s["last_verdict"]["stable"]["requests"]
                .as_u64()
                .unwrap_or(0);
        if n >= 30 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the leader's verdict never counted the followers' 40 requests: {s:#}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // kill -9 the leader: a survivor leads, on the same step with the same start.
    members[leader_i].kill9();
    let survivors: Vec<&Canary> = followers.iter().map(|i| &members[*i]).collect();
    wait_all(&survivors, "under a new leader", |f, _| {
        leader_of(f).is_some_and(|l| l != leader)
    })
    .await;
    for m in &survivors {
        let s = m.status("web").await;
        assert_eq!(
            (s["step"].as_u64(), s["weight"].as_f64()),
            (Some(1), Some(50.0)),
            "{s:#}"
        );
        assert_eq!(s["step_started_ms"], started, "{s:#}");
        assert_eq!(s["phase"], "progressing", "{s:#}");
    }
    // The new leader acts: a command through whichever survivor follows.
    let (code, _, err) = survivors[0].cli(&["pause", "web"]).await;
    assert_eq!(code, 0, "{err}");
    wait_all(&survivors, "paused", |_, s| s["phase"] == "paused").await;
    let (code, _, err) = survivors[1].cli(&["resume", "web"]).await;
    assert_eq!(code, 0, "{err}");

    // A breaker trip on one member aborts the rollout on every member.
    canary.set_status(500);
    let tripper = survivors[1];
    for _ in 0..40 {
        let _ = tripper.get("/", &[]).await;
        if tripper.status("web").await["breaker_tripped"] == true {
            break;
        }
    }
    wait_all(&survivors, "aborted by the breaker", |_, s| {
        s["phase"] == "aborted"
            && s["weight"] == 0.0
            && s["abort_reason"]
                .as_str()
                .is_some_and(|r| r.starts_with("breaker"))
    })
    .await;
    let (code, out, _) = survivors[0].cli(&["fleet", "status"]).await;
    assert_eq!(code, 0);
    assert!(out.contains("connected") && out.contains("MEMBER"), "{out}");
    let metrics = survivors[0].metrics().await;
    assert_eq!(
        common::metric_value(&metrics, "canary_fleet_connected", &[]),
        Some(1.0),
        "{metrics}"
    );
    let mut leaders = 0.0;
    for m in &survivors {
        let text = m.metrics().await;
        leaders += common::metric_value(&text, "canary_fleet_leader", &[]).unwrap_or(-1.0);
        common::promtool_check(&text);
    }
    assert_eq!(leaders, 1.0);
    let follower = survivors
        .iter()
        .find(|m| !m.log().contains("this member leads"))
        .expect("a follower");
    let text = follower.metrics().await;
    let applied = common::metric_value(&text, "canary_fleet_apply_delay_seconds_count", &[]);
    assert!(applied.is_some_and(|n| n > 0.0), "{text}");
}

/// Starts `n` members on `etcd`, pushes the document and waits until every member
/// serves it under one leader.
async fn bootstrap(etcd: &Etcd, n: usize, stable: &Upstream, canary: &Upstream) -> Vec<Canary> {
    bootstrap_with(etcd, n, 2, &document(stable, canary, "v2")).await
}

/// [`bootstrap`] with the members' lease TTL and the document given.
async fn bootstrap_with(etcd: &Etcd, n: usize, ttl_s: u32, doc: &str) -> Vec<Canary> {
    let mut members = Vec::new();
    for i in 0..n {
        let cfg = member_config_ttl(etcd, "/canary/t", &format!("p{i}"), ttl_s);
        members.push(Canary::start_unready(&cfg).await);
    }
    let docs = tempfile::tempdir().expect("tempdir");
    let (code, out, err) = push(etcd, docs.path(), doc).await;
    assert_eq!(code, 0, "{out}{err}");
    for m in members.iter_mut() {
        m.wait_until_ready().await;
    }
    let all: Vec<&Canary> = members.iter().collect();
    wait_all(&all, "on one leader", |f, s| {
        f["leader"].is_string() && s["weight"] == 10.0
    })
    .await;
    members
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_etcd_down_members_keep_serving_and_a_local_abort_reaches_the_fleet_later() {
    if !etcd_available() {
        return;
    }
    let mut etcd = Etcd::start(1);
    let (stable, canary) = (Upstream::start("v1").await, Upstream::start("v2").await);
    let mut members = bootstrap(&etcd, 2, &stable, &canary).await;
    let all: Vec<&Canary> = members.iter().collect();

    etcd.stop(0);
    wait_all(&all, "disconnected", |f, _| {
        f["connected"] == false && f["stale"] == true
    })
    .await;
    for m in &members {
        for _ in 0..20 {
            assert_eq!(m.get("/", &[]).await.status, 200);
        }
        // Frozen: the weight stays; reads still answer from the member's view.
        assert_eq!(m.status("web").await["weight"], 10.0);
    }
    // Without a leader only abort acts, and only on the member it was sent to.
    let (code, _, err) = members[0].cli(&["weight", "web", "40"]).await;
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("fleet store unavailable"), "{err}");
    let (code, out, err) = members[1]
        .cli(&["abort", "web", "--reason", "bad build"])
        .await;
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(members[1].status("web").await["weight"], 0.0);
    for _ in 0..20 {
        assert_eq!(members[1].get("/", &[]).await.version(), Some("v1"));
    }
    assert_eq!(members[0].status("web").await["weight"], 10.0);
    let f = fleet(&members[1]).await;
    assert_eq!(f["local_aborts"][0], "web", "{f}");

    // A member restarted while etcd is down serves from its cache.
    members[0].restart().await;
    assert_eq!(members[0].status("web").await["canary_version"], "v2");

    // etcd back: no restart needed, the queued abort is applied fleet-wide.
    etcd.restart(0);
    let all: Vec<&Canary> = members.iter().collect();
    wait_all(&all, "aborted fleet-wide after etcd returned", |f, s| {
        f["connected"] == true
            && s["phase"] == "aborted"
            && s["weight"] == 0.0
            && s["abort_reason"]
                .as_str()
                .is_some_and(|r| r.contains("bad build"))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_node_etcd_losing_a_node_keeps_the_fleet_in_step() {
    if !etcd_available() {
        return;
    }
    let mut etcd = Etcd::start(3);
    let (stable, canary) = (Upstream::start("v1").await, Upstream::start("v2").await);
    let members = bootstrap(&etcd, 2, &stable, &canary).await;
    etcd.stop(0);
    let all: Vec<&Canary> = members.iter().collect();
    let follower = members
        .iter()
        .find(|m| {
            let log = m.log();
            !log.contains("this member leads")
        })
        .expect("a follower");
    // The next write may wait for a raft election (about 2 s measured): retry.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (code, _, err) = follower.cli(&["weight", "web", "70"]).await;
        if code == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "weight never accepted: {err}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    wait_all(&all, "at 70 %", |f, s| {
        f["connected"] == true && s["weight"] == 70.0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_etcd_never_confirmed_is_not_answered_as_done_and_the_fleet_stays_in_step() {
    if !etcd_available() {
        return;
    }
    let etcd = Etcd::start(1);
    let (stable, canary) = (Upstream::start("v1").await, Upstream::start("v2").await);
    let members = bootstrap(&etcd, 2, &stable, &canary).await;
    let mut leader = None;
    for m in &members {
        if fleet(m).await["leading"] == true {
            leader = Some(m);
        }
    }
    let leader = leader.expect("a leader");
    // Frozen etcd: the leader still leads (its lease has not run out yet), runs the
    // command and cannot store it.
    etcd.signal(0, "STOP");
    let (code, out, err) = leader.cli(&["weight", "web", "40"]).await;
    etcd.signal(0, "CONT");
    assert_ne!(code, 0, "answered as done though etcd was frozen: {out}");
    assert!(err.contains("etcd"), "{err}");
    // Whatever etcd ended up with, every member follows it.
    let all: Vec<&Canary> = members.iter().collect();
    wait_all(&all, "reconnected under a leader", |f, _| {
        f["connected"] == true && f["leader"].is_string()
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let mut weights = Vec::new();
        for m in &members {
            weights.push(m.status("web").await["weight"].clone());
        }
        let same = weights.iter().all(|w| *w == weights[0]);
        if same && (weights[0] == 10.0 || weights[0] == 40.0) {
            break;
        }
        assert!(Instant::now() < deadline, "members disagree: {weights:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // And the fleet takes commands again.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (code, _, err) = leader.cli(&["weight", "web", "30"]).await;
        if code == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "weight never accepted: {err}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    wait_all(&all, "at 30 %", |f, s| {
        f["connected"] == true && s["weight"] == 30.0
    })
    .await;
}

/// The full reloads a member counted, by reason, from its `/metrics`.
fn reloads(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("canary_fleet_reloads_total{reason=\"")?;
            let (reason, v) = rest.split_once("\"} ")?;
            Some((reason.to_string(), v.trim().parse().ok()?))
        })
        .collect()
}

fn fenced_writes(text: &str) -> f64 {
    common::metric_value(text, "canary_fleet_fenced_writes_total", &[]).expect("fenced writes")
}

async fn leader_index(members: &[Canary]) -> usize {
    for (i, m) in members.iter().enumerate() {
        if fleet(m).await["leading"] == true {
            return i;
        }
    }
    panic!("no member leads");
}

/// The rollout state etcd holds for `web`.
fn stored_state(etcd: &Etcd) -> Value {
    let (ok, out) = etcd.ctl(&["get", "/canary/t/routes/web/state", "--print-value-only"]);
    assert!(ok, "{out}");
    if out.trim().is_empty() {
        return Value::Null;
    }
    let v: Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
    v["state"].clone()
}

/// Megabyte values under the prefix, in keys no member reads: `n` of them, then they
/// are deleted (a reload reads the whole prefix, and stays small).
fn filler(etcd: &Etcd, n: usize) {
    let mb = vec![b'x'; 1 << 20];
    for _ in 0..n {
        let (ok, out) = etcd.ctl_stdin(&["put", "/canary/t/filler"], &mb);
        assert!(ok, "{out}");
    }
}

fn drop_filler(etcd: &Etcd) {
    let (ok, out) = etcd.ctl(&["del", "--prefix", "/canary/t/filler"]);
    assert!(ok, "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_frozen_during_a_compaction_reloads_and_catches_up() {
    if !etcd_available() {
        return;
    }
    let etcd = Etcd::start(1);
    let (stable, canary) = (Upstream::start("v1").await, Upstream::start("v2").await);
    // No rollout: the leader writes nothing on its own, so the frozen member can only
    // learn the weights below by reloading.
    let members = bootstrap_with(&etcd, 3, 2, &document_manual(&stable, &canary)).await;
    let leader = leader_index(&members).await;
    // A follower freezes; another follower takes the commands (forwarded to the leader).
    let (frozen, actor) = (&members[(leader + 1) % 3], &members[(leader + 2) % 3]);
    let before = reloads(&frozen.metrics().await);
    let pid = frozen.pid().expect("running");
    signal(pid, "STOP");
    // Busy writes while it is frozen: 3 MB (more than the 2 MB HTTP/2 stream window its
    // etcd client grants) and then 150 more watch responses (more than etcd queues per
    // watch stream, 128). etcd then drops its watcher out of the live set, to catch it
    // up from history later, and the compaction below removes that history: it must
    // reload, not resume.
    filler(&etcd, 3);
    etcd.small_puts("/canary/t/filler-small", 150).await;
    drop_filler(&etcd);
    for w in [20, 60, 100] {
        let (code, v) = actor
            .admin_put("/api/v1/routes/web/weight", &format!("{{\"weight\": {w}}}"))
            .await;
        assert_eq!(code, 200, "{v}");
    }
    let rev = etcd.revision();
    let (ok, out) = etcd.ctl(&["compact", &rev.to_string()]);
    assert!(ok, "{out}");
    signal(pid, "CONT");

    // Every member at 100 % on one applied revision (at least the compacted one).
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let mut views = Vec::new();
        for m in &members {
            views.push((fleet(m).await, m.status("web").await));
        }
        let first = views[0].0["applied_revision"].as_i64();
        let same = views.iter().all(|(f, s)| {
            f["connected"] == true
                && s["weight"] == 100.0
                && f["applied_revision"].as_i64() == first
        });
        if same && first >= Some(rev) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not caught up within 15s (compacted at {rev}):\n{views:#?}\nlog of the frozen member:\n{}",
            frozen.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for _ in 0..10 {
        assert_eq!(frozen.get("/", &[]).await.version(), Some("v2"));
    }
    let after = reloads(&frozen.metrics().await);
    let grew: Vec<(&String, &f64)> = after
        .iter()
        .filter(|(r, n)| r.as_str() != "start" && **n > before.get(*r).copied().unwrap_or(0.0))
        .collect();
    assert!(
        !grew.is_empty(),
        "the frozen member never reloaded: before {before:?}, after {after:?}"
    );
    // Not a wiped etcd: etcd 3.4 answers a progress request ahead of the events it
    // still queues for a member that fell behind, which once looked like a revision
    // going backwards.
    assert!(
        !after.contains_key("revision_back"),
        "a frozen member's catch-up taken for a wiped etcd: {after:?}\n{}",
        frozen.log()
    );
    eprintln!("the frozen member reloaded: {grew:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_leader_wakes_deposed_and_does_not_move_the_rollout() {
    if !etcd_available() {
        return;
    }
    let etcd = Etcd::start(1);
    let (stable, canary) = (Upstream::start("v1").await, Upstream::start("v2").await);
    let members = bootstrap(&etcd, 3, &stable, &canary).await;
    let old_i = leader_index(&members).await;
    let old = &members[old_i];
    let old_name = format!("p{old_i}");
    let fenced_before = fenced_writes(&old.metrics().await);
    let pid = old.pid().expect("running");
    signal(pid, "STOP");

    // Past its lease another member leads, and the fleet moves on without the old
    // one: the rollout is aborted.
    let others: Vec<&Canary> = (0..3)
        .filter(|i| *i != old_i)
        .map(|i| &members[i])
        .collect();
    wait_all(&others, "under a new leader", |f, _| {
        leader_of(f).is_some_and(|l| l != old_name)
    })
    .await;
    let new_leader = leader_of(&fleet(others[0]).await).expect("a leader");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (code, v) = others[0]
            .admin_post("/api/v1/routes/web/abort", "{\"reason\": \"held\"}")
            .await;
        if code == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "abort never accepted: {v}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let aborted = |s: &Value| s["phase"] == "aborted" && s["weight"] == 0.0;
    wait_all(&others, "aborted", |_, s| aborted(s)).await;

    // The old leader still believes the rollout runs and that it leads: a promote
    // waits in its socket and runs the moment it wakes, before it can learn
    // otherwise. The new leader would refuse it (409: aborted); the old one accepts
    // it, and only the fence keeps its write out of etcd.
    let url = format!("http://{}/api/v1/routes/web/promote", old.admin);
    let cmd = tokio::spawn(async move {
        common::send(&common::client(), http::Method::POST, &url, &[], "{}").await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    signal(pid, "CONT");
    let answer = cmd.await.expect("join").expect("an answer");
    assert_ne!(
        answer.status, 200,
        "the deposed leader moved the rollout: {answer:?}"
    );

    let all: Vec<&Canary> = members.iter().collect();
    let held = |f: &Value, s: &Value| {
        leader_of(f).as_deref() == Some(new_leader.as_str())
            && f["connected"] == true
            && aborted(s)
            && s["step"] == 0
    };
    wait_all(&all, "following the new leader, aborted", held).await;
    assert_eq!(fleet(old).await["leading"], false);
    // And later: a write the old leader got through would show by now.
    tokio::time::sleep(Duration::from_secs(1)).await;
    wait_all(&all, "still aborted under the new leader", held).await;
    let stored = stored_state(&etcd);
    assert_eq!(
        (&stored["phase"], &stored["step"], &stored["weight_bp"]),
        (&json!("aborted"), &json!(0), &json!(0)),
        "{stored:#}"
    );
    let (_, events) = members[0].admin_get("/api/v1/routes/web/events").await;
    assert!(
        !events.to_string().contains("\"step\":1"),
        "a promotion reached the journal: {events:#}"
    );
    let text = old.metrics().await;
    let fenced = fenced_writes(&text) - fenced_before;
    let changes =
        common::metric_value(&text, "canary_fleet_leader_changes_total", &[]).unwrap_or(0.0);
    assert!(changes >= 2.0, "led and stopped leading: {changes}\n{text}");
    assert!(
        old.log().contains("no longer leading"),
        "the old leader never said it stopped:\n{}",
        old.log()
    );
    eprintln!(
        "the old leader: promote answered {} {:?}; {fenced} fenced write(s)",
        answer.status, answer.body
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_whose_key_was_replaced_has_its_next_write_fenced_and_demotes() {
    if !etcd_available() {
        return;
    }
    let etcd = Etcd::start(1);
    let (stable, canary) = (Upstream::start("v1").await, Upstream::start("v2").await);
    // One member, with a lease long enough that a short freeze does not end it: only
    // the fence can stop its write.
    let members = bootstrap_with(&etcd, 1, 6, &document(&stable, &canary, "v2")).await;
    let m = &members[0];
    let fake = r#"{"member":"fake","admin":"http://127.0.0.1:9","boot_id":"fake"}"#;
    let mut hit = false;
    for attempt in 0..3 {
        wait_all(&[m], "leading", |f, _| {
            f["leading"] == true && f["connected"] == true
        })
        .await;
        // The leader shows a change before etcd has it: wait until the rollout's
        // state is stored, or the test would fence the write that starts it.
        let deadline = Instant::now() + Duration::from_secs(10);
        while stored_state(&etcd)["weight_bp"] != 1000 {
            assert!(
                Instant::now() < deadline,
                "the rollout's state never reached etcd"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let fenced_before = fenced_writes(&m.metrics().await);
        let pid = m.pid().expect("running");
        signal(pid, "STOP");
        // Megabytes first, so its watch reaches the new leader key well after the
        // command below has run; then the leader key is replaced: a new create
        // revision, as if another member had won an election.
        filler(&etcd, 4);
        let (ok, out) = etcd.ctl(&["del", "/canary/t/leader"]);
        assert!(ok, "{out}");
        let (ok, out) = etcd.ctl(&["put", "/canary/t/leader", fake]);
        assert!(ok, "{out}");
        // A command waits in the frozen member's socket and runs when it wakes.
        let url = format!("http://{}/api/v1/routes/web/weight", m.admin);
        let cmd = tokio::spawn(async move {
            common::send(
                &common::client(),
                http::Method::PUT,
                &url,
                &[],
                "{\"weight\": 40}",
            )
            .await
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        signal(pid, "CONT");
        let answer = cmd.await.expect("join").expect("an answer");

        wait_all(&[m], "following the fake leader", |f, _| {
            f["leader"] == "fake" && f["leading"] == false
        })
        .await;
        // Nothing it decided reached etcd or stays in its data plane.
        let stored = stored_state(&etcd);
        assert_eq!(stored["weight_bp"], 1000, "{stored:#}");
        m.wait_weight("web", 10.0).await;
        assert_ne!(answer.status, 200, "{answer:?}");
        drop_filler(&etcd);
        let fenced = fenced_writes(&m.metrics().await) - fenced_before;
        if fenced >= 1.0 {
            assert_eq!(answer.status, 503, "{answer:?}");
            assert!(answer.body.contains("not stored"), "{answer:?}");
            // (Its log says why it stepped down: the fenced write, or the new key, when
            // the watch delivered that while the write was on its way.)
            hit = true;
            break;
        }
        // Its watch showed the new key first: it stepped down without writing and
        // sent the command to the (unreachable) fake leader. Try again.
        eprintln!("attempt {attempt}: demoted before writing; the command got {answer:?}");
        let (ok, out) = etcd.ctl(&["del", "/canary/t/leader"]);
        assert!(ok, "{out}");
    }
    assert!(hit, "no write reached the fence in 3 attempts");

    // With the fake key gone the member leads again, and its writes land.
    let (ok, out) = etcd.ctl(&["del", "/canary/t/leader"]);
    assert!(ok, "{out}");
    wait_all(&[m], "leading again", |f, _| f["leading"] == true).await;
    let (code, v) = m
        .admin_put("/api/v1/routes/web/weight", "{\"weight\": 40}")
        .await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(stored_state(&etcd)["weight_bp"], 4000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_shows_every_members_applied_revision_and_who_does_not_answer() {
    if !etcd_available() {
        return;
    }
    let etcd = Etcd::start(1);
    let (stable, canary) = (Upstream::start("v1").await, Upstream::start("v2").await);
    // No rollout, so no verdict writes move the revision while the views are compared;
    // a lease long enough that a frozen member stays listed.
    let members = bootstrap_with(&etcd, 3, 5, &document_manual(&stable, &canary)).await;
    let leader = leader_index(&members).await;
    let (follower, frozen) = (&members[(leader + 1) % 3], &members[(leader + 2) % 3]);
    let (code, v) = follower
        .admin_put("/api/v1/routes/web/weight", "{\"weight\": 30}")
        .await;
    assert_eq!(code, 200, "{v}");

    // The follower lists every member at the revision that member reports itself.
    let deadline = Instant::now() + Duration::from_secs(15);
    let own: BTreeMap<String, Value> = loop {
        let mut own = BTreeMap::new();
        for m in &members {
            let f = fleet(m).await;
            own.insert(
                f["member"].as_str().expect("name").to_string(),
                f["applied_revision"].clone(),
            );
        }
        let view = fleet(follower).await;
        let listed: BTreeMap<String, Value> = view["members"]
            .as_array()
            .expect("members")
            .iter()
            .map(|m| {
                (
                    m["member"].as_str().expect("name").to_string(),
                    m["applied_revision"].clone(),
                )
            })
            .collect();
        if listed == own && own.values().all(Value::is_i64) {
            break own;
        }
        assert!(
            Instant::now() < deadline,
            "the follower's table {listed:?} is not what the members say: {own:?}\n{view:#}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let (code, out, err) = follower.cli(&["fleet", "status"]).await;
    assert_eq!(code, 0, "{err}");
    for (name, rev) in &own {
        assert!(
            out.lines()
                .any(|l| l.starts_with(name.as_str()) && l.contains(&rev.to_string())),
            "{name} at {rev} missing:\n{out}"
        );
    }

    // A member that does not answer: still listed (its lease runs), no revision, and why.
    let pid = frozen.pid().expect("running");
    signal(pid, "STOP");
    let view = fleet(follower).await;
    signal(pid, "CONT");
    let name = format!("p{}", (leader + 2) % 3);
    let row = view["members"]
        .as_array()
        .expect("members")
        .iter()
        .find(|m| m["member"] == name.as_str())
        .unwrap_or_else(|| panic!("{name} not listed: {view:#}"))
        .clone();
    assert!(row["applied_revision"].is_null(), "{row:#}");
    assert!(
        row["error"]
            .as_str()
            .is_some_and(|e| e.contains("no answer within")),
        "{row:#}"
    );
    let answered = view["members"]
        .as_array()
        .expect("members")
        .iter()
        .filter(|m| m["applied_revision"].is_i64())
        .count();
    assert_eq!(answered, 2, "{view:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_loads_a_prefix_larger_than_the_grpc_default_of_4_mb() {
    if !etcd_available() {
        return;
    }
    let etcd = Etcd::start(1);
    let (stable, canary) = (Upstream::start("v1").await, Upstream::start("v2").await);
    let mut members = bootstrap_with(&etcd, 2, 2, &document_manual(&stable, &canary)).await;
    let (code, v) = members[0]
        .admin_put("/api/v1/routes/web/weight", "{\"weight\": 30}")
        .await;
    assert_eq!(code, 200, "{v}");
    // A long journal (etcd keeps up to 10 000 events per route, with verdicts and
    // reasons of a kilobyte and more): 5000 events of about 1.2 KB, 6 MB in all.
    let (ok, out) = etcd.ctl(&[
        "get",
        "--prefix",
        "/canary/t/journal/web/",
        "--print-value-only",
    ]);
    assert!(ok, "{out}");
    let mut event: Value =
        serde_json::from_str(out.lines().next().expect("an event")).expect("json");
    event["reason"] = json!("r".repeat(1200));
    let text = event.to_string();
    let kvs: Vec<(String, String)> = (1000..6000)
        .map(|seq| (format!("/canary/t/journal/web/{seq:020}"), text.clone()))
        .collect();
    etcd.bulk_put(&kvs, 100).await;

    // A member started now reads it all in its first snapshot, and then follows.
    let leader = leader_index(&members).await;
    members[1 - leader].restart().await;
    let (code, v) = members[leader]
        .admin_put("/api/v1/routes/web/weight", "{\"weight\": 70}")
        .await;
    assert_eq!(code, 200, "{v}");
    let all: Vec<&Canary> = members.iter().collect();
    wait_all(&all, "connected at 70 %", |f, s| {
        f["connected"] == true && s["weight"] == 70.0
    })
    .await;
    let (code, events) = members[1 - leader]
        .admin_get("/api/v1/routes/web/events?limit=3")
        .await;
    assert_eq!(code, 200, "{events}");
    assert!(events.to_string().contains("rrrr"), "{events}");
}
