//! The rate-limit middleware and the keyed limiter, without a network.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use parking_lot::Mutex;
use pmcp::shared::{AdvancedMiddleware, EnhancedMiddlewareChain, MiddlewareContext};
use pmcp::types::{JSONRPCRequest, RequestId};
use pmcp_resilience::rate_limit::{
    BackpressureConfig, KeyedRateLimiter, RateLimitBuilder, RateLimitMiddleware, RateLimitStrategy,
};
use pmcp_resilience::{
    ConfigError, ManualClock, MetricsConfig, RegistryLimits, Scope, StatePersistence, TokioClock,
};
use serde_json::json;

fn request(method: &str, params: Option<serde_json::Value>) -> JSONRPCRequest {
    JSONRPCRequest {
        jsonrpc: "2.0".into(),
        method: method.into(),
        params,
        id: RequestId::from(1i64),
    }
}

fn tool_call(name: &str) -> JSONRPCRequest {
    request("tools/call", Some(json!({"name": name, "arguments": {}})))
}

async fn send(rl: &RateLimitMiddleware, mut req: JSONRPCRequest) -> pmcp::Result<()> {
    rl.on_request_with_context(&mut req, &MiddlewareContext::default())
        .await
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn bucket(capacity: u32, refill_rate: u32) -> RateLimitStrategy {
    RateLimitStrategy::TokenBucket {
        capacity,
        refill_rate,
    }
}

#[test]
fn several_threads_on_one_key_admit_no_more_than_one_thread() {
    let limiter = Arc::new(
        KeyedRateLimiter::new(
            bucket(1000, 1),
            RegistryLimits::default(),
            Arc::new(ManualClock::new()),
        )
        .unwrap(),
    );
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let limiter = Arc::clone(&limiter);
            std::thread::spawn(move || {
                (0..1000)
                    .filter(|_| limiter.check_key("k", 1).allowed)
                    .count()
            })
        })
        .collect();
    let admitted: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert_eq!(admitted, 1000, "time stands still: exactly the capacity");
}

#[test]
fn a_flood_of_a_million_keys_stays_under_the_cap() {
    let clock = ManualClock::new();
    let limiter = KeyedRateLimiter::new(
        bucket(5, 5),
        RegistryLimits {
            max_keys: 10_000,
            idle_after: Duration::from_secs(1),
        },
        Arc::new(clock.clone()),
    )
    .unwrap();
    let mut key = String::with_capacity(32);
    for i in 0..1_000_000u32 {
        clock.advance(Duration::from_micros(200));
        key.clear();
        key.push_str("session:");
        key.push_str(&i.to_string());
        limiter.check_key(&key, 1);
        if i % 100_000 == 0 {
            assert!(limiter.registry_stats().keys <= 10_001);
        }
    }
    let stats = limiter.registry_stats();
    assert!(stats.keys <= 10_001, "{stats:?}");
    assert!(stats.evicted > 0, "idle full keys were dropped: {stats:?}");
}

fn invalid(builder: RateLimitBuilder) -> (&'static str, String) {
    match builder.build() {
        Err(ConfigError::Invalid { field, reason }) => (field, reason.to_string()),
        other => panic!("expected an invalid setting, got {other:?}"),
    }
}

