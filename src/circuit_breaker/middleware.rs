//! The breaker as a pmcp `AdvancedMiddleware`.
//!
//! `on_request_with_context` resolves the request's key and asks the key's
//! state machine for admission; an admitted call is remembered in a bounded
//! table of pending calls, keyed by the request id pmcp puts in the
//! `MiddlewareContext` (or by the context itself when there is none).
//! `on_response_with_context` classifies the answer and records it.
//! `on_error` only releases the pending call: the error was raised by a
//! middleware (this one or a sibling), never by the server, so it is not
//! counted. Transport failures and HTTP statuses arrive through
//! [`super::transport::ObservedTransport`].

use std::hash::BuildHasher;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use hashbrown::HashMap;
use parking_lot::{Mutex, RwLock};
use pmcp::shared::{AdvancedMiddleware, MiddlewareContext, MiddlewarePriority};
use pmcp::types::{JSONRPCRequest, JSONRPCResponse};

use super::config::{CircuitBreakerBuilder, CircuitBreakerConfig, validate_policy};
use super::matcher::{ErrorMatcher, Outcome, outcome_of_error, outcome_of_response};
use super::metrics::{CircuitBreakerMetrics, KeySnapshot, MetricsSnapshot};
use super::state::{
    self, Admission, BreakerMode, BreakerPolicy, CallResult, CircuitBreakerState, CircuitState,
    ProbeId, Transition,
};
use super::transport::ObservedTransport;
use crate::clock::{SharedClock, Timestamp, duration_nanos};
use crate::error::ConfigError;
use crate::metrics::MetricsConfig;
use crate::registry::{KeyState, OVERFLOW_KEY, Registry};
use crate::scope::{MissingPart, RequestTarget, Scope, ScopeKey, key_in_context};

/// One key's breaker in the registry: the persistent state plus counters
/// that only matter to this process.
#[derive(Debug, Default)]
pub(crate) struct Entry {
    pub(crate) state: CircuitBreakerState,
    in_flight: u32,
    successes: u64,
    failures: u64,
    rejections: u64,
}

impl KeyState for Entry {
    fn is_evictable(&self, _now: Timestamp) -> bool {
        self.state.state == CircuitState::Closed
            && self.state.mode == BreakerMode::Normal
            && self.state.probes.is_empty()
            && self.in_flight == 0
    }
}

/// A call admitted and not yet answered.
struct Pending {
    context: usize,
    key: ScopeKey,
    start: Timestamp,
    probe: Option<ProbeId>,
}

const PENDING_SHARDS: usize = 16;
/// Most pending calls remembered at once (per breaker).
const PENDING_CAPACITY: usize = 65_536;
/// A pending call older than this is presumed abandoned (its future was
/// dropped) when room is needed.
const PENDING_TTL: Duration = Duration::from_secs(300);

/// The bounded table of calls in flight.
struct PendingCalls {
    shards: Box<[Mutex<HashMap<u64, Pending, foldhash::fast::FixedState>>]>,
    untracked: AtomicU64,
}

impl PendingCalls {
    fn new() -> Self {
        PendingCalls {
            shards: (0..PENDING_SHARDS)
                .map(|_| {
                    Mutex::new(HashMap::with_hasher(foldhash::fast::FixedState::with_seed(
                        7,
                    )))
                })
                .collect(),
            untracked: AtomicU64::new(0),
        }
    }

    fn shard(&self, id: u64) -> &Mutex<HashMap<u64, Pending, foldhash::fast::FixedState>> {
        &self.shards[(id >> 59) as usize % PENDING_SHARDS]
    }

    /// Remembers a call; returns entries that had to give way (abandoned calls).
    fn insert(&self, id: u64, pending: Pending, now: Timestamp) -> Vec<Pending> {
        let mut gone = Vec::new();
        let mut map = self.shard(id).lock();
        if map.len() >= PENDING_CAPACITY / PENDING_SHARDS {
            let stale: Vec<u64> = map
                .iter()
                .filter(|(_, p)| now.saturating_since(p.start) >= PENDING_TTL)
                .map(|(k, _)| *k)
                .collect();
            gone.extend(stale.iter().filter_map(|k| map.remove(k)));
            if map.len() >= PENDING_CAPACITY / PENDING_SHARDS {
                self.untracked.fetch_add(1, Ordering::Relaxed);
                gone.push(pending);
                return gone;
            }
        }
        if let Some(old) = map.insert(id, pending) {
            gone.push(old);
        }
        gone
    }

