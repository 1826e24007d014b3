//! The four limiting algorithms, as pure functions of (state, now, cost).
//!
//! ```
//! use pmcp_resilience::rate_limit::RateLimitStrategy;
//! use pmcp_resilience::Timestamp;
//!
//! let strategy = RateLimitStrategy::TokenBucket { capacity: 2, refill_rate: 1 };
//! let mut state = strategy.initial_state();
//! let now = Timestamp::from_millis(1_700_000_000_000);
//! assert!(strategy.check(&mut state, now, 1).allowed);
//! assert!(strategy.check(&mut state, now, 1).allowed);
//! let third = strategy.check(&mut state, now, 1);
//! assert!(!third.allowed);
//! assert_eq!(third.retry_after, Some(std::time::Duration::from_secs(1)));
//! ```
//!
//! Nothing here touches a lock, a map or a clock: a store (memory, file,
//! Redis) loads a [`LimiterState`], calls [`RateLimitStrategy::acquire`] with
//! the current time, and stores the state it gets back. All arithmetic is on
//! integer nanoseconds and saturates, so the same answers can be reproduced by
//! a Lua script in Redis.
//!
//! | strategy | state | what users see |
//! |---|---|---|
//! | [`FixedWindow`](RateLimitStrategy::FixedWindow) | window start + count | up to `max_requests` per aligned window; up to 2x across a boundary |
//! | [`SlidingWindow`](RateLimitStrategy::SlidingWindow) | window start + two counts | like a rolling window, within the bound in [`sliding_window`] |
//! | [`TokenBucket`](RateLimitStrategy::TokenBucket) | one `u64` (GCRA) | a burst of `capacity` at once, then `refill_rate` per second |
//! | [`LeakyBucket`](RateLimitStrategy::LeakyBucket) | one `u64` | never two requests closer than `1 / leak_rate`; early ones are delayed, not bunched |

pub mod fixed_window;
pub mod leaky_bucket;
pub mod sliding_window;
pub mod token_bucket;

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::clock::{Timestamp, duration_nanos};
use crate::error::ConfigError;

pub use fixed_window::FixedWindowState;
pub use leaky_bucket::LeakyBucketState;
pub use sliding_window::SlidingWindowState;
pub use token_bucket::TokenBucketState;

const NANOS_PER_SEC: u64 = 1_000_000_000;

/// The highest refill or leak rate, per second: one unit per nanosecond.
/// A higher rate would make the time one unit takes to come back round down
/// to zero nanoseconds, which the algorithms divide by.
pub const MAX_RATE_PER_SEC: u32 = 1_000_000_000;

/// The longest window: 2^62 ns, about 146 years. Within it, a window start
/// plus two windows (the sliding window's reach) stays inside `u64`
/// nanoseconds.
pub const MAX_WINDOW: Duration = Duration::from_nanos(1 << 62);

/// How a limiter decides whether a request may pass.
///
/// ```
/// use pmcp_resilience::rate_limit::RateLimitStrategy;
/// use std::time::Duration;
///
/// // 10 requests per second sustained, bursts of up to 100.
/// let strategy = RateLimitStrategy::TokenBucket { capacity: 100, refill_rate: 10 };
/// assert!(strategy.validate().is_ok());
/// assert!(RateLimitStrategy::FixedWindow { max_requests: 0, window: Duration::from_secs(1) }
///     .validate()
///     .is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RateLimitStrategy {
    /// At most `max_requests` units per window; windows are aligned to the
    /// Unix epoch, so every process agrees on where they start. Cheap, but a
    /// client can send `max_requests` at the end of one window and again at
    /// the start of the next.
    FixedWindow {
        /// Units admitted per window.
        max_requests: u32,
        /// Length of a window.
        window: Duration,
    },
    /// At most about `max_requests` units in any rolling window, estimated by
    /// weighting the previous fixed window's count by how much of it still
    /// overlaps the rolling window. See [`sliding_window`] for the exact bound.
    SlidingWindow {
        /// Units admitted per rolling window.
        max_requests: u32,
        /// Length of the rolling window.
        window: Duration,
    },
    /// A bucket of `capacity` tokens refilled at `refill_rate` tokens per
    /// second (implemented as GCRA with one timestamp per key). A full bucket
    /// lets a burst of `capacity` requests through at once.
    TokenBucket {
        /// Tokens the bucket holds: the largest burst.
        capacity: u32,
        /// Tokens added per second.
        refill_rate: u32,
    },
    /// A queue that lets requests out at `leak_rate` per second. A request
    /// that arrives before its turn is admitted with a delay (the middleware
    /// waits it out) as long as the queue holds at most `capacity` units;
    /// otherwise it is rejected. Unlike the token bucket, two requests never
    /// pass closer together than `1 / leak_rate`.
    LeakyBucket {
        /// Units the queue holds, the one leaking now included.
        capacity: u32,
        /// Units let out per second.
        leak_rate: u32,
    },
}

