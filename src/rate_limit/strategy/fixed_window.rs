//! The fixed window: a counter per window, windows aligned to the Unix epoch.
//!
//! ```
//! use pmcp_resilience::rate_limit::RateLimitStrategy;
//! use pmcp_resilience::Timestamp;
//! use std::time::Duration;
//!
//! let strategy = RateLimitStrategy::FixedWindow { max_requests: 2, window: Duration::from_secs(1) };
//! let mut state = strategy.initial_state();
//! let at = |ms: u64| Timestamp::from_millis(1_700_000_000_000 + ms);
//! // Two at the end of one window, two more at the start of the next.
//! let admitted = [900, 950, 1000, 1050]
//!     .into_iter()
//!     .filter(|&ms| strategy.check(&mut state, at(ms), 1).allowed)
//!     .count();
//! assert_eq!(admitted, 4); // the boundary effect: 2x within 150 ms
//! ```
//!
//! `count` is the number of units taken from the window starting at
//! `window_start` onward: up to `max` of them belong to that window, the next
//! `max` to the window after it, and so on. That is how a waiting request
//! reserves a place in a later window. A request never straddles two
//! windows: if it does not fit in what is left of one, the rest of that
//! window is skipped.
//!
//! The guarantee: in every aligned window, at most `max` units are admitted
//! (so up to `2 * max` in a window-long interval across a boundary).

use serde::{Deserialize, Serialize};

use super::{Decision, mul, to_u32};

/// State of a fixed window.
///
/// ```
/// use pmcp_resilience::rate_limit::strategy::{FixedWindowState, LimiterState, RateLimitStrategy};
/// use pmcp_resilience::Timestamp;
/// use std::time::Duration;
///
/// let strategy = RateLimitStrategy::FixedWindow { max_requests: 10, window: Duration::from_secs(1) };
/// let mut state = strategy.initial_state();
/// strategy.check(&mut state, Timestamp::from_millis(5_300), 3);
/// // Windows are aligned to the Unix epoch: this one started at 5 s.
/// let start = Timestamp::from_millis(5_000).as_nanos();
/// assert_eq!(state, LimiterState::FixedWindow(FixedWindowState { window_start: start, count: 3 }));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct FixedWindowState {
    /// Start of the current window, nanoseconds since the Unix epoch.
    pub window_start: u64,
    /// Units taken from this window onward (beyond `max`: reservations in
    /// later windows).
    pub count: u64,
}

/// Moves the state to the window containing `now`, dropping what belonged
/// to the windows that have passed.
#[inline]
pub(crate) fn settle(max: u32, window: u64, state: &mut FixedWindowState, now: u64) {
    let aligned = now - now % window;
    if aligned > state.window_start {
        let passed = (aligned - state.window_start) / window;
        state.count = state.count.saturating_sub(mul(passed, u64::from(max)));
        state.window_start = aligned;
    }
}

/// The fixed-window decision; reserves a place in a later window if that
/// window starts within `max_wait`.
#[inline]
pub(crate) fn acquire(
    max: u32,
    window: u64,
    state: &mut FixedWindowState,
    now: u64,
    cost: u32,
    max_wait: u64,
) -> Decision {
    settle(max, window, state, now);
    // A state from the future (another host's clock) is read as starting now.
    let now = now.max(state.window_start);
    let max64 = u64::from(max);
    let window_end = state.window_start.saturating_add(window);
    if cost > max {
        return Decision::never(max, crate::clock::Timestamp::from_nanos(window_end));
    }
    let cost64 = u64::from(cost);
    let room = max64 - state.count % max64;
    // Skip the rest of a window the request does not fit in.
    let first_unit = if cost64 > room {
        state.count + room
    } else {
        state.count
    };
    let index = first_unit / max64;
    let remaining_now = max64.saturating_sub(state.count);
    if index == 0 {
        state.count = first_unit + cost64;
        return Decision::allow(to_u32(max64 - state.count), max, window_end, 0);
    }
    let start = state.window_start.saturating_add(mul(index, window));
    let wait = start - now;
    if wait <= max_wait {
        state.count = first_unit + cost64;
        return Decision::allow(0, max, window_end, wait);
    }
    Decision::deny(to_u32(remaining_now), max, window_end, wait)
}

/// Units used in the window of `now`, and when that window ends (or, with
/// reservations, when the last reserved window ends).
pub(crate) fn usage(max: u32, window: u64, state: &FixedWindowState, now: u64) -> (u32, u64) {
    let mut s = *state;
    settle(max, window, &mut s, now);
    let now = now.max(s.window_start);
    if s.count == 0 {
        return (0, now);
    }
    let windows = s.count.div_ceil(u64::from(max));
    (
        to_u32(s.count.min(u64::from(max))),
        s.window_start.saturating_add(mul(windows, window)),
    )
}
