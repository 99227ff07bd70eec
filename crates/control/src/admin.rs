//! The admin API: JSON over HTTP on the admin listener, plus `/metrics`,
//! `/healthz` and `/readyz`.
//!
//! Errors are turned into responses in one place ([`ApiError`]). With a token
//! configured, every mutating call needs `Authorization: Bearer <token>`; reads stay
//! open so dashboards and `canary status` work without it.

use std::sync::Arc;

use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use bytes::Bytes;
use canary_core::Weight;
use canary_proxy::expo::Exposition;
use serde::Deserialize;
use serde_json::json;

use crate::controller::{Command, ControlError, Controller};

#[cfg(test)]
mod dashboard_tests;
pub mod guard;
mod series;
pub mod stream;
pub mod ui;

/// Shared state of the admin handlers.
#[derive(Clone)]
pub struct Admin {
    pub controller: Arc<Controller>,
    /// The bearer token mutating calls need; `None` = no token required.
    pub token: Option<Arc<str>>,
    /// The `Host` names answered besides localhost and IP addresses ([`guard`]).
    pub hosts: Arc<guard::HostPolicy>,
    /// The dashboard's settings (`dashboard` in the config).
    pub dashboard: canary_config::Dashboard,
    /// Set to true when `serve` stops: every open [`stream`] ends.
    pub stop: Arc<tokio::sync::watch::Sender<bool>>,
    /// Open streams, at most [`stream::MAX_STREAMS`].
    pub streams: Arc<std::sync::atomic::AtomicUsize>,
    /// The TLS listeners' certificates, for `canary_tls_certificate_expiry_seconds`.
    pub certificates: Vec<Arc<canary_tls::CertStore>>,
}

impl Admin {
    /// The admin state with the defaults: no token, no extra host names, the dashboard
    /// on, its own stop signal.
    pub fn new(controller: Arc<Controller>) -> Admin {
        Admin {
            controller,
            token: None,
            hosts: Arc::default(),
            dashboard: canary_config::Dashboard::default(),
            stop: Arc::new(tokio::sync::watch::channel(false).0),
            streams: Arc::default(),
            certificates: Vec::new(),
        }
    }
}

/// An API error: a status and a message, sent as `{"error": "..."}`.
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<ControlError> for ApiError {
    fn from(e: ControlError) -> Self {
        let status =
            StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        ApiError(status, e.to_string())
    }
}

/// The largest request body the admin API reads (axum's default, made explicit so the
/// error message and the docs can name it). Command bodies are a few bytes.
pub const BODY_LIMIT: usize = 2 * 1024 * 1024;

/// The longest abort reason accepted, in characters: it is stored in the state file,
/// journaled and printed on one line, and a reason is a sentence, not a document.
pub const MAX_REASON_CHARS: usize = 256;

/// Builds the admin router.
pub fn router(admin: Admin) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/api/v1/routes", get(list))
        .route("/api/v1/routes/{name}", get(show))
        .route("/api/v1/routes/{name}/events", get(events))
        .route("/api/v1/routes/{name}/weight", put(set_weight))
        .route("/api/v1/routes/{name}/promote", post(promote))
        .route("/api/v1/routes/{name}/abort", post(abort))
        .route("/api/v1/routes/{name}/pause", post(pause))
        .route("/api/v1/routes/{name}/resume", post(resume))
        .route("/api/v1/routes/{name}/retry", post(retry))
        .route("/api/v1/routes/{name}/series", get(series::series))
        .route("/api/v1/stream", get(stream::stream))
        .route("/api/v1/info", get(ui::info))
        .merge(ui::routes(admin.dashboard.enabled))
        .fallback(|| async { ApiError(StatusCode::NOT_FOUND, "no such endpoint".into()) })
        .method_not_allowed_fallback(|| async {
            ApiError(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed on this endpoint".into(),
            )
        })
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        // Outermost: no route, fallback included, is reached without the browser rules.
        .layer(axum::middleware::from_fn_with_state(
            admin.hosts.clone(),
            guard::guard,
        ))
        .with_state(admin)
}

async fn metrics(State(a): State<Admin>) -> Response {
    let mut e = Exposition::new();
    a.controller.proxy().encode_metrics(&mut e);
    a.controller.encode_metrics(&mut e);
    encode_certificates(&a.certificates, std::time::SystemTime::now(), &mut e);
    if let Some(gate) = a.controller.gate() {
        gate.encode_metrics(&mut e);
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        e.finish(),
    )
        .into_response()
}

