//! The line of requests waiting for capacity, per key (see
//! [`BackpressureConfig`](super::BackpressureConfig) for what users see).
//!
//! Only the head of a key's line asks the limiter, with a decision at the
//! current time that records nothing unless it admits; the others wait to be
//! woken. So nothing is ever reserved, and a request that gives up (its
//! future is dropped) has nothing to refund: it leaves the line, and if it
//! was the head, wakes the next.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::clock::Timestamp;
use crate::scope::ScopeKey;

use super::strategy::Decision;

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
