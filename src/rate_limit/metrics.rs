//! What a limiter reports: one plain snapshot, [`RateLimitMetrics`], with
//! the totals, a row per key ([`KeyUsage`]) and the state of its store.
//!
//! ```
//! use pmcp_resilience::{RateLimitMiddleware, RateLimitStrategy};
//! use std::time::Duration;
//!
//! let rl = RateLimitMiddleware::builder()
//!     .strategy(RateLimitStrategy::FixedWindow { max_requests: 5, window: Duration::from_secs(1) })
//!     .build()?;
//! let m = rl.metrics(); // an owned copy: no atomics, no locks, no `.await`
//! assert_eq!((m.name.as_str(), m.scope), ("rate_limit", "global"));
//! assert_eq!((m.allowed_requests, m.rejected_requests, m.wait_time), (0, 0, Duration::ZERO));
//! for key in &m.keys {
//!     // `reset_at` is a `Timestamp`: it prints as RFC 3339.
//!     println!("{}: {} of {} used, full again at {}", key.key, key.used, key.limit, key.reset_at);
//! }
//! # Ok::<(), pmcp_resilience::ConfigError>(())
//! ```
//!
//! The counters are relaxed atomics bumped on the request path (skipped when
//! `MetricsConfig::enabled` is off); the rows per key are read from the
//! limiter's key map when `metrics()` is called, never per request.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::metrics::{DurationHistogram, HistogramSnapshot, StoreReport};
use crate::registry::RegistryStats;

use super::limiter::KeyUsage;

/// The name a limiter reports under when its builder was given no
/// [`name`](super::RateLimitBuilder::name).
pub const DEFAULT_REPORT_NAME: &str = "rate_limit";

/// The counters of one limiter, bumped on the request path (shared by its
/// clones); [`RateLimitMetrics`] is what users read.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) total_requests: AtomicU64,
    pub(crate) allowed_requests: AtomicU64,
    pub(crate) rejected_requests: AtomicU64,
    pub(crate) waited_requests: AtomicU64,
    pub(crate) wait_time_nanos: AtomicU64,
    pub(crate) wait_histogram: DurationHistogram,
}

impl Counters {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn read(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// A limiter at one moment: an owned, plain copy of its counters, the use
/// of every key it holds and its store, returned by
/// `RateLimitMiddleware::metrics()`.
///
/// ```
/// use pmcp::shared::{AdvancedMiddleware, MiddlewareContext};
/// use pmcp::types::{JSONRPCRequest, RequestId};
/// use pmcp_resilience::{RateLimitMiddleware, RateLimitStrategy};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), pmcp_resilience::ConfigError> {
/// let limiter = RateLimitMiddleware::builder()
///     .name("api")
///     .strategy(RateLimitStrategy::TokenBucket { capacity: 2, refill_rate: 1 })
///     .build()?;
/// let context = MiddlewareContext::default();
/// for id in 0..3i64 {
///     let mut ping = JSONRPCRequest { jsonrpc: "2.0".into(), method: "ping".into(), params: None, id: RequestId::from(id) };
///     let _ = limiter.on_request_with_context(&mut ping, &context).await;
/// }
/// let m = limiter.metrics();
/// assert_eq!(m.name, "api");
/// assert_eq!((m.total_requests, m.allowed_requests, m.rejected_requests), (3, 2, 1));
/// assert_eq!(m.keys[0].key.as_str(), "global");
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct RateLimitMetrics {
    /// The limiter's name (the builder's `name(..)`, [`DEFAULT_REPORT_NAME`]
    /// by default): the `name` label of its Prometheus series.
    pub name: String,
    /// The scope's label (`global`, `session`, ...).
    pub scope: &'static str,
    /// Requests seen.
    pub total_requests: u64,
    /// Requests admitted (after waiting, if they waited).
    pub allowed_requests: u64,
    /// Requests rejected.
    pub rejected_requests: u64,
    /// Admitted requests that had to wait first.
    pub waited_requests: u64,
    /// Total time admitted requests spent waiting.
    pub wait_time: Duration,
    /// How long each admitted request that waited did wait.
    pub wait_histogram: HistogramSnapshot,
    /// One row per key, sorted by key (empty when `MetricsConfig::per_key`
    /// is off); `reset_at` is a [`Timestamp`](crate::Timestamp), shown as
    /// RFC 3339.
    pub keys: Vec<KeyUsage>,
    /// Counters of the key map (keys held, evicted, overflowed).
    pub registry: RegistryStats,
    /// Where the state lives and how that store is doing.
    pub store: StoreReport,
}

impl RateLimitMetrics {
    /// An empty snapshot for the limiter `name` of `scope`, in memory: the
    /// start of a report of your own for `observe::MetricsMiddleware`.
    pub fn new(name: impl Into<String>, scope: &'static str) -> Self {
        RateLimitMetrics {
            name: name.into(),
            scope,
            total_requests: 0,
            allowed_requests: 0,
            rejected_requests: 0,
            waited_requests: 0,
            wait_time: Duration::ZERO,
            wait_histogram: HistogramSnapshot::default(),
            keys: Vec::new(),
            registry: RegistryStats::default(),
            store: StoreReport::memory(),
        }
    }
}

/// The limiter's snapshot under its former name.
#[deprecated(note = "renamed `RateLimitMetrics`, which `metrics()` returns")]
pub type RateLimitSnapshot = RateLimitMetrics;
