//! Numbers that would make a later step divide by zero or overflow are
//! refused by `build()`, each with an error naming the setting; the largest
//! accepted values work.

use std::sync::Arc;
use std::time::Duration;

use pmcp::shared::{AdvancedMiddleware, MiddlewareContext};
use pmcp::types::{JSONRPCRequest, RequestId};
use pmcp_resilience::circuit_breaker::Verdict;
use pmcp_resilience::persistence::{FileStoreOptions, MAX_FLUSH_INTERVAL};
use pmcp_resilience::rate_limit::KeyedRateLimiter;
use pmcp_resilience::rate_limit::strategy::{MAX_RATE_PER_SEC, MAX_WINDOW};
use pmcp_resilience::store::InMemoryStateStore;
use pmcp_resilience::{
    CircuitBreakerMiddleware, CircuitState, ConfigError, RateLimitMiddleware, RateLimitStrategy,
    StatePersistence,
};

fn ping() -> JSONRPCRequest {
    JSONRPCRequest {
        jsonrpc: "2.0".into(),
        method: "ping".into(),
        params: None,
        id: RequestId::from(1i64),
    }
}

async fn send(limiter: &RateLimitMiddleware) -> pmcp::Result<()> {
    limiter
        .on_request_with_context(&mut ping(), &MiddlewareContext::default())
        .await
}

fn build_with(strategy: RateLimitStrategy) -> Result<RateLimitMiddleware, ConfigError> {
    RateLimitMiddleware::builder().strategy(strategy).build()
}

/// The field of an `Invalid` error, or a panic naming what came instead.
fn invalid_field<T: std::fmt::Debug>(result: Result<T, ConfigError>) -> &'static str {
    match result {
        Err(ConfigError::Invalid { field, .. }) => field,
        other => panic!("expected ConfigError::Invalid, got {other:?}"),
    }
}

#[test]
fn a_refill_rate_above_one_per_nanosecond_is_refused() {
    // 2e9 per second: the refill interval would round to 0 ns and be divided by.
    let result = build_with(RateLimitStrategy::TokenBucket {
        capacity: 10,
        refill_rate: 2_000_000_000,
    });
    assert_eq!(invalid_field(result), "refill_rate");
}

#[test]
fn a_leak_rate_above_one_per_nanosecond_is_refused() {
    let result = build_with(RateLimitStrategy::LeakyBucket {
        capacity: 10,
        leak_rate: MAX_RATE_PER_SEC + 1,
    });
    assert_eq!(invalid_field(result), "leak_rate");
}

#[test]
fn a_fixed_window_beyond_the_longest_is_refused() {
    let result = build_with(RateLimitStrategy::FixedWindow {
        max_requests: 10,
        window: Duration::MAX,
    });
    assert_eq!(invalid_field(result), "window");
}

#[test]
fn a_sliding_window_beyond_the_longest_is_refused() {
    // Two such windows overflow u64 nanoseconds when the usage is read.
    let result = build_with(RateLimitStrategy::SlidingWindow {
        max_requests: 10,
        window: MAX_WINDOW + Duration::from_nanos(1),
    });
    assert_eq!(invalid_field(result), "window");
}

#[tokio::test]
async fn the_fastest_rates_decide_and_report() {
    for strategy in [
        RateLimitStrategy::TokenBucket {
            capacity: 2,
            refill_rate: MAX_RATE_PER_SEC,
        },
        RateLimitStrategy::LeakyBucket {
            capacity: 2,
            leak_rate: MAX_RATE_PER_SEC,
        },
    ] {
        let limiter = build_with(strategy).expect("the highest rate is valid");
        send(&limiter).await.expect("a fresh key admits");
        let snapshot = limiter.metrics();
        assert_eq!(snapshot.allowed_requests, 1, "{strategy:?}");
    }
}

