//! Issue 5 end to end: a real pmcp client and server on loopback drive a
//! breaker and two limiters through a scripted sequence; the unified metrics
//! are then scraped over real HTTP and checked name by name.
//!
//! The breaker and the rejecting limiter run on a `ManualClock` that never
//! moves, so nothing recovers while the test looks; the waiting limiter uses
//! real time with a 100 ms refill, so its waits are real but short.

mod support;

use std::sync::Arc;
use std::time::Duration;

use pmcp::shared::AdvancedMiddleware;
use pmcp_resilience::circuit_breaker::{CircuitBreakerMiddleware, CircuitState};
use pmcp_resilience::observe::{MetricsExporter, MetricsMiddleware, NamedSource};
use pmcp_resilience::rate_limit::{BackpressureConfig, RateLimitMiddleware, RateLimitStrategy};
use pmcp_resilience::{ManualClock, Scope};
use serde_json::{Value, json};
use support::scrape::{Sample, find, get, parse, value};
use support::*;

fn build<T, E: std::fmt::Display>(what: &str, r: Result<T, E>) -> T {
    match r {
        Ok(v) => v,
        Err(e) => panic!("{what} rejected its settings: {e}"),
    }
}

fn tools_call_errors(s: &[Sample], code: &str) -> f64 {
    value(
        s,
        "mcp_request_errors_total",
        &[("method", "tools/call"), ("code", code)],
    )
}

