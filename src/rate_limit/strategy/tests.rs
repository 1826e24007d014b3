//! Unit and property tests of the pure algorithms.

use std::time::Duration;

use proptest::prelude::*;

use super::*;

const MS: u64 = 1_000_000;
const T0: u64 = 1_767_225_600_000 * MS;

/// One admitted request: when it proceeds and what it cost.
#[derive(Debug, Clone, Copy)]
struct Admitted {
    at: u64,
    cost: u32,
}

/// Runs `arrivals` (gaps in ms, costs) through `policy`, returning the
/// admitted requests with the time they proceed, and the states seen.
fn run(
    policy: Policy,
    arrivals: &[(u64, u32)],
    max_wait: u64,
) -> Vec<(Admitted, LimiterState, u64)> {
    let mut state = policy.initial_state();
    let mut now = T0;
    let mut out = Vec::new();
    for &(gap, cost) in arrivals {
        now += gap;
        let before = policy.settle(&state, now);
        let d = policy.acquire(&mut state, now, cost, max_wait);
        if d.allowed {
            let at = now + duration_nanos(d.wait);
            out.push((Admitted { at, cost }, before, now));
        } else if cost > policy.limit() {
            assert_eq!(d.retry_after, None, "a cost above the limit must say never");
        } else {
            assert!(d.retry_after.is_some());
        }
    }
    out
}

