//! Route table, rules and the per-request routing decision.
//!
//! Precedence, per request (documented in `docs/routing.md`):
//! 1. the first route whose hosts and path prefix match;
//! 2. the route's rules, in order, first match wins;
//! 3. the sticky bucket compared with the current weight.
//!
//! The request is seen through [`RequestFacts`], so this module does not depend on
//! any HTTP library and allocates nothing per request.

use std::net::IpAddr;

use ipnet::IpNet;
use regex::bytes::Regex;
use serde::{Deserialize, Serialize};

use crate::bucket::{bucket, route_seed};
use crate::weight::Weight;

/// Which version serves a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// The stable version.
    Stable,
    /// The canary version.
    Canary,
}

impl Target {
    /// `"stable"` or `"canary"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Target::Stable => "stable",
            Target::Canary => "canary",
        }
    }
}

/// What the data plane needs to know about a request to route it.
///
/// Header names are passed in lowercase. Implementations return the first value.
pub trait RequestFacts {
    /// The raw value of the first header with this (lowercase) name.
    fn header(&self, name: &str) -> Option<&[u8]>;
    /// The value of the named cookie from the `Cookie` header(s).
    fn cookie(&self, name: &str) -> Option<&str>;
    /// The raw (not percent-decoded) value of the named query parameter.
    fn query(&self, name: &str) -> Option<&str>;
    /// The client address the connection came from.
    fn source_ip(&self) -> Option<IpAddr>;
}

/// How a route's host list matches the request's host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostMatch {
    /// `shop.example.com`, compared case-insensitively.
    Exact(String),
    /// `*.example.com`: stored as `.example.com`, matches any subdomain.
    Suffix(String),
}

impl HostMatch {
    /// Parses `shop.example.com` or `*.example.com` (lowercased).
    pub fn parse(pattern: &str) -> HostMatch {
        let p = pattern.to_ascii_lowercase();
        match p.strip_prefix('*') {
            Some(rest) if rest.starts_with('.') => HostMatch::Suffix(rest.to_string()),
            _ => HostMatch::Exact(p),
        }
    }

    fn matches(&self, host: &[u8]) -> bool {
        match self {
            HostMatch::Exact(h) => h.as_bytes().eq_ignore_ascii_case(host),
            HostMatch::Suffix(s) => {
                host.len() > s.len()
                    && host[host.len() - s.len()..].eq_ignore_ascii_case(s.as_bytes())
            }
        }
    }
}

/// What a rule looks at.
#[derive(Clone, Debug)]
pub enum RuleMatch {
    /// Header equals a value exactly.
    HeaderEquals {
        /// The header's name, lowercase.
        name: String,
        /// The value it must have.
        value: String,
    },
    /// Header value matches a regular expression (unanchored unless the pattern anchors).
    HeaderRegex {
        /// The header's name, lowercase.
        name: String,
        /// The expression its value must match.
        regex: Regex,
    },
    /// Header is present, whatever its value.
    HeaderPresent {
        /// The header's name, lowercase.
        name: String,
    },
    /// Cookie equals a value exactly.
    Cookie {
        /// The cookie's name.
        name: String,
        /// The value it must have.
        value: String,
    },
    /// Query parameter equals a value, or is present when `value` is `None`.
    Query {
        /// The parameter's name.
        name: String,
        /// The (raw, not percent-decoded) value it must have; `None`: any.
        value: Option<String>,
    },
    /// Client address is in one of these networks.
    Source(Vec<IpNet>),
}

impl RuleMatch {
    fn matches(&self, facts: &impl RequestFacts) -> bool {
        match self {
            RuleMatch::HeaderEquals { name, value } => facts
                .header(name)
                .is_some_and(|v| bytes_eq(v, value.as_bytes())),
            RuleMatch::HeaderRegex { name, regex } => {
                facts.header(name).is_some_and(|v| regex.is_match(v))
            }
            RuleMatch::HeaderPresent { name } => facts.header(name).is_some(),
            RuleMatch::Cookie { name, value } => facts
                .cookie(name)
                .is_some_and(|v| bytes_eq(v.as_bytes(), value.as_bytes())),
            RuleMatch::Query { name, value } => match (facts.query(name), value) {
                (Some(got), Some(want)) => bytes_eq(got.as_bytes(), want.as_bytes()),
                (Some(_), None) => true,
                (None, _) => false,
            },
            RuleMatch::Source(nets) => facts.source_ip().is_some_and(|ip| in_nets(nets, ip)),
        }
    }
}

