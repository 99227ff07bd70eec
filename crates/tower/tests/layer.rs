//! The layer as an application sees it: split, stickiness and rules against the
//! core's decision, the response fields, metrics through promtool, the breaker and
//! the abort, the admin router, and a plain hyper server.

use std::convert::Infallible;
use std::net::IpAddr;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::routing::get;
use axum::Router;
use canary_core::{RequestFacts, Route};
use canary_tower::{Canary, Command, Phase, Rollout, RouteSpec, RuleMatch, Target, Weight};
use http_body_util::BodyExt;

#[path = "../../canary/tests/common/promtool.rs"]
mod promtool;
use promtool::promtool_check;
use tower::ServiceExt;

/// Time for the controller task to handle an event or a tick ("eventually" checks).
const EVENTUALLY: Duration = Duration::from_secs(10);

/// An embedded canary with one route, and the axum app behind its layer (`/`
/// answers `v1` or `v2`; the canary answers `canary_status`).
fn app(spec: RouteSpec, canary_status: StatusCode) -> (tempfile::TempDir, Canary, Router) {
    let dir = tempfile::tempdir().expect("tempdir");
    let canary = Canary::builder()
        .state_dir(dir.path())
        .route(spec)
        .start()
        .expect("start");
    let app = Router::new()
        .route("/", get(|| async { "v1" }))
        .layer(canary.layer("web", get(move || async move { (canary_status, "v2") })));
    (dir, canary, app)
}

struct Reply {
    status: StatusCode,
    version: Option<String>,
    set_cookie: Option<String>,
    body: String,
}

async fn send(app: &Router, headers: &[(&str, &str)]) -> Reply {
    let mut req = Request::builder().uri("/?a=1");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = app
        .clone()
        .oneshot(req.body(Body::empty()).expect("request"))
        .await
        .expect("infallible");
    let header = |n: &str| {
        resp.headers()
            .get(n)
            .map(|v| v.to_str().expect("ascii").to_string())
    };
    let (status, version, set_cookie) = (
        resp.status(),
        header("x-canary-version"),
        header("set-cookie"),
    );
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    Reply {
        status,
        version,
        set_cookie,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

/// `method uri` on a router (the admin or metrics one): status, content type, body.
async fn call(router: &Router, method: &str, uri: &str) -> (StatusCode, String, String) {
    let req = Request::builder()
        .method(method)
        .uri(uri)
        // The admin listener's Host rule (docs/admin-api.md) applies here too.
        .header("host", "127.0.0.1:3001")
        .body(Body::empty())
        .expect("request");
    let resp = router.clone().oneshot(req).await.expect("infallible");
    let status = resp.status();
    let ctype = resp
        .headers()
        .get("content-type")
        .map_or(String::new(), |v| v.to_str().expect("ascii").to_string());
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (
        status,
        ctype,
        String::from_utf8(body.to_vec()).expect("utf-8"),
    )
}

/// A JSON answer of the admin router, with its status.
async fn call_json(router: &Router, method: &str, uri: &str) -> (StatusCode, serde_json::Value) {
    let (status, _, body) = call(router, method, uri).await;
    (status, serde_json::from_str(&body).expect("json"))
}

/// The request as the core sees it, from plain lists: the reference decision.
#[derive(Default)]
struct Facts {
    headers: Vec<(&'static str, String)>,
    cookie: Option<String>,
}

impl RequestFacts for Facts {
    fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_bytes())
    }
    fn cookie(&self, name: &str) -> Option<&str> {
        canary_core::routing::cookie_value(self.cookie.as_deref()?, name)
    }
    fn query(&self, _: &str) -> Option<&str> {
        None
    }
    fn source_ip(&self) -> Option<IpAddr> {
        None
    }
}

/// The proxy's route for the same name and sticky settings.
fn core_route() -> Route {
    let mut r = Route::new("web");
    r.has_canary = true;
    r.sticky.header = Some("x-user-id".into());
    r
}

/// The version the core decides for these facts at this weight.
fn core_version(facts: &Facts, weight: f64) -> &'static str {
    let r = core_route();
    let key = r.sticky_key(facts).map(|k| k.bytes());
    match r
        .decide(Weight::from_percent(weight).expect("weight"), facts, key)
        .target
    {
        Target::Stable => "v1",
        Target::Canary => "v2",
    }
}

