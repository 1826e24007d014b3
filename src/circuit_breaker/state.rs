//! One key's breaker state, and the values the state machine
//! ([`super::machine`]) takes and returns: admissions, verdicts and
//! transitions. The state is small plain data, serialisable with serde, so
//! the memory, file and Redis stores only move it.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::machine::current_slot;
pub(crate) use super::machine::{acquire, record, set_mode};
pub(crate) use super::policy::{BreakerPolicy, SlidingWindow};
use crate::clock::Timestamp;

/// Number of buckets of the outcome window (fixed, so the state stays small).
pub(crate) const WINDOW_BUCKETS: usize = 8;

/// The three states of a circuit breaker.
///
/// ```
/// use pmcp_resilience::{CircuitBreakerMiddleware, CircuitState};
///
/// let cb = CircuitBreakerMiddleware::builder().build().expect("valid settings");
/// assert_eq!(cb.state_of("global"), None); // no call yet
/// cb.force_open("global");
/// assert_eq!(cb.state_of("global"), Some(CircuitState::Open));
/// assert_eq!(CircuitState::HalfOpen.to_string(), "half-open");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum CircuitState {
    /// Calls flow; outcomes are counted.
    #[default]
    Closed,
    /// Calls are rejected until the open time ends.
    Open,
    /// A limited number of probe calls test whether the server has healed.
    HalfOpen,
}

impl CircuitState {
    /// The gauge value used by metrics exporters: 0 closed, 1 open, 2 half-open.
    pub fn as_gauge(self) -> u8 {
        match self {
            CircuitState::Closed => 0,
            CircuitState::Open => 1,
            CircuitState::HalfOpen => 2,
        }
    }

    /// A lower-case label (`closed`, `open`, `half_open`).
    pub fn label(self) -> &'static str {
        match self {
            CircuitState::Closed => "closed",
            CircuitState::Open => "open",
            CircuitState::HalfOpen => "half_open",
        }
    }
}

/// Prints the state as a person reads it: `closed`, `open`, `half-open`.
///
/// ```
/// use pmcp_resilience::CircuitState;
/// assert_eq!(CircuitState::HalfOpen.to_string(), "half-open");
/// ```
impl std::fmt::Display for CircuitState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // `pad`, so that widths (`{:<9}`) line states up.
        f.pad(match self {
            CircuitState::Closed => "closed",
            CircuitState::Open => "open",
            CircuitState::HalfOpen => "half-open",
        })
    }
}

/// An operator's override of one key's breaker.
///
/// ```
/// use pmcp_resilience::circuit_breaker::BreakerPolicy;
/// use pmcp_resilience::store::{acquire, set_mode, Admission, BreakerMode, CircuitBreakerState};
/// use pmcp_resilience::{CircuitBreakerMiddleware, CircuitState, Timestamp};
///
/// // Operators set a mode through the middleware...
/// let cb = CircuitBreakerMiddleware::builder().build().expect("valid settings");
/// cb.force_open("global");
/// assert_eq!(cb.state_of("global"), Some(CircuitState::Open));
/// // ...which a store keeps with the key's state.
/// let mut state = CircuitBreakerState::default();
/// set_mode(&mut state, BreakerMode::ForcedOpen);
/// assert_eq!(state.mode(), BreakerMode::ForcedOpen);
/// let (admission, _) = acquire(&mut state, &BreakerPolicy::default(), Timestamp::from_millis(1_000), 0.5);
/// assert!(matches!(admission, Admission::Rejected { .. }));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[non_exhaustive]
pub enum BreakerMode {
    /// The state machine decides.
    #[default]
    Normal,
    /// Every call is rejected, whatever the counts say.
    ForcedOpen,
    /// Every call is admitted; outcomes are not counted.
    ForcedClosed,
    /// The breaker does nothing: it never rejects and never counts.
    Disabled,
    /// Transitions and metrics are computed as usual, but no call is rejected
    /// (a dry run of a new configuration).
    MetricsOnly,
}

/// One bucket of the outcome window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub(crate) struct Bucket {
    /// Which slot of time (or of calls) the counts belong to.
    pub(crate) slot: u64,
    /// Calls finished in the slot.
    pub(crate) calls: u32,
    /// Failed calls in the slot.
    pub(crate) failures: u32,
    /// Slow calls in the slot.
    pub(crate) slow: u32,
}

