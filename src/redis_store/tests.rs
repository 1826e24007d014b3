//! Parity: the Lua scripts and the Rust pure functions give the same
//! decisions on the same seeded random sequences, with injected time.

#[path = "../../tests/support/redis.rs"]
mod server;

#[cfg(feature = "redis-cluster")]
#[path = "../../tests/support/redis_cluster.rs"]
mod cluster;

use std::sync::Arc;
use std::time::Duration;

use super::{RedisBreakerStore, RedisOptions, RedisRateLimiter};
use crate::CircuitBreakerStateStore;
use crate::circuit_breaker::state::{
    self, Admission, BreakerPolicy, CircuitBreakerState, ProbeId, Verdict,
};
use crate::clock::Timestamp;
use crate::rate_limit::RateLimitStrategy;
use crate::rate_limit::strategy::{LimiterState, Reservation};

const START_US: i64 = 1_767_225_600_000_000;

fn client(server: &server::RedisServer) -> redis::Client {
    match redis::Client::open(server.url()) {
        Ok(c) => c,
        Err(e) => panic!("client: {e}"),
    }
}

fn options() -> RedisOptions {
    // Parity, not latency, is tested here: a loaded CI machine starved one
    // round trip past 5 s (`redis: timed out`, then every walk refused for
    // the retry interval).
    RedisOptions::default()
        .connect_timeout(Duration::from_secs(30))
        .call_timeout(Duration::from_secs(30))
}

fn as_array(kind: u8, s: &LimiterState) -> [u64; 3] {
    match (kind, s) {
        (_, LimiterState::FixedWindow(s)) => [s.window_start, s.count, 0],
        (_, LimiterState::SlidingWindow(s)) => {
            [s.window_start, u64::from(s.current), u64::from(s.previous)]
        }
        (_, LimiterState::TokenBucket(s)) => [s.tat, 0, 0],
        (_, LimiterState::LeakyBucket(s)) => [s.next_free, 0, 0],
    }
}

/// Random steps compared per limiter strategy and per breaker policy.
const STEPS: usize = 100_000;
/// Keys walked at once, each its own seeded sequence (keeps Redis busy).
const WALKS: usize = 8;

const STRATEGIES: [RateLimitStrategy; 7] = [
    RateLimitStrategy::TokenBucket {
        capacity: 5,
        refill_rate: 3,
    },
    RateLimitStrategy::TokenBucket {
        capacity: 1,
        refill_rate: 7,
    },
    RateLimitStrategy::LeakyBucket {
        capacity: 4,
        leak_rate: 3,
    },
    RateLimitStrategy::FixedWindow {
        max_requests: 5,
        window: Duration::from_millis(700),
    },
    RateLimitStrategy::FixedWindow {
        max_requests: 3,
        window: Duration::from_secs(1),
    },
    RateLimitStrategy::SlidingWindow {
        max_requests: 5,
        window: Duration::from_millis(700),
    },
    RateLimitStrategy::SlidingWindow {
        max_requests: 7,
        window: Duration::from_secs(1),
    },
];

