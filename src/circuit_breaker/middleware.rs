//! The breaker as a pmcp `AdvancedMiddleware`, and the handle users hold.
//!
//! ```
//! use pmcp_resilience::{CircuitBreakerMiddleware, Scope};
//! use pmcp::shared::AdvancedMiddleware;
//!
//! let cb = CircuitBreakerMiddleware::builder()
//!     .scope(Scope::PerTool)
//!     .build()
//!     .expect("valid settings");
//! assert_eq!(cb.name(), "circuit_breaker");
//! assert_eq!(cb.state_of("tool:search"), None); // no call seen yet
//! ```
//!
//! `on_request_with_context` resolves the request's key and admits the call
//! (or refuses it), filing it under the identity of its `MiddlewareContext`
//! (the context pmcp hands to both hooks).
//! `on_response_with_context` judges the answer (failure and neutral
//! matchers) and ends the call. `on_error` ends it as neutral: the error was
//! raised by a middleware (this one or a sibling), never by the server.
//! Transport failures and HTTP statuses arrive through
//! [`super::transport::ObservedTransport`].

use std::collections::BTreeMap;
use std::hash::BuildHasher;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use pmcp::shared::{AdvancedMiddleware, MiddlewareContext, MiddlewarePriority};
use pmcp::types::{JSONRPCRequest, JSONRPCResponse};

use super::calls::CallId;
use super::config::{CircuitBreakerBuilder, CircuitBreakerConfig};
use super::core::{Core, CoreSettings};
use super::matcher::{outcome_of_error, outcome_of_response};
use super::permit::{Permit, Rejected};
use super::persist::{Backend, Opened};
use super::state::{self, Verdict};
use super::transport::ObservedTransport;
use crate::clock::SharedClock;
use crate::error::StoreError;
use crate::scope::{MissingPart, RequestTarget, Scope, ScopeKey, key_in_context};

/// A scoped circuit breaker for pmcp: a cheap handle (clones share all state).
///
/// A drop-in replacement for `pmcp::shared::CircuitBreakerMiddleware`:
/// install it with `ClientBuilder::with_middleware(Arc::new(cb))`.
///
/// # State that survives restarts ([`StatePersistence::File`](crate::persistence::StatePersistence::File))
///
/// - On build, the file's states are loaded. A breaker that was open stays
///   open until its open time is over; one whose open time has passed, and a
///   closed one with no failures counted, are dropped (the key starts fresh
///   and closed). Probes in flight in the old process are forgotten, so a
///   half-open breaker admits new probes at once. Operator modes
///   ([`force_open`](Self::force_open), ...) are kept.
/// - A transition is on disk before the request or response hook that
///   caused it returns (a write-through, awaited). A transition found by a
///   transport failure ([`ObservedTransport`]) or a mode change is written
///   by a background task right away. Other changes (failure counts of a
///   closed breaker) reach the file within the flush interval (default
///   1 s): that is the most a crash loses.
/// - [`shutdown`](Self::shutdown) writes everything and releases the file;
///   dropping the last handle does the same, best effort.
/// - The file is for one breaker at a time (an OS lock): a second build on
///   it fails with [`ConfigError::Store`](crate::ConfigError::Store).
///
/// # A shared store ([`StatePersistence::Custom`](crate::persistence::StatePersistence::Custom))
///
/// Every admission and every outcome is one call to the store's `acquire`
/// or `record`, so breakers (in one process or many) sharing the store share
/// their state. The per-key counters and the state shown by
/// [`state_of`](Self::state_of) are this process's view: the state the store
/// last reported. When the store fails, that view decides (an open breaker
/// stays open until its open time ends, then admits this process's own
/// probes); the first failure is logged as a warning and each is counted in
/// [`store_errors`](Self::store_errors).
///
/// # Calls, permits and deadlines
///
/// Every admitted call ends exactly once, as a success, a failure, neutral
/// (the caller's mistake, a sibling middleware's refusal, a caller that went
/// away) or timed out. In pmcp's chain, the breaker files each call under
/// the identity of its `MiddlewareContext` (where the context's metadata
/// map lives and when the context was made; pmcp hands the same context to
/// `on_request` and `on_response`), never under the JSON-RPC id, so clients
/// that reuse ids never end each other's calls. A context used for a second
/// call before the first is answered leaves the first to its deadline. A call with
/// no answer within [`call_timeout`](super::CircuitBreakerBuilder::call_timeout)
/// (default 30 s) ends as timed out (a failure) at the next admission or
/// metrics read after its deadline, whatever became of its caller: a server
/// that hangs trips the breaker. Code outside pmcp's chain uses
/// [`acquire`](Self::acquire) and a [`Permit`].
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
    pub(super) core: Arc<Core>,
    shared: Arc<Shared>,
    target: RequestTarget,
}