/// One `canary_tls_certificate_expiry_seconds` sample per served certificate: the
/// seconds left until it expires, so an alert is `< 14 * 86400`.
fn encode_certificates(
    stores: &[Arc<canary_tls::CertStore>],
    now: std::time::SystemTime,
    e: &mut Exposition,
) {
    if stores.is_empty() {
        return;
    }
    e.family(
        "canary_tls_certificate_expiry_seconds",
        "Seconds until a served TLS certificate expires (negative once it has).",
        canary_proxy::expo::Kind::Gauge,
    );
    for store in stores {
        for c in store.current().certs() {
            let cert = c.files.cert.display().to_string();
            let names = c.names.join(",");
            e.sample(
                "canary_tls_certificate_expiry_seconds",
                &[
                    ("listener", store.listener()),
                    ("cert", &cert),
                    ("names", &names),
                ],
                c.expires_in(now).round(),
            );
        }
    }
}

async fn readyz(State(a): State<Admin>) -> Response {
    if a.controller.ready() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response()
    }
}

async fn list(State(a): State<Admin>) -> Response {
    Json(a.controller.statuses()).into_response()
}

async fn show(State(a): State<Admin>, Path(name): Path<String>) -> Result<Response, ApiError> {
    let s = a
        .controller
        .status(&name)
        .ok_or(ControlError::NotFound(name))?;
    Ok(Json(s).into_response())
}

#[derive(Deserialize)]
struct EventsQuery {
    limit: Option<usize>,
}

async fn events(
    State(a): State<Admin>,
    Path(name): Path<String>,
    q: Result<Query<EventsQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = q.map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.body_text()))?;
    let evs = a.controller.events(&name, q.limit.unwrap_or(1000))?;
    Ok(Json(evs).into_response())
}

/// Checks the bearer token in constant time.
fn authorize(a: &Admin, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(want) = &a.token else { return Ok(()) };
    let got = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        // The scheme is case-insensitive (RFC 9110 §11.1); the token is not.
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token)
        .unwrap_or("");
    let (g, w) = (got.as_bytes(), want.as_bytes());
    let mut diff = g.len() ^ w.len();
    for (i, b) in w.iter().enumerate() {
        diff |= usize::from(g.get(i).copied().unwrap_or(0) ^ b);
    }
    if diff == 0 {
        Ok(())
    } else {
        Err(ApiError(
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token".into(),
        ))
    }
}

/// Parses an optional JSON body; empty means the default.
///
/// The handlers take the body as a `Result` so that a body axum could not read (over
/// [`BODY_LIMIT`], or broken off) is answered as JSON like every other error, and only
/// after the token check, as for a bad body.
fn body<T: for<'de> Deserialize<'de> + Default>(
    bytes: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let bytes = bytes.map_err(|e| {
        let status = e.status();
        let msg = if status == StatusCode::PAYLOAD_TOO_LARGE {
            format!("request body larger than {BODY_LIMIT} bytes")
        } else {
            format!("cannot read the request body: {}", e.body_text())
        };
        ApiError(status, msg)
    })?;
    match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
        None => return Ok(T::default()),
        // serde reads a struct from a JSON array too (`[30]` as `{"weight": 30}`).
        Some(b'{') => {}
        Some(_) => {
            return Err(ApiError(
                StatusCode::BAD_REQUEST,
                "bad JSON body: expected a JSON object".into(),
            ))
        }
    }
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("bad JSON body: {e}")))
}

async fn run(
    a: &Admin,
    headers: &HeaderMap,
    name: &str,
    cmd: Command,
) -> Result<Response, ApiError> {
    authorize(a, headers)?;
    if let Some(gate) = a.controller.gate() {
        let auth = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        if let Some(answer) = gate.command(name, &cmd, auth) {
            return match answer.await {
                Ok(v) => Ok(Json(v).into_response()),
                Err((code, msg)) => Err(ApiError(
                    StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_GATEWAY),
                    msg,
                )),
            };
        }
    }
    let s = a.controller.command(name, cmd)?;
    Ok(Json(s).into_response())
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct WeightBody {
    weight: Option<f64>,
}

async fn set_weight(
    State(a): State<Admin>,
    Path(name): Path<String>,
    headers: HeaderMap,
    b: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    authorize(&a, &headers)?;
    let WeightBody { weight } = body(b)?;
    let w = weight.ok_or_else(|| {
        ApiError(
            StatusCode::BAD_REQUEST,
            "body must be {\"weight\": <0-100>}".into(),
        )
    })?;
    let w = Weight::from_percent(w).ok_or_else(|| {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!(
                "weight {} is out of range (0–100, at most two decimals)",
                canary_config::number_text(w)
            ),
        )
    })?;
    run(&a, &headers, &name, Command::SetWeight(w)).await
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct PromoteBody {
    #[serde(default)]
    full: bool,
}

