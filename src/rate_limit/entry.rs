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
    /// Whether the state takes two words (the windows) rather than one.
    #[inline]
    fn two_words(&self) -> bool {
        matches!(
            self,
            Policy::FixedWindow { .. } | Policy::SlidingWindow { .. }
        )
    }

    /// Bytes before the key: the state words and the two counts.
    #[inline]
    fn header(&self) -> usize {
        if self.two_words() { 3 * WORD } else { 2 * WORD }
    }
}

/// What an entry holds besides its key, read at once and written back at
/// once.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Fields {
    pub(crate) state: PackedState,
    /// Requests admitted since the key was created.
    pub(crate) allowed: u32,
    /// Requests rejected since the key was created.
    pub(crate) rejected: u32,
}

impl Fields {
    fn from_words(first: u64, second: u64, counts: u64) -> Self {
        Fields {
            state: PackedState([first, second]),
            allowed: counts as u32,
            rejected: (counts >> 32) as u32,
        }
    }

    fn counts(&self) -> u64 {
        u64::from(self.allowed) | (u64::from(self.rejected) << 32)
    }
}

/// The word at byte `at` of a fixed-size header (the offsets are constants
/// once inlined, so no check is left).
#[inline]
fn word<const N: usize>(head: &[u8; N], at: usize) -> u64 {
    head.get(at..at + WORD)
        .and_then(|b| <[u8; WORD]>::try_from(b).ok())
        .map_or(0, u64::from_le_bytes)
}

#[inline]
fn set_word<const N: usize>(head: &mut [u8; N], at: usize, value: u64) {
    if let Some(b) = head.get_mut(at..at + WORD) {
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

    /// The state and counts.
    #[inline]
    pub(crate) fn fields(&self, policy: Policy) -> Fields {
        if policy.two_words() {
            self.0
                .first_chunk::<{ 3 * WORD }>()
                .map_or_else(Fields::default, |h| {
                    Fields::from_words(word(h, 0), word(h, WORD), word(h, 2 * WORD))
                })
        } else {
            self.0
                .first_chunk::<{ 2 * WORD }>()
                .map_or_else(Fields::default, |h| {
                    Fields::from_words(word(h, 0), 0, word(h, WORD))
                })
        }
    }

    /// Writes the state and counts back.
    #[inline]
    pub(crate) fn set_fields(&mut self, policy: Policy, fields: &Fields) {
        let [first, second] = fields.state.0;
        if policy.two_words() {
            if let Some(h) = self.0.first_chunk_mut::<{ 3 * WORD }>() {
                set_word(h, 0, first);
                set_word(h, WORD, second);
                set_word(h, 2 * WORD, fields.counts());
            }
        } else if let Some(h) = self.0.first_chunk_mut::<{ 2 * WORD }>() {
            set_word(h, 0, first);
            set_word(h, WORD, fields.counts());
        }
    }

    /// The key's state, unpacked.
    #[inline]
    pub(crate) fn limiter_state(&self, policy: Policy) -> LimiterState {
        policy.unpack(self.fields(policy).state)
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
        let fields = Fields {
            state: PackedState([7, 0]),
            allowed: 3,
            rejected: u32::MAX,
        };
        entry.set_fields(policy, &fields);
        assert_eq!(entry.fields(policy), fields);
        assert_eq!(entry.key_str(policy), key);
    }

    #[test]
    fn window_entries_keep_two_state_words() {
        let policy = Policy::SlidingWindow {
            max: 10,
            window: 1_000,
        };
        let mut entry = Entry::new("tool:search", policy);
        let fields = Fields {
            state: PackedState([5, 9]),
            allowed: 1,
            rejected: 2,
        };
        entry.set_fields(policy, &fields);
        assert_eq!(entry.fields(policy), fields);
        assert_eq!(entry.key_str(policy), "tool:search");
    }
}