/// Whether `ip` is in one of `nets`; an IPv4-mapped IPv6 address (`::ffff:10.0.0.1`)
/// counts as IPv4. The bits under each prefix are compared with one mask: `IpNet::contains`
/// (through network and broadcast addresses) and a canonical `IpAddr` copied per net
/// cost the decision about 90 instructions for one net. One branch per family: a single
/// form (both families' bits in a `u128`) measured 24 instructions more per decision.
#[inline]
fn in_nets(nets: &[IpNet], ip: IpAddr) -> bool {
    let v4 = match ip {
        IpAddr::V4(a) => Some(a),
        IpAddr::V6(a) => a.to_ipv4_mapped(),
    };
    match (v4, ip) {
        (Some(a), _) => {
            let a = u32::from(a);
            nets.iter().any(|n| match n {
                IpNet::V4(n) => {
                    let mask = u32::MAX
                        .checked_shl(32 - u32::from(n.prefix_len()))
                        .unwrap_or(0);
                    (a ^ u32::from(n.addr())) & mask == 0
                }
                IpNet::V6(_) => false,
            })
        }
        (None, IpAddr::V6(a)) => {
            let a = u128::from(a);
            nets.iter().any(|n| match n {
                IpNet::V6(n) => {
                    let mask = u128::MAX
                        .checked_shl(128 - u32::from(n.prefix_len()))
                        .unwrap_or(0);
                    (a ^ u128::from(n.addr())) & mask == 0
                }
                IpNet::V4(_) => false,
            })
        }
        (None, IpAddr::V4(_)) => false,
    }
}

/// A rule: when it matches, the request goes to `to`, whatever the weight.
#[derive(Clone, Debug)]
pub struct Rule {
    pub matcher: RuleMatch,
    pub to: Target,
}

/// Where the sticky key comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sticky {
    /// Header checked first (lowercase), e.g. `x-user-id`.
    pub header: Option<String>,
    /// Cookie checked next; also the cookie a generated id is stored in.
    pub cookie: String,
}

impl Default for Sticky {
    fn default() -> Self {
        Sticky {
            header: None,
            cookie: "canary_id".to_string(),
        }
    }
}

/// One route of the table, built (and validated) by the config crate.
#[derive(Clone, Debug)]
pub struct Route {
    pub name: String,
    /// `route_seed(name)`, computed once.
    pub seed: u64,
    /// Empty: any host.
    pub hosts: Vec<HostMatch>,
    pub path_prefix: String,
    pub rules: Vec<Rule>,
    pub sticky: Sticky,
    /// Whether the route has a canary version at all.
    pub has_canary: bool,
}

/// Why a request went where it went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// The route has no canary.
    NoCanary,
    /// Rule number `n` (0-based) matched.
    Rule(usize),
    /// The sticky bucket compared with the weight.
    Bucket(u16),
}

/// The routing decision for one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    pub target: Target,
    pub reason: Reason,
}

/// Where the sticky key of a request was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StickyKey<'a> {
    Header(&'a [u8]),
    Cookie(&'a str),
}

impl<'a> StickyKey<'a> {
    /// The key's bytes.
    pub fn bytes(self) -> &'a [u8] {
        match self {
            StickyKey::Header(b) => b,
            StickyKey::Cookie(s) => s.as_bytes(),
        }
    }
}

impl Route {
    /// Builds a route, computing its hash seed.
    pub fn new(name: impl Into<String>) -> Route {
        let name = name.into();
        Route {
            seed: route_seed(&name),
            name,
            hosts: Vec::new(),
            path_prefix: "/".to_string(),
            rules: Vec::new(),
            sticky: Sticky::default(),
            has_canary: false,
        }
    }

    /// Whether this route serves the given host (port already stripped) and path.
    pub fn matches(&self, host: Option<&[u8]>, path: &str) -> bool {
        let prefix = self.path_prefix.as_bytes();
        if path.len() < prefix.len() || !bytes_eq(&path.as_bytes()[..prefix.len()], prefix) {
            return false;
        }
        if self.hosts.is_empty() {
            return true;
        }
        host.is_some_and(|h| self.hosts.iter().any(|m| m.matches(h)))
    }