#[test]
fn builder_rejects_what_cannot_work() {
    let (field, _) = invalid(RateLimitMiddleware::builder().strategy(bucket(0, 1)));
    assert_eq!(field, "capacity");
    let (field, _) = invalid(RateLimitMiddleware::builder().strategy(
        RateLimitStrategy::FixedWindow {
            max_requests: 5,
            window: Duration::ZERO,
        },
    ));
    assert_eq!(field, "window");
    let (field, _) = invalid(RateLimitMiddleware::builder().strategy(
        RateLimitStrategy::LeakyBucket {
            capacity: 5,
            leak_rate: 0,
        },
    ));
    assert_eq!(field, "leak_rate");
    let (field, reason) = invalid(RateLimitMiddleware::builder().backpressure(
        BackpressureConfig {
            wait_for_capacity: true,
            max_wait: Duration::ZERO,
            signal_client: false,
            backpressure_header: "X-RateLimit-Reset".into(),
        },
    ));
    assert_eq!(field, "max_wait");
    assert!(reason.contains("wait_for_capacity"), "{reason}");
    let (field, reason) = invalid(
        RateLimitMiddleware::builder()
            .strategy(bucket(5, 1))
            .cost_for_tool("search", 10),
    );
    assert_eq!(field, "cost");
    assert!(
        reason.contains("search") && reason.contains("never"),
        "{reason}"
    );
    let (field, _) = invalid(
        RateLimitMiddleware::builder()
            .backpressure(BackpressureConfig::wait_up_to(ms(10)))
            .max_waiters(0),
    );
    assert_eq!(field, "max_waiters");
    let (field, _) = invalid(
        RateLimitMiddleware::builder().registry_limits(RegistryLimits {
            max_keys: 0,
            idle_after: Duration::from_secs(1),
        }),
    );
    assert_eq!(field, "max_keys");
    let (field, _) = invalid(
        RateLimitMiddleware::builder().backpressure(
            BackpressureConfig::reject()
                .with_client_signal()
                .with_header("bad header"),
        ),
    );
    assert_eq!(field, "backpressure_header");
    let file = RateLimitMiddleware::builder()
        .persistence(StatePersistence::File("limits.json".into()))
        .build();
    // File persistence needs a runtime for its background writes.
    assert!(
        matches!(&file, Err(ConfigError::Store(m)) if m.contains("Tokio runtime")),
        "{file:?}"
    );
}

#[tokio::test]
async fn new_behaves_like_pmcps_for_a_burst() {
    let ours = RateLimitMiddleware::new(2, 3, Duration::from_secs(60));
    let theirs = pmcp::shared::RateLimitMiddleware::new(2, 3, Duration::from_secs(60));
    let mut ours_seq = Vec::new();
    let mut theirs_seq = Vec::new();
    for _ in 0..5 {
        let ctx = MiddlewareContext::default();
        ours_seq.push(
            ours.on_request_with_context(&mut request("ping", None), &ctx)
                .await
                .map_err(|e| e.to_string()),
        );
        theirs_seq.push(
            theirs
                .on_request_with_context(&mut request("ping", None), &ctx)
                .await
                .map_err(|e| e.to_string()),
        );
    }
    assert_eq!(ours_seq, theirs_seq);
    assert_eq!(ours_seq.iter().filter(|r| r.is_ok()).count(), 3);
    assert!(matches!(
        send(&ours, request("ping", None)).await,
        Err(pmcp::Error::RateLimited)
    ));
    assert_eq!(ours.name(), "rate_limit");
    assert_eq!(ours.priority(), pmcp::shared::MiddlewarePriority::High);
}

#[tokio::test]
async fn per_method_limits_in_pmcps_chain_apply_to_their_method_only() {
    let clock = ManualClock::new();
    let rl = RateLimitMiddleware::builder()
        .scope(Scope::PerMethod)
        .strategy(RateLimitStrategy::FixedWindow {
            max_requests: 4,
            window: Duration::from_secs(60),
        })
        .cost_for_method("tools/call", 2)
        .backpressure(BackpressureConfig::reject().with_client_signal())
        .clock(Arc::new(clock.clone()))
        .build()
        .unwrap();
    let mut chain = EnhancedMiddlewareChain::new();
    chain.add(Arc::new(rl.clone()));
    let ctx = MiddlewareContext::default();
    for _ in 0..2 {
        chain
            .process_request_with_context(&mut tool_call("echo"), &ctx)
            .await
            .unwrap();
    }
    let err = chain
        .process_request_with_context(&mut tool_call("echo"), &ctx)
        .await
        .unwrap_err();
    let pmcp::Error::Protocol {
        code,
        message,
        data,
    } = err
    else {
        panic!("expected a protocol error, got {err:?}");
    };
    assert_eq!(code, pmcp::ErrorCode::RATE_LIMITED);
    assert!(
        message.contains("method:tools/call") && message.contains("retry after"),
        "{message}"
    );
    let data = data.unwrap();
    let retry = data["retryAfterMs"].as_u64().unwrap();
    assert!(retry > 0 && retry <= 60_000, "{data}");
    assert_eq!(data["limit"], 4);
    assert_eq!(data["remaining"], 0);
    assert_eq!(data["scope"], "method");
    assert_eq!(data["key"], "method:tools/call");
    assert_eq!(data["header"], "X-RateLimit-Reset");
    assert_eq!(rl.retry_after("method:tools/call"), Some(ms(retry)));
    // Another method has its own budget.
    for _ in 0..4 {
        chain
            .process_request_with_context(&mut request("ping", None), &ctx)
            .await
            .unwrap();
    }
    assert!(rl.retry_after("method:resources/list").is_none());
    clock.advance(Duration::from_secs(60));
    chain
        .process_request_with_context(&mut tool_call("echo"), &ctx)
        .await
        .unwrap();
}

