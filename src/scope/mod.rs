//! Which breaker or limiter a request belongs to.
//!
//! A [`Scope`] turns a JSON-RPC request into a [`ScopeKey`]: one circuit
//! breaker or one rate limiter exists per distinct key. The same enum serves
//! both middlewares; [`CircuitBreakerScope`] and [`RateLimitScope`], the
//! feature request's names, are aliases of it kept for compatibility.
//!
//! ```
//! use pmcp_resilience::scope::{RequestTarget, Scope};
//! use pmcp::types::{JSONRPCRequest, RequestId};
//!
//! let request = JSONRPCRequest {
//!     jsonrpc: "2.0".into(),
//!     method: "tools/call".into(),
//!     params: Some(serde_json::json!({"name": "search", "arguments": {}})),
//!     id: RequestId::from(1i64),
//! };
//! let target = RequestTarget::default().with_server_url("http://127.0.0.1:8080/mcp");
//! assert_eq!(Scope::PerTool.key(&request, &target).as_str(), "tool:search");
//! assert_eq!(
//!     Scope::PerEndpoint.key(&request, &target).as_str(),
//!     "endpoint:tools/call@http://127.0.0.1:8080/mcp"
//! );
//! ```
//!
//! # Where the server URL and the session id come from
//!
//! pmcp's protocol middleware sees neither the server URL nor the session id
//! (its `MiddlewareContext` carries only a request id and metadata). They
//! reach the key, in this order of precedence:
//!
//! 1. the [`RequestTarget`] bound to the middleware handle (for example
//!    `CircuitBreakerMiddleware::for_server(url)`), whose session id may be
//!    read live from the transport after `initialize`;
//! 2. for a handle with no such binding, the context metadata entries
//!    [`SERVER_URL_METADATA`] and [`SESSION_ID_METADATA`], when a middleware
//!    earlier in the chain sets them (a bound handle never pays for this
//!    lookup on its request path);
//! 3. otherwise the documented fallback: the key [`UNKNOWN_SERVER`] or
//!    [`NO_SESSION`], so such requests share one breaker or limiter. The
//!    middlewares log a warning the first time this happens, except for
//!    `initialize` without a session: it opens the session, so by protocol
//!    it never has one, and it is keyed [`NO_SESSION`] without a warning.

use std::borrow::Cow;
use std::fmt;
use std::hash::BuildHasher;
use std::sync::Arc;

use pmcp::types::JSONRPCRequest;

/// Context metadata entry naming the server URL of a request.
pub const SERVER_URL_METADATA: &str = "pmcp_resilience.server_url";
/// Context metadata entry naming the MCP session id of a request.
pub const SESSION_ID_METADATA: &str = "pmcp_resilience.session_id";
/// The server part of a key when no server URL is known.
pub const UNKNOWN_SERVER: &str = "unknown-server";
/// The session part of a key when no session id is known.
pub const NO_SESSION: &str = "no-session";
/// The longest untrusted part (session id, tool name, method, URL, custom key)
/// kept verbatim in a key, in bytes; longer parts are cut and suffixed with a
/// hash of the whole, so distinct long values stay distinct.
pub const MAX_KEY_PART: usize = 200;

/// A function computing a custom scope key from a request.
///
/// ```
/// use pmcp::types::{JSONRPCRequest, RequestId};
/// use pmcp_resilience::scope::{KeyFn, RequestTarget, Scope};
/// use std::sync::Arc;
///
/// // One limiter per tenant, named by the request's `tenant` parameter.
/// let by_tenant: KeyFn = Arc::new(|request: &JSONRPCRequest| {
///     let tenant = request.params.as_ref().and_then(|p| p["tenant"].as_str());
///     tenant.unwrap_or("anonymous").to_owned()
/// });
/// let request = JSONRPCRequest {
///     jsonrpc: "2.0".into(),
///     method: "tools/call".into(),
///     params: Some(serde_json::json!({"name": "search", "tenant": "acme"})),
///     id: RequestId::from(1i64),
/// };
/// let key = Scope::Custom(by_tenant).key(&request, &RequestTarget::default());
/// assert_eq!(key.as_str(), "custom:acme");
/// ```
pub type KeyFn = Arc<dyn Fn(&JSONRPCRequest) -> String + Send + Sync>;

