//! The local denial cache: a key already over its limit is answered in
//! process until its retry time, without a round trip per rejected request.
//!
//! Entries are indexed by when their denial ends, so a full cache evicts the
//! entry that ends first (an expired one, if any) in `O(log n)`, and each
//! insert also drops at most [`PRUNE_PER_INSERT`] expired entries: the work
//! of one insert never grows with the number of entries held.
//!
//! Times are kept on the cache's own clock and handed out as durations
//! added to the caller's `now`, so a decision read from the cache is in the
//! caller's clock whatever clock the deadlines came from.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use crate::clock::{SharedClock, Timestamp, default_clock};
use crate::rate_limit::Decision;

/// Expired entries dropped by one insert, besides the one it may evict.
pub(crate) const PRUNE_PER_INSERT: usize = 4;

struct Denied {
    /// When the denial ends (cache clock).
    until: Timestamp,
    /// When the key is back at its full limit (cache clock).
    reset: Timestamp,
    /// Tells entries with the same `until` apart in the index.
    seq: u64,
    cost: u32,
    decision: Decision,
}

#[derive(Default)]
struct Entries {
    map: HashMap<Arc<str>, Denied>,
    /// `(until, seq)` of every entry in `map`, soonest first.
    by_end: BTreeMap<(Timestamp, u64), Arc<str>>,
    next_seq: u64,
}

impl Entries {
    fn remove(&mut self, key: &str) {
        if let Some(old) = self.map.remove(key) {
            self.by_end.remove(&(old.until, old.seq));
        }
    }

    /// Drops the entry that ends first if it ends by `by`; counts the
    /// entry looked at in `examined`. Whether one was dropped.
    fn evict_first(&mut self, by: Timestamp, examined: &mut usize) -> bool {
        match self.by_end.first_key_value() {
            Some((&(until, _), _)) if until <= by => {}
            Some(_) => {
                *examined += 1;
                return false;
            }
            None => return false,
        }
        *examined += 1;
        if let Some((_, key)) = self.by_end.pop_first() {
            self.map.remove(&key);
        }
        true
    }
}

/// A bounded map of keys known to be rejected until some instant.
pub(crate) struct DenialCache {
    capacity: usize,
    clock: SharedClock,
    entries: Mutex<Entries>,
}

impl DenialCache {
    /// A cache of at most `capacity` keys (0: off) on the system clock.
    pub(crate) fn new(capacity: usize) -> Self {
        Self::with_clock(capacity, default_clock())
    }

    /// A cache of at most `capacity` keys whose deadlines run on `clock`.
    pub(crate) fn with_clock(capacity: usize, clock: SharedClock) -> Self {
        DenialCache {
            capacity,
            clock,
            entries: Mutex::new(Entries::default()),
        }
    }

    /// A rejection for `cost` units of `key`, if one is known to hold now
    /// (a request of at least the cached cost, with `max_wait` shorter than
    /// what is left of the retry time), with its times relative to `now`
    /// (the caller's clock).
    pub(crate) fn lookup(
        &self,
        key: &str,
        cost: u32,
        max_wait: Duration,
        now: Timestamp,
    ) -> Option<Decision> {
        if self.capacity == 0 {
            return None;
        }
        let here = self.clock.now();
        let mut entries = self.entries.lock();
        let entry = entries.map.get(key)?;
        if entry.until <= here {
            entries.remove(key);
            return None;
        }
        let left = entry.until.saturating_since(here);
        if cost < entry.cost || max_wait >= left {
            return None;
        }
        let mut decision = entry.decision;
        decision.retry_after = Some(left);
        decision.reset_at = now.saturating_add(entry.reset.saturating_since(here));
        Some(decision)
    }

    /// Remembers a rejection of `cost` units (`decision` being in the clock
    /// of `now`) that holds for its `retry_after`. A full cache makes room
    /// by dropping the entry that ends first, unless the new one would end
    /// sooner still (then it is not kept). Returns how many other entries
    /// it looked at: at most [`PRUNE_PER_INSERT`] + 1.
    pub(crate) fn insert(&self, key: &str, cost: u32, decision: Decision, now: Timestamp) -> usize {
        let Some(retry_after) = decision.retry_after else {
            return 0;
        };
        if self.capacity == 0 || retry_after.is_zero() {
            return 0;
        }
        let here = self.clock.now();
        let mut examined = 0;
        let mut entries = self.entries.lock();
        entries.remove(key);
        for _ in 0..PRUNE_PER_INSERT {
            if !entries.evict_first(here, &mut examined) {
                break;
            }
        }
        let until = here.saturating_add(retry_after);
        // The soonest to end saves the fewest round trips.
        if entries.map.len() >= self.capacity && !entries.evict_first(until, &mut examined) {
            return examined;
        }
        let seq = entries.next_seq;
        entries.next_seq = seq.wrapping_add(1);
        let key: Arc<str> = Arc::from(key);
        entries.by_end.insert((until, seq), Arc::clone(&key));
        entries.map.insert(
            key,
            Denied {
                until,
                reset: here.saturating_add(decision.reset_at.saturating_since(now)),
                seq,
                cost,
                decision,
            },
        );
        examined
    }

    /// Forgets `key` (after a refund made room).
    pub(crate) fn forget(&self, key: &str) {
        if self.capacity > 0 {
            self.entries.lock().remove(key);
        }
    }

    /// Keys held now.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        let entries = self.entries.lock();
        debug_assert_eq!(entries.map.len(), entries.by_end.len());
        entries.map.len()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::{DenialCache, PRUNE_PER_INSERT};
    use crate::clock::{Clock, ManualClock, Timestamp};
    use crate::rate_limit::Decision;

