//! The rate limiter as a pmcp `AdvancedMiddleware`.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use pmcp::error::{Error, ErrorCode};
use pmcp::shared::{AdvancedMiddleware, MiddlewareContext, MiddlewarePriority};
use pmcp::types::JSONRPCRequest;
use serde_json::json;

use crate::clock::{SharedClock, Timestamp};
use crate::error::StoreError;
use crate::metrics::{MetricsConfig, StoreReport};
use crate::registry::RegistryLimits;
use crate::scope::{RequestTarget, Scope, ScopeKey, key_in_context};

use super::backpressure::BackpressureConfig;
use super::config::{RateLimitBuilder, RequestCost, pmcp_interval};
use super::limiter::{Admission, KeyedRateLimiter, RateLimiter};
use super::metrics::{Counters, RateLimitMetrics};
use super::strategy::{Decision, Policy};
use super::waiting::{Arrival, Turn, WaitGuard, WaitQueue};

/// A decision with its outcome, for callers that need the numbers
/// (the server layer's headers).
pub(crate) struct Verdict {
    /// The limiter's decision, when it got that far.
    #[cfg_attr(not(feature = "server"), allow(dead_code))]
    pub(crate) decision: Option<Decision>,
    /// What the middleware answers.
    pub(crate) result: pmcp::Result<()>,
}

impl Verdict {
    fn admitted(decision: Decision) -> Self {
        Verdict {
            decision: Some(decision),
            result: Ok(()),
        }
    }

    fn refused(decision: Option<Decision>, error: Error) -> Self {
        Verdict {
            decision,
            result: Err(error),
        }
    }
}

/// Where decisions are made.
pub(crate) enum Engine {
    /// The built-in limiter: synchronous, no boxed future per request.
    Memory(KeyedRateLimiter),
    /// A user's limiter, behind the async trait.
    Custom(Arc<dyn RateLimiter>),
}

struct Inner {
    name: String,
    scope: Scope,
    engine: Engine,
    cost: RequestCost,
    backpressure: BackpressureConfig,
    waiters: Arc<WaitQueue>,
    metrics: Counters,
    metrics_config: MetricsConfig,
    clock: SharedClock,
    warned_missing: AtomicBool,
}

/// Scoped rate limiting for pmcp clients and servers; a drop-in replacement
/// for `pmcp::shared::RateLimitMiddleware`.
///
/// A cheap handle: clones (and [`for_server`](Self::for_server),
/// [`with_target`](Self::with_target)) share the same limiters and metrics.
///
/// # When to come back
///
/// pmcp's `Error::RateLimited` carries no wait time. A caller learns it in
/// one of two ways:
/// - with [`BackpressureConfig::signal_client`], the rejection is
///   `Error::Protocol { code: -32005, message: "rate limit exceeded for <key>;
///   retry after N ms", data: {"retryAfterMs", "limit", "remaining",
///   "resetAtMs", "scope", "key", "header"} }` (`retryAfterMs` is `null` when
///   the request's cost exceeds the limit and no wait will help);
/// - in process, [`retry_after`](Self::retry_after) answers for a key.
///
/// ```
/// use pmcp::shared::{AdvancedMiddleware, MiddlewareContext};
/// use pmcp::types::{JSONRPCRequest, RequestId};
/// use pmcp_resilience::rate_limit::{BackpressureConfig, RateLimitMiddleware, RateLimitStrategy};
/// use pmcp_resilience::Scope;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let limiter = RateLimitMiddleware::builder()
///     .scope(Scope::PerTool)
///     .strategy(RateLimitStrategy::TokenBucket { capacity: 1, refill_rate: 2 })
///     .backpressure(BackpressureConfig::reject().with_client_signal())
///     .build()?;
/// let mut call = JSONRPCRequest {
///     jsonrpc: "2.0".into(),
///     method: "tools/call".into(),
///     params: Some(serde_json::json!({"name": "search", "arguments": {}})),
///     id: RequestId::from(1i64),
/// };
/// let context = MiddlewareContext::default();
/// limiter.on_request_with_context(&mut call, &context).await?;
/// match limiter.on_request_with_context(&mut call, &context).await {
///     Err(pmcp::Error::Protocol { code, data: Some(data), .. }) => {
///         assert_eq!(code, pmcp::ErrorCode::RATE_LIMITED);
///         assert_eq!(data["key"], "tool:search");
///         let retry_ms = data["retryAfterMs"].as_u64().unwrap_or(0);
///         assert!(retry_ms > 0 && retry_ms <= 500);
///     }
///     other => panic!("expected a rate-limit signal, got {other:?}"),
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct RateLimitMiddleware {
    inner: Arc<Inner>,
    target: RequestTarget,
}

