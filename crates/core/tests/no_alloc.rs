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
    let region = Region::new(GLOBAL);
    let mut canary = 0u32;
    for _ in 0..10_000 {
        let idx = table
            .find(Some("shop.example.com"), "/products/42")
            .expect("route");
        let route = &table.routes[idx];
        let key = route.sticky_key(&facts).map(|k| k.bytes());
        let d = route.decide(weight, &facts, key);
        canary += u32::from(d.target == canary_core::Target::Canary);
    }
    let stats = region.change();
    assert_eq!(stats.allocations, 0, "decision allocated: {stats:?}");
    assert_eq!(stats.reallocations, 0, "decision reallocated: {stats:?}");
    // The same user every time: all canary or all stable.
    assert!(canary == 0 || canary == 10_000);
}