#[tokio::test]
async fn each_user_gets_the_version_the_core_decides_and_keeps_it() {
    let (_dir, _canary, app) = app(
        RouteSpec::new("web", "v1", "v2").weight(10.0),
        StatusCode::OK,
    );
    let mut canary = 0;
    for i in 0..1000 {
        let user = format!("user-{i}");
        let facts = Facts {
            headers: vec![("x-user-id", user.clone())],
            ..Default::default()
        };
        let want = core_version(&facts, 10.0);
        let r = send(&app, &[("x-user-id", &user)]).await;
        assert_eq!(r.version.as_deref(), Some(want), "{user}");
        assert_eq!(r.body, want, "the version that answered is the one named");
        assert_eq!(r.set_cookie, None, "a user with a key gets no cookie");
        canary += usize::from(want == "v2");
        // Sticky: the same user again.
        let again = send(&app, &[("x-user-id", &user)]).await;
        assert_eq!(again.version.as_deref(), Some(want), "{user} again");
    }
    // 10 % of 1000 users, within a wide margin (the bucket hash is pinned in core).
    assert!(
        (60..=140).contains(&canary),
        "{canary} canary users of 1000"
    );
}

#[tokio::test]
async fn the_cookie_is_the_key_without_the_header_and_a_new_client_gets_one() {
    let (_dir, _canary, app) = app(
        RouteSpec::new("web", "v1", "v2").weight(50.0),
        StatusCode::OK,
    );
    for i in 0..200 {
        let id = format!("id-{i}");
        let cookie = format!("other=1; canary_id={id}");
        let facts = Facts {
            cookie: Some(cookie.clone()),
            ..Default::default()
        };
        let r = send(&app, &[("cookie", &cookie)]).await;
        assert_eq!(
            r.version.as_deref(),
            Some(core_version(&facts, 50.0)),
            "{id}"
        );
        assert_eq!(r.set_cookie, None);
    }
    // No key: a generated id in the proxy's cookie, and the version its bucket gives.
    let mut seen = std::collections::HashSet::new();
    for _ in 0..50 {
        let r = send(&app, &[]).await;
        let set = r.set_cookie.expect("a generated sticky cookie");
        let (pair, attrs) = set.split_once(';').expect("attributes");
        assert_eq!(
            attrs, " Path=/; Max-Age=31536000; HttpOnly; SameSite=Lax",
            "{set}"
        );
        let id = pair.strip_prefix("canary_id=").expect("canary_id cookie");
        assert!(
            id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()),
            "{id}"
        );
        assert!(seen.insert(id.to_string()), "ids are unique");
        let facts = Facts {
            cookie: Some(pair.to_string()),
            ..Default::default()
        };
        assert_eq!(r.version.as_deref(), Some(core_version(&facts, 50.0)));
        let back = send(&app, &[("cookie", pair)]).await;
        assert_eq!(back.version, r.version, "the client keeps its version");
        assert_eq!(back.set_cookie, None);
    }
}

