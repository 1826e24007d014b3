//! Settings of the Redis stores, the failure policy, and what they report.

use std::time::Duration;

use crate::error::ConfigError;
use crate::registry::RegistryLimits;

/// What a Redis store does while Redis cannot be reached or does not answer
/// within [`RedisOptions::call_timeout`].
///
/// Slow (one call timed out) and down (refused, dropped, hung) are decided
/// alike; after a failure, Redis is not tried again for
/// [`RedisOptions::retry_interval`], so a hung Redis costs one waiting call
/// per interval. When Redis answers again, its state decides again from
/// that answer on (what one process decided alone is not merged back).
///
/// ```
/// use pmcp_resilience::redis_store::{FailurePolicy, RedisOptions};
/// use std::time::Duration;
///
/// assert_eq!(FailurePolicy::default(), FailurePolicy::LocalFallback);
/// // A payment API would rather refuse than let a flood through unlimited:
/// // while Redis is away, reject, and try Redis again every 2 s.
/// let options = RedisOptions::default()
///     .failure_policy(FailurePolicy::FailClosed)
///     .retry_interval(Duration::from_secs(2));
/// assert!(options.validate().is_ok());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum FailurePolicy {
    /// Admit every request (a limiter admits with its full limit remaining,
    /// a breaker lets calls through and counts nothing): availability first.
    FailOpen,
    /// Reject every request, with [`RedisOptions::retry_interval`] as the
    /// retry hint: protection first.
    FailClosed,
    /// Decide in this process, in memory, until Redis answers again.
    ///
    /// A limiter decides with the same strategy in a local limiter bounded
    /// by [`RedisOptions::local_limits`] (limits then hold per process, not
    /// for the fleet). A breaker store reports the failure to the breaker,
    /// which decides from the last state Redis reported for the key: an
    /// open breaker stays open until its open time ends, then half-opens
    /// with the policy's probe limit in this process.
    #[default]
    LocalFallback,
}

impl FailurePolicy {
    fn mode(self) -> StoreMode {
        match self {
            FailurePolicy::FailOpen => StoreMode::FailOpen,
            FailurePolicy::FailClosed => StoreMode::FailClosed,
            FailurePolicy::LocalFallback => StoreMode::LocalFallback,
        }
    }

    pub(crate) fn degraded_mode(self) -> StoreMode {
        self.mode()
    }
}

/// How a Redis store is deciding right now.
///
/// ```
/// use pmcp_resilience::metrics::StoreReport;
/// use pmcp_resilience::rate_limit::RateLimitStrategy;
/// use pmcp_resilience::redis_store::{RedisOptions, RedisRateLimiter, StoreMode};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// // `open` parses the URL only: nothing connects until the first request.
/// let client = redis::Client::open("redis://127.0.0.1:6379/")?;
/// let strategy = RateLimitStrategy::TokenBucket { capacity: 10, refill_rate: 1 };
/// let limiter = RedisRateLimiter::new(client, strategy, RedisOptions::default())?;
/// assert_eq!(limiter.health().mode, StoreMode::Normal);
/// // The label is the `mode` of the store in metrics.
/// assert_eq!(StoreMode::LocalFallback.label(), "local_fallback");
/// assert!(StoreReport::MODES.contains(&StoreMode::FailClosed.label()));
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum StoreMode {
    /// Redis answers: decisions are shared by the fleet.
    Normal,
    /// Redis is unreachable and requests are admitted.
    FailOpen,
    /// Redis is unreachable and requests are rejected.
    FailClosed,
    /// Redis is unreachable and this process decides alone, in memory.
    LocalFallback,
}

impl StoreMode {
    /// A label for metrics: `normal`, `fail_open`, `fail_closed`, `local_fallback`.
    pub fn label(self) -> &'static str {
        match self {
            StoreMode::Normal => "normal",
            StoreMode::FailOpen => "fail_open",
            StoreMode::FailClosed => "fail_closed",
            StoreMode::LocalFallback => "local_fallback",
        }
    }

    pub(crate) fn to_u8(self) -> u8 {
        match self {
            StoreMode::Normal => 0,
            StoreMode::FailOpen => 1,
            StoreMode::FailClosed => 2,
            StoreMode::LocalFallback => 3,
        }
    }

    pub(crate) fn from_u8(v: u8) -> Self {
        match v {
            1 => StoreMode::FailOpen,
            2 => StoreMode::FailClosed,
            3 => StoreMode::LocalFallback,
            _ => StoreMode::Normal,
        }
    }
}

