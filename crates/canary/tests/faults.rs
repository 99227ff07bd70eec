//! Upstream faults under load, through `canary serve`: the fault proxy
//! (`common::fault`) sits between canary and a real upstream and slows, slices,
//! resets, cuts or half-closes its connections. Whatever happens, a client gets the
//! upstream's exact body, a `502`/`504`, or a body that is cut and closed — never a
//! wrong body passed off as complete — and a faulted upstream socket is never used
//! again.

mod common;

use std::time::Duration;

use common::fault::{FaultProxy, Toxic};
use common::{client, pattern_body, send, Canary, Upstream};
use http::Method;

/// What a client saw, per request.
#[derive(Debug, Default)]
struct Outcomes {
    /// 200 with exactly the upstream's body.
    intact: u32,
    /// Statuses other than 200, with counts.
    statuses: Vec<(u16, u32)>,
    /// Transport errors: the body was cut and the connection closed.
    cut: u32,
    /// 200 with a body that differs from the upstream's: must stay empty.
    wrong: Vec<String>,
}

impl Outcomes {
    fn status(&self, code: u16) -> u32 {
        self.statuses
            .iter()
            .find(|(c, _)| *c == code)
            .map_or(0, |(_, n)| *n)
    }
}

/// `tasks` concurrent clients each send `per_task` GETs of an `n`-byte body on
/// `prefix`, pausing `pause` between two; bounded by the test client's timeout.
async fn load(
    c: &Canary,
    prefix: &str,
    n: usize,
    tasks: usize,
    per_task: usize,
    pause: Duration,
) -> Outcomes {
    let url = c.url(&format!("{prefix}/bytes/{n}"));
    let want = pattern_body(n);
    let runs: Vec<_> = (0..tasks)
        .map(|_| {
            let (url, want) = (url.clone(), want.clone());
            tokio::spawn(async move {
                let http = client();
                let mut o = Outcomes::default();
                for _ in 0..per_task {
                    match send(&http, Method::GET, &url, &[], "").await {
                        Ok(r) if r.status == 200 && r.body == want => o.intact += 1,
                        Ok(r) if r.status == 200 => o.wrong.push(format!(
                            "{} bytes: {:?}…",
                            r.body.len(),
                            &r.body[..r.body.len().min(80)]
                        )),
                        Ok(r) => match o.statuses.iter_mut().find(|(s, _)| *s == r.status) {
                            Some((_, k)) => *k += 1,
                            None => o.statuses.push((r.status, 1)),
                        },
                        Err(_) => o.cut += 1,
                    }
                    tokio::time::sleep(pause).await;
                }
                o
            })
        })
        .collect();
    let mut all = Outcomes::default();
    for r in runs {
        let o = r.await.expect("load task");
        all.intact += o.intact;
        all.cut += o.cut;
        all.wrong.extend(o.wrong);
        for (s, k) in o.statuses {
            match all.statuses.iter_mut().find(|(x, _)| *x == s) {
                Some((_, n)) => *n += k,
                None => all.statuses.push((s, k)),
            }
        }
    }
    all
}

