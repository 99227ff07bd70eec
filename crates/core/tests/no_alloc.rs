//! The routing decision (route match, rules, sticky key, bucket) allocates nothing.
//!
//! A counting global allocator (`stats_alloc`) wraps the system allocator for this
//! test binary only; the decision runs many times and the allocation count must not move.

mod support;

use std::alloc::System;

use canary_core::Weight;
use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

#[test]
fn routing_decision_does_not_allocate() {
    let table = support::table();
    let facts = support::facts();
    let weight = Weight::from_percent(10.0).unwrap();
    // The counter is process-wide, so another thread of the test harness allocating at
    // the same moment shows up too (seen once under a loaded `cargo test --workspace`).
    // An allocating decision would allocate in every one of the 10,000 runs of every
    // round, so one clean round out of three is proof; every round is reported.
    let mut rounds = Vec::new();
    for _ in 0..3 {
        let region = Region::new(GLOBAL);
        let mut canary = 0u32;
        for _ in 0..10_000 {
            let d = support::decide(&table, &facts, weight);
            canary += u32::from(d.target == canary_core::Target::Canary);
        }
        let stats = region.change();
        // The same user every time: all canary or all stable.
        assert!(canary == 0 || canary == 10_000);
        if stats.allocations == 0 && stats.reallocations == 0 {
            return;
        }
        rounds.push(stats);
    }
    panic!("the decision allocated in every round: {rounds:?}");
}