impl RateLimitStrategy {
    /// Checks the numbers, as the builder does: no zero capacity, window or
    /// rate, no rate above [`MAX_RATE_PER_SEC`] and no window above
    /// [`MAX_WINDOW`].
    ///
    /// ```
    /// use pmcp_resilience::ConfigError;
    /// use pmcp_resilience::rate_limit::RateLimitStrategy;
    ///
    /// // Two tokens per nanosecond: a token would come back in 0.5 ns.
    /// let too_fast = RateLimitStrategy::TokenBucket { capacity: 10, refill_rate: 2_000_000_000 };
    /// assert!(matches!(too_fast.validate(), Err(ConfigError::Invalid { field: "refill_rate", .. })));
    /// ```
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.policy().map(|_| ())
    }

    /// The most units one key may use at once (its capacity or window limit).
    pub fn limit(&self) -> u32 {
        match *self {
            RateLimitStrategy::FixedWindow { max_requests, .. }
            | RateLimitStrategy::SlidingWindow { max_requests, .. } => max_requests,
            RateLimitStrategy::TokenBucket { capacity, .. }
            | RateLimitStrategy::LeakyBucket { capacity, .. } => capacity,
        }
    }

    /// A short name for logs and metrics (`fixed_window`, `sliding_window`,
    /// `token_bucket`, `leaky_bucket`).
    pub fn label(&self) -> &'static str {
        match self {
            RateLimitStrategy::FixedWindow { .. } => "fixed_window",
            RateLimitStrategy::SlidingWindow { .. } => "sliding_window",
            RateLimitStrategy::TokenBucket { .. } => "token_bucket",
            RateLimitStrategy::LeakyBucket { .. } => "leaky_bucket",
        }
    }

    /// The fresh state of a key that has not been seen yet.
    pub fn initial_state(&self) -> LimiterState {
        match self {
            RateLimitStrategy::FixedWindow { .. } => {
                LimiterState::FixedWindow(FixedWindowState::default())
            }
            RateLimitStrategy::SlidingWindow { .. } => {
                LimiterState::SlidingWindow(SlidingWindowState::default())
            }
            RateLimitStrategy::TokenBucket { .. } => {
                LimiterState::TokenBucket(TokenBucketState::default())
            }
            RateLimitStrategy::LeakyBucket { .. } => {
                LimiterState::LeakyBucket(LeakyBucketState::default())
            }
        }
    }

    /// Decides on a request of `cost` units at `now`, without waiting:
    /// admitted now or rejected. Updates `state` when admitted.
    ///
    /// A state of another strategy (after a configuration change) is treated
    /// as a fresh key.
    pub fn check(&self, state: &mut LimiterState, now: Timestamp, cost: u32) -> Decision {
        self.acquire(state, now, cost, Duration::ZERO)
    }

    /// Decides on a request of `cost` units at `now`, reserving a later slot
    /// if it can be served within `max_wait` ("reserve, then sleep"): the
    /// returned [`Decision::wait`] says how long the caller must wait before
    /// it proceeds. Later calls see the reservation, so they cannot overtake.
    ///
    /// An invalid strategy (see [`validate`](Self::validate)) rejects every
    /// request as never admissible.
    pub fn acquire(
        &self,
        state: &mut LimiterState,
        now: Timestamp,
        cost: u32,
        max_wait: Duration,
    ) -> Decision {
        match self.policy() {
            Ok(policy) => policy.acquire(state, now.as_nanos(), cost, duration_nanos(max_wait)),
            Err(_) => Decision::never(0, now),
        }
    }

    /// Compiles the strategy into integer nanoseconds, validating it.
    pub(crate) fn policy(&self) -> Result<Policy, ConfigError> {
        fn nonzero(field: &'static str, value: u32, what: &str) -> Result<(), ConfigError> {
            if value == 0 {
                return Err(ConfigError::invalid(
                    field,
                    format!("{what} must be at least 1"),
                ));
            }
            Ok(())
        }
        fn window_nanos(window: Duration) -> Result<u64, ConfigError> {
            let nanos = duration_nanos(window);
            if nanos == 0 {
                return Err(ConfigError::invalid(
                    "window",
                    "the window must be longer than zero (for example Duration::from_secs(1))",
                ));
            }
            if window > MAX_WINDOW {
                return Err(ConfigError::invalid(
                    "window",
                    format!("the window must be at most 2^62 ns (about 146 years), not {window:?}"),
                ));
            }
            Ok(nanos)
        }
        // The time one unit takes to come back, in whole nanoseconds.
        fn interval(field: &'static str, rate: u32, what: &str) -> Result<u64, ConfigError> {
            nonzero(field, rate, what)?;
            if rate > MAX_RATE_PER_SEC {
                return Err(ConfigError::invalid(
                    field,
                    format!("{what} must be at most 1000000000 (one per nanosecond), not {rate}"),
                ));
            }
            Ok(NANOS_PER_SEC / u64::from(rate))
        }
        match *self {
            RateLimitStrategy::FixedWindow {
                max_requests,
                window,
            } => {
                nonzero("max_requests", max_requests, "the requests per window")?;
                Ok(Policy::FixedWindow {
                    max: max_requests,
                    window: window_nanos(window)?,
                })
            }
            RateLimitStrategy::SlidingWindow {
                max_requests,
                window,
            } => {
                nonzero("max_requests", max_requests, "the requests per window")?;
                Ok(Policy::SlidingWindow {
                    max: max_requests,
                    window: window_nanos(window)?,
                })
            }
            RateLimitStrategy::TokenBucket {
                capacity,
                refill_rate,
            } => {
                nonzero("capacity", capacity, "the bucket capacity")?;
                Ok(Policy::TokenBucket {
                    capacity,
                    interval: interval(
                        "refill_rate",
                        refill_rate,
                        "the refill rate (tokens per second)",
                    )?,
                })
            }
            RateLimitStrategy::LeakyBucket {
                capacity,
                leak_rate,
            } => {
                nonzero("capacity", capacity, "the bucket capacity")?;
                Ok(Policy::LeakyBucket {
                    capacity,
                    interval: interval(
                        "leak_rate",
                        leak_rate,
                        "the leak rate (requests per second)",
                    )?,
                })
            }
        }
    }
}

