//! What changed between two configs, in words, for the reload log line.
//!
//! Routes are matched by name. Only differences are listed; an empty list means the
//! reload changes nothing.

use canary_core::{Rule, RuleMatch};

use crate::model::{Config, PoolConfig, RouteConfig};

/// A human summary of what changed from `old` to `new`, one entry per change.
///
/// Changes to `listen`, `admin`, `workers`, `limits`, `dashboard`, `state_dir` and
/// `admin_token_env` are marked "(needs a restart)": they are only read when the
/// process starts.
pub fn diff(old: &Config, new: &Config) -> Vec<String> {
    let mut out = Vec::new();
    const RESTART: &str = "(needs a restart)";
    if old.listen != new.listen {
        out.push(format!("listen {} → {} {RESTART}", old.listen, new.listen));
    }
    if old.admin != new.admin {
        out.push(format!("admin {} → {} {RESTART}", old.admin, new.admin));
    }
    if old.workers != new.workers {
        let w = |w: Option<usize>| w.map_or("one per core".to_string(), |n| n.to_string());
        out.push(format!(
            "workers {} → {} {RESTART}",
            w(old.workers),
            w(new.workers)
        ));
    }
    if old.state_dir != new.state_dir {
        out.push(format!(
            "state_dir {} → {} {RESTART}",
            old.state_dir.display(),
            new.state_dir.display()
        ));
    }
    if old.admin_token_env != new.admin_token_env {
        out.push(format!("admin_token_env changed {RESTART}"));
    }
    if old.limits != new.limits {
        out.push(format!("limits changed {RESTART}"));
    }
    if old.dashboard != new.dashboard {
        out.push(format!("dashboard changed {RESTART}"));
    }

    for r in &old.routes {
        if !new.routes.iter().any(|n| n.route.name == r.route.name) {
            out.push(format!("route {} removed", r.route.name));
        }
    }
    for n in &new.routes {
        match old.routes.iter().find(|o| o.route.name == n.route.name) {
            None => out.push(format!("route {} added", n.route.name)),
            Some(o) => route_diff(o, n, &mut out),
        }
    }

    // Order matters (the first matching route wins); compare the routes both have.
    let kept = |a: &Config, b: &Config| -> Vec<String> {
        a.routes
            .iter()
            .map(|r| r.route.name.clone())
            .filter(|name| b.routes.iter().any(|r| &r.route.name == name))
            .collect()
    };
    if kept(old, new) != kept(new, old) {
        out.push("route order changed (the first matching route wins)".to_string());
    }
    out
}

fn route_diff(o: &RouteConfig, n: &RouteConfig, out: &mut Vec<String>) {
    let name = &n.route.name;
    let mut say = |what: String| out.push(format!("route {name}: {what}"));

    if o.weight != n.weight {
        say(format!("weight {} → {}", o.weight, n.weight));
    }
    pool_diff("stable", &o.stable, &n.stable, &mut say);
    match (&o.canary, &n.canary) {
        (None, None) => {}
        (None, Some(c)) => say(format!("canary {} added", c.version)),
        (Some(c), None) => say(format!("canary {} removed", c.version)),
        (Some(oc), Some(nc)) => pool_diff("canary", oc, nc, &mut say),
    }
    if o.route.hosts != n.route.hosts {
        say("hosts changed".to_string());
    }
    if o.route.path_prefix != n.route.path_prefix {
        say(format!(
            "path_prefix {} → {}",
            o.route.path_prefix, n.route.path_prefix
        ));
    }
    let (or, nr) = (rules_key(&o.route.rules), rules_key(&n.route.rules));
    if or != nr {
        let rules = |n: usize| {
            if n == 1 {
                "1 rule".to_string()
            } else {
                format!("{n} rules")
            }
        };
        if or.len() == nr.len() {
            say(format!("rules changed ({})", rules(nr.len())));
        } else {
            say(format!(
                "rules changed ({} → {})",
                rules(or.len()),
                rules(nr.len())
            ));
        }
    }
    if o.route.sticky != n.route.sticky {
        say("sticky changed (users may move between versions)".to_string());
    }
    match (&o.rollout, &n.rollout) {
        (None, Some(_)) => say("rollout added".to_string()),
        (Some(_), None) => say("rollout removed".to_string()),
        (Some(a), Some(b)) if a != b => say("rollout changed".to_string()),
        _ => {}
    }
    if o.timeouts != n.timeouts {
        say("timeouts changed".to_string());
    }
    if o.ejection != n.ejection {
        say("ejection changed".to_string());
    }
}

fn pool_diff(which: &str, o: &PoolConfig, n: &PoolConfig, say: &mut impl FnMut(String)) {
    if o.version != n.version {
        say(format!("{which} version {} → {}", o.version, n.version));
    }
    if o.upstreams != n.upstreams {
        let added: Vec<&str> = n
            .upstreams
            .iter()
            .filter(|u| !o.upstreams.contains(u))
            .map(String::as_str)
            .collect();
        let removed: Vec<&str> = o
            .upstreams
            .iter()
            .filter(|u| !n.upstreams.contains(u))
            .map(String::as_str)
            .collect();
        let mut parts = Vec::new();
        if !added.is_empty() {
            parts.push(format!("+{}", added.join(" +")));
        }
        if !removed.is_empty() {
            parts.push(format!("-{}", removed.join(" -")));
        }
        if parts.is_empty() {
            parts.push("reordered".to_string());
        }
        say(format!("{which} upstreams changed ({})", parts.join(" ")));
    }
    if o.http2 != n.http2 {
        say(format!("{which} http2 {} → {}", o.http2, n.http2));
    }
    if o.health_check != n.health_check {
        say(format!("{which} health_check changed"));
    }
}

/// Rules as comparable text (`Regex` has no `PartialEq`; its pattern does).
fn rules_key(rules: &[Rule]) -> Vec<String> {
    rules
        .iter()
        .map(|r| {
            let m = match &r.matcher {
                RuleMatch::HeaderEquals { name, value } => format!("header {name} = {value:?}"),
                RuleMatch::HeaderRegex { name, regex } => {
                    format!("header {name} ~ {:?}", regex.as_str())
                }
                RuleMatch::HeaderPresent { name } => format!("header {name} present"),
                RuleMatch::Cookie { name, value } => format!("cookie {name} = {value:?}"),
                RuleMatch::Query { name, value } => format!("query {name} = {value:?}"),
                RuleMatch::Source(nets) => format!("source {nets:?}"),
            };
            format!("{m} → {}", r.to.as_str())
        })
        .collect()
}
