//! The breaker's keys: a bounded map whose lookups take no lock, and whose
//! closed path touches one cache line per key.
//!
//! A breaker sees every call twice (admission and outcome), and nearly all
//! calls meet a closed breaker with nothing to count: the state does not
//! change. So an [`Entry`] keeps, beside its full state behind a mutex, a
//! line of atomics read and written without it: a *quiet* flag (closed,
//! normal mode, no failure counted, no probe; see [`state::is_quiet`]), the
//! number of calls in flight, the successes, when the key was last used and
//! the key itself (up to [`KEY_HEAD`] bytes; a longer key is compared there
//! first, then whole), so that a lookup and a quiet call fetch one line of
//! the entry. While the flag is up and no
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
//!
//! Each entry lives in papaya's element and holds its own key, so a call in
//! flight keeps an [`InUse`] (a pointer to its entry) instead of a copy of
//! the key, and its outcome reaches the entry without a second lookup.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};

use parking_lot::{Mutex, MutexGuard};

use super::state::{self, BreakerMode, CircuitBreakerState, CircuitState};
use crate::clock::{Timestamp, duration_nanos};
use crate::registry::{OVERFLOW_KEY, RegistryLimits, RegistryStats};

/// Set in [`Hot::users`] once an entry is being dropped.
const RETIRED: u32 = 1 << 31;

/// What a lookup and the quiet path read and write, on one cache line: with
/// many keys, the key a call wants has usually left the cache since its last
/// call, and each line fetched costs a trip to memory.
#[repr(C, align(64))]
#[derive(Debug)]
struct Hot {
    /// Calls in flight (and operations at work) on this key, plus
    /// [`RETIRED`] once it is being dropped.
    users: AtomicU32,
    /// When a call last used the key, in [`Ticks`] (wrapping).
    last_seen: AtomicU32,
    /// Calls that succeeded.
    successes: AtomicU64,
    /// Whether [`state::is_quiet`] holds for the state behind the mutex.
    quiet: AtomicBool,
    /// The key's length, or [`LONG_KEY`].
    key_len: u8,
    /// The key, or its first [`KEY_HEAD`] bytes when longer.
    key_head: [u8; KEY_HEAD],
}

/// Key bytes kept on the entry's first line (what the other fields leave).
const KEY_HEAD: usize = 46;

/// [`Hot::key_len`] of a key longer than [`KEY_HEAD`], kept whole in
/// [`Entry::long_key`].
const LONG_KEY: u8 = u8::MAX;

/// Coarse time for [`Hot::last_seen`]: nanoseconds shifted right so that
/// one tick is at most 1/64 of `idle_after` (one nanosecond below 64 ns),
/// making `idle_after` 64 to 127 ticks. Ticks wrap after 2^32 of them (at
/// least 2^25 times `idle_after`); an entry idle across a whole number of
/// wraps looks busy for at most `idle_after` more.
#[derive(Debug, Clone, Copy)]
struct Ticks {
    shift: u32,
    idle: u32,
}

impl Ticks {
    fn new(idle_after: u64) -> Self {
        let shift = (idle_after / 64).max(1).ilog2();
        Ticks {
            shift,
            idle: u32::try_from(idle_after >> shift).unwrap_or(u32::MAX),
        }
    }

    fn at(self, now: Timestamp) -> u32 {
        // Wrapping by design (see above).
        (now.as_nanos() >> self.shift) as u32
    }
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
#[repr(C)]
pub(crate) struct Entry {
    hot: Hot,
    /// The whole key, when longer than [`KEY_HEAD`].
    long_key: Option<Box<str>>,
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
    fn new(key: &str, now: u32) -> Self {
        let mut key_head = [0; KEY_HEAD];
        let head = key.len().min(KEY_HEAD);
        key_head[..head].copy_from_slice(&key.as_bytes()[..head]);
        let (key_len, long_key) = match u8::try_from(key.len()) {
            Ok(len) if key.len() <= KEY_HEAD => (len, None),
            _ => (LONG_KEY, Some(key.into())),
        };
        Entry {
            hot: Hot {
                users: AtomicU32::new(0),
                last_seen: AtomicU32::new(now),
                successes: AtomicU64::new(0),
                quiet: AtomicBool::new(state::is_quiet(&CircuitBreakerState::default())),
                key_len,
                key_head,
            },
            long_key,
            slow: Mutex::new(Slow::default()),
        }
    }

