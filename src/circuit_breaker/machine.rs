//! The breaker's state machine: pure functions over one key's small state.
//!
//! [`acquire`] decides whether a call may start; [`record`] folds its outcome
//! back in. Neither touches a lock, a map or a clock: the caller passes the
//! time (and a random number for jitter), so the same functions run in memory,
//! over a file, or mirrored in a Redis script, and tests drive them with exact
//! timestamps.
//!
//! ```
//! use pmcp_resilience::circuit_breaker::{BreakerPolicy, CircuitState, Verdict};
//! use pmcp_resilience::store::{acquire, record, Admission, CircuitBreakerState};
//! use pmcp_resilience::Timestamp;
//! use std::time::Duration;
//!
//! let policy = BreakerPolicy { consecutive_failures: 2, ..BreakerPolicy::default() };
//! let mut state = CircuitBreakerState::default();
//! let now = Timestamp::from_millis(1_000);
//! for _ in 0..2 {
//!     let (admission, _) = acquire(&mut state, &policy, now, 0.5);
//!     assert!(matches!(admission, Admission::Allowed { probe: None }));
//!     record(&mut state, &policy, now, Verdict::Failure, Duration::ZERO, None, 0.5);
//! }
//! assert_eq!(state.effective_state(), CircuitState::Open);
//! assert!(matches!(acquire(&mut state, &policy, now, 0.5).0, Admission::Rejected { .. }));
//! ```

use std::time::Duration;

use super::state::*;
use crate::clock::{Timestamp, duration_nanos};

fn time_bucket_nanos(d: Duration) -> u64 {
    (duration_nanos(d) / WINDOW_BUCKETS as u64).max(1)
}

pub(super) fn current_slot(
    state: &CircuitBreakerState,
    policy: &BreakerPolicy,
    now: Timestamp,
) -> u64 {
    match policy.window {
        SlidingWindow::Calls(_) => state.window_head,
        SlidingWindow::Time(d) => now.as_nanos() / time_bucket_nanos(d),
    }
}

fn add_to_window(
    state: &mut CircuitBreakerState,
    policy: &BreakerPolicy,
    now: Timestamp,
    failed: bool,
    slow: bool,
) {
    let shape = policy.window_shape();
    if state.window_shape != shape || state.window.len() != WINDOW_BUCKETS {
        state.window = vec![Bucket::default(); WINDOW_BUCKETS];
        state.window_head = 0;
        state.window_shape = shape;
    }
    let slot = match policy.window {
        SlidingWindow::Time(d) => now.as_nanos() / time_bucket_nanos(d),
        SlidingWindow::Calls(n) => {
            let per_bucket = n.div_ceil(WINDOW_BUCKETS as u32).max(1);
            let head = state.window_head;
            let full = state
                .window
                .get((head % WINDOW_BUCKETS as u64) as usize)
                .is_some_and(|b| b.slot == head && b.calls >= per_bucket);
            if full {
                state.window_head = head + 1;
            }
            state.window_head
        }
    };
    let Some(bucket) = state
        .window
        .get_mut((slot % WINDOW_BUCKETS as u64) as usize)
    else {
        return;
    };
    if bucket.slot != slot {
        *bucket = Bucket {
            slot,
            ..Bucket::default()
        };
    }
    bucket.calls = bucket.calls.saturating_add(1);
    bucket.failures = bucket.failures.saturating_add(u32::from(failed));
    bucket.slow = bucket.slow.saturating_add(u32::from(slow));
}

fn open(
    state: &mut CircuitBreakerState,
    policy: &BreakerPolicy,
    now: Timestamp,
    jitter: f64,
    reason: TransitionReason,
) -> Transition {
    let from = state.state;
    state.state = CircuitState::Open;
    state.trips = state.trips.saturating_add(1);
    state.opened_at = now;
    state.open_until = now.saturating_add(policy.open_duration(state.trips, jitter));
    state.probes.clear();
    state.half_open_successes = 0;
    state.consecutive_failures = 0;
    Transition {
        from,
        to: CircuitState::Open,
        reason,
    }
}

