//! The breaker cannot be fooled: calls the breaker identifies itself, call
//! deadlines, neutral caller mistakes, permits that end exactly once.
//!
//! Time comes from a `ManualClock`; only the end-to-end hanging-server test
//! waits on a real (short, generous) client timeout.

mod support;

use std::sync::Arc;
use std::time::Duration;

use pmcp::shared::{AdvancedMiddleware, MiddlewareContext};
use pmcp::types::jsonrpc::ResponsePayload;
use pmcp::types::{JSONRPCError, JSONRPCRequest, JSONRPCResponse, RequestId};
use pmcp_resilience::circuit_breaker::{
    CircuitBreakerMiddleware, CircuitState, ErrorMatcher, Verdict,
};
use pmcp_resilience::{ManualClock, Scope, StatePersistence};
use serde_json::json;

fn breaker(clock: &ManualClock, threshold: u32) -> CircuitBreakerMiddleware {
    CircuitBreakerMiddleware::builder()
        .scope(Scope::PerMethod)
        .failure_threshold(threshold)
        .timeout(Duration::from_secs(10))
        .clock(Arc::new(clock.clone()))
        .build()
        .unwrap_or_else(|e| panic!("valid settings: {e}"))
}

fn request(id: i64) -> JSONRPCRequest {
    JSONRPCRequest {
        jsonrpc: "2.0".into(),
        method: "tools/call".into(),
        params: Some(json!({"name": "search", "arguments": {}})),
        id: RequestId::from(id),
    }
}

fn answer(id: i64, code: Option<i32>) -> JSONRPCResponse {
    JSONRPCResponse {
        jsonrpc: "2.0".into(),
        id: RequestId::from(id),
        payload: match code {
            Some(code) => ResponsePayload::Error(JSONRPCError {
                code,
                message: "answer".into(),
                data: None,
            }),
            None => ResponsePayload::Result(json!({})),
        },
    }
}

/// One call through the hooks: `None` answers with a result.
async fn call(cb: &CircuitBreakerMiddleware, id: i64, code: Option<i32>) -> pmcp::Result<()> {
    let context = MiddlewareContext::with_request_id(id.to_string());
    cb.on_request_with_context(&mut request(id), &context)
        .await?;
    cb.on_response_with_context(&mut answer(id, code), &context)
        .await
}

const KEY: &str = "method:tools/call";

#[tokio::test]
async fn two_contexts_with_the_same_request_id_are_both_counted() {
    let clock = ManualClock::new();
    let cb = breaker(&clock, 2);
    // Two clients both send id "1", both in flight at once.
    let (a, b) = (
        MiddlewareContext::with_request_id("1".into()),
        MiddlewareContext::with_request_id("1".into()),
    );
    for context in [&a, &b] {
        cb.on_request_with_context(&mut request(1), context)
            .await
            .unwrap_or_else(|e| panic!("admitted: {e}"));
    }
    for context in [&a, &b] {
        cb.on_response_with_context(&mut answer(1, Some(-32603)), context)
            .await
            .unwrap_or_else(|e| panic!("recorded: {e}"));
    }
    assert_eq!(cb.metrics().failed_requests, 2);
    assert_eq!(cb.state_of(KEY), Some(CircuitState::Open));
}

#[tokio::test]
async fn a_context_used_again_before_its_answer_keeps_the_first_call_until_its_deadline() {
    let clock = ManualClock::new();
    let cb = CircuitBreakerMiddleware::builder()
        .scope(Scope::PerMethod)
        .failure_threshold(3)
        .call_timeout(Duration::from_secs(5))
        .clock(Arc::new(clock.clone()))
        .build()
        .unwrap_or_else(|e| panic!("valid settings: {e}"));
    let context = MiddlewareContext::with_request_id("1".into());
    for _ in 0..2 {
        cb.on_request_with_context(&mut request(1), &context)
            .await
            .unwrap_or_else(|e| panic!("admitted: {e}"));
    }
    assert_eq!(cb.metrics().in_flight, 2);
    // A clone shares the context's identity: its answer ends the later call.
    let clone = context.clone();
    cb.on_response_with_context(&mut answer(1, Some(-32603)), &clone)
        .await
        .unwrap_or_else(|e| panic!("recorded: {e}"));
    let m = cb.metrics();
    assert_eq!((m.failed_requests, m.in_flight), (1, 1));
    // A second answer on the same context finds no call: nothing is counted twice.
    cb.on_response_with_context(&mut answer(1, Some(-32603)), &context)
        .await
        .unwrap_or_else(|e| panic!("recorded: {e}"));
    assert_eq!(cb.metrics().failed_requests, 1);
    // The first call ends at its deadline, as a timeout.
    clock.advance(Duration::from_secs(6));
    let m = cb.metrics();
    assert_eq!(
        (m.failed_requests, m.timed_out_requests, m.in_flight),
        (2, 1, 0)
    );
}