#[tokio::test]
async fn rules_win_over_the_weight_in_order() {
    let spec = RouteSpec::new("web", "v1", "v2")
        .weight(0.0)
        .rule(
            RuleMatch::HeaderEquals {
                name: "X-Canary".into(),
                value: "always".into(),
            },
            Target::Canary,
        )
        .rule(
            RuleMatch::Query {
                name: "a".into(),
                value: Some("2".into()),
            },
            Target::Canary,
        )
        .rule(
            RuleMatch::HeaderPresent {
                name: "x-canary".into(),
            },
            Target::Stable,
        );
    let (_dir, canary, app) = app(spec, StatusCode::OK);
    let r = send(&app, &[("x-canary", "always"), ("x-user-id", "u")]).await;
    assert_eq!(r.version.as_deref(), Some("v2"), "rule 1 at weight 0");
    canary
        .command("web", Command::SetWeight(Weight::FULL))
        .expect("set the weight");
    let r = send(&app, &[("x-canary", "never"), ("x-user-id", "u")]).await;
    assert_eq!(r.version.as_deref(), Some("v1"), "rule 3 at weight 100");
    let r = send(&app, &[("x-user-id", "u")]).await;
    assert_eq!(r.version.as_deref(), Some("v2"), "no rule: the weight");
}

#[tokio::test]
async fn raising_the_weight_never_moves_a_canary_user_to_stable() {
    let (_dir, canary, app) = app(
        RouteSpec::new("web", "v1", "v2").weight(5.0),
        StatusCode::OK,
    );
    let users: Vec<String> = (0..300).map(|i| format!("u{i}")).collect();
    let mut was_canary = vec![false; users.len()];
    for pct in [5.0, 20.0, 50.0, 80.0, 100.0] {
        canary
            .command(
                "web",
                Command::SetWeight(Weight::from_percent(pct).expect("weight")),
            )
            .expect("set the weight");
        for (u, was) in users.iter().zip(was_canary.iter_mut()) {
            let v = send(&app, &[("x-user-id", u)]).await.version;
            let now = v.as_deref() == Some("v2");
            assert!(now || !*was, "{u} moved back to stable at {pct}%");
            *was = now;
        }
    }
    assert!(was_canary.iter().all(|c| *c), "everyone on canary at 100%");
}

#[tokio::test]
async fn metrics_have_the_proxys_names_and_pass_promtool() {
    let spec = RouteSpec::new("web", "v1", "v2").rollout(Rollout::new().manual_step(50.0));
    let (_dir, canary, app) = app(spec, StatusCode::OK);
    for i in 0..40 {
        send(&app, &[("x-user-id", &format!("m{i}"))]).await;
    }
    // Mounted as the application would, on its own router.
    let (status, ctype, text) = call(&canary.metrics().router(), "GET", "/metrics").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(ctype, "text/plain; version=0.0.4; charset=utf-8");
    let value = |line_start: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(line_start))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no sample {line_start}\n{text}"))
    };
    let v1 = value("canary_requests_total{route=\"web\",version=\"v1\",class=\"2xx\"}");
    let v2 = value("canary_requests_total{route=\"web\",version=\"v2\",class=\"2xx\"}");
    assert_eq!(v1 + v2, 40.0, "{text}");
    assert!(v2 > 0.0 && v1 > 0.0, "both versions served at 50%: {text}");
    assert_eq!(value("canary_route_weight_percent{route=\"web\"}"), 50.0);
    assert_eq!(
        value("canary_rollout_phase{route=\"web\",phase=\"waiting\"}"),
        1.0
    );
    assert_eq!(
        value("canary_request_duration_seconds_count{route=\"web\",version=\"v2\"}"),
        v2
    );
    for family in [
        "canary_request_failures_total",
        "canary_client_aborts_total",
        "canary_breaker_tripped",
        "canary_rollout_step",
        "canary_analysis_verdicts_total",
    ] {
        assert!(
            text.contains(&format!("# TYPE {family} ")),
            "{family}\n{text}"
        );
    }
    assert_eq!(
        canary.metrics().render().lines().count(),
        text.lines().count()
    );
    promtool_check(&text);
}

