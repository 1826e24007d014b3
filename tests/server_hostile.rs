//! The server layer against hostile clients: invented tool names, forged
//! session ids, floods of new sessions.

mod support;

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

use pmcp::server::streamable_http_server::StreamableHttpServerConfig;
use pmcp_resilience::rate_limit::{RateLimitMiddleware, RateLimitStrategy};
use pmcp_resilience::server::ResilienceLayer;
use pmcp_resilience::{CircuitBreakerMiddleware, CircuitState, ManualClock, RegistryLimits, Scope};
use serde_json::json;
use support::raw_http::{RawResponse, initialize_body, open_session, post, post_from, tool_call};
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
    let snapshot = breaker.metrics();
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
    let keys: Vec<String> = breaker.metrics().keys.into_iter().map(|k| k.key).collect();
    assert!(keys.contains(&"tool:<unknown>".to_string()), "{keys:?}");
    let limits = limiter.metrics();
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

/// A limiter of 5 calls per minute per session, on a manual clock.
fn five_per_session() -> RateLimitMiddleware {
    five_per(Scope::PerSession)
}

/// A limiter of 5 calls per minute per key of `scope`, on a manual clock.
fn five_per(scope: Scope) -> RateLimitMiddleware {
    RateLimitMiddleware::builder()
        .scope(scope)
        .strategy(RateLimitStrategy::FixedWindow {
            max_requests: 5,
            window: Duration::from_secs(60),
        })
        .clock(Arc::new(ManualClock::new()))
        .build()
        .expect("valid limiter")
}

fn loopback(n: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, n))
}

/// Whether an answer is the limiter's refusal (429, or 200 with -32005).
fn rate_limited(response: &RawResponse) -> bool {
    let answer = support::sse::answer(response.header("content-type"), &response.body);
    answer["error"]["code"] == -32005
}

#[tokio::test]
async fn ten_clients_connect_under_a_per_session_limit_and_a_flooder_is_refused_alone() {
    ten_clients_and_a_flooder(Scope::PerSession).await;
}

#[tokio::test]
async fn ten_clients_connect_under_a_per_method_limit_and_a_flooder_is_refused_alone() {
    ten_clients_and_a_flooder(Scope::PerMethod).await;
}

async fn ten_clients_and_a_flooder(scope: Scope) {
    let limiter = five_per(scope);
    let layer = ResilienceLayer::builder()
        .rate_limit(limiter.clone())
        .build()
        .expect("valid layer");
    let server = sse_server_behind(layer).await;
    let mut sessions = Vec::new();
    for n in 2..=11 {
        let answer = post_from(loopback(n), server.addr, &initialize_body(1), &[]).await;
        assert_eq!(answer.status, 200, "client {n}: {answer:?}");
        let session = answer.header("mcp-session-id").map(str::to_owned);
        sessions.push(session.unwrap_or_else(|| panic!("client {n} got no session")));
    }
    // One client initializing 20 more times: 4 more fit its budget of 5.
    let mut refused = 0;
    for _ in 0..20 {
        let answer = post_from(loopback(2), server.addr, &initialize_body(1), &[]).await;
        if rate_limited(&answer) {
            refused += 1;
            assert_eq!(answer.json()["error"]["data"]["key"], "client:127.0.0.2");
        }
    }
    assert_eq!(refused, 16);
    // ...for itself only: the others still connect, and their sessions work.
    let again = post_from(loopback(3), server.addr, &initialize_body(1), &[]).await;
    assert_eq!(again.status, 200);
    assert!(again.header("mcp-session-id").is_some());
    let s = [("mcp-session-id", sessions[2].as_str())];
    let echo = post_from(loopback(4), server.addr, &tool_call(5, "echo"), &s).await;
    assert!(!rate_limited(&echo));
    assert_eq!(server.behaviour.calls("echo"), 1);
    // The flooder's own session too has its own budget.
    let s = [("mcp-session-id", sessions[0].as_str())];
    let echo = post_from(loopback(2), server.addr, &tool_call(6, "echo"), &s).await;
    assert!(!rate_limited(&echo));
}

#[tokio::test]
async fn forged_session_ids_share_the_clients_budget() {
    let limiter = five_per_session();
    let layer = ResilienceLayer::builder()
        .rate_limit(limiter.clone())
        .build()
        .expect("valid layer");
    let server = sse_server_behind(layer).await;
    let session = open_session(server.addr).await;
    let mut admitted = 0;
    for n in 0..1_000 {
        let forged = format!("forged-{n}");
        let answer = post(
            server.addr,
            &tool_call(n, "echo"),
            &[("mcp-session-id", &forged)],
        )
        .await;
        if !rate_limited(&answer) {
            admitted += 1;
        }
    }
    // initialize took one unit of the client's budget.
    assert_eq!(admitted, 4);
    let snapshot = limiter.metrics();
    assert!(snapshot.registry.keys <= 2, "{:?}", snapshot.registry);
    assert_eq!(
        server.behaviour.calls("echo"),
        0,
        "pmcp refuses unknown sessions"
    );
    // The session the server issued keeps its own budget.
    let s = [("mcp-session-id", session.as_str())];
    let echo = post(server.addr, &tool_call(9, "echo"), &s).await;
    assert!(!rate_limited(&echo), "{echo:?}");
    assert_eq!(server.behaviour.calls("echo"), 1);
}
