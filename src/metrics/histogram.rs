//! A lock-free histogram of durations with fixed buckets.
//!
//! Hand-written rather than `prometheus::Histogram` because the limiter and
//! the Redis store record into it, and they build without the optional
//! `prometheus` crate; `observe` uses `prometheus::Histogram` where it can.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the buckets, in seconds.
///
/// They span a fast in-memory store (sub-millisecond) up to a rate limiter's
/// long wait (a minute); the last, implicit bucket is `+Inf`.
pub const BUCKET_BOUNDS_SECONDS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

const BUCKETS: usize = BUCKET_BOUNDS_SECONDS.len();

/// Bounds in nanoseconds, so `record` compares integers.
const BOUNDS_NANOS: [u64; BUCKETS] = {
    let mut out = [0u64; BUCKETS];
    let micros = [
        500,
        1_000,
        2_500,
        5_000,
        10_000,
        25_000,
        50_000,
        100_000,
        250_000,
        500_000,
        1_000_000,
        2_500_000,
        5_000_000,
        10_000_000,
        30_000_000,
        60_000_000u64,
    ];
    let mut i = 0;
    while i < BUCKETS {
        out[i] = micros[i] * 1_000;
        i += 1;
    }
    out
};

/// Counts durations into the fixed buckets of [`BUCKET_BOUNDS_SECONDS`].
///
/// Recording is a few relaxed atomic additions, so limiters and stores can
/// record on their hot path; [`snapshot`](Self::snapshot) reads the counts
/// without stopping writers (a snapshot taken during writes may be off by the
/// writes in flight, never torn within one counter).
///
/// ```
/// use std::time::Duration;
/// use pmcp_resilience::metrics::DurationHistogram;
///
/// let h = DurationHistogram::new();
/// h.record(Duration::from_millis(3));
/// h.record(Duration::from_secs(120));
/// let s = h.snapshot();
/// assert_eq!(s.count, 2);
/// assert_eq!(s.cumulative_count_le(0.005), 1);
/// assert!((s.sum_seconds - 120.003).abs() < 1e-9);
/// ```
#[derive(Debug, Default)]
pub struct DurationHistogram {
    /// Per-bucket counts (not cumulative); the last one is `+Inf`.
    buckets: [AtomicU64; BUCKETS + 1],
    sum_nanos: AtomicU64,
}

impl DurationHistogram {
    /// An empty histogram.
    pub fn new() -> Self {
        Self::default()
    }

    /// Counts one duration.
    pub fn record(&self, duration: Duration) {
        let nanos = crate::clock::duration_nanos(duration);
        let index = BOUNDS_NANOS.partition_point(|&bound| bound < nanos);
        self.buckets[index].fetch_add(1, Ordering::Relaxed);
        // Saturate rather than wrap: a wrapped sum would report nonsense.
        let _ = self
            .sum_nanos
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |sum| {
                Some(sum.saturating_add(nanos))
            });
    }

    /// The counts so far.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut cumulative = 0u64;
        let mut buckets = Vec::with_capacity(BUCKETS);
        for (i, bound) in BUCKET_BOUNDS_SECONDS.iter().enumerate() {
            cumulative = cumulative.saturating_add(self.buckets[i].load(Ordering::Relaxed));
            buckets.push((*bound, cumulative));
        }
        let count = cumulative.saturating_add(self.buckets[BUCKETS].load(Ordering::Relaxed));
        HistogramSnapshot {
            buckets,
            count,
            sum_seconds: self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9,
        }
    }
}

/// The counts of a histogram at one moment, in Prometheus' shape.
///
/// ```
/// use pmcp_resilience::metrics::{DurationHistogram, HistogramSnapshot};
/// use std::time::Duration;
///
/// let (a, b) = (DurationHistogram::new(), DurationHistogram::new());
/// a.record(Duration::from_millis(2));
/// b.record(Duration::from_millis(40));
/// // Two limiters' wait histograms, added up.
/// let mut total: HistogramSnapshot = a.snapshot();
/// assert!(total.merge(&b.snapshot()));
/// assert_eq!(total.count, 2);
/// assert_eq!(total.cumulative_count_le(0.0025), 1); // one wait of 2.5 ms or less
/// assert_eq!(total.cumulative_count_le(0.05), 2);
/// ```
#[derive(Debug, Clone, PartialEq, Default)]
pub struct HistogramSnapshot {
    /// `(upper bound in seconds, cumulative count of observations <= bound)`,
    /// bounds ascending. The `+Inf` bucket is [`count`](Self::count).
    pub buckets: Vec<(f64, u64)>,
    /// Number of observations.
    pub count: u64,
    /// Sum of the observations, in seconds.
    pub sum_seconds: f64,
}

