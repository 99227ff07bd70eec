//! Whether an upstream's connections may carry another request: the hold-off after
//! an upstream has sent bytes nobody asked for.
//!
//! HTTP/1.1 answers have no request id: an answer is the next request's because it
//! comes next. An upstream that sends a second, unasked-for answer (or more body than
//! its framing said) a moment after the first poisons its connection: if those bytes
//! land while the connection waits idle, the idle check sees them
//! ([`Io::check_idle`](crate::conn::Io::check_idle)) and the connection is dropped
//! (what Pingora's pool, Envoy's codec client and Squid do with data on an idle
//! upstream connection); but if the next request has already been written on it,
//! they are read as that request's answer and reach the wrong client, and no framing
//! rule can tell. The only defence against that race is not to reuse the
//! connections of an upstream that has been seen to do it. So every sighting (bytes
//! past a complete response, bytes on an idle connection) starts a hold-off of
//! [`HOLD_OFF_MS`] during which that upstream's connections are closed after each
//! response and none is taken from an idle list; a sighting again soon after one
//! doubles it, up to [`MAX_HOLD_OFF_MS`].
//!
//! One [`Reuse`] is shared by every worker's idle list to the same upstream. On the
//! request path it costs one relaxed atomic load when a connection is taken and one
//! when it is given back; the clock is read only while a hold-off is on.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::OnceLock;

/// How long an upstream's connections are not reused after it sent unasked-for bytes.
pub const HOLD_OFF_MS: u64 = 10_000;
/// The longest hold-off, for an upstream seen again and again.
pub const MAX_HOLD_OFF_MS: u64 = 320_000;

/// Milliseconds since this wing's first look at the clock: the idle lists' clock.
pub(crate) fn now_ms() -> u64 {
    static START: OnceLock<std::time::Instant> = OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u64
}

/// One upstream's connection-reuse state, shared by its idle lists.
#[derive(Debug, Default)]
pub struct Reuse {
    /// Until when (the wing's clock, plus one so that 0 means "none") connections
    /// are not reused.
    held_until_ms: AtomicU64,
    /// When the last sighting was (the wing's clock, plus one; 0: never).
    last_seen_ms: AtomicU64,
    /// Sightings in a row, each soon after the previous one: the back-off exponent.
    streak: AtomicU32,
    /// Sightings in all.
    unasked_total: AtomicU64,
}

impl Reuse {
    /// Times the upstream was seen sending bytes nobody asked for.
    pub fn unasked_total(&self) -> u64 {
        self.unasked_total.load(Relaxed)
    }

    /// Whether the upstream's connections are not to be reused now.
    #[inline]
    pub fn held_off(&self) -> bool {
        // The fast path, with no hold-off: one load, no clock.
        self.held_until_ms.load(Relaxed) != 0 && self.held_off_at(now_ms())
    }

    /// [`held_off`](Self::held_off) at `now` (the wing's clock); ends a hold-off that
    /// has run out.
    pub fn held_off_at(&self, now: u64) -> bool {
        let until = self.held_until_ms.load(Relaxed);
        if until == 0 {
            return false;
        }
        if now + 1 < until {
            return true;
        }
        // Run out: back to the fast path (unless a new sighting moved it meanwhile).
        let _ = self
            .held_until_ms
            .compare_exchange(until, 0, Relaxed, Relaxed);
        false
    }

    /// The upstream sent bytes nobody asked for: hold its connections' reuse off.
    pub fn saw_unasked(&self) {
        self.saw_unasked_at(now_ms());
    }

    /// [`saw_unasked`](Self::saw_unasked) at `now`; returns the hold-off started (ms).
    pub fn saw_unasked_at(&self, now: u64) -> u64 {
        self.unasked_total.fetch_add(1, Relaxed);
        let last = self.last_seen_ms.swap(now + 1, Relaxed);
        let streak = self.streak.load(Relaxed);
        // Soon after the previous sighting: within twice that sighting's hold-off.
        // The connections were not reused meanwhile, so the upstream had little
        // chance to show it had mended; it is held off longer.
        let soon = last != 0 && now + 1 - last <= 2 * hold_off(streak);
        let streak = if soon { (streak + 1).min(5) } else { 0 };
        self.streak.store(streak, Relaxed);
        let period = hold_off(streak);
        let until = now + 1 + period;
        let was = self.held_until_ms.fetch_max(until, Relaxed);
        if was == 0 || was < now + 1 {
            tracing::warn!(
                hold_off_ms = period,
                "an upstream sent bytes nobody asked for; its connections are not reused for now"
            );
        }
        period
    }
}

/// The hold-off after `streak` sightings in a row.
fn hold_off(streak: u32) -> u64 {
    (HOLD_OFF_MS << streak.min(5)).min(MAX_HOLD_OFF_MS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_sighting_no_hold_off() {
        let r = Reuse::default();
        assert!(!r.held_off_at(0));
        assert!(!r.held_off_at(1_000_000));
        assert!(!r.held_off());
        assert_eq!(r.unasked_total(), 0);
    }

    #[test]
    fn a_sighting_holds_reuse_off_for_a_while_then_reuse_resumes() {
        let r = Reuse::default();
        assert_eq!(r.saw_unasked_at(5_000), HOLD_OFF_MS);
        assert!(r.held_off_at(5_000));
        assert!(r.held_off_at(5_000 + HOLD_OFF_MS - 1));
        assert!(!r.held_off_at(5_000 + HOLD_OFF_MS));
        assert!(!r.held_off_at(5_000 + HOLD_OFF_MS - 1), "ended for good");
        assert_eq!(r.unasked_total(), 1);
    }

    #[test]
    fn sightings_soon_after_each_other_double_the_hold_off_up_to_the_cap() {
        let r = Reuse::default();
        let mut now = 0;
        let mut periods = Vec::new();
        for _ in 0..8 {
            let p = r.saw_unasked_at(now);
            periods.push(p);
            // Seen again right after the hold-off ran out.
            now += p + 1;
        }
        assert_eq!(
            periods,
            [10_000, 20_000, 40_000, 80_000, 160_000, 320_000, 320_000, 320_000]
        );
        // A long quiet spell starts over.
        now += 10 * MAX_HOLD_OFF_MS;
        assert_eq!(r.saw_unasked_at(now), HOLD_OFF_MS);
        assert_eq!(r.unasked_total(), 9);
    }

    #[test]
    fn a_sighting_during_a_hold_off_never_shortens_it() {
        let r = Reuse::default();
        r.saw_unasked_at(0);
        r.saw_unasked_at(100);
        assert!(r.held_off_at(HOLD_OFF_MS + 50));
    }
}
