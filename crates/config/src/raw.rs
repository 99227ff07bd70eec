//! Stage 1: the file as written, before any check.
//!
//! These structs mirror the YAML keys one to one (the key names are the user
//! interface). Every key is optional here, even required ones, so that a missing key
//! becomes one diagnostic among all the others instead of a serde error that stops at
//! the first. Values that validation checks are wrapped in [`Spanned`] so the
//! diagnostic can point at the offending value. Unknown keys are rejected
//! (`deny_unknown_fields`) so a typo is an error with its location, not a silently
//! ignored setting.

use std::fmt;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;
use serde_saphyr::Spanned;

/// A value with the location it was read from.
pub(crate) type S<T> = Spanned<T>;

/// A list of spanned values.
pub(crate) type List<T> = S<Vec<S<T>>>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConfig {
    pub listen: Option<S<String>>,
    pub admin: Option<S<String>>,
    pub state_dir: Option<S<String>>,
    pub admin_token_env: Option<S<String>>,
    pub workers: Option<S<i64>>,
    pub limits: Option<S<RawLimits>>,
    pub routes: Option<List<RawRoute>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawLimits {
    pub max_header_bytes: Option<S<i64>>,
    pub header_timeout: Option<S<String>>,
    pub max_connections: Option<S<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRoute {
    pub name: Option<S<String>>,
    pub hosts: Option<List<String>>,
    pub path_prefix: Option<S<String>>,
    pub stable: Option<S<RawPool>>,
    pub canary: Option<S<RawPool>>,
    pub weight: Option<S<f64>>,
    pub sticky: Option<S<RawSticky>>,
    pub rules: Option<List<RawRule>>,
    pub timeouts: Option<S<RawTimeouts>>,
    pub ejection: Option<S<RawEjection>>,
    pub rollout: Option<S<RawRollout>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPool {
    pub version: Option<S<String>>,
    pub upstreams: Option<List<String>>,
    pub http2: Option<bool>,
    pub health_check: Option<S<RawHealthCheck>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawHealthCheck {
    pub path: Option<S<String>>,
    pub interval: Option<S<String>>,
    pub timeout: Option<S<String>>,
    pub unhealthy_threshold: Option<S<i64>>,
    pub healthy_threshold: Option<S<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSticky {
    pub header: Option<S<String>>,
    pub cookie: Option<S<String>>,
}

/// One rule: exactly one matcher key plus `to` (checked in validation, so that every
/// mistake is reported, not only the first).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRule {
    pub header: Option<S<RawHeaderMatch>>,
    pub cookie: Option<S<RawCookieMatch>>,
    pub query: Option<S<RawQueryMatch>>,
    pub source: Option<S<StringList>>,
    pub to: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawHeaderMatch {
    pub name: Option<S<String>>,
    pub value: Option<S<String>>,
    pub regex: Option<S<String>>,
    pub present: Option<S<bool>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawCookieMatch {
    pub name: Option<S<String>>,
    pub value: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawQueryMatch {
    pub name: Option<S<String>>,
    pub value: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTimeouts {
    pub connect: Option<S<String>>,
    pub request: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawEjection {
    pub consecutive_failures: Option<S<i64>>,
    pub base: Option<S<String>>,
    pub max: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRollout {
    pub steps: Option<List<RawStep>>,
    pub analysis: Option<S<RawAnalysis>>,
    pub breaker: Option<S<RawBreaker>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawStep {
    pub weight: Option<S<f64>>,
    pub pause: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAnalysis {
    pub interval: Option<S<String>>,
    pub window: Option<S<String>>,
    pub min_requests: Option<S<i64>>,
    pub max_error_rate: Option<S<f64>>,
    pub max_p99_latency: Option<S<String>>,
    pub max_error_rate_increase: Option<S<f64>>,
    pub max_latency_increase: Option<S<f64>>,
    pub latency_noise_floor: Option<S<String>>,
    pub failure_limit: Option<S<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawBreaker {
    pub consecutive_failures: Option<S<i64>>,
}

/// A single string or a list of strings (`source: 10.0.0.0/8` or `source: [a, b]`).
///
/// Hand-written rather than `#[serde(untagged)]`: an untagged enum buffers its input
/// and loses the spans of the list items.
#[derive(Debug)]
pub(crate) enum StringList {
    /// The single string; its location is the enclosing `Spanned`'s.
    One(String),
    Many(Vec<S<String>>),
}

impl<'de> Deserialize<'de> for StringList {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ListVisitor;

        impl<'de> Visitor<'de> for ListVisitor {
            type Value = StringList;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or a list of strings")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<StringList, E> {
                Ok(StringList::One(v.to_string()))
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<StringList, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element()? {
                    items.push(item);
                }
                Ok(StringList::Many(items))
            }
        }

        deserializer.deserialize_any(ListVisitor)
    }
}