#[tokio::test]
async fn per_tool_costs_and_cost_function() {
    let rl = RateLimitMiddleware::builder()
        .strategy(bucket(10, 1))
        .cost_for_tool("search", 10)
        .cost_fn(Arc::new(
            |r: &JSONRPCRequest| {
                if r.method == "ping" { 0 } else { 3 }
            },
        ))
        .clock(Arc::new(ManualClock::new()))
        .build()
        .unwrap();
    send(&rl, tool_call("search")).await.unwrap();
    assert!(
        send(&rl, tool_call("other")).await.is_err(),
        "the bucket is empty"
    );
    for _ in 0..100 {
        send(&rl, request("ping", None)).await.unwrap();
    }
}

#[tokio::test]
async fn a_cost_above_the_limit_says_never() {
    let rl = RateLimitMiddleware::builder()
        .strategy(bucket(2, 1))
        .cost_fn(Arc::new(|_| 5))
        .backpressure(
            BackpressureConfig::wait_up_to(Duration::from_secs(3600)).with_client_signal(),
        )
        .build()
        .unwrap();
    let Err(pmcp::Error::Protocol { message, data, .. }) = send(&rl, request("x", None)).await
    else {
        panic!("expected a protocol error");
    };
    assert!(message.contains("never"), "{message}");
    assert!(data.unwrap()["retryAfterMs"].is_null());
}

fn waiting_bucket(capacity: u32, refill_rate: u32, max_wait: Duration) -> RateLimitBuilder {
    RateLimitMiddleware::builder()
        .strategy(bucket(capacity, refill_rate))
        .backpressure(BackpressureConfig::wait_up_to(max_wait))
        .clock(Arc::new(TokioClock::new()))
}

#[tokio::test(start_paused = true)]
async fn waiters_are_served_in_order_of_arrival() {
    let rl = waiting_bucket(1, 10, Duration::from_secs(1))
        .build()
        .unwrap();
    let start = tokio::time::Instant::now();
    let served = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for i in 0..5u64 {
        let (rl, served) = (rl.clone(), Arc::clone(&served));
        tasks.push(tokio::spawn(async move {
            send(&rl, request("ping", None)).await.unwrap();
            served.lock().push((i, start.elapsed()));
        }));
        tokio::task::yield_now().await;
    }
    for t in tasks {
        t.await.unwrap();
    }
    let served = served.lock().clone();
    let expected: Vec<_> = (0..5).map(|i| (i, ms(100 * i))).collect();
    assert_eq!(served, expected);
    let m = rl.metrics();
    assert_eq!(m.total_requests.load(Relaxed), 5);
    assert_eq!(m.allowed_requests.load(Relaxed), 5);
    assert_eq!(m.waited_requests.load(Relaxed), 4);
    assert_eq!(m.wait_time_ms.load(Relaxed), 100 + 200 + 300 + 400);
}

#[tokio::test(start_paused = true)]
async fn the_leaky_bucket_spreads_a_burst_the_token_bucket_lets_through() {
    let leaky = RateLimitMiddleware::builder()
        .strategy(RateLimitStrategy::LeakyBucket {
            capacity: 4,
            leak_rate: 10,
        })
        .clock(Arc::new(TokioClock::new()))
        .build()
        .unwrap();
    let token = RateLimitMiddleware::builder()
        .strategy(bucket(4, 10))
        .clock(Arc::new(TokioClock::new()))
        .build()
        .unwrap();
    for (rl, spacing) in [(leaky, 100), (token, 0)] {
        let start = tokio::time::Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..4 {
            let rl = rl.clone();
            tasks.push(tokio::spawn(async move {
                send(&rl, request("ping", None))
                    .await
                    .map(|_| start.elapsed())
            }));
            tokio::task::yield_now().await;
        }
        let mut times = Vec::new();
        for t in tasks {
            times.push(t.await.unwrap().unwrap());
        }
        let expected: Vec<_> = (0..4).map(|i| ms(spacing * i)).collect();
        assert_eq!(times, expected);
    }
}

