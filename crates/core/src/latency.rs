//! The latency histogram layout shared by the metrics and the analysis.
//!
//! One fixed set of bucket bounds, fine enough (about 9 per decade) to estimate a p99
//! within a bucket's width, so the data plane records each request once and both
//! `/metrics` and the analysis read the same counters.

/// Upper bounds of the latency buckets, in microseconds. A final overflow bucket
/// (above the last bound) follows, so there are `LATENCY_BOUNDS_US.len() + 1` buckets.
pub const LATENCY_BOUNDS_US: [u64; 50] = [
    100, 150, 200, 250, 300, 400, 500, 600, 750, //
    1_000, 1_500, 2_000, 2_500, 3_000, 4_000, 5_000, 6_000, 7_500, //
    10_000, 15_000, 20_000, 25_000, 30_000, 40_000, 50_000, 60_000, 75_000, //
    100_000, 150_000, 200_000, 250_000, 300_000, 400_000, 500_000, 600_000, 750_000, //
    1_000_000, 1_500_000, 2_000_000, 2_500_000, 3_000_000, 4_000_000, 5_000_000, 6_000_000,
    7_500_000, //
    10_000_000, 15_000_000, 20_000_000, 30_000_000, 60_000_000,
];

/// Number of buckets including the overflow bucket.
pub const LATENCY_BUCKETS: usize = LATENCY_BOUNDS_US.len() + 1;

/// The bounds exposed on `/metrics` (a subset of [`LATENCY_BOUNDS_US`], so their
/// cumulative counts are exact).
pub const EXPOSED_BOUNDS_US: [u64; 15] = [
    500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000,
    2_500_000, 5_000_000, 10_000_000, 30_000_000,
];

/// The bucket index of a latency in microseconds.
#[inline]
pub fn bucket_index(us: u64) -> usize {
    LATENCY_BOUNDS_US.partition_point(|&b| b < us)
}

/// The `q`-quantile (0 < q ≤ 1) in microseconds from per-bucket counts, interpolated
/// linearly inside the bucket; `None` without samples. The overflow bucket reports the
/// last bound.
///
/// The rank is ⌈q·n⌉, but below the maximum (q < 1) never the slowest of two or more
/// samples: with fewer than 1 / (1 − q) samples (under 100 for a p99) ⌈q·n⌉ is n, the
/// slowest sample itself, and one hiccup (a pause on a busy host) would be the quantile
/// for as long as it stays in a window. So a lone outlier is left out there, while two
/// (2% or more of under 100 for a p99) still count; with enough samples it changes
/// nothing.
pub fn quantile_us(counts: &[u64; LATENCY_BUCKETS], q: f64) -> Option<f64> {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    let mut rank = (q * total as f64).ceil().max(1.0);
    if q < 1.0 && total >= 2 {
        rank = rank.min((total - 1) as f64);
    }
    let mut seen = 0u64;
    for (i, &c) in counts.iter().enumerate() {
        if c == 0 {
            continue;
        }
        if (seen + c) as f64 >= rank {
            let lower = if i == 0 { 0 } else { LATENCY_BOUNDS_US[i - 1] } as f64;
            let Some(&upper) = LATENCY_BOUNDS_US.get(i) else {
                return Some(lower);
            };
            let frac = (rank - seen as f64) / c as f64;
            return Some(lower + (upper as f64 - lower) * frac);
        }
        seen += c;
    }
    Some(*LATENCY_BOUNDS_US.last().unwrap_or(&0) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_are_increasing_and_exposed_is_a_subset() {
        assert!(LATENCY_BOUNDS_US.windows(2).all(|w| w[0] < w[1]));
        for b in EXPOSED_BOUNDS_US {
            assert!(LATENCY_BOUNDS_US.contains(&b), "{b}");
        }
    }

    #[test]
    fn index_puts_bound_in_its_own_bucket() {
        assert_eq!(bucket_index(0), 0);
        assert_eq!(bucket_index(100), 0);
        assert_eq!(bucket_index(101), 1);
        assert_eq!(bucket_index(u64::MAX), LATENCY_BUCKETS - 1);
    }

    #[test]
    fn p99_lands_in_the_right_bucket() {
        let mut c = [0u64; LATENCY_BUCKETS];
        c[bucket_index(1_000)] = 990; // 99% at ≤1 ms
        c[bucket_index(400_000)] = 10; // 1% at ~400 ms
        let p99 = quantile_us(&c, 0.99).unwrap();
        assert!((750.0..=1_000.0).contains(&p99), "{p99}");
        let p999 = quantile_us(&c, 0.999).unwrap();
        assert!((300_000.0..=400_000.0).contains(&p999), "{p999}");
        assert_eq!(quantile_us(&[0; LATENCY_BUCKETS], 0.99), None);
    }
}