    /// The key this entry is held under.
    pub(crate) fn key(&self) -> &str {
        match &self.long_key {
            Some(key) => key,
            // Copied whole from a `str`, so always UTF-8.
            None => std::str::from_utf8(self.key_bytes()).unwrap_or_default(),
        }
    }

    fn key_bytes(&self) -> &[u8] {
        match &self.long_key {
            Some(key) => key.as_bytes(),
            None => &self.hot.key_head[..usize::from(self.hot.key_len)],
        }
    }

    /// Whether this entry is held under `key`: a key of up to
    /// [`KEY_HEAD`] bytes is compared on the first line alone.
    fn is_keyed(&self, key: &[u8]) -> bool {
        let hot = &self.hot;
        match u8::try_from(key.len()) {
            Ok(len) if key.len() <= KEY_HEAD => {
                hot.key_len == len && hot.key_head[..key.len()] == *key
            }
            _ => {
                hot.key_len == LONG_KEY
                    && hot.key_head[..] == key[..KEY_HEAD]
                    && self.long_key.as_deref().map(str::as_bytes) == Some(key)
            }
        }
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

    fn leave(&self) {
        self.hot.users.fetch_sub(1, Ordering::Release);
    }

    /// Calls in flight on this key.
    #[cfg(test)]
    fn in_flight(&self) -> u32 {
        self.hot.users.load(Ordering::Relaxed) & !RETIRED
    }

    /// Notes a use at `now` (in ticks): written once per tick at most.
    fn touch(&self, now: u32) {
        if self.hot.last_seen.load(Ordering::Relaxed) != now {
            self.hot.last_seen.store(now, Ordering::Relaxed);
        }
    }

    /// Whether a sweep has marked the entry retired.
    fn is_retired(&self) -> bool {
        self.hot.users.load(Ordering::Acquire) & RETIRED != 0
    }

    /// Marks the entry retired if it has been idle for `idle_after`, its
    /// breaker is closed in normal mode and nobody uses it.
    fn try_retire(&self, now: Timestamp, ticks: Ticks) -> bool {
        let seen = self.hot.last_seen.load(Ordering::Relaxed);
        if ticks.at(now).wrapping_sub(seen) < ticks.idle {
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

/// An entry as the map holds it, hashed and compared by its key.
///
/// papaya allocates each element on its own and, when the table grows,
/// copies only the pointer to it, so the entry stays put while a call in
/// flight points at it (checked by the test
/// `a_use_reaches_its_entry_through_growth_and_sweeps`). Held in papaya's
/// element itself, the entry is one pointer away from the table.
struct Held(Entry);

impl PartialEq for Held {
    fn eq(&self, other: &Held) -> bool {
        self.0.key_bytes() == other.0.key_bytes()
    }
}

impl Eq for Held {}

impl std::hash::Hash for Held {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        KeyBytes(self.0.key_bytes()).hash(state);
    }
}

/// A borrowed key, for lookups (hashes as a held entry does).
#[derive(Clone, Copy)]
struct KeyBytes<'a>(&'a [u8]);

impl std::hash::Hash for KeyBytes<'_> {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write(self.0);
    }
}

impl papaya::Equivalent<Held> for KeyBytes<'_> {
    fn equivalent(&self, held: &Held) -> bool {
        held.0.is_keyed(self.0)
    }
}

/// The held entries (a map to nothing: papaya's set would replace an
/// element inserted twice, and a replaced entry is freed).
type Map = papaya::HashMap<Held, (), foldhash::quality::RandomState>;

