//! The breaker as a pmcp `AdvancedMiddleware`.
//!
//! ```
//! use pmcp_resilience::{CircuitBreakerMiddleware, CircuitBreakerScope};
//! use pmcp::shared::AdvancedMiddleware;
//!
//! let cb = CircuitBreakerMiddleware::builder()
//!     .scope(CircuitBreakerScope::PerTool)
//!     .build()
//!     .expect("valid settings");
//! assert_eq!(cb.name(), "circuit_breaker");
//! assert_eq!(cb.state_of("tool:search"), None); // no call seen yet
//! ```
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
//!
//! With file persistence the hooks also write transitions through before
//! they return; with a custom store, admission and outcomes go through the
//! store and the registry keeps this process's counters (see
//! [`CircuitBreakerMiddleware`] for the guarantees).

use std::collections::BTreeMap;
use std::hash::BuildHasher;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use hashbrown::HashMap;
use pmcp::shared::{AdvancedMiddleware, MiddlewareContext, MiddlewarePriority};
use pmcp::types::{JSONRPCRequest, JSONRPCResponse};

use super::config::{CircuitBreakerBuilder, CircuitBreakerConfig, validate_policy};
use super::keys::{BreakerKeys, Entry, InUse, Slow};
use super::matcher::{ErrorMatcher, Outcome, outcome_of_error, outcome_of_response};
use super::metrics::{CircuitBreakerMetrics, KeySnapshot, MetricsSnapshot};
use super::persist::{self, Backend, Opened};
use super::shard_lock::ShardLock;
use super::state::{
    self, Admission, BreakerMode, BreakerPolicy, CallResult, CircuitBreakerState, CircuitState,
    ProbeId, Transition,
};
use super::store::CircuitBreakerStateStore;
use super::transport::ObservedTransport;
use crate::clock::{SharedClock, Timestamp, duration_nanos};
use crate::error::{ConfigError, StoreError};
use crate::hooks::{BoxFuture, finished};
use crate::metrics::MetricsConfig;
use crate::persistence::FileBacking;
use crate::scope::{
    MissingPart, RequestTarget, Scope, ScopeKey, key_in_context, visit_key_in_context,
};

/// A call admitted and not yet answered.
struct Pending {
    context: usize,
    /// The entry that admitted it (the overflow entry at the cap), which
    /// the call keeps in use until it ends.
    used: InUse,
    /// With a shared store: the store's key, which the outcome must reach
    /// even when this process counted the call under its overflow entry.
    store_key: Option<ScopeKey>,
    start: Timestamp,
    probe: Option<ProbeId>,
}

impl Pending {
    /// The key the call's outcome belongs to in a shared store (the local
    /// key when there is no store).
    fn store_key<'a>(&'a self, keys: &'a BreakerKeys) -> &'a str {
        match &self.store_key {
            Some(key) => key.as_str(),
            None => keys.entry(&self.used).key(),
        }
    }
}

const PENDING_SHARDS: usize = crate::counter::STRIPES;
/// Most pending calls remembered at once (per breaker).
const PENDING_CAPACITY: usize = 65_536;
/// A pending call older than this is presumed abandoned (its future was
/// dropped) when room is needed.
const PENDING_TTL: Duration = Duration::from_secs(300);

type PendingShard = ShardLock<HashMap<u64, Pending, foldhash::fast::FixedState>>;

/// One shard on cache lines of its own (128 bytes: x86 CPUs fetch lines in
/// adjacent pairs).
#[repr(align(128))]
struct PaddedShard(PendingShard);

/// Most calls one shard holds.
const PENDING_PER_SHARD: usize = PENDING_CAPACITY / PENDING_SHARDS;

/// The bounded table of calls in flight.
///
/// A thread files its calls in a shard of its own ([`stripe_index`]), so
/// threads do not take turns owning the shards' cache lines; an answer is
/// looked for in its thread's shard first, then in the others (a call
/// answered on another thread, or filed elsewhere because its thread's
/// shard was full). Each shard is behind a [`ShardLock`], which a call
/// takes twice and which is nearly always free.
///
/// [`stripe_index`]: crate::counter::stripe_index
struct PendingCalls {
    shards: Box<[PaddedShard]>,
}

impl PendingCalls {
    fn new() -> Self {
        PendingCalls {
            shards: (0..PENDING_SHARDS)
                .map(|_| {
                    PaddedShard(ShardLock::new(HashMap::with_hasher(
                        foldhash::fast::FixedState::with_seed(7),
                    )))
                })
                .collect(),
        }
    }

