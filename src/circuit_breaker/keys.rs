//! The breaker's keys: a bounded map whose lookups take no lock, and whose
//! closed path touches one cache line per key.
//!
//! A breaker sees every call twice (admission and outcome), and nearly all
//! calls meet a closed breaker with nothing to count: the state does not
//! change. So an [`Entry`] keeps, beside its full state behind a mutex, a
//! line of atomics read and written without it: a *quiet* flag (closed,
//! normal mode, no failure counted, no probe; see [`state::is_quiet`]), the
//! number of calls in flight and the successes. While the flag is up and no
//! window rule is set, admitting a call and recording its success are a few
//! atomic operations; anything else takes the mutex and runs the state
//! machine. The map is a lock-free hash table (papaya), so threads calling
//! the same key never wait for each other on the quiet path.
//!
//! Limits are the rate limiter's [`RegistryLimits`], with the same meaning:
//!
//! - **idle eviction**: a key unused for `idle_after` (measured to within
//!   1/64 of it) whose breaker is closed, in normal mode and with no call in
//!   flight is dropped. An open or half-open breaker is never dropped.
//! - **a hard cap** of `max_keys`: at the cap, idle keys are swept first
//!   (at most once per 1/16 of `idle_after`); if none can go, the call is
//!   served by the shared [`OVERFLOW_KEY`] entry and counted in
//!   [`RegistryStats::overflowed`].
//!
//! A key being evicted is marked retired in the same atomic that counts its
//! calls in flight, so a call that finds it either keeps it (the count is no
//! longer zero) or sees the mark and makes a fresh entry: no outcome is ever
//! recorded in a dropped entry.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use parking_lot::{Mutex, MutexGuard};

use super::state::{self, BreakerMode, CircuitBreakerState, CircuitState};
use crate::clock::{Timestamp, duration_nanos};
use crate::registry::{OVERFLOW_KEY, RegistryLimits, RegistryStats};

/// Set in [`Hot::users`] once an entry is being dropped.
const RETIRED: u64 = 1 << 63;

/// What the quiet path reads and writes, on a cache line of its own.
#[repr(C, align(64))]
#[derive(Debug, Default)]
struct Hot {
    /// Calls in flight (and operations at work) on this key, plus
    /// [`RETIRED`] once it is being dropped.
    users: AtomicU64,
    /// Calls that succeeded.
    successes: AtomicU64,
    /// When a call last used the key (nanoseconds, updated coarsely).
    last_seen: AtomicU64,
    /// Whether [`state::is_quiet`] holds for the state behind the mutex.
    quiet: AtomicBool,
}

/// The counts and state that change under the mutex.
#[derive(Debug, Default)]
pub(crate) struct Slow {
    pub(crate) state: CircuitBreakerState,
    pub(crate) failures: u64,
    pub(crate) rejections: u64,
    pub(crate) transitions: u64,
}

/// One key's breaker.
#[derive(Debug)]
pub(crate) struct Entry {
    hot: Hot,
    slow: Mutex<Slow>,
}

/// The state of an entry, locked; keeps the quiet flag true to the state
/// when it is released.
pub(crate) struct Locked<'a> {
    entry: &'a Entry,
    slow: MutexGuard<'a, Slow>,
}

impl std::ops::Deref for Locked<'_> {
    type Target = Slow;
    fn deref(&self) -> &Slow {
        &self.slow
    }
}

impl std::ops::DerefMut for Locked<'_> {
    fn deref_mut(&mut self) -> &mut Slow {
        &mut self.slow
    }
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        self.entry
            .hot
            .quiet
            .store(state::is_quiet(&self.slow.state), Ordering::Release);
    }
}

impl Entry {
    fn new(now: Timestamp) -> Self {
        let entry = Entry {
            hot: Hot::default(),
            slow: Mutex::new(Slow::default()),
        };
        entry.hot.quiet.store(
            state::is_quiet(&CircuitBreakerState::default()),
            Ordering::Relaxed,
        );
        entry.hot.last_seen.store(now.as_nanos(), Ordering::Relaxed);
        entry
    }

    /// Whether the state is quiet: a call may be admitted, and its success
    /// recorded, without the lock (when no window rule is set).
    pub(crate) fn is_quiet(&self) -> bool {
        self.hot.quiet.load(Ordering::Acquire)
    }