    fn take(&self, id: u64, context: Option<usize>) -> Option<Pending> {
        let mut map = self.shard(id).lock();
        match context {
            Some(c) if map.get(&id).is_some_and(|p| p.context != c) => None,
            _ => map.remove(&id),
        }
    }
}

/// The state shared by every handle of one breaker.
pub(crate) struct Inner {
    scope: Scope,
    matcher: ErrorMatcher,
    inspect_results: bool,
    policy: RwLock<BreakerPolicy>,
    registry: Registry<Entry>,
    pending: PendingCalls,
    metrics: Arc<CircuitBreakerMetrics>,
    metrics_config: MetricsConfig,
    clock: SharedClock,
    signal_client: bool,
    warned_fallback: AtomicBool,
    next_sweep: AtomicU64,
    id_hasher: foldhash::fast::FixedState,
}

/// A scoped circuit breaker for pmcp: a cheap handle (clones share all state).
///
/// A drop-in replacement for `pmcp::shared::CircuitBreakerMiddleware`:
/// install it with `ClientBuilder::with_middleware(Arc::new(cb))`.
///
/// ```
/// use pmcp_resilience::circuit_breaker::CircuitBreakerMiddleware;
/// use std::time::Duration;
///
/// // pmcp's meaning: 5 failures within 60 s open it for 30 s.
/// let cb = CircuitBreakerMiddleware::new(5, Duration::from_secs(60), Duration::from_secs(30));
/// assert_eq!(cb.state_of("global"), None); // no request seen yet
/// ```
#[derive(Clone)]
pub struct CircuitBreakerMiddleware {
    inner: Arc<Inner>,
    target: RequestTarget,
}

impl std::fmt::Debug for CircuitBreakerMiddleware {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CircuitBreakerMiddleware")
            .field("scope", &self.inner.scope)
            .field("policy", &*self.inner.policy.read())
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

impl CircuitBreakerMiddleware {
    /// pmcp's constructor: one global breaker that opens for
    /// `timeout_duration` after `failure_threshold` failures within
    /// `time_window`. Out-of-range values are raised to the smallest valid
    /// ones (1 failure, 1 ms) rather than panicking.
    pub fn new(failure_threshold: u32, time_window: Duration, timeout_duration: Duration) -> Self {
        let one_ms = Duration::from_millis(1);
        let mut config = CircuitBreakerConfig::default();
        config.policy.failures_in_window = Some(failure_threshold.max(1));
        config.policy.consecutive_failures = 0;
        config.policy.window = state::SlidingWindow::Time(time_window.max(one_ms));
        config.policy.timeout = timeout_duration.max(one_ms);
        Self::from_parts(
            config,
            crate::clock::default_clock(),
            RequestTarget::default(),
        )
    }

    /// A builder with the defaults (global scope, 5 consecutive failures, 30 s open).
    pub fn builder() -> CircuitBreakerBuilder {
        CircuitBreakerBuilder::default()
    }

    pub(crate) fn from_parts(
        config: CircuitBreakerConfig,
        clock: SharedClock,
        target: RequestTarget,
    ) -> Self {
        let inner = Inner {
            inspect_results: config.trigger_errors.looks_at_tool_errors(),
            scope: config.scope,
            matcher: config.trigger_errors,
            policy: RwLock::new(config.policy),
            registry: Registry::new(config.registry_limits),
            pending: PendingCalls::new(),
            metrics: Arc::new(CircuitBreakerMetrics::default()),
            metrics_config: config.metrics_config,
            clock,
            signal_client: config.signal_client,
            warned_fallback: AtomicBool::new(false),
            next_sweep: AtomicU64::new(0),
            id_hasher: foldhash::fast::FixedState::with_seed(0x0b5e_4ed1),
        };
        CircuitBreakerMiddleware {
            inner: Arc::new(inner),
            target,
        }
    }

    /// A handle for requests to the server at `url`, sharing all state.
    pub fn for_server(&self, url: impl AsRef<str>) -> Self {
        self.with_target(self.target.clone().with_server_url(url))
    }

    /// A handle with another target, sharing all state.
    pub fn with_target(&self, target: RequestTarget) -> Self {
        CircuitBreakerMiddleware {
            inner: Arc::clone(&self.inner),
            target,
        }
    }

    /// Wraps a transport so that its failures (HTTP statuses, refused
    /// connections, timeouts) reach this breaker.
    pub fn wrap_transport<T>(&self, transport: T) -> ObservedTransport<T> {
        ObservedTransport::new(transport, self.clone())
    }