    /// This thread's shard.
    fn home(&self) -> usize {
        crate::counter::stripe_index() % PENDING_SHARDS
    }

    /// The shards in the order this thread looks at them: its own first.
    fn home_first(&self) -> impl Iterator<Item = &PendingShard> {
        let home = self.home();
        (0..PENDING_SHARDS).map(move |k| &self.shards[(home + k) % PENDING_SHARDS].0)
    }

    /// Remembers a call; returns entries that had to give way (abandoned calls).
    fn insert(&self, id: u64, pending: Pending, now: Timestamp) -> Vec<Pending> {
        let mut gone = Vec::new();
        let room = self.home_first().find_map(|shard| {
            let map = shard.lock();
            (map.len() < PENDING_PER_SHARD).then_some(map)
        });
        let mut map = match room {
            Some(map) => map,
            None => {
                // Every shard is full: calls in this thread's shard older
                // than the time to live are presumed abandoned and make room.
                let mut map = self.shards[self.home()].0.lock();
                let stale: Vec<u64> = map
                    .iter()
                    .filter(|(_, p)| now.saturating_since(p.start) >= PENDING_TTL)
                    .map(|(k, _)| *k)
                    .collect();
                gone.extend(stale.iter().filter_map(|k| map.remove(k)));
                if map.len() >= PENDING_PER_SHARD {
                    gone.push(pending);
                    return gone;
                }
                map
            }
        };
        if let Some(old) = map.insert(id, pending) {
            gone.push(old);
        }
        gone
    }

    fn take(&self, id: u64, context: Option<usize>) -> Option<Pending> {
        self.home_first().find_map(|shard| {
            let mut map = shard.lock();
            match map.entry(id) {
                hashbrown::hash_map::Entry::Occupied(call)
                    if context.is_none_or(|c| call.get().context == c) =>
                {
                    Some(call.remove())
                }
                _ => None,
            }
        })
    }
}

/// The state shared by every handle of one breaker.
pub(crate) struct Inner {
    scope: Scope,
    matcher: ErrorMatcher,
    inspect_results: bool,
    /// Read when the state machine runs; swapped whole by `reconfigure` (no
    /// lock to share).
    policy: ArcSwap<BreakerPolicy>,
    /// Whether `policy` has no window rule, so a quiet key needs no state
    /// machine (`state::is_quiet`): read on every request instead of `policy`.
    windowless: AtomicBool,
    registry: BreakerKeys,
    pending: PendingCalls,
    metrics: Arc<CircuitBreakerMetrics>,
    metrics_config: MetricsConfig,
    clock: SharedClock,
    signal_client: bool,
    warned_fallback: AtomicBool,
    next_sweep: AtomicU64,
    id_hasher: foldhash::fast::FixedState,
    backend: Backend,
    store_errors: AtomicU64,
    warned_store: AtomicBool,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Best effort: the file store's own drop then writes it and
        // releases the file.
        if let Backend::File(file) = &self.backend {
            file.sync_now(file_snapshot(&self.registry, self.clock.now()));
        }
    }
}

/// The states of the keys worth keeping in the file at `now`.
fn file_snapshot(registry: &BreakerKeys, now: Timestamp) -> BTreeMap<String, CircuitBreakerState> {
    let mut states = BTreeMap::new();
    registry.for_each(|key, e| {
        let s = e.read();
        if persist::worth_keeping(&s.state, now) {
            states.insert(key.to_owned(), s.state.clone());
        }
    });
    states
}

