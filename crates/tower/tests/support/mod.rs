//! Shared by the no-allocation test and the layer bench: services as an application
//! writes them, requests, and polling without a runtime.
#![allow(dead_code)]

use std::convert::Infallible;
use std::future::Future;
use std::task::{Context, Poll, Waker};

use axum::body::Body;
use axum::http::{header, HeaderValue, Request, Response};
use canary_tower::{Canary, RouteSpec};
use tower::Service;

/// A canary with one route `web` (v1 / v2) at 50 %, started on a current-thread
/// runtime, its state in a temporary directory: keep all three alive.
pub fn started() -> (tokio::runtime::Runtime, tempfile::TempDir, Canary) {
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
    (rt, dir, canary)
}

/// Polls a future that needs no IO to completion, with a no-op waker (no runtime
/// allocates or schedules anything meanwhile).
pub fn run<F: Future>(fut: F) -> F::Output {
    let mut fut = std::pin::pin!(fut);
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
            return v;
        }
    }
}

/// A service answering `v` with a content type, as an application writes one.
pub fn version(
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

/// `GET /`, with `x-user-id: user` when given.
pub fn request(user: Option<&'static str>) -> Request<Body> {
    let mut r = Request::builder().uri("/");
    if let Some(u) = user {
        r = r.header("x-user-id", u);
    }
    r.body(Body::empty()).expect("request")
}

/// Readies `svc`, calls it with [`request`] and drops the answer.
pub fn once<S>(svc: &mut S, user: Option<&'static str>)
where
    S: Service<Request<Body>, Response = Response<Body>>,
    S::Error: std::fmt::Debug,
{
    run(std::future::poll_fn(|cx| svc.poll_ready(cx))).expect("ready");
    drop(std::hint::black_box(
        run(svc.call(request(std::hint::black_box(user)))).expect("response"),
    ));
}

/// The version that answers `user` through `svc`.
pub fn version_of<S>(svc: &mut S, user: &'static str) -> String
where
    S: Service<Request<Body>, Response = Response<Body>>,
    S::Error: std::fmt::Debug,
{
    run(std::future::poll_fn(|cx| svc.poll_ready(cx))).expect("ready");
    let r = run(svc.call(request(Some(user)))).expect("response");
    r.headers()["x-canary-version"]
        .to_str()
        .expect("ascii")
        .to_string()
}