impl HistogramSnapshot {
    /// Observations at or below `bound_seconds` (a bucket bound; for a value
    /// between bounds, the count of the highest bound below it).
    pub fn cumulative_count_le(&self, bound_seconds: f64) -> u64 {
        self.buckets
            .iter()
            .take_while(|(bound, _)| *bound <= bound_seconds)
            .last()
            .map_or(0, |(_, count)| *count)
    }

    /// Adds `other` into `self` when both have the same bucket bounds (all
    /// snapshots of [`DurationHistogram`] do); returns `false` and leaves
    /// `self` unchanged otherwise.
    pub fn merge(&mut self, other: &HistogramSnapshot) -> bool {
        if self.buckets.is_empty() && self.count == 0 {
            *self = other.clone();
            return true;
        }
        let same_bounds = self.buckets.len() == other.buckets.len()
            && self
                .buckets
                .iter()
                .zip(&other.buckets)
                .all(|(a, b)| a.0 == b.0);
        if !same_bounds {
            return false;
        }
        for (mine, theirs) in self.buckets.iter_mut().zip(&other.buckets) {
            mine.1 = mine.1.saturating_add(theirs.1);
        }
        self.count = self.count.saturating_add(other.count);
        self.sum_seconds += other.sum_seconds;
        true
    }

    /// Mean observation in seconds, `0.0` when empty.
    pub fn mean_seconds(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.sum_seconds / self.count as f64
        }
    }

    /// The snapshot as JSON: `{"count", "sum_seconds", "buckets": [{"le", "count"}]}`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "count": self.count,
            "sum_seconds": self.sum_seconds,
            "buckets": self
                .buckets
                .iter()
                .map(|(le, count)| serde_json::json!({ "le": le, "count": count }))
                .collect::<Vec<_>>(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_in_nanos_match_bounds_in_seconds() {
        for (nanos, seconds) in BOUNDS_NANOS.iter().zip(BUCKET_BOUNDS_SECONDS) {
            assert_eq!(*nanos, (seconds * 1e9).round() as u64);
        }
    }

    #[test]
    fn a_value_on_a_bound_falls_in_that_bucket() {
        let h = DurationHistogram::new();
        h.record(Duration::from_millis(1));
        h.record(Duration::from_nanos(1_000_001));
        h.record(Duration::ZERO);
        let s = h.snapshot();
        assert_eq!(s.cumulative_count_le(0.0005), 1);
        assert_eq!(s.cumulative_count_le(0.001), 2);
        assert_eq!(s.cumulative_count_le(0.0025), 3);
        assert_eq!(s.count, 3);
    }

    #[test]
    fn buckets_are_cumulative_and_inf_is_count() {
        let h = DurationHistogram::new();
        for ms in [1u64, 7, 7, 300, 90_000] {
            h.record(Duration::from_millis(ms));
        }
        let s = h.snapshot();
        assert_eq!(s.buckets.len(), BUCKET_BOUNDS_SECONDS.len());
        assert!(s.buckets.windows(2).all(|w| w[0].1 <= w[1].1));
        assert_eq!(s.cumulative_count_le(0.01), 3);
        assert_eq!(s.cumulative_count_le(60.0), 4);
        assert_eq!(s.count, 5);
        assert!((s.sum_seconds - 90.315).abs() < 1e-9);
        assert!((s.mean_seconds() - 18.063).abs() < 1e-9);
    }

    #[test]
    fn huge_durations_saturate_instead_of_wrapping() {
        let h = DurationHistogram::new();
        h.record(Duration::MAX);
        h.record(Duration::MAX);
        let s = h.snapshot();
        assert_eq!(s.count, 2);
        assert_eq!(s.sum_seconds, u64::MAX as f64 / 1e9);
    }

    #[test]
    fn concurrent_records_are_all_counted() {
        let h = std::sync::Arc::new(DurationHistogram::new());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let h = h.clone();
                std::thread::spawn(move || {
                    for i in 0..10_000u64 {
                        h.record(Duration::from_micros(i));
                    }
                })
            })
            .collect();
        for t in threads {
            assert!(t.join().is_ok());
        }
        assert_eq!(h.snapshot().count, 40_000);
    }

    #[test]
    fn merge_adds_same_bounds_and_refuses_others() {
        let a = DurationHistogram::new();
        a.record(Duration::from_millis(2));
        let b = DurationHistogram::new();
        b.record(Duration::from_secs(2));
        let mut merged = a.snapshot();
        assert!(merged.merge(&b.snapshot()));
        assert_eq!(merged.count, 2);
        assert_eq!(merged.cumulative_count_le(0.0025), 1);
        assert_eq!(merged.cumulative_count_le(2.5), 2);
        let odd = HistogramSnapshot {
            buckets: vec![(1.0, 1)],
            count: 1,
            sum_seconds: 0.5,
        };
        assert!(!merged.merge(&odd));
        assert_eq!(merged.count, 2);
    }
}