/// A function returning the current session id (read after `initialize`).
///
/// ```
/// use pmcp_resilience::scope::{RequestTarget, SessionSource};
/// use std::sync::Arc;
///
/// // Where the session id comes from (for pmcp's streamable HTTP transport:
/// // `move || transport.session_id()`); here, a fixed one.
/// let source: SessionSource = Arc::new(|| Some("session-42".to_owned()));
/// let target = RequestTarget::default().with_session_source(move || source());
/// assert_eq!(target.session_id().as_deref(), Some("session-42"));
/// ```
pub type SessionSource = Arc<dyn Fn() -> Option<String> + Send + Sync>;

/// How requests are grouped into independent breakers or limiters.
///
/// One type for both ([`CircuitBreakerScope`]
/// and [`RateLimitScope`] are its other names). Each
/// request gets a key in the scope's form, `tool:search`,
/// `method:tools/call`, `session:<id>`; that key text is what `state_of`,
/// `retry_after` and the metrics use.
///
/// ```
/// use pmcp::types::{JSONRPCRequest, RequestId};
/// use pmcp_resilience::{RequestTarget, Scope};
/// use serde_json::json;
///
/// let call = JSONRPCRequest {
///     jsonrpc: "2.0".into(),
///     method: "tools/call".into(),
///     params: Some(json!({ "name": "search" })),
///     id: RequestId::from(1i64),
/// };
/// let target = RequestTarget::default().with_server_url("http://127.0.0.1:8080/mcp");
/// assert_eq!(Scope::PerTool.key(&call, &target).as_str(), "tool:search");
/// assert_eq!(Scope::PerMethod.key(&call, &target).as_str(), "method:tools/call");
/// assert_eq!(Scope::Global.key(&call, &target).as_str(), "global");
/// ```
#[derive(Clone, Default)]
#[non_exhaustive]
pub enum Scope {
    /// One breaker or limiter for all requests.
    #[default]
    Global,
    /// One per server URL.
    PerServer,
    /// One per JSON-RPC method (`tools/call`, `resources/read`, ...).
    PerMethod,
    /// One per method and server URL.
    PerEndpoint,
    /// One per MCP session id.
    PerSession,
    /// One per tool for `tools/call` (by the `name` parameter); other methods
    /// get one per method.
    PerTool,
    /// One per key returned by the function.
    Custom(KeyFn),
}

/// Another name for [`Scope`], kept from the original feature request so
/// that code written against it compiles. New code writes `Scope`.
///
/// ```
/// use pmcp_resilience::{CircuitBreakerMiddleware, CircuitBreakerScope, Scope};
///
/// let scope: CircuitBreakerScope = Scope::PerTool; // the same type
/// let cb = CircuitBreakerMiddleware::builder().scope(scope).build().expect("valid");
/// assert_eq!(cb.metrics().scope, "tool");
/// ```
pub type CircuitBreakerScope = Scope;
/// Another name for [`Scope`], kept from the original feature request so
/// that code written against it compiles. New code writes `Scope`.
///
/// ```
/// use pmcp_resilience::{RateLimitMiddleware, RateLimitScope, Scope};
///
/// let scope: RateLimitScope = Scope::PerSession; // the same type
/// let limiter = RateLimitMiddleware::builder().scope(scope).build().expect("valid");
/// assert_eq!(limiter.metrics().scope, "session");
/// ```
pub type RateLimitScope = Scope;

impl fmt::Debug for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scope::Custom(_) => f.write_str("Custom(..)"),
            other => f.write_str(other.label()),
        }
    }
}

