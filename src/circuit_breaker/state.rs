//! The breaker's state machine: pure functions over one key's small state.
//!
//! [`acquire`] decides whether a call may start; [`record`] folds its outcome
//! back in. Neither touches a lock, a map or a clock: the caller passes the
//! time (and a random number for jitter), so the same functions run in memory,
//! over a file, or mirrored in a Redis script, and tests drive them with exact
//! timestamps.
//!
//! ```
//! use pmcp_resilience::circuit_breaker::{BreakerPolicy, CircuitState, Verdict};
//! use pmcp_resilience::store::{acquire, record, Admission, CircuitBreakerState};
//! use pmcp_resilience::Timestamp;
//! use std::time::Duration;
//!
//! let policy = BreakerPolicy { consecutive_failures: 2, ..BreakerPolicy::default() };
//! let mut state = CircuitBreakerState::default();
//! let now = Timestamp::from_millis(1_000);
//! for _ in 0..2 {
//!     let (admission, _) = acquire(&mut state, &policy, now, 0.5);
//!     assert!(matches!(admission, Admission::Allowed { probe: None }));
//!     record(&mut state, &policy, now, Verdict::Failure, Duration::ZERO, None, 0.5);
//! }
//! assert_eq!(state.effective_state(), CircuitState::Open);
//! assert!(matches!(acquire(&mut state, &policy, now, 0.5).0, Admission::Rejected { .. }));
//! ```

use std::time::Duration;

use serde::{Deserialize, Serialize};

pub(crate) use super::policy::{BreakerPolicy, SlidingWindow};
use crate::clock::{Timestamp, duration_nanos};

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

fn time_bucket_nanos(d: Duration) -> u64 {
    (duration_nanos(d) / WINDOW_BUCKETS as u64).max(1)
}

fn current_slot(state: &CircuitBreakerState, policy: &BreakerPolicy, now: Timestamp) -> u64 {
    match policy.window {
        SlidingWindow::Calls(_) => state.window_head,
        SlidingWindow::Time(d) => now.as_nanos() / time_bucket_nanos(d),
    }
}

fn add_to_window(
    state: &mut CircuitBreakerState,
    policy: &BreakerPolicy,
    now: Timestamp,
    failed: bool,
    slow: bool,
) {
    let shape = policy.window_shape();
    if state.window_shape != shape || state.window.len() != WINDOW_BUCKETS {
        state.window = vec![Bucket::default(); WINDOW_BUCKETS];
        state.window_head = 0;
        state.window_shape = shape;
    }
    let slot = match policy.window {
        SlidingWindow::Time(d) => now.as_nanos() / time_bucket_nanos(d),
        SlidingWindow::Calls(n) => {
            let per_bucket = n.div_ceil(WINDOW_BUCKETS as u32).max(1);
            let head = state.window_head;
            let full = state
                .window
                .get((head % WINDOW_BUCKETS as u64) as usize)
                .is_some_and(|b| b.slot == head && b.calls >= per_bucket);
            if full {
                state.window_head = head + 1;
            }
            state.window_head
        }
    };
    let Some(bucket) = state
        .window
        .get_mut((slot % WINDOW_BUCKETS as u64) as usize)
    else {
        return;
    };
    if bucket.slot != slot {
        *bucket = Bucket {
            slot,
            ..Bucket::default()
        };
    }
    bucket.calls = bucket.calls.saturating_add(1);
    bucket.failures = bucket.failures.saturating_add(u32::from(failed));
    bucket.slow = bucket.slow.saturating_add(u32::from(slow));
}

fn open(
    state: &mut CircuitBreakerState,
    policy: &BreakerPolicy,
    now: Timestamp,
    jitter: f64,
    reason: TransitionReason,
) -> Transition {
    let from = state.state;
    state.state = CircuitState::Open;
    state.trips = state.trips.saturating_add(1);
    state.opened_at = now;
    state.open_until = now.saturating_add(policy.open_duration(state.trips, jitter));
    state.probes.clear();
    state.half_open_successes = 0;
    state.consecutive_failures = 0;
    Transition {
        from,
        to: CircuitState::Open,
        reason,
    }
}