/// One route per fault proxy (`/<name>` → its proxy), so each toxic gets fresh
/// upstream connections; ejection off, so every request meets the fault.
fn routes(proxies: &[(&str, &FaultProxy)], request_timeout: &str) -> String {
    let mut s = String::from("routes:\n");
    for (name, p) in proxies {
        s.push_str(&format!(
            "  - name: {name}\n    path_prefix: /{name}\n    stable: {{version: v1, upstreams: [\"{}\"]}}\n    timeouts: {{request: {request_timeout}}}\n    ejection: {{consecutive_failures: 0}}\n",
            p.addr
        ));
    }
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_sliced_upstreams_deliver_exact_bodies() {
    let up = Upstream::start("v1").await;
    let latency = FaultProxy::start(up.addr).await;
    latency.set(Toxic::Latency(Duration::from_millis(30)));
    let bandwidth = FaultProxy::start(up.addr).await;
    bandwidth.set(Toxic::Bandwidth(200_000));
    let slicer = FaultProxy::start(up.addr).await;
    slicer.set(Toxic::Slicer {
        max: 7,
        gap: Duration::from_millis(1),
    });
    let idle = FaultProxy::start(up.addr).await;
    idle.set(Toxic::CloseIdle(Duration::from_millis(100)));
    let c = Canary::start(&routes(
        &[
            ("latency", &latency),
            ("bandwidth", &bandwidth),
            ("slicer", &slicer),
            ("idle", &idle),
        ],
        "10s",
    ))
    .await;
    let cases = [
        ("/latency", 20_000, Duration::ZERO),
        ("/bandwidth", 20_000, Duration::ZERO),
        ("/slicer", 700, Duration::ZERO),
        // Pooled connections are closed by the "upstream" between two requests.
        ("/idle", 2_000, Duration::from_millis(200)),
    ];
    for (prefix, n, pause) in cases {
        let o = load(&c, prefix, n, 4, 5, pause).await;
        assert_eq!(o.intact, 20, "{prefix}: {o:?}\n{}", c.log());
    }
    assert!(
        idle.faults() > 0,
        "the idle toxic never closed a connection"
    );
    for p in [&latency, &bandwidth, &slicer, &idle] {
        assert_eq!(p.after_fault(), 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_upstream_connections_give_502_or_a_cut_body_and_are_never_reused() {
    let up = Upstream::start("v1").await;
    // Cut inside the head (→ 502) and inside the body (→ a cut body).
    let reset_head = FaultProxy::start(up.addr).await;
    reset_head.set(Toxic::ResetAfter(10));
    let reset_body = FaultProxy::start(up.addr).await;
    reset_body.set(Toxic::ResetAfter(5_000));
    let limit_body = FaultProxy::start(up.addr).await;
    limit_body.set(Toxic::LimitData(5_000));
    let half_head = FaultProxy::start(up.addr).await;
    half_head.set(Toxic::HalfClose(10));
    let half_body = FaultProxy::start(up.addr).await;
    half_body.set(Toxic::HalfClose(5_000));
    let clean = FaultProxy::start(up.addr).await;
    let proxies = [
        ("resethead", &reset_head),
        ("resetbody", &reset_body),
        ("limitbody", &limit_body),
        ("halfhead", &half_head),
        ("halfbody", &half_body),
    ];
    let mut all = proxies.to_vec();
    all.push(("clean", &clean));
    let c = Canary::start(&routes(&all, "5s")).await;
    for (name, p) in proxies {
        let o = load(&c, &format!("/{name}"), 20_000, 4, 5, Duration::ZERO).await;
        assert!(o.wrong.is_empty(), "{name}: wrong complete bodies: {o:?}");
        assert_eq!(o.intact, 0, "{name}: {o:?}");
        if name.ends_with("head") {
            assert_eq!(o.status(502), 20, "{name}: {o:?}");
        } else {
            assert_eq!(o.cut, 20, "{name}: {o:?}");
        }
        assert_eq!(p.faults(), p.accepted(), "{name}: every connection faulted");
        assert!(p.faults() >= 20, "{name}: {} faults", p.faults());
        // Canary wrote nothing more on a half-closed socket, and keeps none of them.
        assert_eq!(
            p.after_fault(),
            0,
            "{name}: a faulted socket was used again"
        );
        assert_eq!(
            p.wait_open_at_most(0, Duration::from_secs(5)).await,
            0,
            "{name}: faulted upstream sockets still open"
        );
    }
    // Serving continues: the same upstream through a clean proxy.
    let o = load(&c, "/clean", 1_000, 2, 5, Duration::ZERO).await;
    assert_eq!(o.intact, 10, "{o:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_upstream_is_a_504_and_its_socket_is_closed_not_pooled() {
    let up = Upstream::start("v1").await;
    let stall = FaultProxy::start(up.addr).await;
    stall.set(Toxic::Latency(Duration::from_millis(1_500)));
    let c = Canary::start(&routes(&[("stall", &stall)], "300ms")).await;
    let o = load(&c, "/stall", 1_000, 4, 2, Duration::ZERO).await;
    assert_eq!(o.status(504), 8, "{o:?}");
    assert!(o.wrong.is_empty() && o.intact == 0, "{o:?}");
    // Each timed-out connection was closed by canary (its stalled answer arrives
    // later and must never be read as the answer to another request).
    assert_eq!(
        stall.wait_open_at_most(0, Duration::from_secs(10)).await,
        0,
        "timed-out upstream sockets kept open"
    );
    assert_eq!(stall.accepted(), 8, "a timed-out socket was reused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_one_of_two_instances_fails_no_request_and_moves_no_canary_user() {
    kill_one_of_two_under_load("").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_one_of_two_http2_instances_fails_no_request_and_moves_no_canary_user() {
    // The same through hyper's client (an `http2: true` pool; TLS pools take the same
    // path): a request without a body is sent from a copy of its head.
    kill_one_of_two_under_load(", http2: true").await;
}

/// Two instances per version (`pool`: more of each version's pool, as YAML flow
/// fields), 200 sticky users at about 200 requests per second; one instance of each
/// version is killed in turn. No request may fail, no user change version, and at
/// least one request must have been retried.
async fn kill_one_of_two_under_load(pool: &str) {
    let (v1a, v1b) = (Upstream::start("v1").await, Upstream::start("v1").await);
    let (v2a, v2b) = (Upstream::start("v2").await, Upstream::start("v2").await);
    let body = format!(
        "routes:\n  - name: web\n    stable: {{version: v1, upstreams: {}{pool}}}\n    canary: {{version: v2, upstreams: {}{pool}}}\n    weight: 50\n    sticky: {{header: x-user-id}}\n",
        common::addrs(&[&v1a, &v1b]),
        common::addrs(&[&v2a, &v2b]),
    );
    let c = Canary::start(&body).await;
    let url = c.url("/");
    // 200 users, about 200 requests per second, each user's version recorded.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let tasks: Vec<_> = (0..4)
        .map(|t| {
            let (url, stop) = (url.clone(), stop.clone());
            tokio::spawn(async move {
                let http = client();
                let mut seen = Vec::new();
                let mut n = t;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let user = format!("user-{}", n % 200);
                    let r = send(&http, Method::GET, &url, &[("x-user-id", &user)], "").await;
                    seen.push((
                        user,
                        r.map(|r| (r.status, r.version().map(str::to_string), r.body)),
                    ));
                    n += 4;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                seen
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    drop(v2a);
    tokio::time::sleep(Duration::from_secs(1)).await;
    drop(v1a);
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut first: std::collections::HashMap<String, String> = Default::default();
    let mut total = 0;
    for t in tasks {
        for (user, r) in t.await.expect("load task") {
            total += 1;
            let (status, version, body) = r.unwrap_or_else(|e| panic!("{user}: {e}"));
            assert_eq!(
                status,
                200,
                "{user}: a request failed when an instance died: {body}\n{}",
                c.log()
            );
            let version = version.expect("x-canary-version");
            let was = first.entry(user.clone()).or_insert_with(|| version.clone());
            assert_eq!(*was, version, "{user} moved from {was} to {version}");
        }
    }
    assert!(total > 200, "too little load: {total}");
    let m = c.metrics().await;
    let retries: f64 = ["v1", "v2"]
        .iter()
        .filter_map(|v| {
            common::metric_value(
                &m,
                "canary_retries_total",
                &[("route", "web"), ("version", v)],
            )
        })
        .sum();
    assert!(retries >= 1.0, "no request was retried: {m}");
}
