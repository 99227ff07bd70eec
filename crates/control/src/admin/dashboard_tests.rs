//! Router tests (no socket, no browser) of what the dashboard adds to the admin API:
//! the page and its headers, `info`, `series`, `stream`, and the `actions` of a status
//! agreeing with what the commands accept.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::Router;
use canary_proxy::Proxy;
use http_body_util::BodyExt;
use tower::ServiceExt;

use super::{router, stream, ui, Admin};
use crate::controller::Controller;
use crate::store::Store;

const CONFIG: &str = r#"listen: 127.0.0.1:1
routes:
  - name: web
    stable: {version: v1, upstreams: ["127.0.0.1:1"]}
    canary: {version: v2, upstreams: ["127.0.0.1:2"]}
    rollout:
      steps: [{weight: 10, pause: 1h}, {weight: 50, pause: manual}, {weight: 100, pause: 1h}]
  - name: plain
    stable: {version: v1, upstreams: ["127.0.0.1:3"]}
    canary: {version: v2, upstreams: ["127.0.0.1:4"]}
    weight: 5
  - name: solo
    stable: {version: v1, upstreams: ["127.0.0.1:5"]}
"#;

struct Setup {
    _dir: tempfile::TempDir,
    admin: Admin,
    router: Router,
}

fn setup(edit: impl FnOnce(&mut Admin)) -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("store");
    let c = Controller::new(Arc::new(Proxy::new()), store);
    let cfg = canary_config::parse("test.yaml", CONFIG).expect("config");
    c.apply(&cfg).expect("apply");
    let mut admin = Admin::new(Arc::new(c));
    edit(&mut admin);
    let router = router(admin.clone());
    Setup {
        _dir: dir,
        admin,
        router,
    }
}

fn get(path: &str) -> Request<Body> {
    Request::builder()
        .uri(path)
        .header(header::HOST, "127.0.0.1:9901")
        .body(Body::empty())
        .expect("request")
}

async fn send(r: &Router, req: Request<Body>) -> (StatusCode, axum::http::HeaderMap, Vec<u8>) {
    let resp = r.clone().oneshot(req).await.expect("infallible");
    let (parts, body) = resp.into_parts();
    let bytes = body.collect().await.expect("body").to_bytes().to_vec();
    (parts.status, parts.headers, bytes)
}

async fn json(r: &Router, req: Request<Body>) -> (StatusCode, serde_json::Value) {
    let (status, _, body) = send(r, req).await;
    let v = serde_json::from_slice(&body).unwrap_or_else(|e| {
        panic!(
            "{status}: not JSON ({e}): {}",
            String::from_utf8_lossy(&body)
        )
    });
    (status, v)
}

