//! The server side: a real pmcp server on loopback, behind `ResilienceLayer`
//! (or with the tool-middleware and protocol-chain adapters).

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use pmcp::shared::{AdvancedMiddleware, EnhancedMiddlewareChain};
use pmcp_resilience::rate_limit::{BackpressureConfig, RateLimitMiddleware, RateLimitStrategy};
use pmcp_resilience::server::{ProxyTrust, Refusals, RequestKey, ResilienceLayer, ToolRateLimit};
use pmcp_resilience::{CircuitBreakerMiddleware, ConfigError, ManualClock, Scope, Timestamp};
use serde_json::{Value, json};
use support::raw_http::{open_session, post, send, tool_call};
use support::{TestServer, call, client, initialize, start_server_wrapped, transport};

/// A fixed-window limiter of `max` calls per minute per tool, on a manual
/// clock set 15 s into a window (so 45 s remain).
fn per_tool_window(max: u32) -> (RateLimitMiddleware, ManualClock) {
    let clock = ManualClock::starting_at(Timestamp::from_millis(1_800_000_000_000 + 15_000));
    let limiter = RateLimitMiddleware::builder()
        .scope(Scope::PerTool)
        .strategy(RateLimitStrategy::FixedWindow {
            max_requests: max,
            window: Duration::from_secs(60),
        })
        .clock(Arc::new(clock.clone()))
        .build()
        .expect("valid limiter");
    (limiter, clock)
}

/// A server behind a layer with a breaker that opens after two failures.
async fn breaker_behind(
    scope: Scope,
    timeout: Duration,
    clock: &ManualClock,
) -> (CircuitBreakerMiddleware, TestServer) {
    let breaker = CircuitBreakerMiddleware::builder()
        .scope(scope)
        .failure_threshold(2)
        .timeout(timeout)
        .clock(Arc::new(clock.clone()))
        .build()
        .expect("valid breaker");
    let layer = ResilienceLayer::builder()
        .refusals(Refusals::HttpStatus)
        .circuit_breaker(breaker.clone())
        .build()
        .expect("valid layer");
    (breaker, behind(layer).await)
}

async fn behind(layer: ResilienceLayer) -> TestServer {
    start_server_wrapped("layered", |b| b, move |router| router.layer(layer)).await
}

#[tokio::test]
async fn a_raw_client_sees_429_with_every_header_and_a_jsonrpc_body() {
    let (limiter, _clock) = per_tool_window(2);
    let layer = ResilienceLayer::builder()
        .refusals(Refusals::HttpStatus)
        .rate_limit(limiter)
        .with_usage_headers(true)
        .build()
        .expect("valid layer");
    let server = behind(layer).await;
    let session = open_session(server.addr).await;
    let s = [("mcp-session-id", session.as_str())];

    let first = post(server.addr, &tool_call(1, "echo"), &s).await;
    assert_eq!(
        first.status,
        200,
        "{:?}",
        String::from_utf8_lossy(&first.body)
    );
    assert_eq!(first.header("x-ratelimit-limit"), Some("2"));
    assert_eq!(first.header("x-ratelimit-remaining"), Some("1"));
    assert_eq!(first.header("x-ratelimit-reset"), Some("45"));
    assert_eq!(first.header("ratelimit-policy"), Some("\"tool\";q=2;w=60"));
    assert_eq!(first.header("ratelimit"), Some("\"tool\";r=1;t=45"));
    assert_eq!(
        first.header("retry-after"),
        None,
        "only refusals carry Retry-After"
    );

    let second = post(server.addr, &tool_call(2, "echo"), &s).await;
    assert_eq!(second.status, 200);
    assert_eq!(second.header("x-ratelimit-remaining"), Some("0"));

    let third = post(server.addr, &tool_call(3, "echo"), &s).await;
    assert_eq!(third.status, 429);
    assert_eq!(third.header("retry-after"), Some("45"));
    assert_eq!(third.header("x-ratelimit-limit"), Some("2"));
    assert_eq!(third.header("x-ratelimit-remaining"), Some("0"));
    assert_eq!(third.header("x-ratelimit-reset"), Some("45"));
    assert_eq!(third.header("ratelimit-policy"), Some("\"tool\";q=2;w=60"));
    assert_eq!(third.header("ratelimit"), Some("\"tool\";r=0;t=45"));
    assert_eq!(third.header("content-type"), Some("application/json"));
    let body = third.json();
    assert_eq!(body["jsonrpc"], "2.0");
    assert_eq!(body["id"], 3);
    assert_eq!(body["error"]["code"], -32005);
    assert_eq!(body["error"]["data"]["retryAfterMs"], 45_000);
    assert_eq!(body["error"]["data"]["limit"], 2);
    assert_eq!(body["error"]["data"]["remaining"], 0);
    assert_eq!(body["error"]["data"]["key"], "tool:echo");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("retry after 45000 ms")),
        "{body}"
    );

    assert_eq!(
        server.behaviour.calls("echo"),
        2,
        "the refused call never ran"
    );

    // Notifications pass free, and so does DELETE (ending the session).
    let note = json!({"jsonrpc": "2.0", "method": "notifications/cancelled",
        "params": {"requestId": 3}});
    let noted = post(server.addr, note.to_string().as_bytes(), &s).await;
    assert_ne!(noted.status, 429);
    let ended = send(server.addr, "DELETE", b"", &s).await;
    assert!(
        (200..300).contains(&ended.status),
        "DELETE reaches pmcp: {}",
        ended.status
    );
}

