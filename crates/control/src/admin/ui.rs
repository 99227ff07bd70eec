//! The dashboard's page and assets, embedded in the binary, and `GET /api/v1/info`
//! (what the page needs to know about the server).
//!
//! The files live in `crates/control/ui/` and are compiled in with `include_bytes!`:
//! no file is read at run time, no CDN, no build step (a handful of fixed files does
//! not need rust-embed, whose debug builds read from disk relative to the working
//! directory). `/ui/`, `/ui/routes/{name}` and `/ui/routes/{name}/events` all answer
//! `index.html` (the page routes on the client); its `<base href>` is written per
//! request as a relative path back to `/ui/`, so the page also works behind a
//! reverse proxy that puts a prefix in front.
//!
//! Every answer carries a strict Content-Security-Policy (no inline script or style,
//! nothing from another origin), `nosniff`, `no-referrer`, and an `ETag` with
//! `Cache-Control: no-cache` (revalidated, answered `304` when unchanged).

use std::hash::{Hash, Hasher};
use std::sync::OnceLock;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use super::{Admin, ApiError};

/// The page's Content-Security-Policy: everything from this origin only, no inline
/// code, no frames, no form posts.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
                       img-src 'self' data:; connect-src 'self'; base-uri 'self'; \
                       form-action 'none'; frame-ancestors 'none'";

/// The vendored chart library's directory under `assets/`.
pub const UPLOT_DIR: &str = "vendor/uplot-1.6.32";

struct Asset {
    path: &'static str,
    content_type: &'static str,
    bytes: &'static [u8],
}

macro_rules! asset {
    ($path:literal, $ct:literal) => {
        Asset {
            path: $path,
            content_type: $ct,
            bytes: include_bytes!(concat!("../../ui/", $path)),
        }
    };
}

/// Everything under `/ui/assets/`.
const ASSETS: &[Asset] = &[
    asset!("app.js", "text/javascript; charset=utf-8"),
    asset!("app.css", "text/css; charset=utf-8"),
    asset!("favicon.svg", "image/svg+xml"),
    asset!(
        "vendor/uplot-1.6.32/uPlot.iife.min.js",
        "text/javascript; charset=utf-8"
    ),
    asset!(
        "vendor/uplot-1.6.32/uPlot.min.css",
        "text/css; charset=utf-8"
    ),
    asset!("vendor/uplot-1.6.32/LICENSE", "text/plain; charset=utf-8"),
];

const INDEX: &str = include_str!("../../ui/index.html");

/// The routes of the page, or none when the dashboard is off (then `/ui/` is the
/// router's 404).
pub(super) fn routes(enabled: bool) -> Router<Admin> {
    if !enabled {
        return Router::new();
    }
    Router::new()
        .route("/", get(|| async { see_other("ui/") }))
        .route("/ui", get(|| async { see_other("ui/") }))
        .route("/ui/", get(index))
        .route("/ui/routes/{name}", get(index))
        .route("/ui/routes/{name}/events", get(index))
        .route("/ui/assets/{*path}", get(asset))
}

/// A relative redirect, so a reverse-proxy prefix is kept.
fn see_other(to: &'static str) -> Response {
    (StatusCode::SEE_OTHER, [(header::LOCATION, to)]).into_response()
}

/// An ETag for bytes: a hash computed once per file (the bytes are compiled in).
fn etag_of(bytes: &[u8]) -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    format!("\"{:016x}\"", h.finish())
}

fn etags() -> &'static Vec<String> {
    static ETAGS: OnceLock<Vec<String>> = OnceLock::new();
    ETAGS.get_or_init(|| ASSETS.iter().map(|a| etag_of(a.bytes)).collect())
}

/// An answer with the page's security headers, or `304` when the client has it.
fn page(
    headers: &HeaderMap,
    etag: String,
    content_type: &'static str,
    body: impl IntoResponse,
) -> Response {
    let fresh = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag));
    let etag = HeaderValue::from_str(&etag).unwrap_or(HeaderValue::from_static("\"0\""));
    let common = [
        (
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CSP),
        ),
        (
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ),
        (
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        ),
        (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        (header::ETAG, etag),
    ];
    if fresh {
        return (StatusCode::NOT_MODIFIED, common).into_response();
    }
    (
        common,
        [(header::CONTENT_TYPE, HeaderValue::from_static(content_type))],
        body,
    )
        .into_response()
}

/// `index.html` with its `<base href>`: from `/ui/routes/web/events`, `../../`.
async fn index(uri: Uri, headers: HeaderMap) -> Response {
    let below_ui = uri
        .path()
        .strip_prefix("/ui/")
        .map_or(0, |rest| rest.matches('/').count());
    let base = if below_ui == 0 {
        "./".to_string()
    } else {
        "../".repeat(below_ui)
    };
    let html = INDEX.replace("{{BASE}}", &base);
    let etag = etag_of(html.as_bytes());
    page(&headers, etag, "text/html; charset=utf-8", html)
}

async fn asset(Path(path): Path<String>, headers: HeaderMap) -> Response {
    match ASSETS.iter().position(|a| a.path == path) {
        Some(i) => {
            let a = &ASSETS[i];
            page(&headers, etags()[i].clone(), a.content_type, a.bytes)
        }
        None => ApiError(StatusCode::NOT_FOUND, format!("no asset {path:?}")).into_response(),
    }
}

/// `GET /api/v1/info`: what the page adapts to.
pub(super) async fn info(State(a): State<Admin>) -> Response {
    Json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "token_required": a.token.is_some(),
        "dashboard": {
            "enabled": a.dashboard.enabled,
            "read_only": a.dashboard.read_only,
            "history_ms": a.dashboard.history_ms,
        },
    }))
    .into_response()
}
