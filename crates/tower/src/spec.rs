//! What an application declares about a canary: its routes ([`RouteSpec`]) and their
//! rollout plans ([`Rollout`]).
//!
//! These are turned into the same validated model the binary reads from YAML
//! (`canary_config::RouteConfig`), so the controller, the analysis and the breaker
//! see an embedded route exactly as they see a proxied one. Defaults (analysis
//! thresholds, interval, window, breaker) are taken from the config crate by parsing
//! a template, so they can never drift from the binary's.

use std::time::Duration;

use canary_config::{Config, RouteConfig};
use canary_core::analysis::AnalysisSpec;
use canary_core::rollout::{BreakerSpec, Pause, RolloutSpec, Step, MAX_MIN_CLIENTS};
use canary_core::{Route, Rule, RuleMatch, Target, Weight};

use crate::error::Error;

/// The header the sticky key is read from by default, as in the README and the demo.
pub const DEFAULT_STICKY_HEADER: &str = "x-user-id";
/// The cookie the sticky key is read from (and a generated id kept in) by default.
pub const DEFAULT_STICKY_COOKIE: &str = "canary_id";

/// One canary route: a stable and a canary version of (part of) an application, the
/// rules and sticky key that split its users, and an optional rollout plan.
///
/// The name is what `canary status <name>` and the metrics' `route` label show; the
/// versions are what `x-canary-version` carries.
///
/// ```
/// use canary_tower::{Rollout, RouteSpec, RuleMatch, Target};
///
/// let web = RouteSpec::new("web", "v1", "v2")
///     .rule(RuleMatch::HeaderEquals { name: "x-canary".into(), value: "always".into() }, Target::Canary)
///     .rollout(Rollout::new().manual_step(10.0).breaker(5));
/// # let _ = web;
/// ```
#[derive(Clone, Debug)]
pub struct RouteSpec {
    pub(crate) name: String,
    pub(crate) stable: String,
    pub(crate) canary: String,
    pub(crate) weight: f64,
    pub(crate) rules: Vec<Rule>,
    pub(crate) sticky_header: Option<String>,
    pub(crate) sticky_cookie: String,
    pub(crate) rollout: Option<Rollout>,
}

impl RouteSpec {
    /// A route named `name` whose stable version is `stable` and canary version
    /// `canary`. Without a [`rollout`](Self::rollout) the canary gets
    /// [`weight`](Self::weight) percent (default 0) until changed through the admin API.
    pub fn new(
        name: impl Into<String>,
        stable: impl Into<String>,
        canary: impl Into<String>,
    ) -> RouteSpec {
        RouteSpec {
            name: name.into(),
            stable: stable.into(),
            canary: canary.into(),
            weight: 0.0,
            rules: Vec::new(),
            sticky_header: Some(DEFAULT_STICKY_HEADER.to_string()),
            sticky_cookie: DEFAULT_STICKY_COOKIE.to_string(),
            rollout: None,
        }
    }

    /// The canary's share in percent (0–100, two decimals) for a route without a
    /// rollout. With a rollout the plan sets the weight.
    pub fn weight(mut self, percent: f64) -> RouteSpec {
        self.weight = percent;
        self
    }

    /// Adds a rule: a request it matches goes to `to`, whatever the weight. Rules are
    /// checked in the order they were added; the first match wins. Header names are
    /// compared case-insensitively.
    pub fn rule(mut self, matcher: RuleMatch, to: Target) -> RouteSpec {
        let matcher = match matcher {
            RuleMatch::HeaderEquals { name, value } => RuleMatch::HeaderEquals {
                name: name.to_ascii_lowercase(),
                value,
            },
            RuleMatch::HeaderRegex { name, regex } => RuleMatch::HeaderRegex {
                name: name.to_ascii_lowercase(),
                regex,
            },
            RuleMatch::HeaderPresent { name } => RuleMatch::HeaderPresent {
                name: name.to_ascii_lowercase(),
            },
            other => other,
        };
        self.rules.push(Rule { matcher, to });
        self
    }

    /// The header the sticky key is read from first (default `x-user-id`); `None`
    /// reads only the cookie.
    pub fn sticky_header(mut self, header: Option<&str>) -> RouteSpec {
        self.sticky_header = header.map(str::to_ascii_lowercase);
        self
    }

    /// The cookie the sticky key is read from when the header is absent, and the one
    /// a generated id is set in (default `canary_id`).
    pub fn sticky_cookie(mut self, cookie: &str) -> RouteSpec {
        self.sticky_cookie = cookie.to_string();
        self
    }

    /// Drives this route with an automatic rollout plan.
    pub fn rollout(mut self, rollout: Rollout) -> RouteSpec {
        self.rollout = Some(rollout);
        self
    }