    /// The sticky key of the request: the sticky header if present, else the cookie.
    pub fn sticky_key<'f>(&self, facts: &'f impl RequestFacts) -> Option<StickyKey<'f>> {
        if let Some(h) = &self.sticky.header {
            if let Some(v) = facts.header(h).filter(|v| !v.is_empty()) {
                return Some(StickyKey::Header(v));
            }
        }
        facts
            .cookie(&self.sticky.cookie)
            .filter(|v| !v.is_empty())
            .map(StickyKey::Cookie)
    }

    /// Decides the version for a request: rules, then the bucket of `key` against `weight`.
    ///
    /// `key` is the sticky key ([`Route::sticky_key`], or an id the proxy generated).
    /// With no key at all the request goes to stable: a user we cannot recognise again
    /// must not flip between versions.
    #[inline]
    pub fn decide(
        &self,
        weight: Weight,
        facts: &impl RequestFacts,
        key: Option<&[u8]>,
    ) -> Decision {
        if !self.has_canary {
            return Decision {
                target: Target::Stable,
                reason: Reason::NoCanary,
            };
        }
        for (i, rule) in self.rules.iter().enumerate() {
            if rule.matcher.matches(facts) {
                return Decision {
                    target: rule.to,
                    reason: Reason::Rule(i),
                };
            }
        }
        match key {
            Some(key) => {
                let b = bucket(self.seed, key);
                let target = if b < weight.basis_points() {
                    Target::Canary
                } else {
                    Target::Stable
                };
                Decision {
                    target,
                    reason: Reason::Bucket(b),
                }
            }
            None => Decision {
                target: Target::Stable,
                reason: Reason::Bucket(u16::MAX),
            },
        }
    }
}

/// Routes in order; the first match wins.
#[derive(Clone, Debug, Default)]
pub struct RouteTable {
    pub routes: Vec<Route>,
}

impl RouteTable {
    /// Index of the first route matching host and path.
    #[inline]
    pub fn find(&self, host: Option<&[u8]>, path: &str) -> Option<usize> {
        self.routes.iter().position(|r| r.matches(host, path))
    }
}

/// The value of cookie `name` in one `Cookie` header value (`a=1; b=2`).
///
/// Works on bytes (a plain loop, not `str::split`'s memchr-based searcher, which costs
/// more than it saves on a few short pairs), compares the name as a prefix instead of
/// splitting every pair at `=`, and trims ASCII whitespace only (header values reach
/// here as visible ASCII). It was a third of the routing decision's instructions
/// (callgrind, see docs/performance.md).
pub fn cookie_value<'a>(header: &'a str, name: &str) -> Option<&'a str> {
    pairs(header, b';').find_map(|pair| {
        // only the matching pair's end needs trimming
        prefixed_value(pair.trim_ascii_start(), name).map(|v| v.trim_ascii_end().trim_matches('"'))
    })
}

/// The parts of `s` between `sep` bytes (an ASCII separator, so every part is a `str`).
fn pairs(s: &str, sep: u8) -> impl Iterator<Item = &str> {
    let mut rest = Some(s);
    std::iter::from_fn(move || {
        let r = rest?;
        match r.bytes().position(|b| b == sep) {
            Some(i) => {
                rest = Some(&r[i + 1..]);
                Some(&r[..i])
            }
            None => {
                rest = None;
                Some(r)
            }
        }
    })
}

/// `v` when `pair` is `name=v`. A name never holds `=` (the first `=` of a pair ends
/// it), so a `name` with one matches nothing; that is checked only once the prefix
/// matched, not on every call (it was a `memchr` per rule per request).
#[inline]
fn prefixed_value<'a>(pair: &'a str, name: &str) -> Option<&'a str> {
    let n = name.len();
    let b = pair.as_bytes();
    (b.len() > n && b[n] == b'=' && bytes_eq(&b[..n], name.as_bytes()) && !name.contains('='))
        .then(|| &pair[n + 1..])
}

/// The raw value of query parameter `name` in a query string (`a=1&b`); `""` when the
/// parameter has no `=`.
pub fn query_value<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    pairs(query, b'&').find_map(|pair| {
        if bytes_eq(pair.as_bytes(), name.as_bytes()) && !name.contains('=') {
            Some("")
        } else {
            prefixed_value(pair, name)
        }
    })
}