#[tokio::test]
async fn the_reset_header_follows_backpressure_header() {
    let clock = ManualClock::new();
    let limiter = RateLimitMiddleware::builder()
        .scope(Scope::PerTool)
        .strategy(RateLimitStrategy::TokenBucket {
            capacity: 1,
            refill_rate: 2,
        })
        .backpressure(BackpressureConfig::reject().with_header("X-Budget-Reset"))
        .clock(Arc::new(clock.clone()))
        .build()
        .expect("valid limiter");
    let layer = ResilienceLayer::builder()
        .refusals(Refusals::HttpStatus)
        .rate_limit(limiter)
        .policy_name("calls")
        .build()
        .expect("valid layer");
    let server = behind(layer).await;
    let session = open_session(server.addr).await;
    let s = [("mcp-session-id", session.as_str())];
    let first = post(server.addr, &tool_call(1, "echo"), &s).await;
    assert_eq!(first.status, 200);
    assert_eq!(
        first.header("ratelimit"),
        None,
        "usage headers are off by default"
    );
    let refused = post(server.addr, &tool_call(2, "echo"), &s).await;
    assert_eq!(refused.status, 429);
    // 500 ms to the next token: rounded up to 1 s.
    assert_eq!(refused.header("retry-after"), Some("1"));
    assert_eq!(refused.header("x-budget-reset"), Some("1"));
    assert_eq!(refused.header("x-ratelimit-reset"), None);
    assert_eq!(
        refused.header("ratelimit-policy"),
        Some("\"calls\";q=1;w=1")
    );
    assert_eq!(refused.header("ratelimit"), Some("\"calls\";r=0;t=1"));
    assert_eq!(refused.json()["error"]["data"]["retryAfterMs"], 500);
    assert_eq!(server.behaviour.calls("echo"), 1);
}

#[tokio::test]
async fn a_pmcp_client_sees_only_the_429_status_with_http_status_refusals() {
    let (limiter, _clock) = per_tool_window(1);
    let layer = ResilienceLayer::builder()
        .rate_limit(limiter)
        .refusals(Refusals::HttpStatus)
        .build()
        .expect("valid layer");
    let server = behind(layer).await;
    let mut c = client(transport(&server.url), vec![]);
    initialize(&mut c).await;
    call(&c, "echo", json!({"message": "a"}))
        .await
        .expect("within the limit");
    // pmcp 2.23's client drops the body of a non-2xx answer: it sees only
    // the status.
    match call(&c, "echo", json!({"message": "b"})).await {
        Err(pmcp::Error::Transport(pmcp::error::TransportError::Request(text))) => {
            assert_eq!(text, "Request failed with status: 429 Too Many Requests");
        }
        other => panic!("expected the HTTP status, got {other:?}"),
    }
    assert_eq!(server.behaviour.calls("echo"), 1);
}

#[tokio::test]
async fn a_pmcp_client_gets_the_retry_hint_from_a_200_refusal_by_default() {
    let (limiter, _clock) = per_tool_window(1);
    let layer = ResilienceLayer::builder()
        .rate_limit(limiter)
        .build()
        .expect("valid layer");
    let server = behind(layer).await;
    let mut c = client(transport(&server.url), vec![]);
    initialize(&mut c).await;
    call(&c, "echo", json!({"message": "a"}))
        .await
        .expect("within the limit");
    match call(&c, "echo", json!({"message": "b"})).await {
        Err(pmcp::Error::Protocol {
            code,
            message,
            data: Some(data),
        }) => {
            assert_eq!(code, pmcp::ErrorCode::RATE_LIMITED);
            assert!(message.contains("retry after 45000 ms"), "{message}");
            assert_eq!(data["retryAfterMs"], 45_000);
            assert_eq!(data["key"], "tool:echo");
        }
        other => panic!("expected the JSON-RPC refusal, got {other:?}"),
    }
    assert_eq!(server.behaviour.calls("echo"), 1);
}

