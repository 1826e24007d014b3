//! The circuit breaker with an injected clock: the state machine, the
//! middleware adapter and the transport wrapper.

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
use pmcp_resilience::circuit_breaker::state::{
    Admission, BreakerPolicy, CircuitBreakerState, CircuitState, SlidingWindow, TransitionReason,
    Verdict, acquire, record,
};
use pmcp_resilience::circuit_breaker::{CircuitBreakerMiddleware, ErrorMatcher};
use pmcp_resilience::{ConfigError, ManualClock, RegistryLimits, Scope, Timestamp};
use serde_json::json;

const MS: Duration = Duration::from_millis(1);

fn t(ms: u64) -> Timestamp {
    Timestamp::from_millis(1_000_000 + ms)
}

fn fail(
    s: &mut CircuitBreakerState,
    p: &BreakerPolicy,
    now: Timestamp,
) -> Option<TransitionReason> {
    record(s, p, now, Verdict::Failure, MS, None, 0.5).map(|t| t.reason)
}

fn succeed(s: &mut CircuitBreakerState, p: &BreakerPolicy, now: Timestamp) {
    record(s, p, now, Verdict::Success, MS, None, 0.5);
}

fn probe_of(a: Admission) -> Option<pmcp_resilience::circuit_breaker::state::ProbeId> {
    match a {
        Admission::Allowed { probe } => probe,
        Admission::Rejected { .. } => None,
    }
}

// ---------------------------------------------------------------- state machine

#[test]
fn consecutive_failures_open_and_a_success_resets_the_count() {
    let p = BreakerPolicy {
        consecutive_failures: 3,
        ..BreakerPolicy::default()
    };
    let mut s = CircuitBreakerState::default();
    fail(&mut s, &p, t(0));
    fail(&mut s, &p, t(1));
    succeed(&mut s, &p, t(2));
    assert_eq!(fail(&mut s, &p, t(3)), None);
    assert_eq!(fail(&mut s, &p, t(4)), None);
    assert_eq!(s.state, CircuitState::Closed);
    assert_eq!(
        fail(&mut s, &p, t(5)),
        Some(TransitionReason::ConsecutiveFailures)
    );
    assert_eq!(s.state, CircuitState::Open);
    assert_eq!(
        acquire(&mut s, &p, t(6), 0.5).0,
        Admission::Rejected {
            retry_after: p.timeout - MS
        }
    );
}

#[test]
fn failure_rate_trips_only_after_the_minimum_calls() {
    let p = BreakerPolicy {
        consecutive_failures: 0,
        window: SlidingWindow::Calls(10),
        failure_rate: Some(pmcp_resilience::circuit_breaker::state::FailureRate {
            threshold: 0.5,
            minimum_calls: 6,
        }),
        ..BreakerPolicy::default()
    };
    let mut s = CircuitBreakerState::default();
    // F S F S F: 60% failures but only 5 calls.
    for i in 0..5 {
        if i % 2 == 0 {
            assert_eq!(fail(&mut s, &p, t(i)), None);
        } else {
            succeed(&mut s, &p, t(i));
        }
    }
    assert_eq!(s.state, CircuitState::Closed);
    assert_eq!(fail(&mut s, &p, t(6)), Some(TransitionReason::FailureRate));
}

#[test]
fn failure_rate_over_a_time_window_forgets_old_calls() {
    let p = BreakerPolicy {
        consecutive_failures: 0,
        window: SlidingWindow::Time(Duration::from_secs(8)),
        failure_rate: Some(pmcp_resilience::circuit_breaker::state::FailureRate {
            threshold: 1.0,
            minimum_calls: 3,
        }),
        ..BreakerPolicy::default()
    };
    let mut s = CircuitBreakerState::default();
    fail(&mut s, &p, t(0));
    fail(&mut s, &p, t(1));
    // Ten seconds later the first two have left the window.
    assert_eq!(fail(&mut s, &p, t(10_000)), None);
    assert_eq!(s.window_totals(&p, t(10_000)).calls, 1);
    fail(&mut s, &p, t(10_001));
    assert_eq!(
        fail(&mut s, &p, t(10_002)),
        Some(TransitionReason::FailureRate)
    );
}