fn close(state: &mut CircuitBreakerState) -> Transition {
    let from = state.state;
    state.state = CircuitState::Closed;
    state.trips = 0;
    state.probes.clear();
    state.half_open_successes = 0;
    state.consecutive_failures = 0;
    state.window = Default::default();
    Transition {
        from,
        to: CircuitState::Closed,
        reason: TransitionReason::ProbesSucceeded,
    }
}

/// Fails the probes whose deadline has passed: in half-open, one such probe
/// reopens the breaker.
fn expire_probes(
    state: &mut CircuitBreakerState,
    policy: &BreakerPolicy,
    now: Timestamp,
    jitter: f64,
) -> Option<Transition> {
    if state.state != CircuitState::HalfOpen || state.probes.iter().all(|p| p.deadline > now) {
        return None;
    }
    Some(open(
        state,
        policy,
        now,
        jitter,
        TransitionReason::ProbeDeadline,
    ))
}

fn is_counting(mode: BreakerMode) -> bool {
    matches!(mode, BreakerMode::Normal | BreakerMode::MetricsOnly)
}

/// Decides whether a call may start at `now`. `jitter` is a random number in
/// [0, 1) used if the breaker reopens (a probe past its deadline).
///
/// Returns the admission and the transition it caused, if any.
pub fn acquire(
    state: &mut CircuitBreakerState,
    policy: &BreakerPolicy,
    now: Timestamp,
    jitter: f64,
) -> (Admission, Option<Transition>) {
    const ALLOWED: Admission = Admission::Allowed { probe: None };
    match state.mode {
        BreakerMode::Disabled | BreakerMode::ForcedClosed => return (ALLOWED, None),
        BreakerMode::ForcedOpen => {
            return (
                Admission::Rejected {
                    retry_after: policy.timeout,
                },
                None,
            );
        }
        BreakerMode::Normal | BreakerMode::MetricsOnly => {}
    }
    let dry_run = state.mode == BreakerMode::MetricsOnly;
    let mut transition = expire_probes(state, policy, now, jitter);
    if state.state == CircuitState::Open {
        if now < state.open_until {
            let admission = if dry_run {
                ALLOWED
            } else {
                Admission::Rejected {
                    retry_after: state.open_until.saturating_since(now),
                }
            };
            return (admission, transition);
        }
        state.state = CircuitState::HalfOpen;
        state.half_open_successes = 0;
        state.probes.clear();
        transition = Some(Transition {
            from: CircuitState::Open,
            to: CircuitState::HalfOpen,
            reason: TransitionReason::OpenTimeElapsed,
        });
    }
    if state.state == CircuitState::HalfOpen {
        if dry_run {
            return (ALLOWED, transition);
        }
        if state.probes.len() as u64 >= u64::from(policy.half_open_max_probes.max(1)) {
            let retry_after = state
                .probes
                .iter()
                .map(|p| p.deadline.saturating_since(now))
                .min()
                .unwrap_or(Duration::ZERO);
            return (Admission::Rejected { retry_after }, transition);
        }
        let id = ProbeId(state.next_probe);
        state.next_probe = state.next_probe.wrapping_add(1);
        state.probes.push(Probe {
            id,
            deadline: now.saturating_add(policy.probe_deadline),
        });
        return (Admission::Allowed { probe: Some(id) }, transition);
    }
    (ALLOWED, transition)
}

