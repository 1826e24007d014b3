//! The breaker's state machine, driven with exact timestamps (its fields
//! are the crate's own, so these tests live inside it).

use std::time::Duration;

use super::machine::{acquire, is_quiet, record, set_mode};
use super::policy::{BreakerPolicy, FailureRate, OpenBackoff, SlidingWindow, SlowCalls};
use super::state::{
    Admission, BreakerMode, CircuitBreakerState, CircuitState, ProbeId, TransitionReason, Verdict,
};
use crate::clock::Timestamp;

const MS: Duration = Duration::from_millis(1);

fn t(ms: u64) -> Timestamp {
    Timestamp::from_millis(1_000_000 + ms)
}

fn fail(
    s: &mut CircuitBreakerState,
    p: &BreakerPolicy,
    now: Timestamp,
) -> Option<TransitionReason> {
    record(s, p, now, Verdict::Failure, MS, None, 0.5).map(|t| t.reason)
}

fn succeed(s: &mut CircuitBreakerState, p: &BreakerPolicy, now: Timestamp) {
    record(s, p, now, Verdict::Success, MS, None, 0.5);
}

fn probe_of(a: Admission) -> Option<ProbeId> {
    match a {
        Admission::Allowed { probe } => probe,
        Admission::Rejected { .. } => None,
    }
}

// ---------------------------------------------------------------- state machine

#[test]
fn consecutive_failures_open_and_a_success_resets_the_count() {
    let p = BreakerPolicy {
        consecutive_failures: 3,
        ..BreakerPolicy::default()
    };
    let mut s = CircuitBreakerState::default();
    fail(&mut s, &p, t(0));
    fail(&mut s, &p, t(1));
    succeed(&mut s, &p, t(2));
    assert_eq!(fail(&mut s, &p, t(3)), None);
    assert_eq!(fail(&mut s, &p, t(4)), None);
    assert_eq!(s.state, CircuitState::Closed);
    assert_eq!(
        fail(&mut s, &p, t(5)),
        Some(TransitionReason::ConsecutiveFailures)
    );
    assert_eq!(s.state, CircuitState::Open);
    assert_eq!(
        acquire(&mut s, &p, t(6), 0.5).0,
        Admission::Rejected {
            retry_after: p.timeout - MS
        }
    );
}

#[test]
fn failure_rate_trips_only_after_the_minimum_calls() {
    let p = BreakerPolicy {
        consecutive_failures: 0,
        window: SlidingWindow::Calls(10),
        failure_rate: Some(FailureRate {
            threshold: 0.5,
            minimum_calls: 6,
        }),
        ..BreakerPolicy::default()
    };
    let mut s = CircuitBreakerState::default();
    // F S F S F: 60% failures but only 5 calls.
    for i in 0..5 {
        if i % 2 == 0 {
            assert_eq!(fail(&mut s, &p, t(i)), None);
        } else {
            succeed(&mut s, &p, t(i));
        }
    }
    assert_eq!(s.state, CircuitState::Closed);
    assert_eq!(fail(&mut s, &p, t(6)), Some(TransitionReason::FailureRate));
}

#[test]
fn failure_rate_over_a_time_window_forgets_old_calls() {
    let p = BreakerPolicy {
        consecutive_failures: 0,
        window: SlidingWindow::Time(Duration::from_secs(8)),
        failure_rate: Some(FailureRate {
            threshold: 1.0,
            minimum_calls: 3,
        }),
        ..BreakerPolicy::default()
    };
    let mut s = CircuitBreakerState::default();
    fail(&mut s, &p, t(0));
    fail(&mut s, &p, t(1));
    // Ten seconds later the first two have left the window.
    assert_eq!(fail(&mut s, &p, t(10_000)), None);
    assert_eq!(s.window_totals(&p, t(10_000)).calls, 1);
    fail(&mut s, &p, t(10_001));
    assert_eq!(
        fail(&mut s, &p, t(10_002)),
        Some(TransitionReason::FailureRate)
    );
}

