//! Keeps the number of label values bounded, whatever keys the sources hold.
//!
//! ```
//! use pmcp_resilience::observe::cardinality::{hashed_key, is_unbounded_scope};
//!
//! assert!(is_unbounded_scope("session"));
//! assert!(!is_unbounded_scope("tool"));
//! // A session id never becomes a label value: it lands in one of 64 buckets.
//! let label = hashed_key("3f1c9a2e-session-id");
//! assert!(label.starts_with("h:") && label.len() == 4);
//! ```
//!
//! The rule, applied to each source's keys on every scrape and snapshot:
//!
//! 1. A key longer than [`MAX_KEY_LEN`] bytes is cut to that length (at a
//!    character boundary) and marked with a trailing `~`.
//! 2. For the unbounded scopes, `session` and `custom`, a key never becomes a
//!    label value: it is hashed (FNV-1a, stable across processes and
//!    versions) into one of [`HASH_BUCKETS`] buckets, labelled `h:00` to
//!    `h:63`, and the keys of a bucket are aggregated.
//! 3. If more than `max_label_keys` keys remain, the first `max_label_keys`
//!    in this order keep their own label: breakers that are not closed
//!    first, then the most traffic, then the key in byte order. The rest are
//!    aggregated under [`OTHER_KEY`].
//!
//! So one source yields at most `max_label_keys + 1` series per metric.
//! Aggregating sums counters, keeps the worst breaker state (open, then
//! half-open, then closed) and the highest limiter usage. A key can move in
//! and out of [`OTHER_KEY`] between scrapes; Prometheus reads the drop of a
//! counter that follows as a counter reset.

// The rule is applied by the Prometheus export only; the constants and the
// hash stay public without it, so users can match hashed keys.
#![cfg_attr(not(feature = "prometheus"), allow(dead_code))]

use std::collections::BTreeMap;

use crate::circuit_breaker::{CircuitState, KeySnapshot};
use crate::observe::report::scope_label;
use crate::rate_limit::KeyUsage;

/// The `key` label of the aggregate of the keys beyond the cap.
pub const OTHER_KEY: &str = "__other__";

/// Number of buckets keys of unbounded scopes are hashed into.
pub const HASH_BUCKETS: u64 = 64;

/// Longest key, in bytes, exported as it is.
pub const MAX_KEY_LEN: usize = 128;

/// A per-key row that can be ranked and aggregated.
pub(crate) trait KeyRow: Clone {
    fn key(&self) -> &str;
    fn set_key(&mut self, key: String);
    /// Larger ranks first.
    fn rank(&self) -> (bool, u64);
    fn absorb(&mut self, other: &Self);
}

impl KeyRow for KeySnapshot {
    fn key(&self) -> &str {
        &self.key
    }
    fn set_key(&mut self, key: String) {
        self.key = key;
    }
    fn rank(&self) -> (bool, u64) {
        (self.state != CircuitState::Closed, self.traffic())
    }
    fn absorb(&mut self, other: &Self) {
        if severity(other.state) > severity(self.state) {
            self.state = other.state;
        }
        self.failures = self.failures.saturating_add(other.failures);
        self.rejections = self.rejections.saturating_add(other.rejections);
        self.successes = self.successes.saturating_add(other.successes);
        self.transitions = self.transitions.saturating_add(other.transitions);
    }
}

impl KeyRow for KeyUsage {
    fn key(&self) -> &str {
        self.key.as_str()
    }
    fn set_key(&mut self, key: String) {
        // The label text as the rule made it (a hash bucket, `__other__`).
        self.key = crate::scope::ScopeKey::verbatim(&key);
    }
    fn rank(&self) -> (bool, u64) {
        (self.rejected > 0, self.traffic())
    }
    fn absorb(&mut self, other: &Self) {
        // Keep the fullest key's usage: the aggregate shows the hottest one.
        if other.usage() > self.usage() {
            self.used = other.used;
            self.limit = other.limit;
            self.reset_at = other.reset_at;
        }
        self.allowed = self.allowed.saturating_add(other.allowed);
        self.rejected = self.rejected.saturating_add(other.rejected);
    }
}

/// How bad a state is, for the aggregate of several keys: open, then
/// half-open, then closed.
fn severity(state: CircuitState) -> u8 {
    match state {
        CircuitState::Closed => 0,
        CircuitState::HalfOpen => 1,
        CircuitState::Open => 2,
    }
}

/// Whether keys of `scope` are hashed rather than exported.
pub fn is_unbounded_scope(scope: &str) -> bool {
    scope == scope_label::SESSION || scope == scope_label::CUSTOM
}

/// The label value of the hash bucket of `key`.
pub fn hashed_key(key: &str) -> String {
    format!(
        "h:{:02}",
        crate::scope::fnv1a(key.as_bytes()) % HASH_BUCKETS
    )
}

fn shorten(key: &str) -> String {
    if key.len() <= MAX_KEY_LEN {
        return key.to_owned();
    }
    let mut end = MAX_KEY_LEN;
    while !key.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}~", &key[..end])
}