    /// Locks the state to read it.
    pub(crate) fn read(&self) -> MutexGuard<'_, Slow> {
        self.slow.lock()
    }

    /// Locks the state to change it.
    pub(crate) fn lock(&self) -> Locked<'_> {
        Locked {
            entry: self,
            slow: self.slow.lock(),
        }
    }

    /// Counts a success recorded on the quiet path.
    pub(crate) fn add_success(&self) {
        self.hot.successes.fetch_add(1, Ordering::Relaxed);
    }

    /// Successes recorded so far.
    pub(crate) fn successes(&self) -> u64 {
        self.hot.successes.load(Ordering::Relaxed)
    }

    /// Ends a use begun by [`BreakerKeys::enter`].
    pub(crate) fn leave(&self) {
        self.hot.users.fetch_sub(1, Ordering::Release);
    }

    /// Calls in flight on this key.
    #[cfg(test)]
    fn in_flight(&self) -> u64 {
        self.hot.users.load(Ordering::Relaxed) & !RETIRED
    }

    fn touch(&self, now: Timestamp, every: u64) {
        let seen = self.hot.last_seen.load(Ordering::Relaxed);
        if now.as_nanos() > seen.saturating_add(every) {
            self.hot.last_seen.store(now.as_nanos(), Ordering::Relaxed);
        }
    }

    /// Marks the entry retired if it has been idle for `idle_after`, its
    /// breaker is closed in normal mode and nobody uses it.
    fn try_retire(&self, now: Timestamp, idle_after: u64) -> bool {
        let seen = self.hot.last_seen.load(Ordering::Relaxed);
        if now.as_nanos().saturating_sub(seen) < idle_after {
            return false;
        }
        // Under the lock the state cannot change: changing it needs a user,
        // and a user that arrives now finds the count no longer zero.
        let slow = self.read();
        let s = &slow.state;
        if s.state != CircuitState::Closed || s.mode != BreakerMode::Normal || !s.probes.is_empty()
        {
            return false;
        }
        self.hot
            .users
            .compare_exchange(0, RETIRED, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
    }
}

/// A key's bytes, copied: short keys inline (no allocation, and in the
/// same allocation as the entry when held by the map), longer ones boxed.
/// Pending calls keep one too, so threads calling the same key share no
/// reference count.
#[derive(Clone)]
pub(crate) enum Key {
    Short { len: u8, bytes: [u8; SHORT_KEY] },
    Long(Box<[u8]>),
}

/// Keys up to this many bytes are kept inline.
const SHORT_KEY: usize = 62;

impl Key {
    pub(crate) fn new(key: &str) -> Self {
        match u8::try_from(key.len()) {
            Ok(len) if key.len() <= SHORT_KEY => {
                let mut bytes = [0; SHORT_KEY];
                bytes[..key.len()].copy_from_slice(key.as_bytes());
                Key::Short { len, bytes }
            }
            _ => Key::Long(key.as_bytes().into()),
        }
    }

    pub(crate) fn as_bytes(&self) -> &[u8] {
        match self {
            Key::Short { len, bytes } => &bytes[..usize::from(*len)],
            Key::Long(bytes) => bytes,
        }
    }

    /// The key as text (always UTF-8: it was copied from a `str`).
    pub(crate) fn as_str(&self) -> &str {
        std::str::from_utf8(self.as_bytes()).unwrap_or_default()
    }
}

impl PartialEq for Key {
    fn eq(&self, other: &Key) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Eq for Key {}

impl std::hash::Hash for Key {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        KeyBytes(self.as_bytes()).hash(state);
    }
}

/// A borrowed key, for lookups (hashes as [`Key`] does).
#[derive(Clone, Copy)]
pub(crate) struct KeyBytes<'a>(pub(crate) &'a [u8]);

impl std::hash::Hash for KeyBytes<'_> {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write(self.0);
    }
}

impl papaya::Equivalent<Key> for KeyBytes<'_> {
    fn equivalent(&self, key: &Key) -> bool {
        self.0 == key.as_bytes()
    }
}

type Map = papaya::HashMap<Key, Entry, foldhash::quality::RandomState>;

/// The bounded map from key to [`Entry`].
pub(crate) struct BreakerKeys {
    map: Map,
    overflow: Entry,
    overflow_used: AtomicBool,
    limits: RegistryLimits,
    /// Keys in `map`.
    len: AtomicUsize,
    evicted: AtomicU64,
    overflowed: AtomicU64,
    /// After a sweep at the cap found nothing to drop, the next one waits
    /// until then (nanoseconds).
    no_sweep_before: AtomicU64,
}

impl BreakerKeys {
    pub(crate) fn new(limits: RegistryLimits) -> Self {
        BreakerKeys {
            map: papaya::HashMap::with_hasher(foldhash::quality::RandomState::default()),
            overflow: Entry::new(Timestamp::from_nanos(0)),
            overflow_used: AtomicBool::new(false),
            limits,
            len: AtomicUsize::new(0),
            evicted: AtomicU64::new(0),
            overflowed: AtomicU64::new(0),
            no_sweep_before: AtomicU64::new(0),
        }
    }

    /// `idle_after`, in nanoseconds.
    fn idle_after(&self) -> u64 {
        duration_nanos(self.limits.idle_after)
    }

