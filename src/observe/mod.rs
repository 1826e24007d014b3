//! One place where an operator sees every breaker and limiter: request
//! metrics, Prometheus export and an aggregated JSON snapshot.
//!
//! Breakers and limiters describe themselves through [`ReportSource`]: their
//! report is their `metrics()` snapshot. `MetricsMiddleware` (feature
//! `prometheus`, on by default) pulls those [`Report`]s whenever Prometheus
//! scrapes, so values are current at scrape time. Installed in a pmcp client or server chain, the middleware also
//! counts requests, errors and durations per method, on the client side as
//! well. Without the feature, the reports are still there to read or to
//! feed a metrics system of your own.
//!
//! ```
//! # #[cfg(feature = "prometheus")]
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use std::time::Duration;
//! use pmcp_resilience::circuit_breaker::{CircuitBreakerMetrics, CircuitState, KeySnapshot};
//! use pmcp_resilience::observe::{MetricsExporter, MetricsMiddleware, Report};
//!
//! // A stand-in for a circuit breaker of this crate.
//! let breaker = Arc::new(|| {
//!     let mut report = CircuitBreakerMetrics::new("upstream", "server");
//!     report.keys.push(
//!         KeySnapshot::new("https://api.example.com", CircuitState::Open)
//!             .with_counts(42, 15, 100, 1),
//!     );
//!     Report::CircuitBreaker(report)
//! });
//!
//! let metrics = MetricsMiddleware::builder()
//!     .export_interval(Duration::from_secs(60))
//!     .exporter(MetricsExporter::Prometheus { endpoint: "/metrics".into() })
//!     .include_circuit_breaker_stats(true)
//!     .include_rate_limit_stats(true)
//!     .source(breaker)
//!     .build()?;
//!
//! // Install it in a pmcp client: `ClientBuilder::new(transport)
//! //     .with_middleware(Arc::new(metrics.clone()))`, then serve it with
//! // `metrics.serve("127.0.0.1:9464".parse()?).await?` or render it yourself:
//! let text = metrics.render();
//! assert!(text.contains(
//!     r#"mcp_circuit_breaker_state{name="upstream",scope="server",key="https://api.example.com"} 1"#
//! ));
//! assert!(text.contains(
//!     r#"mcp_circuit_breaker_failures_total{name="upstream",scope="server",key="https://api.example.com"} 42"#
//! ));
//! assert_eq!(metrics.snapshot_json()["totals"]["circuit_breakers"]["keys_open"], 1);
//! # Ok(())
//! # }
//! # #[cfg(not(feature = "prometheus"))]
//! # fn main() {}
//! ```
//!
//! # Metrics
//!
//! | name | type | labels |
//! |---|---|---|
//! | `mcp_requests_total` | counter | `method` |
//! | `mcp_request_errors_total` | counter | `method`, `code` |
//! | `mcp_request_duration_seconds` | histogram | `method` |
//! | `mcp_circuit_breaker_state` (0 closed, 1 open, 2 half-open) | gauge | `name`, `scope`, `key` |
//! | `mcp_circuit_breaker_state_info` (one-hot) | gauge | `name`, `scope`, `key`, `state` |
//! | `mcp_circuit_breaker_failures_total` | counter | `name`, `scope`, `key` |
//! | `mcp_circuit_breaker_requests_rejected_total` | counter | `name`, `scope`, `key` |
//! | `mcp_circuit_breaker_successes_total` | counter | `name`, `scope`, `key` |
//! | `mcp_circuit_breaker_transitions_total` | counter | `name`, `scope`, `key` |
//! | `mcp_circuit_breaker_calls_total` | counter | `name`, `scope`, `outcome` |
//! | `mcp_circuit_breaker_keys` | gauge | `name`, `scope`, `state` |
//! | `mcp_rate_limit_requests_allowed_total` | counter | `name`, `scope`, `key` |
//! | `mcp_rate_limit_requests_rejected_total` | counter | `name`, `scope`, `key` |
//! | `mcp_rate_limit_current_usage` (0 to 1) | gauge | `name`, `scope`, `key` |
//! | `mcp_rate_limit_requests_total` | counter | `name`, `scope` |
//! | `mcp_rate_limit_waits_total` | counter | `name`, `scope` |
//! | `mcp_rate_limit_wait_seconds` | histogram | `name`, `scope` |
//! | `mcp_resilience_keys` | gauge | `component`, `name`, `scope` |
//! | `mcp_resilience_key_evictions_total` | counter | `component`, `name`, `scope` |
//! | `mcp_resilience_key_overflows_total` | counter | `component`, `name`, `scope` |
//! | `mcp_resilience_store_mode` | gauge | `kind`, `mode` |
//! | `mcp_resilience_store_latency_seconds` | histogram | `kind` |
//!
//! Label values stay bounded: `key` follows the rule of [`cardinality`]
//! (session and custom keys are hashed into 64 buckets, at most
//! `max_label_keys` keys per source, the rest under `__other__`), `method`
//! is a spec method, one of at most `max_methods` others, or `other`, and
//! `code` takes at most 16 values per method. `name` tells the middleware
//! instances apart: the name given with the builder's `name(..)` (or with
//! `NamedSource`), `circuit_breaker` and `rate_limit` by default. A name
//! already taken by an earlier breaker (or limiter) of the same
//! `MetricsMiddleware` becomes `<name>_2`, `<name>_3`, ... in registration
//! order, so two limiters on one key are always two series. `key` is the
//! API's own key text (`tool:search`), as `state_of` and `retry_after` take it.
//! `mcp_circuit_breaker_calls_total` counts every call once by `outcome`
//! (`successful`, `failed`, `rejected`, `neutral`, `untracked`; `timed_out`
//! is also counted in `failed`).
//!
//! `mcp_resilience_store_mode` counts the sources whose store of `kind` is
//! in `mode`: with one source it is 1 for the current mode and 0 for the
//! others.

