//! Waiting for capacity instead of failing at once.
//!
//! With [`BackpressureConfig::wait_for_capacity`], a request that finds no
//! capacity joins its key's **line**, in order of arrival. Only the head of
//! the line asks the limiter for its units (a decision at the current time,
//! recorded only when it admits); it sleeps until they are back, is
//! admitted, and wakes the next. Nothing is taken from the limiter before a
//! request is admitted, so:
//!
//! - service is in order of arrival: a later request never overtakes, and a
//!   heavy request is not starved by light ones behind it;
//! - a request that gives up (its future is dropped: a client timeout, a
//!   cancelled call) just leaves the line, wherever it stood; those behind
//!   move up and are served at the rate the strategy allows, and a heavy
//!   request that gives up frees its whole cost;
//! - a newcomer is judged from the units ahead of it: if its wait, with all
//!   of them served first, would exceed
//!   [`max_wait`](BackpressureConfig::max_wait), it is rejected at once, not
//!   after waiting; so is a request arriving when the number of waiters is
//!   at its bound (`max_waiters` on the builder, default
//!   [`DEFAULT_MAX_WAITERS`]).
//!
//! Per strategy, in memory:
//!
//! | strategy | the head is admitted when | a waiter that gives up |
//! |---|---|---|
//! | token bucket | its cost in tokens is back | frees its place; no token was taken |
//! | fixed / sliding window | a window (or the rolling estimate) has room for its cost | frees its place; units a window had left while a heavier head waited for the next are not lent to lighter ones behind it (arrival order wins) |
//! | leaky bucket | the unit before it has leaked out, so requests stay `1 / leak_rate` apart | frees its place in the bucket's queue, which *is* the line: the bucket's `capacity` bounds the units in it, whatever `wait_for_capacity` and `max_wait` say |
//!
//! A custom [`RateLimiter`](super::RateLimiter) and the Redis store are
//! shared with other processes, which the line cannot see: there a waiter
//! reserves its slot in the store at once (so every process respects it),
//! sleeps, and if it gives up, [`cancel`](super::RateLimiter::cancel) hands
//! the slot back only if no later reservation was made since (see
//! [`Reservation`](super::Reservation)); otherwise the slot goes unused and
//! its capacity returns with time.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::clock::Timestamp;
use crate::error::ConfigError;
use crate::scope::ScopeKey;

use super::strategy::Decision;

/// The default bound on requests waiting at once, per middleware.
pub const DEFAULT_MAX_WAITERS: usize = 1024;

/// What the rate-limit middleware does when a request finds no capacity.
///
/// ```
/// use pmcp_resilience::rate_limit::BackpressureConfig;
/// use std::time::Duration;
///
/// let config = BackpressureConfig::wait_up_to(Duration::from_secs(5)).with_client_signal();
/// assert!(config.wait_for_capacity && config.signal_client);
/// assert_eq!(config.backpressure_header, "X-RateLimit-Reset");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackpressureConfig {
    /// Wait for capacity (up to `max_wait`) instead of rejecting (default `false`).
    pub wait_for_capacity: bool,
    /// The longest a request may wait (default 1 s). Must be above zero when
    /// waiting is on.
    pub max_wait: Duration,
    /// Tell the client when to retry: the rejection becomes a
    /// `pmcp::Error::Protocol` with code -32005 (that of
    /// `pmcp::Error::RateLimited`) and `data` holding `retryAfterMs`,
    /// `limit`, `remaining`, `resetAtMs`, `scope`, `key` and `header`
    /// (default `false`: a plain `pmcp::Error::RateLimited`).
    pub signal_client: bool,
    /// The HTTP header a server front end should use for the reset time
    /// (default `X-RateLimit-Reset`); carried in the error data as `header`.
    pub backpressure_header: String,
}

impl Default for BackpressureConfig {
    fn default() -> Self {
        BackpressureConfig {
            wait_for_capacity: false,
            max_wait: Duration::from_secs(1),
            signal_client: false,
            backpressure_header: "X-RateLimit-Reset".to_string(),
        }
    }
}

impl BackpressureConfig {
    /// Reject at once when there is no capacity (the default).
    pub fn reject() -> Self {
        Self::default()
    }

    /// Wait up to `max_wait` for capacity.
    pub fn wait_up_to(max_wait: Duration) -> Self {
        BackpressureConfig {
            wait_for_capacity: true,
            max_wait,
            ..Self::default()
        }
    }

    /// Tell the client when to retry (see [`signal_client`](Self::signal_client)).
    pub fn with_client_signal(mut self) -> Self {
        self.signal_client = true;
        self
    }

    /// Use `header` as the name of the reset header.
    pub fn with_header(mut self, header: impl Into<String>) -> Self {
        self.backpressure_header = header.into();
        self
    }

    /// The longest wait to reserve: `max_wait` if waiting is on, else zero.
    pub(crate) fn wait_budget(&self) -> Duration {
        if self.wait_for_capacity {
            self.max_wait
        } else {
            Duration::ZERO
        }
    }