    /// The metrics, shared by every handle (per-key changes flushed first).
    pub fn metrics(&self) -> Arc<CircuitBreakerMetrics> {
        self.prune_current_state();
        Arc::clone(&self.inner.metrics)
    }

    /// A plain copy of the metrics with a row per key.
    pub fn snapshot(&self) -> MetricsSnapshot {
        let m = &self.inner.metrics;
        let mut keys = Vec::new();
        self.inner.registry.for_each(|key, e| {
            keys.push(KeySnapshot {
                key: key.as_str().to_owned(),
                state: e.state.effective_state(),
                successes: e.successes,
                failures: e.failures,
                rejections: e.rejections,
            });
        });
        keys.sort_by(|a, b| a.key.cmp(&b.key));
        MetricsSnapshot {
            scope: self.inner.scope.label(),
            total_requests: m.total_requests.load(Ordering::Relaxed),
            successful_requests: m.successful_requests.load(Ordering::Relaxed),
            failed_requests: m.failed_requests.load(Ordering::Relaxed),
            rejected_requests: m.rejected_requests.load(Ordering::Relaxed),
            state_transitions: m.state_transitions.load(Ordering::Relaxed),
            keys,
            registry: self.inner.registry.stats(),
        }
    }

    /// The scope (for the server layer, which resolves keys itself).
    pub(crate) fn key_scope(&self) -> &Scope {
        &self.inner.scope
    }

    /// The state of `key` as callers see it, or `None` if the key is not held.
    pub fn state_of(&self, key: &str) -> Option<CircuitState> {
        self.inner.registry.peek(key, |e| e.state.effective_state())
    }

    /// How long until `key` may admit a call, if it is rejecting now
    /// (`None` for a closed, unknown or forced-open key).
    pub fn retry_after(&self, key: &str) -> Option<Duration> {
        let now = self.inner.clock.now();
        self.inner
            .registry
            .peek(key, |e| e.state.retry_after(now))
            .flatten()
    }

    /// The policy in force.
    pub fn policy(&self) -> BreakerPolicy {
        *self.inner.policy.read()
    }

    /// Replaces the policy at run time; every key keeps its state and counts
    /// (a window of another shape starts empty).
    pub fn reconfigure(&self, policy: BreakerPolicy) -> Result<(), ConfigError> {
        validate_policy(&policy)?;
        *self.inner.policy.write() = policy;
        Ok(())
    }

    /// Changes the consecutive-failure threshold at run time.
    pub fn set_failure_threshold(&self, n: u32) -> Result<(), ConfigError> {
        self.reconfigure(BreakerPolicy {
            consecutive_failures: n,
            ..self.policy()
        })
    }

    /// Changes the success threshold at run time.
    pub fn set_success_threshold(&self, n: u32) -> Result<(), ConfigError> {
        self.reconfigure(BreakerPolicy {
            success_threshold: n,
            ..self.policy()
        })
    }

    /// Changes the open time at run time.
    pub fn set_timeout(&self, timeout: Duration) -> Result<(), ConfigError> {
        self.reconfigure(BreakerPolicy {
            timeout,
            ..self.policy()
        })
    }

    fn set_mode(&self, key: &str, mode: BreakerMode) {
        let now = self.inner.clock.now();
        let (effective, _) = self.inner.registry.with(key, now, Entry::default, |e| {
            state::set_mode(&mut e.state, mode);
            e.state.effective_state()
        });
        if self.inner.metrics_config.per_key {
            self.inner.metrics.set_state(key, Some(effective));
        }
        tracing::info!(key, ?mode, "circuit breaker mode changed");
    }

    /// Rejects every call of `key` until [`Self::reset_mode`].
    pub fn force_open(&self, key: &str) {
        self.set_mode(key, BreakerMode::ForcedOpen);
    }

    /// Admits every call of `key` without counting, until [`Self::reset_mode`].
    pub fn force_closed(&self, key: &str) {
        self.set_mode(key, BreakerMode::ForcedClosed);
    }

    /// Turns the breaker of `key` off: it neither rejects nor counts.
    pub fn disable(&self, key: &str) {
        self.set_mode(key, BreakerMode::Disabled);
    }

    /// Computes transitions and metrics for `key` but never rejects.
    pub fn metrics_only(&self, key: &str) {
        self.set_mode(key, BreakerMode::MetricsOnly);
    }

    /// Hands `key` back to the state machine, with the counts it had.
    pub fn reset_mode(&self, key: &str) {
        self.set_mode(key, BreakerMode::Normal);
    }

    /// Drops idle closed keys now (also done on its own from time to time).
    pub fn evict_idle(&self) -> u64 {
        self.inner.registry.evict_idle(self.inner.clock.now())
    }

