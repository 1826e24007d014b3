//! One key of the in-memory limiter: its state words, its counts and its
//! key text, in one allocation.
//!
//! The layout is `[state: 1 or 2 words][allowed: u32][rejected: u32][key]`,
//! little-endian; the [`Policy`] says how many state words there are (one
//! for the buckets, two for the windows). A token-bucket key of 44 bytes
//! (`session:<uuid>`) is a 60-byte allocation plus the 16-byte pointer in
//! the map's table.
//!
//! There is no last-seen time: a key is idle once it has been back at full
//! capacity for `idle_after` (every admission moves the time it is full
//! again forward, and a key that is not full is never dropped anyway).

use std::time::Duration;

use crate::clock::{Timestamp, duration_nanos};
use crate::registry::Record;

use super::strategy::{LimiterState, PackedState, Policy};

/// The state and counts of one key, and the key.
pub(crate) struct Entry(Box<[u8]>);

const WORD: usize = 8;

impl Policy {
    /// Bytes before the key: the state words and the two counts.
    #[inline]
    fn header(&self) -> usize {
        match self {
            Policy::TokenBucket { .. } | Policy::LeakyBucket { .. } => 2 * WORD,
            Policy::FixedWindow { .. } | Policy::SlidingWindow { .. } => 3 * WORD,
        }
    }
}

#[inline]
fn read_u64(bytes: &[u8], at: usize) -> u64 {
    bytes
        .get(at..at + WORD)
        .and_then(|b| <[u8; WORD]>::try_from(b).ok())
        .map_or(0, u64::from_le_bytes)
}

#[inline]
fn write_u64(bytes: &mut [u8], at: usize, value: u64) {
    if let Some(b) = bytes.get_mut(at..at + WORD) {
        b.copy_from_slice(&value.to_le_bytes());
    }
}

impl Entry {
    /// A fresh key (its state all zeros: the strategies' initial state).
    pub(crate) fn new(key: &str, policy: Policy) -> Self {
        let header = policy.header();
        let mut bytes = Vec::with_capacity(header + key.len());
        bytes.resize(header, 0);
        bytes.extend_from_slice(key.as_bytes());
        Entry(bytes.into_boxed_slice())
    }

    #[inline]
    pub(crate) fn state(&self, policy: Policy) -> PackedState {
        let second = match policy.header() {
            h if h > 2 * WORD => read_u64(&self.0, WORD),
            _ => 0,
        };
        PackedState([read_u64(&self.0, 0), second])
    }

    #[inline]
    pub(crate) fn set_state(&mut self, policy: Policy, state: PackedState) {
        let [first, second] = state.0;
        write_u64(&mut self.0, 0, first);
        if policy.header() > 2 * WORD {
            write_u64(&mut self.0, WORD, second);
        }
    }

    /// The key's state, unpacked.
    #[inline]
    pub(crate) fn limiter_state(&self, policy: Policy) -> LimiterState {
        policy.unpack(self.state(policy))
    }

    /// Requests admitted and rejected since the key was created.
    #[inline]
    pub(crate) fn counts(&self, policy: Policy) -> (u32, u32) {
        let counts = read_u64(&self.0, policy.header() - WORD);
        (counts as u32, (counts >> 32) as u32)
    }

    #[inline]
    pub(crate) fn set_counts(&mut self, policy: Policy, allowed: u32, rejected: u32) {
        let counts = u64::from(allowed) | (u64::from(rejected) << 32);
        write_u64(&mut self.0, policy.header() - WORD, counts);
    }

    /// The key's text.
    pub(crate) fn key_str(&self, policy: Policy) -> &str {
        std::str::from_utf8(self.key(policy)).unwrap_or_default()
    }

    /// Heap bytes held by this entry.
    #[cfg(test)]
    pub(crate) fn heap_bytes(&self) -> usize {
        self.0.len()
    }
}

impl Record for Entry {
    type Context = Policy;

    #[inline]
    fn key(&self, policy: Policy) -> &[u8] {
        self.0.get(policy.header()..).unwrap_or_default()
    }

    #[inline]
    fn touch(&mut self, _now: Timestamp) {}

    fn is_idle_and_evictable(&self, policy: Policy, now: Timestamp, idle_after: Duration) -> bool {
        let full_at = policy.full_at(&self.limiter_state(policy));
        full_at.saturating_add(duration_nanos(idle_after)) <= now.as_nanos()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_key_takes_one_small_allocation() {
        let policy = Policy::TokenBucket {
            capacity: 10,
            interval: 1_000,
        };
        let key = "session:6f1c1a52-5d0e-4b8e-9f3a-0c2d1e4f5a6b";
        let mut entry = Entry::new(key, policy);
        assert_eq!(entry.heap_bytes(), 16 + key.len());
        entry.set_state(policy, PackedState([7, 0]));
        entry.set_counts(policy, 3, u32::MAX);
        assert_eq!(entry.state(policy), PackedState([7, 0]));
        assert_eq!(entry.counts(policy), (3, u32::MAX));
        assert_eq!(entry.key_str(policy), key);
    }

    #[test]
    fn window_entries_keep_two_state_words() {
        let policy = Policy::SlidingWindow {
            max: 10,
            window: 1_000,
        };
        let mut entry = Entry::new("tool:search", policy);
        entry.set_state(policy, PackedState([5, 9]));
        entry.set_counts(policy, 1, 2);
        assert_eq!(entry.state(policy), PackedState([5, 9]));
        assert_eq!(entry.counts(policy), (1, 2));
        assert_eq!(entry.key_str(policy), "tool:search");
    }
}