    /// Checks the settings, as the builder does.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.wait_for_capacity && self.max_wait.is_zero() {
            return Err(ConfigError::invalid(
                "max_wait",
                "must be greater than zero when wait_for_capacity is on \
                 (or turn wait_for_capacity off to reject at once)",
            ));
        }
        if self.signal_client
            && http::HeaderName::from_bytes(self.backpressure_header.as_bytes()).is_err()
        {
            return Err(ConfigError::invalid(
                "backpressure_header",
                format!(
                    "`{}` is not a valid HTTP header name",
                    self.backpressure_header
                ),
            ));
        }
        Ok(())
    }
}

/// The requests waiting for capacity: one line per key, in order of
/// arrival, and a bound on how many wait in all.
///
/// Only the head of a key's line asks the limiter for its units; the others
/// wait for their turn. Nothing is taken from the limiter before a request
/// is admitted, so a request that gives up just leaves its line.
#[derive(Debug)]
pub(crate) struct WaitQueue {
    lines: Mutex<Lines>,
    waiting: AtomicUsize,
    max_waiters: usize,
}

#[derive(Debug, Default)]
struct Lines {
    by_key: HashMap<ScopeKey, Line, foldhash::fast::RandomState>,
    next_id: u64,
}

#[derive(Debug, Default)]
struct Line {
    places: VecDeque<Place>,
    /// When the last head was admitted: the next one is decided no earlier,
    /// so that a clock slower than the sleeps (a test's manual clock) still
    /// sees time move along the line.
    last_admitted: Timestamp,
}

#[derive(Debug)]
struct Place {
    id: u64,
    cost: u32,
    turn: Arc<Notify>,
}

/// What a request that may wait finds when it arrives.
pub(crate) enum Arrival {
    /// Nobody waits for its key and it was admitted.
    Admitted(Decision),
    /// It waits, at this place in its key's line.
    Queued(Ticket),
    /// Turned away at once: the wait would be too long, it can never pass,
    /// or too many requests wait already (`full`).
    Rejected {
        /// The decision to report.
        decision: Decision,
        /// Whether it was turned away for the bound on waiters.
        full: bool,
    },
}

/// What the head of a line does next.
pub(crate) enum Turn {
    /// It is not the head yet: wait to be woken.
    NotYet,
    /// Its units are available in this long.
    Sleep(Duration),
    /// It was admitted and has left the line.
    Admitted(Decision),
}

impl WaitQueue {
    pub(crate) fn new(max_waiters: usize) -> Self {
        WaitQueue {
            lines: Mutex::new(Lines::default()),
            waiting: AtomicUsize::new(0),
            max_waiters,
        }
    }

    /// Whether no request waits (then a request need not look at the lines).
    #[inline]
    pub(crate) fn is_empty(&self) -> bool {
        self.waiting.load(Ordering::Acquire) == 0
    }

