//! The numbers that drive a breaker's state machine: thresholds, the
//! outcome window, the open time and its backoff.
//!
//! ```
//! use pmcp_resilience::circuit_breaker::{BreakerPolicy, OpenBackoff};
//! use std::time::Duration;
//!
//! let policy = BreakerPolicy {
//!     timeout: Duration::from_secs(10),
//!     open_backoff: Some(OpenBackoff { multiplier: 2.0, max: Duration::from_secs(60), jitter: 0.0 }),
//!     ..BreakerPolicy::default()
//! };
//! // The third trip in a row stays open 10 s x 2 x 2.
//! assert_eq!(policy.open_duration(3, 0.5), Duration::from_secs(40));
//! ```

use std::time::Duration;

use crate::clock::duration_nanos;

/// The window over which failure and slow-call rates are computed.
///
/// ```
/// use pmcp_resilience::circuit_breaker::{CircuitBreakerMiddleware, SlidingWindow};
/// use std::time::Duration;
///
/// // Judge the failure rate over the calls of the last minute.
/// let cb = CircuitBreakerMiddleware::builder()
///     .sliding_window(SlidingWindow::Time(Duration::from_secs(60)))
///     .failure_rate(0.5, 20)
///     .build()
///     .expect("valid settings");
/// assert_eq!(cb.policy().window, SlidingWindow::Time(Duration::from_secs(60)));
/// assert_eq!(SlidingWindow::default(), SlidingWindow::Calls(100));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SlidingWindow {
    /// About the last `n` calls (kept in 8 buckets, so the
    /// oldest bucket's worth of calls leaves at once).
    Calls(u32),
    /// The calls of the last `duration` (with a resolution of
    /// `duration / 8`).
    Time(Duration),
}

impl Default for SlidingWindow {
    fn default() -> Self {
        SlidingWindow::Calls(100)
    }
}

/// Trip on the share of failed calls in the window.
///
/// ```
/// use pmcp_resilience::circuit_breaker::{CircuitBreakerMiddleware, FailureRate};
///
/// // Open when half of the last 100 calls failed, once 20 calls were seen.
/// let cb = CircuitBreakerMiddleware::builder().failure_rate(0.5, 20).build().expect("valid");
/// assert_eq!(cb.policy().failure_rate, Some(FailureRate { threshold: 0.5, minimum_calls: 20 }));
/// // A rate outside (0, 1] is a configuration error.
/// assert!(CircuitBreakerMiddleware::builder().failure_rate(1.5, 20).build().is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FailureRate {
    /// Open when failures / calls reaches this, in (0, 1].
    pub threshold: f64,
    /// Judge only once the window holds at least this many calls.
    pub minimum_calls: u32,
}

/// Trip on the share of slow calls in the window.
///
/// ```
/// use pmcp_resilience::circuit_breaker::{CircuitBreakerMiddleware, SlowCalls};
/// use std::time::Duration;
///
/// // Open when 80% of the calls in the window took 2 s or more, once 10 were seen.
/// let cb = CircuitBreakerMiddleware::builder()
///     .slow_calls(Duration::from_secs(2), 0.8, 10)
///     .build()
///     .expect("valid settings");
/// let rule = cb.policy().slow_calls.expect("set");
/// assert_eq!(rule, SlowCalls { duration: Duration::from_secs(2), threshold: 0.8, minimum_calls: 10 });
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SlowCalls {
    /// A call taking at least this long is slow.
    pub duration: Duration,
    /// Open when slow calls / calls reaches this, in (0, 1].
    pub threshold: f64,
    /// Judge only once the window holds at least this many calls.
    pub minimum_calls: u32,
}

/// A growing open time: `timeout * multiplier^(trips - 1)`, capped, with jitter.
///
/// ```
/// use pmcp_resilience::circuit_breaker::{CircuitBreakerMiddleware, OpenBackoff};
/// use std::time::Duration;
///
/// // Stay open 10 s, then 20 s, 40 s, ... up to 5 minutes, spread by ±10%.
/// let cb = CircuitBreakerMiddleware::builder()
///     .timeout(Duration::from_secs(10))
///     .open_backoff(2.0, Duration::from_secs(300), 0.1)
///     .build()
///     .expect("valid settings");
/// let policy = cb.policy();
/// assert_eq!(policy.open_backoff.map(|b: OpenBackoff| b.max), Some(Duration::from_secs(300)));
/// // `unit` 0.5 draws no jitter: the second trip stays open 20 s.
/// assert_eq!(policy.open_duration(2, 0.5), Duration::from_secs(20));
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OpenBackoff {
    /// Growth per consecutive trip (at least 1).
    pub multiplier: f64,
    /// The longest open time.
    pub max: Duration,
    /// Relative jitter in [0, 1): the open time is spread over
    /// `base * (1 ± jitter)`, and never exceeds `max`.
    pub jitter: f64,
}

