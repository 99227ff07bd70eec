//! The layer's overhead over calling the service directly.
//!
//! Each iteration builds a request, readies and calls the service and drops the
//! answer; futures are polled with a no-op waker (the services answer at once), so
//! the difference between `direct` and the `split/*` cases is the layer: the sticky
//! key, the core's decision, the clock reads, the counters and the added response
//! fields. `axum/*` does the same through an axum `Router` with and without the layer.

#[path = "../tests/support/mod.rs"]
mod support;

use axum::routing::get;
use axum::Router;
use criterion::{criterion_group, criterion_main, Criterion};
use support::{once, version, version_of};

fn bench(c: &mut Criterion) {
    let (rt, _dir, canary) = support::started();
    let mut split = canary.split("web", version("v1"), version("v2"));
    // A user of each version at 50 %.
    let users: Vec<(&'static str, String)> = ["alice", "bob", "carol", "dave"]
        .into_iter()
        .map(|u| (u, version_of(&mut split, u)))
        .collect();
    let stable_user = users
        .iter()
        .find(|(_, v)| v == "v1")
        .expect("a stable user")
        .0;
    let canary_user = users
        .iter()
        .find(|(_, v)| v == "v2")
        .expect("a canary user")
        .0;

    let mut g = c.benchmark_group("layer");
    let mut direct = version("v1");
    g.bench_function("direct", |b| {
        b.iter(|| once(&mut direct, Some(stable_user)))
    });
    g.bench_function("split/stable", |b| {
        b.iter(|| once(&mut split, Some(stable_user)))
    });
    g.bench_function("split/canary", |b| {
        b.iter(|| once(&mut split, Some(canary_user)))
    });
    g.bench_function("split/new_client", |b| b.iter(|| once(&mut split, None)));

    let mut plain: Router = Router::new().route("/", get(|| async { "v1" }));
    let mut layered: Router = Router::new()
        .route("/", get(|| async { "v1" }))
        .layer(canary.layer("web", Router::new().route("/", get(|| async { "v2" }))));
    g.bench_function("axum/direct", |b| {
        b.iter(|| once(&mut plain, Some(stable_user)))
    });
    g.bench_function("axum/layered_stable", |b| {
        b.iter(|| once(&mut layered, Some(stable_user)))
    });
    g.finish();
    drop((canary, rt));
}

criterion_group!(benches, bench);
criterion_main!(benches);
