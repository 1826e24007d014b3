//! The calls a breaker has admitted and not yet seen end.
//!
//! Each admitted call is filed under a token the breaker issues itself (never
//! the client's JSON-RPC id, which two clients may share), with a deadline.
//! Taking a call out of the table is how it ends, so it ends exactly once:
//! by its answer, by its caller going away, or by its deadline passing,
//! whichever takes it first.
//!
//! The table is bounded by count and by deadline: a
//! call past its deadline is taken out by the next sweep and ends as timed
//! out. A full table never makes room by dropping a call in flight (that
//! could free a half-open probe's place while the probe still runs): the new
//! call is refused a place instead, and the breaker decides what that means.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use hashbrown::HashMap;
use parking_lot::Mutex;

use super::state::ProbeId;
use crate::clock::Timestamp;
use crate::scope::ScopeKey;

/// Who decided to admit a call, so its end goes back to the same place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DecidedBy {
    /// This process's state machine.
    Local,
    /// The shared store.
    Store,
}

/// A call in flight.
#[derive(Debug)]
pub(crate) struct Call {
    pub(crate) key: ScopeKey,
    pub(crate) probe: Option<ProbeId>,
    pub(crate) decided_by: DecidedBy,
    pub(crate) start: Timestamp,
    pub(crate) deadline: Timestamp,
    /// A hash of the JSON-RPC id, for a transport failure that knows only
    /// the id (0: none).
    pub(crate) request: u64,
}

const SHARDS: usize = 16;

/// Tokens are the breaker's own sequence numbers, not input: a fast hash
/// without a random seed is enough.
type TokenMap = HashMap<u64, Call, foldhash::fast::FixedState>;

/// The bounded table of calls in flight.
#[derive(Debug)]
pub(crate) struct Calls {
    shards: Box<[Mutex<TokenMap>]>,
    len: AtomicUsize,
    capacity: usize,
    next_token: AtomicU64,
    /// No call's deadline is earlier than this (nanoseconds): a sweep
    /// before it finds nothing.
    earliest: AtomicU64,
}

impl Calls {
    pub(crate) fn new(capacity: usize) -> Self {
        Calls {
            shards: (0..SHARDS)
                .map(|_| {
                    Mutex::new(TokenMap::with_hasher(
                        foldhash::fast::FixedState::with_seed(1),
                    ))
                })
                .collect(),
            len: AtomicUsize::new(0),
            capacity,
            // Token 0 is never issued.
            next_token: AtomicU64::new(1),
            earliest: AtomicU64::new(u64::MAX),
        }
    }

    /// Calls held now.
    pub(crate) fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    fn shard(&self, token: u64) -> &Mutex<TokenMap> {
        &self.shards[(token % SHARDS as u64) as usize]
    }

    /// Files `call` and returns its token, or hands it back when the table is full.
    pub(crate) fn insert(&self, call: Call) -> Result<u64, Call> {
        if self.len.fetch_add(1, Ordering::Relaxed) >= self.capacity {
            self.len.fetch_sub(1, Ordering::Relaxed);
            return Err(call);
        }
        let token = self.next_token.fetch_add(1, Ordering::Relaxed);
        self.earliest
            .fetch_min(call.deadline.as_nanos(), Ordering::Relaxed);
        self.shard(token).lock().insert(token, call);
        Ok(token)
    }

    /// Takes the call filed under `token`, if it has not ended yet.
    pub(crate) fn take(&self, token: u64) -> Option<Call> {
        let call = self.shard(token).lock().remove(&token)?;
        self.len.fetch_sub(1, Ordering::Relaxed);
        Some(call)
    }

    /// Takes the oldest call filed for the JSON-RPC id hashed to `request`.
    pub(crate) fn take_by_request(&self, request: u64) -> Option<Call> {
        let mut oldest: Option<(u64, Timestamp)> = None;
        for shard in self.shards.iter() {
            for (token, call) in shard.lock().iter() {
                if call.request == request && oldest.is_none_or(|(_, start)| call.start < start) {
                    oldest = Some((*token, call.start));
                }
            }
        }
        self.take(oldest?.0)
    }

    /// Whether a sweep at `now` could find a call past its deadline.
    pub(crate) fn any_expired(&self, now: Timestamp) -> bool {
        now.as_nanos() >= self.earliest.load(Ordering::Relaxed)
    }

    /// Takes every call whose deadline is at or before `now`.
    pub(crate) fn take_expired(&self, now: Timestamp) -> Vec<Call> {
        if !self.any_expired(now) {
            return Vec::new();
        }
        // Reset before the scan: a call filed during it lowers it again.
        self.earliest.store(u64::MAX, Ordering::Relaxed);
        let mut expired = Vec::new();
        let mut earliest = u64::MAX;
        for shard in self.shards.iter() {
            let mut map = shard.lock();
            expired.extend(
                map.extract_if(|_, call| call.deadline <= now)
                    .map(|(_, c)| c),
            );
            for call in map.values() {
                earliest = earliest.min(call.deadline.as_nanos());
            }
        }
        self.len.fetch_sub(expired.len(), Ordering::Relaxed);
        self.earliest.fetch_min(earliest, Ordering::Relaxed);
        expired
    }
}
