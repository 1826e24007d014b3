//! Issue 3 end to end: this crate's rate limiter in a real pmcp client,
//! against a real pmcp streamable-HTTP server on 127.0.0.1.
//!
//! Budgets that must not refill during a test run on a `ManualClock`; the
//! burst test uses real time with a 100 ms refill, so it takes about 0.4 s.

#[path = "support/logs.rs"]
mod logs;
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use logs::Lines;
use pmcp::shared::AdvancedMiddleware;
use pmcp_resilience::rate_limit::{BackpressureConfig, RateLimitMiddleware, RateLimitStrategy};
use pmcp_resilience::{ManualClock, RequestTarget, Scope};
use serde_json::json;
use support::*;

fn fixed_window(scope: Scope, max_requests: u32, clock: &ManualClock) -> RateLimitMiddleware {
    let built = RateLimitMiddleware::builder()
        .scope(scope)
        .strategy(RateLimitStrategy::FixedWindow {
            max_requests,
            window: Duration::from_secs(60),
        })
        // The handshake is not what these tests limit.
        .cost_for_method("initialize", 0)
        .clock(Arc::new(clock.clone()))
        .build();
    match built {
        Ok(rl) => rl,
        Err(e) => panic!("limiter rejected its settings: {e}"),
    }
}

fn only(rl: RateLimitMiddleware) -> Vec<Arc<dyn AdvancedMiddleware>> {
    vec![Arc::new(rl)]
}

fn is_rate_limited<T: std::fmt::Debug>(r: &pmcp::Result<T>) -> bool {
    matches!(r, Err(pmcp::Error::RateLimited))
}

#[tokio::test]
async fn per_session_budgets_are_independent() {
    let server = start_server("sessions").await;
    let clock = ManualClock::new();
    let rl = fixed_window(Scope::PerSession, 2, &clock);

    // Each client's limiter handle reads its own transport's session id;
    // clones of a transport share its state, so the id set by initialize shows.
    let mut clients = Vec::new();
    let mut transports = Vec::new();
    for _ in 0..2 {
        let t = transport(&server.url);
        let seen = t.clone();
        let handle =
            rl.with_target(RequestTarget::default().with_session_source(move || seen.session_id()));
        let mut c = client(t.clone(), only(handle));
        initialize(&mut c).await;
        clients.push(c);
        transports.push(t);
    }
    let ids: Vec<String> = transports
        .iter()
        .map(|t| match t.session_id() {
            Some(id) => id,
            None => panic!("the pmcp server gave no session id"),
        })
        .collect();
    assert_ne!(ids[0], ids[1], "two clients, two sessions");

    // The first session spends its budget of 2 and is refused.
    for i in 0..2 {
        let r = call(&clients[0], "echo", json!({"message": i})).await;
        assert!(r.is_ok(), "session 1 call {i} within budget failed: {r:?}");
    }
    assert!(is_rate_limited(
        &call(&clients[0], "echo", json!({"message": "over"})).await
    ));
    // The second session still has its whole budget.
    for i in 0..2 {
        let r = call(&clients[1], "echo", json!({"message": i})).await;
        assert!(
            r.is_ok(),
            "session 2 call {i} was charged to session 1: {r:?}"
        );
    }
    assert!(is_rate_limited(
        &call(&clients[1], "echo", json!({"message": "over"})).await
    ));
    assert_eq!(server.behaviour.calls("echo"), 4);

    // The limiter holds one key per session, each full.
    let snapshot = rl.metrics();
    for id in &ids {
        let key = format!("session:{id}");
        let Some(row) = snapshot.keys.iter().find(|k| k.key.as_str() == key) else {
            panic!("no key {key} in {:?}", snapshot.keys);
        };
        assert_eq!(
            (row.used, row.limit, row.allowed, row.rejected),
            (2, 2, 2, 1)
        );
    }
    assert_eq!(snapshot.rejected_requests, 2);
    assert!(rl.retry_after(&format!("session:{}", ids[0])).is_some());
}

