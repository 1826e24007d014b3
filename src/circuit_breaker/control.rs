//! What an operator and a dashboard do with a breaker: read its state and
//! metrics, change its policy, force a key's mode.
//!
//! ```
//! use pmcp_resilience::circuit_breaker::{CircuitBreakerMiddleware, CircuitState};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let cb = CircuitBreakerMiddleware::builder().build().expect("valid settings");
//! cb.force_open("global");
//! assert_eq!(cb.state_of("global"), Some(CircuitState::Open));
//! assert!(cb.acquire("global").await.is_err());
//! cb.reset_mode("global");
//! cb.set_failure_threshold(10).expect("a valid threshold");
//! assert_eq!(cb.policy().consecutive_failures, 10);
//! # }
//! ```

use std::sync::Arc;
use std::time::Duration;

use super::config::validate_policy;
use super::core::Core;
use super::metrics::{CircuitBreakerMetrics, Counters, KeySnapshot};
use super::middleware::CircuitBreakerMiddleware;
use super::persist::Backend;
use super::state::{self, BreakerMode, BreakerPolicy, CircuitState};
use crate::error::ConfigError;

impl CircuitBreakerMiddleware {
    /// The breaker now: its counters, a row per key (sorted by key; none
    /// when `MetricsConfig::per_key` is off) and its store, as an owned
    /// copy. Calls past their deadline are ended first.
    ///
    /// ```
    /// use pmcp_resilience::CircuitBreakerMiddleware;
    ///
    /// let cb = CircuitBreakerMiddleware::builder().build()?;
    /// let m = cb.metrics();
    /// assert_eq!(m.total_requests, m.successful_requests + m.failed_requests
    ///     + m.neutral_requests + m.rejected_requests + m.in_flight + m.untracked_requests);
    /// # Ok::<(), pmcp_resilience::ConfigError>(())
    /// ```
    pub fn metrics(&self) -> CircuitBreakerMetrics {
        let core = &self.core;
        core.end_expired(core.clock.now());
        let mut keys = Vec::new();
        if core.metrics_config.per_key {
            core.registry.for_each(|key, e| {
                keys.push(KeySnapshot {
                    key: key.as_str().to_owned(),
                    state: e.state.effective_state(),
                    successes: e.counts.successes,
                    failures: e.counts.failures,
                    rejections: e.counts.rejections,
                    transitions: e.counts.transitions,
                });
            });
            keys.sort_by(|a, b| a.key.cmp(&b.key));
        }
        let m = &core.metrics;
        let read = Counters::read;
        let mut metrics = CircuitBreakerMetrics::new(self.report_name(), core.scope.label());
        metrics.total_requests = core.total_requests();
        metrics.successful_requests = read(&m.successful_requests);
        metrics.failed_requests = read(&m.failed_requests);
        metrics.rejected_requests = read(&m.rejected_requests);
        metrics.neutral_requests = read(&m.neutral_requests);
        metrics.timed_out_requests = read(&m.timed_out_requests);
        metrics.untracked_requests = read(&m.untracked_requests);
        metrics.in_flight = core.calls_in_flight() as u64;
        metrics.state_transitions = read(&m.state_transitions);
        metrics.keys = keys;
        metrics.registry = core.registry.stats();
        metrics.store = self.store_report();
        metrics
    }

    /// The same as [`metrics`](Self::metrics).
    #[deprecated(note = "use `metrics()`, which returns the same plain snapshot")]
    pub fn snapshot(&self) -> CircuitBreakerMetrics {
        self.metrics()
    }

    /// The state of `key` as callers see it, or `None` if the key is not
    /// held. Calls past their deadline are ended first.
    ///
    /// `key` is the key text of the breaker's scope, prefix included:
    /// `tool:search`, `method:tools/call`, `global`; [`key_of`](Self::key_of)
    /// and [`key_of_tool`](Self::key_of_tool) build it. A bare `search` is
    /// no key (`None`, with a debug hint in the log).
    pub fn state_of(&self, key: &str) -> Option<CircuitState> {
        self.core.end_expired(self.core.clock.now());
        let state = self.core.registry.peek(key, |e| e.state.effective_state());
        if state.is_none() {
            crate::scope::hint_if_bare(key, &self.core.scope);
        }
        state
    }

    /// How long until `key` may admit a call, if it is rejecting now
    /// (`None` for a closed, unknown or forced-open key). `key` has the form
    /// [`state_of`](Self::state_of) takes (`tool:search`).
    pub fn retry_after(&self, key: &str) -> Option<Duration> {
        let now = self.core.clock.now();
        let wait = self
            .core
            .registry
            .peek(key, |e| e.state.retry_after(now))
            .flatten();
        if wait.is_none() {
            crate::scope::hint_if_bare(key, &self.core.scope);
        }
        wait
    }

    /// The policy in force.
    pub fn policy(&self) -> BreakerPolicy {
        self.core.policy()
    }

    /// The call deadline: a call with no answer within it ends as timed out.
    pub fn call_timeout(&self) -> Duration {
        self.core.call_timeout()
    }

    /// Replaces the policy at run time; every key keeps its state and counts
    /// (a window of another shape starts empty).
    pub fn reconfigure(&self, policy: BreakerPolicy) -> Result<(), ConfigError> {
        validate_policy(&policy)?;
        if let Backend::Shared(store) = &self.core.backend {
            store.check_policy(&policy)?;
        }
        self.core.set_policy(policy);
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
        let core = &self.core;
        let now = core.clock.now();
        let set = |core: &Core| {
            core.registry
                .with(key, now, |e| {
                    state::set_mode(&mut e.state, mode);
                    e.state.clone()
                })
                .map(|(_, saved)| saved)
        };
        let saved = set(core).or_else(|| {
            core.registry.evict_idle(now);
            set(core)
        });
        let Some(saved) = saved else {
            tracing::warn!(
                key,
                ?mode,
                "circuit breaker: the key registry is full; the mode was not set"
            );
            return;
        };
        match &core.backend {
            Backend::File(file) => {
                file.mark_dirty();
                file.write_detached(key, saved);
            }
            Backend::Shared(store) => self.set_shared_mode(store, key, mode),
            Backend::Memory => {}
        }
        tracing::info!(key, ?mode, "circuit breaker mode changed");
    }

    /// Sets an operator mode in a shared store, in the background.
    fn set_shared_mode(
        &self,
        store: &Arc<dyn super::store::CircuitBreakerStateStore>,
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
        let core = Arc::clone(&self.core);
        let key = key.to_owned();
        handle.spawn(async move {
            if let Err(error) = store.set_mode(&key, mode).await {
                core.store_failed(&error);
            }
        });
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
        self.core.registry.evict_idle(self.core.clock.now())
    }
}
