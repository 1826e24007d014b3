//! The built-in [`RateLimiter`]: every key's state in memory (and, with a
//! file, written to it), in the crate's bounded key map.

use super::entry::{Entry, Fields};
use super::strategy::{Decision, LimiterState, Policy, RateLimitStrategy, Reservation};
use crate::clock::{SharedClock, Timestamp, default_clock, duration_nanos};
use crate::error::{ConfigError, StoreError};
use crate::metrics::StoreReport;
use crate::persistence::{FileBacking, FileStoreOptions, KIND_RATE_LIMIT, LoadReport};
use crate::registry::{KeyMap, RegistryLimits, RegistryStats};
use crate::scope::ScopeKey;
use async_trait::async_trait;
use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::limiter::{Admission, KeyUsage, RateLimiter};

/// The built-in limiter: one state per key, in memory, bounded by
/// [`RegistryLimits`] and sharded for many threads.
///
/// [`check_key`](Self::check_key) is the synchronous fast path: one hash,
/// one shard lock, the strategy's integer arithmetic, and no allocation for a
/// key seen before.
///
/// ```
/// use pmcp_resilience::rate_limit::{KeyedRateLimiter, RateLimitStrategy};
/// use pmcp_resilience::{ManualClock, RegistryLimits};
/// use std::sync::Arc;
///
/// let clock = ManualClock::new();
/// let limiter = KeyedRateLimiter::new(
///     RateLimitStrategy::TokenBucket { capacity: 2, refill_rate: 1 },
///     RegistryLimits::default(),
///     Arc::new(clock.clone()),
/// )?;
/// assert!(limiter.check_key("alice", 1).allowed);
/// assert!(limiter.check_key("alice", 1).allowed);
/// assert!(!limiter.check_key("alice", 1).allowed);
/// assert!(limiter.check_key("bob", 1).allowed);
/// # Ok::<(), pmcp_resilience::ConfigError>(())
/// ```
pub struct KeyedRateLimiter {
    policy: Policy,
    label: &'static str,
    /// Shared with the file sync task (by a weak reference) when persisted.
    registry: Arc<KeyMap<Entry>>,
    clock: SharedClock,
    /// `None` for state in memory only: then the request path does nothing more.
    file: Option<Arc<FileBacking<LimiterState>>>,
}

impl fmt::Debug for KeyedRateLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedRateLimiter")
            .field("policy", &self.policy)
            .field("stats", &self.registry.stats())
            .finish()
    }
}

impl KeyedRateLimiter {
    /// A limiter applying `strategy` to every key, reading time from `clock`.
    pub fn new(
        strategy: RateLimitStrategy,
        limits: RegistryLimits,
        clock: SharedClock,
    ) -> Result<Self, ConfigError> {
        let policy = strategy.policy()?;
        limits.validate()?;
        Ok(Self::from_policy(policy, strategy.label(), limits, clock))
    }

    /// A limiter with the system clock and default limits.
    pub fn with_strategy(strategy: RateLimitStrategy) -> Result<Self, ConfigError> {
        Self::new(strategy, RegistryLimits::default(), default_clock())
    }

    pub(crate) fn from_policy(
        policy: Policy,
        label: &'static str,
        limits: RegistryLimits,
        clock: SharedClock,
    ) -> Self {
        KeyedRateLimiter {
            policy,
            label,
            registry: Arc::new(KeyMap::new(limits, policy)),
            clock,
            file: None,
        }
    }

    /// Opens the state file, loads it into the registry and starts the
    /// background sync.
    pub(crate) fn attach_file(
        &mut self,
        path: &Path,
        options: FileStoreOptions<LimiterState>,
    ) -> Result<LoadReport, ConfigError> {
        let policy = self.policy;
        let options = options
            .clock(Arc::clone(&self.clock))
            .expire_on_load(move |state, now| still_matters(policy, state, now));
        let (backing, entries, report) = FileBacking::open(path, KIND_RATE_LIMIT, options)?;
        let now = self.clock.now();
        for (key, state) in entries {
            self.registry.with(
                &key,
                now,
                |key| Entry::new(key, policy),
                |entry| {
                    let mut fields = entry.fields(policy);
                    fields.state = policy.pack(&state);
                    entry.set_fields(policy, &fields);
                },
            );
        }
        let registry = Arc::downgrade(&self.registry);
        let clock = Arc::clone(&self.clock);
        backing.start(Box::new(move || {
            let registry = registry.upgrade()?;
            Some(snapshot(policy, &registry, clock.now()))
        }));
        self.file = Some(backing);
        Ok(report)
    }

