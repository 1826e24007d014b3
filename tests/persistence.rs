//! File and custom-store persistence wired into the middlewares: restart
//! survival, corrupt and locked files, and a shared custom breaker store.
//! Real files in temporary directories; time from a `ManualClock`.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use pmcp::shared::{AdvancedMiddleware, MiddlewareContext};
use pmcp::types::jsonrpc::ResponsePayload;
use pmcp::types::{JSONRPCError, JSONRPCRequest, JSONRPCResponse, RequestId};
use pmcp_resilience::circuit_breaker::{
    BreakerPolicy, CircuitBreakerMiddleware, CircuitState, KeySnapshot, Transition, Verdict,
};
use pmcp_resilience::persistence::{FileStoreOptions, OnCorrupt};
use pmcp_resilience::rate_limit::{RateLimitMiddleware, RateLimitStrategy};
use pmcp_resilience::store::{
    Admission, CircuitBreakerState, CircuitBreakerStateStore, InMemoryStateStore, ProbeId,
};
use pmcp_resilience::{ConfigError, ManualClock, Scope, StatePersistence, StoreError, Timestamp};
use serde_json::json;

fn request(method: &str, id: i64) -> JSONRPCRequest {
    JSONRPCRequest {
        jsonrpc: "2.0".into(),
        method: method.into(),
        params: Some(json!({"name": "search", "arguments": {}})),
        id: RequestId::from(id),
    }
}

fn server_error(id: i64) -> JSONRPCResponse {
    JSONRPCResponse {
        jsonrpc: "2.0".into(),
        id: RequestId::from(id),
        payload: ResponsePayload::Error(JSONRPCError {
            code: -32603,
            message: "boom".into(),
            data: None,
        }),
    }
}

fn ok(id: i64) -> JSONRPCResponse {
    JSONRPCResponse {
        jsonrpc: "2.0".into(),
        id: RequestId::from(id),
        payload: ResponsePayload::Result(json!({})),
    }
}

/// One request and its answer through the breaker.
async fn call(cb: &CircuitBreakerMiddleware, id: i64, answer: JSONRPCResponse) -> pmcp::Result<()> {
    let context = MiddlewareContext::with_request_id(format!("req-{id}"));
    let mut req = request("tools/call", id);
    cb.on_request_with_context(&mut req, &context).await?;
    let mut answer = answer;
    cb.on_response_with_context(&mut answer, &context).await
}

fn file_breaker(path: &Path, clock: &ManualClock) -> Result<CircuitBreakerMiddleware, ConfigError> {
    CircuitBreakerMiddleware::builder()
        .failure_threshold(2)
        .timeout(Duration::from_secs(10))
        .clock(Arc::new(clock.clone()))
        .persistence(StatePersistence::File(path.to_owned()))
        .build()
}

/// A file breaker opened by two server errors.
async fn opened_on_file(path: &Path, clock: &ManualClock) -> CircuitBreakerMiddleware {
    let cb = file_breaker(path, clock).unwrap();
    call(&cb, 1, server_error(1)).await.unwrap();
    call(&cb, 2, server_error(2)).await.unwrap();
    cb
}

#[tokio::test]
async fn an_open_breaker_is_still_open_after_a_restart_until_its_time_is_up() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("breakers.json");
    let clock = ManualClock::new();

    let cb = opened_on_file(&path, &clock).await;
    assert_eq!(cb.state_of("global"), Some(CircuitState::Open));
    // Written through: on disk before the response hook returned, with no
    // shutdown and no drop yet.
    let on_disk = std::fs::read_to_string(&path).unwrap();
    assert!(
        on_disk.contains(r#""state":"open""#) || on_disk.contains("Open"),
        "{on_disk}"
    );
    drop(cb);

    clock.advance(Duration::from_secs(4));
    let cb = file_breaker(&path, &clock).unwrap();
    assert_eq!(cb.state_of("global"), Some(CircuitState::Open));
    assert!(matches!(
        call(&cb, 3, ok(3)).await,
        Err(pmcp::Error::CircuitBreakerOpen)
    ));
    assert_eq!(cb.retry_after("global"), Some(Duration::from_secs(6)));

    clock.advance(Duration::from_secs(6));
    call(&cb, 4, ok(4)).await.unwrap(); // the probe, and it succeeds
    assert_eq!(cb.state_of("global"), Some(CircuitState::Closed));
    cb.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_open_breaker_goes_half_open_after_a_restart_once_its_time_passes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("breakers.json");
    let clock = ManualClock::new();

    let cb = opened_on_file(&path, &clock).await;
    cb.shutdown().await.unwrap();
    // After shutdown the file is released: a new breaker may open it while
    // the old handle still exists.
    let cb2 = file_breaker(&path, &clock).unwrap();
    assert_eq!(cb2.state_of("global"), Some(CircuitState::Open));

    clock.advance(Duration::from_secs(10));
    let context = MiddlewareContext::with_request_id("probe".to_string());
    let mut req = request("tools/call", 9);
    cb2.on_request_with_context(&mut req, &context)
        .await
        .unwrap();
    assert_eq!(cb2.state_of("global"), Some(CircuitState::HalfOpen));
    drop(cb);
}