#[test]
fn slow_calls_trip() {
    let p = BreakerPolicy {
        consecutive_failures: 0,
        window: SlidingWindow::Calls(20),
        slow_calls: Some(pmcp_resilience::circuit_breaker::state::SlowCalls {
            duration: Duration::from_secs(2),
            threshold: 0.5,
            minimum_calls: 4,
        }),
        ..BreakerPolicy::default()
    };
    let mut s = CircuitBreakerState::default();
    let slow = Duration::from_secs(3);
    assert!(record(&mut s, &p, t(0), Verdict::Success, slow, None, 0.5).is_none());
    assert!(record(&mut s, &p, t(1), Verdict::Success, MS, None, 0.5).is_none());
    assert!(record(&mut s, &p, t(2), Verdict::Success, MS, None, 0.5).is_none());
    let tr = record(&mut s, &p, t(3), Verdict::Success, slow, None, 0.5);
    assert_eq!(tr.map(|t| t.reason), Some(TransitionReason::SlowCallRate));
}

#[test]
fn open_half_open_closed_and_probe_failure_reopens() {
    let p = BreakerPolicy {
        consecutive_failures: 1,
        success_threshold: 2,
        timeout: Duration::from_secs(10),
        ..BreakerPolicy::default()
    };
    let mut s = CircuitBreakerState::default();
    fail(&mut s, &p, t(0));
    assert!(matches!(
        acquire(&mut s, &p, t(9_999), 0.5).0,
        Admission::Rejected { .. }
    ));
    // Open -> half-open after the timeout; one probe at a time.
    let (a, tr) = acquire(&mut s, &p, t(10_000), 0.5);
    assert_eq!(tr.map(|t| t.to), Some(CircuitState::HalfOpen));
    let probe = probe_of(a);
    assert!(probe.is_some());
    assert!(matches!(
        acquire(&mut s, &p, t(10_001), 0.5).0,
        Admission::Rejected { .. }
    ));
    assert!(record(&mut s, &p, t(10_002), Verdict::Success, MS, probe, 0.5).is_none());
    assert_eq!(s.state, CircuitState::HalfOpen);
    let probe = probe_of(acquire(&mut s, &p, t(10_003), 0.5).0);
    let tr = record(&mut s, &p, t(10_004), Verdict::Success, MS, probe, 0.5);
    assert_eq!(
        tr.map(|t| (t.to, t.reason)),
        Some((CircuitState::Closed, TransitionReason::ProbesSucceeded))
    );

    // Trip again, then fail the probe: straight back to open.
    fail(&mut s, &p, t(20_000));
    let probe = probe_of(acquire(&mut s, &p, t(30_000), 0.5).0);
    let tr = record(&mut s, &p, t(30_001), Verdict::Failure, MS, probe, 0.5);
    assert_eq!(
        tr.map(|t| (t.from, t.to, t.reason)),
        Some((
            CircuitState::HalfOpen,
            CircuitState::Open,
            TransitionReason::ProbeFailed
        ))
    );
    assert_eq!(s.open_until, t(40_001));
}

#[test]
fn backoff_grows_per_trip_and_is_capped() {
    let p = BreakerPolicy {
        timeout: Duration::from_secs(10),
        open_backoff: Some(pmcp_resilience::circuit_breaker::state::OpenBackoff {
            multiplier: 2.0,
            max: Duration::from_secs(60),
            jitter: 0.0,
        }),
        ..BreakerPolicy::default()
    };
    let secs: Vec<u64> = (1..=5).map(|n| p.open_duration(n, 0.3).as_secs()).collect();
    assert_eq!(secs, vec![10, 20, 40, 60, 60]);

    // Through the state machine: each failed probe lengthens the next open time.
    let p = BreakerPolicy {
        consecutive_failures: 1,
        ..p
    };
    let mut s = CircuitBreakerState::default();
    fail(&mut s, &p, t(0));
    assert_eq!(s.open_until, t(10_000));
    let probe = probe_of(acquire(&mut s, &p, t(10_000), 0.5).0);
    record(&mut s, &p, t(10_000), Verdict::Failure, MS, probe, 0.5);
    assert_eq!(s.open_until, t(30_000));
    assert_eq!(s.trips, 2);
}

