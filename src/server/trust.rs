//! Which session ids the layer believes: only those it saw the server
//! issue. Any other id, and a request with none, is keyed by the client's
//! address, so a client can neither mint fresh budgets by rotating the
//! `mcp-session-id` header nor spend the budget all new clients share.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

use parking_lot::Mutex;
use pmcp::types::JSONRPCRequest;

use crate::scope::{Scope, ScopeKey};

/// The default bound on the session ids the layer remembers.
pub(crate) const DEFAULT_MAX_SESSIONS: usize = 100_000;

/// Who sent a request, as far as keys go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Caller {
    /// A session the server issued.
    Session(String),
    /// Anyone else: the client's address (`client:<ip>`, or
    /// `client:unknown`).
    Client(String),
}

impl Caller {
    /// The trusted session id, if any.
    pub(crate) fn session(&self) -> Option<&str> {
        match self {
            Caller::Session(s) => Some(s),
            Caller::Client(_) => None,
        }
    }

    /// The key of `call` under `scope`: the scope's own, except for a
    /// caller without a trusted session, keyed by its address under a
    /// per-session scope, and for opening a session under a per-method or
    /// per-tool scope (so one client's flood of `initialize` cannot keep
    /// the others from connecting; a global or custom scope is left as
    /// chosen).
    pub(crate) fn key(&self, scope: &Scope, call: &JSONRPCRequest) -> ScopeKey {
        match (self, scope) {
            (Caller::Client(address), Scope::PerSession) => ScopeKey::new(address),
            (Caller::Client(address), Scope::PerMethod | Scope::PerTool | Scope::PerEndpoint)
                if opens_session(&call.method) =>
            {
                ScopeKey::new(address)
            }
            _ => scope.key_with(call, || None, || self.session().map(str::to_owned)),
        }
    }
}

/// The methods a client sends before it has a session: `initialize`, and
/// the `server/discover` that newer clients try first.
pub(crate) fn opens_session(method: &str) -> bool {
    matches!(method, "initialize" | "server/discover")
}

/// Session ids seen on the server's answers to `initialize`, oldest
/// forgotten first past the bound.
#[derive(Debug)]
pub(crate) struct IssuedSessions {
    max: usize,
    inner: Mutex<Issued>,
}

#[derive(Debug, Default)]
struct Issued {
    ids: HashSet<Arc<str>>,
    /// In the order issued; may hold ids forgotten since.
    order: VecDeque<Arc<str>>,
}

impl IssuedSessions {
    pub(crate) fn new(max: usize) -> Self {
        IssuedSessions {
            max,
            inner: Mutex::new(Issued::default()),
        }
    }

    pub(crate) fn contains(&self, id: &str) -> bool {
        self.inner.lock().ids.contains(id)
    }

    /// The server issued `id`.
    pub(crate) fn issued(&self, id: &str) {
        let mut inner = self.inner.lock();
        let id: Arc<str> = Arc::from(id);
        if !inner.ids.insert(Arc::clone(&id)) {
            return;
        }
        inner.order.push_back(id);
        while inner.ids.len() > self.max {
            match inner.order.pop_front() {
                Some(old) => {
                    inner.ids.remove(&old);
                }
                None => break,
            }
        }
        if inner.order.len() > 2 * self.max.max(16) {
            let Issued { ids, order } = &mut *inner;
            order.retain(|id| ids.contains(id));
        }
    }

    /// The session ended (deleted, or unknown to the server).
    pub(crate) fn forget(&self, id: &str) {
        self.inner.lock().ids.remove(id);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.inner.lock().ids.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_set_is_bounded_and_forgets_the_oldest() {
        let issued = IssuedSessions::new(3);
        for id in ["a", "b", "c", "d"] {
            issued.issued(id);
        }
        assert_eq!(issued.len(), 3);
        assert!(!issued.contains("a"));
        assert!(issued.contains("d"));
        issued.forget("c");
        assert!(!issued.contains("c"));
        for n in 0..1_000 {
            issued.issued(&format!("x{n}"));
            issued.forget(&format!("x{n}"));
        }
        assert!(issued.inner.lock().order.len() <= 2 * 16 + 1);
    }

    #[test]
    fn untrusted_callers_are_keyed_by_address_under_per_session_scopes() {
        let call = JSONRPCRequest {
            jsonrpc: "2.0".into(),
            method: "initialize".into(),
            params: None,
            id: pmcp::types::RequestId::from(1i64),
        };
        let stranger = Caller::Client("client:127.0.0.2".into());
        let member = Caller::Session("s-1".into());
        assert_eq!(
            stranger.key(&Scope::PerSession, &call).as_str(),
            "client:127.0.0.2"
        );
        assert_eq!(
            member.key(&Scope::PerSession, &call).as_str(),
            "session:s-1"
        );
        assert_eq!(
            stranger.key(&Scope::PerMethod, &call).as_str(),
            "client:127.0.0.2"
        );
        assert_eq!(
            stranger.key(&Scope::PerTool, &call).as_str(),
            "client:127.0.0.2"
        );
        assert_eq!(stranger.key(&Scope::Global, &call).as_str(), "global");
        let list = JSONRPCRequest {
            method: "tools/list".into(),
            ..call
        };
        assert_eq!(
            stranger.key(&Scope::PerMethod, &list).as_str(),
            "method:tools/list"
        );
    }
}
