//! Where a breaker's or limiter's state lives, as they report it: the
//! kind of store, its failure mode and, for stores that measure it, the
//! latency of its operations.

use super::histogram::HistogramSnapshot;

/// Where a breaker's or limiter's state lives and how that store is doing.
///
/// ```
/// use pmcp_resilience::metrics::StoreReport;
/// use pmcp_resilience::RateLimitMiddleware;
///
/// // What a limiter in memory reports...
/// let limiter = RateLimitMiddleware::builder().build().expect("valid settings");
/// let store = limiter.metrics().store;
/// assert_eq!((store.kind, store.mode), ("memory", "normal"));
/// assert_eq!(store.degraded_decisions, None); // memory never fails
/// // ...and what a store of your own might report while its backend is down.
/// let custom = StoreReport::new("custom", "fail_open").with_degraded_decisions(12);
/// assert!(StoreReport::MODES.contains(&custom.mode));
/// ```
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct StoreReport {
    /// `"memory"`, `"file"`, `"redis"` or `"custom"`.
    pub kind: &'static str,
    /// The failure policy in force now: `"normal"` (the store answers),
    /// `"fail_open"`, `"fail_closed"` or `"local_fallback"`.
    pub mode: &'static str,
    /// Latency of store operations, for stores that measure it.
    pub latency: Option<HistogramSnapshot>,
    /// Decisions taken without the store under its failure policy, for
    /// stores that can fail (Redis).
    pub degraded_decisions: Option<u64>,
}

impl StoreReport {
    /// Modes a store can report, in the order they are exported.
    pub const MODES: [&'static str; 4] = ["normal", "fail_open", "fail_closed", "local_fallback"];

    /// A store of `kind` in `mode`, without latency.
    pub fn new(kind: &'static str, mode: &'static str) -> Self {
        StoreReport {
            kind,
            mode,
            latency: None,
            degraded_decisions: None,
        }
    }

    /// The in-memory store, working normally.
    pub fn memory() -> Self {
        Self::new("memory", "normal")
    }

    /// Adds a latency histogram.
    pub fn with_latency(mut self, latency: HistogramSnapshot) -> Self {
        self.latency = Some(latency);
        self
    }

    /// Adds the count of decisions taken without the store.
    pub fn with_degraded_decisions(mut self, decisions: u64) -> Self {
        self.degraded_decisions = Some(decisions);
        self
    }
}

impl Default for StoreReport {
    fn default() -> Self {
        Self::memory()
    }
}