/// The health of a Redis store, for metrics.
///
/// ```
/// use pmcp_resilience::redis_store::{RedisBreakerStore, RedisHealth, RedisOptions, StoreMode};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// // `open` parses the URL only: nothing connects until the first call.
/// let client = redis::Client::open("redis://127.0.0.1:6379/")?;
/// let store = RedisBreakerStore::new(client, RedisOptions::default())?;
/// let health: RedisHealth = store.health();
/// assert_eq!(health.mode, StoreMode::Normal);
/// assert_eq!((health.round_trips, health.store_errors, health.degraded_decisions), (0, 0, 0));
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RedisHealth {
    /// How the store decides now.
    pub mode: StoreMode,
    /// Calls to Redis that failed or timed out, since the store was created.
    pub store_errors: u64,
    /// Calls made to Redis (scripts and commands), since the store was created.
    pub round_trips: u64,
    /// Decisions taken without Redis under the failure policy.
    pub degraded_decisions: u64,
    /// Rejections answered from the local denial cache, without a round trip.
    pub cached_denials: u64,
}

/// Settings shared by [`RedisRateLimiter`](super::RedisRateLimiter) and
/// [`RedisBreakerStore`](super::RedisBreakerStore).
///
/// ```
/// use pmcp_resilience::redis_store::{FailurePolicy, RedisOptions};
/// use std::time::Duration;
///
/// let options = RedisOptions::default()
///     .key_prefix("billing:")
///     .call_timeout(Duration::from_millis(20))
///     .failure_policy(FailurePolicy::FailClosed);
/// assert!(options.validate().is_ok());
/// assert!(RedisOptions::default().key_prefix("a{b").validate().is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RedisOptions {
    /// Prepended to every key (default `pmcp:`); at most 64 bytes, no braces
    /// or control characters.
    pub key_prefix: String,
    /// The longest a request waits for Redis, connection included (default
    /// 250 ms: long enough for a loaded master and a burst of a thousand
    /// calls on one connection; a call that times out is decided by the
    /// failure policy, so a timeout too short turns load into degraded mode).
    pub call_timeout: Duration,
    /// The longest one connection attempt may take (default 1 s; a call
    /// still gives up after `call_timeout`).
    pub connect_timeout: Duration,
    /// What to do while Redis cannot be reached (default
    /// [`FailurePolicy::LocalFallback`]).
    pub failure_policy: FailurePolicy,
    /// After a failed call, how long requests are decided by the failure
    /// policy without trying Redis (default 250 ms); the first request after
    /// that tries Redis again.
    pub retry_interval: Duration,
    /// Keys remembered by the local denial cache (default 10 000; 0 turns
    /// the cache off).
    pub denial_cache_capacity: usize,
    /// How long a breaker key lives without a change (default 24 h); at
    /// least the policy's open time plus its probe deadline, and at most
    /// 365 days. A forced,
    /// disabled or metrics-only key never expires until its mode is reset.
    pub breaker_ttl: Duration,
    /// Keys the limiter's local fallback may hold and when they count as
    /// idle (default [`RegistryLimits::default`]; the middleware builders
    /// pass their own registry limits).
    pub local_limits: RegistryLimits,
    /// Whether the builders check at `build()` that Redis answers (a `PING`
    /// and loading the scripts, within the connect and call timeouts), and
    /// fail with a [`ConfigError`] if it does not (default `false`: build
    /// never waits on Redis and the failure policy decides until it answers).
    pub verify_on_build: bool,
}

