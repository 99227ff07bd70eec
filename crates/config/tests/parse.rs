//! The config format end to end: a full file's values, and the exact position and
//! wording of each kind of error.

use std::net::SocketAddr;

use canary_config::{
    diff, load, parse, Config, ConfigError, Diagnostic, Ejection, Limits, Timeouts, Underscores,
};
use canary_core::analysis::AnalysisSpec;
use canary_core::rollout::{BreakerSpec, Pause, Step};
use canary_core::routing::HostMatch;
use canary_core::{RuleMatch, Target, Weight};

const FULL: &str = include_str!("data/full.yaml");

/// A valid file with one route `web` (stable v1, canary v2), lines 1–5; tests append
/// lines from line 6 on.
const BASE: &str = "\
listen: 127.0.0.1:8080
routes:
  - name: web
    stable: {version: v1, upstreams: [\"127.0.0.1:9001\"]}
    canary: {version: v2, upstreams: [\"127.0.0.1:9002\"]}
";

fn ok(yaml: &str) -> Config {
    match parse("c.yaml", yaml) {
        Ok(c) => c,
        Err(e) => panic!("expected a valid config, got:\n{e}"),
    }
}

fn errors(yaml: &str) -> Vec<String> {
    match parse("c.yaml", yaml) {
        Ok(_) => panic!("expected errors for:\n{yaml}"),
        Err(e) => e.diagnostics.iter().map(Diagnostic::to_string).collect(),
    }
}

/// Asserts the file has exactly one error, at `line:column`, containing `needle`.
#[track_caller]
fn one_error(yaml: &str, at: &str, needle: &str) {
    let errs = errors(yaml);
    assert_eq!(errs.len(), 1, "expected one error, got {errs:#?}");
    let prefix = format!("c.yaml:{at}: ");
    assert!(
        errs[0].starts_with(&prefix) && errs[0].contains(needle),
        "expected `{prefix}…{needle}…`, got `{}`",
        errs[0]
    );
}

#[test]
fn full_example_parses_into_the_expected_values() {
    let c = ok(FULL);
    assert_eq!(c.listen, "127.0.0.1:8080".parse::<SocketAddr>().unwrap());
    assert_eq!(c.admin, "127.0.0.1:9901".parse::<SocketAddr>().unwrap());
    assert_eq!(c.state_dir, std::path::PathBuf::from("./canary-state"));
    assert_eq!(c.admin_token_env.as_deref(), Some("CANARY_ADMIN_TOKEN"));
    assert_eq!(c.workers, Some(1));
    assert_eq!(
        c.limits,
        Limits {
            max_header_bytes: 16384,
            header_timeout_ms: 10_000,
            max_connections: 10_000,
            headers_with_underscores: Underscores::Drop,
            body_timeout_ms: 20_000,
            send_timeout_ms: 30_000,
            http2_idle_timeout_ms: 300_000,
        }
    );
    assert_eq!(c.routes.len(), 2);

    let web = &c.routes[0];
    let r = &web.route;
    assert_eq!(r.name, "web");
    assert_eq!(r.seed, canary_core::route_seed("web"));
    assert_eq!(
        r.hosts,
        vec![
            HostMatch::Exact("shop.example.com".into()),
            HostMatch::Suffix(".example.org".into())
        ]
    );
    assert_eq!(r.path_prefix, "/");
    assert!(r.has_canary);
    assert_eq!(r.sticky.header.as_deref(), Some("x-user-id"), "lowercased");
    assert_eq!(r.sticky.cookie, "canary_id");

    assert_eq!(web.stable.version, "v1");
    assert_eq!(web.stable.upstreams, ["127.0.0.1:9001", "127.0.0.1:9011"]);
    assert!(!web.stable.http2);
    let hc = web.stable.health_check.as_ref().unwrap();
    assert_eq!(
        (hc.path.as_str(), hc.interval_ms, hc.timeout_ms),
        ("/healthz", 5_000, 2_000)
    );
    assert_eq!((hc.unhealthy_threshold, hc.healthy_threshold), (2, 1));
    let canary = web.canary.as_ref().unwrap();
    assert_eq!(canary.version, "v2");
    assert_eq!(canary.upstreams, ["127.0.0.1:9002"]);
    assert_eq!(web.weight, Weight::from_percent(10.0).unwrap());

    assert_eq!(r.rules.len(), 8);
    assert!(matches!(&r.rules[0].matcher,
        RuleMatch::HeaderEquals { name, value } if name == "x-canary" && value == "always"));
    assert_eq!(r.rules[0].to, Target::Canary);
    assert!(matches!(&r.rules[1].matcher,
        RuleMatch::HeaderRegex { name, regex } if name == "x-group" && regex.is_match(b"beta-7")));
    assert!(matches!(&r.rules[2].matcher,
        RuleMatch::HeaderPresent { name } if name == "x-debug"));
    assert_eq!(r.rules[2].to, Target::Stable);
    assert!(matches!(&r.rules[3].matcher,
        RuleMatch::Cookie { name, value } if name == "beta" && value == "1"));
    assert!(matches!(&r.rules[4].matcher,
        RuleMatch::Query { name, value: Some(v) } if name == "canary" && v == "1"));
    assert!(matches!(&r.rules[5].matcher,
        RuleMatch::Query { name, value: None } if name == "preview"));
    match &r.rules[6].matcher {
        RuleMatch::Source(nets) => assert_eq!(
            nets,
            &vec![
                "10.0.0.0/8".parse().unwrap(),
                "192.168.1.7/32".parse().unwrap()
            ]
        ),
        other => panic!("{other:?}"),
    }
    match &r.rules[7].matcher {
        RuleMatch::Source(nets) => assert_eq!(nets, &vec!["fd00::/8".parse().unwrap()]),
        other => panic!("{other:?}"),
    }

    assert_eq!(
        web.timeouts,
        Timeouts {
            connect_ms: 1_000,
            request_ms: 30_000,
            idle_ms: 45_000
        }
    );
    assert_eq!(
        web.ejection,
        Ejection {
            consecutive_failures: 5,
            base_ms: 10_000,
            max_ms: 300_000,
            min_clients: 3
        }
    );

    let ro = web.rollout.as_ref().unwrap();
    let w = |p: f64| Weight::from_percent(p).unwrap();
    assert_eq!(
        ro.steps,
        vec![
            Step {
                weight: w(5.0),
                pause: Pause::For(30_000)
            },
            Step {
                weight: w(25.0),
                pause: Pause::For(60_000)
            },
            Step {
                weight: w(50.0),
                pause: Pause::Manual
            },
            Step {
                weight: w(100.0),
                pause: Pause::For(30_000)
            },
        ]
    );
    assert_eq!((ro.interval_ms, ro.window_ms), (10_000, 60_000));
    assert_eq!(
        ro.analysis,
        AnalysisSpec {
            min_requests: 50,
            max_error_rate: Some(0.01),
            max_p99_latency_ms: Some(500.0),
            max_error_rate_increase: Some(0.005),
            max_latency_increase: Some(1.5),
            latency_noise_floor_ms: 5.0,
            failure_limit: 2,
        }
    );
    assert_eq!(
        ro.breaker,
        Some(BreakerSpec {
            consecutive_failures: 5,
            min_clients: 3
        })
    );

    let api = &c.routes[1];
    assert_eq!(api.route.name, "api");
    assert!(!api.route.has_canary);
    assert!(api.canary.is_none() && api.rollout.is_none());
    assert_eq!(api.stable.version, "1.4.0");
    assert_eq!(api.stable.upstreams, ["[::1]:9101", "api.internal:80"]);
}

#[test]
fn defaults_fill_what_is_left_out() {
    let c = ok("listen: 0.0.0.0:80\nroutes:\n  - name: a\n    stable: {version: v1, upstreams: [\"b:1\"]}\n");
    assert_eq!(c.admin, "127.0.0.1:9901".parse::<SocketAddr>().unwrap());
    assert_eq!(c.state_dir, std::path::PathBuf::from("./canary-state"));
    assert_eq!((c.admin_token_env, c.workers), (None, None));
    assert_eq!(c.limits, Limits::default());
    let r = &c.routes[0];
    assert!(r.route.hosts.is_empty());
    assert_eq!(r.route.path_prefix, "/");
    assert_eq!(r.route.sticky, canary_core::Sticky::default());
    assert_eq!(r.weight, Weight::ZERO);
    assert_eq!(r.timeouts, Timeouts::default());
    assert_eq!(r.ejection, Ejection::default());
    assert!(r.stable.health_check.is_none());
}

#[test]
fn rollout_defaults_and_disabled_breaker() {
    let c = ok(&format!(
        "{BASE}    weight: 30\n    rollout:\n      steps: [{{weight: 10, pause: 0}}]\n      breaker: {{consecutive_failures: 0}}\n"
    ));
    let r = &c.routes[0];
    // Both given is fine: the rollout sets the weight, `weight` is kept as written.
    assert_eq!(r.weight, Weight::from_percent(30.0).unwrap());
    let ro = r.rollout.as_ref().unwrap();
    assert_eq!(ro.steps[0].pause, Pause::For(0));
    assert_eq!(ro.analysis, AnalysisSpec::default());
    assert_eq!((ro.interval_ms, ro.window_ms), (10_000, 60_000));
    assert_eq!(ro.breaker, None);
}

#[test]
fn one_client_cannot_trip_the_default_breaker_and_min_clients_is_checked() {
    let rollout = |breaker: &str| {
        format!("{BASE}    rollout:\n      steps: [{{weight: 10, pause: 0}}]\n      breaker: {breaker}\n")
    };
    let spec = |breaker: &str| {
        ok(&rollout(breaker)).routes[0]
            .rollout
            .clone()
            .unwrap()
            .breaker
    };
    let b = |consecutive_failures, min_clients| {
        Some(BreakerSpec {
            consecutive_failures,
            min_clients,
        })
    };
    assert_eq!(spec("{}"), b(5, 3));
    assert_eq!(spec("{consecutive_failures: 10, min_clients: 1}"), b(10, 1));
    // Fewer failures than the default minimum: each may come from another client.
    assert_eq!(spec("{consecutive_failures: 2}"), b(2, 2));
    assert_eq!(spec("{consecutive_failures: 0, min_clients: 16}"), None);
    for (bad, why) in [
        ("{min_clients: 0}", "out of range (1 to 16 distinct clients"),
        (
            "{min_clients: 17}",
            "out of range (1 to 16 distinct clients",
        ),
        (
            "{consecutive_failures: 4, min_clients: 5}",
            "min_clients: 5 is more than consecutive_failures (4)",
        ),
    ] {
        let e = errors(&rollout(bad));
        assert_eq!(e.len(), 1, "{bad}: {e:?}");
        assert!(
            e[0].contains("routes[0].rollout.breaker.min_clients") && e[0].contains(why),
            "{bad}: {e:?}"
        );
    }
}

#[test]
fn health_check_defaults() {
    let c = ok("listen: 0.0.0.0:80\nroutes:\n  - name: a\n    stable: {version: v1, upstreams: [\"b:1\"], health_check: {}}\n");
    let hc = c.routes[0].stable.health_check.clone().unwrap();
    assert_eq!(
        (
            hc.path.as_str(),
            hc.interval_ms,
            hc.timeout_ms,
            hc.unhealthy_threshold,
            hc.healthy_threshold
        ),
        ("/healthz", 5_000, 2_000, 2, 1)
    );
}

#[test]
fn rule_to_canary_without_a_canary_is_allowed() {
    let c = ok("listen: 0.0.0.0:80\nroutes:\n  - name: a\n    stable: {version: v1, upstreams: [\"b:1\"]}\n    rules:\n      - header: {name: x, value: y}\n        to: canary\n");
    assert!(!c.routes[0].route.has_canary);
    assert_eq!(c.routes[0].route.rules.len(), 1);
}

#[test]
fn unknown_key_points_at_the_key() {
    one_error(
        &format!("{BASE}    wieght: 10\n"),
        "6:5",
        "routes[0].wieght: unknown field `wieght`, expected one of name, hosts, path_prefix, \
         stable, canary, weight, sticky, rules, timeouts, ejection, rollout (did you mean \
         `weight`?)",
    );
    one_error(
        &format!("{BASE}    sticky: {{header: x, cokie: y}}\n"),
        "6:25",
        "routes[0].sticky.cokie: unknown field `cokie`, expected one of header, cookie (did \
         you mean `cookie`?)",
    );
    one_error(
        &format!("{BASE}    rollout:\n      steps: [{{weight: 10, pause: 1m}}]\n      breaker: {{failures: 3}}\n"),
        "8:17",
        "routes[0].rollout.breaker.failures: unknown field `failures`, expected one of \
         consecutive_failures",
    );
    // Nothing near enough to guess from: no guess.
    assert_eq!(
        errors(&format!("{BASE}    color: blue\n")),
        [
            "c.yaml:6:5: routes[0].color: unknown field `color`, expected one of name, hosts, \
          path_prefix, stable, canary, weight, sticky, rules, timeouts, ejection, rollout"
        ]
    );
}

/// Regression: the first unknown key used to stop parsing, hiding every other problem
/// (and every other unknown key) in the file.
#[test]
fn unknown_keys_do_not_hide_other_errors() {
    let yaml = "\
listen: 127.0.0.1:8080
route_defaults: {}
routes:
  - name: web
    hosts: [\"*\"]
    stable: {version: v1, upstreams: [\"127.0.0.1:9001\"]}
    canary: {version: v2, upstreams: [\"127.0.0.1:9002\"]}
    weight: 150
    wieght: 3
    rules:
      - header: {name: x-group, regex: \"(beta\"}
        to: canary
  - name: web
    stable: {version: v1, upstreams: [\"127.0.0.1:9001\"], helth_check: {}}
";
    let errs = errors(yaml);
    let at_path: Vec<String> = errs
        .iter()
        .map(|e| e.splitn(5, ':').take(4).collect::<Vec<_>>().join(":"))
        .collect();
    assert_eq!(
        at_path,
        [
            "c.yaml:2:1: route_defaults",
            "c.yaml:5:13: routes[0].hosts[0]",
            "c.yaml:8:13: routes[0].weight",
            "c.yaml:9:5: routes[0].wieght",
            "c.yaml:11:40: routes[0].rules[0].header.regex",
            "c.yaml:13:11: routes[1].name",
            "c.yaml:14:58: routes[1].stable.helth_check",
        ],
        "{errs:#?}"
    );
    assert!(errs[3].contains("unknown field `wieght`"), "{}", errs[3]);
    assert!(
        errs[6].contains("did you mean `health_check`?"),
        "{}",
        errs[6]
    );
}

/// Unknown keys are found in parts of the file that validation skips, such as the
/// matchers of a rule that has two.
#[test]
fn unknown_keys_in_a_rejected_rule_are_reported() {
    let errs = errors(&format!(
        "{BASE}    rules:\n      - header: {{name: x, valeu: a}}\n        cookie: {{name: a, value: b}}\n        to: canary\n"
    ));
    assert_eq!(errs.len(), 2, "{errs:#?}");
    assert!(errs[0].starts_with("c.yaml:7:9: routes[0].rules[0]: a rule needs exactly one"));
    assert!(
        errs[1].starts_with("c.yaml:7:27: routes[0].rules[0].header.valeu: unknown field `valeu`")
    );
}

/// A file of nothing but unknown keys is not "empty": the keys are named.
#[test]
fn file_of_unknown_keys_names_them() {
    let errs = errors("lisen: 127.0.0.1:8080\n");
    assert_eq!(errs.len(), 3, "{errs:#?}");
    assert!(errs[0].starts_with("c.yaml:1:1: lisen: unknown field `lisen`"));
    assert!(errs[0].ends_with("(did you mean `listen`?)"));
    assert!(errs[1].contains("missing required key `listen`"));
}

#[test]
fn bad_weight_points_at_the_value() {
    one_error(
        &format!("{BASE}    weight: 150\n"),
        "6:13",
        "routes[0].weight: 150 is out of range (0–100, at most two decimals)",
    );
    one_error(
        &format!("{BASE}    weight: 12.345\n"),
        "6:13",
        "at most two decimals",
    );
    one_error(&format!("{BASE}    weight: -1\n"), "6:13", "out of range");
    one_error(
        &format!("{BASE}    weight: ten\n"),
        "6:13",
        "expected a number",
    );
}

#[test]
fn bad_duration_points_at_the_value() {
    one_error(
        &format!("{BASE}    timeouts: {{connect: 10}}\n"),
        "6:25",
        "routes[0].timeouts.connect: \"10\" is not a duration",
    );
    one_error(
        &format!("{BASE}    timeouts:\n      request: 0s\n"),
        "7:16",
        "must be greater than 0",
    );
    one_error(
        &format!("{BASE}    timeouts: {{idle: 0s}}\n"),
        "6:22",
        "routes[0].timeouts.idle: must be greater than 0",
    );
    for (key, col) in [
        ("body_timeout", "24"),
        ("send_timeout", "24"),
        ("http2_idle_timeout", "30"),
    ] {
        one_error(
            &format!("limits: {{{key}: soon}}\n{BASE}"),
            &format!("1:{col}"),
            &format!("limits.{key}: \"soon\" is not a duration"),
        );
    }
}

#[test]
fn bad_regex_points_at_the_pattern() {
    one_error(
        &format!("{BASE}    rules:\n      - header: {{name: x-group, regex: \"(beta\"}}\n        to: canary\n"),
        "7:40",
        "routes[0].rules[0].header.regex: \"(beta\" is not a valid regular expression: unclosed group",
    );
}

#[test]
fn bad_cidr_points_at_the_entry() {
    one_error(
        &format!("{BASE}    rules:\n      - source: [\"10.0.0.0/8\", \"10.0.0.0/33\"]\n        to: canary\n"),
        "7:32",
        "routes[0].rules[0].source[1]: \"10.0.0.0/33\" is not an IP network",
    );
    one_error(
        &format!("{BASE}    rules:\n      - source: nope\n        to: canary\n"),
        "7:17",
        "routes[0].rules[0].source: \"nope\" is not an IP network",
    );
}

#[test]
fn duplicate_route_name_points_at_the_second() {
    one_error(
        &format!(
            "{BASE}  - name: web\n    stable: {{version: v1, upstreams: [\"127.0.0.1:9001\"]}}\n"
        ),
        "6:11",
        "duplicate route name \"web\" (first defined at line 3)",
    );
}

#[test]
fn decreasing_steps_point_at_the_lower_weight() {
    one_error(
        &format!("{BASE}    rollout:\n      steps:\n        - {{weight: 50, pause: 1m}}\n        - {{weight: 20, pause: 1m}}\n"),
        "9:20",
        "routes[0].rollout.steps[1].weight: 20 is lower than steps[0]'s 50",
    );
}

#[test]
fn step_rules() {
    one_error(
        &format!("{BASE}    rollout:\n      steps: [{{weight: 0, pause: 1m}}]\n"),
        "7:24",
        "must be above 0",
    );
    one_error(
        &format!("{BASE}    rollout:\n      steps: [{{weight: 10, pause: later}}]\n"),
        "7:35",
        "\"later\" is not a duration",
    );
    one_error(
        &format!("{BASE}    rollout:\n      steps: []\n"),
        "7:14",
        "at least one",
    );
}

#[test]
fn missing_upstreams_points_at_the_pool() {
    one_error(
        "listen: 127.0.0.1:8080\nroutes:\n  - name: web\n    stable: {version: v1}\n",
        "4:13",
        "routes[0].stable: missing required key `upstreams`",
    );
    one_error(
        "listen: 127.0.0.1:8080\nroutes:\n  - name: web\n    stable:\n      version: v1\n      upstreams: []\n",
        "6:18",
        "routes[0].stable.upstreams: the list is empty",
    );
}

#[test]
fn rollout_without_canary_is_an_error() {
    one_error(
        "listen: 127.0.0.1:8080\nroutes:\n  - name: web\n    stable: {version: v1, upstreams: [\"a:1\"]}\n    rollout:\n      steps: [{weight: 10, pause: 1m}]\n",
        "6:7",
        "a rollout needs a canary",
    );
}

#[test]
fn yaml_syntax_error_is_one_line_with_its_position() {
    let errs = errors("listen: 127.0.0.1:8080\nroutes: [\n");
    assert_eq!(errs, ["c.yaml:2:9: unclosed bracket '['"]);
    let errs = errors("listen: 127.0.0.1:8080\nlisten: 127.0.0.1:8081\n");
    assert_eq!(errs.len(), 1);
    assert!(
        errs[0].starts_with("c.yaml:2:1: duplicate mapping key"),
        "{errs:?}"
    );
}

#[test]
fn empty_file_is_one_error() {
    assert_eq!(
        errors(""),
        ["c.yaml:1:1: the config is empty; it needs at least `listen` and `routes`"]
    );
    assert_eq!(errors("# nothing\n").len(), 1);
}

#[test]
fn every_error_in_a_file_is_reported_in_file_order() {
    let yaml = "\
listen: localhost:8080
workers: 0
routes:
  - name: web
    stable: {version: v1, upstreams: [\"127.0.0.1:9001\", \"127.0.0.1:9001\"]}
    canary: {version: v1, upstreams: [\"127.0.0.1:9002\"]}
    weight: 100.5
    rules:
      - header: {name: x, value: a, regex: b}
        to: canary
      - cookie: {name: a, value: b}
        to: sideways
  - name: web
    stable: {version: v1, upstreams: [\"h:0\"]}
";
    let errs = errors(yaml);
    let at: Vec<&str> = errs.iter().map(|e| e.split(": ").next().unwrap()).collect();
    assert_eq!(
        at,
        [
            "c.yaml:1:9",
            "c.yaml:2:10",
            "c.yaml:5:57",
            "c.yaml:6:23",
            "c.yaml:7:13",
            "c.yaml:9:17",
            "c.yaml:12:13",
            "c.yaml:13:11",
            "c.yaml:14:39",
        ],
        "{errs:#?}"
    );
    assert!(errs[2].contains("listed twice"));
    assert!(errs[3].contains("also the stable version"));
    assert!(errs[8].contains("invalid port"));
}

#[test]
fn display_is_one_file_line_column_message_per_line() {
    let err = parse("conf/canary.yaml", "listen: nope\nworkers: 0\nroutes: []\n").unwrap_err();
    assert_eq!(
        err.to_string(),
        "conf/canary.yaml:1:9: listen: \"nope\" is not a socket address (an IP and port such as \
         127.0.0.1:8080, 0.0.0.0:80 or [::1]:8080; host names are not allowed here)\n\
         conf/canary.yaml:2:10: workers: 0 is out of range (a whole number from 1 to 4096)\n\
         conf/canary.yaml:3:9: routes: the list is empty; at least one route is required"
    );
    let d = &err.diagnostics[1];
    assert_eq!(
        (d.file.as_str(), d.line, d.column),
        ("conf/canary.yaml", 2, 10)
    );
    // It is a std error, so the binary can use `?` with anyhow.
    let _: &dyn std::error::Error = &err;
}

#[test]
fn load_reads_the_file_and_names_it_in_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("canary.yaml");
    std::fs::write(&path, FULL).unwrap();
    assert_eq!(load(&path).unwrap().routes.len(), 2);

    std::fs::write(&path, "listen: 127.0.0.1:1\nroutes: []\n").unwrap();
    let err = load(&path).unwrap_err();
    assert!(
        err.to_string()
            .starts_with(&format!("{}:2:9: ", path.display())),
        "{err}"
    );

    let missing = dir.path().join("missing.yaml");
    let err: ConfigError = load(&missing).unwrap_err();
    assert_eq!(err.diagnostics.len(), 1);
    let d = &err.diagnostics[0];
    assert_eq!((d.line, d.column), (0, 0));
    assert!(
        d.message.contains("cannot read the config file"),
        "{}",
        d.message
    );
}

#[test]
fn diff_reports_weight_change_and_added_route() {
    let old = ok(&format!("{BASE}    weight: 10\n"));
    let new = ok(&format!(
        "{BASE}    weight: 12.5\n  - name: api\n    path_prefix: /api\n    stable: {{version: v1, upstreams: [\"127.0.0.1:9101\"]}}\n"
    ));
    assert_eq!(
        diff(&old, &new),
        ["route web: weight 10% → 12.5%", "route api added"]
    );
    assert_eq!(
        diff(&new, &old),
        ["route api removed", "route web: weight 12.5% → 10%"]
    );
    assert!(diff(&old, &old).is_empty());
}

#[test]
fn diff_reports_versions_upstreams_rules_and_restarts() {
    let old = ok(&format!(
        "{BASE}    rules:\n      - header: {{name: x, value: a}}\n        to: canary\n"
    ));
    let new = ok("\
listen: 127.0.0.1:8081
admin: 127.0.0.1:9902
routes:
  - name: web
    stable: {version: v2, upstreams: [\"127.0.0.1:9002\"]}
    canary: {version: v3, upstreams: [\"127.0.0.1:9003\"]}
    rules:
      - header: {name: x, value: b}
        to: canary
");
    assert_eq!(
        diff(&old, &new),
        [
            "listen 127.0.0.1:8080 → 127.0.0.1:8081 (needs a restart)",
            "admin 127.0.0.1:9901 → 127.0.0.1:9902 (needs a restart)",
            "route web: stable version v1 → v2",
            "route web: stable upstreams changed (+127.0.0.1:9002 -127.0.0.1:9001)",
            "route web: canary version v2 → v3",
            "route web: canary upstreams changed (+127.0.0.1:9003 -127.0.0.1:9002)",
            "route web: rules changed (1 rule)",
        ]
    );
}

/// The examples in the config reference must stay valid.
#[test]
fn docs_examples_are_valid() {
    let doc = include_str!("../../../docs/config.md");
    let blocks: Vec<&str> = doc
        .split("```yaml\n")
        .skip(1)
        .map(|b| b.split("```").next().unwrap())
        .collect();
    assert_eq!(blocks.len(), 2, "the full example and the smallest file");
    for block in &blocks {
        ok(block);
    }
    let full = ok(blocks[0]);
    assert_eq!(full.routes.len(), 2);
    assert_eq!(full.routes[0].route.rules.len(), 6);
}

#[test]
fn header_limit_is_between_1_kib_and_1_gib() {
    let limit = |n: i64| format!("limits:\n  max_header_bytes: {n}\n{BASE}");
    assert_eq!(ok(&limit(1024)).limits.max_header_bytes, 1024);
    assert_eq!(ok(&limit(1 << 30)).limits.max_header_bytes, 1 << 30);
    for n in [1023, (1 << 30) + 1, i64::from(u32::MAX)] {
        one_error(&limit(n), "2:21", "limits.max_header_bytes");
    }
}

#[test]
fn dashboard_defaults_and_values() {
    let d = ok(BASE).dashboard;
    assert_eq!(d, canary_config::Dashboard::default());
    assert!(d.enabled && !d.read_only && d.allowed_hosts.is_empty());
    assert_eq!(d.history_ms, 3_600_000);
    let c = ok(&format!(
        "dashboard:\n  enabled: false\n  read_only: true\n  allowed_hosts: [Canary.Example.com, \"ops.internal.\"]\n  history: 15m\n{BASE}"
    ));
    assert!(!c.dashboard.enabled && c.dashboard.read_only);
    assert_eq!(
        c.dashboard.allowed_hosts,
        ["canary.example.com", "ops.internal"]
    );
    assert_eq!(c.dashboard.history_ms, 900_000);
}

#[test]
fn bad_allowed_hosts_point_at_the_entry() {
    let hosts = |h: &str| format!("dashboard:\n  allowed_hosts: [ok.example, {h}]\n{BASE}");
    one_error(
        &hosts("\"https://canary.example\""),
        "2:31",
        "without scheme",
    );
    one_error(&hosts("\"canary.example:9901\""), "2:31", "without a port");
    one_error(&hosts("\"*.example.com\""), "2:31", "wildcard");
    one_error(
        &hosts("10.0.0.1"),
        "2:31",
        "IP addresses are always allowed",
    );
    one_error(&hosts("\"bad name\""), "2:31", "dashboard.allowed_hosts[1]");
    let history = |h: &str| format!("dashboard:\n  history: {h}\n{BASE}");
    one_error(&history("10s"), "2:12", "from 1m to 24h");
    one_error(&history("25h"), "2:12", "dashboard.history");
    one_error(&history("soon"), "2:12", "not a duration");
    one_error(
        &format!("dashboard:\n  read_onyl: true\n{BASE}"),
        "2:3",
        "did you mean `read_only`?",
    );
}

#[test]
fn a_yaml_over_the_parser_budget_is_named_in_words_not_rust_debug() {
    // Nesting is the cheapest limit to reach (250000 nodes take seconds in a debug
    // build); every limit goes through the same words (`budget_text`).
    let yaml = format!(
        "listen: 127.0.0.1:8080\nx: {}1{}\n",
        "[".repeat(70),
        "]".repeat(70)
    );
    let e = errors(&yaml);
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(!e[0].contains('{') && !e[0].contains("Depth"), "{}", e[0]);
    assert!(
        e[0].contains(
            "too large or too complex for a config: lists or mappings nested more than 64 deep"
        ),
        "{}",
        e[0]
    );
}

#[test]
fn diff_reports_a_dashboard_change_as_needing_a_restart() {
    let old = ok(BASE);
    let new = ok(&format!("dashboard: {{read_only: true}}\n{BASE}"));
    assert_eq!(diff(&old, &new), ["dashboard changed (needs a restart)"]);
}

#[test]
fn a_huge_number_is_echoed_in_exponent_form_not_309_digits() {
    let e = errors(&format!("{BASE}    weight: 1e308\n"));
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(
        e[0].contains("routes[0].weight: 1e308 is out of range"),
        "{}",
        e[0]
    );
}

#[test]
fn headers_with_underscores_is_drop_reject_or_allow() {
    let limit = |v: &str| format!("limits:\n  headers_with_underscores: {v}\n{BASE}");
    assert_eq!(ok(BASE).limits.headers_with_underscores, Underscores::Drop);
    for (v, want) in [
        ("drop", Underscores::Drop),
        ("reject", Underscores::Reject),
        ("allow", Underscores::Allow),
    ] {
        assert_eq!(ok(&limit(v)).limits.headers_with_underscores, want);
    }
    one_error(&limit("ignore"), "2:29", "drop, reject, allow");
}
