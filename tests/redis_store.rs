//! The Redis stores against a real `redis-server` started by each test.
#![cfg(feature = "redis")]

#[path = "support/patient.rs"]
mod patient;
mod support;

use patient::patient;

use std::sync::Arc;
use std::time::{Duration, Instant};

use pmcp_resilience::circuit_breaker::{BreakerPolicy, Verdict};
use pmcp_resilience::rate_limit::{RateLimitStrategy, RateLimiter};
use pmcp_resilience::redis_store::{
    FailurePolicy, RedisBreakerStore, RedisOptions, RedisRateLimiter, StoreMode,
};
use pmcp_resilience::store::Admission;
use pmcp_resilience::{
    CircuitBreakerStateStore, CircuitState, Clock, ManualClock, ScopeKey, Timestamp,
};
use support::redis::RedisServer;

fn client(url: &str) -> redis::Client {
    match redis::Client::open(url) {
        Ok(c) => c,
        Err(e) => panic!("client: {e}"),
    }
}

fn limiter(url: &str, strategy: RateLimitStrategy, options: RedisOptions) -> RedisRateLimiter {
    match RedisRateLimiter::new(client(url), strategy, options) {
        Ok(l) => l,
        Err(e) => panic!("limiter: {e}"),
    }
}

async fn command_calls(url: &str, command: &str) -> u64 {
    let Ok(mut c) = client(url).get_multiplexed_async_connection().await else {
        panic!("connect")
    };
    let info: String = match redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut c)
        .await
    {
        Ok(i) => i,
        Err(e) => panic!("INFO: {e}"),
    };
    let prefix = format!("cmdstat_{command}:calls=");
    info.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

fn now() -> Timestamp {
    Timestamp::from_nanos(0)
}

