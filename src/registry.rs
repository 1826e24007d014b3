//! The bounded, sharded map of per-key state shared by breakers and limiters.
//!
//! ```
//! use pmcp_resilience::{RateLimitMiddleware, RegistryLimits, Scope};
//! use std::time::Duration;
//!
//! // At most 10 000 sessions held; idle ones dropped after 10 minutes.
//! let limits = RegistryLimits { max_keys: 10_000, idle_after: Duration::from_secs(600) };
//! let limiter = RateLimitMiddleware::builder()
//!     .scope(Scope::PerSession)
//!     .registry_limits(limits)
//!     .build()
//!     .expect("valid settings");
//! assert_eq!(limiter.metrics().registry.keys, 0);
//! ```
//!
//! Every key costs memory, and keys come from requests (session ids, tool
//! names), so an untrusted client that rotates them must not be able to grow
//! the map without bound. The registry enforces two limits:
//!
//! - **idle eviction**: a key not seen for [`RegistryLimits::idle_after`] is
//!   dropped, but only when its state says dropping it loses nothing
//!   (`KeyState::is_evictable`: a closed breaker, a limiter back at full
//!   capacity). An open or half-open breaker is never evicted.
//! - **a hard cap** of [`RegistryLimits::max_keys`]: when a new key arrives at
//!   the cap, idle evictable keys of its shard are swept first; if the map is
//!   still full, the request is served by the shared **overflow** entry
//!   ([`OVERFLOW_KEY`]), so all keys beyond the cap share one breaker or one
//!   limiter. Each such request is counted in [`RegistryStats::overflowed`].
//!   Sharing errs on the safe side: a flood of new keys is limited together
//!   instead of each getting a fresh budget.
//!
//! A rate limiter keeps each key's state words and text in one allocation
//! (a token-bucket key of 44 bytes costs about 96 bytes in all, the map
//! included), and calls a key idle once it has been back at full capacity
//! for `idle_after`.

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use hashbrown::HashTable;
use parking_lot::{MappedMutexGuard, Mutex, MutexGuard};

use crate::clock::Timestamp;
use crate::error::ConfigError;
use crate::scope::ScopeKey;

/// The key that serves requests beyond the registry's cap.
pub const OVERFLOW_KEY: &str = "overflow";

/// Per-key state kept in a registry.
pub(crate) trait KeyState: Send + 'static {
    /// Whether the key can be dropped at `now` without changing any future
    /// decision (it would be recreated in the same state).
    fn is_evictable(&self, now: Timestamp) -> bool;
}

/// What a [`KeyMap`] keeps per key: the key and its state, in a layout of
/// the record's choosing.
pub(crate) trait Record: Send + 'static {
    /// What the map hands to every record (the limiter's policy, which says
    /// how its bytes are laid out and when a key is full; nothing for a
    /// registry slot).
    type Context: Copy + Send + Sync + 'static;

    /// The key's bytes.
    fn key(&self, context: Self::Context) -> &[u8];

    /// The key was used at `now`.
    fn touch(&mut self, now: Timestamp);

    /// Whether the key has been idle for `idle_after` at `now` and can be
    /// dropped without changing any future decision.
    fn is_idle_and_evictable(
        &self,
        context: Self::Context,
        now: Timestamp,
        idle_after: Duration,
    ) -> bool;
}

/// Bounds on the number of keys a breaker or limiter keeps.
///
/// ```
/// use pmcp_resilience::{CircuitBreakerMiddleware, RegistryLimits, Scope};
/// use std::time::Duration;
///
/// // Per-session breakers: at most 50 000 sessions, idle ones dropped after 5 minutes.
/// let limits = RegistryLimits { max_keys: 50_000, idle_after: Duration::from_secs(300) };
/// assert!(limits.validate().is_ok());
/// let cb = CircuitBreakerMiddleware::builder()
///     .scope(Scope::PerSession)
///     .registry_limits(limits)
///     .build()
///     .expect("valid settings");
/// # let _ = cb;
/// // A zero cap is refused at build time.
/// let none = RegistryLimits { max_keys: 0, ..RegistryLimits::default() };
/// assert!(CircuitBreakerMiddleware::builder().registry_limits(none).build().is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegistryLimits {
    /// Most keys kept at once (default 100,000).
    pub max_keys: usize,
    /// A key unused this long may be evicted if its state allows (default 10
    /// minutes). A rate limiter's key counts as unused once it has been back
    /// at full capacity this long.
    pub idle_after: Duration,
}

