//! The server layer against hostile clients: invented tool names, forged
//! session ids, floods of new sessions.

mod support;

use std::time::Duration;

use pmcp::server::streamable_http_server::StreamableHttpServerConfig;
use pmcp_resilience::rate_limit::{RateLimitMiddleware, RateLimitStrategy};
use pmcp_resilience::server::ResilienceLayer;
use pmcp_resilience::{CircuitBreakerMiddleware, CircuitState, RegistryLimits, Scope};
use serde_json::json;
use support::raw_http::{open_session, post, tool_call};
use support::{TestServer, call, client, initialize, start_server_configured, transport};

const PATIENCE: Duration = Duration::from_secs(120);

fn four_keys() -> RegistryLimits {
    RegistryLimits {
        max_keys: 4,
        ..RegistryLimits::default()
    }
}

async fn sse_server_behind(layer: ResilienceLayer) -> TestServer {
    start_server_configured(
        "hostile",
        StreamableHttpServerConfig::default(),
        |b| b,
        move |router| router.layer(layer),
    )
    .await
}

/// 10,000 calls of invented tools, through a pmcp client, with a check of
/// the healthy tools every 100: they all run, and no breaker opens.
async fn junk_never_reaches_healthy_tools(
    layer: ResilienceLayer,
    breaker: CircuitBreakerMiddleware,
) {
    let server = sse_server_behind(layer).await;
    let mut pmcp_client = client(transport(&server.url), vec![]);
    tokio::time::timeout(PATIENCE, initialize(&mut pmcp_client))
        .await
        .expect("initialize in time");
    let mut echoes = 0;
    for n in 0..10_000u32 {
        let junk = tokio::time::timeout(
            PATIENCE,
            call(&pmcp_client, &format!("junk-{n}"), json!({})),
        )
        .await
        .expect("an answer in time");
        assert!(junk.is_err(), "an invented tool is an error");
        if n % 100 == 99 {
            let echo = tokio::time::timeout(
                PATIENCE,
                call(&pmcp_client, "echo", json!({"message": "hi"})),
            )
            .await
            .expect("an answer in time");
            assert!(echo.is_ok(), "after {n} junk calls: {echo:?}");
            echoes += 1;
        }
    }
    assert_eq!(server.behaviour.calls("echo"), echoes);
    // A healthy tool never called before runs too.
    let fresh = tokio::time::timeout(PATIENCE, call(&pmcp_client, "flaky", json!({})))
        .await
        .expect("an answer in time");
    assert!(fresh.is_ok(), "{fresh:?}");
    assert_eq!(server.behaviour.calls("flaky"), 1);
    let snapshot = breaker.snapshot();
    assert_eq!(
        snapshot.state_transitions, 0,
        "no breaker opened: {snapshot:?}"
    );
    assert!(
        snapshot
            .keys
            .iter()
            .all(|k| k.state == CircuitState::Closed)
    );
    assert!(snapshot.registry.keys <= 4, "{:?}", snapshot.registry);
    assert_eq!(snapshot.failed_requests, 0);
    assert_eq!(snapshot.in_flight, 0);
}

fn per_tool_breaker() -> CircuitBreakerMiddleware {
    CircuitBreakerMiddleware::builder()
        .scope(Scope::PerTool)
        .failure_threshold(2)
        .registry_limits(four_keys())
        .build()
        .expect("valid breaker")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invented_tool_names_open_no_breaker_with_the_tool_list() {
    let breaker = per_tool_breaker();
    let limiter = RateLimitMiddleware::builder()
        .scope(Scope::PerTool)
        .strategy(RateLimitStrategy::FixedWindow {
            max_requests: 100_000,
            window: Duration::from_secs(3600),
        })
        .registry_limits(four_keys())
        .build()
        .expect("valid limiter");
    let layer = ResilienceLayer::builder()
        .circuit_breaker(breaker.clone())
        .rate_limit(limiter.clone())
        .tools(["echo", "fail", "flaky", "slow", "strict"])
        .build()
        .expect("valid layer");
    junk_never_reaches_healthy_tools(layer, breaker.clone()).await;
    let keys: Vec<String> = breaker.snapshot().keys.into_iter().map(|k| k.key).collect();
    assert!(keys.contains(&"tool:<unknown>".to_string()), "{keys:?}");
    let limits = limiter.snapshot();
    assert!(limits.registry.keys <= 4, "{:?}", limits.registry);
    assert_eq!(limits.rejected_requests, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invented_tool_names_open_no_breaker_without_a_list() {
    let breaker = per_tool_breaker();
    let layer = ResilienceLayer::builder()
        .circuit_breaker(breaker.clone())
        .build()
        .expect("valid layer");
    junk_never_reaches_healthy_tools(layer, breaker).await;
}

#[tokio::test]
async fn a_503_names_the_open_key_and_always_says_when_to_retry() {
    let breaker = per_tool_breaker();
    let layer = ResilienceLayer::builder()
        .circuit_breaker(breaker.clone())
        .tools(["echo", "fail"])
        .build()
        .expect("valid layer");
    let server = sse_server_behind(layer).await;
    let session = open_session(server.addr).await;
    let s = [("mcp-session-id", session.as_str())];
    // Forced open by an operator: no open time is known, the policy's is given.
    breaker.force_open("tool:echo");
    let refused = post(server.addr, &tool_call(1, "echo"), &s).await;
    let answer = support::sse::answer(refused.header("content-type"), &refused.body);
    assert_eq!(answer["error"]["code"], -32006);
    assert_eq!(answer["error"]["data"]["key"], "tool:echo");
    assert_eq!(answer["error"]["data"]["retryAfterMs"], 30_000);
    assert_eq!(refused.header("retry-after"), Some("30"));
    // Junk is keyed by its own key, which a forced-open healthy tool does not reach.
    let junk = post(server.addr, &tool_call(2, "nope"), &s).await;
    let answer = support::sse::answer(junk.header("content-type"), &junk.body);
    assert_eq!(
        answer["error"]["code"], -32603,
        "pmcp's own answer: {answer}"
    );
    assert_eq!(server.behaviour.calls("echo"), 0);
}
