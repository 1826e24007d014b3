//! What the metrics read: a [`Report`] from every registered
//! [`ReportSource`], pulled when Prometheus scrapes, when the JSON snapshot
//! is asked for and at every export tick.
//!
//! A report is the snapshot a breaker or limiter returns from `metrics()`
//! ([`CircuitBreakerMetrics`], [`RateLimitMetrics`]): the middlewares are
//! sources here, and never import this module.

use crate::circuit_breaker::{
    CircuitBreakerMetrics, CircuitBreakerMiddleware, CircuitState, KeySnapshot,
};
use crate::rate_limit::{KeyUsage, RateLimitMetrics, RateLimitMiddleware};

/// Something that can describe its current state: a circuit breaker, a rate
/// limiter, or your own component.
///
/// `report` is called on every scrape, so it should be a read of counters
/// and per-key state, not I/O. Any `Fn() -> Report` closure is a source too.
///
/// ```
/// use pmcp_resilience::observe::{Report, ReportSource};
/// use pmcp_resilience::rate_limit::{KeyUsage, RateLimitMetrics};
///
/// // A limiter of your own, reporting in the crate's words.
/// struct Quota;
///
/// impl ReportSource for Quota {
///     fn report(&self) -> Report {
///         let mut metrics = RateLimitMetrics::new("quota", "tool");
///         metrics.keys.push(KeyUsage::new("tool:search", 30, 100));
///         Report::RateLimit(metrics)
///     }
/// }
///
/// let report = Quota.report();
/// assert_eq!(report.name(), "quota");
/// // With feature `prometheus`: `MetricsMiddleware::builder().source(Arc::new(Quota))`.
/// ```
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
///
/// ```
/// use pmcp_resilience::observe::{Report, ReportSource};
/// use pmcp_resilience::{CircuitBreakerMiddleware, RateLimitMiddleware};
///
/// let cb = CircuitBreakerMiddleware::builder().name("upstream").build().expect("valid");
/// let rl = RateLimitMiddleware::builder().name("api").build().expect("valid");
/// for report in [cb.report(), rl.report()] {
///     match report {
///         Report::CircuitBreaker(m) => assert_eq!(m.name, "upstream"),
///         Report::RateLimit(m) => assert_eq!(m.name, "api"),
///         _ => unreachable!("only breakers and limiters here"),
///     }
/// }
/// ```
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Report {
    /// A circuit breaker.
    CircuitBreaker(CircuitBreakerMetrics),
    /// A rate limiter.
    RateLimit(RateLimitMetrics),
}

impl From<CircuitBreakerMetrics> for Report {
    fn from(report: CircuitBreakerMetrics) -> Self {
        Report::CircuitBreaker(report)
    }
}

impl From<RateLimitMetrics> for Report {
    fn from(report: RateLimitMetrics) -> Self {
        Report::RateLimit(report)
    }
}

/// A breaker reports its [`metrics`](CircuitBreakerMiddleware::metrics),
/// under the name given to its builder.
///
/// ```
/// use pmcp_resilience::circuit_breaker::CircuitBreakerMiddleware;
/// use pmcp_resilience::observe::{Report, ReportSource};
///
/// let cb = CircuitBreakerMiddleware::builder().build()?;
/// let Report::CircuitBreaker(r) = cb.report() else { panic!("a breaker reports as a breaker") };
/// assert_eq!((r.name.as_str(), r.scope), ("circuit_breaker", "global"));
/// # Ok::<(), pmcp_resilience::ConfigError>(())
/// ```
impl ReportSource for CircuitBreakerMiddleware {
    fn report(&self) -> Report {
        Report::CircuitBreaker(self.metrics())
    }
}

/// A limiter reports its [`metrics`](RateLimitMiddleware::metrics), under
/// the name given to its builder.
///
/// ```
/// use pmcp_resilience::observe::{Report, ReportSource};
/// use pmcp_resilience::rate_limit::RateLimitMiddleware;
///
/// let rl = RateLimitMiddleware::builder().build()?;
/// let Report::RateLimit(r) = rl.report() else { panic!("a limiter reports as a limiter") };
/// assert_eq!((r.name.as_str(), r.scope), ("rate_limit", "global"));
/// # Ok::<(), pmcp_resilience::ConfigError>(())
/// ```
impl ReportSource for RateLimitMiddleware {
    fn report(&self) -> Report {
        Report::RateLimit(self.metrics())
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

/// The breaker's snapshot under its former name in this module.
#[deprecated(note = "use `circuit_breaker::CircuitBreakerMetrics`, which `metrics()` returns")]
pub type BreakerReport = CircuitBreakerMetrics;

/// A breaker key's row under its former name in this module.
#[deprecated(note = "use `circuit_breaker::KeySnapshot`")]
pub type BreakerKeyReport = KeySnapshot;

/// A breaker key's state under its former name in this module.
#[deprecated(note = "use `CircuitState`")]
pub type BreakerStateReport = CircuitState;

/// The limiter's snapshot under its former name in this module.
#[deprecated(note = "use `RateLimitMetrics`, which `metrics()` returns")]
pub type LimiterReport = RateLimitMetrics;

/// A limiter key's row under its former name in this module.
#[deprecated(note = "use `rate_limit::KeyUsage`")]
pub type LimiterKeyReport = KeyUsage;

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
