//! The leaky bucket, as a queue that lets units out at a steady rate.
//!
//! ```
//! use pmcp_resilience::rate_limit::RateLimitStrategy;
//! use pmcp_resilience::Timestamp;
//! use std::time::Duration;
//!
//! let strategy = RateLimitStrategy::LeakyBucket { capacity: 3, leak_rate: 10 };
//! let mut state = strategy.initial_state();
//! let now = Timestamp::from_millis(1_700_000_000_000);
//! // The same burst as the token bucket's: admitted, but spaced 100 ms apart.
//! let waits: Vec<Duration> = (0..3).map(|_| strategy.check(&mut state, now, 1).wait).collect();
//! assert_eq!(waits, [0, 100, 200].map(Duration::from_millis));
//! assert!(!strategy.check(&mut state, now, 1).allowed); // the queue is full
//! ```
//!
//! The state is one instant, `next_free`: when the unit last admitted has
//! left the bucket (`interval = 1 s / leak_rate` per unit). A request of
//! `cost` units arriving at `now` finds `level = max(next_free - now, 0)`
//! worth of units ahead of it. It is admitted when
//! `level + cost * interval <= capacity * interval`, and then proceeds at
//! `start = max(next_free, now)`; the caller waits `start - now`. Then
//! `next_free = start + cost * interval`.
//!
//! What users see, compared with the token bucket of the same numbers: a
//! token bucket lets `capacity` requests through *at once* and then one per
//! interval; the leaky bucket never lets two requests through closer than
//! `interval` (times the earlier one's cost). Early requests are delayed
//! rather than bunched, so the server sees a smooth stream; `capacity` only
//! bounds how many can be waiting (the one leaking now included).
//! Its delays are at most `capacity * interval`.

use serde::{Deserialize, Serialize};

use super::{Decision, mul, to_u32};

/// State of a leaky bucket: one timestamp.
///
/// ```
/// use pmcp_resilience::rate_limit::strategy::{LeakyBucketState, LimiterState, RateLimitStrategy};
/// use pmcp_resilience::Timestamp;
/// use std::time::Duration;
///
/// // Two units a second leak out: one every 500 ms.
/// let strategy = RateLimitStrategy::LeakyBucket { capacity: 5, leak_rate: 2 };
/// let mut state = strategy.initial_state();
/// let now = Timestamp::from_millis(10_000);
/// assert!(strategy.check(&mut state, now, 1).allowed);
/// let empty_at = now.saturating_add(Duration::from_millis(500)).as_nanos();
/// assert_eq!(state, LimiterState::LeakyBucket(LeakyBucketState { next_free: empty_at }));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct LeakyBucketState {
    /// When the last admitted unit has left, in nanoseconds since the Unix
    /// epoch. At or before now: the bucket is empty.
    pub next_free: u64,
}

/// The leaky-bucket decision. The delay it returns is the queue itself, so
/// it does not depend on the caller's `max_wait`.
#[inline]
pub(crate) fn acquire(
    capacity: u32,
    interval: u64,
    state: &mut LeakyBucketState,
    now: u64,
    cost: u32,
) -> Decision {
    let room = mul(u64::from(capacity), interval);
    let start = state.next_free.max(now);
    if cost > capacity {
        return Decision::never(capacity, crate::clock::Timestamp::from_nanos(start));
    }
    let level = start - now;
    let needed = mul(u64::from(cost), interval);
    if level.saturating_add(needed) <= room {
        let next_free = start.saturating_add(needed);
        state.next_free = next_free;
        let remaining = (room - (next_free - now)) / interval;
        return Decision::allow(to_u32(remaining), capacity, next_free, level);
    }
    let retry_after = level.saturating_add(needed) - room;
    let remaining = room.saturating_sub(level) / interval;
    Decision::deny(to_u32(remaining), capacity, start, retry_after)
}

/// Units in the bucket at `now`, and when it is empty again.
pub(crate) fn usage(
    capacity: u32,
    interval: u64,
    state: &LeakyBucketState,
    now: u64,
) -> (u32, u64) {
    let level = state.next_free.saturating_sub(now);
    (
        to_u32(level.div_ceil(interval)).min(capacity),
        state.next_free.max(now),
    )
}