#[test]
fn slow_calls_trip() {
    let p = BreakerPolicy {
        consecutive_failures: 0,
        window: SlidingWindow::Calls(20),
        slow_calls: Some(SlowCalls {
            duration: Duration::from_secs(2),
            threshold: 0.5,
            minimum_calls: 4,
        }),
        ..BreakerPolicy::default()
    };
    let mut s = CircuitBreakerState::default();
    let slow = Duration::from_secs(3);
    assert!(record(&mut s, &p, t(0), Verdict::Success, slow, None, 0.5).is_none());
    assert!(record(&mut s, &p, t(1), Verdict::Success, MS, None, 0.5).is_none());
    assert!(record(&mut s, &p, t(2), Verdict::Success, MS, None, 0.5).is_none());
    let tr = record(&mut s, &p, t(3), Verdict::Success, slow, None, 0.5);
    assert_eq!(tr.map(|t| t.reason), Some(TransitionReason::SlowCallRate));
}

#[test]
fn open_half_open_closed_and_probe_failure_reopens() {
    let p = BreakerPolicy {
        consecutive_failures: 1,
        success_threshold: 2,
        timeout: Duration::from_secs(10),
        ..BreakerPolicy::default()
    };
    let mut s = CircuitBreakerState::default();
    fail(&mut s, &p, t(0));
    assert!(matches!(
        acquire(&mut s, &p, t(9_999), 0.5).0,
        Admission::Rejected { .. }
    ));
    // Open -> half-open after the timeout; one probe at a time.
    let (a, tr) = acquire(&mut s, &p, t(10_000), 0.5);
    assert_eq!(tr.map(|t| t.to), Some(CircuitState::HalfOpen));
    let probe = probe_of(a);
    assert!(probe.is_some());
    assert!(matches!(
        acquire(&mut s, &p, t(10_001), 0.5).0,
        Admission::Rejected { .. }
    ));
    assert!(record(&mut s, &p, t(10_002), Verdict::Success, MS, probe, 0.5).is_none());
    assert_eq!(s.state, CircuitState::HalfOpen);
    let probe = probe_of(acquire(&mut s, &p, t(10_003), 0.5).0);
    let tr = record(&mut s, &p, t(10_004), Verdict::Success, MS, probe, 0.5);
    assert_eq!(
        tr.map(|t| (t.to, t.reason)),
        Some((CircuitState::Closed, TransitionReason::ProbesSucceeded))
    );

    // Trip again, then fail the probe: straight back to open.
    fail(&mut s, &p, t(20_000));
    let probe = probe_of(acquire(&mut s, &p, t(30_000), 0.5).0);
    let tr = record(&mut s, &p, t(30_001), Verdict::Failure, MS, probe, 0.5);
    assert_eq!(
        tr.map(|t| (t.from, t.to, t.reason)),
        Some((
            CircuitState::HalfOpen,
            CircuitState::Open,
            TransitionReason::ProbeFailed
        ))
    );
    assert_eq!(s.open_until, t(40_001));
}

#[test]
fn backoff_grows_per_trip_and_is_capped() {
    let p = BreakerPolicy {
        timeout: Duration::from_secs(10),
        open_backoff: Some(OpenBackoff {
            multiplier: 2.0,
            max: Duration::from_secs(60),
            jitter: 0.0,
        }),
        ..BreakerPolicy::default()
    };
    let secs: Vec<u64> = (1..=5).map(|n| p.open_duration(n, 0.3).as_secs()).collect();
    assert_eq!(secs, vec![10, 20, 40, 60, 60]);

    // Through the state machine: each failed probe lengthens the next open time.
    let p = BreakerPolicy {
        consecutive_failures: 1,
        ..p
    };
    let mut s = CircuitBreakerState::default();
    fail(&mut s, &p, t(0));
    assert_eq!(s.open_until, t(10_000));
    let probe = probe_of(acquire(&mut s, &p, t(10_000), 0.5).0);
    record(&mut s, &p, t(10_000), Verdict::Failure, MS, probe, 0.5);
    assert_eq!(s.open_until, t(30_000));
    assert_eq!(s.trips, 2);
}