    fn prune_current_state(&self) {
        let metrics = &self.inner.metrics;
        let gone: Vec<String> = match metrics.current_state.try_read() {
            Ok(map) => map
                .keys()
                .filter(|k| self.inner.registry.peek(k, |_| ()).is_none())
                .cloned()
                .collect(),
            Err(_) => Vec::new(),
        };
        for key in gone {
            metrics.set_state(&key, None);
        }
        metrics.flush();
    }

    fn request_id(&self, context: &MiddlewareContext) -> u64 {
        match &context.request_id {
            Some(id) => self.inner.id_hasher.hash_one(id.as_str()),
            None => context_address(context) as u64,
        }
    }

    pub(crate) fn pending_id_of(&self, request_id: &str) -> u64 {
        self.inner.id_hasher.hash_one(request_id)
    }

    /// Admission for a request: `Ok` with the call remembered, or the rejection.
    fn admit(&self, request: &JSONRPCRequest, context: &MiddlewareContext) -> pmcp::Result<()> {
        let inner = &*self.inner;
        let resolved = key_in_context(&inner.scope, request, context, &self.target);
        if let Some(missing) = resolved.missing
            && !inner.warned_fallback.swap(true, Ordering::Relaxed)
        {
            let part = match missing {
                MissingPart::ServerUrl => "server URL",
                MissingPart::SessionId => "session id",
            };
            tracing::warn!(
                scope = inner.scope.label(),
                key = resolved.key.as_str(),
                "circuit breaker: no {part} known for a request; such requests share the fallback key \
                 (bind one with `for_server`/`with_target` or context metadata)"
            );
        }
        let now = inner.clock.now();
        self.maybe_sweep(now);
        let policy = *inner.policy.read();
        let jitter = fastrand::f64();
        let ((admission, transition, mode), overflowed) =
            inner
                .registry
                .with(resolved.key.as_str(), now, Entry::default, |e| {
                    let (admission, transition) =
                        state::acquire(&mut e.state, &policy, now, jitter);
                    match admission {
                        Admission::Allowed { .. } if e.state.mode != BreakerMode::Disabled => {
                            e.in_flight = e.in_flight.saturating_add(1);
                        }
                        Admission::Allowed { .. } => {}
                        Admission::Rejected { .. } => e.rejections += 1,
                    }
                    (admission, transition, e.state.mode)
                });
        let key = if overflowed {
            ScopeKey::new(OVERFLOW_KEY)
        } else {
            resolved.key
        };
        if let Some(t) = transition {
            self.on_transition(&key, t);
        }
        if inner.metrics_config.enabled {
            CircuitBreakerMetrics::add(&inner.metrics.total_requests);
        }
        match admission {
            Admission::Rejected { retry_after } => {
                if inner.metrics_config.enabled {
                    CircuitBreakerMetrics::add(&inner.metrics.rejected_requests);
                }
                tracing::debug!(
                    key = key.as_str(),
                    ?retry_after,
                    "circuit breaker rejected a request"
                );
                Err(self.rejection(&key, retry_after))
            }
            Admission::Allowed { .. } if mode == BreakerMode::Disabled => Ok(()),
            Admission::Allowed { probe } => {
                let id = self.request_id(context);
                let pending = Pending {
                    context: context_address(context),
                    key,
                    start: now,
                    probe,
                };
                for abandoned in inner.pending.insert(id, pending, now) {
                    self.finish(abandoned, CallResult::Released, now);
                }
                Ok(())
            }
        }
    }

    fn rejection(&self, key: &ScopeKey, retry_after: Duration) -> pmcp::Error {
        if !self.inner.signal_client {
            return pmcp::Error::CircuitBreakerOpen;
        }
        let ms = u64::try_from(retry_after.as_millis()).unwrap_or(u64::MAX);
        pmcp::Error::Protocol {
            code: pmcp::ErrorCode::CIRCUIT_BREAKER_OPEN,
            message: format!("circuit breaker open for `{key}`; retry after {ms} ms"),
            data: Some(serde_json::json!({
                "retryAfterMs": ms,
                "scope": self.inner.scope.label(),
                "key": key.as_str(),
            })),
        }
    }