    pub(crate) fn limits(&self) -> RegistryLimits {
        self.limits
    }

    /// Runs `f` on the entry of `key`, made if new, after counting a use of
    /// it (end it with [`Entry::leave`]): an entry in use is never dropped.
    /// `f` gets the key the entry is held under, which is the overflow key
    /// when the map is full; the flag returned says so.
    pub(crate) fn enter<R>(
        &self,
        key: &str,
        now: Timestamp,
        f: impl FnOnce(&str, &Entry) -> R,
    ) -> (R, bool) {
        if key == OVERFLOW_KEY {
            return (self.enter_overflow(now, f), false);
        }
        let guard = self.map.guard();
        loop {
            let entry = match self.map.get(&KeyBytes(key.as_bytes()), &guard) {
                Some(entry) => entry,
                None => match self.insert(key, now, &guard) {
                    Some(entry) => entry,
                    None => {
                        self.overflowed.fetch_add(1, Ordering::Relaxed);
                        return (self.enter_overflow(now, f), true);
                    }
                },
            };
            if entry.hot.users.fetch_add(1, Ordering::Acquire) & RETIRED != 0 {
                // Being dropped by a sweep, which removes it next: wait for
                // that, then make a fresh entry.
                entry.hot.users.fetch_sub(1, Ordering::Relaxed);
                std::thread::yield_now();
                continue;
            }
            entry.touch(now, self.idle_after() / 64);
            return (f(key, entry), false);
        }
    }

    fn enter_overflow<R>(&self, now: Timestamp, f: impl FnOnce(&str, &Entry) -> R) -> R {
        self.overflow_used.store(true, Ordering::Relaxed);
        self.overflow.hot.users.fetch_add(1, Ordering::Acquire);
        self.overflow.touch(now, self.idle_after() / 64);
        f(OVERFLOW_KEY, &self.overflow)
    }

