//! The sliding window, as a weighted two-window counter.
//!
//! ```
//! use pmcp_resilience::rate_limit::RateLimitStrategy;
//! use pmcp_resilience::Timestamp;
//! use std::time::Duration;
//!
//! let strategy = RateLimitStrategy::SlidingWindow { max_requests: 2, window: Duration::from_secs(1) };
//! let mut state = strategy.initial_state();
//! let at = |ms: u64| Timestamp::from_millis(1_700_000_000_000 + ms);
//! // The same traffic as the fixed window's example: the edge burst is refused.
//! let admitted = [900, 950, 1000, 1050]
//!     .into_iter()
//!     .filter(|&ms| strategy.check(&mut state, at(ms), 1).allowed)
//!     .count();
//! assert_eq!(admitted, 2);
//! ```
//!
//! Time is cut into aligned windows of length `W`, and the state keeps the
//! units admitted in the current window (`current`) and in the one before
//! (`previous`). At `e` nanoseconds into the current window, the rolling
//! window `(now - W, now]` still covers the last `W - e` of the previous
//! window, so the estimate is `previous * (W - e) / W + current`: exact if
//! the previous window's requests were spread evenly. A request of `cost`
//! is admitted when `previous * (W - e) + (current + cost) * W <= max * W`
//! (integers only).
//!
//! # Error bound
//!
//! Every window-long interval `(t - W, t]` ending at an admission holds at
//! most `max + previous * e / W` units, where `previous` and `e` are taken
//! at `t`. Proof: the interval holds `current` (all of which counted
//! exactly) plus the previous window's units that fall in its last `W - e`,
//! at most `previous`; the admission rule keeps
//! `current <= max - previous * (W - e) / W`; adding gives the bound. So the
//! over-admission compared with an exact sliding log is at most the share
//! `e / W` of the previous window's count that the estimate assumed had
//! already slid out, and never more than `max` (against `max` for the fixed
//! window, which can admit `2 * max` across a boundary). In each aligned
//! window at most `max` units are admitted, as with the fixed window. The
//! property tests check both against an exact log.
//!
//! A waiting request can reserve only within the current window (its units
//! count in `current` at once); when the earliest fit is in a later window it
//! is rejected with the time to retry.

use serde::{Deserialize, Serialize};

use super::{Decision, to_u32};

/// State of a sliding window: two counters.
///
/// ```
/// use pmcp_resilience::rate_limit::strategy::{LimiterState, RateLimitStrategy, SlidingWindowState};
/// use pmcp_resilience::Timestamp;
/// use std::time::Duration;
///
/// let strategy = RateLimitStrategy::SlidingWindow { max_requests: 10, window: Duration::from_secs(1) };
/// let mut state = strategy.initial_state();
/// strategy.check(&mut state, Timestamp::from_millis(5_300), 4);
/// strategy.check(&mut state, Timestamp::from_millis(6_100), 1);
/// // In the window that started at 6 s: 1 unit now, 4 in the window before.
/// let start = Timestamp::from_millis(6_000).as_nanos();
/// let expected = SlidingWindowState { window_start: start, current: 1, previous: 4 };
/// assert_eq!(state, LimiterState::SlidingWindow(expected));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SlidingWindowState {
    /// Start of the current window, nanoseconds since the Unix epoch.
    pub window_start: u64,
    /// Units admitted in the current window.
    pub current: u32,
    /// Units admitted in the window before it.
    pub previous: u32,
}

/// Moves the state to the window containing `now`.
#[inline]
pub(crate) fn settle(window: u64, state: &mut SlidingWindowState, now: u64) {
    let aligned = now - now % window;
    if aligned > state.window_start {
        let passed = (aligned - state.window_start) / window;
        state.previous = if passed == 1 { state.current } else { 0 };
        state.current = 0;
        state.window_start = aligned;
    }
}

/// `previous * (W - e) + current * W`, in units of `1 / W`.
#[inline]
fn weighted(window: u64, previous: u32, current: u64, elapsed: u64) -> u128 {
    u128::from(previous) * u128::from(window - elapsed) + u128::from(current) * u128::from(window)
}

/// The sliding-window decision; reserves within the current window if the
/// earliest fit comes within `max_wait`.
#[inline]
pub(crate) fn acquire(
    max: u32,
    window: u64,
    state: &mut SlidingWindowState,
    now: u64,
    cost: u32,
    max_wait: u64,
) -> Decision {
    settle(window, state, now);
    // A state from the future (another host's clock) is read as starting now.
    let now = now.max(state.window_start);
    let window_end = state.window_start.saturating_add(window);
    if cost > max {
        return Decision::never(max, crate::clock::Timestamp::from_nanos(window_end));
    }
    let w = u128::from(window);
    let limit = u128::from(max) * w;
    let elapsed = now - state.window_start;
    let used = weighted(window, state.previous, u64::from(state.current), elapsed);
    let remaining = to_u32(u64::try_from(limit.saturating_sub(used) / w).unwrap_or(u64::MAX));
    let reset_at = if state.current > 0 {
        window_end.saturating_add(window)
    } else {
        window_end
    };
    let after = u64::from(state.current) + u64::from(cost);
    if weighted(window, state.previous, after, elapsed) <= limit {
        state.current = to_u32(after);
        let left = limit - weighted(window, state.previous, after, elapsed);
        return Decision::allow(
            to_u32(u64::try_from(left / w).unwrap_or(u64::MAX)),
            max,
            reset_at,
            0,
        );
    }
    // Earliest offset in this window where it fits: previous * (W - e') <= room * W.
    if after <= u64::from(max) && state.previous > 0 {
        let room = u128::from(u64::from(max) - after) * w;
        let overlap = room / u128::from(state.previous);
        // overlap < W here, since the request did not fit at `elapsed`.
        let fit_at = window - u64::try_from(overlap).unwrap_or(window).min(window);
        let wait = fit_at.saturating_sub(elapsed);
        if wait <= max_wait {
            state.current = to_u32(after);
            return Decision::allow(0, max, reset_at, wait);
        }
        return Decision::deny(remaining, max, reset_at, wait);
    }
    // Next window: `current` becomes the weighted part.
    let room = u128::from(u64::from(max) - u64::from(cost)) * w;
    let fit_in_next = if state.current == 0 {
        0
    } else {
        let overlap = u64::try_from(room / u128::from(state.current)).unwrap_or(window);
        window - overlap.min(window)
    };
    let wait = (window - elapsed).saturating_add(fit_in_next);
    Decision::deny(remaining, max, reset_at, wait)
}

/// The weighted units in use at `now`, and when the estimate is back to zero.
pub(crate) fn usage(max: u32, window: u64, state: &SlidingWindowState, now: u64) -> (u32, u64) {
    let mut s = *state;
    settle(window, &mut s, now);
    let now = now.max(s.window_start);
    let elapsed = now - s.window_start;
    let used =
        weighted(window, s.previous, u64::from(s.current), elapsed).div_ceil(u128::from(window));
    let reset_at = if s.current > 0 {
        s.window_start.saturating_add(2 * window)
    } else if s.previous > 0 {
        s.window_start.saturating_add(window)
    } else {
        now
    };
    (
        to_u32(u64::try_from(used).unwrap_or(u64::MAX)).min(max.max(s.current)),
        reset_at,
    )
}