#[tokio::test(start_paused = true)]
async fn a_dropped_waiter_gives_its_slot_back() {
    let rl = waiting_bucket(1, 10, Duration::from_secs(1))
        .build()
        .unwrap();
    send(&rl, request("ping", None)).await.unwrap();
    assert_eq!(rl.retry_after("global"), Some(ms(100)));
    let waiter = tokio::spawn({
        let rl = rl.clone();
        async move { send(&rl, request("ping", None)).await }
    });
    tokio::task::yield_now().await;
    assert_eq!(rl.waiting(), 1);
    assert_eq!(
        rl.retry_after("global"),
        Some(ms(200)),
        "the slot at 100 ms is held"
    );
    waiter.abort();
    assert!(waiter.await.unwrap_err().is_cancelled());
    assert_eq!(rl.waiting(), 0);
    assert_eq!(
        rl.retry_after("global"),
        Some(ms(100)),
        "the slot came back"
    );
    let start = tokio::time::Instant::now();
    send(&rl, request("ping", None)).await.unwrap();
    assert_eq!(start.elapsed(), ms(100));
    assert_eq!(rl.metrics().waited_requests.load(Relaxed), 1);
}

#[tokio::test(start_paused = true)]
async fn a_wait_beyond_max_wait_is_rejected_at_once() {
    let rl = RateLimitMiddleware::builder()
        .strategy(bucket(1, 1))
        .backpressure(BackpressureConfig::wait_up_to(ms(500)).with_client_signal())
        .clock(Arc::new(TokioClock::new()))
        .build()
        .unwrap();
    send(&rl, request("ping", None)).await.unwrap();
    let start = tokio::time::Instant::now();
    let err = send(&rl, request("ping", None)).await.unwrap_err();
    assert_eq!(
        start.elapsed(),
        Duration::ZERO,
        "no waiting before rejecting"
    );
    let pmcp::Error::Protocol {
        data: Some(data), ..
    } = err
    else {
        panic!("expected a protocol error");
    };
    assert_eq!(data["retryAfterMs"], 1000);
    assert_eq!(rl.waiting(), 0);
}

#[tokio::test(start_paused = true)]
async fn waiters_beyond_the_bound_are_rejected_at_once() {
    let rl = waiting_bucket(1, 10, Duration::from_secs(10))
        .max_waiters(2)
        .build()
        .unwrap();
    send(&rl, request("ping", None)).await.unwrap();
    let mut tasks = Vec::new();
    for _ in 0..2 {
        let rl = rl.clone();
        tasks.push(tokio::spawn(async move {
            send(&rl, request("ping", None)).await
        }));
        tokio::task::yield_now().await;
    }
    assert_eq!(rl.waiting(), 2);
    let start = tokio::time::Instant::now();
    assert!(matches!(
        send(&rl, request("ping", None)).await,
        Err(pmcp::Error::RateLimited)
    ));
    assert_eq!(start.elapsed(), Duration::ZERO);
    assert_eq!(
        rl.retry_after("global"),
        Some(ms(300)),
        "the rejected request's slot was given back"
    );
    for t in tasks {
        t.await.unwrap().unwrap();
    }
}

#[tokio::test]
async fn metrics_report_usage_per_key_on_demand() {
    let rl = RateLimitMiddleware::builder()
        .scope(Scope::PerTool)
        .strategy(RateLimitStrategy::FixedWindow {
            max_requests: 3,
            window: Duration::from_secs(60),
        })
        .clock(Arc::new(ManualClock::new()))
        .build()
        .unwrap();
    send(&rl, tool_call("a")).await.unwrap();
    send(&rl, tool_call("a")).await.unwrap();
    send(&rl, tool_call("b")).await.unwrap();
    let metrics = rl.metrics();
    let usage = metrics.current_usage.read().await;
    assert_eq!(usage["tool:a"].used, 2);
    assert_eq!(usage["tool:a"].limit, 3);
    assert_eq!(usage["tool:b"].used, 1);
    drop(usage);
    let snap = rl.snapshot();
    assert_eq!(snap.scope, "tool");
    assert_eq!(snap.registry.keys, 2);
    let a = snap
        .keys
        .iter()
        .find(|k| k.key.as_str() == "tool:a")
        .unwrap();
    assert_eq!((a.allowed, a.rejected), (2, 0));
    let quiet = RateLimitMiddleware::builder()
        .metrics_config(MetricsConfig::default().enabled(false))
        .build()
        .unwrap();
    send(&quiet, request("ping", None)).await.unwrap();
    assert_eq!(quiet.snapshot().total_requests, 0);
}

