//! The middleware's builder, its validation, and request costs.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use pmcp::types::JSONRPCRequest;

use crate::clock::{SharedClock, default_clock};
use crate::error::ConfigError;
use crate::metrics::MetricsConfig;
use crate::persistence::{FileStoreOptions, StatePersistence};
use crate::registry::RegistryLimits;
use crate::scope::{RequestTarget, Scope, tool_name};

use super::backpressure::{BackpressureConfig, DEFAULT_MAX_WAITERS};
use super::keyed::KeyedRateLimiter;
use super::limiter::RateLimiter;
use super::middleware::{Engine, RateLimitMiddleware};
use super::strategy::{LimiterState, RateLimitStrategy};

/// A function giving the cost of a request in units.
///
/// ```
/// use pmcp::types::JSONRPCRequest;
/// use pmcp_resilience::rate_limit::CostFn;
/// use pmcp_resilience::RateLimitMiddleware;
/// use std::sync::Arc;
///
/// // A request costs one unit per item of its `items` parameter (at least one).
/// let per_item: CostFn = Arc::new(|request: &JSONRPCRequest| {
///     let items = request.params.as_ref().and_then(|p| p["items"].as_array()).map_or(0, Vec::len);
///     u32::try_from(items).unwrap_or(u32::MAX).max(1)
/// });
/// let batch = JSONRPCRequest {
///     jsonrpc: "2.0".into(),
///     method: "batch/put".into(),
///     params: Some(serde_json::json!({"items": [1, 2, 3]})),
///     id: 1i64.into(),
/// };
/// assert_eq!(per_item(&batch), 3);
/// let limiter = RateLimitMiddleware::builder().cost_fn(per_item).build();
/// assert!(limiter.is_ok());
/// ```
pub type CostFn = Arc<dyn Fn(&JSONRPCRequest) -> u32 + Send + Sync>;

/// How many units a request costs.
///
/// A per-tool cost (for `tools/call`) wins, then a per-method cost, then the
/// cost function, then 1. A cost of 0 makes a request free. A cost above the
/// limit is rejected at once with a clear reason (it could never pass).
#[derive(Clone, Default)]
pub(crate) struct RequestCost {
    by_method: HashMap<String, u32>,
    by_tool: HashMap<String, u32>,
    function: Option<CostFn>,
}

impl fmt::Debug for RequestCost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequestCost")
            .field("by_method", &self.by_method)
            .field("by_tool", &self.by_tool)
            .field("function", &self.function.as_ref().map(|_| ".."))
            .finish()
    }
}

impl RequestCost {
    /// The cost of `request`.
    #[inline]
    pub fn of(&self, request: &JSONRPCRequest) -> u32 {
        if !self.by_tool.is_empty()
            && let Some(cost) = tool_name(request).and_then(|t| self.by_tool.get(t))
        {
            return *cost;
        }
        if !self.by_method.is_empty()
            && let Some(cost) = self.by_method.get(request.method.as_str())
        {
            return *cost;
        }
        match &self.function {
            Some(f) => f(request),
            None => 1,
        }
    }

    /// The largest configured fixed cost, to check against the limit.
    fn largest(&self) -> Option<(String, u32)> {
        let methods = self
            .by_method
            .iter()
            .map(|(m, c)| (format!("method `{m}`"), *c));
        let tools = self
            .by_tool
            .iter()
            .map(|(t, c)| (format!("tool `{t}`"), *c));
        methods.chain(tools).max_by_key(|(_, c)| *c)
    }
}

/// Builds a [`RateLimitMiddleware`]; see the [module docs](super).
/// `build` checks every setting and names the one it refuses.
///
/// ```
/// use pmcp_resilience::rate_limit::{RateLimitMiddleware, RateLimitStrategy};
/// use pmcp_resilience::Scope;
///
/// // Ten units per second per tool, a burst of twenty; a search costs five.
/// let limiter = RateLimitMiddleware::builder()
///     .scope(Scope::PerTool)
///     .strategy(RateLimitStrategy::TokenBucket { capacity: 20, refill_rate: 10 })
///     .cost_for_tool("search", 5)
///     .build()
///     .expect("valid settings");
/// assert_eq!(limiter.scope().label(), "tool");
/// assert_eq!(limiter.retry_after("tool:search"), None); // nothing refused yet
///
/// // A bucket that refills nothing is refused at build, not at the first call.
/// let refused = RateLimitMiddleware::builder()
///     .strategy(RateLimitStrategy::TokenBucket { capacity: 20, refill_rate: 0 })
///     .build();
/// assert!(refused.is_err());
/// ```
#[derive(Debug)]
pub struct RateLimitBuilder {
    name: String,
    scope: Scope,
    strategy: RateLimitStrategy,
    persistence: StatePersistence,
    backpressure: BackpressureConfig,
    max_waiters: usize,
    metrics_config: MetricsConfig,
    cost: RequestCost,
    registry_limits: RegistryLimits,
    clock: Option<SharedClock>,
    target: RequestTarget,
    limiter: Option<Arc<dyn RateLimiter>>,
    file_options: FileStoreOptions<LimiterState>,
    #[cfg(feature = "redis")]
    redis_options: crate::persistence::RedisOptions,
}

