//! The breaker as a [`ReportSource`] of the unified metrics.
//!
//! ```
//! use std::time::Duration;
//! use pmcp_resilience::circuit_breaker::CircuitBreakerMiddleware;
//! use pmcp_resilience::observe::{Report, ReportSource};
//!
//! let cb = CircuitBreakerMiddleware::new(5, Duration::from_secs(60), Duration::from_secs(30));
//! match cb.report() {
//!     Report::CircuitBreaker(r) => {
//!         assert_eq!((r.name.as_str(), r.scope), ("circuit_breaker", "global"));
//!     }
//!     other => panic!("a breaker reports as a breaker, got {other:?}"),
//! }
//! // With the feature `prometheus` (on by default), the metrics export it.
//! #[cfg(feature = "prometheus")]
//! {
//!     use pmcp_resilience::observe::MetricsMiddleware;
//!     let metrics = MetricsMiddleware::builder()
//!         .source(std::sync::Arc::new(cb.clone()))
//!         .build()
//!         .expect("valid settings");
//!     assert!(metrics.render().contains("mcp_circuit_breaker_keys"));
//! }
//! ```

use super::metrics::{KeySnapshot, MetricsSnapshot};
use super::middleware::CircuitBreakerMiddleware;
use super::state::CircuitState;
use crate::observe::{BreakerKeyReport, BreakerReport, BreakerStateReport, Report, ReportSource};

/// The name a breaker reports under when its builder was given no
/// [`name`](super::CircuitBreakerBuilder::name) (and it is not wrapped in a
/// [`NamedSource`](crate::observe::NamedSource)).
pub const DEFAULT_REPORT_NAME: &str = "circuit_breaker";

impl From<CircuitState> for BreakerStateReport {
    fn from(state: CircuitState) -> Self {
        match state {
            CircuitState::Closed => BreakerStateReport::Closed,
            CircuitState::Open => BreakerStateReport::Open,
            CircuitState::HalfOpen => BreakerStateReport::HalfOpen,
        }
    }
}

impl CircuitBreakerMiddleware {
    /// The breaker's state as the unified metrics see it, under `name`.
    ///
    /// Key labels are the API's own key text (`method:tools/call`), so a
    /// label reads as `state_of` and `retry_after` take it; session and
    /// custom keys are exported hashed (`observe::cardinality::hashed_key`).
    pub fn report_named(&self, name: impl Into<String>) -> BreakerReport {
        let mut report = breaker_report(name.into(), self.snapshot());
        report.store = self.store_report();
        report
    }
}

fn breaker_report(name: String, snapshot: MetricsSnapshot) -> BreakerReport {
    let MetricsSnapshot {
        scope,
        total_requests,
        successful_requests,
        failed_requests,
        rejected_requests,
        neutral_requests,
        timed_out_requests,
        untracked_requests,
        in_flight,
        state_transitions,
        keys,
        registry,
    } = snapshot;
    let mut report = BreakerReport::new(name, scope);
    report.keys = keys.into_iter().map(key_report).collect();
    report.total_requests = total_requests;
    report.successful = successful_requests;
    report.failed = failed_requests;
    report.rejected = rejected_requests;
    report.neutral = neutral_requests;
    report.timed_out = timed_out_requests;
    report.untracked = untracked_requests;
    report.in_flight = in_flight;
    report.transitions = state_transitions;
    report.registry = registry;
    report
}

fn key_report(row: KeySnapshot) -> BreakerKeyReport {
    BreakerKeyReport::new(&row.key, row.state.into()).with_counts(
        row.failures,
        row.rejections,
        row.successes,
        row.transitions,
    )
}

impl ReportSource for CircuitBreakerMiddleware {
    fn report(&self) -> Report {
        Report::CircuitBreaker(self.report_named(self.report_name()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::RegistryStats;

    #[test]
    fn snapshot_rows_become_key_reports_in_the_api_key_text() {
        let snapshot = MetricsSnapshot {
            scope: "method",
            total_requests: 10,
            successful_requests: 4,
            failed_requests: 3,
            rejected_requests: 3,
            neutral_requests: 0,
            timed_out_requests: 0,
            untracked_requests: 0,
            in_flight: 0,
            state_transitions: 1,
            keys: vec![KeySnapshot {
                key: "method:tools/call".into(),
                state: CircuitState::Open,
                successes: 4,
                failures: 3,
                rejections: 3,
                transitions: 1,
            }],
            registry: RegistryStats {
                keys: 1,
                evicted: 2,
                overflowed: 0,
            },
        };
        let r = breaker_report("b".into(), snapshot);
        assert_eq!((r.name.as_str(), r.scope), ("b", "method"));
        assert_eq!(
            (
                r.total_requests,
                r.successful,
                r.failed,
                r.rejected,
                r.transitions
            ),
            (10, 4, 3, 3, 1)
        );
        assert_eq!(r.registry.evicted, 2);
        assert_eq!(
            r.keys,
            vec![
                BreakerKeyReport::new("method:tools/call", BreakerStateReport::Open)
                    .with_counts(3, 3, 4, 1)
            ]
        );
    }
}
