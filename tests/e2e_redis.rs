//! End to end through the builders: `StatePersistence::Redis` for the
//! breaker and the limiter, two middleware instances (as two processes
//! would have) sharing one Redis started by the test, real pmcp servers and
//! clients on loopback.
#![cfg(feature = "redis")]

#[path = "support/patient.rs"]
mod patient;
mod support;

use patient::patient;

use std::sync::Arc;
use std::time::Duration;

use pmcp::shared::AdvancedMiddleware;
use pmcp_resilience::{
    CircuitBreakerMiddleware, RateLimitMiddleware, RateLimitStrategy, Scope, StatePersistence,
};
use serde_json::json;
use support::redis::RedisServer;
use support::*;

/// Generous: these tests are about what is decided, not how fast.
fn redis_persistence(server: &RedisServer, prefix: &str) -> StatePersistence {
    let client = match ::redis::Client::open(server.url()) {
        Ok(c) => c,
        Err(e) => panic!("redis client: {e}"),
    };
    StatePersistence::Redis {
        client,
        key_prefix: prefix.to_string(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_one_limit_through_redis() {
    let redis = RedisServer::start();
    let server = start_server("shared-limit").await;
    let build = || match RateLimitMiddleware::builder()
        .scope(Scope::PerTool)
        .strategy(RateLimitStrategy::FixedWindow {
            max_requests: 4,
            window: Duration::from_secs(60),
        })
        .persistence(redis_persistence(&redis, "e2e:"))
        .redis_options(patient())
        .build()
    {
        Ok(rl) => rl,
        Err(e) => panic!("limiter config: {e}"),
    };
    let (a, b) = (build(), build());
    let mut ca = client(
        transport(&server.url),
        vec![Arc::new(a) as Arc<dyn AdvancedMiddleware>],
    );
    let mut cb = client(
        transport(&server.url),
        vec![Arc::new(b) as Arc<dyn AdvancedMiddleware>],
    );
    initialize(&mut ca).await;
    initialize(&mut cb).await;
    let mut admitted = 0;
    for i in 0..10 {
        let c = if i % 2 == 0 { &ca } else { &cb };
        if call(c, "echo", json!({"message": i})).await.is_ok() {
            admitted += 1;
        }
    }
    assert_eq!(
        admitted, 4,
        "two instances together admit the one shared limit"
    );
    assert_eq!(server.behaviour.calls("echo"), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_seen_by_one_instance_open_the_breaker_for_the_other() {
    let redis = RedisServer::start();
    let server = start_server("shared-breaker").await;
    server.break_flaky();
    let build = || match CircuitBreakerMiddleware::builder()
        .scope(Scope::PerTool)
        .failure_threshold(3)
        .timeout(Duration::from_secs(60))
        .persistence(redis_persistence(&redis, "e2e:"))
        .redis_options(patient())
        .build()
    {
        Ok(cb) => cb,
        Err(e) => panic!("breaker config: {e}"),
    };
    let (first, second) = (build(), build());
    let mut c1 = client(
        transport(&server.url),
        vec![Arc::new(first) as Arc<dyn AdvancedMiddleware>],
    );
    let mut c2 = client(
        transport(&server.url),
        vec![Arc::new(second) as Arc<dyn AdvancedMiddleware>],
    );
    initialize(&mut c1).await;
    initialize(&mut c2).await;
    for _ in 0..3 {
        assert!(call(&c1, "flaky", json!({})).await.is_err());
    }
    let r = call(&c2, "flaky", json!({})).await;
    assert!(
        matches!(r, Err(pmcp::Error::CircuitBreakerOpen)),
        "the second instance must see the breaker opened by the first, got {r:?}"
    );
    assert_eq!(
        server.behaviour.calls("flaky"),
        3,
        "the open breaker kept the call off the server"
    );
}

#[test]
fn the_redis_breaker_refuses_rules_it_cannot_share() {
    let redis = RedisServer::start();
    let built = CircuitBreakerMiddleware::builder()
        .failure_rate(0.5, 10)
        .persistence(redis_persistence(&redis, "e2e:"))
        .build();
    match built {
        Err(e) => assert!(
            e.to_string().to_lowercase().contains("redis"),
            "unclear error: {e}"
        ),
        Ok(_) => panic!("a failure-rate breaker on Redis must be refused"),
    }
    // The same rule added at run time is refused too, and the policy stays.
    let cb = match CircuitBreakerMiddleware::builder()
        .persistence(redis_persistence(&redis, "e2e:"))
        .build()
    {
        Ok(cb) => cb,
        Err(e) => panic!("breaker config: {e}"),
    };
    let before = cb.policy();
    let mut with_rate = before;
    with_rate.failure_rate = Some(pmcp_resilience::circuit_breaker::FailureRate {
        threshold: 0.5,
        minimum_calls: 10,
    });
    assert!(
        cb.reconfigure(with_rate).is_err(),
        "reconfigure must refuse it on Redis"
    );
    assert_eq!(cb.policy(), before);
}

fn store_mode_line(text: &str, mode: &str) -> Option<f64> {
    text.lines()
        .find(|l| {
            l.starts_with("mcp_resilience_store_mode{")
                && l.contains("kind=\"redis\"")
                && l.contains(&format!("mode=\"{mode}\""))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_mode_shows_in_the_metrics_and_recovers_with_redis() {
    let mut redis = RedisServer::start();
    let server = start_server("store-mode").await;
    let rl = match RateLimitMiddleware::builder()
        .scope(Scope::PerMethod)
        .strategy(RateLimitStrategy::TokenBucket {
            capacity: 1000,
            refill_rate: 1000,
        })
        .persistence(redis_persistence(&redis, "mode:"))
        .redis_options(
            patient()
                .failure_policy(pmcp_resilience::redis_store::FailurePolicy::LocalFallback)
                .retry_interval(Duration::from_millis(100)),
        )
        .build()
    {
        Ok(rl) => rl,
        Err(e) => panic!("limiter config: {e}"),
    };
    let metrics = match pmcp_resilience::observe::MetricsMiddleware::builder()
        .source(Arc::new(rl.clone()))
        .build()
    {
        Ok(m) => m,
        Err(e) => panic!("metrics config: {e}"),
    };
    let mut c = client(
        transport(&server.url),
        vec![Arc::new(rl.clone()) as Arc<dyn AdvancedMiddleware>],
    );
    initialize(&mut c).await;
    assert!(call(&c, "echo", json!({})).await.is_ok());
    assert_eq!(store_mode_line(&metrics.render(), "normal"), Some(1.0));
    assert_eq!(rl.store_report().kind, "redis");

    redis.kill();
    // Redis is down: the local fallback limiter answers, and the metrics say so.
    assert!(call(&c, "echo", json!({})).await.is_ok());
    let text = metrics.render();
    assert_eq!(
        store_mode_line(&text, "local_fallback"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(store_mode_line(&text, "normal"), Some(0.0));

    redis.restart();
    // After the retry interval the store tries Redis again by itself (polled).
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while store_mode_line(&metrics.render(), "normal") != Some(1.0) {
        assert!(
            std::time::Instant::now() < deadline,
            "never back to normal: {}",
            metrics.render()
        );
        assert!(call(&c, "echo", json!({})).await.is_ok());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        metrics
            .render()
            .contains("mcp_resilience_store_latency_seconds_count{kind=\"redis\"}"),
        "store latency is exported"
    );
}