/// A half-open probe in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Probe {
    /// The probe's id, handed to the caller by [`acquire`].
    pub(crate) id: ProbeId,
    /// When the probe counts as failed if no answer came.
    pub(crate) deadline: Timestamp,
}

/// Identifies a half-open probe so that its answer frees its place.
///
/// ```
/// use pmcp_resilience::circuit_breaker::{BreakerPolicy, CircuitState, Verdict};
/// use pmcp_resilience::store::{acquire, record, Admission, CircuitBreakerState};
/// use pmcp_resilience::Timestamp;
/// use std::time::Duration;
///
/// let policy = BreakerPolicy { consecutive_failures: 1, success_threshold: 1, ..BreakerPolicy::default() };
/// let mut state = CircuitBreakerState::default();
/// let now = Timestamp::from_millis(1_000);
/// record(&mut state, &policy, now, Verdict::Failure, Duration::ZERO, None, 0.5); // opens
/// // Once the open time is over, the next call is a half-open probe with an id...
/// let later = now.saturating_add(policy.timeout);
/// let (Admission::Allowed { probe: Some(probe) }, _) = acquire(&mut state, &policy, later, 0.5) else {
///     panic!("a probe");
/// };
/// // ...that its outcome hands back, freeing its place.
/// record(&mut state, &policy, later, Verdict::Success, Duration::ZERO, Some(probe), 0.5);
/// assert_eq!(state.effective_state(), CircuitState::Closed);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ProbeId(pub(crate) u32);

/// The persistent state of one key's breaker: integers and timestamps only,
/// opaque, and serialisable with serde (a store keeps it as it is). The
/// state machine of [`crate::store`] moves it on.
///
/// ```
/// use pmcp_resilience::circuit_breaker::{BreakerPolicy, CircuitState, Verdict};
/// use pmcp_resilience::store::{record, CircuitBreakerState};
/// use pmcp_resilience::Timestamp;
/// use std::time::Duration;
///
/// let policy = BreakerPolicy { consecutive_failures: 1, ..BreakerPolicy::default() };
/// let mut state = CircuitBreakerState::default();
/// let now = Timestamp::from_millis(1_000);
/// record(&mut state, &policy, now, Verdict::Failure, Duration::ZERO, None, 0.5);
/// assert_eq!(state.effective_state(), CircuitState::Open);
/// assert_eq!(state.retry_after(now), Some(policy.timeout));
/// let row = serde_json::to_string(&state).expect("plain data");
/// assert_eq!(serde_json::from_str::<CircuitBreakerState>(&row).ok(), Some(state));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct CircuitBreakerState {
    /// Closed, open or half-open.
    pub(crate) state: CircuitState,
    /// The operator's override for this key.
    pub(crate) mode: BreakerMode,
    /// Failures since the last success (closed state).
    pub(crate) consecutive_failures: u32,
    /// Successful probes since entering half-open.
    pub(crate) half_open_successes: u32,
    /// Trips since the breaker last closed (drives the backoff).
    pub(crate) trips: u32,
    /// When the breaker last opened.
    pub(crate) opened_at: Timestamp,
    /// When an open breaker lets probes through.
    pub(crate) open_until: Timestamp,
    /// Probes in flight.
    pub(crate) probes: Vec<Probe>,
    /// Source of probe ids.
    pub(crate) next_probe: u32,
    /// The outcome window: empty while no rule reads it (keeping the
    /// per-key state small), else `WINDOW_BUCKETS` buckets.
    pub(crate) window: Vec<Bucket>,
    /// The current slot of a count window.
    pub(crate) window_head: u64,
    /// The shape the window was counted under.
    pub(crate) window_shape: u64,
}

