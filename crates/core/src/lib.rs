//! The pure decision core of `canary`.
//!
//! Everything here is a plain function of its arguments: no IO, no clock, no threads.
//! Time and observations are passed in, so every decision can be tested exhaustively
//! and benchmarked in nanoseconds.
//!
//! # Layout
//!
//! - [`weight`]: the canary share as basis points, valid by construction.
//! - [`mod@bucket`]: the stable sticky hash that puts a user in one of 10 000 buckets.
//! - [`routing`]: route table, rules and the per-request routing decision.
//! - [`sticky_id`]: ids for clients without a sticky key, and their cookie.
//! - [`latency`]: the fixed latency histogram layout shared by metrics and analysis.
//! - [`analysis`]: turns windowed canary/stable measurements into a verdict.
//! - [`rollout`]: the rollout state machine, `step(state, input, now) -> state + events`.

#![forbid(unsafe_code)]

pub mod analysis;
pub mod bucket;
pub mod latency;
pub mod rollout;
pub mod routing;
pub mod sticky_id;
pub mod weight;

pub use bucket::{bucket, route_seed, BUCKETS};
pub use routing::{
    Decision, Reason, RequestFacts, Route, RouteTable, Rule, RuleMatch, Sticky, Target,
};
pub use weight::Weight;
