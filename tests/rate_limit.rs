//! The rate-limit middleware and the keyed limiter, without a network.

use std::sync::Arc;
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
    assert_eq!(m.total_requests, 5);
    assert_eq!(m.allowed_requests, 5);
    assert_eq!(m.waited_requests, 4);
    assert_eq!(m.wait_time, ms(100 + 200 + 300 + 400));
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
        "a newcomer would wait behind the waiter"
    );
    waiter.abort();
    assert!(waiter.await.unwrap_err().is_cancelled());
    assert_eq!(rl.waiting(), 0);
    assert_eq!(
        rl.retry_after("global"),
        Some(ms(100)),
        "the place came back"
    );
    let start = tokio::time::Instant::now();
    send(&rl, request("ping", None)).await.unwrap();
    assert_eq!(start.elapsed(), ms(100));
    assert_eq!(rl.metrics().waited_requests, 1);
}

/// A request whose `params.cost` says what it costs.
fn costed(cost: u32) -> JSONRPCRequest {
    request("ping", Some(json!({ "cost": cost })))
}

fn by_params() -> pmcp_resilience::rate_limit::CostFn {
    Arc::new(|r: &JSONRPCRequest| {
        r.params
            .as_ref()
            .and_then(|p| p["cost"].as_u64())
            .map_or(1, |c| c as u32)
    })
}

/// One waiter: when it arrives (after the start), what it costs, and when
/// it gives up (after the start), if it does.
#[derive(Clone, Copy, Debug)]
struct Waiter {
    arrives: Duration,
    cost: u32,
    gives_up: Option<Duration>,
}

/// What happened to one waiter: served after this long from the start, or
/// `None` if it gave up first.
type Served = Vec<(usize, Option<Duration>)>;