/// A validated strategy in integer nanoseconds: what the hot path runs.
///
/// `interval` is the time one unit takes to come back (`1 s / rate`, rounded
/// down to whole nanoseconds; at most 1 ns per unit of error, so a rate of
/// 3/s admits 3.000000003 per second in the long run).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Policy {
    FixedWindow { max: u32, window: u64 },
    SlidingWindow { max: u32, window: u64 },
    TokenBucket { capacity: u32, interval: u64 },
    LeakyBucket { capacity: u32, interval: u64 },
}

impl Policy {
    pub(crate) fn limit(&self) -> u32 {
        match *self {
            Policy::FixedWindow { max, .. } | Policy::SlidingWindow { max, .. } => max,
            Policy::TokenBucket { capacity, .. } | Policy::LeakyBucket { capacity, .. } => capacity,
        }
    }

    pub(crate) fn initial_state(&self) -> LimiterState {
        match self {
            Policy::FixedWindow { .. } => LimiterState::FixedWindow(FixedWindowState::default()),
            Policy::SlidingWindow { .. } => {
                LimiterState::SlidingWindow(SlidingWindowState::default())
            }
            Policy::TokenBucket { .. } => LimiterState::TokenBucket(TokenBucketState::default()),
            Policy::LeakyBucket { .. } => LimiterState::LeakyBucket(LeakyBucketState::default()),
        }
    }