#[tokio::test]
async fn the_page_is_served_with_a_strict_csp_and_a_relative_base() {
    let s = setup(|_| {});
    let (status, h, _) = send(&s.router, get("/")).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert_eq!(h[header::LOCATION], "ui/");
    for (path, base) in [
        ("/ui/", "./"),
        ("/ui/routes/web", "../"),
        ("/ui/routes/web/events", "../../"),
    ] {
        let (status, h, body) = send(&s.router, get(path)).await;
        assert_eq!(status, StatusCode::OK, "{path}");
        assert_eq!(h[header::CONTENT_TYPE], "text/html; charset=utf-8");
        assert_eq!(h[header::CONTENT_SECURITY_POLICY], ui::CSP);
        assert_eq!(h[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
        let html = String::from_utf8(body).expect("utf-8");
        assert!(html.contains(&format!("<base href=\"{base}\">")), "{path}");
        // No inline script or style, nothing from another origin.
        assert!(
            !html.contains("<script>") && !html.contains("style="),
            "{path}"
        );
        assert!(
            !html.contains("http://") && !html.contains("https://"),
            "{path}"
        );
    }
    assert!(ui::CSP.contains("script-src 'self'") && !ui::CSP.contains("unsafe"));
}

#[tokio::test]
async fn assets_have_their_types_an_etag_and_answer_304_when_unchanged() {
    let s = setup(|_| {});
    for (path, ct) in [
        ("/ui/assets/app.js", "text/javascript; charset=utf-8"),
        ("/ui/assets/app.css", "text/css; charset=utf-8"),
        ("/ui/assets/favicon.svg", "image/svg+xml"),
        (
            "/ui/assets/vendor/uplot-1.6.32/uPlot.iife.min.js",
            "text/javascript; charset=utf-8",
        ),
        (
            "/ui/assets/vendor/uplot-1.6.32/uPlot.min.css",
            "text/css; charset=utf-8",
        ),
    ] {
        let (status, h, body) = send(&s.router, get(path)).await;
        assert_eq!(status, StatusCode::OK, "{path}");
        assert_eq!(h[header::CONTENT_TYPE], ct, "{path}");
        assert_eq!(h[header::CONTENT_SECURITY_POLICY], ui::CSP, "{path}");
        assert!(!body.is_empty());
        let etag = h[header::ETAG].to_str().expect("etag").to_string();
        let mut again = get(path);
        again
            .headers_mut()
            .insert(header::IF_NONE_MATCH, etag.parse().expect("value"));
        let (status, _, body) = send(&s.router, again).await;
        assert_eq!(status, StatusCode::NOT_MODIFIED, "{path}");
        assert!(body.is_empty());
    }
    // The page's own code carries no URL of another origin either.
    let (_, _, js) = send(&s.router, get("/ui/assets/app.js")).await;
    let js = String::from_utf8(js).expect("utf-8");
    assert!(!js.contains("http://") && !js.contains("https://"));
    let (status, _, _) = send(&s.router, get("/ui/assets/../admin.rs")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = json(&s.router, get("/ui/assets/nope.js")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn a_disabled_dashboard_is_a_404_and_the_api_is_unchanged() {
    let s = setup(|a| a.dashboard.enabled = false);
    for path in ["/", "/ui/", "/ui/routes/web", "/ui/assets/app.js"] {
        let (status, _) = json(&s.router, get(path)).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
    }
    let (status, v) = json(&s.router, get("/api/v1/routes/web")).await;
    assert_eq!(
        (status, v["phase"].as_str()),
        (StatusCode::OK, Some("progressing"))
    );
}

#[tokio::test]
async fn info_tells_the_page_about_the_token_and_read_only() {
    let s = setup(|a| {
        a.token = Some(Arc::from("t"));
        a.dashboard.read_only = true;
    });
    let (status, v) = json(&s.router, get("/api/v1/info")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v["token_required"], true);
    assert_eq!(v["dashboard"]["read_only"], true);
    assert_eq!(v["dashboard"]["history_ms"], 3_600_000);
}

#[tokio::test]
async fn series_is_columns_of_one_length_with_markers() {
    let s = setup(|_| {});
    // Ticks fill the ring (no traffic: rates 0, error rates and latencies null).
    for _ in 0..3 {
        s.admin.controller.tick();
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    s.admin.controller.tick();
    let (status, v) = json(&s.router, get("/api/v1/routes/web/series?window=5m")).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["route"], "web");
    assert_eq!(v["window_ms"], 300_000);
    assert_eq!(v["step_ms"], 2_000);
    assert_eq!(v["analysis_window_ms"], 60_000);
    let n = v["t"].as_array().expect("t").len();
    assert!(n >= 2, "{v}");
    assert_eq!(v["weight"].as_array().map(Vec::len), Some(n));
    assert_eq!(v["weight"][n - 1], 10.0);
    for ver in ["stable", "canary"] {
        for k in ["rps", "error_rate", "p50_ms", "p99_ms"] {
            assert_eq!(v[ver][k].as_array().map(Vec::len), Some(n), "{ver}.{k}");
        }
        // No requests: no error rate, not 0.
        assert!(v[ver]["error_rate"][n - 1].is_null(), "{v}");
        assert_eq!(v[ver]["rps"][n - 1], 0.0);
    }
    assert_eq!(v["events"][0]["kind"], "start", "{v}");
    assert!(v["verdicts"].is_array());
    // A route without a canary has no points; unknown routes and bad windows are errors.
    let (status, v) = json(&s.router, get("/api/v1/routes/solo/series")).await;
    assert_eq!(
        (status, v["t"].as_array().map(Vec::len)),
        (StatusCode::OK, Some(0))
    );
    let (status, _) = json(&s.router, get("/api/v1/routes/nope/series")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, v) = json(&s.router, get("/api/v1/routes/web/series?window=soon")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    // Longer than the history: the history.
    let (_, v) = json(&s.router, get("/api/v1/routes/web/series?window=48h")).await;
    assert_eq!(v["window_ms"], 3_600_000);
}

/// Reads SSE frames until `want` events are in, within a bounded time.
async fn read_events(body: &mut Body, want: usize) -> Vec<(String, serde_json::Value)> {
    let mut text = String::new();
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while out.len() < want {
        let frame = tokio::time::timeout_at(deadline, body.frame())
            .await
            .expect("events in time")
            .expect("stream open")
            .expect("frame");
        if let Ok(data) = frame.into_data() {
            text.push_str(&String::from_utf8_lossy(&data));
        }
        while let Some(end) = text.find("\n\n") {
            let block: String = text.drain(..end + 2).collect();
            let mut kind = String::new();
            let mut data = String::new();
            for line in block.lines() {
                if let Some(k) = line.strip_prefix("event: ") {
                    kind = k.to_string();
                } else if let Some(d) = line.strip_prefix("data: ") {
                    data.push_str(d);
                }
            }
            if !kind.is_empty() {
                out.push((kind, serde_json::from_str(&data).expect("JSON data")));
            }
        }
    }
    out
}

#[tokio::test]
async fn the_stream_sends_statuses_then_changes_and_ends_on_stop() {
    let s = setup(|_| {});
    let resp = s
        .router
        .clone()
        .oneshot(get("/api/v1/stream"))
        .await
        .expect("infallible");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()[header::CONTENT_TYPE], "text/event-stream");
    assert_eq!(resp.headers()[header::CACHE_CONTROL], "no-cache");
    let mut body = resp.into_body();
    let first = read_events(&mut body, 3).await;
    let names: Vec<(&str, &str)> = first
        .iter()
        .map(|(k, v)| (k.as_str(), v["name"].as_str().unwrap_or("")))
        .collect();
    assert_eq!(
        names,
        [("status", "web"), ("status", "plain"), ("status", "solo")]
    );
    // A command: its journal entry, then (at the next tick) the new status.
    s.admin
        .controller
        .command("web", crate::Command::Pause)
        .expect("pause");
    s.admin.controller.tick();
    let next = read_events(&mut body, 2).await;
    let kinds: Vec<&str> = next.iter().map(|(k, _)| k.as_str()).collect();
    assert!(kinds.contains(&"event"), "{next:?}");
    let ev = &next.iter().find(|(k, _)| k == "event").expect("event").1;
    assert_eq!(
        (ev["route"].as_str(), ev["kind"].as_str()),
        (Some("web"), Some("pause"))
    );
    // Stop: the response ends, so a graceful shutdown is not held up.
    s.admin.stop.send_replace(true);
    let end = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match body.frame().await {
                None => break,
                Some(Err(e)) => panic!("{e}"),
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(end.is_ok(), "the stream did not end on stop");
}

#[tokio::test]
async fn streams_are_limited_and_their_slots_come_back() {
    let s = setup(|_| {});
    let mut open = Vec::new();
    for _ in 0..stream::MAX_STREAMS {
        let resp = s
            .router
            .clone()
            .oneshot(get("/api/v1/stream"))
            .await
            .expect("ok");
        assert_eq!(resp.status(), StatusCode::OK);
        open.push(resp);
    }
    let (status, v) = json(&s.router, get("/api/v1/stream")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert!(v["error"].as_str().unwrap_or("").contains("poll"));
    open.pop();
    let resp = s
        .router
        .clone()
        .oneshot(get("/api/v1/stream"))
        .await
        .expect("ok");
    assert_eq!(resp.status(), StatusCode::OK);
}

const ALL: [&str; 7] = [
    "promote",
    "promote_full",
    "pause",
    "resume",
    "abort",
    "retry",
    "weight",
];

fn command(action: &str) -> Request<Body> {
    let (method, verb, body) = match action {
        "promote_full" => ("POST", "promote", r#"{"full":true}"#),
        "weight" => ("PUT", "weight", r#"{"weight":20}"#),
        other => ("POST", other, ""),
    };
    Request::builder()
        .method(method)
        .uri(format!("/api/v1/routes/web/{verb}"))
        .header(header::HOST, "127.0.0.1:9901")
        .body(Body::from(body))
        .expect("request")
}

/// `actions` is what the API accepts: for each phase, every listed action answers 200
/// and every other one 409.
#[tokio::test]
async fn actions_are_exactly_the_commands_the_api_accepts_in_each_phase() {
    // How to reach each phase from a fresh rollout.
    let phases: [(&str, &[&str]); 5] = [
        ("progressing", &[]),
        ("paused", &["pause"]),
        ("waiting", &["promote"]),
        ("aborted", &["abort"]),
        ("promoted", &["promote_full"]),
    ];
    for (phase, path) in phases {
        let reach = || async {
            let s = setup(|_| {});
            for step in path {
                let (status, v) = json(&s.router, command(step)).await;
                assert_eq!(status, StatusCode::OK, "{phase}: {step}: {v}");
            }
            let (_, v) = json(&s.router, get("/api/v1/routes/web")).await;
            assert_eq!(v["phase"], phase, "{v}");
            (s, v)
        };
        let (_s, v) = reach().await;
        let listed: Vec<String> = serde_json::from_value(v["actions"].clone()).expect("actions");
        for action in ALL {
            let (s, _) = reach().await;
            let (status, answer) = json(&s.router, command(action)).await;
            let accepted = status == StatusCode::OK;
            assert_eq!(
                accepted,
                listed.iter().any(|a| a == action),
                "{phase}: {action} answered {status} {answer}, actions {listed:?}"
            );
            if !accepted {
                assert_eq!(status, StatusCode::CONFLICT, "{phase}: {action}: {answer}");
            }
        }
    }
    let s = setup(|_| {});
    let (_, v) = json(&s.router, get("/api/v1/routes/plain")).await;
    assert_eq!(v["actions"], serde_json::json!(["weight"]));
    let (_, v) = json(&s.router, get("/api/v1/routes/solo")).await;
    assert_eq!(v["actions"], serde_json::json!([]));
    assert_eq!(v["pools"]["stable"][0]["upstream"], "127.0.0.1:5");
    let (_, v) = json(&s.router, get("/api/v1/routes/web")).await;
    assert_eq!(v["analysis"]["failure_limit"], 2);
    assert_eq!(v["pools"]["canary"][0]["available"], true);
}
