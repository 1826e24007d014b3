//! The breaker core: one call path from admission to verdict, whatever the
//! store.
//!
//! [`Core::acquire`] asks the key's state machine (or the shared store) for
//! admission and files an admitted call in the table of calls in flight
//! ([`super::calls`]), handing back a [`Permit`]. The call ends exactly once,
//! when its permit's verdict is recorded, when the permit is dropped
//! unrecorded (neutral), or when its deadline passes first (timed out). The
//! pmcp middleware, the transport wrapper and the server layer are adapters
//! over these two steps.
//!
//! Where the state lives is one seam ([`Backend`]):
//! - memory: the key's entry in the registry is the state;
//! - file: the same, and a transition is written through before the step
//!   that caused it returns;
//! - a shared store (Redis, your own): the store decides; the entry keeps
//!   the state the store last reported, so that when the store fails this
//!   process goes on from the fleet's last known state (an open breaker
//!   stays open) instead of from nothing.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::RwLock;

use super::calls::{Call, CallId, Calls, DecidedBy};
use super::config::TransitionHook;
use super::entry::{Breakers, KeyBreaker};
use super::matcher::{self, ErrorMatcher, Outcome};
use super::metrics::Counters;
use super::permit::{Permit, Rejected, spawn_or_drop};
use super::persist::{self, Backend, adopt, adopt_transition};
use super::state::{
    self, Admission, BreakerMode, BreakerPolicy, CircuitBreakerState, CircuitState, Transition,
    Verdict,
};
use crate::clock::{SharedClock, Timestamp, duration_nanos};
use crate::error::StoreError;
use crate::hooks::BoxFuture;
use crate::metrics::MetricsConfig;
use crate::registry::RegistryLimits;
use crate::scope::{Scope, ScopeKey};

/// Most calls one breaker keeps in flight at once.
pub(crate) const MAX_CALLS_IN_FLIGHT: usize = 65_536;

/// An admitted call: its token in the table of calls in flight (0: filed
/// under its context, or a call the breaker does not follow), and whether
/// it is a probe.
pub(crate) struct Admitted {
    pub(crate) token: u64,
    pub(crate) probe: bool,
}

impl Admitted {
    const UNTRACKED: Admitted = Admitted {
        token: 0,
        probe: false,
    };
}

/// A transition's state to write to the state file, and whose it is.
type WriteThrough = (Arc<KeyBreaker>, CircuitBreakerState);

/// An admission: the caller's answer, and what is left to write.
struct Decision {
    result: Result<Admitted, Rejected>,
    write: Option<WriteThrough>,
}

/// What `acquire` decided, before the call is filed.
struct Decided {
    admission: Admission,
    transition: Option<Transition>,
    mode: BreakerMode,
    decided_by: DecidedBy,
    /// With a file: the state to write through after a transition.
    saved: Option<CircuitBreakerState>,
}

/// The state shared by every handle of one breaker.
pub(crate) struct Core {
    pub(crate) scope: Scope,
    failures: ErrorMatcher,
    neutral: ErrorMatcher,
    pub(crate) inspect_results: bool,
    policy: RwLock<BreakerPolicy>,
    call_timeout: Duration,
    pub(crate) registry: Breakers,
    calls: Calls,
    pub(crate) metrics: Counters,
    pub(crate) metrics_config: MetricsConfig,
    pub(crate) clock: SharedClock,
    pub(crate) backend: Backend,
    on_transition: Option<TransitionHook>,
    store_errors: AtomicU64,
    warned_store: AtomicBool,
    next_sweep: AtomicU64,
}

/// The settings a core is made from.
pub(crate) struct CoreSettings {
    pub(crate) scope: Scope,
    pub(crate) failures: ErrorMatcher,
    pub(crate) neutral: ErrorMatcher,
    pub(crate) policy: BreakerPolicy,
    pub(crate) call_timeout: Duration,
    pub(crate) registry_limits: RegistryLimits,
    pub(crate) metrics_config: MetricsConfig,
    pub(crate) clock: SharedClock,
    pub(crate) backend: Backend,
    pub(crate) on_transition: Option<TransitionHook>,
}