#[tokio::test]
async fn scripted_breaker_and_limiters_show_up_in_the_scraped_metrics() {
    let server = start_server("metrics").await;
    let clock = ManualClock::new();

    // One breaker per tool: two failures open it for 30 s (of a clock that never moves).
    let breaker = build(
        "breaker",
        CircuitBreakerMiddleware::builder()
            .scope(Scope::PerTool)
            .failure_threshold(2)
            .timeout(Duration::from_secs(30))
            .clock(Arc::new(clock.clone()))
            .build(),
    );
    // Three `echo` calls per minute and tool; everything else is free.
    let echo_quota = build(
        "echo quota",
        RateLimitMiddleware::builder()
            .scope(Scope::PerTool)
            .strategy(RateLimitStrategy::FixedWindow {
                max_requests: 3,
                window: Duration::from_secs(60),
            })
            .cost_for_tool("echo", 1)
            .cost_fn(Arc::new(|_| 0))
            .clock(Arc::new(clock.clone()))
            .build(),
    );
    // `slow` calls share one token refilled every 100 ms, and wait for it.
    let slow_waiter = build(
        "slow waiter",
        RateLimitMiddleware::builder()
            .scope(Scope::PerMethod)
            .strategy(RateLimitStrategy::TokenBucket {
                capacity: 1,
                refill_rate: 10,
            })
            .cost_for_tool("slow", 1)
            .cost_fn(Arc::new(|_| 0))
            .backpressure(BackpressureConfig::wait_up_to(Duration::from_secs(1)))
            .build(),
    );
    let metrics = build(
        "metrics",
        MetricsMiddleware::builder()
            .exporter(MetricsExporter::Prometheus {
                endpoint: "/metrics".into(),
            })
            .include_circuit_breaker_stats(true)
            .include_rate_limit_stats(true)
            .source(Arc::new(NamedSource::new("upstream", breaker.clone())))
            .source(Arc::new(NamedSource::new("echo-quota", echo_quota.clone())))
            .source(Arc::new(NamedSource::new(
                "slow-waiter",
                slow_waiter.clone(),
            )))
            .build(),
    );
    let middlewares: Vec<Arc<dyn AdvancedMiddleware>> = vec![
        Arc::new(breaker.clone()),
        Arc::new(echo_quota.clone()),
        Arc::new(slow_waiter.clone()),
        Arc::new(metrics.clone()),
    ];
    let mut client = client(transport(&server.url), middlewares);
    initialize(&mut client).await;

    // 1. The flaky tool fails twice: the breaker of `tool:flaky` opens.
    server.break_flaky();
    for i in 0..2 {
        let r = call(&client, "flaky", json!({})).await;
        assert!(
            matches!(r, Err(pmcp::Error::Protocol { code, .. }) if code.0 == -32603),
            "failure {i}: the server's internal error expected, got {r:?}"
        );
    }
    assert_eq!(breaker.state_of("tool:flaky"), Some(CircuitState::Open));
    // 2. While open, calls are rejected locally.
    for i in 0..2 {
        let r = call(&client, "flaky", json!({})).await;
        assert!(
            matches!(r, Err(pmcp::Error::CircuitBreakerOpen)),
            "rejection {i}: expected the open breaker, got {r:?}"
        );
    }
    assert_eq!(server.behaviour.calls("flaky"), 2);
    // 3. The echo quota admits three and rejects the fourth.
    for i in 0..3 {
        let r = call(&client, "echo", json!({"message": i})).await;
        assert!(r.is_ok(), "echo {i} within the quota failed: {r:?}");
    }
    let r = call(&client, "echo", json!({"message": 3})).await;
    assert!(
        matches!(r, Err(pmcp::Error::RateLimited)),
        "the fourth echo should be rate limited, got {r:?}"
    );
    assert_eq!(server.behaviour.calls("echo"), 3);
    // 4. A burst of three `slow` calls: one passes, the others wait their turn.
    let (a, b, c) = tokio::join!(
        call(&client, "slow", json!({"ms": 0})),
        call(&client, "slow", json!({"ms": 0})),
        call(&client, "slow", json!({"ms": 0})),
    );
    for (i, r) in [a, b, c].into_iter().enumerate() {
        assert!(
            r.is_ok(),
            "slow call {i} should have waited, not failed: {r:?}"
        );
    }
    assert_eq!(server.behaviour.calls("slow"), 3);

    let endpoint = build(
        "metrics server",
        metrics.serve(build("addr", "127.0.0.1:0".parse())).await,
    );
    let addr = endpoint.local_addr();
    let (status, content_type, body) = get(addr, "/metrics").await;
    assert_eq!(status, 200);
    assert!(content_type.starts_with("text/plain"), "{content_type}");
    let s = parse(&body);

    // The breaker, per key.
    let flaky = [
        ("name", "upstream"),
        ("scope", "tool"),
        ("key", "tool:flaky"),
    ];
    assert_eq!(value(&s, "mcp_circuit_breaker_state", &flaky), 1.0);
    assert_eq!(value(&s, "mcp_circuit_breaker_failures_total", &flaky), 2.0);
    assert_eq!(
        value(&s, "mcp_circuit_breaker_transitions_total", &flaky),
        1.0
    );
    assert_eq!(
        value(&s, "mcp_circuit_breaker_requests_rejected_total", &flaky),
        2.0
    );
    assert_eq!(
        value(&s, "mcp_circuit_breaker_successes_total", &flaky),
        0.0
    );
    let one_hot = |state| {
        value(
            &s,
            "mcp_circuit_breaker_state_info",
            &[
                ("name", "upstream"),
                ("scope", "tool"),
                ("key", "tool:flaky"),
                ("state", state),
            ],
        )
    };
    assert_eq!(
        (one_hot("closed"), one_hot("open"), one_hot("half_open")),
        (0.0, 1.0, 0.0)
    );
    let echo_breaker = [
        ("name", "upstream"),
        ("scope", "tool"),
        ("key", "tool:echo"),
    ];
    assert_eq!(value(&s, "mcp_circuit_breaker_state", &echo_breaker), 0.0);
    assert_eq!(
        value(&s, "mcp_circuit_breaker_successes_total", &echo_breaker),
        3.0
    );
    assert_eq!(
        value(
            &s,
            "mcp_circuit_breaker_keys",
            &[("name", "upstream"), ("scope", "tool"), ("state", "open")]
        ),
        1.0
    );

    // The echo quota, per key: 3 of 3 used.
    let echo = [
        ("name", "echo-quota"),
        ("scope", "tool"),
        ("key", "tool:echo"),
    ];
    assert_eq!(
        value(&s, "mcp_rate_limit_requests_allowed_total", &echo),
        3.0
    );
    assert_eq!(
        value(&s, "mcp_rate_limit_requests_rejected_total", &echo),
        1.0
    );
    assert_eq!(value(&s, "mcp_rate_limit_current_usage", &echo), 1.0);

    // The waiting limiter: waits are counted and timed.
    let waiter = [("name", "slow-waiter"), ("scope", "method")];
    let waits = value(&s, "mcp_rate_limit_waits_total", &waiter);
    assert!((1.0..=2.0).contains(&waits), "waits: {waits}");
    assert_eq!(
        value(&s, "mcp_rate_limit_wait_seconds_count", &waiter),
        waits
    );
    let waited_for = value(&s, "mcp_rate_limit_wait_seconds_sum", &waiter);
    // Each wait is bounded by `max_wait` (1 s); a loaded machine may make a
    // wait longer than the 100 ms refill, never longer than that.
    assert!(
        waited_for > 0.0 && waited_for <= 1.0 * waits + 1e-9,
        "sum of waits {waited_for} s for {waits} waits (each at most max_wait, 1 s)"
    );
    assert_eq!(
        value(
            &s,
            "mcp_rate_limit_wait_seconds_bucket",
            &[("name", "slow-waiter"), ("scope", "method"), ("le", "+Inf")]
        ),
        waits
    );
    // Chain order is priority, then insertion: breaker, echo quota, waiter.
    // The quota saw initialize, 2 failing flaky calls, 4 echoes and 3 slow
    // calls (not the 2 the breaker rejected); the waiter all but the
    // rejected echo.
    assert_eq!(
        value(
            &s,
            "mcp_rate_limit_requests_total",
            &[("name", "echo-quota"), ("scope", "tool")]
        ),
        10.0
    );
    assert_eq!(value(&s, "mcp_rate_limit_requests_total", &waiter), 9.0);

    // Requests counted on the client side, rejected ones under their method.
    assert_eq!(
        value(&s, "mcp_requests_total", &[("method", "tools/call")]),
        11.0
    );
    assert_eq!(
        value(&s, "mcp_requests_total", &[("method", "initialize")]),
        1.0
    );
    assert_eq!(tools_call_errors(&s, "-32603"), 2.0);
    assert_eq!(tools_call_errors(&s, "-32006"), 2.0);
    assert_eq!(tools_call_errors(&s, "-32005"), 1.0);
    assert_eq!(
        value(
            &s,
            "mcp_request_duration_seconds_count",
            &[("method", "tools/call")]
        ),
        8.0,
        "2 failures, 3 echoes and 3 slow calls were answered"
    );
    assert_eq!(
        find(&s, "mcp_requests_total", &[("method", "unknown")]),
        None,
        "no rejection may lose its method"
    );
    assert_eq!(metrics.get_request_count("tools/call"), 11);

    // The aggregated JSON snapshot, over HTTP too.
    let (status, content_type, body) = get(addr, "/metrics.json").await;
    assert_eq!(status, 200);
    assert_eq!(content_type, "application/json");
    let json: Value = match serde_json::from_str(&body) {
        Ok(v) => v,
        Err(e) => panic!("/metrics.json is not JSON: {e}: {body}"),
    };
    let breakers = &json["totals"]["circuit_breakers"];
    assert_eq!(breakers["keys_open"], 1);
    assert_eq!(breakers["failed"], 2);
    assert_eq!(breakers["rejected"], 2);
    let by_name = |name: &str| -> Value {
        json["rate_limits"]
            .as_array()
            .and_then(|all| all.iter().find(|l| l["name"] == name).cloned())
            .unwrap_or_else(|| panic!("no limiter {name} in {json}"))
    };
    assert_eq!(by_name("echo-quota")["rejected"], 1);
    assert_eq!(by_name("echo-quota")["scope"], "tool");
    assert_eq!(by_name("slow-waiter")["waited"].as_f64(), Some(waits));
    assert_eq!(json["totals"]["rate_limits"]["rejected"], 1);
    assert_eq!(json["circuit_breakers"][0]["name"], "upstream");

    if let Err(e) = endpoint.shutdown().await {
        panic!("metrics server did not shut down cleanly: {e}");
    }
}