fn close(state: &mut CircuitBreakerState) -> Transition {
    let from = state.state;
    state.state = CircuitState::Closed;
    state.trips = 0;
    state.probes.clear();
    state.half_open_successes = 0;
    state.consecutive_failures = 0;
    state.window = Default::default();
    Transition {
        from,
        to: CircuitState::Closed,
        reason: TransitionReason::ProbesSucceeded,
    }
}

/// Fails the probes whose deadline has passed: in half-open, one such probe
/// reopens the breaker.
fn expire_probes(
    state: &mut CircuitBreakerState,
    policy: &BreakerPolicy,
    now: Timestamp,
    jitter: f64,
) -> Option<Transition> {
    if state.state != CircuitState::HalfOpen || state.probes.iter().all(|p| p.deadline > now) {
        return None;
    }
    Some(open(
        state,
        policy,
        now,
        jitter,
        TransitionReason::ProbeDeadline,
    ))
}

fn is_counting(mode: BreakerMode) -> bool {
    matches!(mode, BreakerMode::Normal | BreakerMode::MetricsOnly)
}

/// Decides whether a call may start at `now`. `jitter` is a random number in
/// [0, 1) used if the breaker reopens (a probe past its deadline).
///
/// Returns the admission and the transition it caused, if any.
pub fn acquire(
    state: &mut CircuitBreakerState,
    policy: &BreakerPolicy,
    now: Timestamp,
    jitter: f64,
) -> (Admission, Option<Transition>) {
    const ALLOWED: Admission = Admission::Allowed { probe: None };
    match state.mode {
        BreakerMode::Disabled | BreakerMode::ForcedClosed => return (ALLOWED, None),
        BreakerMode::ForcedOpen => {
            return (
                Admission::Rejected {
                    retry_after: policy.timeout,
                },
                None,
            );
        }
        BreakerMode::Normal | BreakerMode::MetricsOnly => {}
    }
    let dry_run = state.mode == BreakerMode::MetricsOnly;
    let mut transition = expire_probes(state, policy, now, jitter);
    if state.state == CircuitState::Open {
        if now < state.open_until {
            let admission = if dry_run {
                ALLOWED
            } else {
                Admission::Rejected {
                    retry_after: state.open_until.saturating_since(now),
                }
            };
            return (admission, transition);
        }
        state.state = CircuitState::HalfOpen;
        state.half_open_successes = 0;
        state.probes.clear();
        transition = Some(Transition {
            from: CircuitState::Open,
            to: CircuitState::HalfOpen,
            reason: TransitionReason::OpenTimeElapsed,
        });
    }
    if state.state == CircuitState::HalfOpen {
        if dry_run {
            return (ALLOWED, transition);
        }
        if state.probes.len() as u64 >= u64::from(policy.half_open_max_probes.max(1)) {
            let retry_after = state
                .probes
                .iter()
                .map(|p| p.deadline.saturating_since(now))
                .min()
                .unwrap_or(Duration::ZERO);
            return (Admission::Rejected { retry_after }, transition);
        }
        let id = ProbeId(state.next_probe);
        state.next_probe = state.next_probe.wrapping_add(1);
        state.probes.push(Probe {
            id,
            deadline: now.saturating_add(policy.probe_deadline),
        });
        return (Admission::Allowed { probe: Some(id) }, transition);
    }
    (ALLOWED, transition)
}