#[tokio::test]
async fn a_failing_canary_trips_the_breaker_and_the_rollout_aborts() {
    let spec =
        RouteSpec::new("web", "v1", "v2").rollout(Rollout::new().manual_step(100.0).breaker(5));
    let (_dir, canary, app) = app(spec, StatusCode::INTERNAL_SERVER_ERROR);
    for i in 0..5 {
        let r = send(&app, &[("x-user-id", &format!("b{i}"))]).await;
        assert_eq!(
            (r.status, r.version.as_deref()),
            (StatusCode::INTERNAL_SERVER_ERROR, Some("v2")),
            "request {i} reaches the failing canary"
        );
    }
    // The breaker cut canary traffic in the data path, at once.
    for i in 0..20 {
        let r = send(&app, &[("x-user-id", &format!("b{i}"))]).await;
        assert_eq!(
            (r.status, r.version.as_deref()),
            (StatusCode::OK, Some("v1")),
            "after the trip"
        );
    }
    // And the controller task records the abort.
    let deadline = tokio::time::Instant::now() + EVENTUALLY;
    let status = loop {
        let s = canary.status("web").expect("route");
        if s.phase == Some(Phase::Aborted) || tokio::time::Instant::now() > deadline {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(status.phase, Some(Phase::Aborted), "{status:?}");
    assert_eq!(status.weight, 0.0, "{status:?}");
    assert!(
        status
            .abort_reason
            .as_deref()
            .is_some_and(|r| r.starts_with("breaker: 5 consecutive")),
        "{status:?}"
    );
    let m = canary.metrics().render();
    assert!(
        m.contains("canary_rollout_aborts_total{route=\"web\",reason=\"breaker\"} 1"),
        "{m}"
    );
}

#[tokio::test]
async fn the_admin_router_is_the_binarys_api() {
    let spec = RouteSpec::new("web", "v1", "v2")
        .rollout(Rollout::new().manual_step(10.0).step(50.0, Duration::ZERO));
    let (_dir, canary, _app) = app(spec, StatusCode::OK);
    let admin = canary.admin_router();
    let (status, list) = call_json(&admin, "GET", "/api/v1/routes").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list[0]["name"], "web", "{list}");
    assert_eq!(list[0]["phase"], "waiting", "{list}");
    assert_eq!(list[0]["weight"], 10.0, "{list}");
    let (status, s) = call_json(&admin, "POST", "/api/v1/routes/web/promote").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (s["step"].as_u64(), s["weight"].as_f64()),
        (Some(1), Some(50.0)),
        "{s}"
    );
    let (_, events) = call_json(&admin, "GET", "/api/v1/routes/web/events").await;
    let kinds: Vec<&str> = events
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|e| e["kind"].as_str())
        .collect();
    assert_eq!(kinds.first(), Some(&"start"), "{events}");
    assert!(
        kinds.contains(&"promote") || kinds.contains(&"advance"),
        "{events}"
    );
    let (status, _) = call_json(&admin, "GET", "/api/v1/routes/nope").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn the_rollout_resumes_from_the_state_dir_after_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = || {
        RouteSpec::new("web", "v1", "v2")
            .rollout(Rollout::new().manual_step(10.0).manual_step(30.0))
    };
    let first = Canary::builder()
        .state_dir(dir.path())
        .route(spec())
        .start()
        .expect("start");
    first
        .command("web", Command::Promote { full: false })
        .expect("promote");
    first.stop();
    drop(first);
    let second = Canary::builder()
        .state_dir(dir.path())
        .route(spec())
        .start()
        .expect("restart");
    let s = second.status("web").expect("route");
    assert_eq!((s.step, s.weight), (Some(1), 30.0), "{s:?}");
}

