//! End to end: a real pmcp client with this crate's circuit breaker, against
//! real pmcp streamable-HTTP servers on 127.0.0.1.
//!
//! Time inside the breakers comes from a `ManualClock`, so recovery through
//! half-open is driven by advancing it, not by sleeping.

mod support;

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use pmcp::shared::AdvancedMiddleware;
use pmcp_resilience::circuit_breaker::{CircuitBreakerMiddleware, CircuitState, ErrorMatcher};
use pmcp_resilience::{ManualClock, Scope};
use serde_json::json;
use support::*;

fn breaker(scope: Scope, clock: &ManualClock, matcher: ErrorMatcher) -> CircuitBreakerMiddleware {
    match CircuitBreakerMiddleware::builder()
        .scope(scope)
        .failure_threshold(3)
        .success_threshold(1)
        .timeout(Duration::from_secs(30))
        .trigger_errors(matcher)
        .clock(Arc::new(clock.clone()))
        .build()
    {
        Ok(cb) => cb,
        Err(e) => panic!("breaker config rejected: {e}"),
    }
}

fn as_mw(cb: CircuitBreakerMiddleware) -> Vec<Arc<dyn AdvancedMiddleware>> {
    vec![Arc::new(cb)]
}

fn is_open_rejection(r: &pmcp::Result<serde_json::Value>) -> bool {
    matches!(r, Err(pmcp::Error::CircuitBreakerOpen))
}

