//! One key's breaker and the bounded map that holds them.
//!
//! Each key's breaker ([`KeyBreaker`]) is its state and counts under a lock
//! of its own. The registry holds one handle per key, and each call in
//! flight holds another: a call ends on its key's breaker directly, without
//! looking the key up a second time. The registry never drops a breaker
//! with calls in flight (nor an open, half-open or forced one), so the
//! breaker a call ends on is the one the registry holds.

use std::sync::Arc;

use parking_lot::Mutex;

use super::state::{BreakerMode, CircuitBreakerState, CircuitState, Verdict};
use crate::clock::Timestamp;
use crate::registry::{KeyState, Registry, RegistryLimits, RegistryStats};
use crate::scope::ScopeKey;

/// A key's counts, as this process saw them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct KeyCounts {
    pub(crate) successes: u64,
    pub(crate) failures: u64,
    pub(crate) neutral: u64,
    pub(crate) timed_out: u64,
    pub(crate) rejections: u64,
    pub(crate) transitions: u64,
}

impl KeyCounts {
    pub(crate) fn count(&mut self, verdict: Verdict) {
        match verdict {
            Verdict::Success => self.successes += 1,
            Verdict::Failure => self.failures += 1,
            Verdict::Neutral => self.neutral += 1,
            Verdict::TimedOut => {
                self.failures += 1;
                self.timed_out += 1;
            }
        }
    }
}

/// A key's state machine, counts and calls in flight.
#[derive(Debug, Default)]
pub(crate) struct Entry {
    pub(crate) state: CircuitBreakerState,
    pub(crate) counts: KeyCounts,
    /// Calls admitted on this key and not yet ended.
    pub(crate) in_flight: u32,
}

impl Entry {
    /// A closed breaker in normal mode with no call in flight: dropping it
    /// loses at most a few failures of a key idle for `idle_after`. An open
    /// or half-open breaker, or an operator's mode, is never dropped.
    fn is_evictable(&self) -> bool {
        self.state.state == CircuitState::Closed
            && self.state.mode == BreakerMode::Normal
            && self.in_flight == 0
    }
}

/// One key's breaker: its key and its entry under a lock of its own.
#[derive(Debug)]
pub(crate) struct KeyBreaker {
    pub(crate) key: ScopeKey,
    pub(crate) entry: Mutex<Entry>,
}

impl KeyBreaker {
    /// A breaker the registry does not hold: for a call a shared store
    /// admitted while the registry is full (the store keeps its state).
    pub(crate) fn detached(key: &str) -> Arc<Self> {
        Arc::new(KeyBreaker {
            key: ScopeKey::verbatim(key),
            entry: Mutex::new(Entry::default()),
        })
    }
}

impl KeyState for Arc<KeyBreaker> {
    fn is_evictable(&self, _now: Timestamp) -> bool {
        // A breaker locked at this moment is in use.
        self.entry.try_lock().is_some_and(|e| e.is_evictable())
    }
}

/// The breakers of one middleware, one per key, bounded by
/// [`RegistryLimits`].
pub(crate) struct Breakers(Registry<Arc<KeyBreaker>>);

impl Breakers {
    pub(crate) fn new(limits: RegistryLimits) -> Self {
        Breakers(Registry::new(limits))
    }

    pub(crate) fn limits(&self) -> RegistryLimits {
        self.0.limits()
    }

    /// Runs `f` on the entry of `key` (created if new) and returns the
    /// key's breaker with the result; `None` at the key cap, where no
    /// breaker is shared with other keys.
    pub(crate) fn with<R>(
        &self,
        key: &str,
        now: Timestamp,
        f: impl FnOnce(&mut Entry) -> R,
    ) -> Option<(Arc<KeyBreaker>, R)> {
        self.0.try_with(key, now, make, |breaker| {
            let r = f(&mut breaker.entry.lock());
            (Arc::clone(breaker), r)
        })
    }

    /// Runs `f` on the entry of `key` if the key is held.
    pub(crate) fn peek<R>(&self, key: &str, f: impl FnOnce(&mut Entry) -> R) -> Option<R> {
        self.0.peek(key, |breaker| f(&mut breaker.entry.lock()))
    }

    /// Visits every key and its entry.
    pub(crate) fn for_each(&self, mut f: impl FnMut(&ScopeKey, &mut Entry)) {
        self.0
            .for_each(|key, breaker| f(key, &mut breaker.entry.lock()));
    }

    /// Drops every idle, evictable key; returns how many were dropped.
    pub(crate) fn evict_idle(&self, now: Timestamp) -> u64 {
        self.0.evict_idle(now)
    }

    pub(crate) fn stats(&self) -> RegistryStats {
        self.0.stats()
    }
}

fn make(key: &ScopeKey) -> Arc<KeyBreaker> {
    Arc::new(KeyBreaker {
        key: key.clone(),
        entry: Mutex::new(Entry::default()),
    })
}
