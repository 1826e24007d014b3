//! The calls a breaker has admitted and not yet seen end.
//!
//! Each admitted call is filed under an identity the breaker chooses itself
//! (never the client's JSON-RPC id, which two clients may share), with a
//! deadline: a token it issues (a [`Permit`](super::Permit)), or the pmcp
//! middleware context the call travels with.
//! Taking a call out of the table is how it ends, so it ends exactly once:
//! by its answer, by its caller going away, or by its deadline passing,
//! whichever takes it first.
//!
//! The table is bounded by count and by deadline: a
//! call past its deadline is taken out by the next sweep and ends as timed
//! out. A full table never makes room by dropping a call in flight (that
//! could free a half-open probe's place while the probe still runs): the new
//! call is refused a place instead, and the breaker decides what that means.

use std::hash::BuildHasher;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use hashbrown::HashMap;
use parking_lot::Mutex;

use super::entry::KeyBreaker;
use super::state::ProbeId;
use crate::clock::Timestamp;

/// Who decided to admit a call, so its end goes back to the same place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DecidedBy {
    /// This process's state machine.
    Local,
    /// The shared store.
    Store,
}

/// What a call in flight is filed under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum CallId {
    /// A token the breaker issued (never 0; its low bits name its shard).
    Token(u64),
    /// The pmcp middleware context the call travels with: where its
    /// metadata map lives and when it was made. pmcp hands the same context
    /// (or a clone, sharing that map) to `on_request` and `on_response`,
    /// and no two live contexts share the map; a context made later at the
    /// same address has a later start. Neither part comes from the client.
    Context {
        /// The address of the context's metadata map.
        address: usize,
        /// The context's start time.
        start: Instant,
    },
}

impl CallId {
    /// The identity of the call `context` carries.
    pub(crate) fn of_context(context: &pmcp::shared::MiddlewareContext) -> Self {
        CallId::Context {
            address: Arc::as_ptr(&context.metadata) as usize,
            start: context.start_time,
        }
    }
}

/// A call in flight.
#[derive(Debug)]
pub(crate) struct Call {
    /// The breaker of the call's key.
    pub(crate) breaker: Arc<KeyBreaker>,
    pub(crate) probe: Option<ProbeId>,
    pub(crate) decided_by: DecidedBy,
    pub(crate) start: Timestamp,
    pub(crate) deadline: Timestamp,
    /// A hash of the JSON-RPC id, for a transport failure that knows only
    /// the id (0: none).
    pub(crate) request: u64,
}

const SHARDS: usize = 16;

/// Identities are the breaker's own numbers and addresses, not input: a
/// fast hash without a random seed is enough.
type CallMap = HashMap<CallId, Call, foldhash::fast::FixedState>;

/// One shard: its calls and the source of its tokens, behind one lock.
#[derive(Debug)]
struct Shard {
    calls: CallMap,
    next: u64,
}

/// The bounded table of calls in flight.
///
/// A thread files its permits' calls in a shard of its own (threads take
/// shards in turn), and a token names its shard; a context's call goes to
/// the shard its address picks. So two threads calling at once seldom take
/// turns on one lock or one counter: with a shared counter and shared
/// locks, two threads on two cores took 2.8 us per request where one took
/// 1.1 us (criterion, `breaker_request/ours_per_endpoint/2t/1`).
#[derive(Debug)]
pub(crate) struct Calls {
    shards: Box<[Mutex<Shard>]>,
    /// Most calls one shard holds.
    per_shard: usize,
    /// No call's deadline is earlier than this (nanoseconds): a sweep
    /// before it finds nothing.
    earliest: AtomicU64,
}

/// The next token of shard `index` (never 0).
fn next_token(shard: &mut Shard, index: usize) -> u64 {
    shard.next += 1;
    shard.next * SHARDS as u64 + index as u64
}

/// This thread's shard.
fn home_shard() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static HOME: usize = NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS;
    }
    HOME.with(|h| *h)
}

impl Calls {
    pub(crate) fn new(capacity: usize) -> Self {
        Calls {
            shards: (0..SHARDS)
                .map(|_| {
                    Mutex::new(Shard {
                        calls: CallMap::with_hasher(foldhash::fast::FixedState::with_seed(1)),
                        next: 0,
                    })
                })
                .collect(),
            per_shard: capacity.div_ceil(SHARDS).max(1),
            earliest: AtomicU64::new(u64::MAX),
        }
    }

    /// Calls held now.
    pub(crate) fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().calls.len()).sum()
    }

    fn shard_of(&self, id: CallId) -> usize {
        match id {
            CallId::Token(token) => (token % SHARDS as u64) as usize,
            CallId::Context { address, .. } => {
                let hash = foldhash::fast::FixedState::with_seed(2).hash_one(address);
                (hash % SHARDS as u64) as usize
            }
        }
    }

    /// Files `call` under a new token and returns it, or hands the call back
    /// when this thread's shard is full.
    pub(crate) fn insert(&self, call: Call) -> Result<u64, Call> {
        let home = home_shard();
        let deadline = call.deadline.as_nanos();
        let mut shard = self.shards[home].lock();
        if shard.calls.len() >= self.per_shard {
            return Err(call);
        }
        let token = next_token(&mut shard, home);
        shard.calls.insert(CallId::Token(token), call);
        drop(shard);
        self.lower_earliest(deadline);
        Ok(token)
    }

    /// Files `call` under the context identity `id`, or hands it back when
    /// the shard is full. A call still filed under the same identity (the
    /// context was used again before its call ended) keeps its place and
    /// deadline under a token nobody holds.
    pub(crate) fn insert_as(&self, id: CallId, call: Call) -> Result<(), Call> {
        let index = self.shard_of(id);
        let deadline = call.deadline.as_nanos();
        let mut shard = self.shards[index].lock();
        if shard.calls.len() >= self.per_shard {
            return Err(call);
        }
        if let Some(earlier) = shard.calls.insert(id, call) {
            let token = next_token(&mut shard, index);
            shard.calls.insert(CallId::Token(token), earlier);
        }
        drop(shard);
        self.lower_earliest(deadline);
        Ok(())
    }

    fn lower_earliest(&self, deadline: u64) {
        // Deadlines mostly grow: write only when this one is earlier.
        if deadline < self.earliest.load(Ordering::Relaxed) {
            self.earliest.fetch_min(deadline, Ordering::Relaxed);
        }
    }

    /// Takes the call filed under `id`, if it has not ended yet.
    pub(crate) fn take(&self, id: CallId) -> Option<Call> {
        self.shards[self.shard_of(id)].lock().calls.remove(&id)
    }

    /// Takes the oldest call filed for the JSON-RPC id hashed to `request`.
    pub(crate) fn take_by_request(&self, request: u64) -> Option<Call> {
        let mut oldest: Option<(CallId, Timestamp)> = None;
        for shard in self.shards.iter() {
            for (id, call) in shard.lock().calls.iter() {
                if call.request == request && oldest.is_none_or(|(_, start)| call.start < start) {
                    oldest = Some((*id, call.start));
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
                map.calls
                    .extract_if(|_, call| call.deadline <= now)
                    .map(|(_, c)| c),
            );
            for call in map.calls.values() {
                earliest = earliest.min(call.deadline.as_nanos());
            }
        }
        self.earliest.fetch_min(earliest, Ordering::Relaxed);
        expired
    }
}