async fn promote(
    State(a): State<Admin>,
    Path(name): Path<String>,
    headers: HeaderMap,
    b: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    authorize(&a, &headers)?;
    let PromoteBody { full } = body(b)?;
    run(&a, &headers, &name, Command::Promote { full }).await
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct AbortBody {
    #[serde(default)]
    reason: String,
}

async fn abort(
    State(a): State<Admin>,
    Path(name): Path<String>,
    headers: HeaderMap,
    b: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    authorize(&a, &headers)?;
    let AbortBody { reason } = body(b)?;
    let n = reason.chars().count();
    if n > MAX_REASON_CHARS {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("abort reason is {n} characters long; at most {MAX_REASON_CHARS} are accepted"),
        ));
    }
    let reason = if reason.trim().is_empty() {
        "aborted by user".to_string()
    } else {
        format!("user: {reason}")
    };
    run(&a, &headers, &name, Command::Abort { reason }).await
}

/// The body of `pause`, `resume` and `retry`: none, or `{}`. An unknown field is a
/// 400 as on the other calls, so a typo (`{"resume": true}` sent to `pause`) is not
/// silently taken for something else.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct NoBody {}

async fn pause(
    State(a): State<Admin>,
    Path(name): Path<String>,
    headers: HeaderMap,
    b: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    authorize(&a, &headers)?;
    let NoBody {} = body(b)?;
    run(&a, &headers, &name, Command::Pause).await
}

async fn resume(
    State(a): State<Admin>,
    Path(name): Path<String>,
    headers: HeaderMap,
    b: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    authorize(&a, &headers)?;
    let NoBody {} = body(b)?;
    run(&a, &headers, &name, Command::Resume).await
}