    /// Adds `key` unless the map is full (after sweeping, if one is due).
    fn insert<'g>(
        &self,
        key: &str,
        now: Timestamp,
        guard: &'g impl papaya::Guard,
    ) -> Option<&'g Entry> {
        let max = self.limits.max_keys;
        if self.len.load(Ordering::Relaxed) >= max
            && now.as_nanos() >= self.no_sweep_before.load(Ordering::Relaxed)
            && self.evict_idle(now) == 0
        {
            self.no_sweep_before.store(
                now.as_nanos().saturating_add(self.idle_after() / 16),
                Ordering::Relaxed,
            );
        }
        if self.len.fetch_add(1, Ordering::Relaxed) >= max {
            self.len.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        match self.map.try_insert(Key::new(key), Entry::new(now), guard) {
            Ok(entry) => Some(entry),
            Err(occupied) => {
                // Another thread added it first.
                self.len.fetch_sub(1, Ordering::Relaxed);
                Some(occupied.current)
            }
        }
    }

    /// Runs `f` on the entry of `key` while it is in use (made if new).
    pub(crate) fn with<R>(&self, key: &str, now: Timestamp, f: impl FnOnce(&Entry) -> R) -> R {
        self.enter(key, now, |_, entry| {
            let result = f(entry);
            entry.leave();
            result
        })
        .0
    }

    /// Runs `f` on the entry of `key` if it is held.
    pub(crate) fn get<R>(&self, key: &str, f: impl FnOnce(&Entry) -> R) -> Option<R> {
        self.get_bytes(KeyBytes(key.as_bytes()), f)
    }

    /// [`BreakerKeys::get`] for a key given as bytes.
    pub(crate) fn get_bytes<R>(&self, key: KeyBytes<'_>, f: impl FnOnce(&Entry) -> R) -> Option<R> {
        if key.0 == OVERFLOW_KEY.as_bytes() {
            return self
                .overflow_used
                .load(Ordering::Relaxed)
                .then(|| f(&self.overflow));
        }
        let guard = self.map.guard();
        self.map.get(&key, &guard).map(f)
    }

    /// Visits every key and its entry.
    pub(crate) fn for_each(&self, mut f: impl FnMut(&str, &Entry)) {
        if self.overflow_used.load(Ordering::Relaxed) {
            f(OVERFLOW_KEY, &self.overflow);
        }
        let guard = self.map.guard();
        for (key, entry) in self.map.iter(&guard) {
            f(key.as_str(), entry);
        }
    }

    /// Drops every idle key that loses nothing by it; returns how many.
    pub(crate) fn evict_idle(&self, now: Timestamp) -> u64 {
        let guard = self.map.guard();
        let mut dropped = 0u64;
        self.map.retain(
            |_, entry| {
                let drop = entry.try_retire(now, self.idle_after());
                dropped += u64::from(drop);
                !drop
            },
            &guard,
        );
        if dropped > 0 {
            self.len.fetch_sub(dropped as usize, Ordering::Relaxed);
            self.evicted.fetch_add(dropped, Ordering::Relaxed);
        }
        dropped
    }

    pub(crate) fn stats(&self) -> RegistryStats {
        RegistryStats {
            keys: self.len.load(Ordering::Relaxed)
                + usize::from(self.overflow_used.load(Ordering::Relaxed)),
            evicted: self.evicted.load(Ordering::Relaxed),
            overflowed: self.overflowed.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn keys(max_keys: usize) -> BreakerKeys {
        BreakerKeys::new(RegistryLimits {
            max_keys,
            idle_after: Duration::from_secs(10),
        })
    }

    fn at(secs: u64) -> Timestamp {
        Timestamp::from_millis(1_000 + secs * 1_000)
    }

    #[test]
    fn same_key_same_entry() {
        let k = keys(10);
        for _ in 0..3 {
            k.with("a", at(0), Entry::add_success);
        }
        assert_eq!(k.get("a", Entry::successes), Some(3));
        assert_eq!(k.get("b", Entry::successes), None);
        assert_eq!(k.stats().keys, 1);
    }

    #[test]
    fn the_cap_sends_new_keys_to_overflow_and_counts_them() {
        let k = keys(2);
        assert!(!k.with_flag("a"));
        assert!(!k.with_flag("b"));
        assert!(k.with_flag("c"));
        assert!(k.with_flag("d"));
        assert_eq!(k.get(OVERFLOW_KEY, Entry::successes), Some(2));
        assert_eq!(k.stats().overflowed, 2);
        assert_eq!(k.stats().keys, 3);
    }

    impl BreakerKeys {
        fn with_flag(&self, key: &str) -> bool {
            self.enter(key, at(0), |_, e| {
                e.add_success();
                e.leave();
            })
            .1
        }
    }

    #[test]
    fn idle_closed_keys_go_but_open_and_busy_ones_stay() {
        let k = keys(100);
        k.with("idle", at(0), |_| ());
        k.with("open", at(0), |e| e.lock().state.state = CircuitState::Open);
        k.enter("busy", at(0), |_, _| ());
        assert_eq!(k.evict_idle(at(9)), 0, "not idle yet");
        assert_eq!(k.evict_idle(at(11)), 1);
        assert_eq!(k.get("idle", |_| ()), None);
        assert!(k.get("open", |_| ()).is_some());
        assert_eq!(k.get("busy", Entry::in_flight), Some(1));
        k.get("busy", Entry::leave);
        assert_eq!(k.evict_idle(at(11)), 1, "free once its call ended");
        assert_eq!(k.stats().keys, 1);
        assert_eq!(k.stats().evicted, 2);
    }

    #[test]
    fn a_retired_entry_is_never_used_again() {
        let k = keys(10);
        k.with("a", at(0), |e| e.add_success());
        let entry_retired = k.get("a", |e| e.try_retire(at(11), k.idle_after()));
        assert_eq!(entry_retired, Some(true));
        // The sweep has marked it but not yet removed it: a caller waits for
        // the removal, then gets a fresh entry.
        std::thread::scope(|s| {
            let caller = s.spawn(|| k.with("a", at(11), |e| e.successes()));
            let guard = k.map.guard();
            k.map.remove(&KeyBytes(b"a"), &guard);
            k.len.fetch_sub(1, Ordering::Relaxed);
            assert_eq!(caller.join().ok(), Some(0), "a fresh entry");
        });
    }

    #[test]
    fn the_quiet_flag_follows_the_state() {
        let k = keys(10);
        assert!(k.with("a", at(0), Entry::is_quiet));
        k.with("a", at(0), |e| e.lock().state.consecutive_failures = 1);
        assert_eq!(k.get("a", Entry::is_quiet), Some(false));
        k.with("a", at(0), |e| e.lock().state.consecutive_failures = 0);
        assert_eq!(k.get("a", Entry::is_quiet), Some(true));
    }

    #[test]
    fn a_flood_of_keys_stays_under_the_cap() {
        let k = keys(1000);
        for i in 0..20_000u64 {
            let now = Timestamp::from_millis(1_000 + i);
            k.with(&format!("session-{i}"), now, |_| ());
            assert!(k.stats().keys <= 1001);
        }
        assert!(k.stats().evicted > 0, "idle keys were swept to make room");
    }

    #[test]
    fn concurrent_callers_count_every_call() {
        let k = keys(10);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..10_000 {
                        k.with("a", at(0), Entry::add_success);
                    }
                });
            }
        });
        assert_eq!(k.get("a", Entry::successes), Some(40_000));
        assert_eq!(k.get("a", Entry::in_flight), Some(0));
    }
}