#[test]
fn jitter_stays_within_its_bounds_and_under_the_cap() {
    let p = BreakerPolicy {
        timeout: Duration::from_secs(10),
        open_backoff: Some(OpenBackoff {
            multiplier: 2.0,
            max: Duration::from_secs(30),
            jitter: 0.2,
        }),
        ..BreakerPolicy::default()
    };
    assert_eq!(p.open_duration(1, 0.0), Duration::from_secs(8));
    assert_eq!(p.open_duration(1, 0.5), Duration::from_secs(10));
    for i in 0..=100 {
        let u = f64::from(i) / 100.0;
        let d = p.open_duration(1, u);
        assert!(
            d >= Duration::from_secs(8) && d <= Duration::from_secs(12),
            "{d:?}"
        );
        assert!(p.open_duration(5, u) <= Duration::from_secs(30));
    }
}

#[test]
fn a_probe_that_never_answers_is_released_after_its_deadline_as_a_failure() {
    let p = BreakerPolicy {
        consecutive_failures: 1,
        timeout: Duration::from_secs(10),
        probe_deadline: Duration::from_secs(5),
        ..BreakerPolicy::default()
    };
    let mut s = CircuitBreakerState::default();
    fail(&mut s, &p, t(0));
    let lost = probe_of(acquire(&mut s, &p, t(10_000), 0.5).0);
    assert!(lost.is_some());
    assert!(matches!(
        acquire(&mut s, &p, t(14_999), 0.5).0,
        Admission::Rejected { .. }
    ));
    // At the deadline the probe counts as failed: the breaker reopens.
    let (a, tr) = acquire(&mut s, &p, t(15_000), 0.5);
    assert_eq!(tr.map(|t| t.reason), Some(TransitionReason::ProbeDeadline));
    assert!(matches!(a, Admission::Rejected { .. }));
    assert!(s.probes.is_empty());
    // Its late answer changes nothing.
    assert!(record(&mut s, &p, t(15_001), Verdict::Success, MS, lost, 0.5).is_none());
    assert_eq!(s.state, CircuitState::Open);
}

#[test]
fn the_state_serialises_round_trip() {
    let p = BreakerPolicy::default();
    let mut s = CircuitBreakerState::default();
    fail(&mut s, &p, t(0));
    let text = serde_json::to_string(&s).unwrap_or_default();
    let back: Option<CircuitBreakerState> = serde_json::from_str(&text).ok();
    assert_eq!(back, Some(s));
}

/// A fast path may admit calls and record successes of a quiet key without
/// running the state machine; that is only right if the state machine would
/// have changed nothing.
#[test]
fn a_quiet_state_admits_and_succeeds_without_changing() {
    let p = BreakerPolicy {
        consecutive_failures: 3,
        ..BreakerPolicy::default()
    };
    assert!(p.failure_rate.is_none() && p.failures_in_window.is_none() && p.slow_calls.is_none());
    let mut s = CircuitBreakerState::default();
    assert!(is_quiet(&s));
    let before = s.clone();
    let (admission, transition) = acquire(&mut s, &p, t(0), 0.5);
    assert_eq!(admission, Admission::Allowed { probe: None });
    assert_eq!(transition, None);
    assert_eq!(
        record(&mut s, &p, t(1), Verdict::Success, MS, None, 0.5),
        None
    );
    assert_eq!(s, before);
    // A failure, an open breaker or an operator's mode is not quiet.
    fail(&mut s, &p, t(2));
    assert!(!is_quiet(&s));
    succeed(&mut s, &p, t(3));
    assert!(is_quiet(&s));
    for i in 0..3 {
        fail(&mut s, &p, t(4 + i));
    }
    assert_eq!(s.state, CircuitState::Open);
    assert!(!is_quiet(&s));
    let mut forced = CircuitBreakerState::default();
    set_mode(&mut forced, BreakerMode::MetricsOnly);
    assert!(!is_quiet(&forced));
}