#[tokio::test]
async fn two_sessions_have_independent_budgets() {
    let clock = ManualClock::new();
    let limiter = RateLimitMiddleware::builder()
        .scope(Scope::PerSession)
        .strategy(RateLimitStrategy::TokenBucket {
            capacity: 2,
            refill_rate: 1,
        })
        .clock(Arc::new(clock.clone()))
        .build()
        .expect("valid limiter");
    let layer = ResilienceLayer::builder()
        .refusals(Refusals::HttpStatus)
        .rate_limit(limiter)
        .build()
        .expect("valid layer");
    let server = behind(layer).await;
    // Both initializes share the `session:no-session` budget of 2.
    let (ta, tb) = (transport(&server.url), transport(&server.url));
    let mut a = client(ta.clone(), vec![]);
    let mut b = client(tb.clone(), vec![]);
    initialize(&mut a).await;
    initialize(&mut b).await;
    assert_ne!(ta.session_id(), tb.session_id());
    assert!(ta.session_id().is_some());

    for _ in 0..2 {
        call(&a, "echo", json!({})).await.expect("a within budget");
    }
    assert!(call(&a, "echo", json!({})).await.is_err(), "a is out");
    for _ in 0..2 {
        call(&b, "echo", json!({}))
            .await
            .expect("b has its own budget");
    }
    assert!(call(&b, "echo", json!({})).await.is_err(), "b is out");
    assert_eq!(server.behaviour.calls("echo"), 4);
}

#[tokio::test]
async fn malformed_oversized_and_batch_bodies_get_clear_answers() {
    let (limiter, _clock) = per_tool_window(2);
    let layer = ResilienceLayer::builder()
        .refusals(Refusals::HttpStatus)
        .rate_limit(limiter)
        .max_body_bytes(4096)
        .build()
        .expect("valid layer");
    let server = behind(layer).await;
    let session = open_session(server.addr).await;
    let s = [("mcp-session-id", session.as_str())];

    let malformed = post(server.addr, b"{\"jsonrpc\": \"2.0\", nope", &s).await;
    assert_eq!(malformed.status, 400);
    assert_eq!(malformed.json()["error"]["code"], -32700);

    let not_rpc = post(server.addr, b"42", &s).await;
    assert_eq!(not_rpc.status, 400);
    assert_eq!(not_rpc.json()["error"]["code"], -32600);

    let empty_batch = post(server.addr, b"[]", &s).await;
    assert_eq!(empty_batch.status, 400);

    let huge = json!({"jsonrpc": "2.0", "id": 9, "method": "tools/call",
        "params": {"name": "echo", "arguments": {"message": "x".repeat(10_000)}}});
    let oversized = post(server.addr, huge.to_string().as_bytes(), &s).await;
    assert_eq!(oversized.status, 413);
    assert_eq!(oversized.json()["error"]["code"], -32600);

    // A batch of three calls of `echo` against a limit of two: refused as a
    // whole, nothing runs.
    let batch: Vec<Value> = (10..13)
        .map(|id| serde_json::from_slice(&tool_call(id, "echo")).unwrap_or(Value::Null))
        .collect();
    let refused = post(server.addr, Value::Array(batch).to_string().as_bytes(), &s).await;
    assert_eq!(refused.status, 429);
    assert_eq!(refused.json()["id"], Value::Null);
    assert_eq!(refused.json()["error"]["data"]["key"], "tool:echo");
    assert_eq!(server.behaviour.calls("echo"), 0);

    // A batch within its budget reaches pmcp, which (2.23) does not take
    // batches and answers 400 itself; the layer counted it all the same.
    let small: Vec<Value> =
        vec![serde_json::from_slice(&tool_call(20, "flaky")).unwrap_or(Value::Null)];
    let passed = post(server.addr, Value::Array(small).to_string().as_bytes(), &s).await;
    assert_eq!(passed.status, 400);
    assert_eq!(passed.json()["error"]["code"], -32700);
    assert_eq!(server.behaviour.calls("flaky"), 0);

    // Still serving after all of that.
    let fine = post(server.addr, &tool_call(30, "strict"), &s).await;
    assert_eq!(fine.status, 200);
}

