//! The token bucket, as GCRA (generic cell rate algorithm).
//!
//! ```
//! use pmcp_resilience::rate_limit::RateLimitStrategy;
//! use pmcp_resilience::Timestamp;
//!
//! let strategy = RateLimitStrategy::TokenBucket { capacity: 3, refill_rate: 10 };
//! let mut state = strategy.initial_state();
//! let now = Timestamp::from_millis(1_700_000_000_000);
//! // A full bucket: a burst of 3 passes at once, with no wait.
//! for _ in 0..3 {
//!     let d = strategy.check(&mut state, now, 1);
//!     assert!(d.allowed && d.wait.is_zero());
//! }
//! assert!(!strategy.check(&mut state, now, 1).allowed);
//! ```
//!
//! Instead of a token count and a refill time, the state is one instant: the
//! *theoretical arrival time* `tat`, when the bucket would be full again if
//! nothing else arrived. With `interval = 1 s / refill_rate` (the time one
//! token takes to come back) and `burst = capacity * interval`, a request of
//! `cost` tokens at `now` is admitted when
//! `max(tat, now) + cost * interval <= now + burst`, and then
//! `tat = max(tat, now) + cost * interval`.
//!
//! The guarantee: in any interval of length `T`, at most
//! `capacity + T / interval` tokens are admitted.

use serde::{Deserialize, Serialize};

use super::{Decision, mul, to_u32};

/// State of a token bucket: one timestamp.
///
/// ```
/// use pmcp_resilience::rate_limit::strategy::{LimiterState, RateLimitStrategy, TokenBucketState};
/// use pmcp_resilience::Timestamp;
///
/// // 4 tokens a second: each taken token comes back after 250 ms.
/// let strategy = RateLimitStrategy::TokenBucket { capacity: 4, refill_rate: 4 };
/// let mut state = strategy.initial_state();
/// let now = Timestamp::from_millis(10_000);
/// strategy.check(&mut state, now, 2);
/// let full_again = now.saturating_add(std::time::Duration::from_millis(500));
/// assert_eq!(state, LimiterState::TokenBucket(TokenBucketState { tat: full_again.as_nanos() }));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct TokenBucketState {
    /// Theoretical arrival time, in nanoseconds since the Unix epoch: when the
    /// bucket is full again if nothing else arrives. At or before now: full.
    pub tat: u64,
}

/// The GCRA decision; reserves a later slot if it comes within `max_wait`.
#[inline]
pub(crate) fn acquire(
    capacity: u32,
    interval: u64,
    state: &mut TokenBucketState,
    now: u64,
    cost: u32,
    max_wait: u64,
) -> Decision {
    let burst = mul(u64::from(capacity), interval);
    let base = state.tat.max(now);
    if cost > capacity {
        return Decision::never(capacity, crate::clock::Timestamp::from_nanos(base));
    }
    let new_tat = base.saturating_add(mul(u64::from(cost), interval));
    // The earliest instant at which this request conforms.
    let allow_at = new_tat.saturating_sub(burst);
    if allow_at <= now {
        state.tat = new_tat;
        let remaining = (now.saturating_add(burst) - new_tat) / interval;
        return Decision::allow(to_u32(remaining), capacity, new_tat, 0);
    }
    let wait = allow_at - now;
    if wait <= max_wait {
        state.tat = new_tat;
        return Decision::allow(0, capacity, new_tat, wait);
    }
    let remaining = now.saturating_add(burst).saturating_sub(base) / interval;
    Decision::deny(to_u32(remaining), capacity, base, wait)
}

/// Tokens in use at `now`, and when the bucket is full again.
pub(crate) fn usage(
    capacity: u32,
    interval: u64,
    state: &TokenBucketState,
    now: u64,
) -> (u32, u64) {
    let pending = state.tat.saturating_sub(now);
    let used = pending.div_ceil(interval);
    (to_u32(used).min(capacity), state.tat.max(now))
}