fn insert<R: KeyRow>(map: &mut BTreeMap<String, R>, mut row: R, key: String) {
    match map.get_mut(&key) {
        Some(existing) => existing.absorb(&row),
        None => {
            row.set_key(key.clone());
            map.insert(key, row);
        }
    }
}

/// Applies the rule of this module to the keys of one source.
pub(crate) fn bound_keys<R: KeyRow>(scope: &str, rows: &[R], max_label_keys: usize) -> Vec<R> {
    let hash = is_unbounded_scope(scope);
    let mut merged: BTreeMap<String, R> = BTreeMap::new();
    for row in rows {
        let key = if hash {
            hashed_key(row.key())
        } else {
            shorten(row.key())
        };
        insert(&mut merged, row.clone(), key);
    }
    if merged.len() <= max_label_keys {
        return merged.into_values().collect();
    }
    let mut ranked: Vec<R> = merged.into_values().collect();
    // BTreeMap order already sorts by key; a stable sort keeps it for ties.
    ranked.sort_by_key(|row| std::cmp::Reverse(row.rank()));
    let rest = ranked.split_off(max_label_keys);
    let mut out: BTreeMap<String, R> = ranked
        .into_iter()
        .map(|row| (row.key().to_owned(), row))
        .collect();
    for row in rest {
        insert(&mut out, row, OTHER_KEY.to_owned());
    }
    out.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker(key: &str, state: CircuitState, failures: u64) -> KeySnapshot {
        KeySnapshot::new(key, state).with_counts(failures, 0, 0, 0)
    }

    #[test]
    fn few_keys_pass_unchanged() {
        let rows = vec![
            breaker("b", CircuitState::Closed, 1),
            breaker("a", CircuitState::Open, 2),
        ];
        let out = bound_keys("server", &rows, 10);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].key, "a");
        assert_eq!(out[1].key, "b");
    }

    #[test]
    fn cap_keeps_open_then_busiest_then_by_name_and_folds_the_rest() {
        let rows = vec![
            breaker("quiet", CircuitState::Closed, 0),
            breaker("busy", CircuitState::Closed, 50),
            breaker("open", CircuitState::Open, 0),
            breaker("b-tie", CircuitState::Closed, 5),
            breaker("a-tie", CircuitState::Closed, 5),
            breaker("half", CircuitState::HalfOpen, 1),
        ];
        let out = bound_keys("server", &rows, 4);
        let keys: Vec<&str> = out.iter().map(|r| r.key.as_str()).collect();
        assert_eq!(keys, ["__other__", "a-tie", "busy", "half", "open"]);
        let other = &out[0];
        assert_eq!(other.failures, 5);
        assert_eq!(other.state, CircuitState::Closed);
    }

    #[test]
    fn aggregate_keeps_the_worst_state() {
        let rows = vec![
            breaker("a", CircuitState::Closed, 9),
            breaker("b", CircuitState::Closed, 1),
            breaker("c", CircuitState::HalfOpen, 0),
        ];
        // Non-closed first: c keeps its label, a and b fold.
        let out = bound_keys("server", &rows, 1);
        assert_eq!(out.len(), 2);
        let other = out.iter().find(|r| r.key == OTHER_KEY);
        assert_eq!(other.map(|r| r.failures), Some(10));
        let rows = vec![
            breaker("a", CircuitState::Open, 0),
            breaker("b", CircuitState::HalfOpen, 0),
            breaker("c", CircuitState::Open, 0),
        ];
        let out = bound_keys("server", &rows, 1);
        assert_eq!(out[0].key, OTHER_KEY);
        assert_eq!(out[0].state, CircuitState::Open);
    }

    #[test]
    fn session_keys_are_hashed_into_bounded_buckets() {
        let rows: Vec<_> = (0..10_000)
            .map(|i| KeyUsage::new(&format!("session-{i}"), i % 10, 10).with_counts(1, 0))
            .collect();
        let out = bound_keys("session", &rows, 1_000);
        assert!(out.len() as u64 <= HASH_BUCKETS);
        assert!(out.iter().all(|r| r.key.as_str().starts_with("h:")));
        assert!(out.iter().all(|r| !r.key.as_str().contains("session")));
        assert_eq!(out.iter().map(|r| r.allowed).sum::<u64>(), 10_000);
        assert!(out.iter().any(|r| r.usage() == 0.9));
        let capped = bound_keys("custom", &rows, 10);
        assert_eq!(capped.len(), 11);
    }

    #[test]
    fn hashing_is_stable() {
        assert_eq!(crate::scope::fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(crate::scope::fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(
            hashed_key("a"),
            format!("h:{:02}", 0xaf63_dc4c_8601_ec8c_u64 % 64)
        );
    }

    #[test]
    fn long_keys_are_cut_at_a_char_boundary() {
        let long = "é".repeat(100);
        let rows = vec![KeySnapshot::new(long, CircuitState::Closed)];
        let out = bound_keys("endpoint", &rows, 10);
        assert!(out[0].key.len() <= MAX_KEY_LEN + 1);
        assert!(out[0].key.ends_with('~'));
    }
}