    /// Writes the state of every key that is not back at full capacity to
    /// the state file now (nothing to do without file persistence).
    pub async fn flush(&self) -> Result<(), StoreError> {
        match &self.file {
            Some(file) => file.sync_and_flush().await,
            None => Ok(()),
        }
    }

    /// Writes the state file a last time and releases it for the next owner
    /// (nothing to do without file persistence). The limiter keeps working
    /// in memory; later changes are not written.
    pub async fn shutdown(&self) -> Result<(), StoreError> {
        match &self.file {
            Some(file) => file.shutdown().await,
            None => Ok(()),
        }
    }

    #[inline]
    fn changed(&self) {
        if let Some(file) = &self.file {
            file.mark_dirty();
        }
    }

    pub(crate) fn policy(&self) -> Policy {
        self.policy
    }

    /// The strategy's name (`token_bucket`, ...).
    pub fn strategy_label(&self) -> &'static str {
        self.label
    }

    /// The per-key limit.
    pub fn limit(&self) -> u32 {
        self.policy.limit()
    }

    /// Decides on `cost` units for `key` now, without waiting.
    #[inline]
    pub fn check_key(&self, key: &str, cost: u32) -> Decision {
        self.check_key_at(key, cost, self.clock.now())
    }

    /// Decides on `cost` units for `key` at `now`, without waiting.
    #[inline]
    pub fn check_key_at(&self, key: &str, cost: u32, now: Timestamp) -> Decision {
        let policy = self.policy;
        let nanos = now.as_nanos();
        let decision = self.registry.with(
            key,
            now,
            |key| Entry::new(key, policy),
            |entry| {
                let mut fields = entry.fields(policy);
                let mut state = policy.unpack(fields.state);
                let decision = policy.acquire(&mut state, nanos, cost, 0);
                record(policy, &mut fields, &state, &decision);
                entry.set_fields(policy, &fields);
                decision
            },
        );
        self.changed();
        decision
    }

    /// Admits `cost` units for `key` at `now` if they are available with no
    /// wait, and records the admission; otherwise records nothing and
    /// returns the decision saying how long until they are (a rejection with
    /// `retry_after`, or for the leaky bucket an admission with a `wait`).
    /// The waiting line's head asks this until it is admitted.
    pub(crate) fn admit_now(&self, key: &str, cost: u32, now: Timestamp) -> Decision {
        let policy = self.policy;
        let nanos = now.as_nanos();
        let decision = self.registry.with(
            key,
            now,
            |key| Entry::new(key, policy),
            |entry| {
                let mut fields = entry.fields(policy);
                let mut state = policy.unpack(fields.state);
                let decision = policy.acquire(&mut state, nanos, cost, 0);
                if decision.allowed && decision.wait.is_zero() {
                    record(policy, &mut fields, &state, &decision);
                    entry.set_fields(policy, &fields);
                }
                decision
            },
        );
        if decision.allowed && decision.wait.is_zero() {
            self.changed();
        }
        decision
    }

    /// The decision `cost` units for `key` would get at `now` behind
    /// requests of `ahead` units, each served in turn, if it may wait up to
    /// `max_wait`: admitted with the wait, or rejected with how long it
    /// would take. Records nothing.
    pub(crate) fn decide_behind(
        &self,
        key: &str,
        ahead: impl Iterator<Item = u32>,
        cost: u32,
        now: Timestamp,
        max_wait: Duration,
    ) -> Decision {
        let policy = self.policy;
        let nanos = now.as_nanos();
        let mut state = self
            .registry
            .peek(key, |entry| entry.limiter_state(policy))
            .unwrap_or_else(|| policy.initial_state());
        for units in ahead {
            // Each request ahead is served before this one, however long it waits.
            policy.acquire(&mut state, nanos, units, u64::MAX);
        }
        policy.acquire(&mut state, nanos, cost, duration_nanos(max_wait))
    }

    /// Counts a rejection the limiter's state did not record (a request
    /// turned away before it could queue).
    pub(crate) fn count_rejection(&self, key: &str) {
        let policy = self.policy;
        self.registry.peek(key, |entry| {
            let mut fields = entry.fields(policy);
            fields.rejected = fields.rejected.saturating_add(1);
            entry.set_fields(policy, &fields);
        });
    }

    /// Decides on `cost` units for `key` at `now`, reserving a later slot
    /// within `max_wait` (see [`RateLimitStrategy::acquire`]).
    pub fn acquire_key_at(
        &self,
        key: &str,
        cost: u32,
        now: Timestamp,
        max_wait: Duration,
    ) -> Admission {
        let policy = self.policy;
        let nanos = now.as_nanos();
        let max_wait = duration_nanos(max_wait);
        let admission = self.registry.with(
            key,
            now,
            |key| Entry::new(key, policy),
            |entry| {
                let mut fields = entry.fields(policy);
                let before = policy.unpack(fields.state);
                let mut state = before;
                let decision = policy.acquire(&mut state, nanos, cost, max_wait);
                record(policy, &mut fields, &state, &decision);
                entry.set_fields(policy, &fields);
                let reservation =
                    (decision.allowed && !decision.wait.is_zero()).then_some(Reservation {
                        cost,
                        before,
                        after: state,
                    });
                Admission {
                    decision,
                    reservation,
                }
            },
        );
        self.changed();
        admission
    }

    /// Gives back a reservation that was not used (see [`Reservation`]).
    /// Returns whether it was given back.
    pub fn cancel_at(&self, key: &str, reservation: &Reservation, now: Timestamp) -> bool {
        let policy = self.policy;
        let refunded = self
            .registry
            .peek(key, |entry| {
                let mut fields = entry.fields(policy);
                let mut state = policy.unpack(fields.state);
                let refunded = policy.refund(&mut state, reservation, now.as_nanos());
                if refunded {
                    fields.state = policy.pack(&state);
                    fields.allowed = fields.allowed.saturating_sub(1);
                    entry.set_fields(policy, &fields);
                }
                refunded
            })
            .unwrap_or(false);
        if refunded {
            self.changed();
        }
        refunded
    }

    /// How long until a request of `cost` units for `key` would be admitted,
    /// without recording anything: `None` if it would be admitted now (or
    /// the key is unknown, hence full), `Some(Duration::MAX)` if never.
    pub fn retry_after(&self, key: &str, cost: u32) -> Option<Duration> {
        let now = self.clock.now().as_nanos();
        let policy = self.policy;
        let decision = self
            .registry
            .peek(key, |entry| {
                let mut state = entry.limiter_state(policy);
                policy.acquire(&mut state, now, cost, 0)
            })
            .unwrap_or_else(|| {
                let mut state = policy.initial_state();
                policy.acquire(&mut state, now, cost, 0)
            });
        if decision.allowed && decision.wait.is_zero() {
            None
        } else if decision.allowed {
            Some(decision.wait)
        } else {
            Some(decision.retry_after.unwrap_or(Duration::MAX))
        }
    }

    /// The use of every key at `now`.
    pub fn usage_at(&self, now: Timestamp) -> Vec<KeyUsage> {
        let policy = self.policy;
        let nanos = now.as_nanos();
        let mut rows = Vec::new();
        self.registry.for_each(|entry| {
            let fields = entry.fields(policy);
            let (used, reset_at) = policy.usage(&policy.unpack(fields.state), nanos);
            rows.push(KeyUsage {
                key: ScopeKey::verbatim(entry.key_str(policy)),
                used,
                limit: policy.limit(),
                reset_at: Timestamp::from_nanos(reset_at),
                allowed: u64::from(fields.allowed),
                rejected: u64::from(fields.rejected),
            });
        });
        rows
    }

    /// Drops idle keys that are back at full capacity; returns how many.
    pub fn evict_idle(&self) -> u64 {
        self.registry.evict_idle(self.clock.now())
    }

    /// The bounds on the key map.
    pub fn registry_limits(&self) -> RegistryLimits {
        self.registry.limits()
    }

    /// Counters of the key map.
    pub fn registry_stats(&self) -> RegistryStats {
        self.registry.stats()
    }
}