#[tokio::test]
async fn waiting_for_capacity_smooths_a_burst() {
    // One token every 50 ms, none stored beyond 1: four calls at once are
    // spread over about 150 ms instead of three being refused.
    let limiter = RateLimitMiddleware::builder()
        .scope(Scope::PerTool)
        .strategy(RateLimitStrategy::TokenBucket {
            capacity: 1,
            refill_rate: 20,
        })
        .backpressure(BackpressureConfig::wait_up_to(Duration::from_millis(500)))
        .build()
        .expect("valid limiter");
    let layer = ResilienceLayer::builder()
        .refusals(Refusals::HttpStatus)
        .rate_limit(limiter)
        .build()
        .expect("valid layer");
    let server = behind(layer).await;
    let session = open_session(server.addr).await;
    let addr = server.addr;
    let started = Instant::now();
    let burst: Vec<_> = (0..4)
        .map(|i| {
            let session = session.clone();
            tokio::spawn(async move {
                post(addr, &tool_call(i, "echo"), &[("mcp-session-id", &session)])
                    .await
                    .status
            })
        })
        .collect();
    for handle in burst {
        assert_eq!(handle.await.ok(), Some(200));
    }
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(140), "spread out: {took:?}");
    // Every call got 200, so none waited past max_wait; this bound only
    // guards against a hang (a loaded CI machine may be slow).
    assert!(took < Duration::from_secs(5), "no hang: {took:?}");
    assert_eq!(server.behaviour.calls("echo"), 4);
}

#[tokio::test]
async fn a_wait_beyond_max_wait_is_refused_at_once() {
    let clock = ManualClock::new();
    let limiter = RateLimitMiddleware::builder()
        .scope(Scope::PerTool)
        .strategy(RateLimitStrategy::TokenBucket {
            capacity: 1,
            refill_rate: 1,
        })
        .backpressure(BackpressureConfig::wait_up_to(Duration::from_millis(100)))
        .clock(Arc::new(clock.clone()))
        .build()
        .expect("valid limiter");
    let layer = ResilienceLayer::builder()
        .refusals(Refusals::HttpStatus)
        .rate_limit(limiter)
        .build()
        .expect("valid layer");
    let server = behind(layer).await;
    let session = open_session(server.addr).await;
    let s = [("mcp-session-id", session.as_str())];
    assert_eq!(
        post(server.addr, &tool_call(1, "echo"), &s).await.status,
        200
    );
    let started = Instant::now();
    let refused = post(server.addr, &tool_call(2, "echo"), &s).await;
    // Refused at once: a wait would have lasted the full 1 s retry time.
    assert!(started.elapsed() < Duration::from_millis(600), "no wait");
    assert_eq!(refused.status, 429);
    assert_eq!(refused.header("retry-after"), Some("1"));
    assert_eq!(refused.json()["error"]["data"]["retryAfterMs"], 1000);
    assert_eq!(server.behaviour.calls("echo"), 1);
}

#[tokio::test]
async fn an_open_breaker_answers_503_without_running_the_tool() {
    let clock = ManualClock::new();
    let (breaker, server) = breaker_behind(Scope::PerTool, Duration::from_secs(30), &clock).await;
    let session = open_session(server.addr).await;
    let s = [("mcp-session-id", session.as_str())];
    server.break_flaky();
    for id in 0..2 {
        let failed = post(server.addr, &tool_call(id, "flaky"), &s).await;
        assert_eq!(failed.status, 200, "pmcp answers a tool error in the body");
        assert_eq!(failed.json()["error"]["code"], -32603);
    }
    assert_eq!(
        breaker.state_of("tool:flaky"),
        Some(pmcp_resilience::CircuitState::Open)
    );
    let fast = post(server.addr, &tool_call(5, "flaky"), &s).await;
    assert_eq!(fast.status, 503);
    assert_eq!(fast.header("retry-after"), Some("30"));
    let body = fast.json();
    assert_eq!(body["id"], 5);
    assert_eq!(body["error"]["code"], -32006);
    assert_eq!(body["error"]["data"]["retryAfterMs"], 30_000);
    assert_eq!(server.behaviour.calls("flaky"), 2, "not run while open");

    // Other tools have their own breaker.
    let echo = post(server.addr, &tool_call(6, "echo"), &s).await;
    assert_eq!(echo.status, 200);

    // After the open time a probe goes through; the healed tool closes it.
    server.heal();
    clock.advance(Duration::from_secs(31));
    let probe = post(server.addr, &tool_call(7, "flaky"), &s).await;
    assert_eq!(probe.status, 200);
    assert_eq!(server.behaviour.calls("flaky"), 3);
}