/// A use of an entry, begun by [`BreakerKeys::enter`] and ended by
/// [`BreakerKeys::leave`]: while it lasts, the entry is neither evicted nor
/// dropped, so the use can reach it again without a lookup.
#[must_use = "a use keeps its entry from eviction until it is passed to `leave`"]
pub(crate) struct InUse {
    on: Use,
    /// The [`BreakerKeys::id`] of the map that made it.
    map: u64,
}

enum Use {
    Overflow,
    Keyed(NonNull<Entry>),
}

// SAFETY: an `InUse` is a pointer to an `Entry`, which is `Sync`; it is only
// dereferenced through `BreakerKeys::entry`, which checks that the map asked
// is the one that made it and ties the reference to that map.
#[allow(unsafe_code)]
unsafe impl Send for InUse {}
// SAFETY: as for `Send`; `&InUse` gives no access to the entry on its own.
#[allow(unsafe_code)]
unsafe impl Sync for InUse {}

/// Tells maps apart, for [`InUse`].
static NEXT_MAP_ID: AtomicU64 = AtomicU64::new(0);

/// The bounded map from key to [`Entry`].
pub(crate) struct BreakerKeys {
    /// Unique among all maps of this process.
    id: u64,
    map: Map,
    overflow: Entry,
    overflow_used: AtomicBool,
    limits: RegistryLimits,
    /// `idle_after` in the coarse time entries keep.
    ticks: Ticks,
    /// Keys in `map`.
    len: AtomicUsize,
    evicted: AtomicU64,
    /// Successes of the entries evicted so far.
    evicted_successes: AtomicU64,
    overflowed: AtomicU64,
    /// After a sweep at the cap found nothing to drop, the next one waits
    /// until then (nanoseconds).
    no_sweep_before: AtomicU64,
}

