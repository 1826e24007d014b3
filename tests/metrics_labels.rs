//! Issue 17, "done means": two limiters on one key are two Prometheus
//! series told apart by the `name` label, each with its own count, and the
//! exported key of a `PerTool` limiter is the API's key text, `tool:echo`.
//!
//! A real pmcp client and server on loopback; the metrics are scraped over
//! real HTTP. Limiters run on a `ManualClock` that never moves, so no
//! window resets while the test looks.

mod support;

use std::sync::Arc;
use std::time::Duration;

use pmcp::shared::AdvancedMiddleware;
use pmcp_resilience::circuit_breaker::CircuitBreakerMiddleware;
use pmcp_resilience::observe::MetricsMiddleware;
use pmcp_resilience::rate_limit::{RateLimitMiddleware, RateLimitStrategy};
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

fn per_tool_limiter(
    name: Option<&str>,
    max_requests: u32,
    clock: &ManualClock,
) -> RateLimitMiddleware {
    let mut builder = RateLimitMiddleware::builder()
        .scope(Scope::PerTool)
        .strategy(RateLimitStrategy::FixedWindow {
            max_requests,
            window: Duration::from_secs(60),
        })
        // Only tool calls count, so the key under test is the only one used up.
        .cost_for_method("tools/call", 1)
        .cost_fn(Arc::new(|_| 0))
        .clock(Arc::new(clock.clone()));
    if let Some(name) = name {
        builder = builder.name(name);
    }
    build("limiter", builder.build())
}

fn echo_series(name: &'static str) -> [(&'static str, &'static str); 3] {
    [("name", name), ("scope", "tool"), ("key", "tool:echo")]
}

fn allowed(s: &[Sample], name: &'static str) -> f64 {
    value(
        s,
        "mcp_rate_limit_requests_allowed_total",
        &echo_series(name),
    )
}

fn rejected(s: &[Sample], name: &'static str) -> f64 {
    value(
        s,
        "mcp_rate_limit_requests_rejected_total",
        &echo_series(name),
    )
}