/// One seeded random walk of `steps` decisions on one key, Lua against Rust.
async fn limiter_walk(limiter: Arc<RedisRateLimiter>, n: usize, seed: u64, steps: usize) {
    let strategy = limiter.strategy();
    let policy = limiter.micro();
    let kind = limiter.kind;
    let mut rng = fastrand::Rng::with_seed(seed * 100 + n as u64);
    let key = format!("parity:{n}:{seed}");
    let mut state = policy.initial_state();
    let mut now = START_US + rng.i64(0..1_000_000);
    let mut last: Option<Reservation> = None;
    for step in 0..steps {
        now += match rng.u8(0..4) {
            0 => 0,
            1 => rng.i64(0..2_000),
            2 => rng.i64(0..200_000),
            _ => rng.i64(0..1_500_000),
        };
        let now_u = u64::try_from(now).unwrap_or(0);
        if rng.u8(0..8) == 0
            && let Some(r) = last.take()
        {
            let rust = policy.refund(&mut state, &r, now_u);
            let lua = limiter
                .script_cancel(
                    &key,
                    as_array(kind, &r.before),
                    as_array(kind, &r.after),
                    now,
                )
                .await;
            assert_eq!(
                lua.ok(),
                Some(rust),
                "{strategy:?} seed {seed} step {step}: cancel"
            );
            continue;
        }
        let cost = rng.u32(0..=policy.limit() + 1);
        let max_wait_us = if rng.bool() { 0 } else { rng.u64(0..1_000_000) };
        // Half the steps as production asks (the states only with a
        // reservation), half with the states in every reply.
        let with_states = rng.bool();
        let before = state;
        let rust = policy.acquire(&mut state, now_u, cost, max_wait_us);
        let lua = match limiter
            .script_acquire(
                &key,
                cost,
                Duration::from_micros(max_wait_us),
                now,
                with_states,
            )
            .await
        {
            Ok(r) => r,
            Err(e) => panic!("script: {e}"),
        };
        let ctx = format!(
            "{strategy:?} seed {seed} step {step} cost {cost} now {now} wait {max_wait_us} rust {before:?} -> {state:?} {rust:?} lua {lua:?}"
        );
        assert_eq!(lua.allowed, rust.allowed, "{ctx}: allowed");
        assert_eq!(lua.remaining, u64::from(rust.remaining), "{ctx}: remaining");
        assert_eq!(
            now.checked_add(lua.reset_in)
                .and_then(|t| u64::try_from(t).ok()),
            Some(rust.reset_at.as_nanos()),
            "{ctx}: reset_at"
        );
        assert_eq!(
            lua.states.is_some(),
            with_states || (rust.allowed && !rust.wait.is_zero()),
            "{ctx}: states sent"
        );
        if rust.allowed {
            assert_eq!(
                lua.wait,
                u64::try_from(rust.wait.as_nanos()).unwrap_or(0),
                "{ctx}: wait"
            );
        } else {
            let rust_retry = rust
                .retry_after
                .map(|d| u64::try_from(d.as_nanos()).unwrap_or(0));
            assert_eq!(lua.retry_after, rust_retry, "{ctx}: retry_after");
        }
        if rust.allowed {
            if let Some((_, after)) = lua.states {
                assert_eq!(after, as_array(kind, &state), "{ctx}: state");
            }
            if !rust.wait.is_zero() {
                last = Some(Reservation {
                    cost,
                    before,
                    after: state,
                });
            }
        }
    }
}

