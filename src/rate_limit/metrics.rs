//! What a rate limiter reports.
//!
//! The counters are relaxed atomics bumped on the request path (skipped when
//! `MetricsConfig::enabled` is off). The per-key view is **not** updated per
//! request: it is refreshed from the limiter's key map when
//! `RateLimitMiddleware::metrics()` or `snapshot()` is called.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use tokio::sync::RwLock;

use crate::metrics::{DurationHistogram, HistogramSnapshot};
use crate::registry::RegistryStats;

use super::limiter::KeyUsage;

/// Counters of one rate-limit middleware (shared by its clones).
#[derive(Debug, Default)]
pub struct RateLimitMetrics {
    /// Requests seen.
    pub total_requests: AtomicU64,
    /// Requests admitted (after waiting, if they waited).
    pub allowed_requests: AtomicU64,
    /// Requests rejected.
    pub rejected_requests: AtomicU64,
    /// Admitted requests that had to wait first.
    pub waited_requests: AtomicU64,
    /// Total time admitted requests spent waiting, in milliseconds.
    pub wait_time_ms: AtomicU64,
    /// How long each admitted request that waited did wait.
    pub wait_histogram: DurationHistogram,
    /// Use per key, refreshed when `metrics()` is called (not per request).
    pub current_usage: Arc<RwLock<HashMap<String, RateLimitUsage>>>,
}

/// The use of one key, as kept in [`RateLimitMetrics::current_usage`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimitUsage {
    /// The key.
    pub scope_key: String,
    /// Units in use.
    pub used: u32,
    /// The key's limit.
    pub limit: u32,
    /// When the key is back at full capacity if nothing else arrives.
    pub reset_at: SystemTime,
}

/// A point-in-time view of a middleware, for exporters such as Prometheus.
#[derive(Debug, Clone)]
pub struct RateLimitSnapshot {
    /// The scope's label (`global`, `session`, ...).
    pub scope: &'static str,
    /// Requests seen.
    pub total_requests: u64,
    /// Requests admitted.
    pub allowed_requests: u64,
    /// Requests rejected.
    pub rejected_requests: u64,
    /// Requests that waited.
    pub waited_requests: u64,
    /// Milliseconds spent waiting.
    pub wait_time_ms: u64,
    /// The distribution of those waits.
    pub wait_histogram: HistogramSnapshot,
    /// One row per key.
    pub keys: Vec<KeyUsage>,
    /// Counters of the key map (keys held, evicted, overflowed).
    pub registry: RegistryStats,
}

impl RateLimitMetrics {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Replaces the per-key view if no reader holds it; returns whether it did.
    pub(crate) fn refresh_usage(&self, rows: &[KeyUsage]) -> bool {
        let Ok(mut map) = self.current_usage.try_write() else {
            return false;
        };
        map.clear();
        for row in rows {
            map.insert(
                row.key.as_str().to_string(),
                RateLimitUsage {
                    scope_key: row.key.as_str().to_string(),
                    used: row.used,
                    limit: row.limit,
                    reset_at: row.reset_at.to_system_time(),
                },
            );
        }
        true
    }
}