fn arrivals(max_cost: u32) -> impl Strategy<Value = Vec<(u64, u32)>> {
    prop::collection::vec((0u64..40 * MS, 1..=max_cost), 1..150)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Token bucket: in any interval [a, b] at most `capacity + (b - a) / interval` units.
    #[test]
    fn token_bucket_never_exceeds_capacity_plus_refill(
        capacity in 1u32..10,
        rate in 1u32..100,
        input in arrivals(12),
        max_wait_ms in prop_oneof![Just(0u64), 0u64..500],
    ) {
        let policy = RateLimitStrategy::TokenBucket { capacity, refill_rate: rate }.policy().unwrap();
        let Policy::TokenBucket { interval, .. } = policy else { unreachable!() };
        let mut admitted: Vec<Admitted> = run(policy, &input, max_wait_ms * MS).into_iter().map(|r| r.0).collect();
        admitted.sort_by_key(|a| a.at);
        for i in 0..admitted.len() {
            let mut units = 0u64;
            for j in i..admitted.len() {
                units += u64::from(admitted[j].cost);
                let span = admitted[j].at - admitted[i].at;
                prop_assert!(units * interval <= u64::from(capacity) * interval + span,
                    "{units} units in {span} ns");
            }
        }
    }

    /// Fixed window: at most `max` units proceed in each aligned window.
    #[test]
    fn fixed_window_never_exceeds_max_per_window(
        max in 1u32..10,
        window_ms in 1u64..300,
        input in arrivals(12),
        max_wait_ms in prop_oneof![Just(0u64), 0u64..1000],
    ) {
        let window = window_ms * MS;
        let policy = RateLimitStrategy::FixedWindow { max_requests: max, window: Duration::from_nanos(window) }.policy().unwrap();
        let mut per_window = std::collections::HashMap::<u64, u64>::new();
        for (a, _, _) in run(policy, &input, max_wait_ms * MS) {
            *per_window.entry(a.at / window).or_default() += u64::from(a.cost);
        }
        for (w, units) in per_window {
            prop_assert!(units <= u64::from(max), "window {w}: {units} > {max}");
        }
    }

    /// Leaky bucket: consecutive requests proceed at least `cost * interval`
    /// apart, and the queue never holds more than `capacity` units.
    #[test]
    fn leaky_bucket_spaces_admissions_and_bounds_the_queue(
        capacity in 1u32..10,
        rate in 1u32..100,
        input in arrivals(12),
    ) {
        let policy = RateLimitStrategy::LeakyBucket { capacity, leak_rate: rate }.policy().unwrap();
        let Policy::LeakyBucket { interval, .. } = policy else { unreachable!() };
        let admitted = run(policy, &input, 0);
        for pair in admitted.windows(2) {
            let (prev, next) = (pair[0].0, pair[1].0);
            prop_assert!(next.at >= prev.at + u64::from(prev.cost) * interval);
        }
        for (a, _, arrived) in &admitted {
            // Units queued when it was admitted, itself included.
            let queued = a.at - arrived + u64::from(a.cost) * interval;
            prop_assert!(queued <= u64::from(capacity) * interval);
        }
    }

    /// Sliding window: against an exact log, every window-long interval ending
    /// at an admission holds at most `max + previous * e / W` units, and every
    /// aligned window at most `max`.
    #[test]
    fn sliding_window_stays_within_its_bound_of_an_exact_log(
        max in 1u32..20,
        window_ms in 1u64..300,
        input in arrivals(5),
    ) {
        let window = window_ms * MS;
        let policy = RateLimitStrategy::SlidingWindow { max_requests: max, window: Duration::from_nanos(window) }.policy().unwrap();
        let admitted = run(policy, &input, 0);
        let mut per_window = std::collections::HashMap::<u64, u64>::new();
        for (i, (a, before, _)) in admitted.iter().enumerate() {
            *per_window.entry(a.at / window).or_default() += u64::from(a.cost);
            let LimiterState::SlidingWindow(s) = before else { unreachable!() };
            let exact: u64 = admitted[..=i]
                .iter()
                .filter(|(b, _, _)| b.at + window > a.at)
                .map(|(b, _, _)| u64::from(b.cost))
                .sum();
            let e = a.at - s.window_start;
            prop_assert!(
                u128::from(exact) * u128::from(window)
                    <= u128::from(max) * u128::from(window) + u128::from(s.previous) * u128::from(e),
                "exact {exact} > {max} + {} * {e} / {window}", s.previous
            );
            prop_assert!(exact <= 2 * u64::from(max));
        }
        for units in per_window.values() {
            prop_assert!(*units <= u64::from(max));
        }
    }
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

#[test]
fn token_bucket_bursts_then_refills() {
    let s = RateLimitStrategy::TokenBucket {
        capacity: 3,
        refill_rate: 10,
    };
    let mut st = s.initial_state();
    let now = Timestamp::from_nanos(T0);
    for left in [2, 1, 0] {
        let d = s.check(&mut st, now, 1);
        assert!(d.allowed);
        assert_eq!(d.remaining, left);
    }
    let d = s.check(&mut st, now, 1);
    assert!(!d.allowed);
    assert_eq!(d.retry_after, Some(ms(100)));
    assert_eq!(d.reset_at, now.saturating_add(ms(300)));
    assert!(s.check(&mut st, now.saturating_add(ms(100)), 1).allowed);
}

#[test]
fn leaky_bucket_smooths_where_token_bucket_bursts() {
    let now = Timestamp::from_nanos(T0);
    let token = RateLimitStrategy::TokenBucket {
        capacity: 3,
        refill_rate: 10,
    };
    let leaky = RateLimitStrategy::LeakyBucket {
        capacity: 3,
        leak_rate: 10,
    };
    let (mut ts, mut ls) = (token.initial_state(), leaky.initial_state());
    let token_waits: Vec<_> = (0..3).map(|_| token.check(&mut ts, now, 1).wait).collect();
    let leaky_waits: Vec<_> = (0..3).map(|_| leaky.check(&mut ls, now, 1).wait).collect();
    assert_eq!(token_waits, vec![Duration::ZERO; 3]);
    assert_eq!(leaky_waits, vec![ms(0), ms(100), ms(200)]);
    let full = leaky.check(&mut ls, now, 1);
    assert!(!full.allowed, "the queue holds 3");
    assert_eq!(full.retry_after, Some(ms(100)));
}

#[test]
fn a_cost_above_the_limit_is_never_admitted() {
    let now = Timestamp::from_nanos(T0);
    for s in [
        RateLimitStrategy::TokenBucket {
            capacity: 5,
            refill_rate: 1,
        },
        RateLimitStrategy::LeakyBucket {
            capacity: 5,
            leak_rate: 1,
        },
        RateLimitStrategy::FixedWindow {
            max_requests: 5,
            window: ms(1000),
        },
        RateLimitStrategy::SlidingWindow {
            max_requests: 5,
            window: ms(1000),
        },
    ] {
        let mut st = s.initial_state();
        let d = s.acquire(&mut st, now, 6, Duration::from_secs(3600));
        assert!(d.exceeds_limit(), "{}", s.label());
        let used = s.policy().unwrap().usage(&st, now.as_nanos()).0;
        assert_eq!(used, 0, "{}: nothing recorded", s.label());
        assert!(s.check(&mut st, now, 5).allowed, "{}", s.label());
    }
}

#[test]
fn fixed_window_reserves_in_the_next_window() {
    let s = RateLimitStrategy::FixedWindow {
        max_requests: 2,
        window: ms(1000),
    };
    let mut st = s.initial_state();
    let start = Timestamp::from_nanos(T0); // aligned to the second
    let now = start.saturating_add(ms(250));
    assert!(s.check(&mut st, now, 1).allowed);
    assert!(s.check(&mut st, now, 1).allowed);
    assert_eq!(s.check(&mut st, now, 1).retry_after, Some(ms(750)));
    let d = s.acquire(&mut st, now, 2, ms(800));
    assert!(d.allowed);
    assert_eq!(d.wait, ms(750));
    let d = s.acquire(&mut st, now, 1, ms(800));
    assert!(!d.allowed, "the next window is reserved in full");
    assert_eq!(d.retry_after, Some(ms(1750)));
}

#[test]
fn sliding_window_weights_the_previous_window() {
    let s = RateLimitStrategy::SlidingWindow {
        max_requests: 10,
        window: ms(1000),
    };
    let mut st = s.initial_state();
    let start = Timestamp::from_nanos(T0);
    for _ in 0..10 {
        assert!(s.check(&mut st, start.saturating_add(ms(900)), 1).allowed);
    }
    // 25% into the next window, 75% of the previous 10 still counts: 2 fit.
    let t = start.saturating_add(ms(1250));
    assert!(s.check(&mut st, t, 1).allowed);
    assert!(s.check(&mut st, t, 1).allowed);
    let d = s.check(&mut st, t, 1);
    assert!(!d.allowed);
    // 10 * (1000 - e) + 3 * 1000 <= 10 * 1000 once e >= 300 ms.
    assert_eq!(d.retry_after, Some(ms(50)));
    let d = s.acquire(&mut st, t, 1, ms(50));
    assert!(d.allowed);
    assert_eq!(d.wait, ms(50));
}

#[test]
fn refund_gives_back_only_the_latest_reservation() {
    let policy = RateLimitStrategy::TokenBucket {
        capacity: 1,
        refill_rate: 10,
    }
    .policy()
    .unwrap();
    let mut st = policy.initial_state();
    let now = T0;
    assert!(policy.acquire(&mut st, now, 1, 0).allowed);
    let reserve = |st: &mut LimiterState| {
        let before = *st;
        let d = policy.acquire(st, now, 1, 10_000 * MS);
        assert!(d.allowed);
        Reservation {
            cost: 1,
            before,
            after: *st,
        }
    };
    let first = reserve(&mut st);
    let second = reserve(&mut st);
    // The first waiter leaves while the second still holds the slot after it:
    // giving it back would let a newcomer and the second pass together.
    assert!(!policy.refund(&mut st, &first, now));
    assert!(policy.refund(&mut st, &second, now));
    assert_eq!(st, second.before);
    let d = policy.acquire(&mut st, now, 1, 10_000 * MS);
    assert_eq!(d.wait, Duration::from_millis(200));
}

#[test]
fn validation_names_the_field() {
    let zero_rate = RateLimitStrategy::TokenBucket {
        capacity: 1,
        refill_rate: 0,
    }
    .validate();
    assert!(matches!(
        zero_rate,
        Err(ConfigError::Invalid {
            field: "refill_rate",
            ..
        })
    ));
    let zero_window = RateLimitStrategy::SlidingWindow {
        max_requests: 1,
        window: Duration::ZERO,
    }
    .validate();
    assert!(matches!(
        zero_window,
        Err(ConfigError::Invalid {
            field: "window",
            ..
        })
    ));
    let zero_cap = RateLimitStrategy::LeakyBucket {
        capacity: 0,
        leak_rate: 1,
    }
    .validate();
    assert!(matches!(
        zero_cap,
        Err(ConfigError::Invalid {
            field: "capacity",
            ..
        })
    ));
    let msg = zero_rate.unwrap_err().to_string();
    assert!(
        msg.contains("refill_rate") && msg.contains("at least 1"),
        "{msg}"
    );
}

#[test]
fn state_round_trips_through_json() {
    let s = LimiterState::SlidingWindow(SlidingWindowState {
        window_start: 5,
        current: 2,
        previous: 7,
    });
    let text = serde_json::to_string(&s).unwrap();
    assert!(text.contains("\"strategy\":\"sliding_window\""), "{text}");
    assert_eq!(serde_json::from_str::<LimiterState>(&text).unwrap(), s);
}

#[test]
fn state_from_a_later_clock_does_not_break_decisions() {
    let now = Timestamp::from_nanos(T0);
    let later = Timestamp::from_nanos(T0 + 3_600_000 * MS);
    for s in [
        RateLimitStrategy::TokenBucket {
            capacity: 2,
            refill_rate: 1,
        },
        RateLimitStrategy::LeakyBucket {
            capacity: 2,
            leak_rate: 1,
        },
        RateLimitStrategy::FixedWindow {
            max_requests: 2,
            window: ms(1000),
        },
        RateLimitStrategy::SlidingWindow {
            max_requests: 2,
            window: ms(1000),
        },
    ] {
        let mut st = s.initial_state();
        assert!(s.check(&mut st, later, 1).allowed, "{}", s.label());
        // Read back by a host whose clock is an hour behind: still limited, no panic.
        let d = s.check(&mut st, now, 2);
        assert!(!d.allowed, "{}", s.label());
        assert!(d.retry_after.is_some(), "{}", s.label());
        let policy = s.policy().unwrap();
        assert!(policy.usage(&st, now.as_nanos()).0 >= 1, "{}", s.label());
    }
}