impl Drop for Core {
    fn drop(&mut self) {
        // Best effort: the file store's own drop then writes it and
        // releases the file.
        if let Backend::File(file) = &self.backend {
            file.sync_now(self.file_snapshot(self.clock.now()));
        }
    }
}

impl Core {
    pub(crate) fn new(settings: CoreSettings) -> Self {
        Core {
            inspect_results: settings.failures.looks_at_tool_errors()
                || settings.neutral.looks_at_tool_errors(),
            scope: settings.scope,
            failures: settings.failures,
            neutral: settings.neutral,
            policy: RwLock::new(settings.policy),
            call_timeout: settings.call_timeout,
            registry: Breakers::new(settings.registry_limits),
            calls: Calls::new(MAX_CALLS_IN_FLIGHT),
            metrics: Counters::default(),
            metrics_config: settings.metrics_config,
            clock: settings.clock,
            backend: settings.backend,
            on_transition: settings.on_transition,
            store_errors: AtomicU64::new(0),
            warned_store: AtomicBool::new(false),
            next_sweep: AtomicU64::new(0),
        }
    }

    /// Puts states loaded from a file into the registry.
    pub(crate) fn load(&self, loaded: BTreeMap<String, CircuitBreakerState>) {
        let now = self.clock.now();
        for (key, state) in loaded {
            self.registry.with(&key, now, |e| e.state = state);
        }
    }

    pub(crate) fn policy(&self) -> BreakerPolicy {
        *self.policy.read()
    }

    pub(crate) fn set_policy(&self, policy: BreakerPolicy) {
        *self.policy.write() = policy;
    }

    pub(crate) fn call_timeout(&self) -> Duration {
        self.call_timeout
    }

    pub(crate) fn store_errors(&self) -> u64 {
        self.store_errors.load(Ordering::Relaxed)
    }

    pub(crate) fn calls_in_flight(&self) -> usize {
        self.calls.len()
    }

    /// Every call that reached the breaker: each ended one once by how it
    /// ended, plus those in flight (summed when read, so the request path
    /// bumps one shared counter, not two).
    pub(crate) fn total_requests(&self) -> u64 {
        let m = &self.metrics;
        let read = |c: &AtomicU64| c.load(Ordering::Relaxed);
        read(&m.successful_requests)
            + read(&m.failed_requests)
            + read(&m.neutral_requests)
            + read(&m.rejected_requests)
            + read(&m.untracked_requests)
            + self.calls_in_flight() as u64
    }

    /// The breaker's verdict on `outcome`.
    pub(crate) fn verdict(&self, outcome: &Outcome<'_>) -> Verdict {
        matcher::verdict(&self.failures, &self.neutral, outcome)
    }

    /// Asks whether a call for `key` may start; `request` is a hash of its
    /// JSON-RPC id (0: none), for failures that only know the id. An
    /// admitted call is filed under `filed_as` (a middleware context), or
    /// under a new token when `None`.
    pub(crate) async fn acquire(
        self: &Arc<Self>,
        key: &str,
        request: u64,
        filed_as: Option<CallId>,
    ) -> Result<Admitted, Rejected> {
        let from_store = match &self.backend {
            Backend::Shared(store) => {
                let policy = self.policy();
                match store
                    .acquire(key, &policy, self.clock.now(), fastrand::f64())
                    .await
                {
                    Ok(decided) => Some(decided),
                    Err(error) => {
                        self.store_failed(&error);
                        None
                    }
                }
            }
            Backend::Memory | Backend::File(_) => None,
        };
        let decision = self.decide(key, request, filed_as, from_store);
        self.write_through(decision.write).await;
        decision.result
    }