impl Default for RedisOptions {
    fn default() -> Self {
        RedisOptions {
            key_prefix: "pmcp:".to_owned(),
            call_timeout: Duration::from_millis(250),
            connect_timeout: Duration::from_secs(1),
            failure_policy: FailurePolicy::default(),
            retry_interval: Duration::from_millis(250),
            denial_cache_capacity: 10_000,
            breaker_ttl: Duration::from_secs(24 * 3600),
            local_limits: RegistryLimits::default(),
            verify_on_build: false,
        }
    }
}

impl RedisOptions {
    /// Sets [`key_prefix`](Self::key_prefix).
    pub fn key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.key_prefix = prefix.into();
        self
    }

    /// Sets [`call_timeout`](Self::call_timeout).
    pub fn call_timeout(mut self, timeout: Duration) -> Self {
        self.call_timeout = timeout;
        self
    }

    /// Sets [`connect_timeout`](Self::connect_timeout).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Sets [`failure_policy`](Self::failure_policy).
    pub fn failure_policy(mut self, policy: FailurePolicy) -> Self {
        self.failure_policy = policy;
        self
    }

    /// Sets [`retry_interval`](Self::retry_interval).
    pub fn retry_interval(mut self, interval: Duration) -> Self {
        self.retry_interval = interval;
        self
    }

    /// Sets [`denial_cache_capacity`](Self::denial_cache_capacity).
    pub fn denial_cache_capacity(mut self, capacity: usize) -> Self {
        self.denial_cache_capacity = capacity;
        self
    }

    /// Sets [`breaker_ttl`](Self::breaker_ttl).
    pub fn breaker_ttl(mut self, ttl: Duration) -> Self {
        self.breaker_ttl = ttl;
        self
    }

    /// Sets [`local_limits`](Self::local_limits).
    pub fn local_limits(mut self, limits: RegistryLimits) -> Self {
        self.local_limits = limits;
        self
    }

    /// Sets [`verify_on_build`](Self::verify_on_build).
    pub fn verify_on_build(mut self, verify: bool) -> Self {
        self.verify_on_build = verify;
        self
    }

    /// Checks the settings.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.key_prefix.len() > 64 {
            return Err(ConfigError::invalid(
                "key_prefix",
                "the key prefix must be at most 64 bytes",
            ));
        }
        if self
            .key_prefix
            .chars()
            .any(|c| c == '{' || c == '}' || c.is_control())
        {
            return Err(ConfigError::invalid(
                "key_prefix",
                "the key prefix may not contain `{`, `}` or control characters (the braces are \
                 the hash tag of the scope key)",
            ));
        }
        let ms = |d: Duration, lo: u64, hi: u64| {
            d >= Duration::from_millis(lo) && d <= Duration::from_millis(hi)
        };
        if !ms(self.call_timeout, 1, 60_000) {
            return Err(ConfigError::invalid(
                "call_timeout",
                "the call timeout must be between 1 ms and 60 s (for example 250 ms)",
            ));
        }
        if !ms(self.connect_timeout, 1, 60_000) {
            return Err(ConfigError::invalid(
                "connect_timeout",
                "the connect timeout must be between 1 ms and 60 s",
            ));
        }
        if !ms(self.retry_interval, 1, 600_000) {
            return Err(ConfigError::invalid(
                "retry_interval",
                "the retry interval must be between 1 ms and 10 min",
            ));
        }
        if self.denial_cache_capacity > 1_000_000 {
            return Err(ConfigError::invalid(
                "denial_cache_capacity",
                "the denial cache holds at most 1 000 000 keys",
            ));
        }
        if self.breaker_ttl < Duration::from_secs(1) {
            return Err(ConfigError::invalid(
                "breaker_ttl",
                "breaker keys must live at least 1 s",
            ));
        }
        // Redis refuses an expiry beyond a signed 64-bit count of
        // milliseconds; a year is far below it and far above any use.
        if self.breaker_ttl > Duration::from_secs(365 * 24 * 60 * 60) {
            return Err(ConfigError::invalid(
                "breaker_ttl",
                "breaker keys must live at most 365 days",
            ));
        }
        self.local_limits.validate()?;
        Ok(())
    }
}