#[tokio::test]
async fn caller_mistakes_are_neutral_and_keep_the_failure_streak() {
    for mistake in [-32700, -32600, -32601, -32602] {
        let clock = ManualClock::new();
        let cb = breaker(&clock, 3);
        call(&cb, 1, Some(-32603)).await.ok();
        call(&cb, 2, Some(-32603)).await.ok();
        call(&cb, 3, Some(mistake)).await.ok();
        assert_eq!(
            cb.state_of(KEY),
            Some(CircuitState::Closed),
            "code {mistake}"
        );
        call(&cb, 4, Some(-32603)).await.ok();
        assert_eq!(
            cb.state_of(KEY),
            Some(CircuitState::Open),
            "fail, fail, {mistake}, fail opens at 3"
        );
        let m = cb.metrics();
        assert_eq!(
            (m.failed_requests, m.neutral_requests, m.successful_requests),
            (3, 1, 0)
        );
    }
}

#[tokio::test]
async fn a_neutral_half_open_probe_does_not_close_and_the_next_probe_decides() {
    let clock = ManualClock::new();
    let cb = breaker(&clock, 1);
    call(&cb, 1, Some(-32603)).await.ok();
    assert_eq!(cb.state_of(KEY), Some(CircuitState::Open));
    clock.advance(Duration::from_secs(11));
    // The probe is the caller's mistake: the place is freed, still half-open.
    call(&cb, 2, Some(-32602))
        .await
        .unwrap_or_else(|e| panic!("probe admitted: {e}"));
    assert_eq!(cb.state_of(KEY), Some(CircuitState::HalfOpen));
    // The next probe is admitted (the place was freed) and decides.
    call(&cb, 3, Some(-32603))
        .await
        .unwrap_or_else(|e| panic!("second probe admitted: {e}"));
    assert_eq!(cb.state_of(KEY), Some(CircuitState::Open));
    clock.advance(Duration::from_secs(11));
    call(&cb, 4, None)
        .await
        .unwrap_or_else(|e| panic!("third probe admitted: {e}"));
    assert_eq!(cb.state_of(KEY), Some(CircuitState::Closed));
}

#[tokio::test]
async fn neutral_can_be_configured_away() {
    let clock = ManualClock::new();
    let cb = CircuitBreakerMiddleware::builder()
        .scope(Scope::PerMethod)
        .failure_threshold(2)
        .trigger_errors(ErrorMatcher::JsonRpcCodes(vec![-32602]))
        .neutral_errors(ErrorMatcher::Nothing)
        .clock(Arc::new(clock.clone()))
        .build()
        .unwrap_or_else(|e| panic!("valid settings: {e}"));
    call(&cb, 1, Some(-32602)).await.ok();
    call(&cb, 2, Some(-32602)).await.ok();
    assert_eq!(cb.state_of(KEY), Some(CircuitState::Open));
}

#[tokio::test]
async fn a_dropped_permit_is_released_and_counted_once() {
    let clock = ManualClock::new();
    let cb = breaker(&clock, 1);
    let cb_open = breaker(&clock, 1);
    // Open a breaker, let it half-open, take the one probe place and drop it.
    call(&cb_open, 1, Some(-32603)).await.ok();
    clock.advance(Duration::from_secs(11));
    let probe = cb_open
        .acquire(KEY)
        .await
        .unwrap_or_else(|e| panic!("probe: {e}"));
    assert!(probe.is_probe());
    assert!(cb_open.acquire(KEY).await.is_err(), "one probe at a time");
    drop(probe);
    let m = cb_open.metrics();
    assert_eq!((m.neutral_requests, m.in_flight), (1, 0));
    // The place is back: the next probe is admitted and closes it.
    let probe = cb_open
        .acquire(KEY)
        .await
        .unwrap_or_else(|e| panic!("place handed back: {e}"));
    probe.record(Verdict::Success).await;
    assert_eq!(cb_open.state_of(KEY), Some(CircuitState::Closed));

    // A permit recorded ends once; its drop adds nothing.
    let permit = cb.acquire(KEY).await.unwrap_or_else(|e| panic!("{e}"));
    permit.record(Verdict::Success).await;
    let m = cb.metrics();
    assert_eq!(
        (m.successful_requests, m.neutral_requests, m.in_flight),
        (1, 0, 0)
    );
}

