//! Operator modes of a shared breaker in Redis: one atomic script call each,
//! lasting until reset whatever the TTL, and a TTL checked against the
//! policy.
#![cfg(feature = "redis")]

#[path = "support/patient.rs"]
mod patient;
mod support;

use patient::patient;

use std::sync::Arc;
use std::time::{Duration, Instant};

use pmcp_resilience::circuit_breaker::{BreakerPolicy, Verdict};
use pmcp_resilience::redis_store::{RedisBreakerStore, RedisOptions};
use pmcp_resilience::store::{Admission, BreakerMode};
use pmcp_resilience::{
    CircuitBreakerMiddleware, CircuitBreakerStateStore, CircuitState, StatePersistence, Timestamp,
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

fn store(url: &str, options: RedisOptions) -> Arc<RedisBreakerStore> {
    match RedisBreakerStore::new(client(url), options) {
        Ok(s) => Arc::new(s),
        Err(e) => panic!("store: {e}"),
    }
}

async fn pttl(url: &str, key: &str) -> i64 {
    let Ok(mut c) = client(url).get_multiplexed_async_connection().await else {
        panic!("connect")
    };
    match redis::cmd("PTTL").arg(key).query_async(&mut c).await {
        Ok(t) => t,
        Err(e) => panic!("PTTL: {e}"),
    }
}

async fn fail(s: &RedisBreakerStore, key: &str, policy: &BreakerPolicy) {
    let r = s
        .record(
            key,
            policy,
            now(),
            Verdict::Failure,
            Duration::ZERO,
            None,
            0.5,
        )
        .await;
    assert!(r.is_ok(), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forced_mode_outlives_a_short_breaker_ttl() {
    let server = RedisServer::start();
    let url = server.url();
    let ttl = Duration::from_secs(1);
    let s = store(&url, patient().breaker_ttl(ttl));
    let policy = BreakerPolicy {
        consecutive_failures: 3,
        timeout: Duration::from_millis(200),
        probe_deadline: Duration::from_millis(300),
        ..BreakerPolicy::default()
    };
    assert!(s.check(&policy).is_ok());
    let key = "tool:forced";
    let redis_key = s.redis_key(key);
    fail(&s, key, &policy).await;
    assert!(
        pttl(&url, &redis_key).await > 0,
        "a counted failure expires"
    );
    assert!(s.set_mode(key, BreakerMode::ForcedOpen).await.is_ok());
    assert_eq!(
        pttl(&url, &redis_key).await,
        -1,
        "a forced mode has no expiry"
    );
    // Time must pass beyond the TTL: that is what this test is about.
    tokio::time::sleep(ttl + Duration::from_millis(500)).await;
    let state = s.get_state(key).await.ok().flatten();
    assert_eq!(
        state.as_ref().map(|s| s.mode()),
        Some(BreakerMode::ForcedOpen)
    );
    assert_eq!(
        state.map(|s| s.consecutive_failures()),
        Some(1),
        "counts kept"
    );
    assert!(matches!(
        s.acquire(key, &policy, now(), 0.5).await,
        Ok((Admission::Rejected { .. }, _))
    ));
    // A call recorded meanwhile does not put the expiry back.
    fail(&s, key, &policy).await;
    assert_eq!(pttl(&url, &redis_key).await, -1);
    assert!(s.set_mode(key, BreakerMode::Normal).await.is_ok());
    let left = pttl(&url, &redis_key).await;
    assert!(
        left > 0 && left <= 1000,
        "reset: the TTL applies again ({left})"
    );
    assert!(matches!(
        s.acquire(key, &policy, now(), 0.5).await,
        Ok((Admission::Allowed { .. }, _))
    ));
    // A quiet key reset to normal is deleted.
    let quiet = "tool:quiet";
    assert!(s.set_mode(quiet, BreakerMode::Disabled).await.is_ok());
    assert_eq!(pttl(&url, &s.redis_key(quiet)).await, -1);
    assert!(s.set_mode(quiet, BreakerMode::Normal).await.is_ok());
    assert_eq!(pttl(&url, &s.redis_key(quiet)).await, -2, "deleted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn force_open_through_the_middleware_lasts_past_the_ttl() {
    let server = RedisServer::start();
    let url = server.url();
    let cb = match CircuitBreakerMiddleware::builder()
        .timeout(Duration::from_millis(200))
        .probe_deadline(Duration::from_millis(300))
        .persistence(StatePersistence::Redis {
            client: client(&url),
            key_prefix: "modes:".into(),
        })
        .redis_options(patient().breaker_ttl(Duration::from_secs(1)))
        .build()
    {
        Ok(cb) => cb,
        Err(e) => panic!("breaker: {e}"),
    };
    let reader = store(&url, patient().key_prefix("modes:"));
    cb.force_open("tool:x");
    // Written in the background: polled.
    let deadline = Instant::now() + Duration::from_secs(20);
    while reader
        .get_state("tool:x")
        .await
        .ok()
        .flatten()
        .map(|s| s.mode())
        != Some(BreakerMode::ForcedOpen)
    {
        assert!(Instant::now() < deadline, "the mode never reached Redis");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(cb.acquire("tool:x").await.is_err(), "still forced open");
    assert_eq!(
        reader
            .get_state("tool:x")
            .await
            .ok()
            .flatten()
            .map(|s| s.mode()),
        Some(BreakerMode::ForcedOpen)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mode_change_does_not_undo_a_concurrent_trip() {
    let server = RedisServer::start();
    let url = server.url();
    let a = store(&url, patient());
    let b = store(&url, patient());
    let policy = BreakerPolicy {
        consecutive_failures: 3,
        timeout: Duration::from_secs(60),
        ..BreakerPolicy::default()
    };
    for round in 0..20 {
        let key = format!("server:{round}");
        let modes = {
            let b = b.clone();
            let key = key.clone();
            tokio::spawn(async move {
                for i in 0..100 {
                    let mode = if i % 2 == 0 {
                        BreakerMode::MetricsOnly
                    } else {
                        BreakerMode::Normal
                    };
                    assert!(b.set_mode(&key, mode).await.is_ok());
                }
            })
        };
        let trips = {
            let a = a.clone();
            let key = key.clone();
            tokio::spawn(async move {
                for _ in 0..3 {
                    fail(&a, &key, &policy).await;
                    tokio::task::yield_now().await;
                }
            })
        };
        assert!(modes.await.is_ok() && trips.await.is_ok());
        let state = a.get_state(&key).await.ok().flatten();
        assert_eq!(
            state
                .as_ref()
                .map(|s| (s.effective_state(), s.mode(), s.trips())),
            Some((CircuitState::Open, BreakerMode::Normal, 1)),
            "round {round}: {state:?}"
        );
    }
}

#[test]
fn breaker_ttl_must_outlive_the_open_time_and_the_probe_deadline() {
    let server = RedisServer::start();
    let build = |timeout: Duration, deadline: Duration| {
        CircuitBreakerMiddleware::builder()
            .timeout(timeout)
            .probe_deadline(deadline)
            .persistence(StatePersistence::Redis {
                client: client(&server.url()),
                key_prefix: "ttl:".into(),
            })
            .redis_options(patient().breaker_ttl(Duration::from_secs(10)))
            .build()
    };
    match build(Duration::from_secs(30), Duration::from_secs(30)) {
        Err(e) => assert!(e.to_string().contains("breaker_ttl"), "{e}"),
        Ok(_) => panic!("a TTL shorter than open time + probe deadline must be refused"),
    }
    let cb = match build(Duration::from_secs(4), Duration::from_secs(5)) {
        Ok(cb) => cb,
        Err(e) => panic!("{e}"),
    };
    let longer = BreakerPolicy {
        timeout: Duration::from_secs(60),
        ..cb.policy()
    };
    assert!(cb.reconfigure(longer).is_err(), "reconfigure checks it too");
}
