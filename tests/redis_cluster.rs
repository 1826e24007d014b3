//! The Redis stores on a real Redis Cluster of three masters started by each
//! test on free loopback ports (`redis-server --cluster-enabled yes` and
//! `redis-cli --cluster create`).
#![cfg(feature = "redis-cluster")]

#[path = "support/redis_cluster.rs"]
mod cluster;
#[path = "support/patient.rs"]
mod patient;

use patient::patient;

use std::time::{Duration, Instant};

use cluster::RedisCluster;
use pmcp_resilience::circuit_breaker::{BreakerPolicy, Verdict};
use pmcp_resilience::rate_limit::{RateLimitStrategy, RateLimiter};
use pmcp_resilience::redis_store::{FailurePolicy, RedisBreakerStore, RedisRateLimiter, StoreMode};
use pmcp_resilience::store::Admission;
use pmcp_resilience::{
    CircuitBreakerMiddleware, CircuitBreakerStateStore, CircuitState, ScopeKey, StatePersistence,
    Timestamp,
};

fn client(cluster: &RedisCluster) -> redis::cluster::ClusterClient {
    match redis::cluster::ClusterClient::new(cluster.urls()) {
        Ok(c) => c,
        Err(e) => panic!("cluster client: {e}"),
    }
}

fn now() -> Timestamp {
    Timestamp::from_nanos(0)
}