/// A state to write through: a transition happened on this key.
/// Boxed: the state is a few hundred bytes and is written through rarely (a
/// transition with a file), so the common `None` stays one word to move.
type WriteThrough = Option<(ScopeKey, Box<CircuitBreakerState>)>;

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
///   it fails with [`ConfigError::Store`].
///
/// # A shared store ([`StatePersistence::Custom`](crate::persistence::StatePersistence::Custom))
///
/// Every admission and every outcome is one call to the store's `acquire`
/// or `record`, so breakers (in one process or many) sharing the store share
/// their state. The per-key counters and the state shown by
/// [`state_of`](Self::state_of) are this process's view. When the store
/// fails the call is admitted (fail open), the first failure is logged as a
/// warning and each is counted in [`store_errors`](Self::store_errors).
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
            .field("policy", &**self.inner.policy.load())
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
        let opened = Opened {
            backend: Backend::Memory,
            loaded: BTreeMap::new(),
        };
        Self::from_backend(config, clock, target, opened)
    }

    pub(crate) fn from_backend(
        config: CircuitBreakerConfig,
        clock: SharedClock,
        target: RequestTarget,
        opened: Opened,
    ) -> Self {
        let inner = Inner {
            inspect_results: config.trigger_errors.looks_at_tool_errors(),
            scope: config.scope,
            matcher: config.trigger_errors,
            windowless: AtomicBool::new(!config.policy.uses_window()),
            policy: ArcSwap::from_pointee(config.policy),
            registry: BreakerKeys::new(config.registry_limits),
            pending: PendingCalls::new(),
            metrics: Arc::new(CircuitBreakerMetrics::default()),
            metrics_config: config.metrics_config,
            clock,
            signal_client: config.signal_client,
            warned_fallback: AtomicBool::new(false),
            next_sweep: AtomicU64::new(0),
            id_hasher: foldhash::fast::FixedState::with_seed(0x0b5e_4ed1),
            backend: opened.backend,
            store_errors: AtomicU64::new(0),
            warned_store: AtomicBool::new(false),
        };
        let now = inner.clock.now();
        for (key, state) in opened.loaded {
            let effective = state.effective_state();
            inner.registry.with(&key, now, |e| e.lock().state = state);
            if inner.metrics_config.per_key {
                inner.metrics.set_state(&key, Some(effective));
            }
        }
        let inner = Arc::new(inner);
        if let Backend::File(file) = &inner.backend {
            let weak = Arc::downgrade(&inner);
            file.start(Box::new(move || {
                let inner = weak.upgrade()?;
                Some(file_snapshot(&inner.registry, inner.clock.now()))
            }));
        }
        CircuitBreakerMiddleware { inner, target }
    }

    /// Writes the state file now (with file persistence; nothing to do otherwise).
    pub async fn flush(&self) -> Result<(), StoreError> {
        match &self.inner.backend {
            Backend::File(file) => file.sync_and_flush().await,
            Backend::Memory | Backend::Shared(_) => Ok(()),
        }
    }

    /// For an orderly exit: writes the state file a last time and releases
    /// it, so the next process (or breaker) can open it. The breaker keeps
    /// working in memory; later changes are not written. Nothing to do
    /// without file persistence.
    pub async fn shutdown(&self) -> Result<(), StoreError> {
        match &self.inner.backend {
            Backend::File(file) => file.shutdown().await,
            Backend::Memory | Backend::Shared(_) => Ok(()),
        }
    }

    /// Calls to a custom state store that failed (each admitted the call).
    pub fn store_errors(&self) -> u64 {
        self.inner.store_errors.load(Ordering::Relaxed)
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
        self.sync_metrics();
        self.prune_current_state();
        Arc::clone(&self.inner.metrics)
    }

    /// Brings the shared counters up to date.
    fn sync_metrics(&self) {
        let inner = &*self.inner;
        let successes = if inner.metrics_config.enabled {
            inner.registry.successes()
        } else {
            0
        };
        inner.metrics.sync(successes);
    }

    /// A plain copy of the metrics with a row per key.
    pub fn snapshot(&self) -> MetricsSnapshot {
        let m = &self.inner.metrics;
        self.sync_metrics();
        let mut keys = Vec::new();
        self.inner.registry.for_each(|key, e| {
            let s = e.read();
            keys.push(KeySnapshot {
                key: key.to_owned(),
                state: s.state.effective_state(),
                successes: e.successes(),
                failures: s.failures,
                rejections: s.rejections,
                transitions: s.transitions,
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

    /// Where this breaker's state lives and how that store is doing (kind
    /// `memory`, `file`, `redis` or `custom`; mode `normal` or the failure
    /// policy in force).
    pub fn store_report(&self) -> crate::observe::StoreReport {
        match &self.inner.backend {
            Backend::Memory => crate::observe::StoreReport::memory(),
            Backend::File(_) => crate::observe::StoreReport::new("file", "normal"),
            Backend::Shared(store) => store.store_report(),
        }
    }

    /// The state of `key` as callers see it, or `None` if the key is not held.
    pub fn state_of(&self, key: &str) -> Option<CircuitState> {
        self.inner
            .registry
            .get(key, |e| e.read().state.effective_state())
    }

    /// How long until `key` may admit a call, if it is rejecting now
    /// (`None` for a closed, unknown or forced-open key).
    pub fn retry_after(&self, key: &str) -> Option<Duration> {
        let now = self.inner.clock.now();
        self.inner
            .registry
            .get(key, |e| e.read().state.retry_after(now))
            .flatten()
    }

    /// The policy in force.
    pub fn policy(&self) -> BreakerPolicy {
        **self.inner.policy.load()
    }

    /// Replaces the policy at run time; every key keeps its state and counts
    /// (a window of another shape starts empty).
    pub fn reconfigure(&self, policy: BreakerPolicy) -> Result<(), ConfigError> {
        validate_policy(&policy)?;
        if let Backend::Shared(store) = &self.inner.backend {
            store.check_policy(&policy)?;
        }
        self.inner.policy.store(Arc::new(policy));
        self.inner
            .windowless
            .store(!policy.uses_window(), Ordering::Release);
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
        let (effective, saved) = self.inner.registry.with(key, now, |e| {
            let mut s = e.lock();
            state::set_mode(&mut s.state, mode);
            let saved = matches!(self.inner.backend, Backend::File(_)).then(|| s.state.clone());
            (s.state.effective_state(), saved)
        });
        match &self.inner.backend {
            Backend::File(file) => {
                if let Some(saved) = saved {
                    file.write_detached(key, saved);
                }
            }
            Backend::Shared(store) => self.set_shared_mode(store, key, mode),
            Backend::Memory => {}
        }
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
                .filter(|k| self.inner.registry.get(k, |_| ()).is_none())
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

    /// The request's key, warning once when a part of it is missing.
    fn resolve(&self, request: &JSONRPCRequest, context: &MiddlewareContext) -> ScopeKey {
        let resolved = key_in_context(&self.inner.scope, request, context, &self.target);
        if let Some(missing) = resolved.missing {
            self.warn_missing(resolved.key.as_str(), missing);
        }
        resolved.key
    }

    /// Warns, once per breaker, that requests fall back to a shared key.
    fn warn_missing(&self, key: &str, missing: MissingPart) {
        let inner = &*self.inner;
        if inner.warned_fallback.load(Ordering::Relaxed)
            || inner.warned_fallback.swap(true, Ordering::Relaxed)
        {
            return;
        }
        let part = match missing {
            MissingPart::ServerUrl => "server URL",
            MissingPart::SessionId => "session id",
        };
        tracing::warn!(
            scope = inner.scope.label(),
            key,
            "circuit breaker: no {part} known for a request; such requests share the fallback key \
             (bind one with `for_server`/`with_target` or context metadata)"
        );
    }

    /// Admission for a request by the in-memory state machine: `Ok` with the
    /// call remembered, or the rejection; and the state to write through.
    fn admit(
        &self,
        request: &JSONRPCRequest,
        context: &MiddlewareContext,
    ) -> (pmcp::Result<()>, WriteThrough) {
        let inner = &*self.inner;
        let now = inner.clock.now();
        self.maybe_sweep(now);
        let file = matches!(inner.backend, Backend::File(_));
        // The key is built in a per-thread buffer and looked up borrowed.
        visit_key_in_context(
            &inner.scope,
            request,
            context,
            &self.target,
            |key, missing| {
                if let Some(missing) = missing {
                    self.warn_missing(key, missing);
                }
                let (used, _overflowed) = inner.registry.enter(key, now);
                let e = inner.registry.entry(&used);
                let decided = decide(e, inner, now, file);
                let write = decided
                    .saved
                    .map(|state| (ScopeKey::verbatim(e.key()), state));
                let result = self.conclude(
                    used,
                    None,
                    decided.admission,
                    decided.transition,
                    decided.mode,
                    now,
                    context,
                );
                if let Backend::File(file) = &inner.backend {
                    file.mark_dirty();
                }
                if result.is_err() {
                    crate::observe::mark_method(context, &request.method);
                }
                (result, write)
            },
        )
    }

    /// Admission for a request by a shared store.
    async fn admit_shared(
        &self,
        store: &dyn CircuitBreakerStateStore,
        request: &JSONRPCRequest,
        context: &MiddlewareContext,
    ) -> pmcp::Result<()> {
        let inner = &*self.inner;
        let key = self.resolve(request, context);
        let now = inner.clock.now();
        self.maybe_sweep(now);
        let policy = **inner.policy.load();
        let jitter = fastrand::f64();
        let decided = match store.acquire(key.as_str(), &policy, now, jitter).await {
            Ok(decided) => Some(decided),
            Err(error) => {
                self.store_failed(&error);
                None
            }
        };
        let (admission, transition) = decided.unwrap_or((Admission::Allowed { probe: None }, None));
        // The call keeps the store's key even when this process counts it
        // under its local overflow entry: its outcome belongs to that key.
        let (used, _overflowed) = inner.registry.enter(key.as_str(), now);
        {
            let mut s = inner.registry.entry(&used).lock();
            if decided.is_some() {
                mirror(&mut s.state, admission, transition, now);
                s.transitions += u64::from(transition.is_some());
            }
            if let Admission::Rejected { .. } = admission {
                s.rejections += 1;
            }
        }
        let result = self.conclude(
            used,
            Some(key.clone()),
            admission,
            transition,
            BreakerMode::Normal,
            now,
            context,
        );
        if result.is_err() {
            crate::observe::mark_method(context, &request.method);
        }
        result
    }

    /// Counts a failed call to a shared store; the call it was for is admitted.
    fn store_failed(&self, error: &StoreError) {
        self.inner.store_errors.fetch_add(1, Ordering::Relaxed);
        if !self.inner.warned_store.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                %error,
                "circuit breaker state store failed; admitting calls while it does \
                 (failures are counted in `store_errors`)"
            );
        } else {
            tracing::debug!(%error, "circuit breaker state store failed again");
        }
    }

    /// Sets an operator mode in a shared store, in the background.
    fn set_shared_mode(
        &self,
        store: &Arc<dyn CircuitBreakerStateStore>,
        key: &str,
        mode: BreakerMode,
    ) {
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            tracing::warn!(
                key,
                "no Tokio runtime: the mode was set in this process only"
            );
            return;
        };
        let store = Arc::clone(store);
        let this = self.clone();
        let key = key.to_owned();
        handle.spawn(async move {
            let result = async {
                let mut s = store.get_state(&key).await?.unwrap_or_default();
                state::set_mode(&mut s, mode);
                store.set_state(&key, s).await
            }
            .await;
            if let Err(error) = result {
                this.store_failed(&error);
            }
        });
    }

    /// Counts an admission decision made on the entry in `used` (with a
    /// shared store, for `store_key`), and remembers an admitted call; a
    /// call that does not go on ends its use of the entry here.
    #[allow(clippy::too_many_arguments)]
    fn conclude(
        &self,
        used: InUse,
        store_key: Option<ScopeKey>,
        admission: Admission,
        transition: Option<Transition>,
        mode: BreakerMode,
        now: Timestamp,
        context: &MiddlewareContext,
    ) -> pmcp::Result<()> {
        let inner = &*self.inner;
        let key = || {
            store_key
                .as_ref()
                .map_or(inner.registry.entry(&used).key(), ScopeKey::as_str)
        };
        if let Some(t) = transition {
            self.on_transition(key(), t);
        }
        if inner.metrics_config.enabled {
            inner.metrics.live.total.add(1);
        }
        match admission {
            Admission::Rejected { retry_after } => {
                if inner.metrics_config.enabled {
                    inner.metrics.live.rejected.add(1);
                }
                let key = key();
                tracing::debug!(key, ?retry_after, "circuit breaker rejected a request");
                let rejection = self.rejection(key, retry_after);
                inner.registry.leave(used);
                Err(rejection)
            }
            Admission::Allowed { .. } if mode == BreakerMode::Disabled => {
                inner.registry.leave(used);
                Ok(())
            }
            Admission::Allowed { probe } => {
                let id = self.request_id(context);
                let pending = Pending {
                    context: context_address(context),
                    used,
                    store_key,
                    start: now,
                    probe,
                };
                for abandoned in inner.pending.insert(id, pending, now) {
                    self.end_call_detached(abandoned, CallResult::Released);
                }
                Ok(())
            }
        }
    }

    fn rejection(&self, key: &str, retry_after: Duration) -> pmcp::Error {
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
                "key": key,
            })),
        }
    }

    /// Admission in memory with a file to write a transition through,
    /// which the hook waits for.
    async fn admit_filed(
        &self,
        file: &FileBacking<CircuitBreakerState>,
        request: &JSONRPCRequest,
        context: &MiddlewareContext,
    ) -> pmcp::Result<()> {
        let (result, write) = self.admit(request, context);
        if let Some((key, state)) = write {
            file.note(file.write_through(key.as_str(), *state).await);
        }
        result
    }

    /// Records the answer to a pending call: done here in memory, or handed
    /// back as a future that waits for the file or the store.
    fn on_answer(
        &self,
        response: &JSONRPCResponse,
        context: &MiddlewareContext,
    ) -> Option<BoxFuture<'_, ()>> {
        let id = self.request_id(context);
        let pending = self
            .inner
            .pending
            .take(id, Some(context_address(context)))?;
        let outcome = outcome_of_response(response, self.inner.inspect_results);
        let result = self.classify(&outcome);
        match &self.inner.backend {
            Backend::Memory => {
                self.finish(pending, result);
                None
            }
            Backend::File(_) | Backend::Shared(_) => Some(self.end_call(pending, result)),
        }
    }

    /// Ends a call from a hook, which can wait for the store or the file
    /// (boxed on its own, as the admissions that wait are).
    fn end_call(&self, pending: Pending, result: CallResult) -> BoxFuture<'_, ()> {
        Box::pin(self.end_call_inner(pending, result))
    }

    async fn end_call_inner(&self, pending: Pending, result: CallResult) {
        match &self.inner.backend {
            Backend::Shared(store) => {
                let now = self.inner.clock.now();
                self.finish_shared(&**store, pending, result, now).await
            }
            Backend::File(file) => {
                if let Some((key, state)) = self.finish(pending, result) {
                    file.note(file.write_through(key.as_str(), *state).await);
                }
            }
            Backend::Memory => {
                self.finish(pending, result);
            }
        }
    }

    /// Ends a call from code that cannot wait: a store call or a write goes
    /// to a background task.
    fn end_call_detached(&self, pending: Pending, result: CallResult) {
        match &self.inner.backend {
            Backend::Shared(_) => match tokio::runtime::Handle::try_current() {
                Ok(handle) => {
                    let this = self.clone();
                    handle.spawn(async move { this.end_call(pending, result).await });
                }
                Err(_) => {
                    // No runtime to reach the store: keep the local counts right.
                    self.count_end(pending, result, None);
                }
            },
            Backend::File(file) => {
                if let Some((key, state)) = self.finish(pending, result) {
                    file.write_detached(key.as_str(), *state);
                }
            }
            Backend::Memory => {
                self.finish(pending, result);
            }
        }
    }

    /// Records the end of a pending call with a shared store.
    async fn finish_shared(
        &self,
        store: &dyn CircuitBreakerStateStore,
        pending: Pending,
        result: CallResult,
        now: Timestamp,
    ) {
        let policy = **self.inner.policy.load();
        let elapsed = now.saturating_since(pending.start);
        let jitter = fastrand::f64();
        let recorded = store
            .record(
                pending.store_key(&self.inner.registry),
                &policy,
                now,
                result,
                elapsed,
                pending.probe,
                jitter,
            )
            .await;
        let transition = match recorded {
            Ok(transition) => transition,
            Err(error) => {
                self.store_failed(&error);
                None
            }
        };
        self.count_end(pending, result, transition);
    }

    /// This process's counts for the end of a call decided elsewhere.
    fn count_end(&self, pending: Pending, result: CallResult, transition: Option<Transition>) {
        let keys = &self.inner.registry;
        let e = keys.entry(&pending.used);
        {
            let mut s = e.lock();
            count_result(e, &mut s, result);
            if let Some(t) = transition {
                s.state.state = t.to;
                s.transitions += 1;
            }
        }
        self.count_metrics(result, transition.map(|t| (t, pending.store_key(keys))));
        keys.leave(pending.used);
    }

    /// Counts an ended call, and the transition it made on the key named.
    fn count_metrics(&self, result: CallResult, transition: Option<(Transition, &str)>) {
        let inner = &*self.inner;
        if inner.metrics_config.enabled {
            // Successes are summed from the keys' entries (`sync_metrics`).
            if result == CallResult::Failure {
                inner.metrics.live.failed.add(1);
            }
        }
        if let Some((t, key)) = transition {
            self.on_transition(key, t);
        }
    }

    /// Records the end of a pending call in the in-memory state machine;
    /// returns the state to write through if it made a transition. The
    /// clock is read only if the state machine runs.
    fn finish(&self, pending: Pending, result: CallResult) -> WriteThrough {
        let inner = &*self.inner;
        let file = matches!(inner.backend, Backend::File(_));
        // The call kept its entry in use, so the entry is still there.
        let e = inner.registry.entry(&pending.used);
        if result == CallResult::Success {
            // Counted before the quiet flag is read: the flag shares the
            // count's cache line, which is then fetched once, for writing.
            e.add_success();
        }
        let (transition, saved) = if result == CallResult::Success
            && pending.probe.is_none()
            && inner.windowless.load(Ordering::Acquire)
            && e.is_quiet()
        {
            // A success leaves a quiet state as it is (`state::is_quiet`).
            (None, None)
        } else {
            let policy = inner.policy.load();
            let now = inner.clock.now();
            let elapsed = now.saturating_since(pending.start);
            let mut s = e.lock();
            s.failures += u64::from(result == CallResult::Failure);
            let transition = state::record(
                &mut s.state,
                &policy,
                now,
                result,
                elapsed,
                pending.probe,
                fastrand::f64(),
            );
            s.transitions += u64::from(transition.is_some());
            let saved = (file && transition.is_some()).then(|| Box::new(s.state.clone()));
            (transition, saved)
        };
        if let Backend::File(file) = &inner.backend {
            file.mark_dirty();
        }
        self.count_metrics(result, transition.map(|t| (t, e.key())));
        let write = saved.map(|state| (ScopeKey::verbatim(e.key()), state));
        inner.registry.leave(pending.used);
        write
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
            self.end_call_detached(pending, result);
        }
    }

    fn on_transition(&self, key: &str, t: Transition) {
        let inner = &*self.inner;
        CircuitBreakerMetrics::add(&inner.metrics.state_transitions);
        if inner.metrics_config.per_key {
            inner.metrics.set_state(key, Some(t.to));
        }
        let (from, to, reason) = (t.from.label(), t.to.label(), t.reason.label());
        match t.to {
            CircuitState::Open => {
                tracing::info!(key, from, to, reason, "circuit breaker opened")
            }
            CircuitState::Closed => {
                tracing::info!(key, from, to, reason, "circuit breaker closed")
            }
            CircuitState::HalfOpen => {
                tracing::debug!(key, from, to, reason, "circuit breaker half-open")
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

/// What admission decided for a call, and the state to write through.
struct Decided {
    admission: Admission,
    transition: Option<Transition>,
    mode: BreakerMode,
    saved: Option<Box<CircuitBreakerState>>,
}

/// Asks the state machine of `e` whether a call may start at `now`.
fn decide(e: &Entry, inner: &Inner, now: Timestamp, file: bool) -> Decided {
    if inner.windowless.load(Ordering::Acquire) && e.is_quiet() {
        // A quiet state admits the call and stays as it is (`state::is_quiet`).
        return Decided {
            admission: Admission::Allowed { probe: None },
            transition: None,
            mode: BreakerMode::Normal,
            saved: None,
        };
    }
    let policy = inner.policy.load();
    let mut s = e.lock();
    let (admission, transition) = state::acquire(&mut s.state, &policy, now, fastrand::f64());
    s.transitions += u64::from(transition.is_some());
    if let Admission::Rejected { .. } = admission {
        s.rejections += 1;
    }
    Decided {
        admission,
        transition,
        mode: s.state.mode,
        saved: (file && transition.is_some()).then(|| Box::new(s.state.clone())),
    }
}

fn count_result(e: &Entry, s: &mut Slow, result: CallResult) {
    match result {
        CallResult::Success => e.add_success(),
        CallResult::Failure => s.failures += 1,
        CallResult::Released => {}
    }
}

/// Keeps this process's view of a key decided by a shared store, for
/// `state_of`, `retry_after` and the metrics.
fn mirror(
    s: &mut CircuitBreakerState,
    admission: Admission,
    transition: Option<Transition>,
    now: Timestamp,
) {
    if let Some(t) = transition {
        s.state = t.to;
    }
    match admission {
        Admission::Allowed { probe: Some(_) } => s.state = CircuitState::HalfOpen,
        Admission::Allowed { probe: None } => s.state = CircuitState::Closed,
        Admission::Rejected { retry_after } => {
            if s.state == CircuitState::Closed {
                s.state = CircuitState::Open;
            }
            s.open_until = now.saturating_add(retry_after);
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

    crate::hooks::chain_hooks!();

    // The two hooks every call goes through are written out rather than
    // `async`: in memory they do their work when called and hand pmcp a
    // finished future, zero-sized when the call goes on (so boxing it
    // allocates nothing). Only a file or a store is waited for.
    fn on_request_with_context<'life0, 'life1, 'life2, 'async_trait>(
        &'life0 self,
        request: &'life1 mut JSONRPCRequest,
        context: &'life2 MiddlewareContext,
    ) -> BoxFuture<'async_trait, pmcp::Result<()>>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        'life2: 'async_trait,
        Self: 'async_trait,
    {
        // The waits are boxed on their own, so that this path's future
        // stays zero-sized.
        match &self.inner.backend {
            Backend::Memory => finished(self.admit(request, context).0),
            Backend::File(file) => Box::pin(self.admit_filed(file, request, context)),
            Backend::Shared(store) => Box::pin(self.admit_shared(&**store, request, context)),
        }
    }

    fn on_response_with_context<'life0, 'life1, 'life2, 'async_trait>(
        &'life0 self,
        response: &'life1 mut JSONRPCResponse,
        context: &'life2 MiddlewareContext,
    ) -> BoxFuture<'async_trait, pmcp::Result<()>>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        'life2: 'async_trait,
        Self: 'async_trait,
    {
        match self.on_answer(response, context) {
            None => finished(Ok(())),
            Some(waiting) => Box::pin(async move {
                waiting.await;
                Ok(())
            }),
        }
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
            self.end_call(pending, CallResult::Released).await;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::RegistryLimits;

    fn keys() -> BreakerKeys {
        BreakerKeys::new(RegistryLimits {
            max_keys: 10,
            idle_after: Duration::from_secs(10),
        })
    }

    fn call(keys: &BreakerKeys, context: usize, start: Timestamp) -> Pending {
        Pending {
            context,
            used: keys.enter("k", start).0,
            store_key: None,
            start,
            probe: None,
        }
    }

    /// Ends the uses of calls handed back, as the breaker does.
    fn end(keys: &BreakerKeys, calls: Vec<Pending>) -> usize {
        let n = calls.len();
        for p in calls {
            keys.leave(p.used);
        }
        n
    }

    #[tokio::test]
    async fn in_memory_hooks_hand_pmcp_a_future_that_allocates_nothing() {
        use pmcp::types::RequestId;
        let cb = match CircuitBreakerMiddleware::builder().build() {
            Ok(cb) => cb,
            Err(e) => panic!("valid settings: {e}"),
        };
        let mut request = JSONRPCRequest {
            jsonrpc: "2.0".into(),
            method: "tools/list".into(),
            params: None,
            id: RequestId::from(1i64),
        };
        let mut response = JSONRPCResponse::success(RequestId::from(1i64), serde_json::Value::Null);
        let context = MiddlewareContext::with_request_id("1".into());
        let asked = cb.should_execute(&context);
        assert_eq!(std::mem::size_of_val(&*asked), 0);
        assert!(asked.await);
        for hook in [cb.on_chain_start(&context), cb.on_chain_complete(&context)] {
            assert_eq!(std::mem::size_of_val(&*hook), 0);
            assert!(hook.await.is_ok());
        }
        let admitted = cb.on_request_with_context(&mut request, &context);
        assert_eq!(std::mem::size_of_val(&*admitted), 0);
        assert!(admitted.await.is_ok());
        let answered = cb.on_response_with_context(&mut response, &context);
        assert_eq!(std::mem::size_of_val(&*answered), 0);
        assert!(answered.await.is_ok());
        let m = cb.snapshot();
        assert_eq!((m.total_requests, m.successful_requests), (1, 1));
    }

    #[test]
    fn a_call_filed_on_one_thread_is_found_on_another() {
        let (keys, pending) = (keys(), PendingCalls::new());
        let now = Timestamp::from_millis(1);
        std::thread::scope(|s| {
            let filer = s.spawn(|| end(&keys, pending.insert(7, call(&keys, 70, now), now)));
            assert_eq!(filer.join().ok(), Some(0));
        });
        assert!(
            pending.take(7, Some(71)).is_none(),
            "another context's call"
        );
        let found = pending.take(7, Some(70));
        assert!(found.as_ref().is_some_and(|p| p.context == 70));
        end(&keys, found.into_iter().collect());
        assert!(pending.take(7, None).is_none(), "taken once");
    }

    #[test]
    fn a_full_shard_spills_and_a_full_table_hands_the_call_back() {
        let (keys, pending) = (keys(), PendingCalls::new());
        let now = Timestamp::from_millis(1);
        for id in 0..PENDING_CAPACITY as u64 {
            assert_eq!(end(&keys, pending.insert(id, call(&keys, 1, now), now)), 0);
        }
        // Every shard is full and nothing is stale: the new call comes back.
        let back = pending.insert(u64::MAX, call(&keys, 2, now), now);
        assert!(back.len() == 1 && back[0].context == 2);
        end(&keys, back);
        // Calls filed in other shards than this thread's are all found.
        for id in 0..PENDING_CAPACITY as u64 {
            let found = pending.take(id, Some(1));
            assert!(found.is_some(), "call {id}");
            end(&keys, found.into_iter().collect());
        }
    }

    #[test]
    fn stale_calls_make_room_in_a_full_shard() {
        let (keys, pending) = (keys(), PendingCalls::new());
        let then = Timestamp::from_millis(1);
        for id in 0..PENDING_CAPACITY as u64 {
            end(&keys, pending.insert(id, call(&keys, 1, then), then));
        }
        let later = then.saturating_add(PENDING_TTL);
        let gone = pending.insert(u64::MAX, call(&keys, 2, later), later);
        assert_eq!(
            end(&keys, gone),
            PENDING_PER_SHARD,
            "this thread's shard swept"
        );
        assert!(pending.take(u64::MAX, Some(2)).is_some_and(|p| {
            keys.leave(p.used);
            true
        }));
    }
}
