//! Calls admitted by the breaker, waiting for their answers.
//!
//! Each admitted call holds a [`Permit`] until its JSON-RPC response is
//! seen. The response comes in one of three places, and the table below
//! finds the call from each of them by `(owner, JSON-RPC id)`:
//! - the POST's own body (JSON, or an event stream);
//! - the session's GET event stream: once a pmcp client opens it, pmcp
//!   answers each POST with `202 Accepted` and sends the response there, so
//!   calls of a session are filed under the session id (only an id the
//!   server issued, see [`super::trust`]);
//! - nowhere (the client went away, the stream ended first): the permit is
//!   dropped and the call ends neutral, never as a success.
//!
//! Calls of a request without a trusted session are filed under an owner
//! private to that request, so nobody else's stream can end them.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::circuit_breaker::{Outcome, Permit};

use super::sse::{Answer, AnswerSink};
use super::tools::is_not_found;

/// Most calls the table holds; past it a new call is not followed (it ends
/// neutral) until parked calls past their deadline are swept out.
const MAX_CALLS: usize = 65_536;

/// Ends a call: at once when the breaker keeps its state in memory, in a
/// task when the verdict must be written to a file or a store.
fn record(permit: Permit, outcome: OwnedOutcome) {
    let mut future = Box::pin(async move { permit.record_outcome(&outcome.as_outcome()).await });
    let mut cx = Context::from_waker(Waker::noop());
    if future.as_mut().poll(&mut cx) == Poll::Pending
        && let Ok(handle) = tokio::runtime::Handle::try_current()
    {
        handle.spawn(future);
    }
}

/// An [`Outcome`] that owns its text, to move into a task.
#[derive(Debug, Clone)]
pub(crate) enum OwnedOutcome {
    Answer(Answer),
    HttpStatus(http::StatusCode),
}

impl OwnedOutcome {
    fn as_outcome(&self) -> Outcome<'_> {
        match self {
            OwnedOutcome::Answer(Answer::Result { tool_error }) => Outcome::Result {
                tool_error: *tool_error,
            },
            OwnedOutcome::Answer(Answer::Error { code, message }) => Outcome::JsonRpcError {
                code: *code,
                message,
            },
            OwnedOutcome::HttpStatus(status) => Outcome::HttpStatus(*status),
        }
    }
}

/// A call admitted by the breaker, to file.
pub(crate) struct Admitted {
    /// The JSON-RPC id, as JSON text.
    pub(crate) id: String,
    pub(crate) permit: Permit,
    /// The tool of a `tools/call` the layer could not check: pmcp's "not
    /// found" answer to it is the caller's mistake.
    pub(crate) unchecked_tool: Option<String>,
}

struct Waiting {
    permit: Permit,
    unchecked_tool: Option<String>,
    /// Answered 202: the response is expected on the session's stream.
    parked: bool,
    since: Instant,
}

#[derive(Default)]
struct Table {
    /// Owner (a session id, or a request's private owner) -> JSON-RPC id -> call.
    owners: HashMap<Arc<str>, HashMap<String, Waiting>>,
    /// Event streams being read, per session.
    streams: HashMap<Arc<str>, u32>,
    len: usize,
}

impl Table {
    fn take(&mut self, owner: &str, id: &str) -> Option<Waiting> {
        let calls = self.owners.get_mut(owner)?;
        let waiting = calls.remove(id)?;
        if calls.is_empty() {
            self.owners.remove(owner);
        }
        self.len -= 1;
        Some(waiting)
    }

    /// Removes the calls whose deadline has passed (the breaker has ended
    /// them as timed out already), handing their permits to `out`.
    fn sweep(&mut self, deadline: Duration, out: &mut Vec<Permit>) {
        let now = Instant::now();
        for calls in self.owners.values_mut() {
            out.extend(
                calls
                    .extract_if(|_, w| now.duration_since(w.since) >= deadline)
                    .map(|(_, w)| w.permit),
            );
        }
        self.owners.retain(|_, calls| !calls.is_empty());
        self.len = self.owners.values().map(HashMap::len).sum();
    }
}

/// The calls of every request in flight, shared by the layer's services.
pub(crate) struct Pending {
    table: Mutex<Table>,
    /// The breaker's call deadline: a call waiting longer has ended.
    deadline: Duration,
    next_owner: AtomicU64,
}

impl Pending {
    pub(crate) fn new(deadline: Duration) -> Self {
        Pending {
            table: Mutex::new(Table::default()),
            deadline,
            next_owner: AtomicU64::new(0),
        }
    }

