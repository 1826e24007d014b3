//! The local denial cache: a key already over its limit is answered in
//! process until its retry time, without a round trip per rejected request.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::rate_limit::Decision;

struct Denied {
    until: Instant,
    cost: u32,
    decision: Decision,
}

/// A small bounded map of keys known to be rejected until some instant.
pub(crate) struct DenialCache {
    capacity: usize,
    map: Mutex<HashMap<String, Denied>>,
}

impl DenialCache {
    pub(crate) fn new(capacity: usize) -> Self {
        DenialCache {
            capacity,
            map: Mutex::new(HashMap::new()),
        }
    }

    /// A rejection for `cost` units of `key`, if one is known to hold now
    /// (a request of at least the cached cost, with `max_wait` shorter than
    /// what is left of the retry time).
    pub(crate) fn lookup(&self, key: &str, cost: u32, max_wait: Duration) -> Option<Decision> {
        if self.capacity == 0 {
            return None;
        }
        let mut map = self.map.lock();
        let entry = map.get(key)?;
        let now = Instant::now();
        if entry.until <= now {
            map.remove(key);
            return None;
        }
        let left = entry.until - now;
        if cost < entry.cost || max_wait >= left {
            return None;
        }
        let mut decision = entry.decision;
        decision.retry_after = Some(left);
        Some(decision)
    }

    /// Remembers a rejection of `cost` units that holds for `retry_after`.
    pub(crate) fn insert(&self, key: &str, cost: u32, decision: Decision) {
        let Some(retry_after) = decision.retry_after else {
            return;
        };
        if self.capacity == 0 || retry_after.is_zero() {
            return;
        }
        let now = Instant::now();
        let mut map = self.map.lock();
        if map.len() >= self.capacity && !map.contains_key(key) {
            map.retain(|_, d| d.until > now);
            if map.len() >= self.capacity {
                return;
            }
        }
        map.insert(
            key.to_owned(),
            Denied {
                until: now + retry_after,
                cost,
                decision,
            },
        );
    }

    /// Forgets `key` (after a refund made room).
    pub(crate) fn forget(&self, key: &str) {
        if self.capacity > 0 {
            self.map.lock().remove(key);
        }
    }
}