impl Default for RegistryLimits {
    fn default() -> Self {
        RegistryLimits {
            max_keys: 100_000,
            idle_after: Duration::from_secs(600),
        }
    }
}

impl RegistryLimits {
    /// Checks the limits, as the builders do.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_keys == 0 {
            return Err(ConfigError::invalid("max_keys", "must be at least 1"));
        }
        if self.idle_after.is_zero() {
            return Err(ConfigError::invalid(
                "idle_after",
                "must be greater than zero",
            ));
        }
        Ok(())
    }
}

/// Counters describing a registry.
///
/// ```
/// use pmcp_resilience::{CircuitBreakerMiddleware, RegistryLimits, Scope};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let cb = CircuitBreakerMiddleware::builder()
///     .scope(Scope::PerTool)
///     .registry_limits(RegistryLimits { max_keys: 1, ..RegistryLimits::default() })
///     .build()
///     .expect("valid settings");
/// drop(cb.acquire("tool:search").await);
/// drop(cb.acquire("tool:fetch").await); // beyond the cap: served by the shared overflow entry
/// let stats = cb.metrics().registry;
/// assert_eq!(stats.overflowed, 1);
/// assert_eq!(stats.evicted, 0);
/// # }
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RegistryStats {
    /// Keys held now (the overflow entry included).
    pub keys: usize,
    /// Keys dropped because they were idle and evictable.
    pub evicted: u64,
    /// Requests served by the overflow entry because the registry was full.
    pub overflowed: u64,
}

#[repr(align(64))]
struct Shard<R> {
    table: Mutex<HashTable<R>>,
    /// After a sweep of this shard at the cap found nothing to drop, the next
    /// one waits until then (nanoseconds): otherwise a flood of new keys
    /// while every key is busy would rescan the shard on every request.
    no_sweep_before: AtomicU64,
}

/// A sharded map of [`Record`]s, bounded by [`RegistryLimits`].
///
/// The table holds the records themselves and no hash: growing it hashes
/// the keys again, which is rare, instead of storing 8 bytes per key.
pub(crate) struct KeyMap<R: Record> {
    shards: Box<[Shard<R>]>,
    shard_mask: u64,
    hasher: foldhash::quality::RandomState,
    limits: RegistryLimits,
    context: R::Context,
    len: AtomicUsize,
    evicted: AtomicU64,
    overflowed: AtomicU64,
}

impl<R: Record> KeyMap<R> {
    pub(crate) fn new(limits: RegistryLimits, context: R::Context) -> Self {
        let threads = std::thread::available_parallelism().map_or(4, |n| n.get());
        let count = (threads * 8).next_power_of_two().clamp(16, 256);
        let shards = (0..count)
            .map(|_| Shard {
                table: Mutex::new(HashTable::new()),
                no_sweep_before: AtomicU64::new(0),
            })
            .collect::<Vec<_>>()
            .into_boxed_slice();
        KeyMap {
            shards,
            shard_mask: (count - 1) as u64,
            hasher: foldhash::quality::RandomState::default(),
            limits,
            context,
            len: AtomicUsize::new(0),
            evicted: AtomicU64::new(0),
            overflowed: AtomicU64::new(0),
        }
    }

    pub(crate) fn limits(&self) -> RegistryLimits {
        self.limits
    }

    #[inline]
    fn hash(&self, key: &[u8]) -> u64 {
        self.hasher.hash_one(key)
    }

    fn shard_of(&self, hash: u64) -> &Shard<R> {
        // hashbrown takes its 7-bit tag from the top bits and its bucket from
        // the low ones; the shard uses the middle, independent of both.
        &self.shards[((hash >> 32) & self.shard_mask) as usize]
    }

    /// Runs `f` on the record of `key` under its shard's lock, creating it
    /// with `make` if the key is new. At the cap, `f` runs on the overflow
    /// record instead (counted in [`RegistryStats::overflowed`]).
    #[inline]
    pub(crate) fn with<T>(
        &self,
        key: &str,
        now: Timestamp,
        make: impl FnOnce(&str) -> R,
        f: impl FnOnce(&mut R) -> T,
    ) -> T {
        // `f` is called in one place, so that it is inlined into the caller,
        // and its result goes straight out (no flag beside it to move with it).
        let mut record = match self.lock_own(key, now, make) {
            Ok(record) => record,
            Err(make) => self.lock_overflow(now, make),
        };
        f(&mut record)
    }

