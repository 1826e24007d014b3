//! The store seam of the breaker (documented for store authors in
//! [`crate::store`]) and the store in memory.

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;

use super::metrics::KeySnapshot;
use super::state::{
    self, Admission, BreakerMode, BreakerPolicy, CircuitBreakerState, ProbeId, Transition, Verdict,
};
use crate::clock::Timestamp;
use crate::error::StoreError;

/// A store of per-key breaker state: implement it to keep breaker state
/// somewhere of your own ([`crate::store`] has a complete example), and give
/// it to a breaker with [`StatePersistence::Custom`](crate::StatePersistence::Custom).
///
/// ```
/// use pmcp_resilience::store::{CircuitBreakerStateStore, InMemoryStateStore};
/// use pmcp_resilience::{CircuitBreakerMiddleware, StatePersistence};
/// use std::sync::Arc;
///
/// # fn main() -> Result<(), pmcp_resilience::ConfigError> {
/// let store: Arc<dyn CircuitBreakerStateStore> = Arc::new(InMemoryStateStore::new());
/// let breaker = CircuitBreakerMiddleware::builder()
///     .persistence(StatePersistence::Custom(store))
///     .build()?;
/// # drop(breaker);
/// # Ok(())
/// # }
/// ```
#[async_trait]
pub trait CircuitBreakerStateStore: Send + Sync {
    /// The state of `key`, if the store has one.
    async fn get_state(&self, key: &str) -> Result<Option<CircuitBreakerState>, StoreError>;

    /// Replaces the state of `key`.
    async fn set_state(&self, key: &str, state: CircuitBreakerState) -> Result<(), StoreError>;

    /// A row per stored key (counters are zero for stores that keep only state).
    async fn get_metrics(&self) -> Result<HashMap<String, KeySnapshot>, StoreError>;

    /// Refuses a policy the store cannot apply (checked at `build()` and by
    /// `reconfigure`); the default accepts every policy.
    fn check_policy(&self, policy: &BreakerPolicy) -> Result<(), crate::error::ConfigError> {
        let _ = policy;
        Ok(())
    }

    /// Where the store keeps state and how it is doing, for the unified
    /// metrics (default: kind `custom`, mode `normal`).
    fn store_report(&self) -> crate::metrics::StoreReport {
        crate::metrics::StoreReport::new("custom", "normal")
    }

    /// Runs [`acquire`](crate::store::acquire) on `key`. The default reads, decides and writes
    /// back, which is atomic only for a store private to one process.
    async fn acquire(
        &self,
        key: &str,
        policy: &BreakerPolicy,
        now: Timestamp,
        jitter: f64,
    ) -> Result<(Admission, Option<Transition>), StoreError> {
        let mut s = self.get_state(key).await?.unwrap_or_default();
        let decision = state::acquire(&mut s, policy, now, jitter);
        self.set_state(key, s).await?;
        Ok(decision)
    }

    /// Runs [`record`](crate::store::record) on `key` (see [`Self::acquire`] about atomicity).
    #[allow(clippy::too_many_arguments)]
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
        let mut s = self.get_state(key).await?.unwrap_or_default();
        let transition = state::record(&mut s, policy, now, result, elapsed, probe, jitter);
        self.set_state(key, s).await?;
        Ok(transition)
    }

    /// Sets the operator's mode of `key` (forced open, forced closed,
    /// disabled, metrics only, or back to normal), keeping its counts. The
    /// default reads and writes the state; a store shared by several
    /// processes should do it in one atomic step, so that a trip recorded
    /// in between is not undone.
    async fn set_mode(&self, key: &str, mode: BreakerMode) -> Result<(), StoreError> {
        let mut s = self.get_state(key).await?.unwrap_or_default();
        state::set_mode(&mut s, mode);
        self.set_state(key, s).await
    }
}

/// A [`CircuitBreakerStateStore`] in process memory (for tests and as the
/// model the other stores follow): breakers built on one store share state.
///
/// ```
/// use pmcp_resilience::store::{CircuitBreakerStateStore, InMemoryStateStore};
/// use pmcp_resilience::{CircuitBreakerMiddleware, StatePersistence};
/// use std::sync::Arc;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let store = Arc::new(InMemoryStateStore::new());
/// assert!(store.get_state("tool:search").await?.is_none());
/// let cb = CircuitBreakerMiddleware::builder()
///     .persistence(StatePersistence::Custom(store.clone()))
///     .build()?;
/// # drop(cb);
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Default)]
pub struct InMemoryStateStore {
    states: Mutex<HashMap<String, CircuitBreakerState>>,
}

impl InMemoryStateStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl CircuitBreakerStateStore for InMemoryStateStore {
    fn store_report(&self) -> crate::metrics::StoreReport {
        crate::metrics::StoreReport::memory()
    }

    async fn get_state(&self, key: &str) -> Result<Option<CircuitBreakerState>, StoreError> {
        Ok(self.states.lock().get(key).cloned())
    }

    async fn set_state(&self, key: &str, state: CircuitBreakerState) -> Result<(), StoreError> {
        self.states.lock().insert(key.to_owned(), state);
        Ok(())
    }

    async fn get_metrics(&self) -> Result<HashMap<String, KeySnapshot>, StoreError> {
        Ok(self
            .states
            .lock()
            .iter()
            .map(|(k, s)| {
                let row = KeySnapshot {
                    key: k.clone(),
                    state: s.effective_state(),
                    successes: 0,
                    failures: 0,
                    rejections: 0,
                    transitions: 0,
                };
                (k.clone(), row)
            })
            .collect())
    }

    async fn acquire(
        &self,
        key: &str,
        policy: &BreakerPolicy,
        now: Timestamp,
        jitter: f64,
    ) -> Result<(Admission, Option<Transition>), StoreError> {
        let mut states = self.states.lock();
        let s = states.entry(key.to_owned()).or_default();
        Ok(state::acquire(s, policy, now, jitter))
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
        let mut states = self.states.lock();
        let s = states.entry(key.to_owned()).or_default();
        Ok(state::record(
            s, policy, now, result, elapsed, probe, jitter,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn memory_store_runs_the_state_machine_per_key() {
        let store = InMemoryStateStore::new();
        let policy = BreakerPolicy {
            consecutive_failures: 1,
            ..BreakerPolicy::default()
        };
        let now = Timestamp::from_millis(10);
        let r = store
            .record(
                "a",
                &policy,
                now,
                Verdict::Failure,
                Duration::ZERO,
                None,
                0.5,
            )
            .await;
        assert!(matches!(r, Ok(Some(_))));
        let (admission, _) = store
            .acquire("a", &policy, now, 0.5)
            .await
            .unwrap_or((Admission::Allowed { probe: None }, None));
        assert!(matches!(admission, Admission::Rejected { .. }));
        let (b, _) = store.acquire("b", &policy, now, 0.5).await.unwrap_or((
            Admission::Rejected {
                retry_after: Duration::ZERO,
            },
            None,
        ));
        assert_eq!(b, Admission::Allowed { probe: None });
        let rows = store.get_metrics().await.unwrap_or_default();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows["a"].state, super::super::CircuitState::Open);
    }
}