/// Whether a call may start.
///
/// ```
/// use pmcp_resilience::circuit_breaker::{BreakerPolicy, Verdict};
/// use pmcp_resilience::store::{acquire, record, Admission, CircuitBreakerState};
/// use pmcp_resilience::Timestamp;
/// use std::time::Duration;
///
/// let policy = BreakerPolicy { consecutive_failures: 1, ..BreakerPolicy::default() };
/// let mut state = CircuitBreakerState::default();
/// let now = Timestamp::from_millis(1_000);
/// let (admission, _) = acquire(&mut state, &policy, now, 0.5);
/// assert_eq!(admission, Admission::Allowed { probe: None });
/// record(&mut state, &policy, now, Verdict::Failure, Duration::ZERO, None, 0.5);
/// let (refused, _) = acquire(&mut state, &policy, now, 0.5);
/// assert_eq!(refused, Admission::Rejected { retry_after: policy.timeout });
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Go ahead; a half-open probe carries its id, to hand back to [`record`].
    Allowed {
        /// The probe place taken, if the breaker is half-open.
        probe: Option<ProbeId>,
    },
    /// Rejected; the breaker may admit calls again after `retry_after`.
    Rejected {
        /// How long until the breaker may admit a call.
        retry_after: Duration,
    },
}

/// How an admitted call ended, as far as the breaker is concerned: every
/// admitted call ends exactly once with one of these.
///
/// ```
/// use pmcp_resilience::circuit_breaker::{CircuitBreakerMiddleware, Verdict};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let cb = CircuitBreakerMiddleware::builder().failure_threshold(5).build().expect("valid");
/// cb.acquire("global").await.expect("closed").record(Verdict::Success).await;
/// cb.acquire("global").await.expect("closed").record(Verdict::TimedOut).await;
/// let metrics = cb.metrics();
/// assert_eq!((metrics.successful_requests, metrics.failed_requests), (1, 1));
/// assert_eq!(metrics.timed_out_requests, 1);
/// assert_eq!(Verdict::TimedOut.to_string(), "timed_out");
/// # }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// The server did its job.
    Success,
    /// The server failed (as judged by the error matcher).
    Failure,
    /// The call says nothing about the server: the caller's own mistake
    /// (invalid params, an unknown method), a sibling middleware's refusal,
    /// or a caller that went away. Nothing is counted, the failure streak
    /// is kept, and a half-open probe's place is freed without a verdict.
    Neutral,
    /// No answer came within the call deadline: a failure of the server,
    /// counted apart in the metrics.
    TimedOut,
}

impl Verdict {
    /// A lower-case label (`success`, `failure`, `neutral`, `timed_out`).
    pub fn label(self) -> &'static str {
        match self {
            Verdict::Success => "success",
            Verdict::Failure => "failure",
            Verdict::Neutral => "neutral",
            Verdict::TimedOut => "timed_out",
        }
    }
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.label())
    }
}

/// Why a breaker changed state.
///
/// ```
/// use pmcp_resilience::circuit_breaker::{CircuitBreakerMiddleware, Verdict};
/// use pmcp_resilience::ManualClock;
/// use std::sync::{Arc, Mutex};
/// use std::time::Duration;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let clock = ManualClock::new();
/// let reasons = Arc::new(Mutex::new(Vec::new()));
/// let log = reasons.clone();
/// let cb = CircuitBreakerMiddleware::builder()
///     .failure_threshold(1)
///     .timeout(Duration::from_secs(10))
///     .clock(Arc::new(clock.clone()))
///     .on_transition(move |_key, t| log.lock().unwrap().push(t.reason.label()))
///     .build()
///     .expect("valid settings");
/// cb.acquire("global").await.expect("closed").record(Verdict::Failure).await;
/// clock.advance(Duration::from_secs(10));
/// cb.acquire("global").await.expect("a probe").record(Verdict::Success).await;
/// assert_eq!(
///     *reasons.lock().unwrap(),
///     ["consecutive_failures", "open_time_elapsed", "probes_succeeded"]
/// );
/// # }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TransitionReason {
    /// Too many consecutive failures.
    ConsecutiveFailures,
    /// Too many failures inside the window.
    FailuresInWindow,
    /// The failure rate reached its threshold.
    FailureRate,
    /// The slow-call rate reached its threshold.
    SlowCallRate,
    /// The open time ended.
    OpenTimeElapsed,
    /// A half-open probe failed.
    ProbeFailed,
    /// A half-open probe got no answer before its deadline.
    ProbeDeadline,
    /// Enough probes succeeded.
    ProbesSucceeded,
}