    /// Like [`with`](Self::with), but at the cap (after a sweep) runs
    /// nothing and returns `None` instead of sharing the overflow record:
    /// for state that other keys must not be able to change (a breaker that
    /// their failures could open). Counted as an overflow.
    #[inline]
    pub(crate) fn try_with<T>(
        &self,
        key: &str,
        now: Timestamp,
        make: impl FnOnce(&str) -> R,
        f: impl FnOnce(&mut R) -> T,
    ) -> Option<T> {
        let mut record = self.lock_own(key, now, make).ok()?;
        Some(f(&mut record))
    }

    /// The key's own record, locked, or `make` handed back at the cap
    /// (counted as an overflow).
    #[inline]
    fn lock_own<M>(&self, key: &str, now: Timestamp, make: M) -> Result<MappedMutexGuard<'_, R>, M>
    where
        M: FnOnce(&str) -> R,
    {
        let context = self.context;
        let hash = self.hash(key.as_bytes());
        let shard = self.shard_of(hash);
        let table = shard.table.lock();
        let mut table = match MutexGuard::try_map(table, |t| {
            t.find_mut(hash, |r| r.key(context) == key.as_bytes())
        }) {
            Ok(mut record) => {
                record.touch(now);
                return Ok(record);
            }
            Err(table) => table,
        };
        if self.len.load(Ordering::Relaxed) >= self.limits.max_keys
            && now.as_nanos() >= shard.no_sweep_before.load(Ordering::Relaxed)
            && self.sweep_locked(&mut table, now) == 0
        {
            let pause = crate::clock::duration_nanos(self.limits.idle_after) / 16;
            shard
                .no_sweep_before
                .store(now.as_nanos().saturating_add(pause), Ordering::Relaxed);
        }
        if self.len.load(Ordering::Relaxed) < self.limits.max_keys {
            self.len.fetch_add(1, Ordering::Relaxed);
            let mut record = make(key);
            record.touch(now);
            return Ok(MutexGuard::map(table, |t| {
                t.insert_unique(hash, record, |r| self.hash(r.key(context)))
                    .into_mut()
            }));
        }
        drop(table);
        self.overflowed.fetch_add(1, Ordering::Relaxed);
        Err(make)
    }

    /// The overflow record, locked (created with `make` if need be).
    fn lock_overflow(
        &self,
        now: Timestamp,
        make: impl FnOnce(&str) -> R,
    ) -> MappedMutexGuard<'_, R> {
        let context = self.context;
        let overflow = OVERFLOW_KEY.as_bytes();
        let hash = self.hash(overflow);
        let table = self.shard_of(hash).table.lock();
        let mut record = MutexGuard::map(table, |t| {
            // The overflow entry is allowed one place beyond the cap.
            match t.find_entry(hash, |r| r.key(context) == overflow) {
                Ok(entry) => entry.into_mut(),
                Err(absent) => {
                    self.len.fetch_add(1, Ordering::Relaxed);
                    absent
                        .into_table()
                        .insert_unique(hash, make(OVERFLOW_KEY), |r| self.hash(r.key(context)))
                        .into_mut()
                }
            }
        });
        record.touch(now);
        record
    }

    /// Runs `f` on the record of `key` if it exists.
    pub(crate) fn peek<T>(&self, key: &str, f: impl FnOnce(&mut R) -> T) -> Option<T> {
        let context = self.context;
        let hash = self.hash(key.as_bytes());
        let mut table = self.shard_of(hash).table.lock();
        table
            .find_mut(hash, |r| r.key(context) == key.as_bytes())
            .map(f)
    }

    /// Drops the idle, evictable keys of one shard; returns how many.
    fn sweep_locked(&self, table: &mut HashTable<R>, now: Timestamp) -> usize {
        let (context, idle_after) = (self.context, self.limits.idle_after);
        let before = table.len();
        table.retain(|r| {
            !(r.key(context) != OVERFLOW_KEY.as_bytes()
                && r.is_idle_and_evictable(context, now, idle_after))
        });
        let removed = before - table.len();
        if removed > 0 {
            self.len.fetch_sub(removed, Ordering::Relaxed);
            self.evicted.fetch_add(removed as u64, Ordering::Relaxed);
        }
        removed
    }

    /// Drops every idle, evictable key; returns how many were dropped.
    pub(crate) fn evict_idle(&self, now: Timestamp) -> u64 {
        let before = self.evicted.load(Ordering::Relaxed);
        for shard in self.shards.iter() {
            self.sweep_locked(&mut shard.table.lock(), now);
        }
        self.evicted.load(Ordering::Relaxed) - before
    }

    /// Visits every record (one shard locked at a time).
    pub(crate) fn for_each(&self, mut f: impl FnMut(&mut R)) {
        for shard in self.shards.iter() {
            let mut table = shard.table.lock();
            for record in table.iter_mut() {
                f(record);
            }
        }
    }

    pub(crate) fn stats(&self) -> RegistryStats {
        RegistryStats {
            keys: self.len.load(Ordering::Relaxed),
            evicted: self.evicted.load(Ordering::Relaxed),
            overflowed: self.overflowed.load(Ordering::Relaxed),
        }
    }
}

