//! The layer allocates nothing per request beyond what the wrapped services do: the
//! same requests through `Split` and straight to the service allocate the same count,
//! and a request without a sticky key allocates exactly one thing more (its
//! `Set-Cookie` value).
//!
//! A counting global allocator (`stats_alloc`) wraps the system allocator for this
//! test binary only. Futures are polled with a no-op waker (the services answer at
//! once), so no runtime allocates inside the measured region.

mod support;

use std::alloc::System;

use axum::body::Body;
use axum::handler::HandlerWithoutStateExt;
use axum::http::{HeaderValue, Request, Response};
use axum::routing::get;
use axum::Router;
use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};
use support::{once, version, version_of};
use tower::Service;

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

const REQUESTS: usize = 1_000;

/// Allocations of `REQUESTS` calls of `svc`, the fewest of three rounds: the counter
/// is process-wide, so another harness thread allocating shows up too, while an
/// allocation of the code under test shows up in every round.
fn allocations<S>(mut svc: S, user: Option<&'static str>) -> usize
where
    S: Service<Request<Body>, Response = Response<Body>>,
    S::Error: std::fmt::Debug,
{
    let mut rounds = Vec::new();
    for _ in 0..3 {
        // Warm up outside the region (first-use initialisation, shared header values).
        once(&mut svc, user);
        let region = Region::new(GLOBAL);
        for _ in 0..REQUESTS {
            once(&mut svc, user);
        }
        let s = region.change();
        rounds.push(s.allocations + s.reallocations);
    }
    rounds.into_iter().min().expect("three rounds")
}

#[test]
fn the_layer_allocates_nothing_per_request_beyond_the_services() {
    let (rt, _dir, canary) = support::started();
    // Users on both sides of the 50 % split (checked below), with a sticky key.
    for user in ["alice", "bob", "carol"] {
        let direct = allocations(version("v1"), Some(user));
        let layered = allocations(
            canary.split("web", version("v1"), version("v2")),
            Some(user),
        );
        assert_eq!(
            layered, direct,
            "{user}: {layered} allocations through the layer, {direct} direct"
        );
    }
    let mut split = canary.split("web", version("v1"), version("v2"));
    let versions: std::collections::HashSet<_> = ["alice", "bob", "carol"]
        .into_iter()
        .map(|u| version_of(&mut split, u))
        .collect();
    assert_eq!(
        versions.len(),
        2,
        "the users cover both versions: {versions:?}"
    );

    // Without a key: one allocation more per request, the generated cookie's value.
    let direct = allocations(version("v1"), None);
    let layered = allocations(canary.split("web", version("v1"), version("v2")), None);
    assert_eq!(
        layered,
        direct + REQUESTS,
        "{layered} through the layer, {direct} direct"
    );

    // axum: `Router::layer` boxes each route's layered service and clones it per
    // request (axum's `Route::call`), so any layer costs the clone of the route it
    // wraps; and axum's plain-text answers come with a full header map, so adding
    // any field grows it. The baseline is the same router under a layer that only
    // adds `x-canary-version`. The canary is a `Router` (an `Arc` inside: cloning it
    // allocates nothing); the users are ones the split sends to stable, so the same
    // handler answers in both.
    static X_CANARY_VERSION: axum::http::HeaderName =
        axum::http::HeaderName::from_static("x-canary-version");
    let v1 = HeaderValue::from_static("v1");
    let baseline: Router =
        Router::new()
            .route("/", get(|| async { "v1" }))
            .layer(tower::util::MapResponseLayer::new(
                move |mut r: axum::response::Response| {
                    r.headers_mut().insert(X_CANARY_VERSION.clone(), v1.clone());
                    r
                },
            ));
    let v2_router: Router = Router::new().route("/", get(|| async { "v2" }));
    let layered_app: Router = Router::new()
        .route("/", get(|| async { "v1" }))
        .layer(canary.layer("web", v2_router));
    // The canary as a handler service: cloning it clones the closure.
    let handler_app: Router = Router::new()
        .route("/", get(|| async { "v1" }))
        .layer(canary.layer("web", (|| async { "v2" }).into_service()));
    let mut stable_users = 0;
    for user in ["alice", "bob", "carol", "dave", "erin", "frank"] {
        if version_of(&mut split, user) != "v1" {
            continue;
        }
        stable_users += 1;
        let base = allocations(baseline.clone(), Some(user));
        let layered = allocations(layered_app.clone(), Some(user));
        assert_eq!(
            layered, base,
            "axum {user}: {layered} through the layer, {base} through a layer that only adds the field"
        );
        let handler = allocations(handler_app.clone(), Some(user));
        assert_eq!(
            handler, base,
            "axum {user}, a handler service as the canary"
        );
    }
    assert!(stable_users > 0, "some of the users are on stable");
    drop(canary);
    drop(rt);
}
