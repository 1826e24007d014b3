//! Waiting for capacity instead of failing at once: the settings.

use std::time::Duration;

use crate::error::ConfigError;

/// The default bound on requests waiting at once, per middleware.
pub(crate) const DEFAULT_MAX_WAITERS: usize = 1024;

/// What the rate-limit middleware does when a request finds no capacity.
///
/// # Waiting
///
/// With [`BackpressureConfig::wait_for_capacity`], a request that finds no
/// capacity joins its key's **line**, in order of arrival. Only the head of
/// the line asks the limiter for its units (a decision at the current time,
/// recorded only when it admits); it sleeps until they are back, is
/// admitted, and wakes the next. Nothing is taken from the limiter before a
/// request is admitted, so:
///
/// - service is in order of arrival: a later request never overtakes, and a
///   heavy request is not starved by light ones behind it;
/// - a request that gives up (its future is dropped: a client timeout, a
///   cancelled call) just leaves the line, wherever it stood; those behind
///   move up and are served at the rate the strategy allows, and a heavy
///   request that gives up frees its whole cost;
/// - a newcomer is judged from the units ahead of it: if its wait, with all
///   of them served first, would exceed
///   [`max_wait`](BackpressureConfig::max_wait), it is rejected at once, not
///   after waiting; so is a request arriving when the number of waiters is
///   at its bound (`max_waiters` on the builder, default
///   1024).
///
/// Per strategy, in memory:
///
/// | strategy | the head is admitted when | a waiter that gives up |
/// |---|---|---|
/// | token bucket | its cost in tokens is back | frees its place; no token was taken |
/// | fixed / sliding window | a window (or the rolling estimate) has room for its cost | frees its place; units a window had left while a heavier head waited for the next are not lent to lighter ones behind it (arrival order wins) |
/// | leaky bucket | the unit before it has leaked out, so requests stay `1 / leak_rate` apart | frees its place in the bucket's queue, which *is* the line: the bucket's `capacity` bounds the units in it, whatever `wait_for_capacity` and `max_wait` say |
///
/// A custom [`RateLimiter`](super::RateLimiter) and the Redis store are
/// shared with other processes, which the line cannot see: there a waiter
/// reserves its slot in the store at once (so every process respects it),
/// sleeps, and if it gives up, [`cancel`](super::RateLimiter::cancel) hands
/// the slot back only if no later reservation was made since (see
/// [`Reservation`](super::Reservation)); otherwise the slot goes unused and
/// its capacity returns with time.
///
/// ```
/// use pmcp_resilience::rate_limit::BackpressureConfig;
/// use std::time::Duration;
///
/// let config = BackpressureConfig::wait_up_to(Duration::from_secs(5)).with_client_signal();
/// assert!(config.wait_for_capacity && config.signal_client);
/// assert_eq!(config.backpressure_header, "X-RateLimit-Reset");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackpressureConfig {
    /// Wait for capacity (up to `max_wait`) instead of rejecting (default `false`).
    pub wait_for_capacity: bool,
    /// The longest a request may wait (default 1 s). Must be above zero when
    /// waiting is on.
    pub max_wait: Duration,
    /// Tell the client when to retry: the rejection becomes a
    /// `pmcp::Error::Protocol` with code -32005 (that of
    /// `pmcp::Error::RateLimited`) and `data` holding `retryAfterMs`,
    /// `limit`, `remaining`, `resetAtMs`, `scope`, `key` and `header`
    /// (default `false`: a plain `pmcp::Error::RateLimited`).
    pub signal_client: bool,
    /// The HTTP header a server front end should use for the reset time
    /// (default `X-RateLimit-Reset`); carried in the error data as `header`.
    pub backpressure_header: String,
}

impl Default for BackpressureConfig {
    fn default() -> Self {
        BackpressureConfig {
            wait_for_capacity: false,
            max_wait: Duration::from_secs(1),
            signal_client: false,
            backpressure_header: "X-RateLimit-Reset".to_string(),
        }
    }
}

impl BackpressureConfig {
    /// Reject at once when there is no capacity (the default).
    pub fn reject() -> Self {
        Self::default()
    }

    /// Wait up to `max_wait` for capacity.
    pub fn wait_up_to(max_wait: Duration) -> Self {
        BackpressureConfig {
            wait_for_capacity: true,
            max_wait,
            ..Self::default()
        }
    }

    /// Tell the client when to retry (see [`signal_client`](Self::signal_client)).
    pub fn with_client_signal(mut self) -> Self {
        self.signal_client = true;
        self
    }

    /// Use `header` as the name of the reset header.
    pub fn with_header(mut self, header: impl Into<String>) -> Self {
        self.backpressure_header = header.into();
        self
    }

    /// The longest wait to reserve: `max_wait` if waiting is on, else zero.
    pub(crate) fn wait_budget(&self) -> Duration {
        if self.wait_for_capacity {
            self.max_wait
        } else {
            Duration::ZERO
        }
    }

    /// Checks the settings, as the builder does.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.wait_for_capacity && self.max_wait.is_zero() {
            return Err(ConfigError::invalid(
                "max_wait",
                "must be greater than zero when wait_for_capacity is on \
                 (or turn wait_for_capacity off to reject at once)",
            ));
        }
        if self.signal_client
            && http::HeaderName::from_bytes(self.backpressure_header.as_bytes()).is_err()
        {
            return Err(ConfigError::invalid(
                "backpressure_header",
                format!(
                    "`{}` is not a valid HTTP header name",
                    self.backpressure_header
                ),
            ));
        }
        Ok(())
    }
}