#[tokio::test]
async fn per_server_only_the_failing_servers_breaker_opens() {
    let clock = ManualClock::new();
    let healthy = start_server("healthy").await;
    let failing = start_server("failing").await;
    failing.break_flaky();
    let cb = breaker(Scope::PerServer, &clock, ErrorMatcher::default());

    let mut to_healthy = client(transport(&healthy.url), as_mw(cb.for_server(&healthy.url)));
    let mut to_failing = client(transport(&failing.url), as_mw(cb.for_server(&failing.url)));
    initialize(&mut to_healthy).await;
    initialize(&mut to_failing).await;

    for _ in 0..3 {
        let r = call(&to_failing, "flaky", json!({})).await;
        assert!(
            matches!(r, Err(pmcp::Error::Protocol { .. })),
            "server error expected, got {r:?}"
        );
    }
    let failing_key = format!("server:{}", failing.url);
    let healthy_key = format!("server:{}", healthy.url);
    assert_eq!(cb.state_of(&failing_key), Some(CircuitState::Open));

    // Open: rejected locally, the tool does not run.
    let before = failing.behaviour.calls("flaky");
    assert!(is_open_rejection(
        &call(&to_failing, "flaky", json!({})).await
    ));
    assert!(is_open_rejection(
        &call(&to_failing, "echo", json!({"message": "x"})).await
    ));
    assert_eq!(
        failing.behaviour.calls("flaky"),
        before,
        "an open breaker must not reach the server"
    );
    assert_eq!(failing.behaviour.calls("echo"), 0);

    // The healthy server keeps serving through the same breaker object.
    for _ in 0..5 {
        assert!(
            call(&to_healthy, "echo", json!({"message": "ok"}))
                .await
                .is_ok()
        );
    }
    assert_eq!(cb.state_of(&healthy_key), Some(CircuitState::Closed));

    let metrics = cb.metrics();
    let state = |key: &str| metrics.keys.iter().find(|k| k.key == key).map(|k| k.state);
    assert_eq!(state(&failing_key), Some(CircuitState::Open));
    assert!(metrics.rejected_requests >= 2);
    assert_eq!(metrics.failed_requests, 3);

    // Heal, let the open time pass, and recover through half-open.
    failing.heal();
    clock.advance(Duration::from_secs(31));
    assert!(
        call(&to_failing, "flaky", json!({})).await.is_ok(),
        "the half-open probe should pass"
    );
    assert_eq!(cb.state_of(&failing_key), Some(CircuitState::Closed));
    assert!(
        call(&to_failing, "echo", json!({"message": "back"}))
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn per_tool_and_per_method_isolate_failures() {
    let clock = ManualClock::new();
    let server = start_server("tools").await;

    // Per tool: `fail` opens its own breaker, `echo` is untouched.
    let per_tool = breaker(Scope::PerTool, &clock, ErrorMatcher::default());
    let mut c = client(transport(&server.url), as_mw(per_tool.clone()));
    initialize(&mut c).await;
    for _ in 0..3 {
        assert!(call(&c, "fail", json!({})).await.is_err());
    }
    assert_eq!(per_tool.state_of("tool:fail"), Some(CircuitState::Open));
    assert!(is_open_rejection(&call(&c, "fail", json!({})).await));
    assert_eq!(server.behaviour.calls("fail"), 3);
    assert!(
        call(&c, "echo", json!({"message": "still fine"}))
            .await
            .is_ok()
    );
    assert_eq!(per_tool.state_of("tool:echo"), Some(CircuitState::Closed));

    // The caller's own mistakes (invalid params, unknown method) never open
    // a breaker; the server's internal errors do.
    server.answer_jsonrpc_error(-32602);
    for _ in 0..5 {
        assert!(call(&c, "strict", json!({})).await.is_err());
    }
    server.answer_jsonrpc_error(-32601);
    for _ in 0..5 {
        assert!(call(&c, "strict", json!({})).await.is_err());
    }
    assert_eq!(per_tool.state_of("tool:strict"), Some(CircuitState::Closed));
    server.answer_jsonrpc_error(-32603);
    for _ in 0..3 {
        assert!(call(&c, "strict", json!({})).await.is_err());
    }
    assert_eq!(per_tool.state_of("tool:strict"), Some(CircuitState::Open));
    server.heal();

    // Per method: tools/call failures open `method:tools/call` only.
    let per_method = breaker(Scope::PerMethod, &clock, ErrorMatcher::default());
    let mut c2 = client(transport(&server.url), as_mw(per_method.clone()));
    initialize(&mut c2).await;
    for _ in 0..3 {
        assert!(call(&c2, "fail", json!({})).await.is_err());
    }
    assert_eq!(
        per_method.state_of("method:tools/call"),
        Some(CircuitState::Open)
    );
    assert!(is_open_rejection(&call(&c2, "echo", json!({})).await));
    let listed = c2.list_tools(None).await;
    assert!(
        listed.is_ok(),
        "tools/list has its own breaker and must pass: {listed:?}"
    );
}

#[tokio::test]
async fn http_503_trips_a_status_code_breaker_and_recovers() {
    let clock = ManualClock::new();
    let server = start_server("unavailable").await;
    let cb = breaker(
        Scope::PerServer,
        &clock,
        ErrorMatcher::StatusCodes(vec![
            StatusCode::BAD_GATEWAY,
            StatusCode::SERVICE_UNAVAILABLE,
        ]),
    );
    let handle = cb.for_server(&server.url);
    let mut c = client(
        handle.wrap_transport(transport(&server.url)),
        as_mw(handle.clone()),
    );
    initialize(&mut c).await;

    server.answer_http(StatusCode::SERVICE_UNAVAILABLE);
    for _ in 0..3 {
        let r = call(&c, "echo", json!({"message": "x"})).await;
        assert!(
            format!("{r:?}").contains("503"),
            "expected HTTP 503, got {r:?}"
        );
    }
    let key = format!("server:{}", server.url);
    assert_eq!(cb.state_of(&key), Some(CircuitState::Open));
    let reached = server
        .behaviour
        .http_requests
        .load(std::sync::atomic::Ordering::SeqCst);
    assert!(is_open_rejection(
        &call(&c, "echo", json!({"message": "x"})).await
    ));
    assert_eq!(
        server
            .behaviour
            .http_requests
            .load(std::sync::atomic::Ordering::SeqCst),
        reached,
        "an open breaker sends nothing"
    );
    assert!(
        cb.retry_after(&key)
            .is_some_and(|d| d <= Duration::from_secs(30))
    );

    server.heal();
    clock.advance(Duration::from_secs(31));
    assert!(call(&c, "echo", json!({"message": "healed"})).await.is_ok());
    assert_eq!(cb.state_of(&key), Some(CircuitState::Closed));
}

#[tokio::test]
async fn a_status_the_matcher_does_not_list_does_not_trip() {
    let clock = ManualClock::new();
    let server = start_server("not-found").await;
    let cb = breaker(
        Scope::Global,
        &clock,
        ErrorMatcher::StatusCodes(vec![StatusCode::SERVICE_UNAVAILABLE]),
    );
    let mut c = client(cb.wrap_transport(transport(&server.url)), as_mw(cb.clone()));
    initialize(&mut c).await;
    server.answer_http(StatusCode::NOT_FOUND);
    for _ in 0..5 {
        assert!(call(&c, "echo", json!({})).await.is_err());
    }
    assert_eq!(cb.state_of("global"), Some(CircuitState::Closed));
}

#[tokio::test]
async fn a_server_that_is_down_trips_a_transport_error_breaker() {
    let clock = ManualClock::new();
    let url = down_url().await;
    let cb = breaker(Scope::PerServer, &clock, ErrorMatcher::TransportErrors);
    let handle = cb.for_server(&url);
    let mut c = client(
        handle.wrap_transport(transport(&url)),
        as_mw(handle.clone()),
    );
    for _ in 0..3 {
        let r = c.initialize(pmcp::ClientCapabilities::minimal()).await;
        assert!(
            matches!(r, Err(pmcp::Error::Transport(_))),
            "connection refused expected, got {r:?}"
        );
    }
    let key = format!("server:{url}");
    assert_eq!(cb.state_of(&key), Some(CircuitState::Open));
    let r = c.initialize(pmcp::ClientCapabilities::minimal()).await;
    assert!(
        matches!(r, Err(pmcp::Error::CircuitBreakerOpen)),
        "open breaker expected, got {r:?}"
    );
}
