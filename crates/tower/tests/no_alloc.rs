//! The layer allocates nothing per request beyond what the wrapped services do: the
//! same requests through `Split` and straight to the service allocate the same count,
//! and a request without a sticky key allocates exactly one thing more (its
//! `Set-Cookie` value).
//!
//! A counting global allocator (`stats_alloc`) wraps the system allocator for this
//! test binary only. Futures are polled with a no-op waker (the services answer at
//! once), so no runtime allocates inside the measured region.

use std::alloc::System;
use std::convert::Infallible;
use std::future::Future;
use std::task::{Context, Poll, Waker};

use axum::body::Body;
use axum::handler::HandlerWithoutStateExt;
use axum::http::{header, HeaderValue, Request, Response};
use axum::routing::get;
use axum::Router;
use canary_tower::{Canary, RouteSpec};
use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};
use tower::Service;

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

const REQUESTS: usize = 1_000;

/// Polls a future that needs no IO to completion.
fn run<F: Future>(fut: F) -> F::Output {
    let mut fut = std::pin::pin!(fut);
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
            return v;
        }
    }
}

/// A service as an application writes one: a response with a content type.
fn version(
    v: &'static str,
) -> impl Service<Request<Body>, Response = Response<Body>, Error = Infallible, Future: Send> + Clone
{
    tower::service_fn(move |_req: Request<Body>| async move {
        let mut r = Response::new(Body::from(v));
        r.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        Ok::<_, Infallible>(r)
    })
}

fn request(user: Option<&'static str>) -> Request<Body> {
    let mut r = Request::builder().uri("/");
    if let Some(u) = user {
        r = r.header("x-user-id", u);
    }
    r.body(Body::empty()).expect("request")
}

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
        run(std::future::poll_fn(|cx| svc.poll_ready(cx))).expect("ready");
        drop(run(svc.call(request(user))).expect("response"));
        let region = Region::new(GLOBAL);
        for _ in 0..REQUESTS {
            run(std::future::poll_fn(|cx| svc.poll_ready(cx))).expect("ready");
            let resp = run(svc.call(request(user))).expect("response");
            drop(resp);
        }
        let s = region.change();
        rounds.push(s.allocations + s.reallocations);
    }
    rounds.into_iter().min().expect("three rounds")
}

#[test]
fn the_layer_allocates_nothing_per_request_beyond_the_services() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let canary = rt.block_on(async {
        Canary::builder()
            .state_dir(dir.path())
            .route(RouteSpec::new("web", "v1", "v2").weight(50.0))
            .start()
            .expect("start")
    });
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
        .map(|u| {
            run(split.call(request(Some(u))))
                .expect("response")
                .headers()["x-canary-version"]
                .clone()
        })
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
        let to = run(split.call(request(Some(user)))).expect("response");
        if to.headers()["x-canary-version"] != "v1" {
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
