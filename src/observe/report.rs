//! The neutral report that breakers and limiters hand to the metrics.
//!
//! A breaker or limiter implements [`ReportSource`]; the metrics pull a
//! [`Report`] from every registered source when Prometheus scrapes, when the
//! JSON snapshot is asked for and at every export tick. Sources never see the
//! metrics types, and the metrics never see the sources' types.

use crate::metrics::{HistogramSnapshot, StoreReport};
use crate::registry::RegistryStats;

/// Something that can describe its current state: a circuit breaker, a rate
/// limiter, or your own component.
///
/// `report` is called on every scrape, so it should be a read of counters
/// and per-key state, not I/O. Any `Fn() -> Report` closure is a source too.
pub trait ReportSource: Send + Sync {
    /// The state now.
    fn report(&self) -> Report;
}

impl<F> ReportSource for F
where
    F: Fn() -> Report + Send + Sync,
{
    fn report(&self) -> Report {
        self()
    }
}

/// The state of one breaker or one limiter (with all its keys).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Report {
    /// A circuit breaker.
    CircuitBreaker(BreakerReport),
    /// A rate limiter.
    RateLimit(LimiterReport),
}

impl From<BreakerReport> for Report {
    fn from(report: BreakerReport) -> Self {
        Report::CircuitBreaker(report)
    }
}

impl From<LimiterReport> for Report {
    fn from(report: LimiterReport) -> Self {
        Report::RateLimit(report)
    }
}

/// The label value of each scope, as breakers and limiters report it.
pub mod scope_label {
    /// One state for everything.
    pub const GLOBAL: &str = "global";
    /// One state per upstream server.
    pub const SERVER: &str = "server";
    /// One state per JSON-RPC method.
    pub const METHOD: &str = "method";
    /// One state per endpoint (URL).
    pub const ENDPOINT: &str = "endpoint";
    /// One state per session: unbounded keys, exported hashed.
    pub const SESSION: &str = "session";
    /// One state per tool.
    pub const TOOL: &str = "tool";
    /// Keys from a user function: unbounded keys, exported hashed.
    pub const CUSTOM: &str = "custom";
}

/// The state of a circuit breaker for one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum BreakerStateReport {
    /// Requests flow.
    Closed,
    /// Probing whether the upstream recovered.
    HalfOpen,
    /// Requests are rejected.
    Open,
}

impl BreakerStateReport {
    /// All states, in the order of the one-hot gauge.
    pub const ALL: [BreakerStateReport; 3] = [
        BreakerStateReport::Closed,
        BreakerStateReport::Open,
        BreakerStateReport::HalfOpen,
    ];

    /// The value of `mcp_circuit_breaker_state`: 0 closed, 1 open, 2 half-open.
    pub fn gauge_value(self) -> f64 {
        match self {
            BreakerStateReport::Closed => 0.0,
            BreakerStateReport::Open => 1.0,
            BreakerStateReport::HalfOpen => 2.0,
        }
    }

    /// The `state` label value: `closed`, `open` or `half_open`.
    pub fn label(self) -> &'static str {
        match self {
            BreakerStateReport::Closed => "closed",
            BreakerStateReport::Open => "open",
            BreakerStateReport::HalfOpen => "half_open",
        }
    }
}

/// One key of a circuit breaker.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct BreakerKeyReport {
    /// The scope key (a server, a method, a session id...).
    pub key: String,
    /// Its state now.
    pub state: BreakerStateReport,
    /// Calls counted as failures.
    pub failures: u64,
    /// Calls rejected because the breaker was open (or its half-open probes were taken).
    pub rejections: u64,
    /// Calls that succeeded.
    pub successes: u64,
    /// State changes.
    pub transitions: u64,
}

impl BreakerKeyReport {
    /// A key in `state` with all counters at zero.
    pub fn new(key: impl Into<String>, state: BreakerStateReport) -> Self {
        BreakerKeyReport {
            key: key.into(),
            state,
            failures: 0,
            rejections: 0,
            successes: 0,
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

    #[cfg_attr(not(feature = "prometheus"), allow(dead_code))]
    pub(crate) fn traffic(&self) -> u64 {
        self.failures
            .saturating_add(self.rejections)
            .saturating_add(self.successes)
    }
}

/// The state of a circuit breaker: totals and every key it holds.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct BreakerReport {
    /// The breaker's name, chosen by its user (a bounded, human-chosen label).
    pub name: String,
    /// The scope label: one of [`scope_label`].
    pub scope: &'static str,
    /// The keys held now.
    pub keys: Vec<BreakerKeyReport>,
    /// Calls seen since start, over all keys (evicted ones included).
    pub total_requests: u64,
    /// Calls that succeeded.
    pub successful: u64,
    /// Calls counted as failures.
    pub failed: u64,
    /// Calls rejected.
    pub rejected: u64,
    /// Calls that ended neutral (the caller's mistakes, sibling refusals,
    /// callers that went away): neither successes nor failures.
    pub neutral: u64,
    /// Calls that got no answer within the call deadline (also in `failed`).
    pub timed_out: u64,
    /// Calls admitted without being followed (breaker disabled for the key,
    /// key registry or call table full).
    pub untracked: u64,
    /// Calls admitted and not yet ended.
    pub in_flight: u64,
    /// State changes over all keys.
    pub transitions: u64,
    /// The key registry's size, evictions and overflows.
    pub registry: RegistryStats,
    /// The state store.
    pub store: StoreReport,
}

impl BreakerReport {
    /// An empty report for the breaker `name` of `scope`, in memory.
    pub fn new(name: impl Into<String>, scope: &'static str) -> Self {
        BreakerReport {
            name: name.into(),
            scope,
            keys: Vec::new(),
            total_requests: 0,
            successful: 0,
            failed: 0,
            rejected: 0,
            neutral: 0,
            timed_out: 0,
            untracked: 0,
            in_flight: 0,
            transitions: 0,
            registry: RegistryStats::default(),
            store: StoreReport::memory(),
        }
    }
}

/// One key of a rate limiter.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct LimiterKeyReport {
    /// The scope key.
    pub key: String,
    /// Capacity used now (tokens taken, requests in the window...).
    pub used: u64,
    /// Capacity of the key.
    pub limit: u64,
    /// Requests allowed.
    pub allowed: u64,
    /// Requests rejected.
    pub rejected: u64,
}

