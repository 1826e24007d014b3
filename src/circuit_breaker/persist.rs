//! Where a breaker's state lives besides its in-memory registry.
//!
//! - [`Backend::Memory`]: the registry alone.
//! - [`Backend::File`]: the registry is the truth and a [`FileBacking`]
//!   mirrors it. Transitions are written through (on disk before the request
//!   or response that caused them returns); other changes (counts of a
//!   closed breaker, mode changes) are written at most one flush interval later.
//! - [`Backend::Shared`]: a [`CircuitBreakerStateStore`] decides (its async
//!   `acquire`/`record`); the registry keeps this process's counters and
//!   the state the store last reported ([`adopt`]), from which this process
//!   goes on when the store fails.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use super::state::{Admission, BreakerMode, CircuitBreakerState, CircuitState, Transition};
use super::store::CircuitBreakerStateStore;
use crate::clock::{SharedClock, Timestamp};
use crate::error::ConfigError;
use crate::persistence::{
    FileBacking, FileStoreOptions, KIND_CIRCUIT_BREAKER, LoadReport, StatePersistence,
};

/// Where a breaker keeps its state.
pub(crate) enum Backend {
    /// In the registry only.
    Memory,
    /// In the registry, mirrored to a file.
    File(Arc<FileBacking<CircuitBreakerState>>),
    /// In a store that decides, possibly shared by several processes.
    Shared(Arc<dyn CircuitBreakerStateStore>),
}

impl fmt::Debug for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Backend::Memory => f.write_str("Memory"),
            Backend::File(file) => f.debug_tuple("File").field(file).finish(),
            Backend::Shared(_) => f.write_str("Shared(..)"),
        }
    }
}

/// A backend opened for `persistence`, with the states it loaded.
pub(crate) struct Opened {
    pub(crate) backend: Backend,
    pub(crate) loaded: BTreeMap<String, CircuitBreakerState>,
}

/// The settings of every kind of store, as the builder holds them.
pub(crate) struct Options {
    pub(crate) file: FileStoreOptions<CircuitBreakerState>,
    #[cfg(feature = "redis")]
    pub(crate) redis: crate::persistence::RedisOptions,
}

/// Opens the backend chosen by `persistence`: the registry alone, mirrored
/// to a file, or the store [`persistence::breaker_store`](crate::persistence::breaker_store) builds.
pub(crate) fn open(
    persistence: &StatePersistence,
    policy: &crate::circuit_breaker::BreakerPolicy,
    options: Options,
    clock: &SharedClock,
) -> Result<Opened, ConfigError> {
    let backend = match persistence {
        StatePersistence::Memory => Backend::Memory,
        StatePersistence::File(path) => {
            let options = options
                .file
                .clock(Arc::clone(clock))
                .expire_on_load(worth_keeping);
            let (backing, loaded, report) = FileBacking::open(path, KIND_CIRCUIT_BREAKER, options)?;
            log_load(&report);
            let now = clock.now();
            let loaded = loaded
                .into_iter()
                .map(|(key, state)| (key, restored(state, policy, now)))
                .collect();
            return Ok(Opened {
                backend: Backend::File(backing),
                loaded,
            });
        }
        _ => crate::persistence::breaker_store(
            persistence,
            policy,
            #[cfg(feature = "redis")]
            options.redis,
        )?
        .map(Backend::Shared)
        .ok_or_else(|| ConfigError::invalid("persistence", "no store for this persistence"))?,
    };
    Ok(Opened {
        backend,
        loaded: BTreeMap::new(),
    })
}

fn log_load(report: &LoadReport) {
    tracing::info!(
        path = %report.path.display(),
        loaded = report.loaded,
        expired = report.expired,
        "circuit breaker state loaded"
    );
}

/// Whether a breaker's state still matters at `now`, so it is worth keeping
/// in the file (and loading from it).
///
/// - An operator's mode (forced open, forced closed, disabled, metrics only)
///   always is.
/// - An open breaker is until its open time is over; after that it is
///   dropped and the key starts closed, with its backoff forgotten.
/// - A half-open one is (it is waiting for probes).
/// - A closed one is while it counts failures or slow calls; a closed
///   breaker with nothing against it is the same as no state.
pub(crate) fn worth_keeping(state: &CircuitBreakerState, now: Timestamp) -> bool {
    if state.mode != BreakerMode::Normal {
        return true;
    }
    match state.state {
        CircuitState::Open => state.open_until > now,
        CircuitState::HalfOpen => true,
        CircuitState::Closed => {
            state.consecutive_failures > 0
                || state.window.iter().any(|b| b.failures > 0 || b.slow > 0)
        }
    }
}

/// A loaded state made fit for this process: probes in flight belonged to
/// the process that wrote the file and will never be answered, so their
/// places are freed rather than blocking new probes until their deadline.
/// Times are clamped to this process's clock: a file written by a clock
/// that was ahead must not keep a key open for the whole skew, so an open
/// time ends no later than the longest open time the policy allows from now.
fn restored(
    mut state: CircuitBreakerState,
    policy: &crate::circuit_breaker::BreakerPolicy,
    now: Timestamp,
) -> CircuitBreakerState {
    state.probes.clear();
    let longest = policy
        .open_backoff
        .map_or(policy.timeout, |b| b.max.max(policy.timeout));
    state.open_until = state.open_until.min(now.saturating_add(longest));
    state.opened_at = state.opened_at.min(now);
    state
}

/// Keeps the state a shared store reported for a key, so that this
/// process can go on from it when the store fails.
pub(crate) fn adopt(
    s: &mut CircuitBreakerState,
    admission: Admission,
    transition: Option<Transition>,
    now: Timestamp,
) {
    if let Some(t) = transition {
        adopt_transition(s, t, now);
    }
    match admission {
        Admission::Allowed { probe: Some(_) } => s.state = CircuitState::HalfOpen,
        Admission::Allowed { probe: None } => {
            if s.state != CircuitState::Closed {
                s.state = CircuitState::Closed;
                s.probes.clear();
            }
        }
        Admission::Rejected { retry_after } => {
            // Half-open with every probe taken (by any process) is, for this
            // process's view, open until a probe may be free again: its own
            // probes must not add to the fleet's if the store fails.
            if s.state != CircuitState::Open {
                s.state = CircuitState::Open;
                s.opened_at = now;
                s.probes.clear();
            }
            s.open_until = now.saturating_add(retry_after);
        }
    }
}

pub(crate) fn adopt_transition(s: &mut CircuitBreakerState, t: Transition, now: Timestamp) {
    s.state = t.to;
    s.probes.clear();
    match t.to {
        CircuitState::Open => s.opened_at = now,
        CircuitState::Closed => s.consecutive_failures = 0,
        CircuitState::HalfOpen => s.half_open_successes = 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn only_state_that_changes_a_decision_is_kept() {
        let now = Timestamp::from_millis(1_000);
        let mut s = CircuitBreakerState::default();
        assert!(!worth_keeping(&s, now), "fresh closed");
        s.consecutive_failures = 1;
        assert!(worth_keeping(&s, now), "closed, counting");
        s.consecutive_failures = 0;
        s.state = CircuitState::Open;
        s.open_until = now.saturating_add(Duration::from_secs(1));
        assert!(worth_keeping(&s, now), "open");
        assert!(!worth_keeping(&s, s.open_until), "open time over");
        s.mode = BreakerMode::ForcedOpen;
        assert!(worth_keeping(&s, s.open_until), "operator's mode");
    }
}
