//! Recording one request's outcome: status class, failure, latency bucket, sum.

use canary_proxy::metrics::VersionStats;
use criterion::{criterion_group, criterion_main, Criterion};
use std::hint::black_box;

fn record(c: &mut Criterion) {
    let stats = VersionStats::new("web", "v1");
    c.bench_function("metrics/record one request", |b| {
        b.iter(|| stats.record(black_box(200), black_box(1_234)))
    });
}

criterion_group!(benches, record);
criterion_main!(benches);