#[tokio::test]
async fn limiters_on_one_key_are_told_apart_by_their_name_label() {
    let server = start_server("labels").await;
    let clock = ManualClock::new();

    // In chain order: a breaker, a generous unnamed limiter, a strict named
    // one, and a second unnamed limiter that only sees what the strict one let through.
    let breaker = build(
        "breaker",
        CircuitBreakerMiddleware::builder()
            .name("upstream")
            .scope(Scope::PerTool)
            .clock(Arc::new(clock.clone()))
            .build(),
    );
    let generous = per_tool_limiter(None, 100, &clock);
    let strict = per_tool_limiter(Some("strict"), 2, &clock);
    let late = per_tool_limiter(None, 100, &clock);
    assert_eq!(generous.report_name(), "rate_limit");
    assert_eq!(strict.report_name(), "strict");
    assert_eq!(breaker.report_name(), "upstream");

    let metrics = build(
        "metrics",
        MetricsMiddleware::builder()
            .source(Arc::new(breaker.clone()))
            .source(Arc::new(generous.clone()))
            .source(Arc::new(strict.clone()))
            .build(),
    );
    // Registered after build: the default name is taken, so it becomes `rate_limit_2`.
    metrics.register(Arc::new(late.clone()));

    let middlewares: Vec<Arc<dyn AdvancedMiddleware>> = vec![
        Arc::new(breaker.clone()),
        Arc::new(generous.clone()),
        Arc::new(strict.clone()),
        Arc::new(late.clone()),
        Arc::new(metrics.clone()),
    ];
    let mut client = client(transport(&server.url), middlewares);
    initialize(&mut client).await;

    for i in 0..4 {
        let r = call(&client, "echo", json!({"message": i})).await;
        if i < 2 {
            assert!(r.is_ok(), "echo {i} within the strict quota failed: {r:?}");
        } else {
            assert!(
                matches!(r, Err(pmcp::Error::RateLimited)),
                "echo {i} beyond the strict quota should be rate limited, got {r:?}"
            );
        }
    }
    assert_eq!(server.behaviour.calls("echo"), 2);

    let endpoint = build(
        "metrics server",
        metrics.serve(build("addr", "127.0.0.1:0".parse())).await,
    );
    let addr = endpoint.local_addr();
    let (status, _, body) = get(addr, "/metrics").await;
    assert_eq!(status, 200);
    let s = parse(&body);

    // Three limiters on `tool:echo`: three series, each with its own count.
    assert_eq!(
        (allowed(&s, "rate_limit"), rejected(&s, "rate_limit")),
        (4.0, 0.0)
    );
    assert_eq!((allowed(&s, "strict"), rejected(&s, "strict")), (2.0, 2.0));
    assert_eq!(
        (allowed(&s, "rate_limit_2"), rejected(&s, "rate_limit_2")),
        (2.0, 0.0)
    );
    let echo_series_count = s
        .iter()
        .filter(|(n, l, _)| {
            n == "mcp_rate_limit_requests_allowed_total"
                && l.get("key").map(String::as_str) == Some("tool:echo")
        })
        .count();
    assert_eq!(echo_series_count, 3, "one series per limiter:\n{body}");
    // The key is the API's key text, never the bare tool name.
    assert_eq!(
        find(
            &s,
            "mcp_rate_limit_requests_allowed_total",
            &[("name", "strict"), ("scope", "tool"), ("key", "echo")]
        ),
        None
    );
    assert!(strict.retry_after("tool:echo").is_some());
    assert_eq!(
        strict.retry_after("echo"),
        None,
        "a key without its scope prefix"
    );

    // The breaker, under its own name and the same key text.
    let upstream = [
        ("name", "upstream"),
        ("scope", "tool"),
        ("key", "tool:echo"),
    ];
    assert_eq!(value(&s, "mcp_circuit_breaker_state", &upstream), 0.0);
    assert_eq!(
        value(&s, "mcp_circuit_breaker_successes_total", &upstream),
        2.0
    );

    // The JSON snapshot names them the same way.
    let (status, _, body) = get(addr, "/metrics.json").await;
    assert_eq!(status, 200);
    let json: Value = match serde_json::from_str(&body) {
        Ok(v) => v,
        Err(e) => panic!("/metrics.json is not JSON: {e}: {body}"),
    };
    let names: Vec<&str> = json["rate_limits"]
        .as_array()
        .map(|all| all.iter().filter_map(|l| l["name"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(names, ["rate_limit", "strict", "rate_limit_2"]);
    assert_eq!(json["circuit_breakers"][0]["name"], "upstream");

    if let Err(e) = endpoint.shutdown().await {
        panic!("metrics server did not shut down cleanly: {e}");
    }
}

#[test]
fn unnamed_sources_get_distinct_names_in_registration_order() {
    let clock = ManualClock::new();
    let metrics = build(
        "metrics",
        MetricsMiddleware::builder()
            .source(Arc::new(per_tool_limiter(None, 1, &clock)))
            .source(Arc::new(per_tool_limiter(None, 1, &clock)))
            .source(Arc::new(per_tool_limiter(Some("rate_limit_3"), 1, &clock)))
            .source(Arc::new(
                CircuitBreakerMiddleware::builder()
                    .build()
                    .expect("defaults"),
            ))
            .source(Arc::new(
                CircuitBreakerMiddleware::builder()
                    .build()
                    .expect("defaults"),
            ))
            .build(),
    );
    metrics.register(Arc::new(per_tool_limiter(None, 1, &clock)));
    let json = metrics.snapshot_json();
    let names = |kind: &str| -> Vec<String> {
        json[kind]
            .as_array()
            .map(|all| {
                all.iter()
                    .filter_map(|s| s["name"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    assert_eq!(
        names("rate_limits"),
        ["rate_limit", "rate_limit_2", "rate_limit_3", "rate_limit_4"]
    );
    assert_eq!(
        names("circuit_breakers"),
        ["circuit_breaker", "circuit_breaker_2"]
    );
}