async fn retry(
    State(a): State<Admin>,
    Path(name): Path<String>,
    headers: HeaderMap,
    b: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    authorize(&a, &headers)?;
    let NoBody {} = body(b)?;
    run(&a, &headers, &name, Command::Retry).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;
    use axum::body::Body;
    use axum::http::Request;
    use canary_proxy::Proxy;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    const CONFIG: &str = r#"listen: 127.0.0.1:1
routes:
  - name: web
    stable: {version: v1, upstreams: ["127.0.0.1:1"]}
    canary: {version: v2, upstreams: ["127.0.0.1:2"]}
    rollout:
      steps: [{weight: 10, pause: 1h}, {weight: 100, pause: 1h}]
"#;

    fn admin(token: Option<&str>) -> (tempfile::TempDir, Router) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("store");
        let c = Controller::new(Arc::new(Proxy::new()), store);
        let cfg = canary_config::parse("test.yaml", CONFIG).expect("config");
        c.apply(&cfg).expect("apply");
        let a = Admin {
            token: token.map(Arc::from),
            ..Admin::new(Arc::new(c))
        };
        (dir, router(a))
    }

    async fn call(r: &Router, req: Request<Body>) -> (StatusCode, serde_json::Value) {
        let resp = r.clone().oneshot(req).await.expect("infallible");
        let status = resp.status();
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        let v = serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            panic!(
                "{status}: not JSON ({e}): {:?}",
                String::from_utf8_lossy(&bytes)
            )
        });
        (status, v)
    }

    fn req(method: &str, path: &str, body: Vec<u8>, token: Option<&str>) -> Request<Body> {
        let mut b = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, "127.0.0.1:9901");
        if let Some(t) = token {
            b = b.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        b.body(Body::from(body)).expect("request")
    }

    /// Over the limit, with the whole (valid JSON) body padded with spaces.
    fn huge_body() -> Vec<u8> {
        let mut b = br#"{"weight": 10}"#.to_vec();
        b.resize(BODY_LIMIT + 1, b' ');
        b
    }

    #[tokio::test]
    async fn a_body_over_the_limit_is_a_json_413_on_every_endpoint_with_a_body() {
        let (_dir, r) = admin(None);
        for (method, path) in [
            ("PUT", "/api/v1/routes/web/weight"),
            ("POST", "/api/v1/routes/web/promote"),
            ("POST", "/api/v1/routes/web/abort"),
            ("POST", "/api/v1/routes/web/pause"),
            ("POST", "/api/v1/routes/web/resume"),
            ("POST", "/api/v1/routes/web/retry"),
        ] {
            let (status, v) = call(&r, req(method, path, huge_body(), None)).await;
            assert_eq!(
                status,
                StatusCode::PAYLOAD_TOO_LARGE,
                "{method} {path}: {v}"
            );
            let msg = v["error"].as_str().unwrap_or_default();
            assert!(msg.contains("larger than 2097152 bytes"), "{v}");
        }
        // Nothing changed.
        let (status, v) = call(&r, req("GET", "/api/v1/routes/web", vec![], None)).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            (v["phase"].as_str(), v["weight"].as_f64()),
            (Some("progressing"), Some(10.0))
        );
        // Exactly at the limit is read (and here parsed) as usual.
        let mut at_limit = br#"{"weight": 20}"#.to_vec();
        at_limit.resize(BODY_LIMIT, b' ');
        let (status, v) = call(&r, req("PUT", "/api/v1/routes/web/weight", at_limit, None)).await;
        assert_eq!(status, StatusCode::OK, "{v}");
        assert_eq!(v["weight"], 20.0);
    }

    #[tokio::test]
    async fn the_token_is_checked_before_an_oversized_body() {
        let (_dir, r) = admin(Some("t0ken"));
        let path = "/api/v1/routes/web/weight";
        let (status, v) = call(&r, req("PUT", path, huge_body(), None)).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{v}");
        let (status, v) = call(&r, req("PUT", path, huge_body(), Some("t0ken"))).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{v}");
    }

    #[tokio::test]
    async fn pause_resume_and_retry_with_an_unknown_field_are_a_400_not_a_200() {
        let (_dir, r) = admin(None);
        let path = |verb: &str| format!("/api/v1/routes/web/{verb}");
        for verb in ["pause", "resume", "retry"] {
            for bad in [r#"{"x":1}"#, "{", "not json", "[1]", "[]", "7", "null"] {
                let (status, v) = call(&r, req("POST", &path(verb), bad.into(), None)).await;
                assert_eq!(status, StatusCode::BAD_REQUEST, "{verb} {bad}: {v}");
                let msg = v["error"].as_str().unwrap_or_default();
                assert!(msg.starts_with("bad JSON body"), "{verb} {bad}: {v}");
            }
        }
        // Nothing changed.
        let (_, v) = call(&r, req("GET", "/api/v1/routes/web", vec![], None)).await;
        assert_eq!(v["phase"], "progressing", "{v}");
        // No body, blanks or `{}` are accepted.
        for (verb, body, phase) in [
            ("pause", "", "paused"),
            ("resume", "{}", "progressing"),
            ("pause", " { } ", "paused"),
            ("resume", "\n", "progressing"),
        ] {
            let (status, v) = call(&r, req("POST", &path(verb), body.into(), None)).await;
            assert_eq!(status, StatusCode::OK, "{verb} {body:?}: {v}");
            assert_eq!(v["phase"], phase, "{verb} {body:?}: {v}");
        }
        let (_, v) = call(&r, req("POST", &path("abort"), vec![], None)).await;
        assert_eq!(v["phase"], "aborted", "{v}");
        let (status, v) = call(&r, req("POST", &path("retry"), b"{}".to_vec(), None)).await;
        assert_eq!(
            (status, v["phase"].as_str()),
            (StatusCode::OK, Some("progressing")),
            "{v}"
        );
    }

    #[tokio::test]
    async fn an_abort_reason_over_256_characters_is_a_400_and_aborts_nothing() {
        let (_dir, r) = admin(None);
        let path = "/api/v1/routes/web/abort";
        let long = serde_json::to_vec(&json!({ "reason": "é".repeat(257) })).expect("json");
        let (status, v) = call(&r, req("POST", path, long, None)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
        assert_eq!(
            v["error"],
            "abort reason is 257 characters long; at most 256 are accepted"
        );
        let (_, v) = call(&r, req("GET", "/api/v1/routes/web", vec![], None)).await;
        assert_eq!(v["phase"], "progressing", "{v}");
        // 256 characters (512 bytes) are accepted, kept whole and stored as sent.
        let reason = format!("{}\n", "é".repeat(255));
        let ok = serde_json::to_vec(&json!({ "reason": reason })).expect("json");
        let (status, v) = call(&r, req("POST", path, ok, None)).await;
        assert_eq!(status, StatusCode::OK, "{v}");
        assert_eq!(v["abort_reason"], format!("user: {reason}"), "{v}");
    }

    #[tokio::test]
    async fn a_huge_weight_is_echoed_in_exponent_form_not_309_digits() {
        let (_dir, r) = admin(None);
        let path = "/api/v1/routes/web/weight";
        let (status, v) = call(&r, req("PUT", path, br#"{"weight": 1e308}"#.to_vec(), None)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
        assert_eq!(
            v["error"],
            "weight 1e308 is out of range (0–100, at most two decimals)"
        );
        let (_, v) = call(&r, req("PUT", path, br#"{"weight": 150}"#.to_vec(), None)).await;
        assert_eq!(
            v["error"],
            "weight 150 is out of range (0–100, at most two decimals)"
        );
    }

    /// Regression: serde reads a struct from a JSON array, so `[30]` set the weight.
    #[tokio::test]
    async fn a_json_array_is_not_a_body() {
        let (_dir, r) = admin(None);
        let (status, v) = call(
            &r,
            req("PUT", "/api/v1/routes/web/weight", b"[30]".to_vec(), None),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
        assert!(
            v["error"]
                .as_str()
                .unwrap_or_default()
                .contains("JSON object"),
            "{v}"
        );
    }

    #[tokio::test]
    async fn promote_and_abort_with_an_unknown_field_are_a_400() {
        let (_dir, r) = admin(None);
        for (path, bad) in [
            ("/api/v1/routes/web/promote", r#"{"full":true,"x":1}"#),
            ("/api/v1/routes/web/abort", r#"{"reason":"r","x":1}"#),
        ] {
            let (status, v) = call(&r, req("POST", path, bad.into(), None)).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{path}: {v}");
            assert!(
                v["error"]
                    .as_str()
                    .unwrap_or_default()
                    .contains("unknown field"),
                "{v}"
            );
        }
    }

    /// Regression (issue 14): a page on another origin aborted a rollout with a
    /// `no-cors` text/plain POST, and a rebound host name read the route list.
    #[tokio::test]
    async fn a_cross_site_abort_and_a_rebound_read_are_refused_token_or_not() {
        for token in [None, Some("t0ken")] {
            let (_dir, r) = admin(token);
            for (name, value) in [
                ("origin", "http://evil.example:18000"),
                ("sec-fetch-site", "cross-site"),
            ] {
                let mut q = req(
                    "POST",
                    "/api/v1/routes/web/abort",
                    br#"{"reason":"x"}"#.to_vec(),
                    token,
                );
                q.headers_mut()
                    .insert(name, value.parse().expect("header value"));
                q.headers_mut()
                    .insert(header::CONTENT_TYPE, "text/plain".parse().expect("value"));
                let (status, v) = call(&r, q).await;
                assert_eq!(status, StatusCode::FORBIDDEN, "{token:?} {name}: {v}");
            }
            let mut q = req("GET", "/api/v1/routes", vec![], None);
            q.headers_mut()
                .insert(header::HOST, "rebind.example:9901".parse().expect("value"));
            let (status, v) = call(&r, q).await;
            assert_eq!(status, StatusCode::MISDIRECTED_REQUEST, "{v}");
            assert!(v["error"]
                .as_str()
                .unwrap_or_default()
                .contains("rebind.example"));
            // Nothing changed, and the CLI's own request still works.
            let (status, v) = call(&r, req("GET", "/api/v1/routes/web", vec![], None)).await;
            assert_eq!(
                (status, v["phase"].as_str()),
                (StatusCode::OK, Some("progressing"))
            );
            let (status, v) =
                call(&r, req("POST", "/api/v1/routes/web/pause", vec![], token)).await;
            assert_eq!(
                (status, v["phase"].as_str()),
                (StatusCode::OK, Some("paused")),
                "{v}"
            );
        }
    }

    #[test]
    fn certificate_expiry_is_exported_per_listener_and_file() {
        use canary_tls::testing::{self, Key};
        let dir = tempfile::tempdir().expect("tempdir");
        let files = testing::self_signed(dir.path(), "shop", Key::EcdsaP256, &["shop.test"]);
        let store = canary_tls::CertStore::load("proxy", std::slice::from_ref(&files), false)
            .expect("store");
        let now = std::time::SystemTime::now();
        let left = store.current().certs()[0].expires_in(now).round();
        let mut e = Exposition::new();
        encode_certificates(&[Arc::new(store)], now, &mut e);
        let text = e.finish();
        let line = format!(
            "canary_tls_certificate_expiry_seconds{{listener=\"proxy\",cert=\"{}\",names=\"shop.test\"}} {left}",
            files.cert.display()
        );
        assert!(
            text.contains("# TYPE canary_tls_certificate_expiry_seconds gauge"),
            "{text}"
        );
        assert!(text.contains(&line), "{line} not in\n{text}");
        assert!(left > 360.0 * 86_400.0 && left < 366.0 * 86_400.0, "{left}");
    }
}