impl Drop for KeyedRateLimiter {
    fn drop(&mut self) {
        // Best effort: the file store's own drop then writes what is pending.
        if let Some(file) = &self.file {
            file.sync_now(snapshot(self.policy, &self.registry, self.clock.now()));
        }
    }
}

/// Whether a stored state still changes a decision at `now`: a key back at
/// full capacity (or state of another strategy) is the same as no state.
fn still_matters(policy: Policy, state: &LimiterState, now: Timestamp) -> bool {
    policy.full_at(state) > now.as_nanos()
}

/// The keys not back at full capacity at `now`, with their state.
fn snapshot(
    policy: Policy,
    registry: &KeyMap<Entry>,
    now: Timestamp,
) -> BTreeMap<String, LimiterState> {
    let nanos = now.as_nanos();
    let mut entries = BTreeMap::new();
    registry.for_each(|entry| {
        let state = entry.limiter_state(policy);
        if policy.full_at(&state) > nanos {
            entries.insert(entry.key_str(policy).to_owned(), state);
        }
    });
    entries
}

#[inline]
fn record(policy: Policy, fields: &mut Fields, state: &LimiterState, decision: &Decision) {
    if decision.allowed {
        fields.state = policy.pack(state);
        fields.allowed = fields.allowed.saturating_add(1);
    } else {
        fields.rejected = fields.rejected.saturating_add(1);
    }
}