    /// Records the end of a pending call.
    fn finish(&self, pending: Pending, result: CallResult, now: Timestamp) {
        let inner = &*self.inner;
        let policy = *inner.policy.read();
        let elapsed = now.saturating_since(pending.start);
        let jitter = fastrand::f64();
        let (transition, _) = inner
            .registry
            .with(pending.key.as_str(), now, Entry::default, |e| {
                e.in_flight = e.in_flight.saturating_sub(1);
                match result {
                    CallResult::Success => e.successes += 1,
                    CallResult::Failure => e.failures += 1,
                    CallResult::Released => {}
                }
                state::record(
                    &mut e.state,
                    &policy,
                    now,
                    result,
                    elapsed,
                    pending.probe,
                    jitter,
                )
            });
        if inner.metrics_config.enabled {
            match result {
                CallResult::Success => {
                    CircuitBreakerMetrics::add(&inner.metrics.successful_requests)
                }
                CallResult::Failure => CircuitBreakerMetrics::add(&inner.metrics.failed_requests),
                CallResult::Released => {}
            }
        }
        if let Some(t) = transition {
            self.on_transition(&pending.key, t);
        }
    }

    fn classify(&self, outcome: &Outcome<'_>) -> CallResult {
        if self.inner.matcher.matches(outcome) {
            CallResult::Failure
        } else {
            CallResult::Success
        }
    }

    /// Reports that sending the request `request_id` failed with `error`.
    pub(crate) fn report_send_error(&self, request_id: &str, error: &pmcp::Error) {
        let id = self.pending_id_of(request_id);
        if let Some(pending) = self.inner.pending.take(id, None) {
            let result = self.classify(&outcome_of_error(error));
            self.finish(pending, result, self.inner.clock.now());
        }
    }

    fn on_transition(&self, key: &ScopeKey, t: Transition) {
        let inner = &*self.inner;
        CircuitBreakerMetrics::add(&inner.metrics.state_transitions);
        if inner.metrics_config.per_key {
            inner.metrics.set_state(key.as_str(), Some(t.to));
        }
        let (from, to, reason) = (t.from.label(), t.to.label(), t.reason.label());
        match t.to {
            CircuitState::Open => {
                tracing::info!(
                    key = key.as_str(),
                    from,
                    to,
                    reason,
                    "circuit breaker opened"
                )
            }
            CircuitState::Closed => {
                tracing::info!(
                    key = key.as_str(),
                    from,
                    to,
                    reason,
                    "circuit breaker closed"
                )
            }
            CircuitState::HalfOpen => {
                tracing::debug!(
                    key = key.as_str(),
                    from,
                    to,
                    reason,
                    "circuit breaker half-open"
                )
            }
        }
    }

    /// Sweeps idle keys about twice per idle period.
    fn maybe_sweep(&self, now: Timestamp) {
        let next = self.inner.next_sweep.load(Ordering::Relaxed);
        if now.as_nanos() < next {
            return;
        }
        let period = duration_nanos(self.inner.registry.limits().idle_after) / 2;
        let following = now.as_nanos().saturating_add(period.max(1));
        if self
            .inner
            .next_sweep
            .compare_exchange(next, following, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
            && next != 0
        {
            self.inner.registry.evict_idle(now);
        }
    }
}

/// The identity of a context while its request is in flight.
fn context_address(context: &MiddlewareContext) -> usize {
    Arc::as_ptr(&context.metadata) as *const u8 as usize
}

#[async_trait]
impl AdvancedMiddleware for CircuitBreakerMiddleware {
    fn name(&self) -> &'static str {
        "circuit_breaker"
    }

    fn priority(&self) -> MiddlewarePriority {
        MiddlewarePriority::High
    }

    async fn on_request_with_context(
        &self,
        request: &mut JSONRPCRequest,
        context: &MiddlewareContext,
    ) -> pmcp::Result<()> {
        self.admit(request, context)
    }

    async fn on_response_with_context(
        &self,
        response: &mut JSONRPCResponse,
        context: &MiddlewareContext,
    ) -> pmcp::Result<()> {
        let id = self.request_id(context);
        if let Some(pending) = self.inner.pending.take(id, Some(context_address(context))) {
            let outcome = outcome_of_response(response, self.inner.inspect_results);
            let result = self.classify(&outcome);
            self.finish(pending, result, self.inner.clock.now());
        }
        Ok(())
    }

    async fn on_error(
        &self,
        _error: &pmcp::Error,
        context: &MiddlewareContext,
    ) -> pmcp::Result<()> {
        // Errors seen here come from middlewares (this breaker's rejections
        // included), not from the server: free the call, count nothing.
        let id = self.request_id(context);
        if let Some(pending) = self.inner.pending.take(id, Some(context_address(context))) {
            self.finish(pending, CallResult::Released, self.inner.clock.now());
        }
        Ok(())
    }
}
