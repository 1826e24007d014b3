//! How the layer answers a refusal: HTTP 200 with the JSON-RPC error by
//! default (or 429/503 when asked), with the retry and usage headers, the
//! CORS fields pmcp's router puts on its own answers, and no caching.

mod support;

use std::sync::Arc;
use std::time::Duration;

use pmcp::server::streamable_http_server::StreamableHttpServerConfig;
use pmcp_resilience::rate_limit::{RateLimitMiddleware, RateLimitStrategy};
use pmcp_resilience::server::{CorsOrigins, Refusals, ResilienceLayer};
use pmcp_resilience::{CircuitBreakerMiddleware, ManualClock, Scope};
use support::raw_http::{RawResponse, open_session, post, tool_call};
use support::{TestServer, start_server_configured};

fn one_per_tool() -> RateLimitMiddleware {
    RateLimitMiddleware::builder()
        .scope(Scope::PerTool)
        .strategy(RateLimitStrategy::FixedWindow {
            max_requests: 1,
            window: Duration::from_secs(60),
        })
        .clock(Arc::new(ManualClock::new()))
        .build()
        .expect("valid limiter")
}

async fn behind(layer: ResilienceLayer) -> TestServer {
    start_server_configured(
        "refusals",
        StreamableHttpServerConfig::default(),
        |b| b,
        move |router| router.layer(layer),
    )
    .await
}

fn all(response: &RawResponse, name: &str) -> Vec<String> {
    response
        .headers
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.clone())
        .collect()
}

fn exposed(response: &RawResponse) -> Vec<String> {
    all(response, "access-control-expose-headers")
        .iter()
        .flat_map(|v| v.split(','))
        .map(|h| h.trim().to_ascii_lowercase())
        .collect()
}

/// A call admitted (pmcp's own answer) and the same call refused by the
/// limiter, both from a page on `origin`.
async fn admitted_then_refused(refusals: Refusals, origin: &str) -> (RawResponse, RawResponse) {
    let layer = ResilienceLayer::builder()
        .rate_limit(one_per_tool())
        .refusals(refusals)
        .build()
        .expect("valid layer");
    let server = behind(layer).await;
    let session = open_session(server.addr).await;
    let h = [("mcp-session-id", session.as_str()), ("origin", origin)];
    let admitted = post(server.addr, &tool_call(1, "echo"), &h).await;
    let refused = post(server.addr, &tool_call(2, "echo"), &h).await;
    (admitted, refused)
}

#[tokio::test]
async fn refusals_are_200_json_rpc_errors_with_pmcps_cors_fields_by_default() {
    let origin = "http://localhost:5173";
    let (admitted, refused) = admitted_then_refused(Refusals::JsonRpcError, origin).await;
    assert_eq!(admitted.status, 200);
    assert_eq!(refused.status, 200);
    assert_eq!(refused.header("content-type"), Some("application/json"));
    let error = &refused.json()["error"];
    assert_eq!(error["code"], -32005);
    assert_eq!(error["data"]["retryAfterMs"], 60_000);
    assert_eq!(refused.header("retry-after"), Some("60"));
    assert!(refused.header("ratelimit").is_some());
    assert!(refused.header("ratelimit-policy").is_some());
    // The CORS fields pmcp's router gives its own answers...
    assert_eq!(admitted.header("access-control-allow-origin"), Some(origin));
    assert_eq!(refused.header("access-control-allow-origin"), Some(origin));
    assert_eq!(all(&refused, "vary"), all(&admitted, "vary"));
    // ...exposing the layer's headers too.
    let exposed = exposed(&refused);
    for header in exposed_by_pmcp(&admitted) {
        assert!(exposed.contains(&header), "{header} in {exposed:?}");
    }
    for header in [
        "retry-after",
        "ratelimit",
        "ratelimit-policy",
        "x-ratelimit-reset",
    ] {
        assert!(
            exposed.iter().any(|h| h == header),
            "{header} in {exposed:?}"
        );
    }
    assert_eq!(refused.header("cache-control"), Some("no-store"));
}

fn exposed_by_pmcp(admitted: &RawResponse) -> Vec<String> {
    let theirs = exposed(admitted);
    assert!(theirs.contains(&"mcp-session-id".to_string()), "{theirs:?}");
    theirs
}

#[tokio::test]
async fn http_status_refusals_are_a_choice_with_the_same_headers() {
    let origin = "http://127.0.0.1:8080";
    let (admitted, refused) = admitted_then_refused(Refusals::HttpStatus, origin).await;
    assert_eq!(refused.status, 429);
    assert_eq!(refused.json()["error"]["code"], -32005);
    assert_eq!(refused.header("retry-after"), Some("60"));
    assert_eq!(refused.header("access-control-allow-origin"), Some(origin));
    assert_eq!(all(&refused, "vary"), all(&admitted, "vary"));
    assert_eq!(refused.header("cache-control"), Some("no-store"));
}

#[tokio::test]
async fn a_foreign_origin_is_not_allowed_to_read_a_refusal() {
    let (admitted, refused) =
        admitted_then_refused(Refusals::JsonRpcError, "https://evil.example").await;
    assert_eq!(
        admitted.status, 403,
        "pmcp's router refuses foreign origins"
    );
    assert_eq!(refused.json()["error"]["code"], -32005);
    assert_eq!(refused.header("access-control-allow-origin"), None);
    assert_eq!(refused.header("cache-control"), Some("no-store"));
}

#[tokio::test]
async fn an_open_breaker_is_answered_200_with_its_key_and_retry_hint() {
    let clock = ManualClock::new();
    let breaker = CircuitBreakerMiddleware::builder()
        .scope(Scope::PerTool)
        .failure_threshold(1)
        .timeout(Duration::from_secs(20))
        .clock(Arc::new(clock))
        .build()
        .expect("valid breaker");
    let layer = ResilienceLayer::builder()
        .circuit_breaker(breaker)
        .cors_origins(CorsOrigins::List(vec!["http://localhost:3000".into()]))
        .build()
        .expect("valid layer");
    let server = behind(layer).await;
    let session = open_session(server.addr).await;
    let h = [
        ("mcp-session-id", session.as_str()),
        ("origin", "http://localhost:3000"),
    ];
    post(server.addr, &tool_call(1, "fail"), &h).await;
    let refused = post(server.addr, &tool_call(2, "fail"), &h).await;
    assert_eq!(refused.status, 200);
    let error = &refused.json()["error"];
    assert_eq!(error["code"], -32006);
    assert_eq!(error["data"]["key"], "tool:fail");
    assert_eq!(error["data"]["retryAfterMs"], 20_000);
    assert_eq!(refused.header("retry-after"), Some("20"));
    assert_eq!(
        refused.header("access-control-allow-origin"),
        Some("http://localhost:3000")
    );
    assert_eq!(server.behaviour.calls("fail"), 1);
}