#[tokio::test]
async fn stale_breaker_state_is_not_reloaded() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("breakers.json");
    let clock = ManualClock::new();

    let cb = opened_on_file(&path, &clock).await;
    cb.shutdown().await.unwrap();
    drop(cb);

    // Its open time is over before the restart: the key starts fresh.
    clock.advance(Duration::from_secs(11));
    let cb = file_breaker(&path, &clock).unwrap();
    assert_eq!(cb.state_of("global"), None);
    call(&cb, 3, ok(3)).await.unwrap();
    assert_eq!(cb.state_of("global"), Some(CircuitState::Closed));
}

#[tokio::test]
async fn a_forced_mode_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("breakers.json");
    let clock = ManualClock::new();
    let cb = file_breaker(&path, &clock).unwrap();
    cb.force_open("global");
    cb.shutdown().await.unwrap();
    drop(cb);

    clock.advance(Duration::from_secs(3600));
    let cb = file_breaker(&path, &clock).unwrap();
    assert!(matches!(
        call(&cb, 1, ok(1)).await,
        Err(pmcp::Error::CircuitBreakerOpen)
    ));
}

// ---------------------------------------------------------------- limiter

fn file_limiter(
    path: &Path,
    clock: &ManualClock,
    strategy: RateLimitStrategy,
) -> Result<RateLimitMiddleware, ConfigError> {
    RateLimitMiddleware::builder()
        .scope(Scope::PerMethod)
        .strategy(strategy)
        .clock(Arc::new(clock.clone()))
        .persistence(StatePersistence::File(path.to_owned()))
        .build()
}

async fn send(rl: &RateLimitMiddleware, method: &str) -> bool {
    let mut req = request(method, 1);
    rl.on_request_with_context(&mut req, &MiddlewareContext::default())
        .await
        .is_ok()
}

/// Requests admitted in a row now (time does not move).
async fn admitted(rl: &RateLimitMiddleware, method: &str) -> usize {
    let mut n = 0;
    while n < 100 && send(rl, method).await {
        n += 1;
    }
    n
}

fn strategies() -> [RateLimitStrategy; 4] {
    let window = Duration::from_secs(60);
    [
        RateLimitStrategy::TokenBucket {
            capacity: 5,
            refill_rate: 1,
        },
        RateLimitStrategy::LeakyBucket {
            capacity: 5,
            leak_rate: 1,
        },
        RateLimitStrategy::FixedWindow {
            max_requests: 5,
            window,
        },
        RateLimitStrategy::SlidingWindow {
            max_requests: 5,
            window,
        },
    ]
}

// Paused: a leaky bucket admits by delaying, and the delays are slept on Tokio's clock.
#[tokio::test(start_paused = true)]
async fn limiter_budget_survives_a_restart_for_every_strategy() {
    for strategy in strategies() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("limits.json");
        let clock = ManualClock::new();

        let rl = file_limiter(&path, &clock, strategy).unwrap();
        for _ in 0..3 {
            assert!(send(&rl, "tools/call").await, "{}", strategy.label());
        }
        rl.shutdown().await.unwrap();
        drop(rl);

        let rl = file_limiter(&path, &clock, strategy).unwrap();
        assert_eq!(
            admitted(&rl, "tools/call").await,
            2,
            "{}: the remaining budget, not a full one",
            strategy.label()
        );
        // A key never seen has its full budget.
        assert_eq!(admitted(&rl, "tools/list").await, 5, "{}", strategy.label());
    }
}

#[tokio::test]
async fn limiter_state_is_written_on_drop_without_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("limits.json");
    let clock = ManualClock::new();
    let strategy = strategies()[0];
    let rl = file_limiter(&path, &clock, strategy).unwrap();
    for _ in 0..4 {
        assert!(send(&rl, "tools/call").await);
    }
    drop(rl);
    let rl = file_limiter(&path, &clock, strategy).unwrap();
    assert_eq!(admitted(&rl, "tools/call").await, 1);
}