/// A registry's record: the key, when it was last used, and its state.
struct Slot<S> {
    key: ScopeKey,
    last_seen: Timestamp,
    state: S,
}

impl<S> Slot<S> {
    /// Makes the slot of a new key, its state made by `init`.
    fn maker(now: Timestamp, init: impl FnOnce(&ScopeKey) -> S) -> impl FnOnce(&str) -> Self {
        move |key| {
            let key = ScopeKey::verbatim(key);
            Slot {
                state: init(&key),
                key,
                last_seen: now,
            }
        }
    }
}

impl<S: KeyState> Record for Slot<S> {
    type Context = ();

    fn key(&self, _: ()) -> &[u8] {
        self.key.as_str().as_bytes()
    }

    fn touch(&mut self, now: Timestamp) {
        self.last_seen = now;
    }

    fn is_idle_and_evictable(&self, _: (), now: Timestamp, idle_after: Duration) -> bool {
        now.saturating_since(self.last_seen) >= idle_after && self.state.is_evictable(now)
    }
}

/// A [`KeyMap`] from [`ScopeKey`] to a typed state, bounded by
/// [`RegistryLimits`].
pub(crate) struct Registry<S: KeyState>(KeyMap<Slot<S>>);

impl<S: KeyState> Registry<S> {
    pub(crate) fn new(limits: RegistryLimits) -> Self {
        Registry(KeyMap::new(limits, ()))
    }

    pub(crate) fn limits(&self) -> RegistryLimits {
        self.0.limits()
    }

    // The breaker never shares an entry (`try_with`); the limiter uses its
    // `KeyMap` directly. The tests drive the overflow through this.
    #[cfg(test)]
    /// Runs `f` on the state of `key` under its shard's lock, creating the
    /// state with `init` if the key is new. At the cap, `f` runs on the
    /// overflow entry instead and the returned flag is `true`.
    pub(crate) fn with<R>(
        &self,
        key: &str,
        now: Timestamp,
        init: impl FnOnce(&ScopeKey) -> S,
        f: impl FnOnce(&mut S) -> R,
    ) -> (R, bool) {
        match self.0.lock_own(key, now, Slot::maker(now, init)) {
            Ok(mut slot) => (f(&mut slot.state), false),
            Err(make) => (f(&mut self.0.lock_overflow(now, make).state), true),
        }
    }

    /// Like [`with`](Self::with), but at the cap (after a sweep) runs
    /// nothing and returns `None` instead of sharing the overflow entry:
    /// for state that other keys must not be able to change (a breaker that
    /// their failures could open). The refusal is counted in
    /// [`RegistryStats::overflowed`].
    pub(crate) fn try_with<R>(
        &self,
        key: &str,
        now: Timestamp,
        init: impl FnOnce(&ScopeKey) -> S,
        f: impl FnOnce(&mut S) -> R,
    ) -> Option<R> {
        self.0
            .try_with(key, now, Slot::maker(now, init), |slot| f(&mut slot.state))
    }

    /// Runs `f` on the state of `key` if it exists.
    pub(crate) fn peek<R>(&self, key: &str, f: impl FnOnce(&mut S) -> R) -> Option<R> {
        self.0.peek(key, |slot| f(&mut slot.state))
    }

    /// Drops every idle, evictable key; returns how many were dropped.
    pub(crate) fn evict_idle(&self, now: Timestamp) -> u64 {
        self.0.evict_idle(now)
    }

    /// Visits every key and its state (one shard locked at a time).
    pub(crate) fn for_each(&self, mut f: impl FnMut(&ScopeKey, &mut S)) {
        self.0.for_each(|slot| f(&slot.key, &mut slot.state));
    }

