//! What a breaker reports: request counters, transitions, and the state of
//! every key.
//!
//! ```
//! use pmcp_resilience::CircuitBreakerMiddleware;
//! use std::sync::atomic::Ordering;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let cb = CircuitBreakerMiddleware::builder().build().expect("valid settings");
//! let metrics = cb.metrics();
//! assert_eq!(metrics.total_requests.load(Ordering::Relaxed), 0);
//! assert!(metrics.current_state.read().await.is_empty());
//! assert!(cb.snapshot().keys.is_empty()); // a plain copy, one row per key
//! # }
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
//! The per-key view, [`CircuitBreakerMetrics::current_state`], is a `tokio`
//! lock so that `metrics.current_state.read().await` works as in the feature
//! request. It is rebuilt from the key registry by each call of
//! `CircuitBreakerMiddleware::metrics()` (never on the request path), so it
//! holds at most the registry's keys.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use super::state::CircuitState;
use crate::registry::RegistryStats;

/// The counters and per-key states of one breaker (shared by all its handles).
#[derive(Debug, Default)]
pub struct CircuitBreakerMetrics {
    /// Requests that reached the breaker.
    pub total_requests: AtomicU64,
    /// Calls that ended as successes.
    pub successful_requests: AtomicU64,
    /// Calls that ended as failures of the server (timeouts included).
    pub failed_requests: AtomicU64,
    /// Requests rejected because the breaker was open (or half-open and full).
    pub rejected_requests: AtomicU64,
    /// Calls that ended neutral: the caller's own mistakes, refusals by other
    /// middlewares, callers that went away. Not counted for or against the server.
    pub neutral_requests: AtomicU64,
    /// Calls that got no answer within the call deadline (also in `failed_requests`).
    pub timed_out_requests: AtomicU64,
    /// Calls admitted without being followed (breaker disabled for the key,
    /// key registry or call table full).
    pub untracked_requests: AtomicU64,
    /// State changes of all keys.
    pub state_transitions: AtomicU64,
    /// The state of every key that is not plainly closed (open, half-open,
    /// forced, or closed with failures counted) as of the last `metrics()` call.
    pub current_state: Arc<tokio::sync::RwLock<HashMap<String, CircuitState>>>,
}

/// One key's row in a [`MetricsSnapshot`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySnapshot {
    /// The scope key.
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

/// A plain copy of a breaker's metrics, for exporters (Prometheus and others).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsSnapshot {
    /// The scope label (`global`, `server`, ...).
    pub scope: &'static str,
    /// See [`CircuitBreakerMetrics::total_requests`].
    pub total_requests: u64,
    /// See [`CircuitBreakerMetrics::successful_requests`].
    pub successful_requests: u64,
    /// See [`CircuitBreakerMetrics::failed_requests`].
    pub failed_requests: u64,
    /// See [`CircuitBreakerMetrics::rejected_requests`].
    pub rejected_requests: u64,
    /// See [`CircuitBreakerMetrics::neutral_requests`].
    pub neutral_requests: u64,
    /// See [`CircuitBreakerMetrics::timed_out_requests`].
    pub timed_out_requests: u64,
    /// See [`CircuitBreakerMetrics::untracked_requests`].
    pub untracked_requests: u64,
    /// Calls admitted and not yet ended.
    pub in_flight: u64,
    /// See [`CircuitBreakerMetrics::state_transitions`].
    pub state_transitions: u64,
    /// Every key held by the registry.
    pub keys: Vec<KeySnapshot>,
    /// The registry's size, evictions and overflow.
    pub registry: RegistryStats,
}