#[tokio::test(start_paused = true)]
async fn keys_back_at_full_capacity_are_not_reloaded() {
    for strategy in strategies() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("limits.json");
        let clock = ManualClock::new();

        let rl = file_limiter(&path, &clock, strategy).unwrap();
        assert!(send(&rl, "tools/list").await);
        rl.shutdown().await.unwrap();
        drop(rl);
        // Well past any refill or window.
        clock.advance(Duration::from_secs(600));
        let rl = file_limiter(&path, &clock, strategy).unwrap();
        assert_eq!(rl.metrics().registry.keys, 0, "{}", strategy.label());
        assert_eq!(admitted(&rl, "tools/list").await, 5, "{}", strategy.label());
    }
}

#[tokio::test(start_paused = true)]
async fn limiter_changes_reach_the_file_within_the_flush_interval() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("limits.json");
    let clock = ManualClock::new();
    let rl = RateLimitMiddleware::builder()
        .strategy(strategies()[0])
        .clock(Arc::new(clock.clone()))
        .persistence(StatePersistence::File(path.clone()))
        .file_options(FileStoreOptions::default().flush_interval(Duration::from_millis(200)))
        .build()
        .unwrap();
    assert!(send(&rl, "tools/call").await);
    assert!(!path.exists(), "nothing written on the request path");
    tokio::time::sleep(Duration::from_millis(250)).await;
    // The write runs on the blocking pool; give it a moment of real time.
    for _ in 0..200 {
        if path.exists() {
            break;
        }
        tokio::task::yield_now().await;
        std::thread::sleep(Duration::from_millis(5));
    }
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains("global"), "{text}");
}

// ---------------------------------------------------------------- bad files

#[tokio::test]
async fn a_corrupt_file_is_set_aside_and_the_breaker_starts_empty() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("breakers.json");
    std::fs::write(&path, b"{\"format\":\"pmcp-resil").unwrap();
    let clock = ManualClock::new();

    let cb = file_breaker(&path, &clock).unwrap();
    assert_eq!(cb.state_of("global"), None);
    let kept: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".corrupt-"))
        .collect();
    assert_eq!(kept.len(), 1, "the bad file is kept aside");
    assert_eq!(
        std::fs::read(kept[0].path()).unwrap(),
        b"{\"format\":\"pmcp-resil"
    );
}

#[tokio::test]
async fn a_corrupt_file_under_the_fail_policy_makes_build_fail() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("breakers.json");
    std::fs::write(&path, b"not json at all").unwrap();
    let built = CircuitBreakerMiddleware::builder()
        .persistence(StatePersistence::File(path.clone()))
        .file_options(FileStoreOptions::default().on_corrupt(OnCorrupt::Fail))
        .build();
    match built {
        Err(ConfigError::Store(message)) => {
            assert!(message.contains("corrupt"), "{message}");
            assert!(message.contains("breakers.json"), "{message}");
        }
        other => panic!("expected a store error, got {other:?}"),
    }
    assert_eq!(std::fs::read(&path).unwrap(), b"not json at all");

    let limiter = RateLimitMiddleware::builder()
        .persistence(StatePersistence::File(path.clone()))
        .file_options(FileStoreOptions::default().on_corrupt(OnCorrupt::Fail))
        .build();
    assert!(matches!(limiter, Err(ConfigError::Store(_))), "{limiter:?}");
}