/// What the handles of one breaker share besides the core.
struct Shared {
    name: String,
    signal_client: bool,
    warned_fallback: AtomicBool,
    id_hasher: foldhash::fast::FixedState,
}

impl std::fmt::Debug for CircuitBreakerMiddleware {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CircuitBreakerMiddleware")
            .field("scope", &self.core.scope)
            .field("policy", &self.core.policy())
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
        let opened = Opened {
            backend: Backend::Memory,
            loaded: BTreeMap::new(),
        };
        Self::from_backend(
            config,
            crate::clock::default_clock(),
            RequestTarget::default(),
            opened,
        )
    }

    /// A builder with the defaults (global scope, 5 consecutive failures, 30 s open).
    pub fn builder() -> CircuitBreakerBuilder {
        CircuitBreakerBuilder::default()
    }

    pub(crate) fn from_backend(
        config: CircuitBreakerConfig,
        clock: SharedClock,
        target: RequestTarget,
        opened: Opened,
    ) -> Self {
        let core = Arc::new(Core::new(CoreSettings {
            scope: config.scope,
            failures: config.trigger_errors,
            neutral: config.neutral_errors,
            policy: config.policy,
            call_timeout: config.call_timeout,
            registry_limits: config.registry_limits,
            metrics_config: config.metrics_config,
            clock,
            backend: opened.backend,
            on_transition: config.on_transition,
        }));
        core.load(opened.loaded);
        if let Backend::File(file) = &core.backend {
            let weak = Arc::downgrade(&core);
            file.start(Box::new(move || {
                let core = weak.upgrade()?;
                Some(core.file_snapshot(core.clock.now()))
            }));
        }
        let shared = Arc::new(Shared {
            name: config.name,
            signal_client: config.signal_client,
            warned_fallback: AtomicBool::new(false),
            id_hasher: foldhash::fast::FixedState::with_seed(0x0b5e_4ed1),
        });
        CircuitBreakerMiddleware {
            core,
            shared,
            target,
        }
    }

    /// Asks the breaker of `key` (a key in the scope's form, as
    /// [`key_of`](Self::key_of) makes it: `tool:search`, `method:tools/call`)
    /// whether a call may start: a [`Permit`] to record the call's end with,
    /// or why not. For code outside pmcp's middleware chain (a tool, a
    /// transport of your own).
    ///
    /// ```
    /// use pmcp_resilience::circuit_breaker::{CircuitBreakerMiddleware, CircuitState, Verdict};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let cb = CircuitBreakerMiddleware::builder().failure_threshold(1).build().expect("valid");
    /// let permit = cb.acquire("global").await.expect("closed");
    /// permit.record(Verdict::Failure).await;
    /// assert_eq!(cb.state_of("global"), Some(CircuitState::Open));
    /// let refused = cb.acquire("global").await.expect_err("open");
    /// assert_eq!(refused.key.as_str(), "global");
    /// # }
    /// ```
    pub async fn acquire(&self, key: &str) -> Result<Permit, Rejected> {
        self.core.acquire_permit(ScopeKey::new(key), 0).await
    }

    /// The name this breaker reports under (set with
    /// [`CircuitBreakerBuilder::name`](super::CircuitBreakerBuilder::name);
    /// `circuit_breaker` by default).
    pub fn report_name(&self) -> &str {
        &self.shared.name
    }

    /// The key of `request` under this breaker's scope and target.
    pub fn key_of(&self, request: &JSONRPCRequest) -> ScopeKey {
        self.core.scope.key(request, &self.target)
    }

    /// The key a `tools/call` of `tool` gets under this breaker's scope and
    /// target, to ask [`state_of`](Self::state_of) or
    /// [`retry_after`](Self::retry_after) about it.
    ///
    /// ```
    /// use pmcp_resilience::{CircuitBreakerMiddleware, Scope};
    ///
    /// let per_tool = CircuitBreakerMiddleware::builder().scope(Scope::PerTool).build()?;
    /// assert_eq!(per_tool.key_of_tool("search").as_str(), "tool:search");
    /// assert_eq!(per_tool.state_of(per_tool.key_of_tool("search").as_str()), None); // no call yet
    /// # Ok::<(), pmcp_resilience::ConfigError>(())
    /// ```
    pub fn key_of_tool(&self, tool: &str) -> ScopeKey {
        self.core.scope.key_of_tool(tool, &self.target)
    }

    /// Writes the state file now (with file persistence; nothing to do otherwise).
    pub async fn flush(&self) -> Result<(), StoreError> {
        match &self.core.backend {
            Backend::File(file) => file.sync_and_flush().await,
            Backend::Memory | Backend::Shared(_) => Ok(()),
        }
    }

    /// For an orderly exit: writes the state file a last time and releases
    /// it, so the next process (or breaker) can open it. The breaker keeps
    /// working in memory; later changes are not written. Nothing to do
    /// without file persistence.
    pub async fn shutdown(&self) -> Result<(), StoreError> {
        match &self.core.backend {
            Backend::File(file) => file.shutdown().await,
            Backend::Memory | Backend::Shared(_) => Ok(()),
        }
    }

    /// Calls to a shared state store that failed (this process's last view
    /// of the key decided each of them).
    pub fn store_errors(&self) -> u64 {
        self.core.store_errors()
    }

    /// A handle for requests to the server at `url`, sharing all state.
    pub fn for_server(&self, url: impl AsRef<str>) -> Self {
        self.with_target(self.target.clone().with_server_url(url))
    }

    /// A handle with another target, sharing all state.
    pub fn with_target(&self, target: RequestTarget) -> Self {
        CircuitBreakerMiddleware {
            core: Arc::clone(&self.core),
            shared: Arc::clone(&self.shared),
            target,
        }
    }

    /// Wraps a transport so that its failures (HTTP statuses, refused
    /// connections, timeouts) reach this breaker.
    pub fn wrap_transport<T>(&self, transport: T) -> ObservedTransport<T> {
        ObservedTransport::new(transport, self.clone())
    }

    /// The scope (for the server layer, which resolves keys itself).
    #[cfg_attr(not(feature = "server"), allow(dead_code))]
    pub(crate) fn key_scope(&self) -> &Scope {
        &self.core.scope
    }

    /// Where this breaker's state lives and how that store is doing (kind
    /// `memory`, `file`, `redis` or `custom`; mode `normal` or the failure
    /// policy in force).
    pub fn store_report(&self) -> crate::metrics::StoreReport {
        match &self.core.backend {
            Backend::Memory => crate::metrics::StoreReport::memory(),
            Backend::File(_) => crate::metrics::StoreReport::new("file", "normal"),
            Backend::Shared(store) => store.store_report(),
        }
    }

    fn request_hash(&self, request_id: &str) -> u64 {
        // Never 0, which means "no id".
        self.shared.id_hasher.hash_one(request_id) | 1
    }

    /// Reports that sending the request `request_id` failed with `error`:
    /// the oldest call in flight with that id ends with the breaker's
    /// verdict on the error.
    pub(crate) fn report_send_error(&self, request_id: &str, error: &pmcp::Error) {
        let verdict = self.core.verdict(&outcome_of_error(error));
        if let Some(wait) = self
            .core
            .end_request(self.request_hash(request_id), verdict)
            && let Ok(handle) = tokio::runtime::Handle::try_current()
        {
            handle.spawn(wait);
        }
    }

    /// The request's key, warning once when a part of it is missing.
    fn resolve(&self, request: &JSONRPCRequest, context: &MiddlewareContext) -> ScopeKey {
        let resolved = key_in_context(&self.core.scope, request, context, &self.target);
        if let Some(missing) = resolved.missing {
            self.warn_missing(resolved.key.as_str(), missing);
        }
        resolved.key
    }

    /// Warns, once per breaker, that requests fall back to a shared key.
    fn warn_missing(&self, key: &str, missing: MissingPart) {
        if self.shared.warned_fallback.swap(true, Ordering::Relaxed) {
            return;
        }
        let part = match missing {
            MissingPart::ServerUrl => "server URL",
            MissingPart::SessionId => "session id",
        };
        tracing::warn!(
            scope = self.core.scope.label(),
            key,
            "circuit breaker: no {part} known for a request; such requests share the fallback key \
             (bind one with `for_server`/`with_target` or context metadata)"
        );
    }

    /// The error a refused call gets.
    pub(crate) fn rejection(&self, rejected: &Rejected) -> pmcp::Error {
        if !self.shared.signal_client {
            return pmcp::Error::CircuitBreakerOpen;
        }
        let ms = rejected
            .retry_after
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let key = rejected.key.as_str();
        pmcp::Error::Protocol {
            code: pmcp::ErrorCode::CIRCUIT_BREAKER_OPEN,
            message: match ms {
                Some(ms) => format!("circuit breaker open for `{key}`; retry after {ms} ms"),
                None => format!("circuit breaker open for `{key}`"),
            },
            data: Some(serde_json::json!({
                "retryAfterMs": ms,
                "scope": self.core.scope.label(),
                "key": key,
            })),
        }
    }

    /// Ends the call `context` travels with.
    async fn end_call_of(&self, context: &MiddlewareContext, verdict: Verdict) {
        if let Some(wait) = self.core.end_call(CallId::of_context(context), verdict) {
            wait.await;
        }
    }
}

