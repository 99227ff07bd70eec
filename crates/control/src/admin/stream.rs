//! `GET /api/v1/stream`: server-sent events for the dashboard.
//!
//! On connect one `status` event per route; then `status` whenever what a route's
//! status shows changes, `point` for each new chart point, `event` for each journal
//! entry, and `resync` when this viewer fell behind the controller's broadcast (the
//! page then refetches). `id:` is a sequence number, `retry:` 2 s, a keep-alive
//! comment every 15 s. At most [`MAX_STREAMS`] are open at once (then `503`; the page
//! polls instead).
//!
//! Every stream ends when `serve` stops (the admin state's stop signal), so an open
//! dashboard cannot hold up shutdown.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{broadcast, watch};

use super::{Admin, ApiError};
use crate::controller::Controller;
use crate::live::Update;

/// Most streams open at once.
pub const MAX_STREAMS: usize = 32;
/// How long a browser waits before reconnecting.
pub const RETRY: Duration = Duration::from_secs(2);
/// Keep-alive comment interval (proxies drop idle responses).
pub const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// One of the [`MAX_STREAMS`] slots; given back on drop (the client went away or the
/// stream ended).
struct Slot(Arc<AtomicUsize>);

impl Slot {
    fn take(open: &Arc<AtomicUsize>) -> Option<Slot> {
        open.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < MAX_STREAMS).then_some(n + 1)
        })
        .ok()
        .map(|_| Slot(open.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

struct Viewer {
    queue: VecDeque<Event>,
    rx: broadcast::Receiver<Update>,
    stop: watch::Receiver<bool>,
    controller: Arc<Controller>,
    seq: u64,
    _slot: Slot,
}

impl Viewer {
    fn push(&mut self, kind: &str, data: String) {
        self.seq += 1;
        let mut e = Event::default()
            .event(kind)
            .id(self.seq.to_string())
            .data(data);
        if self.seq == 1 {
            e = e.retry(RETRY);
        }
        self.queue.push_back(e);
    }

    fn push_status(&mut self, route: &str) {
        if let Some(s) = self.controller.status(route) {
            self.push("status", serde_json::to_string(&s).unwrap_or_default());
        }
    }

    /// The next event, or `None` when the stream is to end.
    async fn next(mut self) -> Option<(Result<Event, Infallible>, Viewer)> {
        loop {
            if let Some(e) = self.queue.pop_front() {
                return Some((Ok(e), self));
            }
            let got = tokio::select! {
                biased;
                // Stopping (or the stop signal gone with `serve`): end the response.
                _ = self.stop.wait_for(|s| *s) => None,
                r = self.rx.recv() => Some(r),
            };
            match got? {
                Ok(Update::Status(route)) => self.push_status(&route),
                Ok(Update::Point(p)) => {
                    self.push("point", serde_json::to_string(&*p).unwrap_or_default());
                }
                Ok(Update::Event(route, e)) => {
                    let mut v = serde_json::to_value(&*e).unwrap_or_default();
                    v["route"] = json!(route);
                    self.push("event", v.to_string());
                }
                Err(RecvError::Lagged(n)) => {
                    self.push("resync", json!({ "missed": n }).to_string());
                }
                Err(RecvError::Closed) => return None,
            }
        }
    }
}

pub(super) async fn stream(State(a): State<Admin>) -> Response {
    let Some(slot) = Slot::take(&a.streams) else {
        return ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("too many open streams (at most {MAX_STREAMS}); poll the API instead"),
        )
        .into_response();
    };
    let stop = a.stop.subscribe();
    if *stop.borrow() {
        return ApiError(StatusCode::SERVICE_UNAVAILABLE, "stopping".into()).into_response();
    }
    let mut viewer = Viewer {
        queue: VecDeque::new(),
        // Subscribed before the first statuses are read: nothing falls in between.
        rx: a.controller.subscribe(),
        stop,
        controller: a.controller.clone(),
        seq: 0,
        _slot: slot,
    };
    for s in a.controller.statuses() {
        viewer.push("status", serde_json::to_string(&s).unwrap_or_default());
    }
    let events = futures_util::stream::unfold(viewer, Viewer::next);
    (
        [
            (header::CACHE_CONTROL, "no-cache"),
            (header::HeaderName::from_static("x-accel-buffering"), "no"),
        ],
        Sse::new(events).keep_alive(KeepAlive::new().interval(KEEP_ALIVE)),
    )
        .into_response()
}