    /// Decides on a call for `key` and files it: with a shared store's
    /// decision (`from_store`) when there is one, else by the key's state
    /// machine.
    fn decide(
        self: &Arc<Self>,
        key: &str,
        request: u64,
        filed_as: Option<CallId>,
        from_store: Option<(Admission, Option<Transition>)>,
    ) -> Decision {
        let now = self.clock.now();
        self.end_expired(now);
        self.maybe_evict(now);
        let file = matches!(self.backend, Backend::File(_));
        let local = self.registry.with(key, now, |e| {
            let (admission, transition, decided_by) = match from_store {
                Some((admission, transition)) => {
                    adopt(&mut e.state, admission, transition, now);
                    (admission, transition, DecidedBy::Store)
                }
                None => {
                    let policy = self.policy();
                    let (a, t) = state::acquire(&mut e.state, &policy, now, fastrand::f64());
                    (a, t, DecidedBy::Local)
                }
            };
            e.counts.transitions += u64::from(transition.is_some());
            match admission {
                Admission::Rejected { .. } => e.counts.rejections += 1,
                // Undone if the call is not followed after all.
                Admission::Allowed { .. } => e.in_flight += 1,
            }
            Decided {
                admission,
                transition,
                mode: e.state.mode,
                decided_by,
                saved: (file && transition.is_some()).then(|| e.state.clone()),
            }
        });
        // At the key cap the key has no breaker: a store's decision stands
        // (on a breaker of its own, outside the registry); without a store
        // the call is admitted and not followed, so that other keys'
        // failures can never refuse it.
        let (breaker, mut decided) = match local {
            Some((breaker, decided)) => (Some(breaker), decided),
            None => (
                from_store.map(|_| KeyBreaker::detached(key)),
                Decided {
                    admission: from_store.map_or(Admission::Allowed { probe: None }, |d| d.0),
                    transition: from_store.and_then(|d| d.1),
                    mode: BreakerMode::Normal,
                    decided_by: DecidedBy::Store,
                    saved: None,
                },
            ),
        };
        if let Some(t) = decided.transition {
            self.on_transition(key, t);
        }
        let write = match (decided.saved.take(), &breaker) {
            (Some(state), Some(breaker)) => Some((Arc::clone(breaker), state)),
            _ => None,
        };
        Decision {
            result: self.admit(key, request, filed_as, now, decided, breaker),
            write,
        }
    }

    /// What an admission decided means for the call: refused, admitted and
    /// filed, or admitted without being followed.
    fn admit(
        self: &Arc<Self>,
        key: &str,
        request: u64,
        filed_as: Option<CallId>,
        now: Timestamp,
        decided: Decided,
        breaker: Option<Arc<KeyBreaker>>,
    ) -> Result<Admitted, Rejected> {
        match (decided.admission, breaker) {
            (Admission::Rejected { retry_after }, breaker) => {
                self.count(&self.metrics.rejected_requests);
                let retry_after = (decided.mode != BreakerMode::ForcedOpen).then_some(retry_after);
                tracing::debug!(key, ?retry_after, "circuit breaker refused a call");
                Err(Rejected {
                    key: breaker.map_or_else(|| ScopeKey::verbatim(key), |b| b.key.clone()),
                    retry_after,
                })
            }
            (Admission::Allowed { .. }, None) => {
                self.count(&self.metrics.untracked_requests);
                Ok(Admitted::UNTRACKED)
            }
            (Admission::Allowed { .. }, Some(breaker)) if decided.mode == BreakerMode::Disabled => {
                self.untracked(&breaker);
                Ok(Admitted::UNTRACKED)
            }
            (Admission::Allowed { probe }, Some(breaker)) => {
                let call = Call {
                    breaker,
                    probe,
                    decided_by: decided.decided_by,
                    start: now,
                    deadline: now.saturating_add(self.call_timeout),
                    request,
                };
                let filed = match filed_as {
                    None => self.calls.insert(call),
                    Some(id) => self.calls.insert_as(id, call).map(|()| 0),
                };
                match filed {
                    Ok(token) => Ok(Admitted {
                        token,
                        probe: probe.is_some(),
                    }),
                    Err(call) if call.probe.is_some() => {
                        // No place to follow a probe: give its place back
                        // rather than hold it unanswerable until its deadline.
                        let key = call.breaker.key.clone();
                        if let Some(wait) = self.end(call, Verdict::Neutral) {
                            spawn_or_drop(wait);
                        }
                        self.count(&self.metrics.rejected_requests);
                        Err(Rejected {
                            key,
                            retry_after: Some(self.call_timeout),
                        })
                    }
                    Err(call) => {
                        self.untracked(&call.breaker);
                        Ok(Admitted::UNTRACKED)
                    }
                }
            }
        }
    }

