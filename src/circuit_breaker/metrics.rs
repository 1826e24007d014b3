//! What a breaker reports: one plain snapshot, [`CircuitBreakerMetrics`],
//! with the totals, a row per key and the state of its store.
//!
//! ```
//! use pmcp_resilience::{CircuitBreakerMiddleware, CircuitState};
//!
//! let cb = CircuitBreakerMiddleware::builder().name("upstream").build()?;
//! cb.force_open("global");
//! let m = cb.metrics(); // an owned copy: no atomics, no locks, no `.await`
//! assert_eq!((m.name.as_str(), m.scope, m.total_requests), ("upstream", "global", 0));
//! assert_eq!(m.keys[0].key, "global");
//! assert_eq!(m.keys[0].state, CircuitState::Open);
//! assert_eq!(m.store.kind, "memory");
//! # Ok::<(), pmcp_resilience::ConfigError>(())
//! ```
//!
//! Every call that reaches the breaker is counted once in `total_requests`
//! and then once more by how it went: refused (`rejected_requests`), ended
//! as a success, a failure (timeouts included, also counted in
//! `timed_out_requests`) or neutral, still in flight, or admitted without
//! being followed (`untracked_requests`: the breaker is disabled for the
//! key, or the key registry or the table of calls in flight is full). So
//! `total = rejected + successful + failed + neutral + in flight + untracked`.
//!
//! The same snapshot is what `observe::MetricsMiddleware` exports: the
//! middleware's `ReportSource` is its `metrics()`.

use std::sync::atomic::{AtomicU64, Ordering};

use super::state::CircuitState;
use crate::metrics::StoreReport;
use crate::registry::RegistryStats;

/// The name a breaker reports under when its builder was given no
/// [`name`](super::CircuitBreakerBuilder::name).
pub const DEFAULT_REPORT_NAME: &str = "circuit_breaker";

/// The counters of one breaker, bumped on the request path (shared by all
/// its handles); [`CircuitBreakerMetrics`] is what users read.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) successful_requests: AtomicU64,
    pub(crate) failed_requests: AtomicU64,
    pub(crate) rejected_requests: AtomicU64,
    pub(crate) neutral_requests: AtomicU64,
    pub(crate) timed_out_requests: AtomicU64,
    pub(crate) untracked_requests: AtomicU64,
    pub(crate) state_transitions: AtomicU64,
}

impl Counters {
    pub(crate) fn read(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// One key's row in [`CircuitBreakerMetrics::keys`] (and what a shared
/// store reports per key).
///
/// ```
/// use pmcp_resilience::circuit_breaker::{CircuitBreakerMiddleware, CircuitState, Verdict};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let cb = CircuitBreakerMiddleware::builder().failure_threshold(1).build().expect("valid");
/// cb.acquire("global").await.expect("closed").record(Verdict::Failure).await;
/// let _refused = cb.acquire("global").await.expect_err("open");
/// let row = &cb.metrics().keys[0];
/// assert_eq!((row.key.as_str(), row.state), ("global", CircuitState::Open));
/// assert_eq!((row.failures, row.rejections, row.transitions), (1, 1, 1));
/// # }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySnapshot {
    /// The scope key, in the API's own text (`tool:search`).
    pub key: String,
    /// Its state as callers see it (forced modes applied).
    pub state: CircuitState,
    /// Calls that succeeded.
    pub successes: u64,
    /// Calls that failed (timeouts included).
    pub failures: u64,
    /// Requests rejected.
    pub rejections: u64,
    /// State changes of this key seen by this process.
    pub transitions: u64,
}

impl KeySnapshot {
    /// A key in `state` with all counters at zero (for a report of your own).
    pub fn new(key: impl Into<String>, state: CircuitState) -> Self {
        KeySnapshot {
            key: key.into(),
            state,
            successes: 0,
            failures: 0,
            rejections: 0,
            transitions: 0,
        }
    }