    /// The validated model of this route, built on `template` (a route the config
    /// crate parsed, for every default). Checks what the YAML validation checks for
    /// the fields an application sets.
    pub(crate) fn to_config(&self, template: &RouteConfig) -> Result<RouteConfig, Error> {
        let bad = |why: String| Error::Invalid {
            route: self.name.clone(),
            why,
        };
        if self.name.is_empty() {
            return Err(bad("the route name is empty".into()));
        }
        for (what, v) in [("stable", &self.stable), ("canary", &self.canary)] {
            if v.is_empty() || http::HeaderValue::from_str(v).is_err() {
                return Err(bad(format!(
                    "the {what} version {v:?} must be non-empty visible ASCII (it is sent in x-canary-version)"
                )));
            }
        }
        if self.stable == self.canary {
            return Err(bad(format!(
                "stable and canary are both version {:?}",
                self.stable
            )));
        }
        if let Some(h) = &self.sticky_header {
            if !is_token(h) {
                return Err(bad(format!(
                    "sticky header {h:?} is not a valid HTTP header name"
                )));
            }
        }
        if !is_token(&self.sticky_cookie) {
            return Err(bad(format!(
                "sticky cookie {:?} is not a valid cookie name (letters, digits and !#$%&'*+-.^_`|~)",
                self.sticky_cookie
            )));
        }
        let weight = percent(self.weight).map_err(|e| bad(format!("weight: {e}")))?;
        let mut route = Route::new(self.name.clone());
        route.rules = self.rules.clone();
        route.sticky.header = self.sticky_header.clone();
        route.sticky.cookie = self.sticky_cookie.clone();
        route.has_canary = true;
        let mut rc = template.clone();
        rc.route = route;
        rc.stable.version = self.stable.clone();
        // The application's own services serve both versions: no instances, no
        // health checks, no HTTP/2 upstream.
        rc.stable.upstreams.clear();
        rc.stable.health_check = None;
        let mut canary = rc.stable.clone();
        canary.version = self.canary.clone();
        rc.canary = Some(canary);
        rc.weight = weight;
        rc.rollout = match &self.rollout {
            Some(r) => Some(r.to_spec().map_err(bad)?),
            None => None,
        };
        Ok(rc)
    }
}

/// A rollout plan: steps of increasing weight, each held for a pause (timed, or until
/// `canary promote`), judged by the analysis, guarded by the breaker. The same plan
/// the binary reads from a route's `rollout:` (docs/rollouts.md).
///
/// Defaults are the binary's: analysis every 10 s over 60 s, at least 50 canary
/// requests, at most 1 % errors, two failed verdicts abort; breaker at 5 consecutive
/// canary failures.
///
/// ```
/// use std::time::Duration;
/// use canary_tower::Rollout;
///
/// let plan = Rollout::new()
///     .step(5.0, Duration::from_secs(60))
///     .step(25.0, Duration::from_secs(300))
///     .manual_step(50.0)
///     .step(100.0, Duration::ZERO)
///     .breaker(5);
/// # let _ = plan;
/// ```
#[derive(Clone, Debug)]
pub struct Rollout {
    steps: Vec<(f64, Pause)>,
    analysis: Option<AnalysisSpec>,
    interval: Option<Duration>,
    window: Option<Duration>,
    breaker: Option<Option<u32>>,
    min_clients: Option<u32>,
}

impl Default for Rollout {
    fn default() -> Self {
        Rollout::new()
    }
}

impl Rollout {
    /// An empty plan; add at least one step.
    pub fn new() -> Rollout {
        Rollout {
            steps: Vec::new(),
            analysis: None,
            interval: None,
            window: None,
            breaker: None,
            min_clients: None,
        }
    }

    /// A step at `percent` held at least `pause` and until a passing verdict.
    pub fn step(mut self, percent: f64, pause: Duration) -> Rollout {
        let ms = u64::try_from(pause.as_millis()).unwrap_or(u64::MAX);
        self.steps.push((percent, Pause::For(ms)));
        self
    }

    /// A step at `percent` held until a user promotes (`canary promote <route>`).
    pub fn manual_step(mut self, percent: f64) -> Rollout {
        self.steps.push((percent, Pause::Manual));
        self
    }

    /// Aborts at once after `failures` consecutive failed canary requests (5xx or a
    /// service error); 0 turns the breaker off.
    pub fn breaker(mut self, failures: u32) -> Rollout {
        self.breaker = Some((failures > 0).then_some(failures));
        self
    }

    /// The distinct clients a breaker run must come from before it trips (default 1
    /// here, 3 in the binary's config). Clients are told apart by peer address and
    /// sticky key; the address is known only when the application is served with
    /// `into_make_service_with_connect_info::<SocketAddr>()`, so an embedding that
    /// cannot tell its clients apart keeps the default (docs/embedding.md).
    pub fn breaker_min_clients(mut self, clients: u32) -> Rollout {
        self.min_clients = Some(clients);
        self
    }

    /// The analysis limits (see [`AnalysisSpec`]).
    pub fn analysis(mut self, analysis: AnalysisSpec) -> Rollout {
        self.analysis = Some(analysis);
        self
    }

    /// How often a verdict is taken.
    pub fn interval(mut self, every: Duration) -> Rollout {
        self.interval = Some(every);
        self
    }