    /// Runs the algorithm; a state of another kind is replaced by a fresh one.
    #[inline]
    pub(crate) fn acquire(
        &self,
        state: &mut LimiterState,
        now: u64,
        cost: u32,
        max_wait: u64,
    ) -> Decision {
        match (*self, &mut *state) {
            (Policy::TokenBucket { capacity, interval }, LimiterState::TokenBucket(s)) => {
                token_bucket::acquire(capacity, interval, s, now, cost, max_wait)
            }
            (Policy::FixedWindow { max, window }, LimiterState::FixedWindow(s)) => {
                fixed_window::acquire(max, window, s, now, cost, max_wait)
            }
            (Policy::SlidingWindow { max, window }, LimiterState::SlidingWindow(s)) => {
                sliding_window::acquire(max, window, s, now, cost, max_wait)
            }
            (Policy::LeakyBucket { capacity, interval }, LimiterState::LeakyBucket(s)) => {
                leaky_bucket::acquire(capacity, interval, s, now, cost)
            }
            _ => {
                *state = self.initial_state();
                self.acquire(state, now, cost, max_wait)
            }
        }
    }

    /// The state as time alone would leave it at `now` (no request counted).
    pub(crate) fn settle(&self, state: &LimiterState, now: u64) -> LimiterState {
        let mut settled = *state;
        match (*self, &mut settled) {
            (Policy::FixedWindow { max, window }, LimiterState::FixedWindow(s)) => {
                fixed_window::settle(max, window, s, now)
            }
            (Policy::SlidingWindow { window, .. }, LimiterState::SlidingWindow(s)) => {
                sliding_window::settle(window, s, now)
            }
            _ => {}
        }
        settled
    }

    /// Units in use at `now` and the time the key is back at full capacity.
    pub(crate) fn usage(&self, state: &LimiterState, now: u64) -> (u32, u64) {
        match (*self, state) {
            (Policy::TokenBucket { capacity, interval }, LimiterState::TokenBucket(s)) => {
                token_bucket::usage(capacity, interval, s, now)
            }
            (Policy::FixedWindow { max, window }, LimiterState::FixedWindow(s)) => {
                fixed_window::usage(max, window, s, now)
            }
            (Policy::SlidingWindow { max, window }, LimiterState::SlidingWindow(s)) => {
                sliding_window::usage(max, window, s, now)
            }
            (Policy::LeakyBucket { capacity, interval }, LimiterState::LeakyBucket(s)) => {
                leaky_bucket::usage(capacity, interval, s, now)
            }
            _ => (0, now),
        }
    }

    /// The instant from which the key is back at full capacity if nothing
    /// else arrives: dropping it then changes no decision.
    #[inline]
    pub(crate) fn full_at(&self, state: &LimiterState) -> u64 {
        match (*self, state) {
            (Policy::TokenBucket { .. }, LimiterState::TokenBucket(s)) => s.tat,
            (Policy::LeakyBucket { .. }, LimiterState::LeakyBucket(s)) => s.next_free,
            (Policy::FixedWindow { max, window }, LimiterState::FixedWindow(s)) => {
                let windows = s.count.div_ceil(u64::from(max));
                s.window_start.saturating_add(mul(windows, window))
            }
            (Policy::SlidingWindow { window, .. }, LimiterState::SlidingWindow(s)) => {
                if s.current > 0 {
                    s.window_start.saturating_add(mul(2, window))
                } else if s.previous > 0 {
                    s.window_start.saturating_add(window)
                } else {
                    0
                }
            }
            _ => 0,
        }
    }

    /// Gives back a reservation that was not used, if it is still the latest
    /// one: see [`Reservation`] for why only then.
    pub(crate) fn refund(
        &self,
        state: &mut LimiterState,
        reservation: &Reservation,
        now: u64,
    ) -> bool {
        if self.settle(state, now) == self.settle(&reservation.after, now) {
            *state = self.settle(&reservation.before, now);
            true
        } else {
            false
        }
    }
}

