//! The breaker's configuration, its builder ([`CircuitBreakerBuilder`], with
//! an example), and their validation.

use std::sync::Arc;
use std::time::Duration;

use super::matcher::ErrorMatcher;
use super::middleware::CircuitBreakerMiddleware;
use super::persist;
use super::policy::{BreakerPolicy, FailureRate, OpenBackoff, SlidingWindow, SlowCalls};
use super::state::CircuitBreakerState;
use crate::clock::{Clock, SharedClock, default_clock};
use crate::error::ConfigError;
use crate::metrics::MetricsConfig;
use crate::persistence::{FileStoreOptions, StatePersistence};
use crate::registry::RegistryLimits;
use crate::scope::{RequestTarget, Scope};

/// The call deadline unless set: pmcp has no request timeout of its own, so
/// without one a hanging server would never be counted.
pub(crate) const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Everything a circuit breaker is built from (the feature request's
/// `CircuitBreakerConfig`, plus the optional rules).
#[derive(Clone, Debug)]
#[non_exhaustive]
pub(crate) struct CircuitBreakerConfig {
    /// How requests are grouped into independent breakers.
    pub(crate) scope: Scope,
    /// Which outcomes count as failures.
    pub(crate) trigger_errors: ErrorMatcher,
    /// Which outcomes are neutral: neither a failure nor a success (default
    /// [`ErrorMatcher::CallerMistakes`]). A neutral match wins over a failure match.
    pub(crate) neutral_errors: ErrorMatcher,
    /// A call with no answer within this long ends as timed out (a failure).
    pub(crate) call_timeout: Duration,
    /// Where state lives (default [`StatePersistence::Memory`]).
    pub(crate) persistence: StatePersistence,
    /// What metrics are kept.
    pub(crate) metrics_config: MetricsConfig,
    /// The numbers of the state machine (thresholds, windows, timeouts).
    pub(crate) policy: BreakerPolicy,
    /// Bounds on the number of keys.
    pub(crate) registry_limits: RegistryLimits,
    /// Reject with a JSON-RPC error carrying `retryAfterMs` instead of
    /// `pmcp::Error::CircuitBreakerOpen`.
    pub(crate) signal_client: bool,
    /// Called on every change of a key's state (see
    /// [`CircuitBreakerBuilder::on_transition`]).
    pub(crate) on_transition: Option<TransitionHook>,
    /// The `name` label of this breaker's metrics and its name in the JSON
    /// snapshot (default `circuit_breaker`, see
    /// [`CircuitBreakerBuilder::name`]).
    pub(crate) name: String,
}

/// The function behind a [`TransitionHook`].
pub(crate) type TransitionFn =
    dyn Fn(&str, crate::circuit_breaker::state::Transition) + Send + Sync;

/// A function told of every state change of a breaker's keys.
#[derive(Clone)]
pub(crate) struct TransitionHook(pub(crate) Arc<TransitionFn>);

impl std::fmt::Debug for TransitionHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TransitionHook(..)")
    }
}

impl Default for CircuitBreakerConfig {
    fn default() -> Self {
        CircuitBreakerConfig {
            scope: Scope::Global,
            trigger_errors: ErrorMatcher::default(),
            neutral_errors: ErrorMatcher::CallerMistakes,
            call_timeout: DEFAULT_CALL_TIMEOUT,
            persistence: StatePersistence::Memory,
            metrics_config: MetricsConfig::default(),
            policy: BreakerPolicy::default(),
            registry_limits: RegistryLimits::default(),
            signal_client: false,
            on_transition: None,
            name: super::metrics::DEFAULT_REPORT_NAME.to_owned(),
        }
    }
}

fn check_rate(field: &'static str, rate: f64) -> Result<(), ConfigError> {
    if rate.is_nan() || rate <= 0.0 || rate > 1.0 {
        return Err(ConfigError::invalid(
            field,
            format!("{rate} is not a rate: use a value in (0, 1], for example 0.5 for 50%"),
        ));
    }
    Ok(())
}

