//! Shared fixtures for the no-allocation test, the decision bench and the instruction
//! count (`examples/decision_count.rs`).
#![allow(dead_code)]

use std::hint::black_box;
use std::net::IpAddr;

use canary_core::routing::{
    Decision, HostMatch, RequestFacts, Route, RouteTable, Rule, RuleMatch, Target,
};
use canary_core::Weight;
use regex::bytes::Regex;

/// The measured decision for the fixture's request: route match, sticky key, rules and
/// bucket. The request's host, path and facts pass through `black_box`, so the
/// compiler cannot fold any of it away.
#[inline]
pub fn decide(table: &RouteTable, facts: &Facts, weight: Weight) -> Decision {
    let idx = table
        .find(
            black_box(Some(&b"shop.example.com"[..])),
            black_box("/products/42"),
        )
        .expect("the fixture's request matches a route");
    let route = &table.routes[idx];
    let facts = black_box(facts);
    let key = route.sticky_key(facts).map(|k| k.bytes());
    route.decide(weight, facts, key)
}

/// A request with a few headers, as the proxy presents it to the core.
pub struct Facts {
    pub headers: Vec<(&'static str, &'static [u8])>,
    pub cookie: &'static str,
    pub query: Option<&'static str>,
    pub ip: IpAddr,
}

impl RequestFacts for Facts {
    fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| *v)
    }
    fn cookie(&self, name: &str) -> Option<&str> {
        canary_core::routing::cookie_value(self.cookie, name)
    }
    fn query(&self, name: &str) -> Option<&str> {
        canary_core::routing::query_value(self.query?, name)
    }
    fn source_ip(&self) -> Option<IpAddr> {
        Some(self.ip)
    }
}

/// A realistic table: four routes, the matching one last-but-one with the rules of
/// the README example (three header/cookie rules, a regex, a query and a CIDR rule).
pub fn table() -> RouteTable {
    let group = Regex::new("^beta-[0-9]+$").unwrap();
    let mut routes = Vec::new();
    for (name, host, prefix) in [
        ("admin", "admin.example.com", "/"),
        ("api", "shop.example.com", "/api"),
        ("web", "shop.example.com", "/"),
        ("other", "*.example.org", "/"),
    ] {
        let mut r = Route::new(name);
        r.hosts = vec![HostMatch::parse(host)];
        r.path_prefix = prefix.to_string();
        r.has_canary = true;
        r.sticky.header = Some("x-user-id".into());
        r.rules = vec![
            Rule {
                matcher: RuleMatch::HeaderEquals {
                    name: "x-canary".into(),
                    value: "always".into(),
                },
                to: Target::Canary,
            },
            Rule {
                matcher: RuleMatch::HeaderEquals {
                    name: "x-canary".into(),
                    value: "never".into(),
                },
                to: Target::Stable,
            },
            Rule {
                matcher: RuleMatch::Cookie {
                    name: "beta".into(),
                    value: "1".into(),
                },
                to: Target::Canary,
            },
            Rule {
                matcher: RuleMatch::HeaderRegex {
                    name: "x-group".into(),
                    regex: group.clone(),
                },
                to: Target::Canary,
            },
            Rule {
                matcher: RuleMatch::Query {
                    name: "canary".into(),
                    value: Some("1".into()),
                },
                to: Target::Canary,
            },
            Rule {
                matcher: RuleMatch::Source(vec!["10.20.0.0/16".parse().unwrap()]),
                to: Target::Canary,
            },
        ];
        routes.push(r);
    }
    RouteTable { routes }
}

/// A typical browser-ish request with a sticky user id and no rule matching.
pub fn facts() -> Facts {
    Facts {
        headers: vec![
            ("host", b"shop.example.com"),
            ("user-agent", b"Mozilla/5.0"),
            ("accept", b"text/html"),
            ("x-user-id", b"user-4f1c2a9e"),
        ],
        cookie: "session=abc; theme=dark",
        query: Some("page=2&sort=price"),
        ip: "192.168.1.7".parse().unwrap(),
    }
}