/// [`STEPS`] random steps per strategy, in [`WALKS`] keys at once.
async fn limiter_parity(make: impl Fn(RateLimitStrategy) -> RedisRateLimiter) {
    for (n, strategy) in STRATEGIES.into_iter().enumerate() {
        let limiter = Arc::new(make(strategy));
        let walks: Vec<_> = (0..WALKS as u64)
            .map(|seed| tokio::spawn(limiter_walk(limiter.clone(), n, seed, STEPS / WALKS)))
            .collect();
        for walk in walks {
            if let Err(e) = walk.await {
                std::panic::resume_unwind(e.into_panic());
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limiter_scripts_match_the_rust_strategies() {
    let server = server::RedisServer::start();
    limiter_parity(
        |strategy| match RedisRateLimiter::new(client(&server), strategy, options()) {
            Ok(l) => l,
            Err(e) => panic!("{e}"),
        },
    )
    .await;
}

#[cfg(feature = "redis-cluster")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limiter_scripts_match_the_rust_strategies_on_a_cluster() {
    let cluster = cluster::RedisCluster::start();
    limiter_parity(|strategy| {
        let client = match redis::cluster::ClusterClient::new(cluster.urls()) {
            Ok(c) => c,
            Err(e) => panic!("{e}"),
        };
        match RedisRateLimiter::cluster(client, strategy, options()) {
            Ok(l) => l,
            Err(e) => panic!("{e}"),
        }
    })
    .await;
}

fn breaker_policies() -> [BreakerPolicy; 2] {
    [
        BreakerPolicy {
            consecutive_failures: 3,
            success_threshold: 2,
            timeout: Duration::from_millis(500),
            half_open_max_probes: 2,
            probe_deadline: Duration::from_millis(300),
            ..BreakerPolicy::default()
        },
        BreakerPolicy {
            consecutive_failures: 1,
            success_threshold: 1,
            timeout: Duration::from_millis(100),
            half_open_max_probes: 1,
            probe_deadline: Duration::from_millis(50),
            ..BreakerPolicy::default()
        },
    ]
}

/// One seeded random walk of `steps` calls on one breaker key, Lua against Rust.
async fn breaker_walk(store: Arc<RedisBreakerStore>, n: usize, seed: u64, steps: usize) {
    let policy = &breaker_policies()[n];
    let mut rng = fastrand::Rng::with_seed(seed + 1000 * n as u64);
    let key = format!("parity:{n}:{seed}");
    let mut rust = CircuitBreakerState::default();
    let mut outstanding: Vec<ProbeId> = Vec::new();
    let mut now = START_US;
    for step in 0..steps {
        now += match rng.u8(0..3) {
            0 => 0,
            1 => rng.i64(0..50_000),
            _ => rng.i64(0..400_000),
        };
        let ts = Timestamp::from_nanos(u64::try_from(now).unwrap_or(0) * 1000);
        let ctx = format!("policy {n} seed {seed} step {step}");
        if rng.bool() {
            let expected = state::acquire(&mut rust, policy, ts, 0.5);
            let got = store.acquire_at(&key, policy, now).await.ok();
            assert_eq!(got, Some(expected), "{ctx}: acquire");
            if let (Admission::Allowed { probe: Some(p) }, _) = expected {
                outstanding.push(p);
            }
        } else {
            let result = match rng.u8(0..5) {
                0 | 1 => Verdict::Failure,
                2 | 3 => Verdict::Success,
                _ => Verdict::Neutral,
            };
            let probe = if !outstanding.is_empty() && rng.u8(0..3) > 0 {
                Some(outstanding.swap_remove(rng.usize(0..outstanding.len())))
            } else {
                None
            };
            let expected = state::record(&mut rust, policy, ts, result, Duration::ZERO, probe, 0.5);
            let got = store.record_at(&key, policy, result, probe, now).await.ok();
            assert_eq!(got, Some(expected), "{ctx}: record {result:?}");
        }
        let stored = store
            .get_state(&key)
            .await
            .ok()
            .flatten()
            .unwrap_or_default();
        assert_eq!(stored.state, rust.state, "{ctx}: state");
        assert_eq!(
            stored.consecutive_failures, rust.consecutive_failures,
            "{ctx}"
        );
        assert_eq!(
            stored.half_open_successes, rust.half_open_successes,
            "{ctx}"
        );
        assert_eq!(stored.trips, rust.trips, "{ctx}");
        let mut a: Vec<_> = stored.probes.iter().map(|p| (p.id, p.deadline)).collect();
        let mut b: Vec<_> = rust.probes.iter().map(|p| (p.id, p.deadline)).collect();
        a.sort_by_key(|p| p.0.0);
        b.sort_by_key(|p| p.0.0);
        assert_eq!(a, b, "{ctx}: probes");
        if rust.state != state::CircuitState::Closed {
            assert_eq!(stored.open_until, rust.open_until, "{ctx}: open_until");
        }
    }
}

/// [`STEPS`] random steps per breaker policy, in [`WALKS`] keys at once.
async fn breaker_parity(store: RedisBreakerStore) {
    let store = Arc::new(store);
    for n in 0..breaker_policies().len() {
        let walks: Vec<_> = (0..WALKS as u64)
            .map(|seed| tokio::spawn(breaker_walk(store.clone(), n, seed, STEPS / WALKS)))
            .collect();
        for walk in walks {
            if let Err(e) = walk.await {
                std::panic::resume_unwind(e.into_panic());
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breaker_script_matches_the_rust_state_machine() {
    let server = server::RedisServer::start();
    match RedisBreakerStore::new(client(&server), options()) {
        Ok(s) => breaker_parity(s).await,
        Err(e) => panic!("{e}"),
    }
}

#[cfg(feature = "redis-cluster")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breaker_script_matches_the_rust_state_machine_on_a_cluster() {
    let cluster = cluster::RedisCluster::start();
    let client = match redis::cluster::ClusterClient::new(cluster.urls()) {
        Ok(c) => c,
        Err(e) => panic!("{e}"),
    };
    match RedisBreakerStore::cluster(client, options()) {
        Ok(s) => breaker_parity(s).await,
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn unsupported_breaker_rules_are_refused() {
    let policy = BreakerPolicy {
        failures_in_window: Some(3),
        ..BreakerPolicy::default()
    };
    assert!(RedisBreakerStore::supports(&policy).is_err());
    assert!(RedisBreakerStore::supports(&BreakerPolicy::default()).is_ok());
}

#[test]
fn limits_outside_exact_lua_arithmetic_are_refused() {
    let too_fast = RateLimitStrategy::TokenBucket {
        capacity: 10,
        refill_rate: 2_000_000,
    };
    let too_big = RateLimitStrategy::SlidingWindow {
        max_requests: u32::MAX,
        window: Duration::from_secs(86_400),
    };
    for s in [too_fast, too_big] {
        let c = redis::Client::open("redis://127.0.0.1:1/");
        let Ok(c) = c else { panic!("client") };
        assert!(RedisRateLimiter::new(c, s, RedisOptions::default()).is_err());
    }
}