impl Default for RateLimitBuilder {
    fn default() -> Self {
        RateLimitBuilder {
            name: super::metrics::DEFAULT_REPORT_NAME.to_owned(),
            scope: Scope::Global,
            strategy: RateLimitStrategy::TokenBucket {
                capacity: 100,
                refill_rate: 10,
            },
            persistence: StatePersistence::Memory,
            backpressure: BackpressureConfig::default(),
            max_waiters: DEFAULT_MAX_WAITERS,
            metrics_config: MetricsConfig::default(),
            cost: RequestCost::default(),
            registry_limits: RegistryLimits::default(),
            clock: None,
            target: RequestTarget::default(),
            limiter: None,
            file_options: FileStoreOptions::default(),
            #[cfg(feature = "redis")]
            redis_options: crate::persistence::RedisOptions::default(),
        }
    }
}

impl RateLimitBuilder {
    /// The name this limiter reports under: the `name` label of its
    /// Prometheus series and its name in the JSON snapshot (default
    /// `rate_limit`). Give each limiter registered with one
    /// `MetricsMiddleware` its own name; unnamed ones are told apart there
    /// as `rate_limit`, `rate_limit_2`, ... in registration order.
    ///
    /// ```
    /// use pmcp_resilience::observe::ReportSource;
    /// use pmcp_resilience::rate_limit::RateLimitMiddleware;
    ///
    /// let rl = RateLimitMiddleware::builder().name("echo-quota").build()?;
    /// assert_eq!(rl.report().name(), "echo-quota");
    /// # Ok::<(), pmcp_resilience::ConfigError>(())
    /// ```
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// How requests are grouped into limiters (default [`Scope::Global`]).
    pub fn scope(mut self, scope: Scope) -> Self {
        self.scope = scope;
        self
    }

    /// The algorithm and its numbers (default: a token bucket of 100,
    /// refilled at 10 per second).
    pub fn strategy(mut self, strategy: RateLimitStrategy) -> Self {
        self.strategy = strategy;
        self
    }

    /// Where state lives (default [`StatePersistence::Memory`]).
    ///
    /// With [`StatePersistence::File`], `build()` must run inside a Tokio
    /// runtime; it loads the file (keys back at full capacity are dropped)
    /// and the state is written at most every
    /// [`file_options`](Self::file_options)' flush interval, which is the
    /// most a crash loses, and on
    /// [`RateLimitMiddleware::shutdown`] (and, best effort, on drop).
    /// [`StatePersistence::Custom`] holds a breaker store: `build()` refuses
    /// it with [`ConfigError::UnsupportedPersistence`]; for a limiter of your
    /// own use [`limiter`](Self::limiter).
    pub fn persistence(mut self, persistence: StatePersistence) -> Self {
        self.persistence = persistence;
        self
    }

    /// Wait or reject when there is no capacity (default: reject).
    pub fn backpressure(mut self, backpressure: BackpressureConfig) -> Self {
        self.backpressure = backpressure;
        self
    }

    /// The most requests waiting at once (default 1024); more are rejected.
    pub fn max_waiters(mut self, max_waiters: usize) -> Self {
        self.max_waiters = max_waiters;
        self
    }

    /// What metrics to keep.
    pub fn metrics_config(mut self, metrics_config: MetricsConfig) -> Self {
        self.metrics_config = metrics_config;
        self
    }

    /// Requests of `method` cost `cost` units.
    pub fn cost_for_method(mut self, method: impl Into<String>, cost: u32) -> Self {
        self.cost.by_method.insert(method.into(), cost);
        self
    }

    /// `tools/call` requests for `tool` cost `cost` units.
    pub fn cost_for_tool(mut self, tool: impl Into<String>, cost: u32) -> Self {
        self.cost.by_tool.insert(tool.into(), cost);
        self
    }

    /// Requests without a per-tool or per-method cost cost what `f` returns.
    pub fn cost_fn(mut self, f: CostFn) -> Self {
        self.cost.function = Some(f);
        self
    }

    /// Bounds on the number of keys kept.
    pub fn registry_limits(mut self, limits: RegistryLimits) -> Self {
        self.registry_limits = limits;
        self
    }

    /// The clock (default: [`SystemClock`](crate::SystemClock); in tests,
    /// [`ManualClock`](crate::ManualClock) or
    /// [`TokioClock`](crate::clock::TokioClock)).
    pub fn clock(mut self, clock: SharedClock) -> Self {
        self.clock = Some(clock);
        self
    }

    /// The server URL and session source used for `PerServer`,
    /// `PerEndpoint` and `PerSession` keys.
    pub fn target(mut self, target: RequestTarget) -> Self {
        self.target = target;
        self
    }

    /// Shorthand for a target with this server URL.
    pub fn server_url(mut self, url: impl AsRef<str>) -> Self {
        self.target = self.target.with_server_url(url);
        self
    }

