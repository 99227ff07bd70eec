//! The admin API: JSON over HTTP on the admin listener, plus `/metrics`,
//! `/healthz` and `/readyz`.
//!
//! Errors are turned into responses in one place ([`ApiError`]). With a token
//! configured, every mutating call needs `Authorization: Bearer <token>`; reads stay
//! open so dashboards and `canary status` work without it.

use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
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

/// Shared state of the admin handlers.
#[derive(Clone)]
pub struct Admin {
    pub controller: Arc<Controller>,
    /// The bearer token mutating calls need; `None` = no token required.
    pub token: Option<Arc<str>>,
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
        let status = match &e {
            ControlError::NotFound(_) => StatusCode::NOT_FOUND,
            ControlError::Conflict(_) => StatusCode::CONFLICT,
            ControlError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(status, e.to_string())
    }
}

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
        .fallback(|| async { ApiError(StatusCode::NOT_FOUND, "no such endpoint".into()) })
        .method_not_allowed_fallback(|| async {
            ApiError(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed on this endpoint".into(),
            )
        })
        .with_state(admin)
}

async fn metrics(State(a): State<Admin>) -> Response {
    let mut e = Exposition::new();
    a.controller.proxy().encode_metrics(&mut e);
    a.controller.encode_metrics(&mut e);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        e.finish(),
    )
        .into_response()
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
    let evs = a.controller.events(&name, q.limit.unwrap_or(1000).max(1))?;
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
fn body<T: for<'de> Deserialize<'de> + Default>(bytes: &Bytes) -> Result<T, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("bad JSON body: {e}")))
}

async fn run(
    a: &Admin,
    headers: &HeaderMap,
    name: &str,
    cmd: Command,
) -> Result<Response, ApiError> {
    authorize(a, headers)?;
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
    b: Bytes,
) -> Result<Response, ApiError> {
    authorize(&a, &headers)?;
    let WeightBody { weight } = body(&b)?;
    let w = weight.ok_or_else(|| {
        ApiError(
            StatusCode::BAD_REQUEST,
            "body must be {\"weight\": <0-100>}".into(),
        )
    })?;
    let w = Weight::from_percent(w).ok_or_else(|| {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!("weight {w} is out of range (0–100, at most two decimals)"),
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
    b: Bytes,
) -> Result<Response, ApiError> {
    authorize(&a, &headers)?;
    let PromoteBody { full } = body(&b)?;
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
    b: Bytes,
) -> Result<Response, ApiError> {
    authorize(&a, &headers)?;
    let AbortBody { reason } = body(&b)?;
    let reason = if reason.trim().is_empty() {
        "aborted by user".to_string()
    } else {
        format!("user: {reason}")
    };
    run(&a, &headers, &name, Command::Abort { reason }).await
}

async fn pause(
    State(a): State<Admin>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    run(&a, &headers, &name, Command::Pause).await
}

async fn resume(
    State(a): State<Admin>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    run(&a, &headers, &name, Command::Resume).await
}

async fn retry(
    State(a): State<Admin>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    run(&a, &headers, &name, Command::Retry).await
}