#[tokio::test]
async fn handles_share_state() {
    let rl = RateLimitMiddleware::builder()
        .scope(Scope::PerServer)
        .strategy(bucket(1, 1))
        .clock(Arc::new(ManualClock::new()))
        .build()
        .unwrap();
    let a = rl.for_server("http://a/mcp");
    let a_again = rl.for_server("http://a/mcp");
    let b = rl.for_server("http://b/mcp");
    send(&a, request("ping", None)).await.unwrap();
    assert!(send(&a_again, request("ping", None)).await.is_err());
    send(&b, request("ping", None)).await.unwrap();
}

/// A user's limiter: admits `budget` requests per key, never refills.
#[derive(Debug, Default)]
struct Quota {
    used: Mutex<std::collections::HashMap<String, u32>>,
}

#[async_trait::async_trait]
impl pmcp_resilience::RateLimiter for Quota {
    async fn check(
        &self,
        key: &pmcp_resilience::ScopeKey,
        cost: u32,
        now: pmcp_resilience::Timestamp,
    ) -> Result<pmcp_resilience::rate_limit::Decision, pmcp_resilience::StoreError> {
        let mut used = self.used.lock();
        let slot = used.entry(key.as_str().to_string()).or_default();
        let allowed = *slot + cost <= 2;
        if allowed {
            *slot += cost;
        }
        Ok(pmcp_resilience::rate_limit::Decision {
            allowed,
            remaining: 2 - *slot,
            limit: 2,
            reset_at: now,
            retry_after: if allowed { Some(Duration::ZERO) } else { None },
            wait: Duration::ZERO,
        })
    }
}

#[tokio::test]
async fn a_users_own_limiter_plugs_in() {
    let quota = Arc::new(Quota::default());
    let rl = RateLimitMiddleware::builder()
        .scope(Scope::PerTool)
        .limiter(quota.clone())
        .build()
        .unwrap();
    send(&rl, tool_call("a")).await.unwrap();
    send(&rl, tool_call("a")).await.unwrap();
    assert!(matches!(
        send(&rl, tool_call("a")).await,
        Err(pmcp::Error::RateLimited)
    ));
    send(&rl, tool_call("b")).await.unwrap();
    assert_eq!(quota.used.lock()["tool:a"], 2);
    assert_eq!(rl.snapshot().rejected_requests, 1);
}

#[tokio::test]
async fn per_session_budgets_are_independent() {
    let rl = RateLimitMiddleware::builder()
        .scope(Scope::PerSession)
        .strategy(bucket(2, 1))
        .clock(Arc::new(ManualClock::new()))
        .build()
        .unwrap();
    let alice = rl.with_target(pmcp_resilience::RequestTarget::default().with_session_id("alice"));
    let bob = rl.with_target(pmcp_resilience::RequestTarget::default().with_session_id("bob"));
    for _ in 0..2 {
        send(&alice, request("ping", None)).await.unwrap();
    }
    assert!(send(&alice, request("ping", None)).await.is_err());
    for _ in 0..2 {
        send(&bob, request("ping", None)).await.unwrap();
    }
    assert!(rl.retry_after("session:alice").is_some());
    assert_eq!(rl.snapshot().registry.keys, 2);
}

#[tokio::test]
async fn keys_longer_than_one_part_are_found_again() {
    // A tool name near the per-part bound makes a key longer than the bound
    // as a whole ("tool:" + 199 bytes); it must keep one state.
    let rl = RateLimitMiddleware::builder()
        .scope(pmcp_resilience::RateLimitScope::PerTool)
        .strategy(RateLimitStrategy::FixedWindow {
            max_requests: 1,
            window: Duration::from_secs(60),
        })
        .build()
        .expect("valid limiter");
    let long = "t".repeat(199);
    assert!(send(&rl, tool_call(&long)).await.is_ok());
    assert!(
        send(&rl, tool_call(&long)).await.is_err(),
        "the second call must find the first call's state"
    );
    assert_eq!(rl.snapshot().registry.keys, 1);
}
