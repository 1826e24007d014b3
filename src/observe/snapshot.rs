//! One pull of everything the metrics know: request statistics and the
//! reports of every registered source, with keys already bounded.

use std::sync::Arc;

use parking_lot::RwLock;
use serde_json::{Value, json};

use crate::circuit_breaker::{CircuitBreakerMetrics, CircuitState, KeySnapshot};
use crate::metrics::HistogramSnapshot;
use crate::metrics::StoreReport;
use crate::observe::cardinality::bound_keys;
use crate::observe::report::{Report, ReportSource};
use crate::observe::requests::{MethodSnapshot, RequestStats};
use crate::rate_limit::{KeyUsage, RateLimitMetrics};
use crate::registry::RegistryStats;

/// State shared by the middleware, the collector, the exporter and the server.
pub(crate) struct Shared {
    pub(crate) sources: RwLock<Vec<Arc<dyn ReportSource>>>,
    pub(crate) requests: RequestStats,
    pub(crate) include_breakers: bool,
    pub(crate) include_limiters: bool,
    pub(crate) max_label_keys: usize,
}

/// A breaker report whose keys are bounded by the cardinality rule.
pub(crate) struct BoundedBreaker {
    pub(crate) report: CircuitBreakerMetrics,
    pub(crate) rows: Vec<KeySnapshot>,
    /// Keys closed, open and half-open, counted before bounding.
    pub(crate) states: [u64; 3],
}

/// A limiter report whose keys are bounded by the cardinality rule.
pub(crate) struct BoundedLimiter {
    pub(crate) report: RateLimitMetrics,
    pub(crate) rows: Vec<KeyUsage>,
}

/// Everything, at one moment.
pub(crate) struct Gathered {
    pub(crate) requests: Vec<MethodSnapshot>,
    pub(crate) breakers: Vec<BoundedBreaker>,
    pub(crate) limiters: Vec<BoundedLimiter>,
}

impl Shared {
    pub(crate) fn gather(&self) -> Gathered {
        // Clone the list so that no lock is held while sources report.
        let sources: Vec<Arc<dyn ReportSource>> = self.sources.read().clone();
        let mut breakers = Vec::new();
        let mut limiters = Vec::new();
        for source in sources {
            match source.report() {
                Report::CircuitBreaker(mut report) if self.include_breakers => {
                    let rows = bound_keys(report.scope, &report.keys, self.max_label_keys);
                    let mut states = [0u64; 3];
                    for key in &report.keys {
                        states[state_index(key.state)] += 1;
                    }
                    report.keys = Vec::new();
                    breakers.push(BoundedBreaker {
                        report,
                        rows,
                        states,
                    });
                }
                Report::RateLimit(mut report) if self.include_limiters => {
                    let rows = bound_keys(report.scope, &report.keys, self.max_label_keys);
                    report.keys = Vec::new();
                    limiters.push(BoundedLimiter { report, rows });
                }
                _ => {}
            }
        }
        Gathered {
            requests: self.requests.snapshot(),
            breakers,
            limiters,
        }
    }
}

/// Index of a state in `[closed, open, half_open]` arrays.
pub(crate) fn state_index(state: CircuitState) -> usize {
    match state {
        CircuitState::Closed => 0,
        CircuitState::Open => 1,
        CircuitState::HalfOpen => 2,
    }
}

fn registry_json(stats: &RegistryStats) -> Value {
    json!({ "keys": stats.keys, "evicted": stats.evicted, "overflowed": stats.overflowed })
}

fn store_json(store: &StoreReport) -> Value {
    json!({
        "kind": store.kind,
        "mode": store.mode,
        "degraded_decisions": store.degraded_decisions,
        "latency_seconds": store.latency.as_ref().map(HistogramSnapshot::to_json),
    })
}

impl Gathered {
    /// The aggregated JSON snapshot served at `<endpoint>.json`.
    pub(crate) fn to_json(&self) -> Value {
        let mut states = [0u64; 3];
        let mut breaker_totals = [0u64; 4];
        let breakers: Vec<Value> = self
            .breakers
            .iter()
            .map(|b| {
                let r = &b.report;
                for (total, count) in states.iter_mut().zip(b.states) {
                    *total += count;
                }
                breaker_totals[0] += r.total_requests;
                breaker_totals[1] += r.successful_requests;
                breaker_totals[2] += r.failed_requests;
                breaker_totals[3] += r.rejected_requests;
                json!({
                    "name": r.name,
                    "scope": r.scope,
                    "total_requests": r.total_requests,
                    "successful": r.successful_requests,
                    "failed": r.failed_requests,
                    "rejected": r.rejected_requests,
                    "transitions": r.state_transitions,
                    "registry": registry_json(&r.registry),
                    "store": store_json(&r.store),
                    "keys": b.rows.iter().map(|k| json!({
                        "key": k.key,
                        "state": k.state.label(),
                        "failures": k.failures,
                        "rejections": k.rejections,
                        "successes": k.successes,
                        "transitions": k.transitions,
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        let mut limiter_totals = [0u64; 4];
        let limiters: Vec<Value> = self
            .limiters
            .iter()
            .map(|l| {
                let r = &l.report;
                limiter_totals[0] += r.total_requests;
                limiter_totals[1] += r.allowed_requests;
                limiter_totals[2] += r.rejected_requests;
                limiter_totals[3] += r.waited_requests;
                json!({
                    "name": r.name,
                    "scope": r.scope,
                    "total": r.total_requests,
                    "allowed": r.allowed_requests,
                    "rejected": r.rejected_requests,
                    "waited": r.waited_requests,
                    "wait_time_seconds": r.wait_histogram.to_json(),
                    "registry": registry_json(&r.registry),
                    "store": store_json(&r.store),
                    "keys": l.rows.iter().map(|k| json!({
                        "key": k.key.as_str(),
                        "used": k.used,
                        "limit": k.limit,
                        "usage": k.usage(),
                        "allowed": k.allowed,
                        "rejected": k.rejected,
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        let requests: Vec<Value> = self
            .requests
            .iter()
            .map(|m| {
                json!({
                    "method": m.method,
                    "requests": m.requests,
                    "errors": m.errors,
                    "duration_seconds": m.duration.to_json(),
                })
            })
            .collect();
        json!({
            "requests": requests,
            "circuit_breakers": breakers,
            "rate_limits": limiters,
            "totals": {
                "circuit_breakers": {
                    "total_requests": breaker_totals[0],
                    "successful": breaker_totals[1],
                    "failed": breaker_totals[2],
                    "rejected": breaker_totals[3],
                    "keys_closed": states[0],
                    "keys_open": states[1],
                    "keys_half_open": states[2],
                },
                "rate_limits": {
                    "total": limiter_totals[0],
                    "allowed": limiter_totals[1],
                    "rejected": limiter_totals[2],
                    "waited": limiter_totals[3],
                },
            },
        })
    }
}