    pub(crate) fn stats(&self) -> RegistryStats {
        self.0.stats()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Counter {
        hits: u32,
        pinned: bool,
    }

    impl KeyState for Counter {
        fn is_evictable(&self, _now: Timestamp) -> bool {
            !self.pinned
        }
    }

    fn limits(max_keys: usize) -> RegistryLimits {
        RegistryLimits {
            max_keys,
            idle_after: Duration::from_secs(10),
        }
    }

    #[test]
    fn same_key_same_state() {
        let r = Registry::<Counter>::new(limits(10));
        let t = Timestamp::from_millis(1);
        for _ in 0..3 {
            r.with("a", t, |_: &ScopeKey| Counter::default(), |c| c.hits += 1);
        }
        assert_eq!(r.peek("a", |c| c.hits), Some(3));
        assert_eq!(r.peek("b", |c| c.hits), None);
        assert_eq!(r.stats().keys, 1);
    }

    #[test]
    fn cap_sends_new_keys_to_overflow_and_counts_them() {
        let r = Registry::<Counter>::new(limits(2));
        let t = Timestamp::from_millis(1);
        assert!(
            !r.with("a", t, |_: &ScopeKey| Counter::default(), |c| c.hits += 1)
                .1
        );
        assert!(
            !r.with("b", t, |_: &ScopeKey| Counter::default(), |c| c.hits += 1)
                .1
        );
        assert!(
            r.with("c", t, |_: &ScopeKey| Counter::default(), |c| c.hits += 1)
                .1
        );
        assert!(
            r.with("d", t, |_: &ScopeKey| Counter::default(), |c| c.hits += 1)
                .1
        );
        assert_eq!(r.peek(OVERFLOW_KEY, |c| c.hits), Some(2));
        assert_eq!(r.stats().overflowed, 2);
        assert_eq!(r.stats().keys, 3);
    }

    #[test]
    fn idle_evictable_keys_make_room_but_pinned_ones_stay() {
        let r = Registry::<Counter>::new(limits(1000));
        let t0 = Timestamp::from_millis(1_000);
        for i in 0..100 {
            r.with(
                &format!("k{i}"),
                t0,
                |_: &ScopeKey| Counter::default(),
                |c| c.pinned = i % 10 == 0,
            );
        }
        let later = t0.saturating_add(Duration::from_secs(11));
        assert_eq!(r.evict_idle(later), 90);
        assert_eq!(r.stats().keys, 10);
        assert_eq!(r.peek("k10", |c| c.pinned), Some(true));
        assert_eq!(r.peek("k11", |c| c.pinned), None);
    }

    #[test]
    fn keys_idle_after_a_fruitless_sweep_are_still_reclaimed() {
        let r = Registry::<Counter>::new(limits(2));
        let t0 = Timestamp::from_millis(1_000);
        r.with("a", t0, |_: &ScopeKey| Counter::default(), |_| ());
        r.with("b", t0, |_: &ScopeKey| Counter::default(), |_| ());
        for i in 0..100 {
            // Nothing is idle: swept once, then these go to overflow cheaply.
            assert!(
                r.with(
                    &format!("c{i}"),
                    t0,
                    |_: &ScopeKey| Counter::default(),
                    |_| ()
                )
                .1
            );
        }
        let later = t0.saturating_add(Duration::from_secs(11));
        // A new key sweeps its own shard only: keep trying until one lands
        // beside `a` or `b`, whose sweep must then make room.
        let placed = (0..5000).any(|i| {
            !r.with(
                &format!("d{i}"),
                later,
                |_: &ScopeKey| Counter::default(),
                |_| (),
            )
            .1
        });
        assert!(placed, "idle keys were reclaimed after the pause");
        assert!(r.stats().evicted >= 1);
    }

    #[test]
    fn not_yet_idle_keys_are_kept() {
        let r = Registry::<Counter>::new(limits(1000));
        let t0 = Timestamp::from_millis(1_000);
        r.with("a", t0, |_: &ScopeKey| Counter::default(), |_| ());
        assert_eq!(r.evict_idle(t0.saturating_add(Duration::from_secs(9))), 0);
    }

    #[test]
    fn a_flood_of_keys_stays_under_the_cap() {
        let r = Registry::<Counter>::new(limits(1000));
        let mut t = Timestamp::from_millis(1_000);
        for i in 0..50_000 {
            t = t.saturating_add(Duration::from_millis(1));
            r.with(
                &format!("session-{i}"),
                t,
                |_: &ScopeKey| Counter::default(),
                |c| c.hits += 1,
            );
            assert!(r.stats().keys <= 1001);
        }
        assert!(r.stats().evicted > 0, "idle keys were swept to make room");
    }
}