    /// The sliding window a verdict looks at (at least the interval).
    pub fn window(mut self, window: Duration) -> Rollout {
        self.window = Some(window);
        self
    }

    fn to_spec(&self) -> Result<RolloutSpec, String> {
        let defaults = template()
            .routes
            .into_iter()
            .next()
            .and_then(|r| r.rollout)
            .expect("the template has a rollout");
        if self.steps.is_empty() {
            return Err("the rollout has no steps; add at least one".into());
        }
        let mut steps = Vec::with_capacity(self.steps.len());
        for (i, (p, pause)) in self.steps.iter().enumerate() {
            let weight = percent(*p).map_err(|e| format!("step {}: {e}", i + 1))?;
            if steps.last().is_some_and(|s: &Step| s.weight > weight) {
                return Err(format!(
                    "step {}: weight {weight} is below the previous step's; steps never lower the weight",
                    i + 1
                ));
            }
            steps.push(Step {
                weight,
                pause: *pause,
            });
        }
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let interval_ms = self.interval.map_or(defaults.interval_ms, ms);
        let window_ms = self.window.map_or(defaults.window_ms, ms);
        if interval_ms == 0 {
            return Err("the analysis interval must be more than 0".into());
        }
        if window_ms < interval_ms {
            return Err(format!(
                "the analysis window ({window_ms} ms) is shorter than the interval ({interval_ms} ms)"
            ));
        }
        Ok(RolloutSpec {
            steps,
            analysis: self.analysis.clone().unwrap_or(defaults.analysis),
            interval_ms,
            window_ms,
            breaker: match self.breaker {
                Some(failures) => failures.map(|consecutive_failures| BreakerSpec {
                    consecutive_failures,
                    min_clients: self
                        .min_clients
                        .unwrap_or(1)
                        .clamp(1, consecutive_failures.min(MAX_MIN_CLIENTS)),
                }),
                None => defaults.breaker.map(|b| BreakerSpec {
                    min_clients: self
                        .min_clients
                        .unwrap_or(1)
                        .clamp(1, b.consecutive_failures.min(MAX_MIN_CLIENTS)),
                    ..b
                }),
            },
        })
    }
}

/// A weight from percent, with the config crate's reason when it is out of range.
fn percent(p: f64) -> Result<Weight, String> {
    Weight::from_percent(p).ok_or_else(|| format!("{p} is not a percentage from 0 to 100"))
}

/// An RFC 9110 token: what a header or cookie name may be.
fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// A config parsed by the config crate, whose route carries every default a route and
/// a rollout get in the binary. Embedded routes are built on it (see the module docs).
pub(crate) fn template() -> Config {
    const TEMPLATE: &str = "listen: 127.0.0.1:1
routes:
  - name: template
    stable: {version: v1, upstreams: [\"127.0.0.1:1\"]}
    canary: {version: v2, upstreams: [\"127.0.0.1:2\"]}
    rollout:
      steps: [{weight: 1, pause: manual}]
";
    canary_config::parse("canary-tower template", TEMPLATE)
        .expect("the built-in template is a valid config")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_binarys() {
        let t = template();
        let r = &t.routes[0];
        let spec = r.rollout.clone().expect("rollout");
        assert_eq!(spec.breaker.map(|b| b.consecutive_failures), Some(5));
        assert_eq!((spec.interval_ms, spec.window_ms), (10_000, 60_000));
        let rc = RouteSpec::new("web", "v1", "v2")
            .rollout(Rollout::new().manual_step(10.0))
            .to_config(r)
            .expect("valid");
        let got = rc.rollout.expect("rollout");
        assert_eq!(got.analysis, spec.analysis);
        assert_eq!(got.breaker.map(|b| b.consecutive_failures), Some(5));
        assert_eq!(rc.route.sticky.header.as_deref(), Some("x-user-id"));
        assert_eq!(rc.route.sticky.cookie, "canary_id");
    }

    #[test]
    fn invalid_specs_are_refused_with_the_reason() {
        let t = template();
        let r = &t.routes[0];
        let cases = [
            (RouteSpec::new("web", "v1", "v1"), "both version"),
            (RouteSpec::new("web", "v1", "v2").weight(120.0), "weight"),
            (
                RouteSpec::new("web", "v1", "v2").sticky_cookie("a b"),
                "cookie name",
            ),
            (
                RouteSpec::new("web", "v1", "v2").rollout(Rollout::new()),
                "no steps",
            ),
            (
                RouteSpec::new("web", "v1", "v2")
                    .rollout(Rollout::new().manual_step(50.0).manual_step(10.0)),
                "below the previous",
            ),
            (
                RouteSpec::new("web", "v1", "v2").rollout(
                    Rollout::new()
                        .manual_step(5.0)
                        .interval(Duration::from_secs(10))
                        .window(Duration::from_secs(1)),
                ),
                "shorter than the interval",
            ),
        ];
        for (spec, want) in cases {
            let err = spec.to_config(r).expect_err("invalid").to_string();
            assert!(err.contains(want), "{err:?} should mention {want:?}");
            assert!(err.contains("web"), "{err:?} names the route");
        }
    }
}
