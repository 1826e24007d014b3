//! Permits: the right to make one call through a breaker, and the refusal.
//!
//! ```
//! use pmcp_resilience::circuit_breaker::{CircuitBreakerMiddleware, CircuitState, Verdict};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let cb = CircuitBreakerMiddleware::builder().failure_threshold(2).build().expect("valid");
//! let permit = cb.acquire("global").await.expect("a closed breaker admits");
//! assert_eq!(permit.key().as_str(), "global");
//! permit.record(Verdict::Failure).await;
//! // Dropped without a verdict: neutral, nothing counted against the server.
//! drop(cb.acquire("global").await.expect("still closed"));
//! assert_eq!(cb.state_of("global"), Some(CircuitState::Closed));
//! assert_eq!(cb.metrics().neutral_requests, 1);
//! # }
//! ```

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use super::calls::CallId;
use super::core::Core;
use super::matcher::Outcome;
use super::state::Verdict;
use crate::hooks::BoxFuture;
use crate::scope::ScopeKey;

/// Why a call was not admitted: the key and when to come back.
///
/// ```
/// use pmcp_resilience::circuit_breaker::Verdict;
/// use pmcp_resilience::CircuitBreakerMiddleware;
/// use std::time::Duration;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let cb = CircuitBreakerMiddleware::builder()
///     .failure_threshold(1)
///     .timeout(Duration::from_secs(30))
///     .build()
///     .expect("valid settings");
/// let permit = cb.acquire("global").await.expect("closed");
/// assert_eq!(permit.key().as_str(), "global");
/// permit.record(Verdict::Failure).await; // the server failed: the breaker opens
/// let refused = cb.acquire("global").await.expect_err("open");
/// assert_eq!(refused.key.as_str(), "global");
/// assert!(refused.retry_after.is_some_and(|wait| wait <= Duration::from_secs(30)));
/// # }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// The key whose breaker refused the call.
    pub key: ScopeKey,
    /// How long until the breaker may admit a call again (`None`: not
    /// known, as for a breaker forced open by an operator).
    pub retry_after: Option<Duration>,
}

impl fmt::Display for Rejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "circuit breaker open for `{}`", self.key.as_str())?;
        if let Some(d) = self.retry_after {
            write!(f, "; retry in {:.1} s", d.as_secs_f64())?;
        }
        Ok(())
    }
}

impl std::error::Error for Rejected {}

/// The right to make one call through a breaker, from
/// [`CircuitBreakerMiddleware::acquire`](super::CircuitBreakerMiddleware::acquire).
///
/// Record how the call ended with [`record`](Self::record) (or
/// [`record_outcome`](Self::record_outcome), which asks the breaker's
/// matchers). A permit dropped unrecorded ends its call as
/// [`Verdict::Neutral`]: a half-open probe's place is freed, nothing is
/// counted against the server. A call whose deadline (`call_timeout`) passes
/// first has already ended as [`Verdict::TimedOut`], and a later verdict is
/// ignored: every call ends exactly once.
///
/// ```
/// use pmcp_resilience::circuit_breaker::Verdict;
/// use pmcp_resilience::CircuitBreakerMiddleware;
/// use std::time::Duration;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let cb = CircuitBreakerMiddleware::builder()
///     .failure_threshold(1)
///     .timeout(Duration::from_secs(30))
///     .build()
///     .expect("valid settings");
/// let permit = cb.acquire("global").await.expect("closed");
/// assert_eq!(permit.key().as_str(), "global");
/// permit.record(Verdict::Failure).await; // the server failed: the breaker opens
/// let refused = cb.acquire("global").await.expect_err("open");
/// assert_eq!(refused.key.as_str(), "global");
/// assert!(refused.retry_after.is_some_and(|wait| wait <= Duration::from_secs(30)));
/// # }
/// ```
#[must_use = "a permit dropped at once ends its call as neutral"]
pub struct Permit {
    core: Arc<Core>,
    /// The call's token in the table of calls in flight (0: a call the
    /// breaker does not follow, as in `Disabled` mode).
    token: u64,
    key: ScopeKey,
    probe: bool,
}

impl fmt::Debug for Permit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Permit")
            .field("key", &self.key)
            .field("probe", &self.probe)
            .finish_non_exhaustive()
    }
}

impl Permit {
    pub(crate) fn new(core: Arc<Core>, token: u64, key: ScopeKey, probe: bool) -> Self {
        Permit {
            core,
            token,
            key,
            probe,
        }
    }

    /// The key whose breaker admitted the call.
    pub fn key(&self) -> &ScopeKey {
        &self.key
    }

    /// Whether the call is a half-open probe.
    pub fn is_probe(&self) -> bool {
        self.probe
    }

    /// Ends the call with `verdict`; with a file or a shared store, returns
    /// once the change is written.
    pub async fn record(mut self, verdict: Verdict) {
        let token = std::mem::take(&mut self.token);
        if let Some(wait) = self.core.end_call(CallId::Token(token), verdict) {
            wait.await;
        }
    }

    /// Ends the call with the breaker's verdict on `outcome` (its failure
    /// and neutral matchers).
    pub async fn record_outcome(self, outcome: &Outcome<'_>) {
        let verdict = self.core.verdict(outcome);
        self.record(verdict).await;
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let token = std::mem::take(&mut self.token);
        if let Some(wait) = self.core.end_call(CallId::Token(token), Verdict::Neutral) {
            spawn_or_drop(wait);
        }
    }
}

/// Runs `wait` on the current runtime; without one, the local state is
/// already right and only the write is lost (a file's flusher still writes
/// it within its interval).
pub(crate) fn spawn_or_drop(wait: BoxFuture<'static, ()>) {
    if let Ok(handle) = tokio::runtime::Handle::try_current() {
        handle.spawn(wait);
    }
}
