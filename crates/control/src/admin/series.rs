//! `GET /api/v1/routes/{name}/series?window=15m`: a route's chart data as columns
//! (what uPlot takes, no reshaping in the page), with the verdict markers and the
//! journal entries of the same window.
//!
//! The numbers come from the controller's ring ([`crate::history`]); this handler only
//! selects and serializes, it computes nothing.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};

use super::{Admin, ApiError};
use crate::controller::{wall_ms, ControlError, Series};

/// The window when none is asked for.
pub const DEFAULT_WINDOW_MS: u64 = 15 * 60_000;

#[derive(Deserialize)]
pub(super) struct SeriesQuery {
    window: Option<String>,
}

/// `30s`, `15m`, `1h`, `90m`: a whole number and one unit (what the page's window
/// picker sends); the workspace's duration parser lives in the config crate only.
fn parse_window(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit())?;
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().ok()?;
    let unit_ms = match unit {
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return None,
    };
    n.checked_mul(unit_ms).filter(|ms| *ms > 0)
}

/// One journal entry as a chart marker.
#[derive(Serialize)]
struct EventMark {
    at_ms: u64,
    kind: String,
    reason: String,
    /// The weight after the entry, percent.
    weight: f64,
}

#[derive(Serialize)]
struct SeriesAnswer {
    #[serde(flatten)]
    series: Series,
    /// The window answered, ms (the one asked for, at most `history_ms`).
    window_ms: u64,
    events: Vec<EventMark>,
}

pub(super) async fn series(
    State(a): State<Admin>,
    Path(name): Path<String>,
    q: Result<Query<SeriesQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = q.map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.body_text()))?;
    let window_ms = match q.window.as_deref() {
        None => DEFAULT_WINDOW_MS,
        Some(w) => parse_window(w).ok_or_else(|| {
            ApiError(
                StatusCode::BAD_REQUEST,
                format!("window {w:?} is not a duration like 30s, 15m or 1h"),
            )
        })?,
    };
    let history_ms = a.dashboard.history_ms;
    let window_ms = window_ms.min(history_ms);
    let series = a
        .controller
        .series(&name, window_ms)
        .ok_or_else(|| ControlError::NotFound(name.clone()))?;
    let from = wall_ms().saturating_sub(window_ms);
    // The journal is read here (a file read, as `…/events` does); only its entries of
    // the window go out.
    let events = a
        .controller
        .events(&name, 1000)?
        .into_iter()
        .filter(|e| e.at_ms >= from)
        .map(|e| EventMark {
            at_ms: e.at_ms,
            kind: e.kind,
            reason: e.reason,
            weight: e.to.weight,
        })
        .collect();
    Ok(Json(SeriesAnswer {
        series,
        window_ms,
        events,
    })
    .into_response())
}

#[cfg(test)]
mod tests {
    use super::parse_window;

    #[test]
    fn windows_are_a_number_and_a_unit() {
        assert_eq!(parse_window("15m"), Some(900_000));
        assert_eq!(parse_window("30s"), Some(30_000));
        assert_eq!(parse_window("1h"), Some(3_600_000));
        for bad in [
            "",
            "15",
            "m",
            "0m",
            "1d",
            "-1m",
            "1.5m",
            "99999999999999999999h",
        ] {
            assert_eq!(parse_window(bad), None, "{bad}");
        }
    }
}
