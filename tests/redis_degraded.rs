//! What the Redis stores decide when Redis is down, hung or slow, what they
//! say about it, and that they come back: against a real `redis-server`
//! that each test starts, kills or pauses (SIGSTOP).
#![cfg(feature = "redis")]

#[path = "support/patient.rs"]
mod patient;
mod support;

use patient::patient;

use std::time::{Duration, Instant};

use pmcp_resilience::circuit_breaker::{BreakerPolicy, Verdict};
use pmcp_resilience::rate_limit::{RateLimitMiddleware, RateLimitStrategy, RateLimiter};
use pmcp_resilience::redis_store::{
    FailurePolicy, RedisBreakerStore, RedisOptions, RedisRateLimiter, StoreMode,
};
use pmcp_resilience::store::Admission;
use pmcp_resilience::{
    CircuitBreakerMiddleware, CircuitBreakerStateStore, RegistryLimits, ScopeKey, StatePersistence,
    Timestamp,
};
use support::redis::RedisServer;

fn client(url: &str) -> redis::Client {
    match redis::Client::open(url) {
        Ok(c) => c,
        Err(e) => panic!("client: {e}"),
    }
}

fn now() -> Timestamp {
    Timestamp::from_nanos(0)
}

/// Generous where a test is about what is decided, not how fast.
fn limiter(url: &str, strategy: RateLimitStrategy, options: RedisOptions) -> RedisRateLimiter {
    match RedisRateLimiter::new(client(url), strategy, options) {
        Ok(l) => l,
        Err(e) => panic!("limiter: {e}"),
    }
}

fn breaker_store(url: &str, options: RedisOptions) -> RedisBreakerStore {
    match RedisBreakerStore::new(client(url), options) {
        Ok(s) => s,
        Err(e) => panic!("breaker store: {e}"),
    }
}

fn persistence(server: &RedisServer, prefix: &str) -> StatePersistence {
    StatePersistence::Redis {
        client: client(&server.url()),
        key_prefix: prefix.to_owned(),
    }
}