#[tokio::test]
async fn the_longest_windows_decide_and_report() {
    for strategy in [
        RateLimitStrategy::FixedWindow {
            max_requests: 1,
            window: MAX_WINDOW,
        },
        RateLimitStrategy::SlidingWindow {
            max_requests: 1,
            window: MAX_WINDOW,
        },
    ] {
        let limiter = build_with(strategy).expect("the longest window is valid");
        send(&limiter).await.expect("a fresh key admits");
        assert!(
            send(&limiter).await.is_err(),
            "{strategy:?}: the window is used up"
        );
        // Reading the usage adds windows to the window start.
        let snapshot = limiter.metrics();
        assert_eq!(
            (snapshot.allowed_requests, snapshot.rejected_requests),
            (1, 1),
            "{strategy:?}"
        );
        assert!(
            limiter
                .retry_after("global")
                .is_some_and(|d| d > Duration::ZERO)
        );
    }
}

#[tokio::test]
async fn a_flush_interval_beyond_a_day_is_refused() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let result = RateLimitMiddleware::builder()
        .persistence(StatePersistence::File(dir.path().join("limits.json")))
        .file_options(
            FileStoreOptions::default().flush_interval(MAX_FLUSH_INTERVAL + Duration::from_secs(1)),
        )
        .build();
    assert_eq!(invalid_field(result), "flush_interval");
}

#[test]
fn a_limiter_given_a_breaker_store_is_refused_with_what_to_use_instead() {
    let breaker_store = Arc::new(InMemoryStateStore::new());
    let result = RateLimitMiddleware::builder()
        .persistence(StatePersistence::Custom(breaker_store))
        .build();
    match result {
        Err(e @ ConfigError::UnsupportedPersistence(_)) => {
            let message = e.to_string();
            assert!(message.contains("circuit breaker"), "{message}");
            assert!(message.contains(".limiter(..)"), "{message}");
        }
        other => panic!("expected UnsupportedPersistence, got {other:?}"),
    }
}

#[test]
fn a_breaker_store_is_refused_beside_a_limiter_of_ones_own() {
    let own = KeyedRateLimiter::with_strategy(RateLimitStrategy::TokenBucket {
        capacity: 10,
        refill_rate: 1,
    })
    .expect("valid");
    let result = RateLimitMiddleware::builder()
        .limiter(Arc::new(own))
        .persistence(StatePersistence::Custom(
            Arc::new(InMemoryStateStore::new()),
        ))
        .build();
    assert!(
        matches!(result, Err(ConfigError::UnsupportedPersistence(_))),
        "{result:?}"
    );
}

#[tokio::test]
async fn a_breaker_with_the_longest_durations_opens_and_reports() {
    let breaker = CircuitBreakerMiddleware::builder()
        .failure_threshold(1)
        .timeout(Duration::MAX)
        .call_timeout(Duration::MAX)
        .probe_deadline(Duration::MAX)
        .slow_calls(Duration::MAX, 1.0, 1)
        .open_backoff(f64::MAX, Duration::MAX, 0.5)
        .build()
        .expect("long durations are valid");
    let permit = breaker.acquire("global").await.expect("closed");
    permit.record(Verdict::Failure).await;
    assert_eq!(breaker.state_of("global"), Some(CircuitState::Open));
    assert!(
        breaker
            .retry_after("global")
            .is_some_and(|d| d > Duration::from_secs(1))
    );
    assert!(breaker.acquire("global").await.is_err(), "open: refused");
    assert_eq!(breaker.metrics().rejected_requests, 1);
}

#[cfg(feature = "prometheus")]
#[test]
fn an_export_interval_beyond_a_day_is_refused() {
    use pmcp_resilience::observe::{MAX_EXPORT_INTERVAL, MetricsMiddleware};
    let result = MetricsMiddleware::builder()
        .export_interval(MAX_EXPORT_INTERVAL + Duration::from_secs(1))
        .build();
    assert_eq!(invalid_field(result), "export_interval");
}

#[cfg(feature = "redis")]
#[test]
fn a_redis_breaker_ttl_beyond_a_year_is_refused() {
    use pmcp_resilience::redis_store::RedisOptions;
    let options = RedisOptions::default().breaker_ttl(Duration::from_secs(366 * 24 * 60 * 60));
    assert_eq!(invalid_field(options.validate()), "breaker_ttl");
}