#[tokio::test]
async fn server_errors_of_the_wrapped_service_count_as_failures() {
    let clock = ManualClock::new();
    let (breaker, server) = breaker_behind(Scope::Global, Duration::from_secs(10), &clock).await;
    let session = open_session(server.addr).await;
    let s = [("mcp-session-id", session.as_str())];
    // Client errors (a 4xx) are not the server's failures.
    server.answer_http(axum::http::StatusCode::NOT_FOUND);
    for id in 0..3 {
        assert_eq!(
            post(server.addr, &tool_call(id, "echo"), &s).await.status,
            404
        );
    }
    assert_eq!(
        breaker.state_of("global"),
        Some(pmcp_resilience::CircuitState::Closed)
    );
    server.answer_http(axum::http::StatusCode::BAD_GATEWAY);
    for id in 0..2 {
        assert_eq!(
            post(server.addr, &tool_call(id, "echo"), &s).await.status,
            502
        );
    }
    let seen = server
        .behaviour
        .http_requests
        .load(std::sync::atomic::Ordering::SeqCst);
    let fast = post(server.addr, &tool_call(9, "echo"), &s).await;
    assert_eq!(fast.status, 503);
    assert_eq!(fast.header("retry-after"), Some("10"));
    assert_eq!(
        server
            .behaviour
            .http_requests
            .load(std::sync::atomic::Ordering::SeqCst),
        seen,
        "refused before reaching the server"
    );
}

#[tokio::test]
async fn client_address_keys_trust_proxies_only_when_told() {
    let clock = ManualClock::new();
    let limiter = RateLimitMiddleware::builder()
        .strategy(RateLimitStrategy::TokenBucket {
            capacity: 1,
            refill_rate: 1,
        })
        .clock(Arc::new(clock.clone()))
        .build()
        .expect("valid limiter");
    let layer = ResilienceLayer::builder()
        .refusals(Refusals::HttpStatus)
        .rate_limit(limiter)
        .key(RequestKey::ClientAddress)
        .trust_proxy(ProxyTrust::x_forwarded_for(1))
        .build()
        .expect("valid layer");
    let server = behind(layer).await;
    let session = open_session(server.addr).await;
    let from = |ip: &'static str| {
        [
            ("mcp-session-id", session.clone()),
            ("x-forwarded-for", ip.to_string()),
        ]
    };
    let headers = |h: &[(&'static str, String); 2]| -> Vec<(&'static str, String)> { h.to_vec() };
    let send = |h: Vec<(&'static str, String)>, id: i64| {
        let addr = server.addr;
        async move {
            let refs: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
            post(addr, &tool_call(id, "echo"), &refs).await
        }
    };
    assert_eq!(send(headers(&from("203.0.113.1")), 1).await.status, 200);
    let refused = send(headers(&from("203.0.113.1")), 2).await;
    assert_eq!(refused.status, 429);
    assert_eq!(refused.json()["error"]["data"]["key"], "client:203.0.113.1");
    assert_eq!(send(headers(&from("203.0.113.2")), 3).await.status, 200);
}

#[tokio::test]
async fn the_tool_middleware_limits_per_tool() {
    let clock = ManualClock::new();
    let limiter = RateLimitMiddleware::builder()
        .scope(Scope::PerTool)
        .strategy(RateLimitStrategy::TokenBucket {
            capacity: 1,
            refill_rate: 1,
        })
        .backpressure(BackpressureConfig::reject().with_client_signal())
        .clock(Arc::new(clock.clone()))
        .build()
        .expect("valid limiter");
    let adapter = Arc::new(ToolRateLimit::new(limiter));
    let server =
        start_server_wrapped("tool-limited", move |b| b.tool_middleware(adapter), |r| r).await;
    let mut c = client(transport(&server.url), vec![]);
    initialize(&mut c).await;
    let echoed = call(&c, "echo", json!({"message": "kept"}))
        .await
        .expect("first echo");
    assert!(
        echoed.to_string().contains("kept"),
        "arguments reach the tool: {echoed}"
    );
    let refused = call(&c, "echo", json!({"message": "b"})).await;
    eprintln!("tool middleware refusal: {refused:?}");
    match refused {
        Err(pmcp::Error::Protocol { code, message, .. }) => {
            assert_eq!(
                code.as_i32(),
                -32603,
                "pmcp reports middleware errors as internal"
            );
            assert!(message.contains("-32005"), "{message}");
            assert!(message.contains("retry after 1000 ms"), "{message}");
        }
        other => panic!("expected the limiter's refusal, got {other:?}"),
    }
    call(&c, "flaky", json!({}))
        .await
        .expect("another tool, another budget");
    assert_eq!(server.behaviour.calls("echo"), 1);
    clock.advance(Duration::from_secs(1));
    call(&c, "echo", json!({})).await.expect("refilled");
}

