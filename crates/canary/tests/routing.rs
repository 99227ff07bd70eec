//! Routing end to end: the weighted split, stickiness (header and generated cookie),
//! raising the weight by reloading the file, and every kind of rule.

mod common;

use common::{addrs, share, versions_for, Canary, Upstream};

/// A route serving `v1` (stable) and `v2` (canary) with `extra` appended (indented
/// by four spaces: `weight`, `rules`, `path_prefix`, ...).
fn route(name: &str, v1: &Upstream, v2: &Upstream, extra: &str) -> String {
    format!(
        "  - name: {name}\n    stable: {{version: v1, upstreams: {}}}\n    canary: {{version: v2, upstreams: {}}}\n{extra}",
        addrs(&[v1]),
        addrs(&[v2])
    )
}

fn users(n: usize, prefix: &str) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weight_10_sends_about_10_percent_of_users_and_0_and_100_are_exact() {
    let v1 = Upstream::start("v1").await;
    let v2 = Upstream::start("v2").await;
    let sticky = "    sticky: {header: x-user-id}\n";
    let body = format!(
        "routes:\n{}{}{}",
        route(
            "none",
            &v1,
            &v2,
            &format!("    path_prefix: /none\n    weight: 0\n{sticky}")
        ),
        route(
            "all",
            &v1,
            &v2,
            &format!("    path_prefix: /all\n    weight: 100\n{sticky}")
        ),
        route("web", &v1, &v2, &format!("    weight: 10\n{sticky}")),
    );
    let c = Canary::start(&body).await;

    let u = users(4000, "user");
    let got = versions_for(&c, "/", "x-user-id", &u, 8).await;
    let pct = share(&got, "v2");
    eprintln!("weight 10: {pct:.2}% of 4000 users on v2");
    assert!(
        got.iter().all(|v| v == "v1" || v == "v2"),
        "unexpected versions"
    );
    assert!(
        (pct - 10.0).abs() <= 2.5,
        "v2 share {pct:.2}% is not 10±2.5"
    );
    let n_v2 = got.iter().filter(|v| *v == "v2").count() as u64;
    assert_eq!(v2.requests(), n_v2, "the v2 upstream served the v2 answers");

    let none = versions_for(&c, "/none", "x-user-id", &u[..1000], 8).await;
    assert_eq!(share(&none, "v2"), 0.0, "weight 0 must send no one to v2");
    let all = versions_for(&c, "/all", "x-user-id", &u[..1000], 8).await;
    assert_eq!(
        share(&all, "v2"),
        100.0,
        "weight 100 must send everyone to v2"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_keep_their_version_by_header_and_by_generated_cookie() {
    let v1 = Upstream::start("v1").await;
    let v2 = Upstream::start("v2").await;
    let body = format!(
        "routes:\n{}",
        route(
            "web",
            &v1,
            &v2,
            "    weight: 50\n    sticky: {header: x-user-id, cookie: canary_id}\n"
        )
    );
    let c = Canary::start(&body).await;

    let u = users(300, "sticky");
    let first = versions_for(&c, "/", "x-user-id", &u, 6).await;
    for round in 1..3 {
        let again = versions_for(&c, "/", "x-user-id", &u, 6).await;
        let moved: Vec<_> = u
            .iter()
            .zip(first.iter().zip(&again))
            .filter(|(_, (a, b))| a != b)
            .map(|(u, _)| u)
            .collect();
        assert!(
            moved.is_empty(),
            "round {round}: users changed version: {moved:?}"
        );
    }
    let pct = share(&first, "v2");
    assert!((30.0..=70.0).contains(&pct), "weight 50 gave {pct}% v2");

    // Clients without an id get one in a cookie and keep their version with it.
    let mut seen = std::collections::BTreeSet::new();
    for client in 0..20 {
        let r = c.get("/", &[]).await;
        assert_eq!(r.status, 200);
        let cookie = r
            .header("set-cookie")
            .unwrap_or_else(|| panic!("client {client}: no Set-Cookie: {:?}", r.headers))
            .to_string();
        let (pair, attrs) = cookie.split_once("; ").expect("cookie attributes");
        let id = pair.strip_prefix("canary_id=").expect("canary_id cookie");
        assert!(
            !id.is_empty() && id.chars().all(|c| c.is_ascii_alphanumeric()),
            "{cookie}"
        );
        let attrs: Vec<&str> = attrs.split("; ").collect();
        assert_eq!(attrs[0], "Path=/", "{cookie}");
        let max_age: u64 = attrs[1]
            .strip_prefix("Max-Age=")
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no Max-Age in {cookie}"));
        assert!(max_age > 0, "{cookie}");
        assert_eq!(&attrs[2..], ["HttpOnly", "SameSite=Lax"], "{cookie}");

        let version = r.version().expect("version").to_string();
        seen.insert(version.clone());
        let sent = format!("canary_id={id}");
        for i in 0..10 {
            let r = c.get("/", &[("cookie", sent.as_str())]).await;
            assert_eq!(r.status, 200);
            assert_eq!(
                r.version(),
                Some(version.as_str()),
                "client {client}, request {i} with its cookie changed version"
            );
            assert!(
                r.header("set-cookie").is_none(),
                "a client with a cookie must not get a new one"
            );
        }
    }
    // At weight 50, 20 random ids all landing on one side would mean the id is ignored.
    assert_eq!(seen.len(), 2, "cookie clients all got {seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raising_the_weight_in_the_file_only_moves_stable_users_to_the_canary() {
    let v1 = Upstream::start("v1").await;
    let v2 = Upstream::start("v2").await;
    let body = |w: u32| {
        format!(
            "routes:\n{}",
            route(
                "web",
                &v1,
                &v2,
                &format!("    weight: {w}\n    sticky: {{header: x-user-id}}\n")
            )
        )
    };
    let c = Canary::start(&body(10)).await;
    let u = users(4000, "mover");
    let before = versions_for(&c, "/", "x-user-id", &u, 8).await;

    c.write_config(&body(30));
    c.wait_weight("web", 30.0).await;
    let after = versions_for(&c, "/", "x-user-id", &u, 8).await;

    let back: Vec<&String> = u
        .iter()
        .zip(before.iter().zip(&after))
        .filter(|(_, (b, a))| *b == "v2" && *a == "v1")
        .map(|(u, _)| u)
        .collect();
    assert!(back.is_empty(), "users moved from v2 back to v1: {back:?}");
    let moved = before
        .iter()
        .zip(&after)
        .filter(|(b, a)| *b == "v1" && *a == "v2")
        .count();
    let (p10, p30) = (share(&before, "v2"), share(&after, "v2"));
    eprintln!("v2 share {p10:.2}% at 10, {p30:.2}% at 30; {moved} users moved to v2");
    assert!((p10 - 10.0).abs() <= 2.5, "{p10}");
    assert!((p30 - 30.0).abs() <= 2.5, "{p30}");
    assert!(moved > 0);
}

/// (path, request headers, expected version, what the case shows).
type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str, &'a str);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_rule_kind_matches_and_the_first_matching_rule_wins() {
    let v1 = Upstream::start("v1").await;
    let v2 = Upstream::start("v2").await;
    let rules = "    rules:
      - header: {name: x-force-stable, present: true}
        to: stable
      - header: {name: x-canary, value: always}
        to: canary
      - header: {name: x-group, regex: \"^beta-[0-9]+$\"}
        to: canary
      - cookie: {name: beta, value: \"1\"}
        to: canary
      - query: {name: canary, value: \"1\"}
        to: canary
      - query: {name: preview}
        to: canary
";
    let body = format!(
        "routes:\n{}{}{}{}",
        route(
            "src",
            &v1,
            &v2,
            "    path_prefix: /src\n    weight: 0\n    rules:\n      - source: [\"127.0.0.0/8\"]\n        to: canary\n"
        ),
        route(
            "nosrc",
            &v1,
            &v2,
            "    path_prefix: /nosrc\n    weight: 0\n    rules:\n      - source: [\"10.0.0.0/8\", \"192.168.1.7\"]\n        to: canary\n"
        ),
        route("full", &v1, &v2, &format!("    path_prefix: /full\n    weight: 100\n{rules}")),
        route("web", &v1, &v2, &format!("    weight: 0\n{rules}")),
    );
    let c = Canary::start(&body).await;

    let cases: &[Case] = &[
        ("/", &[], "v1", "no rule, weight 0"),
        ("/", &[("x-canary", "always")], "v2", "header exact"),
        (
            "/",
            &[("x-canary", "Always")],
            "v1",
            "header exact is case-sensitive",
        ),
        (
            "/",
            &[("x-canary", "always-not")],
            "v1",
            "header exact is not a prefix",
        ),
        ("/", &[("x-group", "beta-42")], "v2", "header regex"),
        ("/", &[("x-group", "beta-x")], "v1", "header regex mismatch"),
        (
            "/",
            &[("x-group", "alpha-beta-1")],
            "v1",
            "header regex anchored",
        ),
        ("/", &[("cookie", "a=b; beta=1")], "v2", "cookie"),
        ("/", &[("cookie", "beta=2")], "v1", "cookie other value"),
        ("/", &[("cookie", "notbeta=1")], "v1", "cookie other name"),
        ("/?canary=1", &[], "v2", "query value"),
        ("/?x=2&canary=1", &[], "v2", "query value, second parameter"),
        ("/?canary=2", &[], "v1", "query other value"),
        ("/?preview", &[], "v2", "query present, no value"),
        ("/?preview=yes", &[], "v2", "query present, with value"),
        ("/?previewx=1", &[], "v1", "query other name"),
        (
            "/",
            &[("x-force-stable", ""), ("x-canary", "always")],
            "v1",
            "first matching rule wins (stable before canary)",
        ),
        (
            "/?canary=1",
            &[("x-force-stable", "1")],
            "v1",
            "first rule beats a later query rule",
        ),
        ("/full", &[], "v2", "weight 100 without a rule"),
        (
            "/full",
            &[("x-force-stable", "1")],
            "v1",
            "a rule beats weight 100",
        ),
        (
            "/full",
            &[("x-canary", "always")],
            "v2",
            "canary rule at weight 100",
        ),
        (
            "/src",
            &[],
            "v2",
            "source 127.0.0.0/8 matches the loopback client",
        ),
        ("/nosrc", &[], "v1", "non-matching source falls to weight 0"),
    ];
    let mut failures = Vec::new();
    for (path, headers, want, what) in cases {
        // The same request from several users: rules ignore the sticky bucket.
        for user in ["a", "b", "c", "d"] {
            let mut h = headers.to_vec();
            h.push(("x-user-id", user));
            let r = c.get(path, &h).await;
            assert_eq!(r.status, 200, "{what}: {r:?}");
            if r.version() != Some(*want) {
                failures.push(format!(
                    "{what}: GET {path} {headers:?} as {user} → {:?}, want {want}",
                    r.version()
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "rule mismatches:\n{}",
        failures.join("\n")
    );
}