/// Checks a policy as the builder and `reconfigure` do.
pub(crate) fn validate_policy(p: &BreakerPolicy) -> Result<(), ConfigError> {
    if p.consecutive_failures == 0
        && p.failures_in_window.is_none()
        && p.failure_rate.is_none()
        && p.slow_calls.is_none()
    {
        return Err(ConfigError::invalid(
            "failure_threshold",
            "must be at least 1 (or configure failure_rate, slow_calls or failures_in_window)",
        ));
    }
    if p.failures_in_window == Some(0) {
        return Err(ConfigError::invalid(
            "failures_in_window",
            "the failure count must be at least 1",
        ));
    }
    if p.success_threshold == 0 {
        return Err(ConfigError::invalid(
            "success_threshold",
            "must be at least 1",
        ));
    }
    if p.timeout.is_zero() {
        return Err(ConfigError::invalid(
            "timeout",
            "must be greater than zero: an open breaker would admit probes at once",
        ));
    }
    if p.half_open_max_probes == 0 {
        return Err(ConfigError::invalid(
            "half_open_max_probes",
            "must be at least 1, or the breaker could never close again",
        ));
    }
    if p.probe_deadline.is_zero() {
        return Err(ConfigError::invalid(
            "probe_deadline",
            "must be greater than zero",
        ));
    }
    let window_calls = match p.window {
        SlidingWindow::Calls(0) => {
            return Err(ConfigError::invalid(
                "sliding_window",
                "a count window must hold at least 1 call",
            ));
        }
        SlidingWindow::Time(d) if d.is_zero() => {
            return Err(ConfigError::invalid(
                "sliding_window",
                "a time window must be longer than zero",
            ));
        }
        SlidingWindow::Calls(n) => Some(n),
        SlidingWindow::Time(_) => None,
    };
    if let Some(rate) = p.failure_rate {
        check_rate("failure_rate", rate.threshold)?;
        if window_calls.is_some_and(|n| rate.minimum_calls > n) {
            return Err(ConfigError::invalid(
                "failure_rate",
                "minimum_calls exceeds the count window: the rule could never trip",
            ));
        }
    }
    if let Some(slow) = p.slow_calls {
        check_rate("slow_calls", slow.threshold)?;
        if slow.duration.is_zero() {
            return Err(ConfigError::invalid(
                "slow_calls",
                "the slow-call duration must be greater than zero",
            ));
        }
        if window_calls.is_some_and(|n| slow.minimum_calls > n) {
            return Err(ConfigError::invalid(
                "slow_calls",
                "minimum_calls exceeds the count window: the rule could never trip",
            ));
        }
    }
    if let Some(b) = p.open_backoff {
        if b.multiplier.is_nan() || b.multiplier < 1.0 {
            return Err(ConfigError::invalid(
                "open_backoff",
                "the multiplier must be at least 1.0",
            ));
        }
        if b.max < p.timeout {
            return Err(ConfigError::invalid(
                "open_backoff",
                "the maximum open time must be at least `timeout`",
            ));
        }
        if b.jitter.is_nan() || !(0.0..1.0).contains(&b.jitter) {
            return Err(ConfigError::invalid(
                "open_backoff",
                "jitter is a fraction in [0, 1), for example 0.2 for ±20%",
            ));
        }
    }
    Ok(())
}

/// Builds a [`CircuitBreakerMiddleware`]; `build()` validates every setting.
///
/// ```
/// use pmcp_resilience::circuit_breaker::{CircuitBreakerMiddleware, ErrorMatcher};
/// use pmcp_resilience::Scope;
/// use std::time::Duration;
///
/// let cb = CircuitBreakerMiddleware::builder()
///     .scope(Scope::PerMethod)
///     .failure_threshold(5)
///     .success_threshold(2)
///     .timeout(Duration::from_secs(30))
///     .failure_rate(0.5, 20)
///     .build()
///     .expect("valid settings");
/// # let _ = cb;
/// assert!(CircuitBreakerMiddleware::builder().failure_threshold(0).build().is_err());
/// ```
#[derive(Clone, Debug, Default)]
pub struct CircuitBreakerBuilder {
    config: CircuitBreakerConfig,
    clock: Option<SharedClock>,
    target: RequestTarget,
    file_options: FileStoreOptions<CircuitBreakerState>,
    #[cfg(feature = "redis")]
    redis_options: crate::persistence::RedisOptions,
}

