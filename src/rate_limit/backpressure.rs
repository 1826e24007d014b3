//! Waiting for capacity instead of failing at once.
//!
//! With [`BackpressureConfig::wait_for_capacity`], a request that finds no
//! capacity **reserves** the earliest slot it can get (the key's state moves
//! forward at once) and then sleeps until that slot. Because the slot is taken
//! before the sleep, requests arriving later get later slots: service is in
//! order of arrival, and a waiter cannot be overtaken. A request whose slot
//! is more than [`max_wait`](BackpressureConfig::max_wait) away is rejected
//! at once, not after waiting; so is a request arriving when the number of
//! waiters is at its bound (`max_waiters` on the builder, default
//! [`DEFAULT_MAX_WAITERS`]).
//!
//! If a waiting request's future is dropped (the caller timed out or gave
//! up), its [`WaitGuard`] gives the slot back, as described on
//! [`Reservation`](super::Reservation): given back when no later request has
//! reserved since; otherwise left unused.
//!
//! The leaky bucket delays admitted requests whatever these settings (its
//! queue is its capacity), and those delays are cancelled the same way.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::error::ConfigError;

/// The default bound on requests waiting at once, per middleware.
pub const DEFAULT_MAX_WAITERS: usize = 1024;

/// What the rate-limit middleware does when a request finds no capacity.
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

/// Counts the requests waiting at once and bounds them.
#[derive(Debug)]
pub(crate) struct WaitQueue {
    waiting: AtomicUsize,
    max_waiters: usize,
}

impl WaitQueue {
    pub(crate) fn new(max_waiters: usize) -> Self {
        WaitQueue {
            waiting: AtomicUsize::new(0),
            max_waiters,
        }
    }

    /// Takes a place among the waiters, or `None` if they are at the bound.
    pub(crate) fn enter(self: &Arc<Self>) -> Option<WaitPlace> {
        let mut current = self.waiting.load(Ordering::Relaxed);
        loop {
            if current >= self.max_waiters {
                return None;
            }
            match self.waiting.compare_exchange_weak(
                current,
                current + 1,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Some(WaitPlace(Arc::clone(self))),
                Err(actual) => current = actual,
            }
        }
    }

    /// Requests waiting now.
    pub(crate) fn len(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }
}

/// A place among the waiters, released on drop.
#[derive(Debug)]
pub(crate) struct WaitPlace(Arc<WaitQueue>);

impl Drop for WaitPlace {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Gives a reservation back if the wait does not complete.
///
/// Created when a request starts waiting; [`complete`](Self::complete) is
/// called after the sleep. Dropped before that (the caller's future was
/// dropped), it runs its refund.
pub(crate) struct WaitGuard<F: FnOnce()> {
    refund: Option<F>,
    _place: WaitPlace,
}

impl<F: FnOnce()> WaitGuard<F> {
    pub(crate) fn new(place: WaitPlace, refund: F) -> Self {
        WaitGuard {
            refund: Some(refund),
            _place: place,
        }
    }

    /// The wait finished: keep the reservation.
    pub(crate) fn complete(mut self) {
        self.refund = None;
    }
}

impl<F: FnOnce()> Drop for WaitGuard<F> {
    fn drop(&mut self) {
        if let Some(refund) = self.refund.take() {
            refund();
        }
    }
}