impl TransitionReason {
    /// A short label for logs and metrics.
    pub fn label(self) -> &'static str {
        match self {
            TransitionReason::ConsecutiveFailures => "consecutive_failures",
            TransitionReason::FailuresInWindow => "failures_in_window",
            TransitionReason::FailureRate => "failure_rate",
            TransitionReason::SlowCallRate => "slow_call_rate",
            TransitionReason::OpenTimeElapsed => "open_time_elapsed",
            TransitionReason::ProbeFailed => "probe_failed",
            TransitionReason::ProbeDeadline => "probe_deadline",
            TransitionReason::ProbesSucceeded => "probes_succeeded",
        }
    }
}

/// A change of state. Prints as `closed -> open (consecutive_failures)`.
///
/// ```
/// use pmcp_resilience::circuit_breaker::{CircuitBreakerMiddleware, CircuitState, Transition, Verdict};
/// use std::sync::{Arc, Mutex};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let seen: Arc<Mutex<Vec<Transition>>> = Arc::default();
/// let log = seen.clone();
/// let cb = CircuitBreakerMiddleware::builder()
///     .failure_threshold(1)
///     .on_transition(move |_key, transition| log.lock().unwrap().push(transition))
///     .build()
///     .expect("valid settings");
/// cb.acquire("global").await.expect("closed").record(Verdict::Failure).await;
/// let trip = seen.lock().unwrap()[0];
/// assert_eq!((trip.from, trip.to), (CircuitState::Closed, CircuitState::Open));
/// assert_eq!(trip.to_string(), "closed -> open (consecutive_failures)");
/// # }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    /// The state before.
    pub from: CircuitState,
    /// The state after.
    pub to: CircuitState,
    /// Why.
    pub reason: TransitionReason,
}

impl std::fmt::Display for Transition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} -> {} ({})", self.from, self.to, self.reason.label())
    }
}

/// Window totals.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct WindowTotals {
    /// Calls in the window.
    pub(crate) calls: u32,
    /// Failures in the window.
    pub(crate) failures: u32,
    /// Slow calls in the window.
    pub(crate) slow: u32,
}

impl CircuitBreakerState {
    /// The operator's override of this key ([`BreakerMode::Normal`] if none).
    pub fn mode(&self) -> BreakerMode {
        self.mode
    }

    /// Failures since the last success, while closed.
    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures
    }

    /// Trips since the breaker last closed (what the open backoff grows with).
    pub fn trips(&self) -> u32 {
        self.trips
    }

    /// When an open breaker starts letting probes through.
    pub fn open_until(&self) -> Timestamp {
        self.open_until
    }

    /// The state callers see, forced modes applied.
    pub fn effective_state(&self) -> CircuitState {
        match self.mode {
            BreakerMode::ForcedOpen => CircuitState::Open,
            BreakerMode::ForcedClosed | BreakerMode::Disabled => CircuitState::Closed,
            BreakerMode::Normal | BreakerMode::MetricsOnly => self.state,
        }
    }

    /// The totals of the window at `now` under `policy`.
    pub(crate) fn window_totals(&self, policy: &BreakerPolicy, now: Timestamp) -> WindowTotals {
        if self.window_shape != policy.window_shape() {
            return WindowTotals::default();
        }
        let current = current_slot(self, policy, now);
        let mut totals = WindowTotals::default();
        for b in &self.window {
            if b.slot <= current && b.slot + WINDOW_BUCKETS as u64 > current {
                totals.calls = totals.calls.saturating_add(b.calls);
                totals.failures = totals.failures.saturating_add(b.failures);
                totals.slow = totals.slow.saturating_add(b.slow);
            }
        }
        totals
    }

    /// How long until an open breaker admits probes (zero if it would now).
    pub fn retry_after(&self, now: Timestamp) -> Option<Duration> {
        match self.effective_state() {
            CircuitState::Open if self.mode == BreakerMode::ForcedOpen => None,
            CircuitState::Open => Some(self.open_until.saturating_since(now)),
            CircuitState::HalfOpen => Some(
                self.probes
                    .iter()
                    .map(|p| p.deadline.saturating_since(now))
                    .min()
                    .unwrap_or(Duration::ZERO),
            ),
            CircuitState::Closed => None,
        }
    }
}