#[tokio::test]
async fn the_rate_limiter_works_in_the_server_core_protocol_chain() {
    use pmcp::server::core::ProtocolHandler;
    use pmcp::types::{ClientRequest, Request, RequestId};
    let limiter = RateLimitMiddleware::builder()
        .strategy(RateLimitStrategy::TokenBucket {
            capacity: 2,
            refill_rate: 1,
        })
        .clock(Arc::new(ManualClock::new()))
        .backpressure(BackpressureConfig::reject().with_client_signal())
        .build()
        .expect("valid limiter");
    let mut chain = EnhancedMiddlewareChain::new();
    chain.add(Arc::new(limiter) as Arc<dyn AdvancedMiddleware>);
    let core = pmcp::server::builder::ServerCoreBuilder::new()
        .name("core")
        .version("1.0.0")
        .protocol_middleware(Arc::new(pmcp::runtime::RwLock::new(chain)))
        .build()
        .expect("valid core");
    let init: ClientRequest = serde_json::from_value(json!({
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-06-18",
            "capabilities": {},
            "clientInfo": {"name": "core-test", "version": "1.0.0"}
        }
    }))
    .expect("an initialize request");
    let opened = core
        .handle_request(RequestId::from(0i64), Request::Client(Box::new(init)), None)
        .await;
    assert!(
        matches!(
            opened.payload,
            pmcp::types::jsonrpc::ResponsePayload::Result(_)
        ),
        "{opened:?}"
    );
    let ping = || Request::Client(Box::new(ClientRequest::Ping));
    // Admitted: it reaches ServerCore's dispatch (which has no `ping`).
    let first = core
        .handle_request(RequestId::from(1i64), ping(), None)
        .await;
    match first.payload {
        pmcp::types::jsonrpc::ResponsePayload::Error(e) => {
            assert_eq!(e.code, -32601, "{}", e.message)
        }
        pmcp::types::jsonrpc::ResponsePayload::Result(_) => {}
    }
    let second = core
        .handle_request(RequestId::from(2i64), ping(), None)
        .await;
    match second.payload {
        pmcp::types::jsonrpc::ResponsePayload::Error(e) => {
            assert_eq!(e.code, -32603);
            assert!(e.message.contains("-32005"), "{}", e.message);
            assert!(e.message.contains("retry after 1000 ms"), "{}", e.message);
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn the_builder_checks_its_settings() {
    let err = ResilienceLayer::builder().build().err();
    assert!(matches!(
        err,
        Some(ConfigError::Invalid {
            field: "rate_limit",
            ..
        })
    ));
    let limiter = || {
        RateLimitMiddleware::builder()
            .build()
            .expect("default limiter")
    };
    let zero = ResilienceLayer::builder()
        .rate_limit(limiter())
        .max_body_bytes(0)
        .build()
        .err();
    assert!(matches!(
        zero,
        Some(ConfigError::Invalid {
            field: "max_body_bytes",
            ..
        })
    ));
    let hops = ResilienceLayer::builder()
        .rate_limit(limiter())
        .trust_proxy(ProxyTrust::forwarded(0))
        .build()
        .err();
    assert!(matches!(
        hops,
        Some(ConfigError::Invalid {
            field: "trust_proxy",
            ..
        })
    ));
    let name = ResilienceLayer::builder()
        .rate_limit(limiter())
        .policy_name("a \"quoted\" name")
        .build()
        .err();
    assert!(matches!(
        name,
        Some(ConfigError::Invalid {
            field: "policy_name",
            ..
        })
    ));
    let header = RateLimitMiddleware::builder()
        .backpressure(BackpressureConfig::reject().with_header("bad header"))
        .build()
        .expect("the limiter checks it only when signalling");
    let bad = ResilienceLayer::builder().rate_limit(header).build().err();
    assert!(matches!(
        bad,
        Some(ConfigError::Invalid {
            field: "backpressure_header",
            ..
        })
    ));
}