/// Waits until `limiter` has had Redis decide once (connection made and
/// script loaded), however loaded the machine.
async fn warm_up(l: &RedisRateLimiter, key: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let trips = l.health().round_trips;
        let _ = l.check(&ScopeKey::new(key), 1, now()).await;
        if l.health().mode == StoreMode::Normal && l.health().round_trips > trips {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("redis never answered the limiter");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_failure_policy_decides_as_documented_while_redis_is_down() {
    let retry = Duration::from_millis(300);
    for policy in [
        FailurePolicy::FailOpen,
        FailurePolicy::FailClosed,
        FailurePolicy::LocalFallback,
    ] {
        let mut server = RedisServer::start();
        let options = patient().failure_policy(policy).retry_interval(retry);
        let strategy = RateLimitStrategy::TokenBucket {
            capacity: 3,
            refill_rate: 1,
        };
        let l = limiter(&server.url(), strategy, options.clone());
        let store = breaker_store(&server.url(), options);
        let bp = BreakerPolicy::default();
        warm_up(&l, "warm").await;
        server.kill();
        let key = ScopeKey::new("tenant:a");
        let mut decisions = Vec::new();
        for _ in 0..4 {
            match l.check(&key, 1, now()).await {
                Ok(d) => decisions.push(d),
                Err(e) => panic!("{policy:?}: the limiter must decide, got {e}"),
            }
        }
        let acquired = store.acquire("server:x", &bp, now(), 0.5).await;
        let recorded = store
            .record(
                "server:x",
                &bp,
                now(),
                Verdict::Failure,
                Duration::ZERO,
                None,
                0.5,
            )
            .await;
        match policy {
            FailurePolicy::FailOpen => {
                for d in &decisions {
                    assert!(d.allowed, "fail open admits");
                    assert_eq!(d.remaining, 3, "fail open admits with the full limit left");
                }
                assert!(matches!(
                    acquired,
                    Ok((Admission::Allowed { probe: None }, None))
                ));
                assert!(matches!(recorded, Ok(None)), "fail open counts nothing");
            }
            FailurePolicy::FailClosed => {
                for d in &decisions {
                    assert!(!d.allowed, "fail closed rejects");
                    assert_eq!(d.retry_after, Some(retry), "retry hint: the retry interval");
                }
                match acquired {
                    Ok((Admission::Rejected { retry_after }, None)) => {
                        assert_eq!(retry_after, retry)
                    }
                    other => panic!("fail closed must reject the call, got {other:?}"),
                }
                assert!(matches!(recorded, Ok(None)));
            }
            _ => {
                let allowed: Vec<bool> = decisions.iter().map(|d| d.allowed).collect();
                assert_eq!(
                    allowed,
                    [true, true, true, false],
                    "the local fallback applies the strategy itself"
                );
                let hint = decisions[3].retry_after.unwrap_or(Duration::MAX);
                assert!(
                    hint > Duration::ZERO && hint <= Duration::from_secs(1),
                    "the local retry hint is the strategy's: {hint:?}"
                );
                assert!(
                    acquired.is_err() && recorded.is_err(),
                    "under local fallback the breaker store hands the decision to the \
                     breaker's own view: {acquired:?} {recorded:?}"
                );
            }
        }
        let expected = match policy {
            FailurePolicy::FailOpen => StoreMode::FailOpen,
            FailurePolicy::FailClosed => StoreMode::FailClosed,
            _ => StoreMode::LocalFallback,
        };
        assert_eq!(l.health().mode, expected);
        assert_eq!(store.health().mode, expected);
        assert_eq!(l.health().degraded_decisions, 4);
        assert_eq!(store.health().degraded_decisions, 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_shared_breaker_stays_closed_to_calls_while_redis_is_paused() {
    let server = RedisServer::start();
    let key = "tool:search";
    // Default options: 50 ms call timeout, local fallback.
    let cb = match CircuitBreakerMiddleware::builder()
        .failure_threshold(3)
        .timeout(Duration::from_secs(60))
        .persistence(persistence(&server, "paused:"))
        .build()
    {
        Ok(cb) => cb,
        Err(e) => panic!("breaker: {e}"),
    };
    // Another process of the fleet opens the breaker in Redis.
    let other = breaker_store(&server.url(), patient().key_prefix("paused:"));
    let policy = cb.policy();
    for _ in 0..3 {
        let r = other
            .record(
                key,
                &policy,
                now(),
                Verdict::Failure,
                Duration::ZERO,
                None,
                0.5,
            )
            .await;
        assert!(r.is_ok(), "{r:?}");
    }
    // This process sees it open (polled: a loaded machine may time a call out).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match cb.acquire(key).await {
            Err(_) => break,
            Ok(permit) => permit.record(Verdict::Neutral).await,
        }
        assert!(
            Instant::now() < deadline,
            "never saw the shared breaker open"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.pause();
    for i in 0..10 {
        match cb.acquire(key).await {
            Err(rejected) => assert!(
                rejected
                    .retry_after
                    .is_some_and(|r| r > Duration::from_secs(50)),
                "call {i}: rejected until the fleet's open time ends: {rejected:?}"
            ),
            Ok(_) => panic!("call {i} admitted while Redis is paused and the breaker open"),
        }
    }
    assert!(cb.store_errors() > 0, "the calls did meet the paused Redis");
    server.resume();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_redis_costs_each_decision_at_most_the_call_timeout() {
    let server = RedisServer::start();
    let timeout = Duration::from_millis(100);
    let retry = Duration::from_millis(400);
    let options = patient().retry_interval(retry);
    let strategy = RateLimitStrategy::TokenBucket {
        capacity: 1_000_000,
        refill_rate: 1000,
    };
    let l = limiter(&server.url(), strategy, options.clone());
    warm_up(&l, "warm").await;
    let l = limiter(&server.url(), strategy, options.call_timeout(timeout));
    let store = breaker_store(
        &server.url(),
        patient().call_timeout(timeout).retry_interval(retry),
    );
    warm_up(&l, "warm").await;
    server.pause();
    let bp = BreakerPolicy::default();
    let key = ScopeKey::new("tenant:hung");
    let trips = l.health().round_trips + store.health().round_trips;
    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    let mut decisions = 0u64;
    while started.elapsed() < Duration::from_millis(2000) {
        let t = Instant::now();
        let d = l.check(&key, 1, now()).await;
        let b = store.acquire("server:hung", &bp, now(), 0.5).await;
        slowest = slowest.max(t.elapsed());
        assert!(
            matches!(d, Ok(d) if d.allowed),
            "local fallback admits: {d:?}"
        );
        assert!(b.is_err(), "the breaker decides from its own view");
        decisions += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = started.elapsed();
    server.resume();
    // Each of the two calls of one round waits at most the call timeout.
    let margin = Duration::from_millis(400);
    assert!(
        slowest <= 2 * timeout + margin,
        "a round took {slowest:?} against a call timeout of {timeout:?}"
    );
    // Each store tries Redis at most once per retry interval (plus the first).
    let made = l.health().round_trips + store.health().round_trips - trips;
    let bound = 2 * (elapsed.as_millis() as u64 / retry.as_millis() as u64 + 1);
    assert!(
        made <= bound,
        "{made} round trips to a hung Redis in {elapsed:?} ({decisions} decisions), bound {bound}"
    );
    assert!(decisions > made, "most decisions did not wait on Redis");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_on_build_fails_fast_when_redis_does_not_answer() {
    let mut server = RedisServer::start();
    let url = server.url();
    let options = RedisOptions::default()
        .verify_on_build(true)
        .connect_timeout(Duration::from_millis(500))
        .call_timeout(Duration::from_millis(500));
    let build_limiter = |server: &RedisServer| {
        RateLimitMiddleware::builder()
            .strategy(RateLimitStrategy::FixedWindow {
                max_requests: 5,
                window: Duration::from_secs(1),
            })
            .persistence(persistence(server, "verify:"))
            .redis_options(options.clone())
            .build()
    };
    let build_breaker = |server: &RedisServer| {
        CircuitBreakerMiddleware::builder()
            .persistence(persistence(server, "verify:"))
            .redis_options(options.clone())
            .build()
    };
    assert!(build_limiter(&server).is_ok());
    assert!(build_breaker(&server).is_ok());
    let l = limiter(
        &url,
        RateLimitStrategy::FixedWindow {
            max_requests: 5,
            window: Duration::from_secs(1),
        },
        patient(),
    );
    assert!(l.verify().await.is_ok());

    server.pause();
    let started = Instant::now();
    match build_limiter(&server) {
        Err(e) => assert!(e.to_string().contains("redis did not answer"), "{e}"),
        Ok(_) => panic!("build must fail while Redis is hung"),
    }
    match build_breaker(&server) {
        Err(e) => assert!(e.to_string().contains("redis did not answer"), "{e}"),
        Ok(_) => panic!("build must fail while Redis is hung"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "failed fast: {:?}",
        started.elapsed()
    );
    let hung = limiter(
        &url,
        RateLimitStrategy::FixedWindow {
            max_requests: 5,
            window: Duration::from_secs(1),
        },
        options.clone(),
    );
    assert!(hung.verify().await.is_err());
    server.resume();
    server.kill();
    assert!(build_limiter(&server).is_err(), "nothing listening");
    // Without the option, build never waits on Redis.
    let lazy = RateLimitMiddleware::builder()
        .persistence(persistence(&server, "verify:"))
        .build();
    assert!(lazy.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_fallback_stays_under_its_cap_with_a_million_keys() {
    let mut server = RedisServer::start();
    let cap = 10_000;
    let options = patient()
        .retry_interval(Duration::from_secs(600))
        .local_limits(RegistryLimits {
            max_keys: cap,
            idle_after: Duration::from_secs(600),
        });
    let strategy = RateLimitStrategy::FixedWindow {
        max_requests: 5,
        window: Duration::from_secs(60),
    };
    let l = limiter(&server.url(), strategy, options);
    warm_up(&l, "warm").await;
    server.kill();
    let mut admitted = 0u64;
    for i in 0..1_000_000u32 {
        let key = ScopeKey::new(&format!("session:{i}"));
        if let Ok(d) = l.check(&key, 1, now()).await
            && d.allowed
        {
            admitted += 1;
        }
        if i % 100_000 == 0 {
            assert!(l.local_keys() <= cap + 1, "{} keys", l.local_keys());
        }
    }
    // The cap, plus the one entry shared by keys beyond it.
    assert!(l.local_keys() <= cap + 1, "{} keys", l.local_keys());
    assert!(admitted > 0);
    assert_eq!(l.health().degraded_decisions, 1_000_000);
}