impl BreakerKeys {
    pub(crate) fn new(limits: RegistryLimits) -> Self {
        BreakerKeys {
            id: NEXT_MAP_ID.fetch_add(1, Ordering::Relaxed),
            map: papaya::HashMap::with_hasher(foldhash::quality::RandomState::default()),
            overflow: Entry::new(OVERFLOW_KEY, 0),
            overflow_used: AtomicBool::new(false),
            limits,
            ticks: Ticks::new(duration_nanos(limits.idle_after)),
            len: AtomicUsize::new(0),
            evicted: AtomicU64::new(0),
            evicted_successes: AtomicU64::new(0),
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

    /// Begins a use of the entry of `key`, made if new: an entry in use is
    /// never dropped. The entry is the overflow entry when the map is full;
    /// the flag returned says so. End the use with [`BreakerKeys::leave`].
    pub(crate) fn enter(&self, key: &str, now: Timestamp) -> (InUse, bool) {
        if key == OVERFLOW_KEY {
            return (self.enter_overflow(now), false);
        }
        let guard = self.map.guard();
        loop {
            let held = match self.map.get_key_value(&KeyBytes(key.as_bytes()), &guard) {
                Some((held, ())) => held,
                None => match self.insert(key, now, &guard) {
                    Some(()) => continue,
                    None => {
                        self.overflowed.fetch_add(1, Ordering::Relaxed);
                        return (self.enter_overflow(now), true);
                    }
                },
            };
            let entry = &held.0;
            if entry.hot.users.fetch_add(1, Ordering::Acquire) & RETIRED != 0 {
                // Being dropped by a sweep, which removes it next: wait for
                // that, then make a fresh entry.
                entry.hot.users.fetch_sub(1, Ordering::Relaxed);
                std::thread::yield_now();
                continue;
            }
            entry.touch(self.ticks.at(now));
            return (self.in_use(Use::Keyed(NonNull::from(entry))), false);
        }
    }

    fn enter_overflow(&self, now: Timestamp) -> InUse {
        self.overflow_used.store(true, Ordering::Relaxed);
        self.overflow.hot.users.fetch_add(1, Ordering::Acquire);
        self.overflow.touch(self.ticks.at(now));
        self.in_use(Use::Overflow)
    }

    fn in_use(&self, on: Use) -> InUse {
        InUse { on, map: self.id }
    }

    /// The entry a use is on.
    ///
    /// # Panics
    /// If `used` was made by another map (a bug in this crate).
    #[allow(unsafe_code)]
    pub(crate) fn entry(&self, used: &InUse) -> &Entry {
        assert_eq!(used.map, self.id, "a use of another map's entry");
        match used.on {
            Use::Overflow => &self.overflow,
            // SAFETY: this map's `enter` counted this use in the entry's
            // `users` before making `used`, and only `leave` (which consumes
            // it) takes it back. The entry lives in the map's element, which
            // papaya allocates on its own and never moves (growth copies the
            // pointer to it; see `Held`), and frees only once the element has
            // left the map: elements are added with `try_insert` (never
            // replaced), and removed only by `evict_idle`, after `try_retire`
            // swapped `users` from 0 to `RETIRED`. So while `used` exists the
            // entry is alive and in place, for at least as long as `self` is
            // borrowed.
            Use::Keyed(entry) => unsafe { entry.as_ref() },
        }
    }

    /// Ends a use begun by [`BreakerKeys::enter`].
    pub(crate) fn leave(&self, used: InUse) {
        self.entry(&used).leave();
    }

    /// Adds `key` unless the map is full (after sweeping, if one is due).
    fn insert(&self, key: &str, now: Timestamp, guard: &impl papaya::Guard) -> Option<()> {
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
        if self
            .map
            .try_insert(Held(Entry::new(key, self.ticks.at(now))), (), guard)
            .is_err()
        {
            // Another thread added it first; ours is dropped unused.
            self.len.fetch_sub(1, Ordering::Relaxed);
        }
        Some(())
    }

    /// Runs `f` on the entry of `key` while it is in use (made if new).
    pub(crate) fn with<R>(&self, key: &str, now: Timestamp, f: impl FnOnce(&Entry) -> R) -> R {
        let (used, _) = self.enter(key, now);
        let result = f(self.entry(&used));
        self.leave(used);
        result
    }

    /// Runs `f` on the entry of `key` if it is held.
    pub(crate) fn get<R>(&self, key: &str, f: impl FnOnce(&Entry) -> R) -> Option<R> {
        if key == OVERFLOW_KEY {
            return self
                .overflow_used
                .load(Ordering::Relaxed)
                .then(|| f(&self.overflow));
        }
        let guard = self.map.guard();
        self.map
            .get_key_value(&KeyBytes(key.as_bytes()), &guard)
            .map(|(held, ())| f(&held.0))
    }

    /// Visits every key and its entry.
    pub(crate) fn for_each(&self, mut f: impl FnMut(&str, &Entry)) {
        if self.overflow_used.load(Ordering::Relaxed) {
            f(OVERFLOW_KEY, &self.overflow);
        }
        let guard = self.map.guard();
        for (held, ()) in self.map.iter(&guard) {
            f(held.0.key(), &held.0);
        }
    }

    /// Drops every idle key that loses nothing by it; returns how many.
    pub(crate) fn evict_idle(&self, now: Timestamp) -> u64 {
        let guard = self.map.guard();
        let mut dropped = 0u64;
        self.map.retain(
            |held, ()| {
                // papaya may ask again about an entry it failed to remove (a
                // resize moved it): one already retired must go, and was
                // counted when it was marked.
                if held.0.is_retired() {
                    return false;
                }
                let retired = held.0.try_retire(now, self.ticks);
                if retired {
                    // Retired, so no success can land on it any more.
                    self.evicted_successes
                        .fetch_add(held.0.successes(), Ordering::Release);
                    dropped += 1;
                }
                !retired
            },
            &guard,
        );
        if dropped > 0 {
            self.len.fetch_sub(dropped as usize, Ordering::Relaxed);
            self.evicted.fetch_add(dropped, Ordering::Relaxed);
        }
        dropped
    }

    /// Successes counted by all entries, evicted ones included. Read while
    /// calls go on, it may miss the last few (never counts one twice): the
    /// evicted total is read before the entries, and an entry retired since
    /// is skipped.
    pub(crate) fn successes(&self) -> u64 {
        let mut sum = self.evicted_successes.load(Ordering::Acquire);
        self.for_each(|_, e| {
            if !e.is_retired() {
                sum = sum.wrapping_add(e.successes());
            }
        });
        sum
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
    fn the_success_total_keeps_evicted_and_overflowed_keys() {
        let k = keys(2);
        k.with_flag("a");
        k.with_flag("a");
        k.with_flag("b");
        k.with_flag("c"); // at the cap: the overflow entry
        assert_eq!(k.successes(), 4);
        assert_eq!(k.evict_idle(at(11)), 2);
        assert_eq!(k.stats().keys, 1, "only the overflow entry is left");
        assert_eq!(k.successes(), 4, "evicted keys' successes are kept");
        k.with_flag("a");
        assert_eq!(k.successes(), 5);
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
            let (used, overflowed) = self.enter(key, at(0));
            self.entry(&used).add_success();
            self.leave(used);
            overflowed
        }
    }

    #[test]
    fn idle_closed_keys_go_but_open_and_busy_ones_stay() {
        let k = keys(100);
        k.with("idle", at(0), |_| ());
        k.with("open", at(0), |e| e.lock().state.state = CircuitState::Open);
        let busy = k.enter("busy", at(0)).0;
        assert_eq!(k.evict_idle(at(9)), 0, "not idle yet");
        assert_eq!(k.evict_idle(at(11)), 1);
        assert_eq!(k.get("idle", |_| ()), None);
        assert!(k.get("open", |_| ()).is_some());
        assert_eq!(k.get("busy", Entry::in_flight), Some(1));
        k.leave(busy);
        assert_eq!(k.evict_idle(at(11)), 1, "free once its call ended");
        assert_eq!(k.stats().keys, 1);
        assert_eq!(k.stats().evicted, 2);
    }

    #[test]
    fn a_retired_entry_is_never_used_again() {
        let k = keys(10);
        k.with("a", at(0), |e| e.add_success());
        let entry_retired = k.get("a", |e| e.try_retire(at(11), k.ticks));
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
    fn a_use_reaches_its_entry_through_growth_and_sweeps() {
        let k = keys(100_000);
        let (used, _) = k.enter("kept", at(0));
        k.entry(&used).add_success();
        // Enough keys to make the map grow several times, then a sweep
        // that drops every idle key but the one in use.
        for i in 0..20_000 {
            k.with(&format!("k{i}"), at(0), |_| ());
        }
        // The element the map holds now is the one the use points at: the
        // map did not move it as it grew.
        let held = k.get("kept", |e| std::ptr::from_ref(e) as usize);
        assert_eq!(held, Some(std::ptr::from_ref(k.entry(&used)) as usize));
        assert_eq!(k.evict_idle(at(11)), 20_000);
        assert_eq!(k.entry(&used).key(), "kept");
        k.entry(&used).add_success();
        k.leave(used);
        assert_eq!(k.get("kept", Entry::successes), Some(2));
        assert_eq!(k.evict_idle(at(11)), 1, "free once its use ended");
    }

    #[test]
    fn uses_outlive_sweeps_under_concurrency() {
        let k = keys(50);
        let stop = AtomicBool::new(false);
        std::thread::scope(|s| {
            let sweeper = s.spawn(|| {
                let mut swept = 0;
                for i in 0..u64::MAX {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    swept += k.evict_idle(at(100 + i));
                }
                swept
            });
            let workers: Vec<_> = (0..3)
                .map(|t| {
                    let k = &k;
                    s.spawn(move || {
                        for i in 0..20_000u64 {
                            let key = format!("k{}", (i + t) % 8);
                            let (used, _) = k.enter(&key, at(0));
                            assert_eq!(k.entry(&used).key(), key);
                            k.entry(&used).add_success();
                            k.leave(used);
                        }
                    })
                })
                .collect();
            for w in workers {
                assert!(w.join().is_ok());
            }
            stop.store(true, Ordering::Relaxed);
            assert!(
                sweeper.join().is_ok_and(|swept| swept > 0),
                "the sweeper ran"
            );
        });
        assert!(k.stats().keys <= 8);
    }

    #[test]
    #[should_panic(expected = "another map")]
    fn a_use_is_only_good_on_its_own_map() {
        let (a, b) = (keys(10), keys(10));
        let (used, _) = a.enter("x", at(0));
        b.entry(&used);
    }

    #[test]
    fn an_entry_left_retired_goes_at_the_next_sweep_and_counts_once() {
        // As when papaya loses the removal to a resize and keeps the entry.
        let k = keys(10);
        k.with("a", at(0), |_| ());
        assert_eq!(k.get("a", |e| e.try_retire(at(11), k.ticks)), Some(true));
        k.len.fetch_sub(1, Ordering::Relaxed);
        k.evicted.fetch_add(1, Ordering::Relaxed);
        assert_eq!(k.evict_idle(at(11)), 0, "nothing newly retired");
        assert_eq!(k.get("a", |_| ()), None, "but the retired entry is gone");
        assert_eq!((k.stats().keys, k.stats().evicted), (0, 1));
        // A caller after that gets a fresh entry instead of waiting forever.
        assert_eq!(k.with("a", at(12), |e| e.successes()), 0);
    }

    #[test]
    fn a_lookup_and_the_quiet_path_share_one_line() {
        assert_eq!(std::mem::size_of::<Hot>(), 64);
        assert_eq!(std::mem::align_of::<Entry>(), 64);
    }

    #[test]
    fn keys_past_the_first_line_are_kept_whole() {
        let k = keys(100);
        let head = "h".repeat(KEY_HEAD);
        let names = [
            "h".repeat(KEY_HEAD - 1),
            head.clone(),
            format!("{head}x"),
            format!("{head}y"),
            format!("{head}{}", "z".repeat(300)),
            "é".repeat(40),
        ];
        for (i, name) in names.iter().enumerate() {
            for _ in 0..=i {
                k.with(name, at(0), Entry::add_success);
            }
        }
        assert_eq!(
            k.stats().keys,
            names.len(),
            "keys sharing a head stay apart"
        );
        for (i, name) in names.iter().enumerate() {
            assert_eq!(k.get(name, Entry::successes), Some(i as u64 + 1), "{name}");
            assert_eq!(
                k.get(name, |e| e.key().to_string()).as_deref(),
                Some(name.as_str())
            );
        }
        assert_eq!(k.get(&format!("{head}w"), |_| ()), None);
        let mut seen = Vec::new();
        k.for_each(|key, _| seen.push(key.to_string()));
        seen.sort();
        let mut want = names.to_vec();
        want.sort();
        assert_eq!(seen, want);
    }

    #[test]
    fn idle_time_is_told_in_ticks_of_at_most_a_64th() {
        for idle_after in [1, 63, 64, 1_000, 1_000_000, 10_000_000_000, u64::MAX / 2] {
            let t = Ticks::new(idle_after);
            let tick = 1u64 << t.shift;
            assert!(
                tick == 1 || tick <= idle_after / 64,
                "{idle_after}: tick {tick}"
            );
            assert_eq!(u64::from(t.idle), idle_after >> t.shift, "{idle_after}");
            assert!(
                idle_after < 64 || (64..128).contains(&t.idle),
                "{idle_after}"
            );
        }
    }

    #[test]
    fn idleness_is_told_across_a_wrap_of_the_ticks() {
        let ticks = Ticks::new(duration_nanos(Duration::from_secs(10)));
        let tick = 1u64 << ticks.shift;
        // Last seen just before the ticks wrap around.
        let entry = Entry::new("a", u32::MAX - 5);
        let after_wrap = |t: u64| Timestamp::from_nanos(((1u64 << 32) + t) * tick);
        assert!(
            !entry.try_retire(after_wrap(10), ticks),
            "16 ticks is not idle"
        );
        let idle = u64::from(ticks.idle);
        assert!(
            entry.try_retire(after_wrap(idle), ticks),
            "idle_after later"
        );
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