#[tokio::test]
async fn a_call_past_its_deadline_ends_as_timed_out_once() {
    let clock = ManualClock::new();
    let cb = CircuitBreakerMiddleware::builder()
        .scope(Scope::PerMethod)
        .failure_threshold(2)
        .call_timeout(Duration::from_secs(5))
        .clock(Arc::new(clock.clone()))
        .build()
        .unwrap_or_else(|e| panic!("valid settings: {e}"));
    let late = MiddlewareContext::with_request_id("late".into());
    cb.on_request_with_context(&mut request(1), &late)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let abandoned = cb.acquire(KEY).await.unwrap_or_else(|e| panic!("{e}"));
    clock.advance(Duration::from_secs(6));
    assert_eq!(
        cb.state_of(KEY),
        Some(CircuitState::Open),
        "two timeouts trip it"
    );
    let m = cb.metrics();
    assert_eq!(
        (m.timed_out_requests, m.failed_requests, m.in_flight),
        (2, 2, 0)
    );
    // The late answer and the late verdict change nothing.
    cb.on_response_with_context(&mut answer(1, None), &late)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    abandoned.record(Verdict::Success).await;
    let m = cb.metrics();
    assert_eq!((m.successful_requests, m.failed_requests), (0, 2));
}

#[tokio::test]
async fn a_zero_call_timeout_is_refused_at_build() {
    let built = CircuitBreakerMiddleware::builder()
        .call_timeout(Duration::ZERO)
        .build();
    assert!(matches!(built, Err(e) if e.to_string().contains("call_timeout")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_concurrent_half_open_callers_admit_exactly_the_probe_limit() {
    for probes in [1u32, 3] {
        let clock = ManualClock::new();
        let cb = CircuitBreakerMiddleware::builder()
            .scope(Scope::PerMethod)
            .failure_threshold(1)
            .half_open_max_probes(probes)
            .timeout(Duration::from_secs(10))
            .clock(Arc::new(clock.clone()))
            .build()
            .unwrap_or_else(|e| panic!("valid settings: {e}"));
        call(&cb, 0, Some(-32603)).await.ok();
        clock.advance(Duration::from_secs(11));
        let barrier = Arc::new(tokio::sync::Barrier::new(1000));
        let tasks: Vec<_> = (0..1000)
            .map(|_| {
                let (cb, barrier) = (cb.clone(), barrier.clone());
                tokio::spawn(async move {
                    barrier.wait().await;
                    // Hold the permit until every caller has asked.
                    cb.acquire(KEY).await.ok()
                })
            })
            .collect();
        let mut admitted = Vec::new();
        for task in tasks {
            if let Some(permit) = task.await.unwrap_or_else(|e| panic!("{e}")) {
                admitted.push(permit);
            }
        }
        assert_eq!(admitted.len(), probes as usize);
        assert!(admitted.iter().all(|p| p.is_probe()));
    }
}

#[tokio::test]
async fn the_per_key_state_view_is_bounded_by_the_registry() {
    let clock = ManualClock::new();
    let cb = CircuitBreakerMiddleware::builder()
        .scope(Scope::PerSession)
        .failure_threshold(1)
        .timeout(Duration::from_secs(1))
        .registry_limits(pmcp_resilience::RegistryLimits {
            max_keys: 50,
            idle_after: Duration::from_secs(5),
        })
        .clock(Arc::new(clock.clone()))
        .build()
        .unwrap_or_else(|e| panic!("valid settings: {e}"));
    for i in 0..1_000 {
        let permit = cb
            .acquire(&format!("session:s{i}"))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        permit.record(Verdict::Failure).await;
        clock.advance(Duration::from_millis(500));
        // Half-open after the open time, then closed again by a success.
        let key = format!("session:s{i}");
        clock.advance(Duration::from_secs(1));
        if let Ok(probe) = cb.acquire(&key).await {
            probe.record(Verdict::Success).await;
        }
    }
    let metrics = cb.metrics();
    assert!(metrics.registry.keys <= 51);
    assert!(metrics.keys.len() <= 51);
}

#[tokio::test]
async fn a_forced_mode_set_with_a_file_is_written_and_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let path = dir.path().join("breaker.state");
    let clock = ManualClock::new();
    let build = || {
        CircuitBreakerMiddleware::builder()
            .scope(Scope::PerMethod)
            .persistence(StatePersistence::File(path.clone()))
            .clock(Arc::new(clock.clone()))
            .build()
            .unwrap_or_else(|e| panic!("valid settings: {e}"))
    };
    let cb = build();
    cb.force_open(KEY);
    cb.flush().await.unwrap_or_else(|e| panic!("{e}"));
    cb.shutdown().await.unwrap_or_else(|e| panic!("{e}"));
    drop(cb);
    let again = build();
    assert_eq!(again.state_of(KEY), Some(CircuitState::Open));
    assert!(again.acquire(KEY).await.is_err());
}

/// End to end: a real pmcp server whose tool never answers, a real pmcp
/// client whose callers give up (`tokio::time::timeout` drops the call):
/// the breaker's call deadline counts the calls and trips `tool:slow`,
/// while `tool:echo` beside it stays closed.
#[tokio::test]
async fn a_hanging_server_trips_a_per_tool_breaker_through_the_call_deadline() {
    let server = support::start_server("hanging").await;
    let clock = ManualClock::new();
    let cb = CircuitBreakerMiddleware::builder()
        .scope(Scope::PerTool)
        .failure_threshold(2)
        .call_timeout(Duration::from_secs(5))
        .clock(Arc::new(clock.clone()))
        .build()
        .unwrap_or_else(|e| panic!("valid settings: {e}"));
    let mut client = support::client(
        support::transport(&server.url),
        vec![Arc::new(cb.clone()) as Arc<dyn AdvancedMiddleware>],
    );
    support::initialize(&mut client).await;
    for _ in 0..2 {
        // The tool sleeps an hour; the caller gives up (generously soon).
        let gave_up = tokio::time::timeout(
            Duration::from_millis(300),
            support::call(&client, "slow", json!({"ms": 3_600_000})),
        )
        .await;
        assert!(gave_up.is_err(), "the hanging tool never answers");
    }
    assert_eq!(cb.state_of("tool:slow"), Some(CircuitState::Closed));
    clock.advance(Duration::from_secs(6));
    assert_eq!(cb.state_of("tool:slow"), Some(CircuitState::Open));
    assert!(matches!(
        support::call(&client, "slow", json!({"ms": 1})).await,
        Err(pmcp::Error::CircuitBreakerOpen)
    ));
    support::call(&client, "echo", json!({"message": "still here"}))
        .await
        .unwrap_or_else(|e| panic!("a healthy tool keeps answering: {e}"));
    assert_eq!(cb.state_of("tool:echo"), Some(CircuitState::Closed));
    assert_eq!(cb.metrics().timed_out_requests, 2);
}

#[tokio::test]
async fn an_open_time_written_by_a_clock_that_was_ahead_is_clamped_on_load() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let path = dir.path().join("breaker.state");
    let build = |clock: &ManualClock| {
        CircuitBreakerMiddleware::builder()
            .scope(Scope::PerMethod)
            .failure_threshold(1)
            .timeout(Duration::from_secs(10))
            .persistence(StatePersistence::File(path.clone()))
            .clock(Arc::new(clock.clone()))
            .build()
            .unwrap_or_else(|e| panic!("valid settings: {e}"))
    };
    let now = pmcp_resilience::Timestamp::from_millis(1_000_000);
    // A process whose clock ran a day ahead opened the breaker.
    let ahead = ManualClock::starting_at(now.saturating_add(Duration::from_secs(86_400)));
    let cb = build(&ahead);
    call(&cb, 1, Some(-32603)).await.ok();
    cb.shutdown().await.unwrap_or_else(|e| panic!("{e}"));
    drop(cb);
    let here = ManualClock::starting_at(now);
    let again = build(&here);
    assert_eq!(again.state_of(KEY), Some(CircuitState::Open));
    let wait = again.retry_after(KEY).unwrap_or_default();
    assert!(
        wait <= Duration::from_secs(10),
        "open for at most the open time from now, not for the skew: {wait:?}"
    );
}