/// Folds the outcome of a call into the state at `now`. `elapsed` is the
/// call's duration (for the slow-call rule), `probe` the id [`acquire`] gave,
/// and `jitter` a random number in [0, 1) used if the breaker opens.
pub fn record(
    state: &mut CircuitBreakerState,
    policy: &BreakerPolicy,
    now: Timestamp,
    result: Verdict,
    elapsed: Duration,
    probe: Option<ProbeId>,
    jitter: f64,
) -> Option<Transition> {
    let expired = expire_probes(state, policy, now, jitter);
    let was_probe = match probe {
        Some(id) => match state.probes.iter().position(|p| p.id == id) {
            Some(i) => {
                state.probes.swap_remove(i);
                true
            }
            None => false,
        },
        None => false,
    };
    let failed = match result {
        Verdict::Neutral => return expired,
        Verdict::Failure | Verdict::TimedOut => true,
        Verdict::Success => false,
    };
    if !is_counting(state.mode) {
        return expired;
    }
    // A timed-out call is slow by its elapsed time like any other (the
    // Redis script sees only the time).
    let slow = policy.slow_calls.is_some_and(|s| elapsed >= s.duration);
    let transition = match state.state {
        CircuitState::Closed => {
            if policy.uses_window() {
                add_to_window(state, policy, now, failed, slow);
            }
            if failed {
                state.consecutive_failures = state.consecutive_failures.saturating_add(1);
            } else {
                state.consecutive_failures = 0;
            }
            trip_reason(state, policy, now).map(|r| open(state, policy, now, jitter, r))
        }
        CircuitState::HalfOpen if was_probe || state.mode == BreakerMode::MetricsOnly => {
            if failed {
                Some(open(
                    state,
                    policy,
                    now,
                    jitter,
                    TransitionReason::ProbeFailed,
                ))
            } else {
                state.half_open_successes = state.half_open_successes.saturating_add(1);
                (state.half_open_successes >= policy.success_threshold.max(1)).then(|| close(state))
            }
        }
        // Late answers of calls admitted before the breaker opened say
        // nothing about the server now.
        CircuitState::HalfOpen | CircuitState::Open => None,
    };
    transition.or(expired)
}

fn trip_reason(
    state: &CircuitBreakerState,
    policy: &BreakerPolicy,
    now: Timestamp,
) -> Option<TransitionReason> {
    if policy.consecutive_failures > 0 && state.consecutive_failures >= policy.consecutive_failures
    {
        return Some(TransitionReason::ConsecutiveFailures);
    }
    if !policy.uses_window() {
        return None;
    }
    let totals = state.window_totals(policy, now);
    if let Some(limit) = policy.failures_in_window
        && totals.failures >= limit
    {
        return Some(TransitionReason::FailuresInWindow);
    }
    let calls = f64::from(totals.calls);
    if let Some(rate) = policy.failure_rate
        && totals.calls >= rate.minimum_calls.max(1)
        && f64::from(totals.failures) / calls >= rate.threshold
    {
        return Some(TransitionReason::FailureRate);
    }
    if let Some(slow) = policy.slow_calls
        && totals.calls >= slow.minimum_calls.max(1)
        && f64::from(totals.slow) / calls >= slow.threshold
    {
        return Some(TransitionReason::SlowCallRate);
    }
    None
}

/// Whether `state` is quiet: closed, in normal mode, with no failure counted
/// and no probe. Under a policy without window rules ([`BreakerPolicy`]'s
/// `uses_window` false), a quiet state admits every call and a success
/// leaves it unchanged: [`acquire`] returns `Allowed` with no probe and no
/// transition, and [`record`] of a success returns `None`, neither writing
/// anything: a fast path may skip both. The tests hold the state machine to
/// this.
#[cfg(test)]
pub(crate) fn is_quiet(state: &CircuitBreakerState) -> bool {
    state.state == CircuitState::Closed
        && state.mode == BreakerMode::Normal
        && state.consecutive_failures == 0
        && state.probes.is_empty()
}

/// Sets the operator's mode of a key. Leaving a forced mode keeps the counts.
pub fn set_mode(state: &mut CircuitBreakerState, mode: BreakerMode) {
    state.mode = mode;
}
