//! Each change between normal and degraded is said once (a `tracing`
//! warning with the error, an info line on return) and exported as the
//! store mode gauge and a counter of degraded decisions. In a binary of its
//! own: `tracing` caches per call site whether anyone listens, so a test
//! that sets its own subscriber must not share a process with others.
#![cfg(feature = "redis")]

#[path = "support/logs.rs"]
mod logs;
#[path = "support/patient.rs"]
mod patient;
mod support;

use patient::patient;

use std::sync::Arc;
use std::time::{Duration, Instant};

use logs::Lines;
use pmcp_resilience::observe::MetricsMiddleware;
use pmcp_resilience::rate_limit::{RateLimitMiddleware, RateLimitStrategy, RateLimiter};
use pmcp_resilience::redis_store::{RedisOptions, RedisRateLimiter, StoreMode};
use pmcp_resilience::{ScopeKey, Timestamp};
use support::redis::RedisServer;

fn now() -> Timestamp {
    Timestamp::from_nanos(0)
}

fn limiter(url: &str, strategy: RateLimitStrategy, options: RedisOptions) -> RedisRateLimiter {
    let client = match redis::Client::open(url) {
        Ok(c) => c,
        Err(e) => panic!("client: {e}"),
    };
    match RedisRateLimiter::new(client, strategy, options) {
        Ok(l) => l,
        Err(e) => panic!("limiter: {e}"),
    }
}

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

fn mode_value(text: &str, mode: &str) -> Option<f64> {
    text.lines()
        .find(|l| {
            l.starts_with("mcp_resilience_store_mode{")
                && l.contains("kind=\"redis\"")
                && l.contains(&format!("mode=\"{mode}\""))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

fn degraded_total(text: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with("mcp_resilience_store_degraded_decisions_total{kind=\"redis\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

// One thread: the subscriber set for this test sees every line.
#[tokio::test(flavor = "current_thread")]
async fn each_change_of_mode_is_said_once_and_exported() {
    let lines = Lines::default();
    let _guard = lines.capture(tracing::Level::DEBUG);

    let mut server = RedisServer::start();
    let options = patient().retry_interval(Duration::from_millis(30));
    let strategy = RateLimitStrategy::TokenBucket {
        capacity: 1_000_000,
        refill_rate: 1000,
    };
    let l = Arc::new(limiter(&server.url(), strategy, options));
    let rl = match RateLimitMiddleware::builder()
        .limiter(l.clone() as Arc<dyn RateLimiter>)
        .build()
    {
        Ok(rl) => rl,
        Err(e) => panic!("middleware: {e}"),
    };
    let metrics = match MetricsMiddleware::builder().source(Arc::new(rl)).build() {
        Ok(m) => m,
        Err(e) => panic!("metrics: {e}"),
    };
    let key = ScopeKey::new("tenant:said");
    for round in 1..=2 {
        warm_up(&l, "tenant:said").await;
        assert_eq!(mode_value(&metrics.render(), "normal"), Some(1.0));
        server.kill();
        let before = l.health().degraded_decisions;
        for _ in 0..50 {
            let _ = l.check(&key, 1, now()).await;
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        assert!(
            l.health().store_errors >= 2,
            "Redis was tried more than once"
        );
        let text = metrics.render();
        assert_eq!(mode_value(&text, "local_fallback"), Some(1.0), "{text}");
        assert_eq!(mode_value(&text, "normal"), Some(0.0), "{text}");
        assert_eq!(l.health().degraded_decisions - before, 50);
        assert_eq!(
            degraded_total(&text),
            Some(l.health().degraded_decisions as f64),
            "{text}"
        );
        assert_eq!(
            lines.count("redis failed: deciding under the failure policy"),
            round,
            "one warning per change to degraded"
        );
        let warning = "WARN";
        assert_eq!(lines.count(warning), round, "no other warnings");
        server.restart();
        // Recovery is polled: the store tries Redis again by itself.
        warm_up(&l, "tenant:said").await;
        assert_eq!(
            lines.count("redis answers again"),
            round,
            "one info line per return"
        );
    }
}