    /// With a file: writes a transition's state through before the call
    /// that caused it goes on, or marks the file dirty.
    async fn write_through(&self, write: Option<WriteThrough>) {
        if let Backend::File(file) = &self.backend {
            match write {
                Some((breaker, state)) => {
                    file.note(file.write_through(breaker.key.as_str(), state).await);
                }
                None => file.mark_dirty(),
            }
        }
    }

    /// Like [`acquire`](Self::acquire), with the call held by a [`Permit`].
    pub(crate) async fn acquire_permit(
        self: &Arc<Self>,
        key: ScopeKey,
        request: u64,
    ) -> Result<Permit, Rejected> {
        let a = self.acquire(key.as_str(), request, None).await?;
        Ok(Permit::new(Arc::clone(self), a.token, key, a.probe))
    }

    /// Counts a call admitted and not followed, and undoes its place among
    /// its key's calls in flight.
    fn untracked(&self, breaker: &KeyBreaker) {
        self.count(&self.metrics.untracked_requests);
        let mut e = breaker.entry.lock();
        e.in_flight = e.in_flight.saturating_sub(1);
    }

    fn count(&self, counter: &AtomicU64) {
        if self.metrics_config.enabled {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Ends the call filed under `id` with `verdict`, unless it has ended
    /// already; returns what is left to wait for (a file write, a store
    /// call).
    pub(crate) fn end_call(
        self: &Arc<Self>,
        id: CallId,
        verdict: Verdict,
    ) -> Option<BoxFuture<'static, ()>> {
        if id == CallId::Token(0) {
            return None;
        }
        let call = self.calls.take(id)?;
        self.end(call, verdict)
    }

    /// Ends the oldest call in flight for the JSON-RPC id hashed to
    /// `request` (a transport failure knows only the id).
    pub(crate) fn end_request(
        self: &Arc<Self>,
        request: u64,
        verdict: Verdict,
    ) -> Option<BoxFuture<'static, ()>> {
        let call = self.calls.take_by_request(request)?;
        self.end(call, verdict)
    }

    /// Ends the calls past their deadline as timed out.
    pub(crate) fn end_expired(self: &Arc<Self>, now: Timestamp) {
        if !self.calls.any_expired(now) {
            return;
        }
        for call in self.calls.take_expired(now) {
            tracing::debug!(
                key = call.breaker.key.as_str(),
                "a call got no answer before its deadline"
            );
            if let Some(wait) = self.end(call, Verdict::TimedOut) {
                spawn_or_drop(wait);
            }
        }
    }