impl Scope {
    /// A short, bounded name for the scope kind, used as a metrics label
    /// (`global`, `server`, `method`, `endpoint`, `session`, `tool`, `custom`).
    pub fn label(&self) -> &'static str {
        match self {
            Scope::Global => "global",
            Scope::PerServer => "server",
            Scope::PerMethod => "method",
            Scope::PerEndpoint => "endpoint",
            Scope::PerSession => "session",
            Scope::PerTool => "tool",
            Scope::Custom(_) => "custom",
        }
    }

    /// The key a `tools/call` of `tool` gets under this scope, with the
    /// server URL and session id taken from `target`: `tool:search` under
    /// [`Scope::PerTool`], `method:tools/call` under [`Scope::PerMethod`].
    ///
    /// ```
    /// use pmcp_resilience::scope::{RequestTarget, Scope};
    ///
    /// let target = RequestTarget::default();
    /// assert_eq!(Scope::PerTool.key_of_tool("search", &target).as_str(), "tool:search");
    /// assert_eq!(Scope::PerMethod.key_of_tool("search", &target).as_str(), "method:tools/call");
    /// ```
    pub fn key_of_tool(&self, tool: &str, target: &RequestTarget) -> ScopeKey {
        let request = JSONRPCRequest {
            jsonrpc: "2.0".into(),
            method: "tools/call".into(),
            params: Some(serde_json::json!({ "name": tool })),
            id: pmcp::types::RequestId::from(0i64),
        };
        self.key(&request, target)
    }

    /// The key of `request` under this scope, with the server URL and session
    /// id taken from `target`.
    pub fn key(&self, request: &JSONRPCRequest, target: &RequestTarget) -> ScopeKey {
        self.key_with(
            request,
            || target.server_part().map(Cow::Borrowed),
            || target.session_id(),
        )
    }

    /// The key with the server URL (already made a key part by [`part`])
    /// and the session id supplied lazily (only the scopes that need them call
    /// the closures).
    pub(crate) fn key_with<'u, U, S>(
        &self,
        request: &JSONRPCRequest,
        url: U,
        session: S,
    ) -> ScopeKey
    where
        U: FnOnce() -> Option<Cow<'u, str>>,
        S: FnOnce() -> Option<String>,
    {
        self.visit_key(request, url, session, |key| ScopeKey(Arc::from(key)))
    }

    /// Builds the key in a reused per-thread buffer and hands it to `f`
    /// borrowed, so a caller that only looks the key up allocates nothing.
    pub(crate) fn visit_key<'u, U, S, R>(
        &self,
        request: &JSONRPCRequest,
        url: U,
        session: S,
        f: impl FnOnce(&str) -> R,
    ) -> R
    where
        U: FnOnce() -> Option<Cow<'u, str>>,
        S: FnOnce() -> Option<String>,
    {
        match self {
            Scope::Global => f("global"),
            Scope::PerServer => {
                let url = url();
                join(&["server:", url.as_deref().unwrap_or(UNKNOWN_SERVER)], f)
            }
            Scope::PerMethod => join(&["method:", &part(&request.method)], f),
            Scope::PerEndpoint => {
                let url = url();
                join(
                    &[
                        "endpoint:",
                        &part(&request.method),
                        "@",
                        url.as_deref().unwrap_or(UNKNOWN_SERVER),
                    ],
                    f,
                )
            }
            Scope::PerSession => {
                let session = session();
                join(
                    &["session:", &part(session.as_deref().unwrap_or(NO_SESSION))],
                    f,
                )
            }
            Scope::PerTool => match tool_name(request) {
                Some(tool) => join(&["tool:", &part(tool)], f),
                None => join(&["method:", &part(&request.method)], f),
            },
            Scope::Custom(key_fn) => {
                let custom = key_fn(request);
                join(&["custom:", &part(&custom)], f)
            }
        }
    }

    /// Whether resolving this scope needs the server URL.
    pub(crate) fn needs_server_url(&self) -> bool {
        matches!(self, Scope::PerServer | Scope::PerEndpoint)
    }

    /// Whether resolving this scope needs the session id.
    pub(crate) fn needs_session(&self) -> bool {
        matches!(self, Scope::PerSession)
    }
}

/// The tool name of a `tools/call` request.
pub(crate) fn tool_name(request: &JSONRPCRequest) -> Option<&str> {
    if request.method != "tools/call" {
        return None;
    }
    request.params.as_ref()?.get("name")?.as_str()
}

/// Joins key parts already made safe by [`part`] and hands the result to `f`.
fn join<R>(parts: &[&str], f: impl FnOnce(&str) -> R) -> R {
    // Joined in a reused per-thread buffer: looking a key up allocates
    // nothing, and keeping one costs a single `Arc<str>`.
    thread_local! {
        static BUFFER: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
    }
    BUFFER.with(move |buffer| match buffer.try_borrow_mut() {
        Ok(mut out) => {
            out.clear();
            for p in parts {
                out.push_str(p);
            }
            f(out.as_str())
        }
        // Re-entered (from `f` or a custom key function): use a plain String.
        Err(_) => f(&parts.concat()),
    })
}

