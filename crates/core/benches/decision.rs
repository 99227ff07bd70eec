//! The per-request routing decision: route match, rules, sticky key, bucket.

#[path = "../tests/support.rs"]
mod support;

use canary_core::Weight;
use criterion::{criterion_group, criterion_main, Criterion};
use std::hint::black_box;

fn decision(c: &mut Criterion) {
    let table = support::table();
    let facts = support::facts();
    let weight = Weight::from_percent(10.0).unwrap();
    c.bench_function("decide/full (match 4 routes, 6 rules, bucket)", |b| {
        b.iter(|| black_box(support::decide(&table, &facts, weight)))
    });
    c.bench_function("bucket/xxh3 of a 13-byte key", |b| {
        let seed = canary_core::route_seed("web");
        b.iter(|| canary_core::bucket(seed, black_box(b"user-4f1c2a9e")))
    });
}

criterion_group!(benches, decision);
criterion_main!(benches);