/// Generous: these tests are about what is decided, not how fast, and the
/// first call also connects and loads the script on a possibly loaded machine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_over_its_limit_is_answered_locally_and_rejections_write_nothing() {
    let server = RedisServer::start();
    let strategy = RateLimitStrategy::FixedWindow {
        max_requests: 3,
        window: Duration::from_secs(60),
    };
    let l = limiter(&server.url(), strategy, patient());
    let key = ScopeKey::new("tool:search");
    for _ in 0..3 {
        assert!(matches!(l.check(&key, 1, now()).await, Ok(d) if d.allowed));
    }
    let Ok(mut c) = client(&server.url())
        .get_multiplexed_async_connection()
        .await
    else {
        panic!("connect")
    };
    let pttl: i64 = redis::cmd("PTTL")
        .arg(l.redis_key("tool:search"))
        .query_async(&mut c)
        .await
        .unwrap_or(-3);
    assert!(
        pttl > 0 && pttl <= 60_000,
        "the key expires with its window: {pttl}"
    );
    let sets = command_calls(&server.url(), "set").await;
    let trips = l.health().round_trips;
    let first = l.check(&key, 1, now()).await;
    assert!(matches!(first, Ok(d) if !d.allowed && d.retry_after.is_some()));
    for _ in 0..100 {
        assert!(matches!(l.check(&key, 1, now()).await, Ok(d) if !d.allowed));
    }
    let h = l.health();
    assert_eq!(
        h.round_trips,
        trips + 1,
        "one round trip for the first rejection only"
    );
    assert_eq!(h.cached_denials, 100);
    assert_eq!(
        command_calls(&server.url(), "set").await,
        sets,
        "a rejection writes nothing"
    );
    assert_eq!(command_calls(&server.url(), "pexpire").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breakers_share_failures_and_half_open_probes_across_stores() {
    let server = RedisServer::start();
    let a = RedisBreakerStore::new(client(&server.url()), patient());
    let b = RedisBreakerStore::new(client(&server.url()), patient());
    let (Ok(a), Ok(b)) = (a, b) else {
        panic!("stores")
    };
    let (a, b) = (Arc::new(a), Arc::new(b));
    let policy = BreakerPolicy {
        consecutive_failures: 3,
        timeout: Duration::from_millis(200),
        half_open_max_probes: 1,
        probe_deadline: Duration::from_secs(5),
        ..BreakerPolicy::default()
    };
    let key = "server:https://api.example";
    for _ in 0..3 {
        let r = a
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
        assert!(r.is_ok());
    }
    let seen = b
        .get_state(key)
        .await
        .ok()
        .flatten()
        .map(|s| s.effective_state());
    assert_eq!(seen, Some(CircuitState::Open));
    assert!(matches!(
        b.acquire(key, &policy, now(), 0.5).await,
        Ok((Admission::Rejected { .. }, _))
    ));
    // A real process waits out the open time on Redis's clock.
    let deadline = Instant::now() + Duration::from_secs(20);
    while b
        .get_state(key)
        .await
        .ok()
        .flatten()
        .map(|s| s.open_until())
        > Some(Timestamp::from_nanos(
            redis_time_us(&server.url()).await * 1000,
        ))
    {
        assert!(Instant::now() < deadline, "the open time never ended");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut tasks = Vec::new();
    for i in 0..20 {
        let store = if i % 2 == 0 { a.clone() } else { b.clone() };
        tasks.push(tokio::spawn(async move {
            store.acquire(key, &policy, now(), 0.5).await
        }));
    }
    let mut probes = 0;
    for t in tasks {
        if let Ok(Ok((Admission::Allowed { probe }, _))) = t.await {
            assert!(probe.is_some());
            probes += 1;
        }
    }
    assert_eq!(probes, 1, "one probe in the whole fleet");
    let rows = a.get_metrics().await.unwrap_or_default();
    assert_eq!(rows.get(key).map(|r| r.state), Some(CircuitState::HalfOpen));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_under_load_every_policy_answers_in_time_and_recovers() {
    for policy in [
        FailurePolicy::FailOpen,
        FailurePolicy::FailClosed,
        FailurePolicy::LocalFallback,
    ] {
        let mut server = RedisServer::start();
        // The default call timeout: a refused connection must be decided fast.
        let options = RedisOptions::default()
            .failure_policy(policy)
            .retry_interval(Duration::from_millis(100));
        let strategy = RateLimitStrategy::TokenBucket {
            capacity: 1_000_000,
            refill_rate: 1000,
        };
        let l = Arc::new(limiter(&server.url(), strategy, options.clone()));
        let breaker = match RedisBreakerStore::new(client(&server.url()), options) {
            Ok(b) => b,
            Err(e) => panic!("{e}"),
        };
        let bp = BreakerPolicy::default();
        let key = ScopeKey::new("session:s1");
        // Connected and the script loaded (polled: the machine may be loaded).
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let trips = l.health().round_trips;
            let d = l.check(&key, 1, now()).await;
            if l.health().mode == StoreMode::Normal && l.health().round_trips > trips {
                assert!(matches!(d, Ok(d) if d.allowed));
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{policy:?}: redis never answered"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        server.kill();
        let mut slowest = Duration::ZERO;
        for _ in 0..50 {
            let started = Instant::now();
            let d = l.check(&key, 1, now()).await;
            let b = breaker.acquire("server:x", &bp, now(), 0.5).await;
            slowest = slowest.max(started.elapsed());
            let d = match d {
                Ok(d) => d,
                Err(e) => panic!("{policy:?}: {e}"),
            };
            match policy {
                FailurePolicy::FailOpen | FailurePolicy::LocalFallback => assert!(d.allowed),
                _ => assert!(!d.allowed),
            }
            // Under local fallback the breaker decides from its own view.
            assert_eq!(b.is_ok(), policy != FailurePolicy::LocalFallback, "{b:?}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(
            slowest < Duration::from_secs(1),
            "{policy:?}: a call took {slowest:?}"
        );
        let expected = match policy {
            FailurePolicy::FailOpen => StoreMode::FailOpen,
            FailurePolicy::FailClosed => StoreMode::FailClosed,
            _ => StoreMode::LocalFallback,
        };
        assert_eq!(l.health().mode, expected);
        assert_eq!(breaker.health().mode, expected);
        assert!(l.health().store_errors > 0);
        server.restart();
        let deadline = Instant::now() + Duration::from_secs(10);
        while l.health().mode != StoreMode::Normal && Instant::now() < deadline {
            let _ = l.check(&key, 1, now()).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(l.health().mode, StoreMode::Normal, "{policy:?}: recovered");
        let trips = l.health().round_trips;
        let errors = l.health().store_errors;
        assert!(matches!(l.check(&key, 1, now()).await, Ok(d) if d.allowed));
        if l.health().store_errors == errors {
            assert_eq!(l.health().round_trips, trips + 1, "decided by Redis again");
        }
    }
}

const CHILD_ENV: &str = "PMCP_REDIS_CHILD_URL";

/// Child role of the next test: hammers one key for a while and prints its admissions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_hammers_the_shared_limit() {
    let Ok(url) = std::env::var(CHILD_ENV) else {
        return;
    };
    let strategy = RateLimitStrategy::TokenBucket {
        capacity: 50,
        refill_rate: 20,
    };
    let l = limiter(&url, strategy, patient());
    let key = ScopeKey::new("tenant:shared");
    let mut admitted = 0u64;
    let until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < until {
        if let Ok(d) = l.check(&key, 1, now()).await
            && d.allowed
        {
            admitted += 1;
        }
    }
    println!("ADMITTED={admitted}");
}

async fn redis_time_us(url: &str) -> u64 {
    let Ok(mut c) = client(url).get_multiplexed_async_connection().await else {
        panic!("connect")
    };
    let t: (u64, u64) = match redis::cmd("TIME").query_async(&mut c).await {
        Ok(t) => t,
        Err(e) => panic!("TIME: {e}"),
    };
    t.0 * 1_000_000 + t.1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_processes_sharing_one_limit_admit_no_more_than_it() {
    let server = RedisServer::start();
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => panic!("current_exe: {e}"),
    };
    let started = redis_time_us(&server.url()).await;
    let children: Vec<_> = (0..3)
        .map(|_| {
            std::process::Command::new(&exe)
                .args([
                    "--exact",
                    "child_hammers_the_shared_limit",
                    "--nocapture",
                    "--test-threads",
                    "1",
                ])
                .env(CHILD_ENV, server.url())
                .stdout(std::process::Stdio::piped())
                .spawn()
        })
        .collect();
    let mut total = 0u64;
    for child in children {
        let out = match child.and_then(|c| c.wait_with_output()) {
            Ok(o) => o,
            Err(e) => panic!("child: {e}"),
        };
        let text = String::from_utf8_lossy(&out.stdout);
        let n: u64 = text
            .split("ADMITTED=")
            .nth(1)
            .map(|rest| {
                rest.chars()
                    .take_while(char::is_ascii_digit)
                    .collect::<String>()
            })
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("child printed no count: {text}"));
        assert!(n > 0, "every child got some admissions");
        total += n;
    }
    let elapsed_us = redis_time_us(&server.url()).await - started;
    // Capacity 50 at once, then 20 per second (on Redis's clock).
    let bound = 50 + (elapsed_us * 20).div_ceil(1_000_000);
    assert!(total <= bound, "admitted {total}, bound {bound}");
    assert!(total >= 50, "admitted {total}");
}

/// A token bucket of 2 refilling 1 per second, on a caller's clock `skew_s`
/// seconds off Redis's.
async fn skewed_limiter(url: &str, skew_s: i64) -> (RedisRateLimiter, ManualClock) {
    let redis_now_ns = i128::from(redis_time_us(url).await) * 1000;
    let caller_ns = redis_now_ns + i128::from(skew_s) * 1_000_000_000;
    let Ok(caller_ns) = u64::try_from(caller_ns) else {
        panic!("skew {skew_s} s leaves the clock's range")
    };
    let strategy = RateLimitStrategy::TokenBucket {
        capacity: 2,
        refill_rate: 1,
    };
    let options = patient().key_prefix(format!("skew{skew_s}:"));
    (
        limiter(url, strategy, options),
        ManualClock::starting_at(Timestamp::from_nanos(caller_ns)),
    )
}

/// `reset_at` comes from Redis's clock and is told on the caller's: with the
/// caller an hour behind or ahead of Redis, `reset_at - now` (what the usage
/// headers show) is still the time Redis says is left, fresh or from the
/// denial cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_times_hold_on_a_caller_clock_skewed_from_redis() {
    let server = RedisServer::start();
    let url = server.url();
    for skew_s in [-3600, 3600] {
        let (l, clock) = skewed_limiter(&url, skew_s).await;
        let key = ScopeKey::new("skewed");
        let at = |d: &pmcp_resilience::rate_limit::Decision, now: Timestamp| {
            d.reset_at.saturating_since(now)
        };

        let now = clock.now();
        let first = match l.check(&key, 1, now).await {
            Ok(d) => d,
            Err(e) => panic!("check: {e}"),
        };
        assert!(first.allowed);
        // An empty bucket's first token comes back one interval after Redis's now.
        assert_eq!(at(&first, now), Duration::from_secs(1), "skew {skew_s} s");

        let _ = l.check(&key, 1, now).await;
        clock.advance(Duration::from_millis(100));
        let now = clock.now();
        let denied = match l.check(&key, 1, now).await {
            Ok(d) => d,
            Err(e) => panic!("check: {e}"),
        };
        assert!(!denied.allowed);
        let reset = at(&denied, now);
        assert!(
            reset > Duration::ZERO && reset <= Duration::from_secs(2),
            "skew {skew_s} s: reset {reset:?}"
        );
        let Some(retry) = denied.retry_after else {
            panic!("a token comes back")
        };
        assert!(retry > Duration::ZERO && retry <= Duration::from_secs(1));

        let cached = match l.check(&key, 1, now).await {
            Ok(d) => d,
            Err(e) => panic!("check: {e}"),
        };
        assert_eq!(l.health().cached_denials, 1, "answered by the denial cache");
        assert!(!cached.allowed);
        assert!(at(&cached, now) <= reset && at(&cached, now) > Duration::ZERO);
    }
}

/// The same through the server layer: the reset header of a layer whose
/// clock is an hour behind Redis counts the seconds Redis says are left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reset_header_holds_on_a_layer_clock_skewed_from_redis() {
    use pmcp_resilience::rate_limit::RateLimitMiddleware;
    use pmcp_resilience::server::{Refusals, ResilienceLayer};
    use support::raw_http::{open_session, post, tool_call};

    let server = RedisServer::start();
    let (l, clock) = skewed_limiter(&server.url(), -3600).await;
    let middleware = match RateLimitMiddleware::builder()
        .scope(pmcp_resilience::Scope::PerTool)
        .limiter(Arc::new(l))
        .clock(Arc::new(clock))
        .build()
    {
        Ok(m) => m,
        Err(e) => panic!("middleware: {e}"),
    };
    let layer = match ResilienceLayer::builder()
        .refusals(Refusals::HttpStatus)
        .rate_limit(middleware)
        .with_usage_headers(true)
        .build()
    {
        Ok(l) => l,
        Err(e) => panic!("layer: {e}"),
    };
    let app =
        support::start_server_wrapped("skewed", |b| b, move |router| router.layer(layer)).await;
    let session = open_session(app.addr).await;
    let s = [("mcp-session-id", session.as_str())];

    let first = post(app.addr, &tool_call(1, "echo"), &s).await;
    assert_eq!(first.status, 200);
    assert_eq!(first.header("x-ratelimit-reset"), Some("1"));
    let _ = post(app.addr, &tool_call(2, "echo"), &s).await;
    let refused = post(app.addr, &tool_call(3, "echo"), &s).await;
    assert_eq!(refused.status, 429);
    assert_eq!(refused.header("retry-after"), Some("1"));
    let reset = refused.header("x-ratelimit-reset");
    assert!(
        matches!(reset, Some("1" | "2")),
        "reset {reset:?}, not an hour off"
    );
}

/// Calls per command since the server started (`INFO commandstats`),
/// without the `INFO` calls that read them.
async fn all_command_calls(url: &str) -> std::collections::BTreeMap<String, u64> {
    let Ok(mut c) = client(url).get_multiplexed_async_connection().await else {
        panic!("connect")
    };
    let info: String = match redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut c)
        .await
    {
        Ok(i) => i,
        Err(e) => panic!("INFO: {e}"),
    };
    info.lines()
        .filter_map(|l| l.strip_prefix("cmdstat_"))
        .filter_map(|l| {
            let (name, rest) = l.split_once(":calls=")?;
            let calls = rest.split(',').next()?.parse().ok()?;
            (name != "info").then(|| (name.to_owned(), calls))
        })
        .collect()
}

/// Once connected, each decision is one `EVALSHA` and nothing else: no
/// script load, no `PING`, no read or write beside the script.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_decision_is_one_evalsha_round_trip() {
    let server = RedisServer::start();
    let url = server.url();
    let strategy = RateLimitStrategy::TokenBucket {
        capacity: 1_000,
        refill_rate: 1_000,
    };
    let l = limiter(&url, strategy, patient());
    let store = match RedisBreakerStore::new(client(&url), patient()) {
        Ok(s) => s,
        Err(e) => panic!("store: {e}"),
    };
    let policy = BreakerPolicy::default();
    let key = ScopeKey::new("one-trip");
    // Connects and loads both scripts.
    assert!(matches!(l.check(&key, 1, now()).await, Ok(d) if d.allowed));
    assert!(store.acquire("one-trip", &policy, now(), 0.5).await.is_ok());

    let before = all_command_calls(&url).await;
    let trips = (l.health().round_trips, store.health().round_trips);
    const N: u64 = 50;
    for _ in 0..N {
        assert!(matches!(l.check(&key, 1, now()).await, Ok(d) if d.allowed));
        let acquired = store.acquire("one-trip", &policy, now(), 0.5).await;
        assert!(acquired.is_ok(), "{acquired:?}");
        let recorded = store
            .record(
                "one-trip",
                &policy,
                now(),
                Verdict::Success,
                Duration::ZERO,
                None,
                0.5,
            )
            .await;
        assert!(recorded.is_ok(), "{recorded:?}");
    }
    let after = all_command_calls(&url).await;
    let mut made: std::collections::BTreeMap<String, u64> = after
        .iter()
        .map(|(name, calls)| (name.clone(), calls - before.get(name).copied().unwrap_or(0)))
        .filter(|(_, calls)| *calls > 0)
        .collect();
    assert_eq!(made.remove("evalsha"), Some(3 * N), "{made:?}");
    // What the scripts run inside Redis counts too.
    for inside in ["time", "get", "set", "del"] {
        made.remove(inside);
    }
    assert!(made.is_empty(), "other commands sent: {made:?}");
    assert_eq!(l.health().round_trips - trips.0, N);
    assert_eq!(store.health().round_trips - trips.1, 2 * N);
}