/// An untrusted key part, bounded in length and free of control characters.
///
/// Clean parts are borrowed as they are. Others are rewritten: control
/// characters become `?`, and anything longer than [`MAX_KEY_PART`] is cut on
/// a character boundary and suffixed with `#` and a hash of the whole value,
/// so that distinct long values keep distinct keys.
fn part(raw: &str) -> Cow<'_, str> {
    if raw.len() <= MAX_KEY_PART && !has_control(raw.as_bytes()) {
        return Cow::Borrowed(raw);
    }
    let mut cleaned: String = raw
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    if cleaned.len() > MAX_KEY_PART {
        let mut cut = MAX_KEY_PART - 17;
        while !cleaned.is_char_boundary(cut) {
            cut -= 1;
        }
        cleaned.truncate(cut);
        let hash = foldhash::fast::FixedState::with_seed(0x5eed).hash_one(raw);
        cleaned.push_str(&format!("#{hash:016x}"));
    }
    Cow::Owned(cleaned)
}

/// Whether `bytes` hold an ASCII control character (below 0x20, or 0x7f),
/// checked eight bytes at a time.
fn has_control(bytes: &[u8]) -> bool {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGHS: u64 = u64::from_ne_bytes([0x80; 8]);
    // A byte of `w` has its high bit set in `low` if it is below 0x20 (or
    // 0x80 and above, ruled out with `!w`), and in `del` if it is 0x7f.
    let flags = |w: u64| {
        let low = w.wrapping_sub(ONES * 0x20) & !w;
        let del = (w ^ (ONES * 0x7f)).wrapping_sub(ONES) & !(w ^ (ONES * 0x7f));
        (low | del) & HIGHS
    };
    let mut chunks = bytes.chunks_exact(8);
    let mut found = 0;
    for chunk in &mut chunks {
        let mut word = [0; 8];
        word.copy_from_slice(chunk);
        found |= flags(u64::from_le_bytes(word));
    }
    found != 0 || chunks.remainder().iter().any(|&b| b < 0x20 || b == 0x7f)
}

/// 64-bit FNV-1a of `bytes`: stable across processes, builds and versions
/// (unlike the maps' seeded hashers), for hashes that leave the process:
/// Redis key tags and metric label buckets.
pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Logs a debug hint when `key`, given to `state_of` or `retry_after`,
/// cannot be the key of any scope: every key but `global` starts with its
/// scope's prefix (`tool:search`, never `search`).
pub(crate) fn hint_if_bare(key: &str, scope: &Scope) {
    if key != "global" && !key.contains(':') {
        tracing::debug!(
            key,
            scope = scope.label(),
            "no key `{key}` can exist: keys carry their scope's prefix, such as `tool:{key}` \
             or `method:{key}`; build them with `key_of` or `key_of_tool`"
        );
    }
}

/// The key of one breaker or limiter: cheap to clone, bounded in length.
/// Its text carries the scope's prefix (`tool:search`, `method:tools/call`);
/// the middlewares' `key_of` and `key_of_tool` build it.
///
/// ```
/// use pmcp_resilience::{RateLimitMiddleware, Scope};
///
/// let limiter = RateLimitMiddleware::builder().scope(Scope::PerTool).build().expect("valid");
/// let key = limiter.key_of_tool("search");
/// assert_eq!(key.as_str(), "tool:search");
/// assert_eq!(key.to_string(), "tool:search");
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ScopeKey(Arc<str>);

impl ScopeKey {
    /// A key from text, made safe the same way request-derived keys are.
    pub fn new(raw: &str) -> Self {
        ScopeKey(Arc::from(part(raw).as_ref()))
    }

    /// A key from text already built by a [`Scope`] (whose parts are bounded
    /// and clean): stored exactly as looked up, so it is found again.
    pub(crate) fn verbatim(key: &str) -> Self {
        ScopeKey(Arc::from(key))
    }

    /// The key as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ScopeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for ScopeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for ScopeKey {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl std::borrow::Borrow<str> for ScopeKey {
    fn borrow(&self) -> &str {
        &self.0
    }
}

