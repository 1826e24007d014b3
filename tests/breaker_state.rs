//! The circuit breaker with an injected clock: the middleware adapter and
//! the transport wrapper (the state machine's own tests are unit tests in
//! `src/circuit_breaker/tests.rs`).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use http::StatusCode;
use pmcp::error::TransportError;
use pmcp::shared::{
    AdvancedMiddleware, EnhancedMiddlewareChain, MiddlewareContext, MiddlewarePriority, Transport,
    TransportMessage,
};
use pmcp::types::jsonrpc::ResponsePayload;
use pmcp::types::{JSONRPCError, JSONRPCRequest, JSONRPCResponse, RequestId};
use pmcp_resilience::circuit_breaker::{
    BreakerPolicy, CircuitBreakerMiddleware, CircuitState, ErrorMatcher, FailureRate, SlidingWindow,
};
use pmcp_resilience::{ConfigError, ManualClock, RegistryLimits, Scope};
use serde_json::json;

fn request(method: &str, id: i64) -> JSONRPCRequest {
    JSONRPCRequest {
        jsonrpc: "2.0".into(),
        method: method.into(),
        params: Some(json!({"name": "search"})),
        id: RequestId::from(id),
    }
}

fn error_response(id: i64, code: i32) -> JSONRPCResponse {
    JSONRPCResponse {
        jsonrpc: "2.0".into(),
        id: RequestId::from(id),
        payload: ResponsePayload::Error(JSONRPCError {
            code,
            message: "error".into(),
            data: None,
        }),
    }
}

fn ok_response(id: i64, value: serde_json::Value) -> JSONRPCResponse {
    JSONRPCResponse {
        jsonrpc: "2.0".into(),
        id: RequestId::from(id),
        payload: ResponsePayload::Result(value),
    }
}

/// Sends one request and answer through the breaker.
async fn call(
    cb: &CircuitBreakerMiddleware,
    id: i64,
    answer: Option<JSONRPCResponse>,
) -> pmcp::Result<()> {
    let context = MiddlewareContext::with_request_id(format!("req-{id}"));
    let mut req = request("tools/call", id);
    cb.on_request_with_context(&mut req, &context).await?;
    if let Some(mut response) = answer {
        cb.on_response_with_context(&mut response, &context).await?;
    }
    Ok(())
}

fn breaker(clock: &ManualClock, threshold: u32) -> CircuitBreakerMiddleware {
    CircuitBreakerMiddleware::builder()
        .failure_threshold(threshold)
        .timeout(Duration::from_secs(10))
        .clock(Arc::new(clock.clone()))
        .build()
        .unwrap_or_else(|e| panic!("valid settings: {e}"))
}