pub mod cardinality;
#[cfg(feature = "prometheus")]
mod collector;
#[cfg(feature = "prometheus")]
mod endpoint;
#[cfg(feature = "prometheus")]
mod middleware;
pub(crate) mod report;
#[cfg(feature = "prometheus")]
mod requests;
#[cfg(feature = "prometheus")]
mod snapshot;
#[cfg(all(test, feature = "prometheus"))]
mod tests;
#[cfg(all(test, feature = "prometheus"))]
pub(crate) mod text_format;

#[cfg(feature = "prometheus")]
#[cfg_attr(docsrs, doc(cfg(feature = "prometheus")))]
pub use endpoint::MetricsServer;
// The vocabulary of reports, defined in `metrics` so that the breaker and the
// limiter need not depend on this module; re-exported here where readers look.
pub use crate::metrics::{
    BUCKET_BOUNDS_SECONDS, DurationHistogram, HistogramSnapshot, METHOD_METADATA_KEY, StoreReport,
};
#[cfg(feature = "prometheus")]
#[cfg_attr(docsrs, doc(cfg(feature = "prometheus")))]
pub use middleware::{
    ExportTask, INTERNAL_ERROR_CODE, MAX_EXPORT_INTERVAL, MetricsExporter, MetricsMiddleware,
    MetricsMiddlewareBuilder, UNKNOWN_METHOD,
};
#[allow(deprecated)]
pub use report::{
    BreakerKeyReport, BreakerReport, BreakerStateReport, LimiterKeyReport, LimiterReport,
};
pub use report::{NamedSource, Report, ReportSource, scope_label};
#[cfg(feature = "prometheus")]
#[cfg_attr(docsrs, doc(cfg(feature = "prometheus")))]
pub use requests::OTHER_METHOD;

/// A failure to start or run the metrics server or export task.
///
/// ```
/// use pmcp_resilience::observe::{MetricsError, MetricsMiddleware};
///
/// let metrics = MetricsMiddleware::builder().build().expect("valid settings");
/// // The export task runs on Tokio: outside a runtime, starting it says so.
/// let error = metrics.start_export().expect_err("no runtime here");
/// assert!(matches!(error, MetricsError::NoRuntime));
/// assert!(error.to_string().contains("Tokio runtime"));
/// ```
#[cfg(feature = "prometheus")]
#[cfg_attr(docsrs, doc(cfg(feature = "prometheus")))]
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MetricsError {
    /// No Tokio runtime to run the server or export task on.
    #[error("no Tokio runtime: call this from within a Tokio runtime")]
    NoRuntime,
    /// The address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: std::net::SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// An I/O error of the running server.
    #[error("metrics server I/O error: {0}")]
    Io(std::io::Error),
}