/// A key's state in two words, as the in-memory registry keeps it: the
/// strategy is known from the [`Policy`], so no tag is stored (16 bytes
/// instead of 24 keep a registry slot within one cache line's size).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct PackedState(pub(crate) [u64; 2]);

impl Policy {
    /// The state held in `packed`, read as this policy's kind.
    #[inline]
    pub(crate) fn unpack(&self, packed: PackedState) -> LimiterState {
        let [a, b] = packed.0;
        match self {
            Policy::TokenBucket { .. } => LimiterState::TokenBucket(TokenBucketState { tat: a }),
            Policy::LeakyBucket { .. } => {
                LimiterState::LeakyBucket(LeakyBucketState { next_free: a })
            }
            Policy::FixedWindow { .. } => LimiterState::FixedWindow(FixedWindowState {
                window_start: a,
                count: b,
            }),
            Policy::SlidingWindow { .. } => LimiterState::SlidingWindow(SlidingWindowState {
                window_start: a,
                current: b as u32,
                previous: (b >> 32) as u32,
            }),
        }
    }

    /// `state` in two words (a state of another kind packs as fresh).
    #[inline]
    pub(crate) fn pack(&self, state: &LimiterState) -> PackedState {
        PackedState(match state {
            LimiterState::TokenBucket(s) => [s.tat, 0],
            LimiterState::LeakyBucket(s) => [s.next_free, 0],
            LimiterState::FixedWindow(s) => [s.window_start, s.count],
            LimiterState::SlidingWindow(s) => [
                s.window_start,
                u64::from(s.current) | (u64::from(s.previous) << 32),
            ],
        })
    }
}

/// The stored state of one key, for any strategy: small, plain and
/// serialisable (a file or a Redis hash holds it as is).
///
/// ```
/// use pmcp_resilience::rate_limit::strategy::{LimiterState, RateLimitStrategy, TokenBucketState};
/// use pmcp_resilience::Timestamp;
///
/// let strategy = RateLimitStrategy::TokenBucket { capacity: 10, refill_rate: 5 };
/// let mut state: LimiterState = strategy.initial_state();
/// assert_eq!(state, LimiterState::TokenBucket(TokenBucketState { tat: 0 }));
/// strategy.check(&mut state, Timestamp::from_millis(1_000), 1);
/// // What a file or a Redis hash holds: plain and tagged by strategy.
/// let stored = serde_json::to_string(&state).expect("serialisable");
/// assert_eq!(stored, r#"{"strategy":"token_bucket","tat":1200000000}"#);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "strategy", rename_all = "snake_case")]
#[non_exhaustive]
pub enum LimiterState {
    /// State of a fixed window.
    FixedWindow(FixedWindowState),
    /// State of a sliding window.
    SlidingWindow(SlidingWindowState),
    /// State of a token bucket.
    TokenBucket(TokenBucketState),
    /// State of a leaky bucket.
    LeakyBucket(LeakyBucketState),
}

/// A slot held by a waiting request, so that it can be given back.
///
/// Used with limiters shared beyond this process (a custom
/// [`RateLimiter`](super::RateLimiter), the Redis store); the built-in
/// limiter in memory queues its waiters instead and reserves nothing (see
/// [`BackpressureConfig`](super::BackpressureConfig)).
///
/// A waiter reserves its slot at once (the state moves forward), then sleeps.
/// If its future is dropped before the sleep ends, the slot is given back
/// **only if no later request has reserved since**: later waiters were
/// promised slots computed after this one, and handing the slot to a newcomer
/// would let the newcomer and a later waiter pass together, beyond the
/// limit. A slot that cannot be given back is simply unused; its capacity
/// returns as time passes, like that of any idle moment.
///
/// ```
/// use pmcp_resilience::rate_limit::{KeyedRateLimiter, RateLimitStrategy};
/// use pmcp_resilience::Timestamp;
/// use std::time::Duration;
///
/// let limiter = KeyedRateLimiter::with_strategy(RateLimitStrategy::TokenBucket { capacity: 1, refill_rate: 1 })?;
/// let now = Timestamp::from_millis(1_767_225_600_000);
/// let max_wait = Duration::from_secs(5);
/// limiter.acquire_key_at("alice", 1, now, max_wait); // takes the only token
/// let waiter = limiter.acquire_key_at("alice", 1, now, max_wait);
/// assert_eq!(waiter.decision.wait, Duration::from_secs(1));
/// let reservation = waiter.reservation.expect("a waiting request holds a slot");
/// assert_eq!(reservation.cost, 1);
/// // The caller gave up before its turn: no later request reserved since, so the slot comes back.
/// assert!(limiter.cancel_at("alice", &reservation, now));
/// # Ok::<(), pmcp_resilience::ConfigError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservation {
    /// Units reserved.
    pub cost: u32,
    /// The key's state before the reservation.
    pub before: LimiterState,
    /// The key's state right after it.
    pub after: LimiterState,
}