#[tokio::test]
async fn default_matcher_ignores_the_callers_mistakes() {
    let clock = ManualClock::new();
    let cb = breaker(&clock, 2);
    for (i, code) in [-32602, -32601, -32602, -32601, -32600, -32700]
        .iter()
        .enumerate()
    {
        call(&cb, i as i64, Some(error_response(i as i64, *code)))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    assert_eq!(cb.state_of("global"), Some(CircuitState::Closed));
    assert_eq!(cb.metrics().failed_requests, 0);
    for i in 10..12 {
        let _ = call(&cb, i, Some(error_response(i, -32603))).await;
    }
    assert_eq!(cb.state_of("global"), Some(CircuitState::Open));
    let rejected = call(&cb, 20, None).await;
    assert!(matches!(rejected, Err(pmcp::Error::CircuitBreakerOpen)));
    let m = cb.metrics();
    assert_eq!(m.failed_requests, 2);
    assert_eq!(m.rejected_requests, 1);
    assert_eq!(m.state_transitions, 1);
    assert_eq!(m.keys[0].key, "global");
    assert_eq!(m.keys[0].state, CircuitState::Open);
    assert_eq!(cb.retry_after("global"), Some(Duration::from_secs(10)));
}

#[tokio::test]
async fn tool_errors_count_only_when_asked() {
    let clock = ManualClock::new();
    let cb = CircuitBreakerMiddleware::builder()
        .failure_threshold(1)
        .trigger_errors(ErrorMatcher::ToolErrors)
        .clock(Arc::new(clock.clone()))
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    let _ = call(
        &cb,
        1,
        Some(ok_response(1, json!({"content": [], "isError": false}))),
    )
    .await;
    assert_eq!(cb.state_of("global"), Some(CircuitState::Closed));
    let _ = call(
        &cb,
        2,
        Some(ok_response(2, json!({"content": [], "isError": true}))),
    )
    .await;
    assert_eq!(cb.state_of("global"), Some(CircuitState::Open));
}

#[tokio::test]
async fn half_open_recovery_through_the_middleware_and_signal_client() {
    let clock = ManualClock::new();
    let cb = CircuitBreakerMiddleware::builder()
        .scope(Scope::PerTool)
        .failure_threshold(1)
        .success_threshold(1)
        .timeout(Duration::from_secs(10))
        .signal_client(true)
        .clock(Arc::new(clock.clone()))
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    let _ = call(&cb, 1, Some(error_response(1, -32000))).await;
    assert_eq!(cb.state_of("tool:search"), Some(CircuitState::Open));
    clock.advance(Duration::from_secs(4));
    match call(&cb, 2, None).await {
        Err(pmcp::Error::Protocol {
            code,
            data: Some(data),
            ..
        }) => {
            assert_eq!(code.as_i32(), -32006);
            assert_eq!(data["retryAfterMs"], json!(6000));
            assert_eq!(data["key"], json!("tool:search"));
            assert_eq!(data["scope"], json!("tool"));
        }
        other => panic!("expected a signalled rejection, got {other:?}"),
    }
    clock.advance(Duration::from_secs(6));
    call(&cb, 3, Some(ok_response(3, json!({}))))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cb.state_of("tool:search"), Some(CircuitState::Closed));
    let snap = cb.metrics();
    assert_eq!(snap.state_transitions, 3);
    assert_eq!(snap.keys.len(), 1);
    assert_eq!(
        (
            snap.keys[0].failures,
            snap.keys[0].successes,
            snap.keys[0].rejections
        ),
        (1, 1, 1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_callers_at_half_open_admit_exactly_n() {
    let clock = ManualClock::new();
    let cb = CircuitBreakerMiddleware::builder()
        .failure_threshold(1)
        .half_open_max_probes(3)
        .timeout(Duration::from_secs(10))
        .clock(Arc::new(clock.clone()))
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    let _ = call(&cb, 0, Some(error_response(0, -32603))).await;
    clock.advance(Duration::from_secs(10));
    let admitted = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (1..=1000)
        .map(|i| {
            let cb = cb.clone();
            let admitted = Arc::clone(&admitted);
            tokio::spawn(async move {
                if call(&cb, i, None).await.is_ok() {
                    admitted.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for task in tasks {
        let _ = task.await;
    }
    assert_eq!(admitted.load(Ordering::Relaxed), 3);
    assert_eq!(cb.state_of("global"), Some(CircuitState::HalfOpen));
    assert_eq!(cb.metrics().rejected_requests, 997);
}

#[tokio::test]
async fn reconfiguration_keeps_the_counts() {
    let clock = ManualClock::new();
    let cb = breaker(&clock, 5);
    for i in 0..3 {
        let _ = call(&cb, i, Some(error_response(i, -32603))).await;
    }
    assert_eq!(cb.state_of("global"), Some(CircuitState::Closed));
    assert!(cb.set_failure_threshold(0).is_err());
    cb.set_failure_threshold(4)
        .unwrap_or_else(|e| panic!("{e}"));
    let _ = call(&cb, 3, Some(error_response(3, -32603))).await;
    assert_eq!(cb.state_of("global"), Some(CircuitState::Open));
    cb.set_timeout(Duration::from_secs(1))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cb.policy().timeout, Duration::from_secs(1));
}

#[tokio::test]
async fn a_window_rule_set_at_run_time_counts_the_successes_that_follow() {
    // Successes on a quiet key skip the state machine while no window rule
    // is set; once one is, they must count in its window.
    let clock = ManualClock::new();
    let cb = breaker(&clock, 100);
    for i in 0..3 {
        call(&cb, i, Some(ok_response(i, serde_json::json!({}))))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    cb.reconfigure(BreakerPolicy {
        window: SlidingWindow::Calls(4),
        failure_rate: Some(FailureRate {
            threshold: 0.5,
            minimum_calls: 4,
        }),
        ..cb.policy()
    })
    .unwrap_or_else(|e| panic!("{e}"));
    // S S F F: the window holds 4 calls at 50% failures.
    for i in 3..5 {
        call(&cb, i, Some(ok_response(i, serde_json::json!({}))))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let _ = call(&cb, 5, Some(error_response(5, -32603))).await;
    assert_eq!(cb.state_of("global"), Some(CircuitState::Closed), "3 calls");
    let _ = call(&cb, 6, Some(error_response(6, -32603))).await;
    assert_eq!(cb.state_of("global"), Some(CircuitState::Open));
}

#[tokio::test]
async fn forced_disabled_and_metrics_only_modes() {
    let clock = ManualClock::new();
    let cb = breaker(&clock, 1);
    cb.force_open("global");
    assert!(matches!(
        call(&cb, 1, None).await,
        Err(pmcp::Error::CircuitBreakerOpen)
    ));
    assert_eq!(cb.state_of("global"), Some(CircuitState::Open));
    cb.force_closed("global");
    for i in 2..5 {
        assert!(call(&cb, i, Some(error_response(i, -32603))).await.is_ok());
    }
    assert_eq!(cb.state_of("global"), Some(CircuitState::Closed));
    let before = cb.metrics().keys[0].failures;
    cb.disable("global");
    for i in 5..8 {
        assert!(call(&cb, i, Some(error_response(i, -32603))).await.is_ok());
    }
    assert_eq!(
        cb.metrics().keys[0].failures,
        before,
        "disabled keys do not count"
    );
    cb.metrics_only("global");
    for i in 8..11 {
        assert!(
            call(&cb, i, Some(error_response(i, -32603))).await.is_ok(),
            "dry run never rejects"
        );
    }
    assert_eq!(
        cb.metrics().keys[0].state,
        CircuitState::Open,
        "but computes the transition"
    );
    cb.reset_mode("global");
    assert!(matches!(
        call(&cb, 11, None).await,
        Err(pmcp::Error::CircuitBreakerOpen)
    ));
}

/// A middleware that rejects every request.
struct Refuser;

#[async_trait]
impl AdvancedMiddleware for Refuser {
    fn priority(&self) -> MiddlewarePriority {
        MiddlewarePriority::Normal
    }

    async fn on_request_with_context(
        &self,
        _request: &mut JSONRPCRequest,
        _context: &MiddlewareContext,
    ) -> pmcp::Result<()> {
        Err(pmcp::Error::Validation("refused by a sibling".into()))
    }
}

#[tokio::test]
async fn sibling_errors_and_own_rejections_are_not_counted() {
    let clock = ManualClock::new();
    let cb = CircuitBreakerMiddleware::builder()
        .failure_threshold(1)
        .success_threshold(1)
        .timeout(Duration::from_secs(10))
        .clock(Arc::new(clock.clone()))
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    let mut chain = EnhancedMiddlewareChain::new();
    chain.add(Arc::new(cb.clone()));
    chain.add(Arc::new(Refuser));
    for i in 0..5 {
        let context = MiddlewareContext::with_request_id(format!("s{i}"));
        let mut req = request("tools/list", i);
        let r = chain.process_request_with_context(&mut req, &context).await;
        assert!(matches!(r, Err(pmcp::Error::Validation(_))));
    }
    assert_eq!(cb.state_of("global"), Some(CircuitState::Closed));
    assert_eq!(cb.metrics().failed_requests, 0);

    // Own rejections: open it, then hammer it through the chain.
    let _ = call(&cb, 100, Some(error_response(100, -32603))).await;
    for i in 0..5 {
        let context = MiddlewareContext::with_request_id(format!("o{i}"));
        let mut req = request("tools/list", i);
        let r = chain.process_request_with_context(&mut req, &context).await;
        assert!(matches!(r, Err(pmcp::Error::CircuitBreakerOpen)));
    }
    assert_eq!(cb.metrics().failed_requests, 1);

    // A half-open probe stopped by a sibling frees its place uncounted.
    clock.advance(Duration::from_secs(10));
    let context = MiddlewareContext::with_request_id("probe-1".into());
    let r = chain
        .process_request_with_context(&mut request("x", 1), &context)
        .await;
    assert!(matches!(r, Err(pmcp::Error::Validation(_))));
    assert_eq!(cb.state_of("global"), Some(CircuitState::HalfOpen));
    call(&cb, 200, Some(ok_response(200, json!({}))))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cb.state_of("global"), Some(CircuitState::Closed));
}

#[tokio::test]
async fn open_breakers_are_never_evicted_from_the_bounded_registry() {
    let clock = ManualClock::new();
    let cb = CircuitBreakerMiddleware::builder()
        .scope(Scope::PerSession)
        .failure_threshold(1)
        .timeout(Duration::from_secs(3600))
        .registry_limits(RegistryLimits {
            max_keys: 50,
            idle_after: Duration::from_secs(1),
        })
        .clock(Arc::new(clock.clone()))
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    let sick = cb.with_target(pmcp_resilience::RequestTarget::default().with_session_id("sick"));
    let _ = call(&sick, 1, Some(error_response(1, -32603))).await;
    assert_eq!(cb.state_of("session:sick"), Some(CircuitState::Open));
    for i in 0..500 {
        clock.advance(Duration::from_secs(2));
        let h = cb.with_target(
            pmcp_resilience::RequestTarget::default().with_session_id(format!("s{i}")),
        );
        let _ = call(&h, i + 10, Some(ok_response(i + 10, json!({})))).await;
    }
    let stats = cb.metrics().registry;
    assert!(stats.keys <= 51, "{stats:?}");
    assert!(stats.evicted > 0);
    assert_eq!(cb.state_of("session:sick"), Some(CircuitState::Open));
}

#[test]
fn build_rejects_invalid_settings_with_clear_errors() {
    let field = |r: Result<CircuitBreakerMiddleware, ConfigError>| match r {
        Err(ConfigError::Invalid { field, .. }) => field,
        Err(other) => panic!("unexpected {other}"),
        Ok(_) => "accepted",
    };
    let b = CircuitBreakerMiddleware::builder;
    assert_eq!(field(b().failure_threshold(0).build()), "failure_threshold");
    assert_eq!(field(b().success_threshold(0).build()), "success_threshold");
    assert_eq!(field(b().timeout(Duration::ZERO).build()), "timeout");
    assert_eq!(field(b().failure_rate(1.5, 10).build()), "failure_rate");
    assert_eq!(field(b().failure_rate(0.0, 10).build()), "failure_rate");
    assert_eq!(
        field(b().slow_calls(Duration::from_secs(1), -0.1, 5).build()),
        "slow_calls"
    );
    assert_eq!(
        field(b().half_open_max_probes(0).build()),
        "half_open_max_probes"
    );
    assert_eq!(
        field(b().open_backoff(0.5, Duration::from_secs(60), 0.1).build()),
        "open_backoff"
    );
    assert_eq!(field(b().build()), "accepted");
    // File persistence needs a runtime for its background writes.
    assert!(matches!(
        b().persistence(pmcp_resilience::StatePersistence::File("x".into()))
            .build(),
        Err(ConfigError::Store(m)) if m.contains("Tokio runtime")
    ));
}

#[tokio::test]
async fn drop_in_constructor_has_pmcps_meaning() {
    let cb = CircuitBreakerMiddleware::new(3, Duration::from_secs(60), Duration::from_secs(30));
    for i in 0..2 {
        let _ = call(&cb, i, Some(error_response(i, -32603))).await;
        let _ = call(&cb, 50 + i, Some(ok_response(50 + i, json!({})))).await;
    }
    // Not consecutive, but three within the window.
    let _ = call(&cb, 9, Some(error_response(9, -32603))).await;
    assert_eq!(cb.state_of("global"), Some(CircuitState::Open));
    assert_eq!(cb.name(), "circuit_breaker");
    assert_eq!(cb.priority(), MiddlewarePriority::High);
}

// ---------------------------------------------------------------- transport wrapper

/// A transport whose sends fail with a fixed HTTP status.
#[derive(Debug)]
struct FailingTransport {
    status: &'static str,
}

impl FailingTransport {
    fn error(&self) -> pmcp::Error {
        pmcp::Error::Transport(TransportError::Request(format!(
            "Request failed with status: {}",
            self.status
        )))
    }
}

#[async_trait]
impl Transport for FailingTransport {
    async fn send(&mut self, _message: TransportMessage) -> pmcp::Result<()> {
        Err(self.error())
    }

    async fn receive(&mut self) -> pmcp::Result<TransportMessage> {
        Err(pmcp::Error::Transport(TransportError::ConnectionClosed))
    }

    async fn close(&mut self) -> pmcp::Result<()> {
        Ok(())
    }

    async fn send_raw(&mut self, _body: Vec<u8>) -> pmcp::Result<()> {
        Err(self.error())
    }

    fn transport_type(&self) -> &'static str {
        "failing"
    }
}

fn status_breaker(clock: &ManualClock) -> CircuitBreakerMiddleware {
    CircuitBreakerMiddleware::builder()
        .scope(Scope::PerServer)
        .server_url("http://127.0.0.1:1/mcp")
        .failure_threshold(2)
        .trigger_errors(ErrorMatcher::StatusCodes(vec![
            StatusCode::SERVICE_UNAVAILABLE,
        ]))
        .clock(Arc::new(clock.clone()))
        .build()
        .unwrap_or_else(|e| panic!("{e}"))
}

async fn send_through(
    cb: &CircuitBreakerMiddleware,
    transport: &mut impl Transport,
    id: i64,
    raw: bool,
) {
    let context = MiddlewareContext::with_request_id(id.to_string());
    let mut req = request("tools/call", id);
    if cb
        .on_request_with_context(&mut req, &context)
        .await
        .is_err()
    {
        return;
    }
    let sent = if raw {
        let body = serde_json::to_vec(&req).unwrap_or_default();
        transport.send_raw(body).await
    } else {
        transport
            .send(TransportMessage::Request {
                id: RequestId::from(id),
                request: pmcp::types::Request::Client(Box::new(pmcp::types::ClientRequest::Ping)),
            })
            .await
    };
    assert!(sent.is_err());
}

#[tokio::test]
async fn http_503_from_the_transport_trips_a_status_code_breaker() {
    let clock = ManualClock::new();
    let cb = status_breaker(&clock);
    let mut transport = cb.wrap_transport(FailingTransport {
        status: "503 Service Unavailable",
    });
    assert_eq!(transport.transport_type(), "failing");
    send_through(&cb, &mut transport, 1, false).await;
    assert_eq!(
        cb.state_of("server:http://127.0.0.1:1/mcp"),
        Some(CircuitState::Closed)
    );
    send_through(&cb, &mut transport, 2, true).await;
    assert_eq!(
        cb.state_of("server:http://127.0.0.1:1/mcp"),
        Some(CircuitState::Open)
    );
    assert_eq!(cb.metrics().failed_requests, 2);
}

#[tokio::test]
async fn http_404_from_the_transport_does_not_trip_it() {
    let clock = ManualClock::new();
    let cb = status_breaker(&clock);
    let mut transport = cb.wrap_transport(FailingTransport {
        status: "404 Not Found",
    });
    for i in 0..5 {
        send_through(&cb, &mut transport, i, i % 2 == 0).await;
    }
    assert_eq!(
        cb.state_of("server:http://127.0.0.1:1/mcp"),
        Some(CircuitState::Closed)
    );
    // A 404 is the caller's mistake: neutral, neither a failure nor a success.
    assert_eq!(cb.metrics().failed_requests, 0);
    assert_eq!(cb.metrics().successful_requests, 0);
    assert_eq!(cb.metrics().neutral_requests, 5);
}

/// A per-method breaker whose keys are idle after one second.
fn per_method(clock: &ManualClock, threshold: u32) -> CircuitBreakerMiddleware {
    CircuitBreakerMiddleware::builder()
        .scope(Scope::PerMethod)
        .failure_threshold(threshold)
        .registry_limits(RegistryLimits {
            max_keys: 10,
            idle_after: Duration::from_secs(1),
        })
        .clock(Arc::new(clock.clone()))
        .build()
        .unwrap_or_else(|e| panic!("{e}"))
}

#[tokio::test]
async fn a_key_with_a_call_in_flight_is_kept_and_the_answer_counts_on_it() {
    let clock = ManualClock::new();
    let cb = per_method(&clock, 1);
    let context = MiddlewareContext::with_request_id("slow-1".into());
    cb.on_request_with_context(&mut request("tools/call", 1), &context)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    // Idle for longer than `idle_after`, still within the call deadline.
    clock.advance(Duration::from_secs(20));
    assert_eq!(cb.evict_idle(), 0, "the call in flight keeps its key");
    let mut answer = error_response(1, -32603);
    cb.on_response_with_context(&mut answer, &context)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cb.state_of("method:tools/call"), Some(CircuitState::Open));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_calls_on_one_key_are_all_counted_and_all_released() {
    let clock = ManualClock::new();
    // Failures from different tasks may follow one another: never trip.
    let cb = per_method(&clock, 1_000);
    let tasks: Vec<_> = (0..8i64)
        .map(|t| {
            let cb = cb.clone();
            tokio::spawn(async move {
                for i in 0..500 {
                    let id = t * 1_000 + i;
                    let answer = if i % 100 == 99 {
                        error_response(id, -32603)
                    } else {
                        ok_response(id, json!({}))
                    };
                    call(&cb, id, Some(answer))
                        .await
                        .unwrap_or_else(|e| panic!("{e}"));
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap_or_else(|e| panic!("{e}"));
    }
    let snapshot = cb.metrics();
    assert_eq!(snapshot.keys.len(), 1);
    let key = &snapshot.keys[0];
    assert_eq!((key.successes, key.failures), (3_960, 40));
    assert_eq!(snapshot.successful_requests, 3_960);
    assert_eq!(cb.state_of("method:tools/call"), Some(CircuitState::Closed));
    clock.advance(Duration::from_secs(60));
    assert_eq!(cb.evict_idle(), 1, "no call was left holding the key");
}
