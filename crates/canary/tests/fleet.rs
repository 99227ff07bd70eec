//! Fleet mode end to end: real etcd (Debian's `etcd`, started here on loopback ports
//! with a temp data dir) and three `canary serve` members.
//!
//! Without an `etcd` binary on PATH the tests print why and pass, except under
//! `CI=true`, where they fail: CI installs etcd (scripts/test.sh).

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, run_canary, Canary, Upstream};
use serde_json::Value;

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
        let pid = self.members[i].as_ref().expect("node running").id();
        let ok = Command::new("kill")
            .args(["-s", sig, &pid.to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill -s {sig} {pid}");
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

fn member_config(etcd: &Etcd, prefix: &str, name: &str) -> String {
    let list: Vec<String> = etcd.clients.iter().map(|c| format!("\"{c}\"")).collect();
    format!(
        "fleet:\n  etcd: [{}]\n  prefix: {prefix}\n  member: {name}\n  lease_ttl: 2s\n",
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
    let mut members = Vec::new();
    for i in 0..n {
        members
            .push(Canary::start_unready(&member_config(etcd, "/canary/t", &format!("p{i}"))).await);
    }
    let docs = tempfile::tempdir().expect("tempdir");
    let (code, out, err) = push(etcd, docs.path(), &document(stable, canary, "v2")).await;
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