    /// Sets the counters: failures, rejections, successes, transitions.
    pub fn with_counts(
        mut self,
        failures: u64,
        rejections: u64,
        successes: u64,
        transitions: u64,
    ) -> Self {
        self.failures = failures;
        self.rejections = rejections;
        self.successes = successes;
        self.transitions = transitions;
        self
    }

    /// Calls that reached the key: failures, rejections and successes.
    pub(crate) fn traffic(&self) -> u64 {
        self.failures
            .saturating_add(self.rejections)
            .saturating_add(self.successes)
    }
}

/// A breaker at one moment: an owned, plain copy of its counters, every key
/// it holds and its store, returned by `CircuitBreakerMiddleware::metrics()`.
///
/// ```
/// use pmcp_resilience::circuit_breaker::{CircuitBreakerMiddleware, Verdict};
/// use pmcp_resilience::Scope;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let cb = CircuitBreakerMiddleware::builder().name("upstream").scope(Scope::PerTool).build().expect("valid");
/// cb.acquire("tool:search").await.expect("closed").record(Verdict::Success).await;
/// cb.acquire("tool:search").await.expect("closed").record(Verdict::Failure).await;
/// let m = cb.metrics();
/// assert_eq!((m.name.as_str(), m.scope), ("upstream", "tool"));
/// assert_eq!(m.total_requests, 2);
/// assert_eq!((m.successful_requests, m.failed_requests, m.in_flight), (1, 1, 0));
/// assert_eq!(m.registry.keys, 1);
/// # }
/// ```
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct CircuitBreakerMetrics {
    /// The breaker's name (the builder's `name(..)`, [`DEFAULT_REPORT_NAME`]
    /// by default): the `name` label of its Prometheus series.
    pub name: String,
    /// The scope label (`global`, `server`, `tool`, ...).
    pub scope: &'static str,
    /// Calls that reached the breaker, each counted once.
    pub total_requests: u64,
    /// Calls that ended as successes.
    pub successful_requests: u64,
    /// Calls that ended as failures of the server (timeouts included).
    pub failed_requests: u64,
    /// Calls rejected because the breaker was open (or half-open and full).
    pub rejected_requests: u64,
    /// Calls that ended neutral: the caller's own mistakes, refusals by other
    /// middlewares, callers that went away. Not counted for or against the server.
    pub neutral_requests: u64,
    /// Calls that got no answer within the call deadline (also in `failed_requests`).
    pub timed_out_requests: u64,
    /// Calls admitted without being followed (breaker disabled for the key,
    /// key registry or call table full).
    pub untracked_requests: u64,
    /// Calls admitted and not yet ended.
    pub in_flight: u64,
    /// State changes of all keys.
    pub state_transitions: u64,
    /// Every key held, sorted by key (empty when `MetricsConfig::per_key`
    /// is off).
    pub keys: Vec<KeySnapshot>,
    /// The key registry's size, evictions and overflow.
    pub registry: RegistryStats,
    /// Where the state lives and how that store is doing.
    pub store: StoreReport,
}

impl CircuitBreakerMetrics {
    /// An empty snapshot for the breaker `name` of `scope`, in memory: the
    /// start of a report of your own for `observe::MetricsMiddleware`.
    pub fn new(name: impl Into<String>, scope: &'static str) -> Self {
        CircuitBreakerMetrics {
            name: name.into(),
            scope,
            total_requests: 0,
            successful_requests: 0,
            failed_requests: 0,
            rejected_requests: 0,
            neutral_requests: 0,
            timed_out_requests: 0,
            untracked_requests: 0,
            in_flight: 0,
            state_transitions: 0,
            keys: Vec::new(),
            registry: RegistryStats::default(),
            store: StoreReport::memory(),
        }
    }
}

/// The breaker's snapshot under its former name.
#[deprecated(note = "renamed `CircuitBreakerMetrics`, which `metrics()` returns")]
pub type MetricsSnapshot = CircuitBreakerMetrics;