#[tokio::test]
async fn serve_admin_refuses_a_listener_off_loopback_without_a_token() {
    let dir = tempfile::tempdir().expect("tempdir");
    let canary = Canary::builder()
        .state_dir(dir.path())
        .route(RouteSpec::new("web", "v1", "v2"))
        .start()
        .expect("start");
    // The unspecified address listens on every interface: not loopback. Nothing is
    // connected to it; the refusal comes before serving.
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0")
        .await
        .expect("bind");
    let err = canary
        .serve_admin(listener)
        .await
        .expect_err("refused without a token");
    assert!(err.to_string().contains("not on loopback"), "{err}");
    // On loopback it serves.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let serving = tokio::spawn({
        let canary = canary.clone();
        async move { canary.serve_admin(listener).await }
    });
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .expect("handshake");
    tokio::spawn(conn);
    let req = hyper::Request::builder()
        .uri("/healthz")
        .header("host", "localhost")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .expect("request");
    let resp = tokio::time::timeout(EVENTUALLY, sender.send_request(req))
        .await
        .expect("in time")
        .expect("response");
    assert_eq!(resp.status(), StatusCode::OK);
    serving.abort();
}

#[tokio::test]
async fn start_refuses_bad_routes_with_the_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let err = Canary::builder()
        .state_dir(dir.path())
        .route(RouteSpec::new("web", "v1", "v2"))
        .route(RouteSpec::new("web", "v1", "v3"))
        .start()
        .expect_err("duplicate");
    assert!(err.to_string().contains("declared twice"), "{err}");
    let err = Canary::builder()
        .state_dir(dir.path())
        .route(RouteSpec::new("web", "v1", "v2").rollout(Rollout::new().manual_step(101.0)))
        .start()
        .expect_err("weight");
    assert!(err.to_string().contains("101"), "{err}");
}

/// A plain hyper 1 server whose service is the split of two tower services.
#[tokio::test]
async fn a_plain_hyper_server_serves_the_split() {
    use bytes::Bytes;
    use http_body_util::Full;
    use hyper::body::Incoming;
    use hyper_util::rt::TokioIo;

    let dir = tempfile::tempdir().expect("tempdir");
    let canary = Canary::builder()
        .state_dir(dir.path())
        .route(RouteSpec::new("web", "v1", "v2").weight(50.0))
        .start()
        .expect("start");
    let version = |v: &'static str| {
        tower::service_fn(move |_req: hyper::Request<Incoming>| async move {
            Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from_static(
                v.as_bytes(),
            ))))
        })
    };
    let split = canary.split("web", version("v1"), version("v2"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let split = split.clone();
            tokio::spawn(async move {
                // hyper's Service calls the tower service, which is ready at once.
                let svc = hyper::service::service_fn(move |req| split.clone().oneshot(req));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let mut versions = std::collections::HashSet::new();
    for i in 0..40 {
        let user = format!("h{i}");
        let req = hyper::Request::builder()
            .uri("/")
            .header("host", "localhost")
            .header("x-user-id", &user)
            .body(Full::new(Bytes::new()))
            .expect("request");
        let resp = tokio::time::timeout(EVENTUALLY, sender.send_request(req))
            .await
            .expect("in time")
            .expect("response");
        let v = resp.headers()["x-canary-version"]
            .to_str()
            .expect("ascii")
            .to_string();
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(body, v.as_bytes(), "the named version answered");
        let facts = Facts {
            headers: vec![("x-user-id", user)],
            ..Default::default()
        };
        assert_eq!(v, core_version(&facts, 50.0));
        versions.insert(v);
    }
    assert_eq!(versions.len(), 2, "both versions at 50%: {versions:?}");
    server.abort();
}

#[tokio::test]
async fn the_controller_keeps_running_when_the_canary_handle_is_dropped() {
    let spec =
        RouteSpec::new("web", "v1", "v2").rollout(Rollout::new().manual_step(100.0).breaker(3));
    let (_dir, canary, app) = app(spec, StatusCode::INTERNAL_SERVER_ERROR);
    let admin = canary.admin_router();
    drop(canary);
    for i in 0..3 {
        send(&app, &[("x-user-id", &format!("d{i}"))]).await;
    }
    let deadline = tokio::time::Instant::now() + EVENTUALLY;
    loop {
        let (_, s) = call_json(&admin, "GET", "/api/v1/routes/web").await;
        if s["phase"] == "aborted" {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the abort was not recorded: {s}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