/// What a middleware handle knows about where its requests go: the server
/// URL and a source of the MCP session id.
///
/// ```
/// use pmcp_resilience::scope::RequestTarget;
///
/// let target = RequestTarget::default()
///     .with_server_url("http://127.0.0.1:8080/mcp")
///     .with_session_source(|| Some("session-1".to_string()));
/// assert_eq!(target.session_id().as_deref(), Some("session-1"));
/// ```
#[derive(Clone, Default)]
pub struct RequestTarget {
    server_url: Option<Arc<str>>,
    /// `server_url` made a key part once, not on every request.
    server_part: Option<Arc<str>>,
    session: Option<SessionSource>,
}

impl fmt::Debug for RequestTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequestTarget")
            .field("server_url", &self.server_url)
            .field("session", &self.session.as_ref().map(|_| ".."))
            .finish()
    }
}

impl RequestTarget {
    /// Requests go to the server at `url`.
    pub fn with_server_url(mut self, url: impl AsRef<str>) -> Self {
        let url = url.as_ref();
        self.server_url = Some(Arc::from(url));
        self.server_part = Some(Arc::from(part(url).as_ref()));
        self
    }

    /// Requests belong to the session returned by `source` at request time
    /// (for pmcp's streamable HTTP transport:
    /// `move || transport.session_id()`, as clones share state).
    pub fn with_session_source<F>(mut self, source: F) -> Self
    where
        F: Fn() -> Option<String> + Send + Sync + 'static,
    {
        self.session = Some(Arc::new(source));
        self
    }

    /// Requests belong to the fixed session `id`.
    pub fn with_session_id(self, id: impl Into<String>) -> Self {
        let id = id.into();
        self.with_session_source(move || Some(id.clone()))
    }

    /// The server URL, if known.
    pub fn server_url(&self) -> Option<Arc<str>> {
        self.server_url.clone()
    }

    /// The server URL as a key part (see [`part`]), borrowed.
    pub(crate) fn server_part(&self) -> Option<&str> {
        self.server_part.as_deref()
    }

    /// The current session id, if known.
    pub fn session_id(&self) -> Option<String> {
        self.session.as_ref().and_then(|s| s())
    }
}

/// Resolves a request's key inside pmcp's middleware chain: the bound target
/// first, then context metadata (see the module docs).
pub(crate) fn key_in_context(
    scope: &Scope,
    request: &JSONRPCRequest,
    context: &pmcp::shared::MiddlewareContext,
    target: &RequestTarget,
) -> ResolvedKey {
    visit_key_in_context(scope, request, context, target, |key, missing| {
        ResolvedKey {
            key: ScopeKey(Arc::from(key)),
            missing,
        }
    })
}

/// Like [`key_in_context`], with the key lent to `f` instead of allocated.
pub(crate) fn visit_key_in_context<R>(
    scope: &Scope,
    request: &JSONRPCRequest,
    context: &pmcp::shared::MiddlewareContext,
    target: &RequestTarget,
    f: impl FnOnce(&str, Option<MissingPart>) -> R,
) -> R {
    let missing_url = std::cell::Cell::new(false);
    let missing_session = std::cell::Cell::new(false);
    scope.visit_key(
        request,
        || {
            let url = target.server_part().map(Cow::Borrowed).or_else(|| {
                context
                    .get_metadata(SERVER_URL_METADATA)
                    .map(|url| Cow::Owned(part(&url).into_owned()))
            });
            missing_url.set(url.is_none());
            url
        },
        || {
            let session = target
                .session_id()
                .or_else(|| context.get_metadata(SESSION_ID_METADATA));
            missing_session.set(session.is_none());
            session
        },
        |key| {
            let missing = if missing_url.get() {
                Some(MissingPart::ServerUrl)
            } else if missing_session.get() && !opens_session(request) {
                Some(MissingPart::SessionId)
            } else {
                None
            };
            f(key, missing)
        },
    )
}

/// Whether `request` is the one that opens an MCP session: the server
/// assigns the session id in its answer, so the request itself has none.
fn opens_session(request: &JSONRPCRequest) -> bool {
    request.method == "initialize"
}

/// A key and, if the fallback was used, which part was missing.
#[derive(Debug, Clone)]
pub(crate) struct ResolvedKey {
    pub(crate) key: ScopeKey,
    pub(crate) missing: Option<MissingPart>,
}

/// A part of the key that was not known for a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MissingPart {
    ServerUrl,
    SessionId,
}

#[cfg(test)]
mod tests;