/// Folds the outcome of a call into the state at `now`. `elapsed` is the
/// call's duration (for the slow-call rule), `probe` the id [`acquire`] gave,
/// and `jitter` a random number in [0, 1) used if the breaker opens.
pub fn record(
    state: &mut CircuitBreakerState,
    policy: &BreakerPolicy,
    now: Timestamp,
    result: Verdict,
    elapsed: Duration,
    probe: Option<ProbeId>,
    jitter: f64,
) -> Option<Transition> {
    let expired = expire_probes(state, policy, now, jitter);
    let was_probe = match probe {
        Some(id) => match state.probes.iter().position(|p| p.id == id) {
            Some(i) => {
                state.probes.swap_remove(i);
                true
            }
            None => false,
        },
        None => false,
    };
    let failed = match result {
        Verdict::Neutral => return expired,
        Verdict::Failure | Verdict::TimedOut => true,
        Verdict::Success => false,
    };
    if !is_counting(state.mode) {
        return expired;
    }
    // A timed-out call is slow by its elapsed time like any other (the
    // Redis script sees only the time).
    let slow = policy.slow_calls.is_some_and(|s| elapsed >= s.duration);
    let transition = match state.state {
        CircuitState::Closed => {
            if policy.uses_window() {
                add_to_window(state, policy, now, failed, slow);
            }
            if failed {
                state.consecutive_failures = state.consecutive_failures.saturating_add(1);
            } else {
                state.consecutive_failures = 0;
            }
            trip_reason(state, policy, now).map(|r| open(state, policy, now, jitter, r))
        }
        CircuitState::HalfOpen if was_probe || state.mode == BreakerMode::MetricsOnly => {
            if failed {
                Some(open(
                    state,
                    policy,
                    now,
                    jitter,
                    TransitionReason::ProbeFailed,
                ))
            } else {
                state.half_open_successes = state.half_open_successes.saturating_add(1);
                (state.half_open_successes >= policy.success_threshold.max(1)).then(|| close(state))
            }
        }
        // Late answers of calls admitted before the breaker opened say
        // nothing about the server now.
        CircuitState::HalfOpen | CircuitState::Open => None,
    };
    transition.or(expired)
}

fn trip_reason(
    state: &CircuitBreakerState,
    policy: &BreakerPolicy,
    now: Timestamp,
) -> Option<TransitionReason> {
    if policy.consecutive_failures > 0 && state.consecutive_failures >= policy.consecutive_failures
    {
        return Some(TransitionReason::ConsecutiveFailures);
    }
    if !policy.uses_window() {
        return None;
    }
    let totals = state.window_totals(policy, now);
    if let Some(limit) = policy.failures_in_window
        && totals.failures >= limit
    {
        return Some(TransitionReason::FailuresInWindow);
    }
    let calls = f64::from(totals.calls);
    if let Some(rate) = policy.failure_rate
        && totals.calls >= rate.minimum_calls.max(1)
        && f64::from(totals.failures) / calls >= rate.threshold
    {
        return Some(TransitionReason::FailureRate);
    }
    if let Some(slow) = policy.slow_calls
        && totals.calls >= slow.minimum_calls.max(1)
        && f64::from(totals.slow) / calls >= slow.threshold
    {
        return Some(TransitionReason::SlowCallRate);
    }
    None
}

/// Whether `state` is quiet: closed, in normal mode, with no failure counted
/// and no probe. Under a policy without window rules ([`BreakerPolicy`]'s
/// `uses_window` false), a quiet state admits every call and a success
/// leaves it unchanged: [`acquire`] returns `Allowed` with no probe and no
/// transition, and [`record`] of a success returns `None`, neither writing
/// anything: a fast path may skip both. The tests hold the state machine to
/// this.
#[cfg(test)]
pub(crate) fn is_quiet(state: &CircuitBreakerState) -> bool {
    state.state == CircuitState::Closed
        && state.mode == BreakerMode::Normal
        && state.consecutive_failures == 0
        && state.probes.is_empty()
}

/// Sets the operator's mode of a key. Leaving a forced mode keeps the counts.
pub fn set_mode(state: &mut CircuitBreakerState, mode: BreakerMode) {
    state.mode = mode;
}