impl fmt::Debug for RateLimitMiddleware {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimitMiddleware")
            .field("scope", &self.inner.scope)
            .field("backpressure", &self.inner.backpressure)
            .field("target", &self.target)
            .finish()
    }
}

impl RateLimitMiddleware {
    /// pmcp's constructor, with pmcp's meaning: one global bucket of
    /// `bucket_size` tokens, starting full, gaining `max_requests` tokens
    /// every `refill_duration`.
    ///
    /// Tokens come back one at a time, every `refill_duration / max_requests`
    /// (rounded down to whole nanoseconds), rather than `max_requests` at
    /// once at the end of each period: the same totals, without the steps.
    /// Rejections are `pmcp::Error::RateLimited`.
    pub fn new(max_requests: u32, bucket_size: u32, refill_duration: Duration) -> Self {
        let clock = crate::clock::default_clock();
        let policy = Policy::TokenBucket {
            capacity: bucket_size,
            interval: pmcp_interval(max_requests, bucket_size, refill_duration),
        };
        let engine = Engine::Memory(KeyedRateLimiter::from_policy(
            policy,
            "token_bucket",
            RegistryLimits::default(),
            Arc::clone(&clock),
        ));
        Self::from_parts(
            super::metrics::DEFAULT_REPORT_NAME.to_owned(),
            Scope::Global,
            engine,
            RequestCost::default(),
            BackpressureConfig::default(),
            super::backpressure::DEFAULT_MAX_WAITERS,
            MetricsConfig::default(),
            clock,
            RequestTarget::default(),
        )
    }

    /// A builder for every other setting.
    pub fn builder() -> RateLimitBuilder {
        RateLimitBuilder::default()
    }

    /// Writes the state file now (with [`StatePersistence::File`](crate::persistence::StatePersistence::File);
    /// nothing to do otherwise).
    pub async fn flush(&self) -> Result<(), StoreError> {
        match &self.inner.engine {
            Engine::Memory(limiter) => limiter.flush().await,
            Engine::Custom(_) => Ok(()),
        }
    }