/// The answer of a limiter to one request.
///
/// ```
/// use pmcp_resilience::rate_limit::{Decision, RateLimitStrategy};
/// use pmcp_resilience::Timestamp;
/// use std::time::Duration;
///
/// let strategy = RateLimitStrategy::FixedWindow { max_requests: 2, window: Duration::from_secs(60) };
/// let mut state = strategy.initial_state();
/// let now = Timestamp::from_millis(1_767_225_600_000); // 2026-01-01T00:00:00Z, a window start
/// let first: Decision = strategy.check(&mut state, now, 1);
/// assert!(first.allowed);
/// assert_eq!((first.remaining, first.limit), (1, 2));
/// assert_eq!(first.reset_at, now.saturating_add(Duration::from_secs(60)));
/// strategy.check(&mut state, now, 1);
/// let third = strategy.check(&mut state, now, 1);
/// assert!(!third.allowed);
/// assert_eq!(third.retry_after, Some(Duration::from_secs(60))); // when the next window opens
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// Whether the request may proceed (possibly after [`wait`](Self::wait)).
    pub allowed: bool,
    /// Units still available to the key right after this decision.
    pub remaining: u32,
    /// The key's limit (capacity or units per window).
    pub limit: u32,
    /// When the key is back at its full limit (or the current window ends),
    /// if nothing else arrives.
    pub reset_at: Timestamp,
    /// For a rejected request: how long until the same cost would be
    /// admitted, if nothing else arrives. `None` when it never will, because
    /// the cost exceeds the limit. `Some(Duration::ZERO)` when allowed.
    pub retry_after: Option<Duration>,
    /// For an admitted request: how long it must wait before it proceeds
    /// (a reservation, or the leaky bucket's spacing). Zero otherwise.
    pub wait: Duration,
}

impl Decision {
    pub(crate) fn allow(remaining: u32, limit: u32, reset_at: u64, wait: u64) -> Self {
        Decision {
            allowed: true,
            remaining,
            limit,
            reset_at: Timestamp::from_nanos(reset_at),
            retry_after: Some(Duration::ZERO),
            wait: Duration::from_nanos(wait),
        }
    }

    pub(crate) fn deny(remaining: u32, limit: u32, reset_at: u64, retry_after: u64) -> Self {
        Decision {
            allowed: false,
            remaining,
            limit,
            reset_at: Timestamp::from_nanos(reset_at),
            retry_after: Some(Duration::from_nanos(retry_after.max(1))),
            wait: Duration::ZERO,
        }
    }

    /// A rejection of a cost larger than the limit: no wait would help.
    pub(crate) fn never(limit: u32, now: Timestamp) -> Self {
        Decision {
            allowed: false,
            remaining: 0,
            limit,
            reset_at: now,
            retry_after: None,
            wait: Duration::ZERO,
        }
    }

    /// Whether the request was rejected because its cost exceeds the limit,
    /// so that it can never pass.
    pub fn exceeds_limit(&self) -> bool {
        !self.allowed && self.retry_after.is_none()
    }
}

/// `a * b` in u64, saturating.
#[inline]
pub(crate) fn mul(a: u64, b: u64) -> u64 {
    a.saturating_mul(b)
}

/// Narrows to u32, saturating.
#[inline]
pub(crate) fn to_u32(v: u64) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests;