/// The numbers that drive the state machine. Built and validated by the
/// middleware's builder; changing them keeps every key's counts.
///
/// ```
/// use pmcp_resilience::circuit_breaker::BreakerPolicy;
/// use pmcp_resilience::CircuitBreakerMiddleware;
/// use std::time::Duration;
///
/// let cb = CircuitBreakerMiddleware::builder().failure_threshold(3).build().expect("valid");
/// assert_eq!(cb.policy().consecutive_failures, 3);
/// // At run time: stay open a minute from now on, keeping every key's counts.
/// cb.reconfigure(BreakerPolicy { timeout: Duration::from_secs(60), ..cb.policy() })
///     .expect("valid");
/// assert!(cb.reconfigure(BreakerPolicy { consecutive_failures: 0, ..cb.policy() }).is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BreakerPolicy {
    /// Open after this many consecutive failures (0: never on this rule).
    pub consecutive_failures: u32,
    /// Open after this many failures inside the window (pmcp's rule; `None`: off).
    pub failures_in_window: Option<u32>,
    /// Consecutive probe successes that close a half-open breaker.
    pub success_threshold: u32,
    /// How long the breaker stays open (the first time, with backoff).
    pub timeout: Duration,
    /// The outcome window used by the rate rules and `failures_in_window`.
    pub window: SlidingWindow,
    /// Optional failure-rate rule.
    pub failure_rate: Option<FailureRate>,
    /// Optional slow-call rule.
    pub slow_calls: Option<SlowCalls>,
    /// Probes admitted at once in half-open.
    pub half_open_max_probes: u32,
    /// A probe without an answer after this long counts as a failure.
    pub probe_deadline: Duration,
    /// Optional growing open time.
    pub open_backoff: Option<OpenBackoff>,
}

impl Default for BreakerPolicy {
    fn default() -> Self {
        BreakerPolicy {
            consecutive_failures: 5,
            failures_in_window: None,
            success_threshold: 1,
            timeout: Duration::from_secs(30),
            window: SlidingWindow::default(),
            failure_rate: None,
            slow_calls: None,
            half_open_max_probes: 1,
            probe_deadline: Duration::from_secs(30),
            open_backoff: None,
        }
    }
}

impl BreakerPolicy {
    /// Whether any rule reads the outcome window. Without one the window is
    /// not kept (a rule added later by reconfiguration starts it empty).
    pub(crate) fn uses_window(&self) -> bool {
        self.failures_in_window.is_some()
            || self.failure_rate.is_some()
            || self.slow_calls.is_some()
    }

    /// A number identifying the window's shape; counts kept under another
    /// shape are dropped rather than misread.
    pub(crate) fn window_shape(&self) -> u64 {
        match self.window {
            SlidingWindow::Calls(n) => u64::from(n) << 1,
            SlidingWindow::Time(d) => (duration_nanos(d) << 1) | 1,
        }
    }

    /// The open time after the `trips`-th consecutive trip, `unit` in [0, 1)
    /// drawing the jitter.
    pub fn open_duration(&self, trips: u32, unit: f64) -> Duration {
        let Some(backoff) = self.open_backoff else {
            return self.timeout;
        };
        let exponent = trips.saturating_sub(1).min(64) as i32;
        let base = self.timeout.as_secs_f64() * backoff.multiplier.max(1.0).powi(exponent);
        let max = backoff.max.as_secs_f64();
        let base = base.min(max);
        let spread = backoff.jitter.clamp(0.0, 1.0) * (2.0 * unit.clamp(0.0, 1.0) - 1.0);
        let secs = (base * (1.0 + spread)).clamp(0.0, max);
        Duration::try_from_secs_f64(secs).unwrap_or(backoff.max)
    }
}
