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
//! The counters are bumped on the request path in per-thread stripes (so
//! threads do not fight over one cache line) and summed into the public
//! atomics by every call of `CircuitBreakerMiddleware::metrics()` or
//! `snapshot()`: read them from a fresh `metrics()`. Successes are counted
//! once, in each key's entry (which the call touches anyway), and summed over
//! the keys, evicted ones included, by the same calls. The per-key
//! view, [`CircuitBreakerMetrics::current_state`], is a `tokio` lock so that
//! `metrics.current_state.read().await` works as in the feature request; it
//! is written only when a key changes state (never per request). A change
//! that finds the map being read is queued and applied at the next change or
//! the next call of `CircuitBreakerMiddleware::metrics()`, which also drops
//! keys the registry has evicted.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

use super::state::CircuitState;
use crate::counter::StripedCounter;
use crate::registry::RegistryStats;

/// The counters and per-key states of one breaker (shared by all its handles).
#[derive(Debug, Default)]
pub struct CircuitBreakerMetrics {
    /// Requests that reached the breaker.
    pub total_requests: AtomicU64,
    /// Calls that ended without a failure the matcher counts.
    pub successful_requests: AtomicU64,
    /// Calls that ended with a failure the matcher counts.
    pub failed_requests: AtomicU64,
    /// Requests rejected because the breaker was open (or half-open and full).
    pub rejected_requests: AtomicU64,
    /// State changes of all keys.
    pub state_transitions: AtomicU64,
    /// The state of every key that has changed state or been forced, until it
    /// is evicted. Keys that never left `Closed` are not listed.
    pub current_state: Arc<tokio::sync::RwLock<HashMap<String, CircuitState>>>,
    queued: Mutex<Vec<(String, Option<CircuitState>)>>,
    pub(crate) live: LiveCounters,
}

/// The request-path side of the counters (see the module docs).
#[derive(Debug, Default)]
pub(crate) struct LiveCounters {
    pub(crate) total: StripedCounter,
    pub(crate) failed: StripedCounter,
    pub(crate) rejected: StripedCounter,
}

impl CircuitBreakerMetrics {
    /// Records that `key` is now in `state` (`None`: the key is gone).
    pub(crate) fn set_state(&self, key: &str, state: Option<CircuitState>) {
        self.queued.lock().push((key.to_owned(), state));
        self.flush();
    }

    /// Applies queued per-key changes if the map is not being read.
    pub(crate) fn flush(&self) {
        let Ok(mut map) = self.current_state.try_write() else {
            return;
        };
        let changes = std::mem::take(&mut *self.queued.lock());
        for (key, state) in changes {
            match state {
                Some(s) => {
                    map.insert(key, s);
                }
                None => {
                    map.remove(&key);
                }
            }
        }
    }

    pub(crate) fn add(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Brings the public counters up to date with the request-path stripes
    /// and `successes`, the sum of the keys' own success counts (a success
    /// is counted once, in its key's entry, which a call touches anyway).
    pub(crate) fn sync(&self, successes: u64) {
        let live = &self.live;
        self.total_requests
            .store(live.total.sum(), Ordering::Relaxed);
        // The sum is read key by key while calls go on: never let the
        // counter go back.
        self.successful_requests
            .fetch_max(successes, Ordering::Relaxed);
        self.failed_requests
            .store(live.failed.sum(), Ordering::Relaxed);
        self.rejected_requests
            .store(live.rejected.sum(), Ordering::Relaxed);
    }
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
    /// Calls that failed.
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
    /// See [`CircuitBreakerMetrics::state_transitions`].
    pub state_transitions: u64,
    /// Every key held by the registry.
    pub keys: Vec<KeySnapshot>,
    /// The registry's size, evictions and overflow.
    pub registry: RegistryStats,
}