#[tokio::test]
async fn per_method_limits_apply_to_their_method_only() {
    let server = start_server("methods").await;
    let clock = ManualClock::new();
    let rl = fixed_window(Scope::PerMethod, 3, &clock);
    let mut c = client(transport(&server.url), only(rl.clone()));
    initialize(&mut c).await;

    for i in 0..3 {
        let r = call(&c, "echo", json!({"message": i})).await;
        assert!(r.is_ok(), "tools/call {i} within its limit failed: {r:?}");
    }
    assert!(is_rate_limited(
        &call(&c, "echo", json!({"message": "over"})).await
    ));
    // tools/list has a budget of its own, untouched by tools/call.
    for i in 0..3 {
        match c.list_tools(None).await {
            Ok(list) => assert_eq!(list.tools.len(), 5, "list {i}"),
            Err(e) => panic!("tools/list {i} was charged to tools/call: {e:?}"),
        }
    }
    assert!(is_rate_limited(&c.list_tools(None).await));
    // And tools/call is still refused: spending tools/list gave it nothing back.
    assert!(is_rate_limited(
        &call(&c, "echo", json!({"message": "still over"})).await
    ));
    assert_eq!(server.behaviour.calls("echo"), 3);

    // A new window restores both.
    clock.advance(Duration::from_secs(60));
    assert!(call(&c, "echo", json!({"message": "again"})).await.is_ok());
    assert!(c.list_tools(None).await.is_ok());
    let snapshot = rl.metrics();
    let row = |key: &str| match snapshot.keys.iter().find(|k| k.key.as_str() == key) {
        Some(row) => (row.allowed, row.rejected),
        None => panic!("no key {key} in {:?}", snapshot.keys),
    };
    assert_eq!(row("method:tools/call"), (4, 2));
    assert_eq!(row("method:tools/list"), (4, 1));
}

#[tokio::test]
async fn waiting_smooths_a_burst() {
    const BURST: usize = 5;
    const INTERVAL: Duration = Duration::from_millis(100);
    let server = start_server("burst").await;
    let built = RateLimitMiddleware::builder()
        .scope(Scope::PerMethod)
        .strategy(RateLimitStrategy::LeakyBucket {
            capacity: BURST as u32,
            leak_rate: 10,
        })
        .backpressure(BackpressureConfig {
            wait_for_capacity: true,
            max_wait: Duration::from_secs(1),
            ..BackpressureConfig::default()
        })
        .build();
    let rl = match built {
        Ok(rl) => rl,
        Err(e) => panic!("limiter rejected its settings: {e}"),
    };
    let mut c = client(transport(&server.url), only(rl.clone()));
    initialize(&mut c).await;

    let started = Instant::now();
    let echo = |i: usize| call(&c, "echo", json!({ "message": i }));
    let (r0, r1, r2, r3, r4) = tokio::join!(echo(0), echo(1), echo(2), echo(3), echo(4));
    let results = [r0, r1, r2, r3, r4];
    let elapsed = started.elapsed();
    for (i, r) in results.iter().enumerate() {
        assert!(
            r.is_ok(),
            "burst call {i} should have waited, not failed: {r:?}"
        );
    }

    // The tool saw the calls spread out by the leak interval, not at once.
    let times = server.behaviour.call_times("echo");
    assert_eq!(times.len(), BURST);
    let span = times[BURST - 1].duration_since(times[0]);
    let least = INTERVAL * (BURST as u32 - 1) * 3 / 4;
    assert!(
        span >= least,
        "{BURST} calls reached the tool within {span:?}; a leak of one per {INTERVAL:?} spreads them over about {:?}",
        INTERVAL * (BURST as u32 - 1)
    );
    // A hang guard only; the spread above is what shows the smoothing.
    assert!(elapsed < Duration::from_secs(5), "burst took {elapsed:?}");
    let snapshot = rl.metrics();
    assert_eq!(snapshot.rejected_requests, 0);
    assert!(
        snapshot.waited_requests >= BURST as u64 - 1,
        "waited: {}",
        snapshot.waited_requests
    );
    assert_eq!(
        snapshot.wait_histogram.count, snapshot.waited_requests,
        "every wait is in the histogram"
    );
}