    /// Ends `call` with `verdict`: the local part now, the rest returned.
    fn end(self: &Arc<Self>, call: Call, verdict: Verdict) -> Option<BoxFuture<'static, ()>> {
        self.count_verdict(verdict);
        match &self.backend {
            Backend::Shared(_) if call.decided_by == DecidedBy::Store => {
                let this = Arc::clone(self);
                Some(Box::pin(
                    async move { this.end_in_store(call, verdict).await },
                ))
            }
            Backend::Memory | Backend::Shared(_) => {
                self.end_locally(&call, verdict, self.clock.now());
                None
            }
            Backend::File(file) => {
                let saved = self.end_locally(&call, verdict, self.clock.now());
                match saved {
                    Some(state) => {
                        let file = Arc::clone(file);
                        Some(Box::pin(async move {
                            file.note(file.write_through(call.breaker.key.as_str(), state).await);
                        }))
                    }
                    None => {
                        file.mark_dirty();
                        None
                    }
                }
            }
        }
    }

    /// Runs the state machine of the call's key; returns the state to write
    /// through when it made a transition and a file is kept.
    fn end_locally(
        &self,
        call: &Call,
        verdict: Verdict,
        now: Timestamp,
    ) -> Option<CircuitBreakerState> {
        let file = matches!(self.backend, Backend::File(_));
        let elapsed = now.saturating_since(call.start);
        let probe = match call.decided_by {
            DecidedBy::Local => call.probe,
            DecidedBy::Store => None,
        };
        let (transition, saved) = {
            let policy = self.policy();
            let mut e = call.breaker.entry.lock();
            let t = state::record(
                &mut e.state,
                &policy,
                now,
                verdict,
                elapsed,
                probe,
                fastrand::f64(),
            );
            e.counts.count(verdict);
            e.counts.transitions += u64::from(t.is_some());
            e.in_flight = e.in_flight.saturating_sub(1);
            (t, (file && t.is_some()).then(|| e.state.clone()))
        };
        if let Some(t) = transition {
            self.on_transition(call.breaker.key.as_str(), t);
        }
        saved
    }

    async fn end_in_store(&self, call: Call, verdict: Verdict) {
        let Backend::Shared(store) = &self.backend else {
            return;
        };
        let policy = self.policy();
        let now = self.clock.now();
        let elapsed = now.saturating_since(call.start);
        let key = call.breaker.key.as_str();
        let recorded = store
            .record(
                key,
                &policy,
                now,
                verdict,
                elapsed,
                call.probe,
                fastrand::f64(),
            )
            .await;
        match recorded {
            Ok(transition) => {
                {
                    let mut e = call.breaker.entry.lock();
                    e.counts.count(verdict);
                    e.in_flight = e.in_flight.saturating_sub(1);
                    if let Some(t) = transition {
                        e.counts.transitions += 1;
                        adopt_transition(&mut e.state, t, now);
                    }
                }
                if let Some(t) = transition {
                    self.on_transition(key, t);
                }
            }
            Err(error) => {
                self.store_failed(&error);
                let local = Call {
                    decided_by: DecidedBy::Store,
                    ..call
                };
                self.end_locally(&local, verdict, now);
            }
        }
    }

    fn count_verdict(&self, verdict: Verdict) {
        let m = &self.metrics;
        match verdict {
            Verdict::Success => self.count(&m.successful_requests),
            Verdict::Failure => self.count(&m.failed_requests),
            Verdict::Neutral => self.count(&m.neutral_requests),
            Verdict::TimedOut => {
                self.count(&m.failed_requests);
                self.count(&m.timed_out_requests);
            }
        }
    }

    pub(crate) fn on_transition(&self, key: &str, t: Transition) {
        self.count(&self.metrics.state_transitions);
        if let Some(hook) = &self.on_transition {
            (hook.0)(key, t);
        }
        let (from, to, reason) = (t.from.label(), t.to.label(), t.reason.label());
        match t.to {
            CircuitState::Open => tracing::info!(key, from, to, reason, "circuit breaker opened"),
            CircuitState::Closed => {
                tracing::info!(key, from, to, reason, "circuit breaker closed")
            }
            CircuitState::HalfOpen => {
                tracing::info!(key, from, to, reason, "circuit breaker half-open")
            }
        }
    }

    /// Counts a failed call to a shared store; this process's last view of
    /// the key decides instead.
    pub(crate) fn store_failed(&self, error: &StoreError) {
        self.store_errors.fetch_add(1, Ordering::Relaxed);
        if !self.warned_store.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                %error,
                "circuit breaker state store failed; this process decides from the last state \
                 the store reported while it does (failures are counted in `store_errors`)"
            );
        } else {
            tracing::debug!(%error, "circuit breaker state store failed again");
        }
    }

    /// Drops idle keys about twice per idle period.
    fn maybe_evict(&self, now: Timestamp) {
        let next = self.next_sweep.load(Ordering::Relaxed);
        if now.as_nanos() < next {
            return;
        }
        let period = duration_nanos(self.registry.limits().idle_after) / 2;
        let following = now.as_nanos().saturating_add(period.max(1));
        if self
            .next_sweep
            .compare_exchange(next, following, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
            && next != 0
        {
            self.registry.evict_idle(now);
        }
    }

    /// The states of the keys worth keeping in the file at `now`.
    pub(crate) fn file_snapshot(&self, now: Timestamp) -> BTreeMap<String, CircuitBreakerState> {
        let mut states = BTreeMap::new();
        self.registry.for_each(|key, e| {
            if persist::worth_keeping(&e.state, now) {
                states.insert(key.as_str().to_owned(), e.state.clone());
            }
        });
        states
    }
}