impl CircuitBreakerBuilder {
    /// The name this breaker reports under: the `name` label of its
    /// Prometheus series and its name in the JSON snapshot (default
    /// `circuit_breaker`). Give each breaker registered with one
    /// `MetricsMiddleware` its own name; unnamed ones are told apart there
    /// as `circuit_breaker`, `circuit_breaker_2`, ... in registration order.
    ///
    /// ```
    /// use pmcp_resilience::circuit_breaker::CircuitBreakerMiddleware;
    /// use pmcp_resilience::observe::ReportSource;
    ///
    /// let cb = CircuitBreakerMiddleware::builder().name("upstream").build()?;
    /// assert_eq!(cb.report().name(), "upstream");
    /// # Ok::<(), pmcp_resilience::ConfigError>(())
    /// ```
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.config.name = name.into();
        self
    }

    /// How requests are grouped into breakers (default [`Scope::Global`]).
    pub fn scope(mut self, scope: Scope) -> Self {
        self.config.scope = scope;
        self
    }

    /// Open after this many consecutive failures (default 5; at least 1).
    pub fn failure_threshold(mut self, n: u32) -> Self {
        self.config.policy.consecutive_failures = n;
        self
    }

    /// Close a half-open breaker after this many successful probes in a row (default 1).
    pub fn success_threshold(mut self, n: u32) -> Self {
        self.config.policy.success_threshold = n;
        self
    }

    /// How long the breaker stays open before probing (default 30 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.config.policy.timeout = timeout;
        self
    }

    /// Which outcomes count as failures (default [`ErrorMatcher::ServerErrors`]).
    pub fn trigger_errors(mut self, matcher: ErrorMatcher) -> Self {
        self.config.trigger_errors = matcher;
        self
    }

    /// Which outcomes are neutral, counted neither as failures nor as
    /// successes (default [`ErrorMatcher::CallerMistakes`]: invalid params,
    /// unknown methods, HTTP 4xx other than 408 and 429). A neutral half-open
    /// probe frees its place and the breaker stays half-open. A neutral match
    /// wins over a failure match, as resilience4j's ignored exceptions do;
    /// `ErrorMatcher::Nothing` makes nothing neutral.
    ///
    /// ```
    /// use pmcp_resilience::circuit_breaker::{CircuitBreakerMiddleware, ErrorMatcher};
    ///
    /// // Also leave tool results with `isError: true` out of the count.
    /// let cb = CircuitBreakerMiddleware::builder()
    ///     .neutral_errors(ErrorMatcher::Any(vec![
    ///         ErrorMatcher::CallerMistakes,
    ///         ErrorMatcher::ToolErrors,
    ///     ]))
    ///     .build()
    ///     .expect("valid settings");
    /// # let _ = cb;
    /// ```
    pub fn neutral_errors(mut self, matcher: ErrorMatcher) -> Self {
        self.config.neutral_errors = matcher;
        self
    }

    /// The call deadline (default 30 s): a call
    /// with no answer within it ends as timed out, a failure, whatever
    /// became of its caller, so a server that hangs trips the breaker.
    pub fn call_timeout(mut self, timeout: Duration) -> Self {
        self.config.call_timeout = timeout;
        self
    }

    /// Where state lives (default [`StatePersistence::Memory`]).
    ///
    /// - [`StatePersistence::File`]: `build()` must run inside a Tokio
    ///   runtime. It loads the file: a breaker that was open is still open
    ///   until its open time is over (stale state is dropped, see
    ///   [`CircuitBreakerMiddleware`]). Transitions are on disk before the
    ///   request or response that caused them returns; other changes within
    ///   the flush interval of [`file_options`](Self::file_options). A file
    ///   in use by another breaker or process, or an unreadable one under
    ///   [`OnCorrupt::Fail`](crate::persistence::OnCorrupt::Fail), makes
    ///   `build()` return [`ConfigError::Store`].
    /// - [`StatePersistence::Custom`]: every admission and every outcome goes
    ///   through the store's `acquire` and `record`, so breakers sharing the
    ///   store share their state. If the store fails, calls are admitted
    ///   (fail open), the first failure is logged and every one is counted
    ///   ([`CircuitBreakerMiddleware::store_errors`]).
    pub fn persistence(mut self, persistence: StatePersistence) -> Self {
        self.config.persistence = persistence;
        self
    }

    /// Settings of the state file for [`StatePersistence::File`]: flush
    /// interval (default 1 s) and what to do with an unreadable file
    /// (default: set it aside and start empty). The clock and the expiry
    /// rule are the breaker's own.
    pub fn file_options(mut self, options: FileStoreOptions<CircuitBreakerState>) -> Self {
        self.file_options = options;
        self
    }

    /// Settings of the Redis store for `StatePersistence::Redis`: call
    /// timeout, failure policy, denial cache (the key prefix comes from the
    /// persistence itself). The Redis store supports consecutive-failure
    /// trips, half-open probes and modes; `build()` refuses the other trip
    /// rules with a clear error.
    #[cfg(feature = "redis")]
    #[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
    pub fn redis_options(mut self, options: crate::persistence::RedisOptions) -> Self {
        self.redis_options = options;
        self
    }

    /// What metrics are kept.
    pub fn metrics_config(mut self, config: MetricsConfig) -> Self {
        self.config.metrics_config = config;
        self
    }

    /// The window of the rate rules (default the last 100 calls).
    pub fn sliding_window(mut self, window: SlidingWindow) -> Self {
        self.config.policy.window = window;
        self
    }

    /// Also open when `threshold` (in (0, 1]) of the calls in the window
    /// failed, once it holds at least `minimum_calls`.
    pub fn failure_rate(mut self, threshold: f64, minimum_calls: u32) -> Self {
        self.config.policy.failure_rate = Some(FailureRate {
            threshold,
            minimum_calls,
        });
        self
    }

    /// Also open when `threshold` (in (0, 1]) of the calls in the window took
    /// at least `duration`, once it holds at least `minimum_calls`.
    pub fn slow_calls(mut self, duration: Duration, threshold: f64, minimum_calls: u32) -> Self {
        self.config.policy.slow_calls = Some(SlowCalls {
            duration,
            threshold,
            minimum_calls,
        });
        self
    }

    /// Open after `count` failures within `window` (pmcp's rule), and only
    /// then: consecutive failures no longer trip on their own.
    pub fn failures_within(mut self, count: u32, window: Duration) -> Self {
        self.config.policy.failures_in_window = Some(count);
        self.config.policy.window = SlidingWindow::Time(window);
        self.config.policy.consecutive_failures = 0;
        self
    }

    /// Probes admitted at once in half-open (default 1).
    pub fn half_open_max_probes(mut self, n: u32) -> Self {
        self.config.policy.half_open_max_probes = n;
        self
    }

    /// A probe without an answer this long counts as failed (default 30 s).
    pub fn probe_deadline(mut self, deadline: Duration) -> Self {
        self.config.policy.probe_deadline = deadline;
        self
    }

    /// Grow the open time by `multiplier` per consecutive trip, up to `max`,
    /// spread by ±`jitter` (a fraction in [0, 1)).
    pub fn open_backoff(mut self, multiplier: f64, max: Duration, jitter: f64) -> Self {
        self.config.policy.open_backoff = Some(OpenBackoff {
            multiplier,
            max,
            jitter,
        });
        self
    }

    /// Bounds on the number of keys.
    pub fn registry_limits(mut self, limits: RegistryLimits) -> Self {
        self.config.registry_limits = limits;
        self
    }

    /// The clock (default: the system clock). Tests pass a [`crate::ManualClock`].
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = Some(clock);
        self
    }

    /// Where requests through this handle go (server URL, session source).
    pub fn target(mut self, target: RequestTarget) -> Self {
        self.target = target;
        self
    }

    /// Shorthand for a target with this server URL.
    pub fn server_url(mut self, url: impl AsRef<str>) -> Self {
        self.target = self.target.with_server_url(url);
        self
    }

    /// Reject with `pmcp::Error::Protocol` (code -32006) whose `data` carries
    /// `retryAfterMs`, `scope` and `key`, instead of the bare
    /// `pmcp::Error::CircuitBreakerOpen`.
    pub fn signal_client(mut self, on: bool) -> Self {
        self.config.signal_client = on;
        self
    }

    /// Calls `f` with the key and the change each time a key changes state
    /// (closed, open, half-open), as it happens: for logs of your own, alerts,
    /// or a test that waits for a trip. Keep it quick; it runs on the call's path.
    ///
    /// ```
    /// use pmcp_resilience::circuit_breaker::{CircuitBreakerMiddleware, CircuitState, Verdict};
    /// use std::sync::{Arc, Mutex};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let seen = Arc::new(Mutex::new(Vec::new()));
    /// let log = seen.clone();
    /// let cb = CircuitBreakerMiddleware::builder()
    ///     .failure_threshold(1)
    ///     .on_transition(move |key, t| log.lock().unwrap().push(format!("{key}: {} -> {}", t.from, t.to)))
    ///     .build()
    ///     .expect("valid settings");
    /// cb.acquire("global").await.expect("closed").record(Verdict::Failure).await;
    /// assert_eq!(*seen.lock().unwrap(), ["global: closed -> open"]);
    /// # }
    /// ```
    pub fn on_transition(
        mut self,
        f: impl Fn(&str, crate::circuit_breaker::state::Transition) + Send + Sync + 'static,
    ) -> Self {
        self.config.on_transition = Some(TransitionHook(Arc::new(f)));
        self
    }

    /// Validates the settings and builds the breaker.
    pub fn build(self) -> Result<CircuitBreakerMiddleware, ConfigError> {
        validate_policy(&self.config.policy)?;
        if self.config.call_timeout.is_zero() {
            return Err(ConfigError::invalid(
                "call_timeout",
                "must be greater than zero (a call needs time to be answered)",
            ));
        }
        self.config.registry_limits.validate()?;
        let scope = &self.config.scope;
        if (scope.needs_server_url() && self.target.server_url().is_none())
            || (scope.needs_session() && self.target.session_id().is_none())
        {
            tracing::debug!(
                scope = scope.label(),
                "circuit breaker built without a server URL or session; bind them with \
                 `for_server`/`with_target` or context metadata, or requests share the fallback key"
            );
        }
        let clock = self.clock.unwrap_or_else(default_clock);
        // Opened last: a file is locked only once every setting is valid.
        let opened = persist::open(
            &self.config.persistence,
            &self.config.policy,
            persist::Options {
                file: self.file_options,
                #[cfg(feature = "redis")]
                redis: self.redis_options,
            },
            &clock,
        )?;
        Ok(CircuitBreakerMiddleware::from_backend(
            self.config,
            clock,
            self.target,
            opened,
        ))
    }
}