#[tokio::test]
async fn signal_client_tells_the_pmcp_caller_when_to_retry() {
    let server = start_server("signal").await;
    let built = RateLimitMiddleware::builder()
        .scope(Scope::PerTool)
        .strategy(RateLimitStrategy::TokenBucket {
            capacity: 1,
            refill_rate: 1,
        })
        .backpressure(BackpressureConfig::reject().with_client_signal())
        .build();
    let rl = match built {
        Ok(rl) => rl,
        Err(e) => panic!("limiter rejected its settings: {e}"),
    };
    let mut c = client(transport(&server.url), only(rl));
    initialize(&mut c).await;

    assert!(call(&c, "echo", json!({"message": 1})).await.is_ok());
    match call(&c, "echo", json!({"message": 2})).await {
        Err(pmcp::Error::Protocol {
            code,
            message,
            data: Some(data),
        }) => {
            assert_eq!(code, pmcp::ErrorCode::RATE_LIMITED);
            let Some(retry_ms) = data["retryAfterMs"].as_u64() else {
                panic!("retryAfterMs is not a number: {data}");
            };
            assert!(
                retry_ms > 0 && retry_ms <= 1_000,
                "one token per second: retry within 1 s, got {retry_ms} ms"
            );
            assert_eq!(data["key"], "tool:echo");
            assert_eq!(data["scope"], "tool");
            assert_eq!(data["limit"], 1);
            assert_eq!(data["remaining"], 0);
            assert!(message.contains("retry after"), "{message}");
        }
        other => panic!("expected a Protocol error with retryAfterMs, got {other:?}"),
    }
    assert_eq!(server.behaviour.calls("echo"), 1);
}

// One thread, so that the subscriber set for this test sees the server's
// lines and the client's alike.
#[tokio::test(flavor = "current_thread")]
async fn the_readme_pattern_starts_without_a_warning() {
    let lines = Lines::default();
    let _guard = lines.capture(tracing::Level::INFO);

    let server = start_server("readme").await;
    // The README's client: a breaker per tool, a token bucket per session
    // whose id is read from the transport once `initialize` has set it.
    let breaker = match pmcp_resilience::CircuitBreakerMiddleware::builder()
        .scope(Scope::PerTool)
        .failure_threshold(3)
        .timeout(Duration::from_secs(30))
        .build()
    {
        Ok(cb) => cb,
        Err(e) => panic!("breaker: {e}"),
    };
    let limiter = match RateLimitMiddleware::builder()
        .scope(Scope::PerSession)
        .strategy(RateLimitStrategy::TokenBucket {
            capacity: 20,
            refill_rate: 5,
        })
        .backpressure(BackpressureConfig::wait_up_to(Duration::from_millis(500)))
        .build()
    {
        Ok(rl) => rl,
        Err(e) => panic!("limiter: {e}"),
    };
    let t = transport(&server.url);
    let session = t.clone();
    let limiter = limiter
        .with_target(RequestTarget::default().with_session_source(move || session.session_id()));
    let mut c = client(
        breaker.wrap_transport(t.clone()),
        vec![Arc::new(breaker.clone()), Arc::new(limiter.clone())],
    );
    initialize(&mut c).await;
    let session_id = t.session_id().expect("the server assigned a session");
    call(&c, "echo", json!({"message": "hi"}))
        .await
        .expect("echo answers");
    assert_eq!(
        lines.containing("WARN"),
        Vec::<String>::new(),
        "no warning in the README's normal use"
    );
    // `initialize` counted under the fallback key, the call under its session.
    let keys: Vec<String> = limiter
        .metrics()
        .keys
        .iter()
        .map(|k| k.key.as_str().to_owned())
        .collect();
    assert!(keys.contains(&"session:no-session".to_owned()), "{keys:?}");
    assert!(keys.contains(&format!("session:{session_id}")), "{keys:?}");

    // A request other than `initialize` without a session still warns.
    let unbound = match RateLimitMiddleware::builder()
        .scope(Scope::PerSession)
        .build()
    {
        Ok(rl) => rl,
        Err(e) => panic!("limiter: {e}"),
    };
    let mut list = pmcp::types::JSONRPCRequest {
        jsonrpc: "2.0".into(),
        method: "tools/list".into(),
        params: None,
        id: pmcp::types::RequestId::from(7i64),
    };
    unbound
        .on_request_with_context(&mut list, &pmcp::shared::MiddlewareContext::default())
        .await
        .expect("admitted");
    let warnings = lines.containing("WARN");
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(warnings[0].contains("missing=SessionId"), "{warnings:?}");
}