    /// Settings of the state file for [`StatePersistence::File`]: flush
    /// interval (default 1 s) and what to do with an unreadable file
    /// (default: set it aside and start empty). The clock and the expiry
    /// rule are the limiter's own.
    pub fn file_options(mut self, options: FileStoreOptions<LimiterState>) -> Self {
        self.file_options = options;
        self
    }

    /// Settings of the Redis limiter for `StatePersistence::Redis`: call
    /// timeout, failure policy (fail open, fail closed, or a local in-memory
    /// limiter while Redis is down), denial cache. The key prefix comes from
    /// the persistence itself.
    #[cfg(feature = "redis")]
    #[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
    pub fn redis_options(mut self, options: crate::persistence::RedisOptions) -> Self {
        self.redis_options = options;
        self
    }

    /// Use your own limiter instead of the built-in one (the strategy and
    /// persistence settings are then not used).
    pub fn limiter(mut self, limiter: Arc<dyn RateLimiter>) -> Self {
        self.limiter = Some(limiter);
        self
    }

    /// Checks every setting and builds the middleware.
    pub fn build(self) -> Result<RateLimitMiddleware, ConfigError> {
        self.backpressure.validate()?;
        if self.backpressure.wait_for_capacity && self.max_waiters == 0 {
            return Err(ConfigError::invalid(
                "max_waiters",
                "must be at least 1 when wait_for_capacity is on",
            ));
        }
        if self.scope.needs_server_url() && self.target.server_url().is_none() {
            tracing::debug!(
                "rate limit scope `{}` has no bound server URL; it will come from context \
                 metadata, or requests share the `unknown-server` limiter \
                 (bind one with `server_url(..)` or `for_server(..)`)",
                self.scope.label()
            );
        }
        if self.scope.needs_session() && self.target.session_id().is_none() {
            tracing::debug!(
                "rate limit scope `session` has no session source yet; it will come from \
                 context metadata, or requests share the `no-session` limiter"
            );
        }
        // Refused even beside `limiter(..)`: a breaker's store given to a
        // limiter is a mistake whichever way the limiter is built.
        if let StatePersistence::Custom(_) = &self.persistence {
            return Err(ConfigError::UnsupportedPersistence(
                "StatePersistence::Custom holds a circuit breaker's state store, which cannot \
                 keep a rate limiter's state; give the limiter a limiter of your own with \
                 `RateLimitMiddleware::builder().limiter(..)`, or choose Memory, File or Redis \
                 persistence"
                    .into(),
            ));
        }
        let clock = self.clock.unwrap_or_else(default_clock);
        let engine = match self.limiter {
            Some(limiter) => Engine::Custom(limiter),
            None => 'engine: {
                // A shared store is a limiter of its own, behind the trait.
                let persistence = self.persistence;
                let file = match &persistence {
                    StatePersistence::Memory => None,
                    StatePersistence::File(path) => Some(path.clone()),
                    #[cfg(feature = "redis")]
                    StatePersistence::Redis { .. } => None,
                    #[cfg(feature = "redis-cluster")]
                    StatePersistence::RedisCluster { .. } => None,
                    // Refused above.
                    StatePersistence::Custom(_) => None,
                };
                let policy = self.strategy.policy()?;
                self.registry_limits.validate()?;
                if let Some((what, cost)) = self.cost.largest()
                    && cost > policy.limit()
                {
                    return Err(ConfigError::invalid(
                        "cost",
                        format!(
                            "{what} costs {cost}, more than the limit of {}; \
                             such requests could never pass",
                            policy.limit()
                        ),
                    ));
                }
                if let Some(limiter) = crate::persistence::rate_limiter(
                    &persistence,
                    self.strategy,
                    #[cfg(feature = "redis")]
                    self.redis_options,
                    self.registry_limits,
                )? {
                    break 'engine Engine::Custom(limiter);
                }
                let mut limiter = KeyedRateLimiter::from_policy(
                    policy,
                    self.strategy.label(),
                    self.registry_limits,
                    Arc::clone(&clock),
                );
                if let Some(path) = file {
                    let report = limiter.attach_file(&path, self.file_options)?;
                    tracing::info!(
                        path = %path.display(),
                        loaded = report.loaded,
                        expired = report.expired,
                        "rate limiter state loaded"
                    );
                }
                Engine::Memory(limiter)
            }
        };
        Ok(RateLimitMiddleware::from_parts(
            self.name,
            self.scope,
            engine,
            self.cost,
            self.backpressure,
            self.max_waiters,
            self.metrics_config,
            clock,
            self.target,
        ))
    }
}

/// The token-bucket interval for pmcp's `new(max_requests, bucket_size,
/// refill_duration)`: `refill_duration / max_requests`, rounded down to whole
/// nanoseconds (at least 1 ns). It is capped so that `bucket_size * interval`
/// stays far from overflow: `max_requests == 0` (never refill, in pmcp) then
/// means a refill interval of decades.
pub(crate) fn pmcp_interval(max_requests: u32, bucket_size: u32, refill_duration: Duration) -> u64 {
    let cap = u64::MAX / 4 / (u64::from(bucket_size) + 1);
    if max_requests == 0 {
        return cap;
    }
    (crate::clock::duration_nanos(refill_duration) / u64::from(max_requests)).clamp(1, cap)
}