/// `a == b`. For the short strings routing compares (path prefixes, names, values) a
/// byte loop kept inline: `==` on slices calls libc's `memcmp`, whose call costs more
/// than comparing a few bytes (five such calls were 8% of a decision's instructions).
#[inline]
fn bytes_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    if a.len() > 16 {
        return a == b;
    }
    a.iter().zip(b).all(|(x, y)| x == y)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Request facts from plain lists, for tests and benches.
    #[derive(Default)]
    pub struct Facts {
        pub headers: Vec<(&'static str, &'static str)>,
        pub cookies: Vec<(&'static str, &'static str)>,
        pub query: Vec<(&'static str, &'static str)>,
        pub ip: Option<IpAddr>,
    }

    impl RequestFacts for Facts {
        fn header(&self, name: &str) -> Option<&[u8]> {
            self.headers
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.as_bytes())
        }
        fn cookie(&self, name: &str) -> Option<&str> {
            self.cookies
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| *v)
        }
        fn query(&self, name: &str) -> Option<&str> {
            self.query.iter().find(|(k, _)| *k == name).map(|(_, v)| *v)
        }
        fn source_ip(&self) -> Option<IpAddr> {
            self.ip
        }
    }

    fn route_with(rules: Vec<Rule>) -> Route {
        let mut r = Route::new("web");
        r.has_canary = true;
        r.rules = rules;
        r.sticky.header = Some("x-user-id".into());
        r
    }

    #[test]
    fn rules_win_over_weight_in_order() {
        let r = route_with(vec![
            Rule {
                matcher: RuleMatch::HeaderEquals {
                    name: "x-canary".into(),
                    value: "always".into(),
                },
                to: Target::Canary,
            },
            Rule {
                matcher: RuleMatch::HeaderPresent {
                    name: "x-canary".into(),
                },
                to: Target::Stable,
            },
        ]);
        let f = Facts {
            headers: vec![("x-canary", "always")],
            ..Default::default()
        };
        assert_eq!(
            r.decide(Weight::ZERO, &f, Some(b"u")).target,
            Target::Canary
        );
        let f = Facts {
            headers: vec![("x-canary", "other")],
            ..Default::default()
        };
        assert_eq!(
            r.decide(Weight::FULL, &f, Some(b"u")),
            Decision {
                target: Target::Stable,
                reason: Reason::Rule(1)
            }
        );
    }

    #[test]
    fn every_rule_kind_matches() {
        let re = Regex::new("^beta-").unwrap();
        let cases: Vec<(RuleMatch, Facts)> = vec![
            (
                RuleMatch::HeaderRegex {
                    name: "x-group".into(),
                    regex: re,
                },
                Facts {
                    headers: vec![("x-group", "beta-7")],
                    ..Default::default()
                },
            ),
            (
                RuleMatch::Cookie {
                    name: "beta".into(),
                    value: "1".into(),
                },
                Facts {
                    cookies: vec![("beta", "1")],
                    ..Default::default()
                },
            ),
            (
                RuleMatch::Query {
                    name: "canary".into(),
                    value: Some("1".into()),
                },
                Facts {
                    query: vec![("canary", "1")],
                    ..Default::default()
                },
            ),
            (
                RuleMatch::Query {
                    name: "canary".into(),
                    value: None,
                },
                Facts {
                    query: vec![("canary", "")],
                    ..Default::default()
                },
            ),
            (
                RuleMatch::Source(vec!["10.0.0.0/8".parse().unwrap()]),
                Facts {
                    ip: Some("10.1.2.3".parse().unwrap()),
                    ..Default::default()
                },
            ),
            (
                RuleMatch::Source(vec!["10.0.0.0/8".parse().unwrap()]),
                Facts {
                    ip: Some("::ffff:10.1.2.3".parse().unwrap()),
                    ..Default::default()
                },
            ),
        ];
        for (m, f) in cases {
            let r = route_with(vec![Rule {
                matcher: m.clone(),
                to: Target::Canary,
            }]);
            assert_eq!(
                r.decide(Weight::ZERO, &f, Some(b"u")).target,
                Target::Canary,
                "{m:?} should match"
            );
            assert_eq!(
                r.decide(Weight::ZERO, &Facts::default(), Some(b"u")).target,
                Target::Stable,
                "{m:?} must not match empty request"
            );
        }
    }

    #[test]
    fn sticky_header_beats_cookie() {
        let r = route_with(vec![]);
        let f = Facts {
            headers: vec![("x-user-id", "h")],
            cookies: vec![("canary_id", "c")],
            ..Default::default()
        };
        assert_eq!(r.sticky_key(&f), Some(StickyKey::Header(b"h")));
        let f = Facts {
            cookies: vec![("canary_id", "c")],
            ..Default::default()
        };
        assert_eq!(r.sticky_key(&f), Some(StickyKey::Cookie("c")));
        assert_eq!(r.sticky_key(&Facts::default()), None);
    }

    #[test]
    fn no_canary_always_stable() {
        let mut r = route_with(vec![Rule {
            matcher: RuleMatch::HeaderPresent { name: "x".into() },
            to: Target::Canary,
        }]);
        r.has_canary = false;
        let f = Facts {
            headers: vec![("x", "1")],
            ..Default::default()
        };
        assert_eq!(
            r.decide(Weight::FULL, &f, Some(b"u")).target,
            Target::Stable
        );
    }

    #[test]
    fn hosts_and_prefixes() {
        let mut r = Route::new("api");
        r.hosts = vec![
            HostMatch::parse("Shop.example.com"),
            HostMatch::parse("*.api.test"),
        ];
        r.path_prefix = "/api".into();
        assert!(r.matches(Some(&b"shop.EXAMPLE.com"[..]), "/api/x"));
        assert!(r.matches(Some(&b"eu.api.test"[..]), "/api"));
        assert!(!r.matches(Some(&b"api.test"[..]), "/api"));
        assert!(!r.matches(Some(&b"shop.example.com"[..]), "/web"));
        assert!(!r.matches(None, "/api"));
    }

    #[test]
    fn header_value_parsers() {
        assert_eq!(
            cookie_value("a=1; canary_id=xyz; b=2", "canary_id"),
            Some("xyz")
        );
        assert_eq!(cookie_value("a=1", "b"), None);
        assert_eq!(cookie_value(" a=1 ;\tb=\"2\"\t", "b"), Some("2"));
        assert_eq!(cookie_value("a=1;b", "b"), None);
        assert_eq!(cookie_value("ab=1; a=2", "a"), Some("2"));
        assert_eq!(cookie_value("a=", "a"), Some(""));
        assert_eq!(cookie_value("a=b=c", "a=b"), None);
        assert_eq!(cookie_value("a=b=c", "a"), Some("b=c"));
        assert_eq!(query_value("a=1&flag&b=2", "flag"), Some(""));
        assert_eq!(query_value("a=1&b=2", "b"), Some("2"));
        assert_eq!(query_value("ab=1&a=2&a=3", "a"), Some("2"));
        assert_eq!(query_value("a=1&b", "c"), None);
        assert_eq!(query_value("a=b=c", "a"), Some("b=c"));
        assert_eq!(query_value("a=b=c", "a=b"), None);
        assert_eq!(query_value("", "a"), None);
    }

    /// The pair parsers as the specification says them: split, trim, compare.
    fn spec_value<'a>(s: &'a str, sep: char, name: &str, cookie: bool) -> Option<&'a str> {
        if name.contains('=') {
            return None;
        }
        s.split(sep).find_map(|pair| {
            let pair = if cookie { pair.trim_ascii() } else { pair };
            match pair.split_once('=') {
                Some((k, v)) if k == name => Some(v),
                None if !cookie && pair == name => Some(""),
                _ => None,
            }
        })
    }

    proptest::proptest! {
        #[test]
        fn net_check_agrees_with_ipnet(
            net in proptest::prelude::any::<u32>(), len in 0u8..=32, ip in proptest::prelude::any::<u32>(),
            net6 in proptest::prelude::any::<u128>(), len6 in 0u8..=128, ip6 in proptest::prelude::any::<u128>(),
            near in proptest::prelude::any::<bool>(),
        ) {
            // `near`: an address sharing the prefix, so matches are tried as often as misses
            let ip = if near { net ^ (ip >> len.min(31)) } else { ip };
            let ip6 = if near { net6 ^ (ip6 >> len6.min(127)) } else { ip6 };
            let n = IpNet::V4(ipnet::Ipv4Net::new(net.into(), len).unwrap());
            let a = IpAddr::V4(ip.into());
            proptest::prop_assert_eq!(in_nets(&[n], a), n.contains(&a));
            let n6 = IpNet::V6(ipnet::Ipv6Net::new(net6.into(), len6).unwrap());
            let a6 = IpAddr::V6(ip6.into());
            proptest::prop_assert_eq!(in_nets(&[n6], a6), n6.contains(&a6));
            // an IPv4-mapped address is checked as the IPv4 one, against IPv4 nets only
            let mapped = IpAddr::V6(std::net::Ipv4Addr::from(ip).to_ipv6_mapped());
            proptest::prop_assert_eq!(in_nets(&[n, n6], mapped), n.contains(&a));
            proptest::prop_assert_eq!(in_nets(&[n6, n], a), n.contains(&a));
        }

        #[test]
        fn pair_parsers_agree_with_split_and_trim(
            s in "[ab= ;&\t\"]{0,24}",
            name in "[ab= ;&\t]{0,3}",
        ) {
            let want = spec_value(&s, ';', &name, true).map(|v| v.trim_matches('"'));
            proptest::prop_assert_eq!(cookie_value(&s, &name), want);
            proptest::prop_assert_eq!(query_value(&s, &name), spec_value(&s, '&', &name, false));
        }
    }
}
