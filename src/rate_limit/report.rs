//! The limiter as a [`ReportSource`] of the unified metrics.
//!
//! ```
//! use pmcp_resilience::observe::{Report, ReportSource};
//! use pmcp_resilience::rate_limit::RateLimitMiddleware;
//! use std::time::Duration;
//!
//! let rl = RateLimitMiddleware::new(10, 10, Duration::from_secs(1));
//! match rl.report() {
//!     Report::RateLimit(r) => assert_eq!((r.name.as_str(), r.scope), ("rate_limit", "global")),
//!     other => panic!("a limiter reports as a limiter, got {other:?}"),
//! }
//! // With the feature `prometheus` (on by default), the metrics export it.
//! #[cfg(feature = "prometheus")]
//! {
//!     use pmcp_resilience::observe::MetricsMiddleware;
//!     let metrics = MetricsMiddleware::builder()
//!         .source(std::sync::Arc::new(rl.clone()))
//!         .build()
//!         .expect("valid settings");
//!     assert!(metrics.render().contains("mcp_rate_limit_requests_total"));
//! }
//! ```

use super::limiter::KeyUsage;
use super::metrics::RateLimitSnapshot;
use super::middleware::RateLimitMiddleware;
use crate::observe::{LimiterKeyReport, LimiterReport, Report, ReportSource};

/// The name a limiter reports under when its builder was given no
/// [`name`](super::RateLimitBuilder::name) (and it is not wrapped in a
/// [`NamedSource`](crate::observe::NamedSource)).
pub const DEFAULT_REPORT_NAME: &str = "rate_limit";

impl RateLimitMiddleware {
    /// The limiter's state as the unified metrics see it, under `name`.
    ///
    /// Key labels are the API's own key text (`method:tools/call`), so a
    /// label reads as `state_of` and `retry_after` take it; session and
    /// custom keys are exported hashed (`observe::cardinality::hashed_key`).
    /// The wait histogram holds the requests that waited for capacity and
    /// were then admitted.
    pub fn report_named(&self, name: impl Into<String>) -> LimiterReport {
        let mut report = limiter_report(name.into(), self.snapshot());
        report.store = self.store_report();
        report
    }
}

fn limiter_report(name: String, snapshot: RateLimitSnapshot) -> LimiterReport {
    let scope = snapshot.scope;
    let mut report = LimiterReport::new(name, scope);
    report.keys = snapshot.keys.iter().map(key_report).collect();
    report.total = snapshot.total_requests;
    report.allowed = snapshot.allowed_requests;
    report.rejected = snapshot.rejected_requests;
    report.waited = snapshot.waited_requests;
    report.wait_time = snapshot.wait_histogram;
    report.registry = snapshot.registry;
    report
}

fn key_report(row: &KeyUsage) -> LimiterKeyReport {
    LimiterKeyReport::new(row.key.as_str(), u64::from(row.used), u64::from(row.limit))
        .with_counts(row.allowed, row.rejected)
}

impl ReportSource for RateLimitMiddleware {
    fn report(&self) -> Report {
        Report::RateLimit(self.report_named(self.report_name()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Timestamp;
    use crate::metrics::DurationHistogram;
    use crate::registry::RegistryStats;
    use crate::scope::ScopeKey;
    use std::time::Duration;

    #[test]
    fn snapshot_rows_become_key_reports_in_the_api_key_text() {
        let waits = DurationHistogram::new();
        waits.record(Duration::from_millis(20));
        let snapshot = RateLimitSnapshot {
            scope: "session",
            total_requests: 9,
            allowed_requests: 6,
            rejected_requests: 3,
            waited_requests: 1,
            wait_time_ms: 20,
            wait_histogram: waits.snapshot(),
            keys: vec![KeyUsage {
                key: ScopeKey::new("session:abc"),
                used: 3,
                limit: 4,
                reset_at: Timestamp::from_nanos(0),
                allowed: 6,
                rejected: 3,
            }],
            registry: RegistryStats {
                keys: 1,
                evicted: 0,
                overflowed: 5,
            },
        };
        let r = limiter_report("rl".into(), snapshot);
        assert_eq!((r.name.as_str(), r.scope), ("rl", "session"));
        assert_eq!((r.total, r.allowed, r.rejected, r.waited), (9, 6, 3, 1));
        assert_eq!(r.wait_time.count, 1);
        assert_eq!(r.wait_time.cumulative_count_le(0.025), 1);
        assert_eq!(r.registry.overflowed, 5);
        assert_eq!(
            r.keys,
            vec![LimiterKeyReport::new("session:abc", 3, 4).with_counts(6, 3)]
        );
        assert!((r.keys[0].usage() - 0.75).abs() < 1e-12);
    }
}