/// Scope keys whose Redis keys land on at least two different masters.
fn spread_keys(cluster: &RedisCluster, redis_key: impl Fn(&str) -> String) -> Vec<String> {
    let keys: Vec<String> = (0..12).map(|i| format!("tenant:{i}")).collect();
    let mut nodes: Vec<usize> = keys
        .iter()
        .map(|k| cluster.node_of(&redis_key(k)))
        .collect();
    nodes.sort_unstable();
    nodes.dedup();
    assert!(nodes.len() >= 2, "the keys span {} node(s)", nodes.len());
    keys
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_strategy_and_the_breaker_decide_on_keys_spread_over_the_cluster() {
    let cluster = RedisCluster::start();
    let hour = Duration::from_secs(3600);
    for strategy in [
        RateLimitStrategy::FixedWindow {
            max_requests: 3,
            window: hour,
        },
        RateLimitStrategy::SlidingWindow {
            max_requests: 3,
            window: hour,
        },
        RateLimitStrategy::TokenBucket {
            capacity: 3,
            refill_rate: 1,
        },
        RateLimitStrategy::LeakyBucket {
            capacity: 3,
            leak_rate: 1,
        },
    ] {
        let l = match RedisRateLimiter::cluster(client(&cluster), strategy, patient()) {
            Ok(l) => l,
            Err(e) => panic!("{e}"),
        };
        let keys = spread_keys(&cluster, |k| l.redis_key(k));
        for key in &keys {
            let started = Instant::now();
            let mut admitted = 0u64;
            for _ in 0..6 {
                match l.check(&ScopeKey::new(key), 1, now()).await {
                    Ok(d) if d.allowed => admitted += 1,
                    Ok(d) => assert!(d.retry_after.is_some(), "{strategy:?}: a retry hint"),
                    Err(e) => panic!("{strategy:?}: {e}"),
                }
            }
            // One unit a second comes back for the buckets.
            let refilled = started.elapsed().as_secs() + 1;
            assert!(
                admitted >= 3 && admitted <= 3 + refilled,
                "{strategy:?} {key}: admitted {admitted}"
            );
        }
        assert_eq!(l.health().mode, StoreMode::Normal);
        assert_eq!(l.health().store_errors, 0);
    }
    let with_keys = cluster.nodes.iter().filter(|n| n.keys() > 0).count();
    assert!(with_keys >= 2, "state on {with_keys} node(s)");

    let store = match RedisBreakerStore::cluster(client(&cluster), patient()) {
        Ok(s) => s,
        Err(e) => panic!("{e}"),
    };
    let policy = BreakerPolicy {
        consecutive_failures: 3,
        timeout: Duration::from_secs(60),
        ..BreakerPolicy::default()
    };
    let keys = spread_keys(&cluster, |k| store.redis_key(k));
    for key in &keys {
        for _ in 0..3 {
            let r = store
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
        assert_eq!(
            store
                .get_state(key)
                .await
                .ok()
                .flatten()
                .map(|s| s.effective_state()),
            Some(CircuitState::Open)
        );
        assert!(matches!(
            store.acquire(key, &policy, now(), 0.5).await,
            Ok((Admission::Rejected { .. }, _))
        ));
    }
    // Through the builder: StatePersistence::RedisCluster.
    let cb = match CircuitBreakerMiddleware::builder()
        .failure_threshold(3)
        .timeout(Duration::from_secs(60))
        .persistence(StatePersistence::RedisCluster {
            client: client(&cluster),
            key_prefix: "pmcp:".into(),
        })
        .redis_options(patient())
        .build()
    {
        Ok(cb) => cb,
        Err(e) => panic!("{e}"),
    };
    assert!(
        cb.acquire(&keys[0]).await.is_err(),
        "the breaker opened by another store is open here"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_killed_and_restarted_honours_the_policy_then_decides_on_redis_again() {
    let mut cluster = RedisCluster::start();
    let retry = Duration::from_millis(100);
    let strategy = RateLimitStrategy::TokenBucket {
        capacity: 1_000_000,
        refill_rate: 1000,
    };
    let options = patient()
        .failure_policy(FailurePolicy::FailClosed)
        .retry_interval(retry)
        .call_timeout(Duration::from_millis(500));
    let l = match RedisRateLimiter::cluster(client(&cluster), strategy, options) {
        Ok(l) => l,
        Err(e) => panic!("{e}"),
    };
    let key = ScopeKey::new("tenant:victim");
    let victim = cluster.node_of(&l.redis_key(key.as_str()));
    // Connected and the script loaded (polled: the machine may be loaded).
    let deadline = Instant::now() + Duration::from_secs(30);
    while !matches!(l.check(&key, 1, now()).await, Ok(d) if d.allowed) {
        assert!(Instant::now() < deadline, "the cluster never answered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cluster.nodes[victim].kill();
    // The failure policy decides: fail closed, with the retry interval as the hint.
    for _ in 0..5 {
        match l.check(&key, 1, now()).await {
            Ok(d) => {
                assert!(!d.allowed, "fail closed refuses while its master is down");
                assert_eq!(d.retry_after, Some(retry));
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(l.health().mode, StoreMode::FailClosed);
    cluster.nodes[victim].restart();
    // A restarted master answers CLUSTERDOWN until it has rejoined: the
    // second starts when it serves the key's slot again.
    let redis_key = l.redis_key(key.as_str());
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cluster.nodes[victim].serves(&redis_key) {
        assert!(
            Instant::now() < deadline,
            "the master never served its slot again"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let answering = Instant::now();
    let deadline = answering + Duration::from_secs(30);
    loop {
        let errors = l.health().store_errors;
        let d = l.check(&key, 1, now()).await;
        if matches!(d, Ok(d) if d.allowed) && l.health().store_errors == errors {
            break;
        }
        assert!(Instant::now() < deadline, "never back on Redis: {d:?}");

        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let back = answering.elapsed();
    assert!(
        back <= Duration::from_secs(1),
        "decisions back on Redis {back:?} after the master answered again"
    );
    assert_eq!(l.health().mode, StoreMode::Normal);
}

const CHILD_ENV: &str = "PMCP_CLUSTER_CHILD_URLS";

/// Child role of the next test: 16 tasks hammer one key for a while; prints
/// the admissions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_sixteen_tasks_hammer_one_limit() {
    let Ok(urls) = std::env::var(CHILD_ENV) else {
        return;
    };
    let client = match redis::cluster::ClusterClient::new(urls.split(',').collect::<Vec<_>>()) {
        Ok(c) => c,
        Err(e) => panic!("{e}"),
    };
    let strategy = RateLimitStrategy::TokenBucket {
        capacity: 50,
        refill_rate: 20,
    };
    let l = match RedisRateLimiter::cluster(client, strategy, patient()) {
        Ok(l) => std::sync::Arc::new(l),
        Err(e) => panic!("{e}"),
    };
    let until = Instant::now() + Duration::from_millis(1500);
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let l = l.clone();
            tokio::spawn(async move {
                let key = ScopeKey::new("tenant:shared");
                let mut admitted = 0u64;
                while Instant::now() < until {
                    if let Ok(d) = l.check(&key, 1, now()).await
                        && d.allowed
                    {
                        admitted += 1;
                    }
                }
                admitted
            })
        })
        .collect();
    let mut admitted = 0;
    for t in tasks {
        admitted += t.await.unwrap_or(0);
    }
    println!("ADMITTED={admitted}");
}

async fn redis_time_us(url: &str) -> u64 {
    let Ok(c) = redis::Client::open(url) else {
        panic!("client")
    };
    let Ok(mut c) = c.get_multiplexed_async_connection().await else {
        panic!("connect")
    };
    let t: (u64, u64) = match redis::cmd("TIME").query_async(&mut c).await {
        Ok(t) => t,
        Err(e) => panic!("TIME: {e}"),
    };
    t.0 * 1_000_000 + t.1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_processes_of_sixteen_tasks_admit_no_more_than_one_shared_limit() {
    let cluster = RedisCluster::start();
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => panic!("current_exe: {e}"),
    };
    let url = cluster.urls()[0].clone();
    let started = redis_time_us(&url).await;
    let children: Vec<_> = (0..3)
        .map(|_| {
            std::process::Command::new(&exe)
                .args([
                    "--exact",
                    "child_sixteen_tasks_hammer_one_limit",
                    "--nocapture",
                    "--test-threads",
                    "1",
                ])
                .env(CHILD_ENV, cluster.urls().join(","))
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
        total += n;
    }
    let elapsed_us = redis_time_us(&url).await - started;
    // Capacity 50 at once, then 20 per second (on Redis's clock).
    let bound = 50 + (elapsed_us * 20).div_ceil(1_000_000);
    assert!(total <= bound, "admitted {total}, bound {bound}");
    assert!(total >= 50, "admitted {total}");
}
