//! The rate limiter as a pmcp `AdvancedMiddleware`.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use async_trait::async_trait;
use pmcp::error::Error;
use pmcp::shared::{AdvancedMiddleware, MiddlewareContext, MiddlewarePriority};
use pmcp::types::JSONRPCRequest;

use crate::clock::{SharedClock, Timestamp};
use crate::error::StoreError;
use crate::metrics::{MetricsConfig, StoreReport};
use crate::registry::RegistryLimits;
use crate::scope::{RequestTarget, Scope, ScopeKey};

use super::backpressure::BackpressureConfig;
use super::config::{RateLimitBuilder, RequestCost, pmcp_interval};
use super::keyed::KeyedRateLimiter;
use super::limiter::{Admission, RateLimiter};
use super::metrics::{Counters, RateLimitMetrics};
use super::strategy::{Decision, Policy};
use super::waiting::{Arrival, Turn, WaitGuard, WaitQueue};

mod admission;
#[cfg(test)]
mod tests;

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