#[tokio::test]
async fn a_second_middleware_on_one_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.json");
    let clock = ManualClock::new();

    let first = file_breaker(&path, &clock).unwrap();
    match file_breaker(&path, &clock) {
        Err(ConfigError::Store(message)) => {
            assert!(message.contains("already in use"), "{message}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    drop(first);
    // Released on drop: the next one may have it.
    let again = file_breaker(&path, &clock).unwrap();
    drop(again);

    let limits = dir.path().join("limits.json");
    let strategy = strategies()[0];
    let rl = file_limiter(&limits, &clock, strategy).unwrap();
    assert!(matches!(
        file_limiter(&limits, &clock, strategy),
        Err(ConfigError::Store(_))
    ));
    rl.shutdown().await.unwrap();
    assert!(file_limiter(&limits, &clock, strategy).is_ok());
}

// ---------------------------------------------------------------- custom store

/// A store of the user's that counts the calls the middleware makes.
#[derive(Default)]
struct CountingStore {
    inner: InMemoryStateStore,
    acquires: AtomicU64,
    records: AtomicU64,
}

#[async_trait]
impl CircuitBreakerStateStore for CountingStore {
    async fn get_state(&self, key: &str) -> Result<Option<CircuitBreakerState>, StoreError> {
        self.inner.get_state(key).await
    }

    async fn set_state(&self, key: &str, state: CircuitBreakerState) -> Result<(), StoreError> {
        self.inner.set_state(key, state).await
    }

    async fn get_metrics(&self) -> Result<HashMap<String, KeySnapshot>, StoreError> {
        self.inner.get_metrics().await
    }

    async fn acquire(
        &self,
        key: &str,
        policy: &BreakerPolicy,
        now: Timestamp,
        jitter: f64,
    ) -> Result<(Admission, Option<Transition>), StoreError> {
        self.acquires.fetch_add(1, Ordering::SeqCst);
        self.inner.acquire(key, policy, now, jitter).await
    }

    async fn record(
        &self,
        key: &str,
        policy: &BreakerPolicy,
        now: Timestamp,
        result: Verdict,
        elapsed: Duration,
        probe: Option<ProbeId>,
        jitter: f64,
    ) -> Result<Option<Transition>, StoreError> {
        self.records.fetch_add(1, Ordering::SeqCst);
        self.inner
            .record(key, policy, now, result, elapsed, probe, jitter)
            .await
    }
}

fn custom_breaker(
    store: Arc<dyn CircuitBreakerStateStore>,
    clock: &ManualClock,
) -> CircuitBreakerMiddleware {
    CircuitBreakerMiddleware::builder()
        .failure_threshold(2)
        .timeout(Duration::from_secs(10))
        .clock(Arc::new(clock.clone()))
        .persistence(StatePersistence::Custom(store))
        .build()
        .unwrap()
}

#[tokio::test]
async fn a_custom_store_is_used_and_shared_by_two_breakers() {
    let clock = ManualClock::new();
    let store = Arc::new(CountingStore::default());
    let a = custom_breaker(store.clone(), &clock);
    let b = custom_breaker(store.clone(), &clock);

    call(&a, 1, ok(1)).await.unwrap();
    assert_eq!(store.acquires.load(Ordering::SeqCst), 1);
    assert_eq!(store.records.load(Ordering::SeqCst), 1);

    // Failures through `a` open the breaker for `b` too.
    call(&a, 2, server_error(2)).await.unwrap();
    call(&a, 3, server_error(3)).await.unwrap();
    assert_eq!(a.state_of("global"), Some(CircuitState::Open));
    assert!(matches!(
        call(&b, 4, ok(4)).await,
        Err(pmcp::Error::CircuitBreakerOpen)
    ));
    assert_eq!(b.state_of("global"), Some(CircuitState::Open));
    assert_eq!(store.acquires.load(Ordering::SeqCst), 4);
    assert_eq!(store.records.load(Ordering::SeqCst), 3);

    // Counted per key in each middleware.
    let rows = a.metrics().keys;
    assert_eq!(rows.len(), 1);
    assert_eq!((rows[0].successes, rows[0].failures), (1, 2));
    assert_eq!(b.metrics().keys[0].rejections, 1);
    assert_eq!(b.metrics().rejected_requests, 1);

    // After the open time, one probe through `b` closes it for both.
    clock.advance(Duration::from_secs(10));
    call(&b, 5, ok(5)).await.unwrap();
    call(&a, 6, ok(6)).await.unwrap();
    assert_eq!(a.state_of("global"), Some(CircuitState::Closed));
}

/// A store that is down.
struct DownStore;

#[async_trait]
impl CircuitBreakerStateStore for DownStore {
    async fn get_state(&self, _key: &str) -> Result<Option<CircuitBreakerState>, StoreError> {
        Err(StoreError::Unavailable("down".into()))
    }

    async fn set_state(&self, _key: &str, _state: CircuitBreakerState) -> Result<(), StoreError> {
        Err(StoreError::Unavailable("down".into()))
    }

    async fn get_metrics(&self) -> Result<HashMap<String, KeySnapshot>, StoreError> {
        Err(StoreError::Unavailable("down".into()))
    }
}

#[tokio::test]
async fn a_failing_custom_store_hands_decisions_to_this_process_and_is_counted() {
    let clock = ManualClock::new();
    let cb = custom_breaker(Arc::new(DownStore), &clock);
    for i in 0..2 {
        call(&cb, i, server_error(i)).await.unwrap();
    }
    // The store failed each admission; this process's state machine decided
    // and counted, so the failures still open the breaker (not fail-open).
    assert_eq!(cb.store_errors(), 2);
    assert_eq!(cb.metrics().keys[0].failures, 2);
    assert_eq!(cb.state_of("global"), Some(CircuitState::Open));
    assert!(matches!(
        call(&cb, 3, ok(3)).await,
        Err(pmcp::Error::CircuitBreakerOpen)
    ));
    assert_eq!(cb.store_errors(), 3);
}