    /// Requests waiting now.
    pub(crate) fn len(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// A request of `cost` units for `key` arrives. With nobody waiting for
    /// the key, `admit` may admit it at once (it records the admission only
    /// when no wait is needed); otherwise `decide` says, from the costs of
    /// those ahead, whether it may wait (admitted) or not (rejected).
    pub(crate) fn arrive(
        self: &Arc<Self>,
        key: &ScopeKey,
        cost: u32,
        admit: impl FnOnce() -> Decision,
        decide: impl FnOnce(&mut dyn Iterator<Item = u32>) -> Decision,
    ) -> Arrival {
        let mut lines = self.lines.lock();
        let decision = match lines.by_key.get(key) {
            Some(line) => decide(&mut line.places.iter().map(|p| p.cost)),
            None => {
                let now = admit();
                if now.allowed && now.wait.is_zero() {
                    return Arrival::Admitted(now);
                }
                decide(&mut std::iter::empty())
            }
        };
        if !decision.allowed {
            return Arrival::Rejected {
                decision,
                full: false,
            };
        }
        if self.waiting.load(Ordering::Relaxed) >= self.max_waiters {
            let mut full = decision;
            full.allowed = false;
            full.retry_after = Some(decision.wait);
            return Arrival::Rejected {
                decision: full,
                full: true,
            };
        }
        let id = lines.next_id;
        lines.next_id += 1;
        let turn = Arc::new(Notify::new());
        lines
            .by_key
            .entry(key.clone())
            .or_default()
            .places
            .push_back(Place {
                id,
                cost,
                turn: Arc::clone(&turn),
            });
        self.waiting.fetch_add(1, Ordering::AcqRel);
        Arrival::Queued(Ticket {
            queue: Arc::clone(self),
            key: key.clone(),
            id,
            turn,
            due: Timestamp::ZERO,
            left: false,
        })
    }

    /// The decision for `cost` units for `key` behind those waiting for it
    /// (`decide` as in [`arrive`](Self::arrive)), or `None` if nobody waits
    /// for the key.
    pub(crate) fn decide_behind<T>(
        &self,
        key: &str,
        decide: impl FnOnce(&mut dyn Iterator<Item = u32>) -> T,
    ) -> Option<T> {
        if self.is_empty() {
            return None;
        }
        let lines = self.lines.lock();
        let line = lines.by_key.get(key)?;
        Some(decide(&mut line.places.iter().map(|p| p.cost)))
    }

    /// Takes a place among the waiters without a line (for a limiter that
    /// reserves its slots itself), or `None` if they are at the bound.
    pub(crate) fn enter(self: &Arc<Self>) -> Option<WaitPlace> {
        let mut current = self.waiting.load(Ordering::Relaxed);
        loop {
            if current >= self.max_waiters {
                return None;
            }
            match self.waiting.compare_exchange_weak(
                current,
                current + 1,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Some(WaitPlace(Arc::clone(self))),
                Err(actual) => current = actual,
            }
        }
    }

    /// Removes `id` from the line of `key`, waking the next request if it
    /// was the head.
    fn leave(&self, key: &ScopeKey, id: u64) {
        let mut lines = self.lines.lock();
        let Some(line) = lines.by_key.get_mut(key) else {
            return;
        };
        let Some(at) = line.places.iter().position(|p| p.id == id) else {
            return;
        };
        line.places.remove(at);
        self.waiting.fetch_sub(1, Ordering::AcqRel);
        match line.places.front() {
            Some(next) if at == 0 => next.turn.notify_one(),
            Some(_) => {}
            None => {
                lines.by_key.remove(key);
            }
        }
    }
}

/// A request's place in its key's line. Dropping it (the request was
/// admitted, or its future was dropped) leaves the line and hands the turn
/// on.
pub(crate) struct Ticket {
    queue: Arc<WaitQueue>,
    key: ScopeKey,
    id: u64,
    turn: Arc<Notify>,
    /// When the units this head slept for are due.
    due: Timestamp,
    left: bool,
}

impl Ticket {
    /// If this request heads its line, asks `admit` (as in
    /// [`WaitQueue::arrive`]) whether its units are available at `now`;
    /// admitted, it leaves the line.
    ///
    /// The time asked about is never before the instant the head slept
    /// until, nor before the previous head's admission: nothing else takes
    /// units from a key while its line waits, so units due then are there
    /// then, even with a clock slower than the sleeps.
    pub(crate) fn turn(
        &mut self,
        now: Timestamp,
        admit: impl FnOnce(Timestamp) -> Decision,
    ) -> Turn {
        let decision = {
            let mut lines = self.queue.lines.lock();
            let Some(line) = lines
                .by_key
                .get_mut(&self.key)
                .filter(|line| line.places.front().is_some_and(|p| p.id == self.id))
            else {
                return Turn::NotYet;
            };
            let at = now.max(self.due).max(line.last_admitted);
            // Decided under the lines' lock, so that no newcomer sees an
            // empty line and takes the units first.
            let decision = admit(at);
            if !(decision.allowed && decision.wait.is_zero()) {
                let wait = match decision.retry_after {
                    Some(_) if decision.allowed => decision.wait,
                    Some(retry_after) => retry_after,
                    // Cannot happen (such a cost is turned away on arrival);
                    // check again later rather than spin.
                    None => Duration::from_millis(1),
                };
                self.due = at.saturating_add(wait);
                return Turn::Sleep(wait);
            }
            line.last_admitted = at;
            decision
        };
        self.leave();
        Turn::Admitted(decision)
    }

    /// Waits until this request may head its line.
    pub(crate) async fn woken(&self) {
        self.turn.notified().await;
    }

    fn leave(&mut self) {
        if !self.left {
            self.left = true;
            self.queue.leave(&self.key, self.id);
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.leave();
    }
}

/// A place among the waiters, released on drop.
#[derive(Debug)]
pub(crate) struct WaitPlace(Arc<WaitQueue>);

impl Drop for WaitPlace {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Gives a reservation back if the wait does not complete (for a limiter
/// that reserves its slots itself: custom and shared stores).
///
/// Created when a request starts waiting; [`complete`](Self::complete) is
/// called after the sleep. Dropped before that (the caller's future was
/// dropped), it runs its refund.
pub(crate) struct WaitGuard<F: FnOnce()> {
    refund: Option<F>,
    _place: WaitPlace,
}

impl<F: FnOnce()> WaitGuard<F> {
    pub(crate) fn new(place: WaitPlace, refund: F) -> Self {
        WaitGuard {
            refund: Some(refund),
            _place: place,
        }
    }

    /// The wait finished: keep the reservation.
    pub(crate) fn complete(mut self) {
        self.refund = None;
    }
}

impl<F: FnOnce()> Drop for WaitGuard<F> {
    fn drop(&mut self) {
        if let Some(refund) = self.refund.take() {
            refund();
        }
    }
}
