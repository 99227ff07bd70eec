//! Which data-plane worker the current thread is, and the data plane's monotonic clock.
//!
//! Per-worker state (idle upstream connections, HTTP/2 clients) is kept in one slot
//! per worker and picked by [`this_worker`], so it stays on the thread that uses it.

use std::sync::OnceLock;
use std::time::Instant;

thread_local! {
    /// The data-plane worker this thread runs (see `server::spawn_workers`); 0 elsewhere.
    static WORKER: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Marks the current thread as data-plane worker `i`.
pub fn set_worker_index(i: usize) {
    WORKER.with(|w| w.set(i));
}

/// The current worker's item of a per-worker slice (worker 0's on any other thread).
#[inline]
pub(crate) fn this_worker<T>(per_worker: &[T]) -> &T {
    let i = WORKER.with(std::cell::Cell::get);
    &per_worker[if i < per_worker.len() { i } else { 0 }]
}

/// Milliseconds since the process started: a monotonic clock for ejection deadlines.
pub fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}
