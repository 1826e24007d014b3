//! What breakers and limiters report, in words both they and the metrics
//! understand: the settings of their counters ([`MetricsConfig`]), their
//! store's state ([`StoreReport`]), durations ([`DurationHistogram`]) and
//! the request's method passed along to the request metrics
//! ([`METHOD_METADATA_KEY`]).
//!
//! This module depends on no other of the crate but the clock: the breaker
//! and the limiter build their reports from it, and `observe` reads them.
//!
//! ```
//! use pmcp_resilience::{CircuitBreakerMiddleware, MetricsConfig};
//!
//! // Keep the totals, skip the per-key state map.
//! let cb = CircuitBreakerMiddleware::builder()
//!     .metrics_config(MetricsConfig::default().per_key(false))
//!     .build()
//!     .expect("valid settings");
//! # drop(cb);
//! ```

mod context;
mod histogram;
mod store;

pub use context::METHOD_METADATA_KEY;
pub(crate) use context::mark_method;
pub use histogram::{BUCKET_BOUNDS_SECONDS, DurationHistogram, HistogramSnapshot};
pub use store::StoreReport;

/// How a middleware aggregates its metrics.
///
/// ```
/// use pmcp_resilience::metrics::MetricsConfig;
///
/// let config = MetricsConfig::default().per_key(false);
/// assert!(config.enabled);
/// assert!(!config.per_key);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct MetricsConfig {
    /// Count requests at all (default `true`). When `false`, the counters stay
    /// at zero and the per-request cost of counting is saved.
    pub enabled: bool,
    /// Read a row per key into `metrics()` (and so into the per-key
    /// Prometheus series) (default `true`). When `false`, `metrics()` has
    /// the totals only and costs no walk over the keys.
    pub per_key: bool,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            enabled: true,
            per_key: true,
        }
    }
}

impl MetricsConfig {
    /// Turns counting on or off.
    pub fn enabled(mut self, enabled: bool) -> Self {
        self.enabled = enabled;
        self
    }

    /// Turns the per-key view on or off.
    pub fn per_key(mut self, per_key: bool) -> Self {
        self.per_key = per_key;
        self
    }
}