    fn denied_for(retry_after: Duration, now: Timestamp) -> Decision {
        Decision {
            allowed: false,
            remaining: 0,
            limit: 10,
            reset_at: now.saturating_add(retry_after * 2),
            retry_after: Some(retry_after),
            wait: Duration::ZERO,
        }
    }

    const FULL: usize = 100_000;

    #[test]
    fn a_full_cache_does_bounded_work_per_insert_evicts_expired_first_and_holds_its_cap() {
        let clock = ManualClock::new();
        let cache = DenialCache::with_clock(FULL, Arc::new(clock.clone()));
        let now = clock.now();
        // Every tenth key is denied for 1 s, the others for an hour.
        for i in 0..FULL {
            let retry = if i % 10 == 0 {
                Duration::from_secs(1)
            } else {
                Duration::from_secs(3600)
            };
            let examined = cache.insert(&format!("k{i}"), 1, denied_for(retry, now), now);
            assert!(
                examined <= 1,
                "insert {i} into a cache with room looked at {examined}"
            );
        }
        assert_eq!(cache.len(), FULL);

        // The short denials end; the cache is full with 10,000 expired keys.
        clock.advance(Duration::from_secs(2));
        let now = clock.now();
        let short_lived = FULL / 10;
        let mut most = 0;
        for i in 0..short_lived {
            let examined = cache.insert(
                &format!("new{i}"),
                1,
                denied_for(Duration::from_secs(3600), now),
                now,
            );
            most = most.max(examined);
            assert!(cache.len() <= FULL, "cap broken at insert {i}");
        }
        assert!(
            most <= PRUNE_PER_INSERT + 1,
            "an insert examined {most} entries"
        );
        assert_eq!(cache.len(), FULL);
        // Only expired keys made room: every long denial is still there.
        let long_kept = (0..FULL)
            .filter(|i| i % 10 != 0)
            .filter(|i| {
                cache
                    .lookup(&format!("k{i}"), 1, Duration::ZERO, now)
                    .is_some()
            })
            .count();
        assert_eq!(long_kept, FULL - short_lived);
        assert!((0..short_lived).all(|i| {
            cache
                .lookup(&format!("new{i}"), 1, Duration::ZERO, now)
                .is_some()
        }));

        // Full of live entries: one ending later than the first takes its
        // place, one ending sooner than all is not kept; bounded work either way.
        let examined = cache.insert("late", 1, denied_for(Duration::from_secs(7200), now), now);
        assert!(examined <= PRUNE_PER_INSERT + 1);
        assert_eq!(cache.len(), FULL);
        assert!(cache.lookup("late", 1, Duration::ZERO, now).is_some());
        assert_eq!(
            (0..FULL)
                .filter(|i| cache
                    .lookup(&format!("k{i}"), 1, Duration::ZERO, now)
                    .is_some())
                .count(),
            FULL - short_lived - 1,
            "the long denial that ends first made room"
        );
        let examined = cache.insert("soon", 1, denied_for(Duration::from_secs(5), now), now);
        assert!(examined <= PRUNE_PER_INSERT + 1);
        assert_eq!(cache.len(), FULL);
        assert!(cache.lookup("soon", 1, Duration::ZERO, now).is_none());
        assert!(cache.lookup("late", 1, Duration::ZERO, now).is_some());
    }

    #[test]
    fn an_insert_prunes_expired_entries_before_the_cache_is_full() {
        let clock = ManualClock::new();
        let cache = DenialCache::with_clock(1_000, Arc::new(clock.clone()));
        let now = clock.now();
        for i in 0..10 {
            cache.insert(
                &format!("k{i}"),
                1,
                denied_for(Duration::from_millis(10), now),
                now,
            );
        }
        clock.advance(Duration::from_millis(10));
        let now = clock.now();
        let examined = cache.insert("fresh", 1, denied_for(Duration::from_secs(1), now), now);
        assert_eq!(examined, PRUNE_PER_INSERT);
        assert_eq!(cache.len(), 10 - PRUNE_PER_INSERT + 1);
    }

    #[test]
    fn a_cached_denial_is_told_in_the_callers_clock() {
        let clock = ManualClock::new();
        let cache = DenialCache::with_clock(10, Arc::new(clock.clone()));
        // The caller's clock is a day away from the cache's.
        let caller = Timestamp::from_millis(1_000_000_000_000);
        let decision = denied_for(Duration::from_secs(4), caller);
        cache.insert("k", 1, decision, caller);

        clock.advance(Duration::from_secs(1));
        let later = caller.saturating_add(Duration::from_secs(1));
        let Some(seen) = cache.lookup("k", 1, Duration::ZERO, later) else {
            panic!("the denial holds for 3 more seconds");
        };
        assert_eq!(seen.retry_after, Some(Duration::from_secs(3)));
        assert_eq!(seen.reset_at, later.saturating_add(Duration::from_secs(7)));
        assert!(
            cache
                .lookup("k", 1, Duration::from_secs(3), later)
                .is_none(),
            "a request willing to wait the rest goes to Redis"
        );
        assert!(
            cache.lookup("k", 0, Duration::ZERO, later).is_none(),
            "a smaller cost may fit"
        );

        clock.advance(Duration::from_secs(3));
        assert!(cache.lookup("k", 1, Duration::ZERO, later).is_none());
        assert_eq!(cache.len(), 0, "an expired entry read is dropped");
    }
}