impl LimiterKeyReport {
    /// A key using `used` of `limit`, with zero counters.
    pub fn new(key: impl Into<String>, used: u64, limit: u64) -> Self {
        LimiterKeyReport {
            key: key.into(),
            used,
            limit,
            allowed: 0,
            rejected: 0,
        }
    }

    /// Sets the counters: allowed, rejected.
    pub fn with_counts(mut self, allowed: u64, rejected: u64) -> Self {
        self.allowed = allowed;
        self.rejected = rejected;
        self
    }

    /// `used / limit`, clamped to `0.0..=1.0` (a zero limit counts as full).
    pub fn usage(&self) -> f64 {
        if self.limit == 0 {
            return if self.used == 0 { 0.0 } else { 1.0 };
        }
        (self.used as f64 / self.limit as f64).clamp(0.0, 1.0)
    }

    #[cfg_attr(not(feature = "prometheus"), allow(dead_code))]
    pub(crate) fn traffic(&self) -> u64 {
        self.allowed.saturating_add(self.rejected)
    }
}

/// The state of a rate limiter: totals and every key it holds.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct LimiterReport {
    /// The limiter's name, chosen by its user.
    pub name: String,
    /// The scope label: one of [`scope_label`].
    pub scope: &'static str,
    /// The keys held now.
    pub keys: Vec<LimiterKeyReport>,
    /// Requests seen since start.
    pub total: u64,
    /// Requests allowed (after waiting or not).
    pub allowed: u64,
    /// Requests rejected.
    pub rejected: u64,
    /// Requests that waited for capacity.
    pub waited: u64,
    /// How long those requests waited.
    pub wait_time: HistogramSnapshot,
    /// The key registry's size, evictions and overflows.
    pub registry: RegistryStats,
    /// The state store.
    pub store: StoreReport,
}

impl LimiterReport {
    /// An empty report for the limiter `name` of `scope`, in memory.
    pub fn new(name: impl Into<String>, scope: &'static str) -> Self {
        LimiterReport {
            name: name.into(),
            scope,
            keys: Vec::new(),
            total: 0,
            allowed: 0,
            rejected: 0,
            waited: 0,
            wait_time: HistogramSnapshot::default(),
            registry: RegistryStats::default(),
            store: StoreReport::memory(),
        }
    }
}

impl Report {
    /// The name of the breaker or limiter reported on.
    pub fn name(&self) -> &str {
        match self {
            Report::CircuitBreaker(r) => &r.name,
            Report::RateLimit(r) => &r.name,
        }
    }

    /// Renames the breaker or limiter reported on.
    pub fn set_name(&mut self, name: impl Into<String>) {
        match self {
            Report::CircuitBreaker(r) => r.name = name.into(),
            Report::RateLimit(r) => r.name = name.into(),
        }
    }
}

/// A [`ReportSource`] under a name of your choosing: the `name` label of its
/// metrics and its name in the JSON snapshot.
///
/// Breakers and limiters of this crate report under the name given to
/// their builder's `name(..)` (`circuit_breaker` and `rate_limit` by
/// default); this wrapper names any other source, or a handle under a
/// second name.
///
/// ```
/// use pmcp_resilience::circuit_breaker::CircuitBreakerMiddleware;
/// use pmcp_resilience::observe::{NamedSource, ReportSource};
/// use std::time::Duration;
///
/// let cb = CircuitBreakerMiddleware::new(5, Duration::from_secs(60), Duration::from_secs(30));
/// let named = NamedSource::new("upstream", cb.clone());
/// assert_eq!(named.report().name(), "upstream");
/// // With the feature `prometheus` (on by default), the metrics export it.
/// #[cfg(feature = "prometheus")]
/// {
///     use pmcp_resilience::observe::MetricsMiddleware;
///     let metrics = MetricsMiddleware::builder()
///         .source(std::sync::Arc::new(named))
///         .build()
///         .expect("valid settings");
///     assert_eq!(metrics.snapshot_json()["circuit_breakers"][0]["name"], "upstream");
/// }
/// ```
pub struct NamedSource<S> {
    name: String,
    source: S,
}

impl<S: ReportSource> NamedSource<S> {
    /// `source`, reported as `name`.
    pub fn new(name: impl Into<String>, source: S) -> Self {
        NamedSource {
            name: name.into(),
            source,
        }
    }
}

impl<S> std::fmt::Debug for NamedSource<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NamedSource")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl<S: ReportSource> ReportSource for NamedSource<S> {
    fn report(&self) -> Report {
        let mut report = self.source.report();
        report.set_name(self.name.as_str());
        report
    }
}