#[test]
fn jitter_stays_within_its_bounds_and_under_the_cap() {
    let p = BreakerPolicy {
        timeout: Duration::from_secs(10),
        open_backoff: Some(pmcp_resilience::circuit_breaker::state::OpenBackoff {
            multiplier: 2.0,
            max: Duration::from_secs(30),
            jitter: 0.2,
        }),
        ..BreakerPolicy::default()
    };
    assert_eq!(p.open_duration(1, 0.0), Duration::from_secs(8));
    assert_eq!(p.open_duration(1, 0.5), Duration::from_secs(10));
    for i in 0..=100 {
        let u = f64::from(i) / 100.0;
        let d = p.open_duration(1, u);
        assert!(
            d >= Duration::from_secs(8) && d <= Duration::from_secs(12),
            "{d:?}"
        );
        assert!(p.open_duration(5, u) <= Duration::from_secs(30));
    }
}

#[test]
fn a_probe_that_never_answers_is_released_after_its_deadline_as_a_failure() {
    let p = BreakerPolicy {
        consecutive_failures: 1,
        timeout: Duration::from_secs(10),
        probe_deadline: Duration::from_secs(5),
        ..BreakerPolicy::default()
    };
    let mut s = CircuitBreakerState::default();
    fail(&mut s, &p, t(0));
    let lost = probe_of(acquire(&mut s, &p, t(10_000), 0.5).0);
    assert!(lost.is_some());
    assert!(matches!(
        acquire(&mut s, &p, t(14_999), 0.5).0,
        Admission::Rejected { .. }
    ));
    // At the deadline the probe counts as failed: the breaker reopens.
    let (a, tr) = acquire(&mut s, &p, t(15_000), 0.5);
    assert_eq!(tr.map(|t| t.reason), Some(TransitionReason::ProbeDeadline));
    assert!(matches!(a, Admission::Rejected { .. }));
    assert!(s.probes.is_empty());
    // Its late answer changes nothing.
    assert!(record(&mut s, &p, t(15_001), Verdict::Success, MS, lost, 0.5).is_none());
    assert_eq!(s.state, CircuitState::Open);
}

#[test]
fn the_state_serialises_round_trip() {
    let p = BreakerPolicy::default();
    let mut s = CircuitBreakerState::default();
    fail(&mut s, &p, t(0));
    let text = serde_json::to_string(&s).unwrap_or_default();
    let back: Option<CircuitBreakerState> = serde_json::from_str(&text).ok();
    assert_eq!(back, Some(s));
}

// ---------------------------------------------------------------- middleware

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
        failure_rate: Some(pmcp_resilience::circuit_breaker::state::FailureRate {
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

/// The middleware admits calls and records successes of a quiet key without
/// running the state machine; that is only right if the state machine would
/// have changed nothing.
#[test]
fn a_quiet_state_admits_and_succeeds_without_changing() {
    use pmcp_resilience::circuit_breaker::state::is_quiet;
    let p = BreakerPolicy {
        consecutive_failures: 3,
        ..BreakerPolicy::default()
    };
    assert!(p.failure_rate.is_none() && p.failures_in_window.is_none() && p.slow_calls.is_none());
    let mut s = CircuitBreakerState::default();
    assert!(is_quiet(&s));
    let before = s.clone();
    let (admission, transition) = acquire(&mut s, &p, t(0), 0.5);
    assert_eq!(admission, Admission::Allowed { probe: None });
    assert_eq!(transition, None);
    assert_eq!(
        record(&mut s, &p, t(1), Verdict::Success, MS, None, 0.5),
        None
    );
    assert_eq!(s, before);
    // A failure, an open breaker or an operator's mode is not quiet.
    fail(&mut s, &p, t(2));
    assert!(!is_quiet(&s));
    succeed(&mut s, &p, t(3));
    assert!(is_quiet(&s));
    for i in 0..3 {
        fail(&mut s, &p, t(4 + i));
    }
    assert_eq!(s.state, CircuitState::Open);
    assert!(!is_quiet(&s));
    let mut forced = CircuitBreakerState::default();
    pmcp_resilience::circuit_breaker::state::set_mode(
        &mut forced,
        pmcp_resilience::circuit_breaker::state::BreakerMode::MetricsOnly,
    );
    assert!(!is_quiet(&forced));
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