#[async_trait]
impl RateLimiter for KeyedRateLimiter {
    async fn check(
        &self,
        key: &ScopeKey,
        cost: u32,
        now: Timestamp,
    ) -> Result<Decision, StoreError> {
        Ok(self.check_key_at(key.as_str(), cost, now))
    }

    async fn acquire(
        &self,
        key: &ScopeKey,
        cost: u32,
        now: Timestamp,
        max_wait: Duration,
    ) -> Result<Admission, StoreError> {
        Ok(self.acquire_key_at(key.as_str(), cost, now, max_wait))
    }

    async fn cancel(
        &self,
        key: &ScopeKey,
        reservation: &Reservation,
        now: Timestamp,
    ) -> Result<bool, StoreError> {
        Ok(self.cancel_at(key.as_str(), reservation, now))
    }

    fn usage(&self, now: Timestamp) -> Vec<KeyUsage> {
        self.usage_at(now)
    }

    fn stats(&self) -> RegistryStats {
        self.registry.stats()
    }

    fn store_report(&self) -> StoreReport {
        if self.file.is_some() {
            StoreReport::new("file", "normal")
        } else {
            StoreReport::memory()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use std::sync::Arc;

    #[test]
    fn only_keys_back_at_full_capacity_are_evicted() {
        let strategies = [
            RateLimitStrategy::TokenBucket {
                capacity: 2,
                refill_rate: 1,
            },
            RateLimitStrategy::LeakyBucket {
                capacity: 2,
                leak_rate: 1,
            },
            RateLimitStrategy::FixedWindow {
                max_requests: 2,
                window: Duration::from_secs(1),
            },
            RateLimitStrategy::SlidingWindow {
                max_requests: 2,
                window: Duration::from_secs(1),
            },
        ];
        for strategy in strategies {
            let clock = ManualClock::new();
            let limits = RegistryLimits {
                max_keys: 100,
                idle_after: Duration::from_millis(500),
            };
            let limiter = KeyedRateLimiter::new(strategy, limits, Arc::new(clock.clone())).unwrap();
            limiter.check_key("busy", 2);
            limiter.check_key("light", 1);
            clock.advance(Duration::from_millis(600));
            // Idle, but neither is back at full capacity yet.
            assert_eq!(limiter.evict_idle(), 0, "{}", strategy.label());
            clock.advance(Duration::from_secs(3));
            assert_eq!(limiter.evict_idle(), 2, "{}", strategy.label());
            assert_eq!(limiter.registry_stats().keys, 0);
        }
    }

    #[test]
    fn retry_after_does_not_record() {
        let clock = ManualClock::new();
        let limiter = KeyedRateLimiter::new(
            RateLimitStrategy::TokenBucket {
                capacity: 1,
                refill_rate: 4,
            },
            RegistryLimits::default(),
            Arc::new(clock.clone()),
        )
        .unwrap();
        assert_eq!(limiter.retry_after("k", 1), None);
        assert!(limiter.check_key("k", 1).allowed);
        for _ in 0..3 {
            assert_eq!(
                limiter.retry_after("k", 1),
                Some(Duration::from_millis(250))
            );
        }
        assert_eq!(limiter.retry_after("k", 2), Some(Duration::MAX), "never");
    }
}