/// Runs `waiters` against `rl` (all keyed alike) from now, in virtual time;
/// returns them in the order they were served, then those who gave up.
async fn run_line(rl: &RateLimitMiddleware, waiters: &[Waiter]) -> Served {
    let start = tokio::time::Instant::now();
    let served = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for (i, w) in waiters.iter().copied().enumerate() {
        let (rl, served) = (rl.clone(), Arc::clone(&served));
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until(start + w.arrives).await;
            let call = send(&rl, costed(w.cost));
            let outcome = match w.gives_up {
                Some(at) => tokio::time::timeout_at(start + at, call).await.ok(),
                None => Some(call.await),
            };
            match outcome {
                Some(result) => {
                    result.unwrap();
                    served.lock().push((i, Some(start.elapsed())));
                }
                None => served.lock().push((i, None)),
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let mut served = served.lock().clone();
    // Those who gave up last, keeping the service order of the others.
    served.sort_by_key(|(_, at)| at.is_none());
    served
}

fn waiting_with_costs(capacity: u32, refill_rate: u32) -> RateLimitMiddleware {
    waiting_bucket(capacity, refill_rate, Duration::from_secs(3600))
        .cost_fn(by_params())
        .max_waiters(10_000)
        .build()
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn waiters_who_give_up_hand_their_places_to_those_behind() {
    // The case: a bucket of 1 refilled at 20/s, 10 waiters, the
    // first 5 give up after 30 ms. The other 5 are served every 50 ms from
    // the start, as if the first 5 had never come (it was 300 to 500 ms).
    let rl = waiting_bucket(1, 20, Duration::from_secs(1))
        .build()
        .unwrap();
    send(&rl, request("ping", None)).await.unwrap();
    let waiters: Vec<Waiter> = (0..10)
        .map(|i| Waiter {
            arrives: Duration::from_micros(i),
            cost: 1,
            gives_up: (i < 5).then_some(ms(30)),
        })
        .collect();
    let served = run_line(&rl, &waiters).await;
    let times: Vec<_> = served
        .iter()
        .filter_map(|&(i, at)| Some((i, at?)))
        .collect();
    assert_eq!(
        times,
        vec![
            (5, ms(50)),
            (6, ms(100)),
            (7, ms(150)),
            (8, ms(200)),
            (9, ms(250))
        ]
    );
    assert_eq!(rl.waiting(), 0);
    assert_eq!(rl.metrics().allowed_requests, 6);
}

#[tokio::test(start_paused = true)]
async fn a_waiter_who_gives_up_at_the_head_in_the_middle_or_at_the_tail_is_not_waited_for() {
    for (gone, where_) in [(0, "head"), (2, "middle"), (4, "tail")] {
        let rl = waiting_with_costs(1, 10);
        send(&rl, costed(1)).await.unwrap();
        // Five waiters, served every 100 ms; one gives up at 150 ms (the
        // head is then the first still waiting, due at 200 ms).
        let waiters: Vec<Waiter> = (0..5)
            .map(|i| Waiter {
                arrives: Duration::from_micros(i as u64),
                cost: 1,
                gives_up: (i == gone.max(1)).then_some(ms(150)),
            })
            .collect();
        let served = run_line(&rl, &waiters).await;
        let expected: Served = (0..5)
            .filter(|&i| i != gone.max(1))
            .zip([100, 200, 300, 400])
            .map(|(i, t)| (i, Some(ms(t))))
            .chain([(gone.max(1), None)])
            .collect();
        assert_eq!(served, expected, "the one who gave up was at the {where_}");
        assert_eq!(rl.waiting(), 0, "{where_}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_heavy_waiter_is_not_starved_and_frees_its_whole_cost_when_it_gives_up() {
    // A bucket of 4 at 10/s, emptied at the start.
    let rl = waiting_with_costs(4, 10);
    send(&rl, costed(4)).await.unwrap();
    // A heavy request, then light ones every 50 ms: the heavy one is served
    // when its 4 units are back (400 ms), the light ones after it.
    let mut waiters = vec![Waiter {
        arrives: Duration::ZERO,
        cost: 4,
        gives_up: None,
    }];
    waiters.extend((1..=4).map(|i| Waiter {
        arrives: ms(50 * i),
        cost: 1,
        gives_up: None,
    }));
    let served = run_line(&rl, &waiters).await;
    let expected: Served = [(0, 400), (1, 500), (2, 600), (3, 700), (4, 800)]
        .map(|(i, t)| (i, Some(ms(t))))
        .to_vec();
    assert_eq!(served, expected);

    // The same heavy request gives up at 250 ms: the light one behind it
    // gets a unit at once, the next ones as units come back.
    let rl = waiting_with_costs(4, 10);
    send(&rl, costed(4)).await.unwrap();
    waiters[0].gives_up = Some(ms(250));
    let served = run_line(&rl, &waiters).await;
    let expected: Served = [
        (1, Some(250)),
        (2, Some(250)),
        (3, Some(300)),
        (4, Some(400)),
        (0, None),
    ]
    .map(|(i, t)| (i, t.map(ms)))
    .to_vec();
    assert_eq!(served, expected);
}

#[tokio::test(start_paused = true)]
async fn a_request_leaving_the_leaky_buckets_queue_moves_the_others_up() {
    // 4 requests at once into a leaky bucket letting one out every 100 ms:
    // they would pass at 0, 100, 200 and 300 ms; the second gives up at
    // 50 ms, so the last two pass at 100 and 200 ms.
    let rl = RateLimitMiddleware::builder()
        .strategy(RateLimitStrategy::LeakyBucket {
            capacity: 4,
            leak_rate: 10,
        })
        .cost_fn(by_params())
        .clock(Arc::new(TokioClock::new()))
        .build()
        .unwrap();
    let waiters: Vec<Waiter> = (0..4)
        .map(|i| Waiter {
            arrives: Duration::from_micros(i),
            cost: 1,
            gives_up: (i == 1).then_some(ms(50)),
        })
        .collect();
    let served = run_line(&rl, &waiters).await;
    let expected: Served = [(0, Some(0)), (2, Some(100)), (3, Some(200)), (1, None)]
        .map(|(i, t)| (i, t.map(ms)))
        .to_vec();
    assert_eq!(served, expected);
}

#[tokio::test(start_paused = true)]
async fn a_line_moves_on_a_clock_that_does_not() {
    // A manual clock that nobody advances, while Tokio's time runs: each
    // head is admitted at the instant its units were due, so the line still
    // moves, one every 100 ms of Tokio's time.
    let rl = waiting_bucket(1, 10, Duration::from_secs(1))
        .clock(Arc::new(ManualClock::new()))
        .build()
        .unwrap();
    let waiters: Vec<Waiter> = (0..4)
        .map(|i| Waiter {
            arrives: Duration::from_micros(i),
            cost: 1,
            gives_up: None,
        })
        .collect();
    let served = run_line(&rl, &waiters).await;
    // Tokio's timer rounds each sleep up to the next millisecond.
    for (n, &(i, at)) in served.iter().enumerate() {
        let at = at.unwrap_or(Duration::MAX);
        assert_eq!(i, n, "{served:?}");
        assert!(
            at >= ms(100 * n as u64) && at <= ms(100 * n as u64 + 2),
            "{served:?}"
        );
    }
}

/// The most units a token bucket of `capacity` refilled every `interval`
/// may admit in a span of `span`.
fn bucket_bound(capacity: u32, interval: Duration, span: Duration) -> u64 {
    u64::from(capacity) + (span.as_nanos() / interval.as_nanos()) as u64
}

#[tokio::test(start_paused = true)]
async fn a_hundred_waiters_of_mixed_cost_some_giving_up_are_served_in_order_at_the_rate() {
    let (capacity, refill_rate) = (5, 20);
    let interval = ms(1000 / refill_rate as u64);
    for seed in 0..8 {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut arrives = Duration::ZERO;
        let waiters: Vec<Waiter> = (0..100)
            .map(|_| {
                arrives += Duration::from_millis(rng.u64(0..40)) + Duration::from_micros(1);
                let cost = rng.u32(1..=capacity);
                let gives_up = rng
                    .bool()
                    .then(|| arrives + Duration::from_millis(rng.u64(1..3000)));
                Waiter {
                    arrives,
                    cost,
                    gives_up,
                }
            })
            .collect();
        let rl = waiting_with_costs(capacity, refill_rate);
        let served = run_line(&rl, &waiters).await;
        let admitted: Vec<(usize, Duration)> = served
            .iter()
            .filter_map(|&(i, at)| Some((i, at?)))
            .collect();
        let gave_up: Vec<usize> = served
            .iter()
            .filter_map(|&(i, at)| at.is_none().then_some(i))
            .collect();
        assert!(!gave_up.is_empty() && admitted.len() > 20, "seed {seed}");
        assert_eq!(rl.waiting(), 0);

        // Served in order of arrival.
        assert!(
            admitted.windows(2).all(|w| w[0].0 < w[1].0),
            "seed {seed}: {admitted:?}"
        );
        // At the rate: in any span, no more than the bucket allows.
        for (a, &(_, from)) in admitted.iter().enumerate() {
            let mut units = 0;
            for &(i, to) in &admitted[a..] {
                units += u64::from(waiters[i].cost);
                assert!(
                    units <= bucket_bound(capacity, interval, to - from),
                    "seed {seed}: {units} units in {:?}",
                    to - from
                );
            }
        }
        // Those who gave up cost the others nothing: all the others are
        // served no later than if those had never come.
        let stayed: Vec<Waiter> = waiters
            .iter()
            .enumerate()
            .filter(|(i, _)| !gave_up.contains(i))
            .map(|(_, w)| *w)
            .collect();
        let alone = run_line(&waiting_with_costs(capacity, refill_rate), &stayed).await;
        let last = |s: &Served| s.iter().filter_map(|&(_, at)| at).max();
        assert!(
            last(&served) <= last(&alone),
            "seed {seed}: all served by {:?}, alone by {:?}",
            last(&served),
            last(&alone)
        );
        let waited = |s: &[(usize, Option<Duration>)], ws: &[Waiter]| -> Duration {
            s.iter()
                .filter_map(|&(i, at)| Some(at? - ws[i].arrives))
                .sum()
        };
        eprintln!(
            "seed {seed}: {} served, {} gave up; total wait {:?}, alone {:?}",
            admitted.len(),
            gave_up.len(),
            waited(&served, &waiters),
            waited(&alone, &stayed)
        );
    }
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
    let usage: Vec<(&str, u32, u32)> = metrics
        .keys
        .iter()
        .map(|k| (k.key.as_str(), k.used, k.limit))
        .collect();
    assert_eq!(usage, [("tool:a", 2, 3), ("tool:b", 1, 3)]);
    let snap = rl.metrics();
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
    assert_eq!(quiet.metrics().total_requests, 0);
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
    assert_eq!(rl.metrics().rejected_requests, 1);
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
    assert_eq!(rl.metrics().registry.keys, 2);
}

#[tokio::test]
async fn keys_longer_than_one_part_are_found_again() {
    // A tool name near the per-part bound makes a key longer than the bound
    // as a whole ("tool:" + 199 bytes); it must keep one state.
    let rl = RateLimitMiddleware::builder()
        .scope(pmcp_resilience::Scope::PerTool)
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
    assert_eq!(rl.metrics().registry.keys, 1);
}