    /// Files `calls` under `session`, or under an owner of their own
    /// without one.
    pub(crate) fn open(self: &Arc<Self>, session: Option<&str>, calls: Vec<Admitted>) -> CallSet {
        let owner: Arc<str> = match session {
            Some(s) => Arc::from(s),
            // A NUL never appears in a header value, so never in a session id.
            None => Arc::from(format!(
                "\0request-{}",
                self.next_owner.fetch_add(1, Ordering::Relaxed)
            )),
        };
        let mut ids = Vec::with_capacity(calls.len());
        let mut dropped = Vec::new();
        {
            let mut table = self.table.lock();
            if table.len + calls.len() > MAX_CALLS {
                table.sweep(self.deadline, &mut dropped);
            }
            let now = Instant::now();
            for Admitted {
                id,
                permit,
                unchecked_tool,
            } in calls
            {
                if table.len >= MAX_CALLS {
                    dropped.push(permit);
                    continue;
                }
                let waiting = Waiting {
                    permit,
                    unchecked_tool,
                    parked: false,
                    since: now,
                };
                let slot = table.owners.entry(Arc::clone(&owner)).or_default();
                match slot.insert(id.clone(), waiting) {
                    // A client reusing an id in flight: the older call ends neutral.
                    Some(older) => dropped.push(older.permit),
                    None => table.len += 1,
                }
                ids.push(id);
            }
        }
        drop(dropped);
        CallSet {
            pending: Arc::clone(self),
            owner,
            ids,
            kept: false,
        }
    }

    /// Starts reading the event stream of `session`: answers on it end the
    /// session's calls. Taken before the GET reaches pmcp, so a response
    /// pmcp routes to the stream at once is not missed.
    pub(crate) fn watch_stream(self: &Arc<Self>, session: &str) -> StreamWatch {
        let session: Arc<str> = Arc::from(session);
        *self
            .table
            .lock()
            .streams
            .entry(Arc::clone(&session))
            .or_default() += 1;
        StreamWatch {
            pending: Arc::clone(self),
            session,
        }
    }

    fn end(&self, owner: &str, id: &str, outcome: OwnedOutcome) {
        let Some(waiting) = self.table.lock().take(owner, id) else {
            return;
        };
        if let (Some(tool), OwnedOutcome::Answer(Answer::Error { code, message })) =
            (&waiting.unchecked_tool, &outcome)
            && is_not_found(tool, *code, message)
        {
            // Dropped: the call ends neutral.
            return;
        }
        record(waiting.permit, outcome);
    }
}

/// The calls of one POST. Dropped unanswered, its calls end neutral, unless
/// [`park`](Self::park)ed for the session's stream.
pub(crate) struct CallSet {
    pending: Arc<Pending>,
    owner: Arc<str>,
    ids: Vec<String>,
    kept: bool,
}

impl CallSet {
    /// Ends every call with `outcome` (an HTTP status instead of answers).
    pub(crate) fn end_all(mut self, outcome: &OwnedOutcome) {
        for id in std::mem::take(&mut self.ids) {
            self.pending.end(&self.owner, &id, outcome.clone());
        }
    }

    /// pmcp answered `202 Accepted`: the responses go to the session's event
    /// stream. Kept waiting there if the layer is reading that stream;
    /// otherwise nobody will see them, and the calls end neutral.
    pub(crate) fn park(mut self) {
        let mut table = self.pending.table.lock();
        if !table.streams.contains_key(&self.owner) {
            return;
        }
        if let Some(calls) = table.owners.get_mut(&self.owner) {
            for id in &self.ids {
                if let Some(w) = calls.get_mut(id) {
                    w.parked = true;
                }
            }
        }
        self.kept = true;
    }
}

impl AnswerSink for CallSet {
    fn waiting(&self) -> bool {
        !self.ids.is_empty()
    }

    fn answered(&mut self, id: &str, answer: Answer) {
        if let Some(n) = self.ids.iter().position(|i| i == id) {
            self.ids.swap_remove(n);
            self.pending
                .end(&self.owner, id, OwnedOutcome::Answer(answer));
        }
    }
}

impl Drop for CallSet {
    fn drop(&mut self) {
        if self.kept || self.ids.is_empty() {
            return;
        }
        let mut unanswered = Vec::with_capacity(self.ids.len());
        {
            let mut table = self.pending.table.lock();
            for id in &self.ids {
                if let Some(w) = table.take(&self.owner, id) {
                    unanswered.push(w.permit);
                }
            }
        }
        // Dropped outside the lock: each ends its call as neutral.
        drop(unanswered);
    }
}

/// A session's event stream being read.
pub(crate) struct StreamWatch {
    pending: Arc<Pending>,
    session: Arc<str>,
}

impl AnswerSink for StreamWatch {
    fn waiting(&self) -> bool {
        self.pending.table.lock().owners.contains_key(&self.session)
    }

    fn answered(&mut self, id: &str, answer: Answer) {
        self.pending
            .end(&self.session, id, OwnedOutcome::Answer(answer));
    }
}

impl Drop for StreamWatch {
    fn drop(&mut self) {
        let mut orphans = Vec::new();
        {
            let mut table = self.pending.table.lock();
            let last = match table.streams.get_mut(&self.session) {
                Some(n) if *n > 1 => {
                    *n -= 1;
                    false
                }
                _ => true,
            };
            if !last {
                return;
            }
            table.streams.remove(&self.session);
            // Calls parked for this stream will never be answered where the
            // layer can see them.
            if let Some(calls) = table.owners.get_mut(&self.session) {
                let ids: Vec<String> = calls
                    .iter()
                    .filter(|(_, w)| w.parked)
                    .map(|(id, _)| id.clone())
                    .collect();
                for id in ids {
                    if let Some(w) = table.take(&self.session, &id) {
                        orphans.push(w.permit);
                    }
                }
            }
        }
        drop(orphans);
    }
}