#[async_trait]
impl AdvancedMiddleware for CircuitBreakerMiddleware {
    fn name(&self) -> &'static str {
        "circuit_breaker"
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
        let id = context
            .request_id
            .as_deref()
            .map_or(0, |id| self.request_hash(id));
        let key = self.resolve(request, context);
        let admitted = self
            .core
            .acquire(key.as_str(), id, Some(CallId::of_context(context)))
            .await;
        match admitted {
            Ok(_) => Ok(()),
            Err(rejected) => {
                crate::metrics::mark_method(context, &request.method);
                Err(self.rejection(&rejected))
            }
        }
    }

    async fn on_response_with_context(
        &self,
        response: &mut JSONRPCResponse,
        context: &MiddlewareContext,
    ) -> pmcp::Result<()> {
        let outcome = outcome_of_response(response, self.core.inspect_results);
        let verdict = self.core.verdict(&outcome);
        self.end_call_of(context, verdict).await;
        Ok(())
    }

    async fn on_error(
        &self,
        _error: &pmcp::Error,
        context: &MiddlewareContext,
    ) -> pmcp::Result<()> {
        // Errors seen here come from middlewares (this breaker's rejections
        // included), not from the server: the call ends neutral.
        self.end_call_of(context, Verdict::Neutral).await;
        Ok(())
    }
}