    /// For an orderly exit: writes the state file a last time and releases
    /// it, so the next process (or middleware) can open it. Requests are
    /// still limited afterwards, in memory only. Nothing to do without file
    /// persistence.
    pub async fn shutdown(&self) -> Result<(), StoreError> {
        match &self.inner.engine {
            Engine::Memory(limiter) => limiter.shutdown().await,
            Engine::Custom(_) => Ok(()),
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn from_parts(
        name: String,
        scope: Scope,
        engine: Engine,
        cost: RequestCost,
        backpressure: BackpressureConfig,
        max_waiters: usize,
        metrics_config: MetricsConfig,
        clock: SharedClock,
        target: RequestTarget,
    ) -> Self {
        RateLimitMiddleware {
            inner: Arc::new(Inner {
                name,
                scope,
                engine,
                cost,
                backpressure,
                waiters: Arc::new(WaitQueue::new(max_waiters)),
                metrics: Counters::default(),
                metrics_config,
                clock,
                warned_missing: AtomicBool::new(false),
            }),
            target,
        }
    }

    /// The name this limiter reports under (set with
    /// [`RateLimitBuilder::name`](super::RateLimitBuilder::name);
    /// `rate_limit` by default).
    pub fn report_name(&self) -> &str {
        &self.inner.name
    }

    /// A handle for requests to the server at `url`, sharing state.
    pub fn for_server(&self, url: impl AsRef<str>) -> Self {
        self.with_target(self.target.clone().with_server_url(url))
    }

    /// A handle with another target (server URL, session source), sharing state.
    pub fn with_target(&self, target: RequestTarget) -> Self {
        RateLimitMiddleware {
            inner: Arc::clone(&self.inner),
            target,
        }
    }

    /// The scope.
    pub fn scope(&self) -> &Scope {
        &self.inner.scope
    }

    /// How long until a request of cost 1 for `key` would be admitted:
    /// `None` if it would be now. With a custom limiter this is always `None`.
    ///
    /// `key` is the key text of the limiter's scope, prefix included
    /// (`tool:search`, `session:abc`, `global`), as [`key_of`](Self::key_of)
    /// and [`key_of_tool`](Self::key_of_tool) build it; a bare `search` is no
    /// key (`None`, with a debug hint in the log).
    pub fn retry_after(&self, key: &str) -> Option<Duration> {
        crate::scope::hint_if_bare(key, &self.inner.scope);
        let Engine::Memory(limiter) = &self.inner.engine else {
            return None;
        };
        let now = self.inner.clock.now();
        let behind = self.inner.waiters.decide_behind(key, |ahead| {
            limiter.decide_behind(key, ahead, 1, now, Duration::MAX)
        });
        match behind {
            // Behind those waiting for the key.
            Some(decision) if decision.allowed => {
                (!decision.wait.is_zero()).then_some(decision.wait)
            }
            Some(decision) => Some(decision.retry_after.unwrap_or(Duration::MAX)),
            None => limiter.retry_after(key, 1),
        }
    }

    /// The request's key under this handle's scope and target.
    pub fn key_of(&self, request: &JSONRPCRequest) -> ScopeKey {
        self.inner.scope.key(request, &self.target)
    }

    /// The key a `tools/call` of `tool` gets under this handle's scope and
    /// target, to ask [`retry_after`](Self::retry_after) about it.
    ///
    /// ```
    /// use pmcp_resilience::{RateLimitMiddleware, Scope};
    ///
    /// let per_tool = RateLimitMiddleware::builder().scope(Scope::PerTool).build()?;
    /// assert_eq!(per_tool.key_of_tool("search").as_str(), "tool:search");
    /// assert_eq!(per_tool.retry_after(per_tool.key_of_tool("search").as_str()), None);
    /// # Ok::<(), pmcp_resilience::ConfigError>(())
    /// ```
    pub fn key_of_tool(&self, tool: &str) -> ScopeKey {
        self.inner.scope.key_of_tool(tool, &self.target)
    }

    /// The limiter now: its counters, the use of every key (sorted by key;
    /// none when `MetricsConfig::per_key` is off) and its store, as an
    /// owned copy.
    ///
    /// ```
    /// use pmcp_resilience::RateLimitMiddleware;
    ///
    /// let rl = RateLimitMiddleware::builder().build()?;
    /// let m = rl.metrics();
    /// assert_eq!(m.total_requests, m.allowed_requests + m.rejected_requests);
    /// # Ok::<(), pmcp_resilience::ConfigError>(())
    /// ```
    pub fn metrics(&self) -> RateLimitMetrics {
        let m = &self.inner.metrics;
        let read = Counters::read;
        let mut metrics = RateLimitMetrics::new(self.report_name(), self.inner.scope.label());
        metrics.total_requests = read(&m.total_requests);
        metrics.allowed_requests = read(&m.allowed_requests);
        metrics.rejected_requests = read(&m.rejected_requests);
        metrics.waited_requests = read(&m.waited_requests);
        metrics.wait_time = Duration::from_nanos(read(&m.wait_time_nanos));
        metrics.wait_histogram = m.wait_histogram.snapshot();
        if self.inner.metrics_config.per_key {
            metrics.keys = self.usage_rows();
            metrics.keys.sort_by(|a, b| a.key.cmp(&b.key));
        }
        metrics.registry = match &self.inner.engine {
            Engine::Memory(l) => l.registry_stats(),
            Engine::Custom(l) => l.stats(),
        };
        metrics.store = self.store_report();
        metrics
    }

    /// The same as [`metrics`](Self::metrics).
    #[deprecated(note = "use `metrics()`, which returns the same plain snapshot")]
    pub fn snapshot(&self) -> RateLimitMetrics {
        self.metrics()
    }

    /// Where this limiter's state lives and how that store is doing (kind
    /// `memory`, `file`, `redis` or `custom`; mode `normal` or the failure
    /// policy in force).
    pub fn store_report(&self) -> StoreReport {
        match &self.inner.engine {
            Engine::Memory(limiter) => RateLimiter::store_report(limiter),
            Engine::Custom(limiter) => limiter.store_report(),
        }
    }

    /// The time as this middleware's clock reads it.
    pub fn now(&self) -> Timestamp {
        self.inner.clock.now()
    }

    /// Requests waiting for capacity now.
    pub fn waiting(&self) -> usize {
        self.inner.waiters.len()
    }

    fn usage_rows(&self) -> Vec<super::limiter::KeyUsage> {
        let now = self.inner.clock.now();
        match &self.inner.engine {
            Engine::Memory(l) => l.usage_at(now),
            Engine::Custom(l) => l.usage(now),
        }
    }

    fn count(&self, counter: &std::sync::atomic::AtomicU64, n: u64) {
        if self.inner.metrics_config.enabled {
            Counters::add(counter, n);
        }
    }

    /// Decides on one request, waiting if the decision says so.
    async fn admit(
        &self,
        request: &JSONRPCRequest,
        context: &MiddlewareContext,
    ) -> pmcp::Result<()> {
        let inner = &*self.inner;
        let resolved = key_in_context(&inner.scope, request, context, &self.target);
        if let Some(missing) = resolved.missing
            && !inner.warned_missing.swap(true, Ordering::Relaxed)
        {
            tracing::warn!(
                ?missing,
                key = resolved.key.as_str(),
                "rate limit scope needs a part the request does not carry; \
                 such requests share one limiter"
            );
        }
        let key = resolved.key;
        let cost = inner.cost.of(request);
        self.admit_key(key, cost, request, context).await.result
    }

    /// Decides on `cost` units for `key`, waiting if the decision says so;
    /// returns the decision with the outcome (the server layer turns it into
    /// HTTP headers).
    pub(crate) async fn admit_key(
        &self,
        key: ScopeKey,
        cost: u32,
        request: &JSONRPCRequest,
        context: &MiddlewareContext,
    ) -> Verdict {
        let inner = &*self.inner;
        self.count(&inner.metrics.total_requests, 1);
        match &inner.engine {
            Engine::Memory(limiter) => {
                self.admit_in_memory(limiter, key, cost, request, context)
                    .await
            }
            Engine::Custom(limiter) => {
                self.admit_reserving(limiter, key, cost, request, context)
                    .await
            }
        }
    }

    /// The built-in limiter: requests that must wait queue per key (see
    /// [`WaitQueue`]); nothing is taken from the limiter before a request is
    /// admitted.
    async fn admit_in_memory(
        &self,
        limiter: &KeyedRateLimiter,
        key: ScopeKey,
        cost: u32,
        request: &JSONRPCRequest,
        context: &MiddlewareContext,
    ) -> Verdict {
        let inner = &*self.inner;
        let arrived = inner.clock.now();
        // The leaky bucket delays what it admits whatever the settings.
        let may_wait = inner.backpressure.wait_for_capacity
            || matches!(limiter.policy(), Policy::LeakyBucket { .. });
        if !may_wait {
            let decision = limiter.check_key_at(key.as_str(), cost, arrived);
            return self.answer(&key, decision, request, context);
        }
        if inner.waiters.is_empty() {
            let decision = limiter.admit_now(key.as_str(), cost, arrived);
            if decision.allowed && decision.wait.is_zero() {
                return self.answer(&key, decision, request, context);
            }
        }
        let budget = inner.backpressure.wait_budget();
        let arrival = inner.waiters.arrive(
            &key,
            cost,
            || limiter.admit_now(key.as_str(), cost, arrived),
            |ahead| limiter.decide_behind(key.as_str(), ahead, cost, arrived, budget),
        );
        let mut ticket = match arrival {
            Arrival::Admitted(decision) => return self.answer(&key, decision, request, context),
            Arrival::Rejected { decision, full } => {
                if full {
                    tracing::debug!(key = key.as_str(), "too many requests waiting for capacity");
                }
                limiter.count_rejection(key.as_str());
                let error = self.reject(&key, &decision, request, context);
                return Verdict::refused(Some(decision), error);
            }
            Arrival::Queued(ticket) => ticket,
        };
        let waiting_since = tokio::time::Instant::now();
        let mut decision = loop {
            let now = inner.clock.now();
            match ticket.turn(now, |at| limiter.admit_now(key.as_str(), cost, at)) {
                Turn::NotYet => ticket.woken().await,
                Turn::Sleep(wait) => tokio::time::sleep(wait).await,
                Turn::Admitted(decision) => break decision,
            }
        };
        decision.wait = waiting_since.elapsed();
        self.waited(decision.wait, context);
        Verdict::admitted(decision)
    }

    /// A custom or shared-store limiter: a request that must wait reserves
    /// its slot in the limiter at once and sleeps until it; if it gives up,
    /// the limiter's [`cancel`](RateLimiter::cancel) gives the slot back
    /// when the store can (see [`Reservation`](super::Reservation)).
    async fn admit_reserving(
        &self,
        limiter: &Arc<dyn RateLimiter>,
        key: ScopeKey,
        cost: u32,
        request: &JSONRPCRequest,
        context: &MiddlewareContext,
    ) -> Verdict {
        let inner = &*self.inner;
        let now = inner.clock.now();
        let budget = inner.backpressure.wait_budget();
        let admission = match limiter.acquire(&key, cost, now, budget).await {
            Ok(admission) => admission,
            Err(e) => {
                self.count(&inner.metrics.rejected_requests, 1);
                crate::metrics::mark_method(context, &request.method);
                return Verdict::refused(
                    None,
                    Error::protocol(
                        ErrorCode::INTERNAL_ERROR,
                        format!("rate limiter store failed for {key}: {e}"),
                    ),
                );
            }
        };
        let Admission {
            decision,
            reservation,
        } = admission;
        if !decision.allowed || decision.wait.is_zero() {
            return self.answer(&key, decision, request, context);
        }
        let refund = {
            let this = self.clone();
            let key = key.clone();
            move || {
                if let Some(reservation) = reservation {
                    this.cancel(&key, reservation);
                }
            }
        };
        let Some(place) = inner.waiters.enter() else {
            refund();
            let mut full = decision;
            full.allowed = false;
            full.retry_after = Some(decision.wait);
            tracing::debug!(key = key.as_str(), "too many requests waiting for capacity");
            let error = self.reject(&key, &full, request, context);
            return Verdict::refused(Some(full), error);
        };
        let guard = WaitGuard::new(place, refund);
        tokio::time::sleep(decision.wait).await;
        guard.complete();
        self.waited(decision.wait, context);
        Verdict::admitted(decision)
    }

    /// The verdict on a decision taken without waiting.
    fn answer(
        &self,
        key: &ScopeKey,
        decision: Decision,
        request: &JSONRPCRequest,
        context: &MiddlewareContext,
    ) -> Verdict {
        if decision.allowed {
            self.count(&self.inner.metrics.allowed_requests, 1);
            context.record_metric("rate_limit_passed".to_string(), 1.0);
            Verdict::admitted(decision)
        } else {
            let error = self.reject(key, &decision, request, context);
            Verdict::refused(Some(decision), error)
        }
    }

    /// Counts a request admitted after waiting `wait`.
    fn waited(&self, wait: Duration, context: &MiddlewareContext) {
        let inner = &*self.inner;
        self.count(&inner.metrics.allowed_requests, 1);
        self.count(&inner.metrics.waited_requests, 1);
        self.count(
            &inner.metrics.wait_time_nanos,
            crate::clock::duration_nanos(wait),
        );
        if inner.metrics_config.enabled {
            inner.metrics.wait_histogram.record(wait);
        }
        context.record_metric("rate_limit_waited_ms".to_string(), wait.as_secs_f64() * 1e3);
    }

    /// The cost of `request` in units.
    #[cfg(feature = "server")]
    pub(crate) fn cost_of(&self, request: &JSONRPCRequest) -> u32 {
        self.inner.cost.of(request)
    }

    /// The backpressure settings.
    #[cfg(feature = "server")]
    pub(crate) fn backpressure(&self) -> &BackpressureConfig {
        &self.inner.backpressure
    }

    /// The time over which the limit applies (a window, or the time to
    /// refill from empty); `None` for a custom limiter.
    #[cfg(feature = "server")]
    pub(crate) fn window(&self) -> Option<Duration> {
        match &self.inner.engine {
            Engine::Memory(limiter) => Some(Duration::from_nanos(match limiter.policy() {
                Policy::FixedWindow { window, .. } | Policy::SlidingWindow { window, .. } => window,
                Policy::TokenBucket { capacity, interval }
                | Policy::LeakyBucket { capacity, interval } => {
                    u64::from(capacity).saturating_mul(interval)
                }
            })),
            Engine::Custom(_) => None,
        }
    }

    /// Gives back a reservation whose request stopped waiting.
    fn cancel(&self, key: &ScopeKey, reservation: super::strategy::Reservation) {
        let now = self.inner.clock.now();
        match &self.inner.engine {
            Engine::Memory(limiter) => {
                limiter.cancel_at(key.as_str(), &reservation, now);
            }
            Engine::Custom(limiter) => {
                // Drop cannot await: hand the refund to the runtime if there is one.
                if let Ok(handle) = tokio::runtime::Handle::try_current() {
                    let limiter = Arc::clone(limiter);
                    let key = key.clone();
                    handle.spawn(async move {
                        if let Err(e) = limiter.cancel(&key, &reservation, now).await {
                            tracing::warn!(key = key.as_str(), error = %e, "could not give back a rate-limit reservation");
                        }
                    });
                }
            }
        }
    }

    fn reject(
        &self,
        key: &ScopeKey,
        decision: &Decision,
        request: &JSONRPCRequest,
        context: &MiddlewareContext,
    ) -> Error {
        let inner = &*self.inner;
        self.count(&inner.metrics.rejected_requests, 1);
        crate::metrics::mark_method(context, &request.method);
        context.record_metric("rate_limit_exceeded".to_string(), 1.0);
        tracing::debug!(key = key.as_str(), method = %request.method, "rate limit exceeded");
        if !inner.backpressure.signal_client {
            return Error::RateLimited;
        }
        let retry_ms = decision.retry_after.map(crate::clock::ceil_millis);
        let message = match retry_ms {
            Some(ms) => format!("rate limit exceeded for {key}; retry after {ms} ms"),
            None => format!(
                "rate limit exceeded for {key}: this request costs more than the limit of {} and can never be admitted",
                decision.limit
            ),
        };
        Error::Protocol {
            code: ErrorCode::RATE_LIMITED,
            message,
            data: Some(json!({
                "retryAfterMs": retry_ms,
                "limit": decision.limit,
                "remaining": decision.remaining,
                "resetAtMs": decision.reset_at.as_millis(),
                "scope": inner.scope.label(),
                "key": key.as_str(),
                "header": inner.backpressure.backpressure_header,
            })),
        }
    }
}

#[async_trait]
impl AdvancedMiddleware for RateLimitMiddleware {
    fn name(&self) -> &'static str {
        "rate_limit"
    }

    fn priority(&self) -> MiddlewarePriority {
        MiddlewarePriority::High
    }

    crate::hooks::chain_hooks!();

    async fn on_request_with_context(
        &self,
        request: &mut JSONRPCRequest,
        context: &MiddlewareContext,
    ) -> pmcp::Result<()> {
        self.admit(request, context).await
    }

    // The limiter does not look at answers: say so without pmcp's default,
    // which allocates two futures per response.
    fn on_response_with_context<'life0, 'life1, 'life2, 'async_trait>(
        &'life0 self,
        _response: &'life1 mut pmcp::types::JSONRPCResponse,
        _context: &'life2 MiddlewareContext,
    ) -> crate::hooks::BoxFuture<'async_trait, pmcp::Result<()>>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        'life2: 'async_trait,
        Self: 'async_trait,
    {
        crate::hooks::finished(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use pmcp::types::RequestId;

    fn pmcp_like(
        max_requests: u32,
        bucket_size: u32,
        every: Duration,
    ) -> (RateLimitMiddleware, ManualClock) {
        let clock = ManualClock::new();
        let shared: SharedClock = Arc::new(clock.clone());
        let policy = Policy::TokenBucket {
            capacity: bucket_size,
            interval: pmcp_interval(max_requests, bucket_size, every),
        };
        let engine = Engine::Memory(KeyedRateLimiter::from_policy(
            policy,
            "token_bucket",
            RegistryLimits::default(),
            Arc::clone(&shared),
        ));
        let rl = RateLimitMiddleware::from_parts(
            crate::rate_limit::metrics::DEFAULT_REPORT_NAME.to_owned(),
            Scope::Global,
            engine,
            RequestCost::default(),
            BackpressureConfig::default(),
            1,
            MetricsConfig::default(),
            shared,
            RequestTarget::default(),
        );
        (rl, clock)
    }

    async fn admitted(rl: &RateLimitMiddleware, n: usize) -> usize {
        let mut ok = 0;
        for _ in 0..n {
            let mut r = JSONRPCRequest {
                jsonrpc: "2.0".into(),
                method: "ping".into(),
                params: None,
                id: RequestId::from(1i64),
            };
            if rl
                .on_request_with_context(&mut r, &MiddlewareContext::default())
                .await
                .is_ok()
            {
                ok += 1;
            }
        }
        ok
    }

    #[tokio::test]
    async fn new_refills_max_requests_per_refill_duration() {
        let (rl, clock) = pmcp_like(2, 3, Duration::from_secs(1));
        assert_eq!(admitted(&rl, 10).await, 3, "a full bucket of 3");
        clock.advance(Duration::from_secs(1));
        assert_eq!(admitted(&rl, 10).await, 2, "2 tokens per second");
        clock.advance(Duration::from_secs(10));
        assert_eq!(admitted(&rl, 10).await, 3, "never more than the bucket");
    }

    #[tokio::test]
    async fn new_with_zero_max_requests_never_refills() {
        let (rl, clock) = pmcp_like(0, 3, Duration::from_secs(1));
        assert_eq!(admitted(&rl, 10).await, 3);
        clock.advance(Duration::from_secs(86_400 * 365));
        assert_eq!(admitted(&rl, 10).await, 0);
    }
}
