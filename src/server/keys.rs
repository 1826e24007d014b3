//! What the layer reads from an HTTP request: its JSON-RPC calls, the MCP
//! session, the client's address, or a key of your own.
//!
//! ```
//! use pmcp_resilience::rate_limit::RateLimitMiddleware;
//! use pmcp_resilience::server::{ProxyTrust, RequestKey, ResilienceLayer};
//! use std::sync::Arc;
//!
//! # fn main() -> Result<(), pmcp_resilience::ConfigError> {
//! // One budget per client IP, behind one reverse proxy appending to X-Forwarded-For.
//! let by_address = ResilienceLayer::builder()
//!     .rate_limit(RateLimitMiddleware::builder().build()?)
//!     .key(RequestKey::ClientAddress)
//!     .trust_proxy(ProxyTrust::x_forwarded_for(1))
//!     .build()?;
//! // One budget per API key header; requests without one use the limiter's scope.
//! let by_api_key = ResilienceLayer::builder()
//!     .rate_limit(RateLimitMiddleware::builder().build()?)
//!     .key(RequestKey::Custom(Arc::new(|parts: &http::request::Parts| {
//!         parts.headers.get("x-api-key")?.to_str().ok().map(str::to_owned)
//!     })))
//!     .build()?;
//! # let _ = (by_address, by_api_key);
//! # Ok(())
//! # }
//! ```
//!
//! # Rules
//!
//! - **Session**: the `mcp-session-id` header, but only an id the layer saw
//!   the server issue (on its answer to `initialize`; the layer remembers up
//!   to [`max_sessions`](super::ResilienceLayerBuilder::max_sessions) of
//!   them, and forgets one on a successful `DELETE` or a 404 from the
//!   server). Under [`Scope::PerSession`](crate::Scope::PerSession), a
//!   request without a session (`initialize`, `server/discover`) or with
//!   an id the server did not issue is keyed by the client's address,
//!   `client:<ip>`: each client has a budget of its own for opening
//!   sessions, and rotating forged ids buys nothing. On a stateless server
//!   (no session ids issued) every request is keyed that way. Under
//!   `PerMethod` and `PerTool` scopes, a request opening a session
//!   (`initialize`, `server/discover`) without one is keyed by the client's
//!   address too; `Global` and `Custom` scopes are left as chosen.
//! - **Tool**: with the server's tools known
//!   ([`tools`](super::ResilienceLayerBuilder::tools),
//!   [`tools_of`](super::ResilienceLayerBuilder::tools_of)), a call of any
//!   other tool has the tool part [`UNKNOWN_TOOL`](super::UNKNOWN_TOOL).
//! - **Server URL**: none on the server side; scopes that use one
//!   (`PerServer`, `PerEndpoint`) get the part
//!   [`UNKNOWN_SERVER`](crate::scope::UNKNOWN_SERVER), so they act as
//!   `Global` and `PerMethod`.
//! - **Method and tool**: from the JSON-RPC body. Only *requests* (an object
//!   with a `method` and a non-null `id`) are counted; notifications and
//!   responses sent by the client pass free.
//! - **Batches** (a JSON array): every request in it is decided on its own,
//!   under its own key and cost, in order. If one is refused, the whole batch
//!   is refused (the units taken by the elements before it are not given
//!   back, as they would not be had they been sent one by one). pmcp 2.23
//!   itself answers batches with 400; counting them anyway means a batch
//!   never slips past the limit on a server that accepts them.
//! - **Other HTTP methods**: `GET` (the server-to-client SSE stream) and
//!   `DELETE` (ending a session) carry no JSON-RPC request and pass
//!   uncounted; so does a POST holding only notifications or responses.
//! - **Bodies** are read up to `max_body_bytes` (default 1 MiB): a larger
//!   `Content-Length`, or a body that grows past it, is answered 413; a body
//!   that is not JSON 400 (-32700); JSON that is not a message or batch 400
//!   (-32600).
//! - **Client address**: the peer of the TCP connection, from axum's
//!   `ConnectInfo<SocketAddr>` (serve with
//!   `into_make_service_with_connect_info::<SocketAddr>()`), unless a
//!   [`ProxyTrust`] is configured: then the address `trusted_hops` entries
//!   from the right of `X-Forwarded-For` (or of the `for=` parameters of
//!   `Forwarded`), which is the address the outermost trusted proxy saw. A
//!   header with fewer entries than `trusted_hops`, or an entry that is not
//!   an IP address, is ignored and the peer address is used. Without
//!   `ConnectInfo`, the address part is `unknown`.
//! - Every part taken from the request is bounded and cleaned by
//!   [`ScopeKey::new`].

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::extract::ConnectInfo;
use http::request::Parts;
use pmcp::types::{JSONRPCRequest, RequestId};
use serde_json::Value;

use crate::error::ConfigError;
use crate::scope::ScopeKey;

/// The header carrying the MCP session id.
pub const SESSION_HEADER: &str = "mcp-session-id";

/// The key of requests whose client address is not known.
pub(crate) const UNKNOWN_CLIENT: &str = "client:unknown";

/// A function computing a rate-limit key from an HTTP request's head;
/// `None` falls back to the limiter's own scope.
///
/// ```
/// use axum::body::Body;
/// use http::Request;
/// use pmcp_resilience::rate_limit::RateLimitMiddleware;
/// use pmcp_resilience::server::{HttpKeyFn, RequestKey, ResilienceLayer};
/// use std::sync::Arc;
/// use tower::ServiceExt;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// // One budget per API key; requests without one fall back to the limiter's scope.
/// let by_api_key: HttpKeyFn = Arc::new(|parts: &http::request::Parts| {
///     parts.headers.get("x-api-key")?.to_str().ok().map(str::to_owned)
/// });
/// let limiter = RateLimitMiddleware::builder().build()?;
/// let layer = ResilienceLayer::builder().rate_limit(limiter.clone()).key(RequestKey::Custom(by_api_key)).build()?;
/// let server = pmcp::Server::builder().name("demo").version("1.0.0").build()?;
/// let app = pmcp::axum::concurrent_router(Arc::new(server)).layer(layer);
/// let ping = Request::post("/")
///     .header("content-type", "application/json")
///     .header("accept", "application/json, text/event-stream")
///     .header("x-api-key", "alice")
///     .body(Body::from(r#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#))?;
/// app.oneshot(ping).await?;
/// assert_eq!(limiter.metrics().keys[0].key.as_str(), "http:alice");
/// # Ok(())
/// # }
/// ```
pub type HttpKeyFn = Arc<dyn Fn(&Parts) -> Option<String> + Send + Sync>;

/// Which key the layer's rate limiter uses for a request.
///
/// The circuit breaker always uses its own [`Scope`](crate::Scope) (a breaker
/// guards a dependency, not a client).
///
/// ```
/// use axum::body::Body;
/// use http::Request;
/// use pmcp_resilience::rate_limit::RateLimitMiddleware;
/// use pmcp_resilience::server::{ProxyTrust, RequestKey, ResilienceLayer};
/// use std::sync::Arc;
/// use tower::ServiceExt;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let server = pmcp::Server::builder().name("demo").version("1.0.0").build()?;
/// let limiter = RateLimitMiddleware::builder().build()?;
/// let layer = ResilienceLayer::builder()
///     .rate_limit(limiter.clone())
///     .key(RequestKey::ClientAddress) // one budget per client IP
///     .trust_proxy(ProxyTrust::x_forwarded_for(1))
///     .build()?;
/// let app = pmcp::axum::concurrent_router(Arc::new(server)).layer(layer);
/// for client in ["198.51.100.1", "198.51.100.2"] {
///     let ping = Request::post("/")
///         .header("content-type", "application/json")
///         .header("accept", "application/json, text/event-stream")
///         .header("x-forwarded-for", client)
///         .body(Body::from(r#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#))?;
///     app.clone().oneshot(ping).await?;
/// }
/// let keys: Vec<String> = limiter.metrics().keys.iter().map(|k| k.key.as_str().to_owned()).collect();
/// assert_eq!(keys, ["client:198.51.100.1", "client:198.51.100.2"]);
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Default)]
#[non_exhaustive]
pub enum RequestKey {
    /// The limiter's own [`Scope`](crate::Scope), with the session id taken
    /// from the `mcp-session-id` header (the default).
    #[default]
    Scope,
    /// One limiter per client IP address: keys `client:<ip>`.
    ClientAddress,
    /// One limiter per value of the function: keys `http:<value>`.
    Custom(HttpKeyFn),
}

impl fmt::Debug for RequestKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RequestKey::Scope => f.write_str("Scope"),
            RequestKey::ClientAddress => f.write_str("ClientAddress"),
            RequestKey::Custom(_) => f.write_str("Custom(..)"),
        }
    }
}

/// The proxy header to trust for the client address.
///
/// ```
/// use pmcp_resilience::rate_limit::RateLimitMiddleware;
/// use pmcp_resilience::server::{ProxyHeader, ProxyTrust, RequestKey, ResilienceLayer};
///
/// // Two proxies appending RFC 7239 `Forwarded: for=client, for=proxy1`.
/// let trust = ProxyTrust::forwarded(2);
/// assert_eq!((trust.header, trust.trusted_hops), (ProxyHeader::Forwarded, 2));
/// let layer = ResilienceLayer::builder()
///     .rate_limit(RateLimitMiddleware::builder().build().expect("valid"))
///     .key(RequestKey::ClientAddress)
///     .trust_proxy(trust)
///     .build();
/// assert!(layer.is_ok());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProxyHeader {
    /// `X-Forwarded-For: client, proxy1, proxy2`.
    XForwardedFor,
    /// RFC 7239 `Forwarded: for=client, for=proxy1`.
    Forwarded,
}

/// Trust in the proxies in front of the server: which of them append to
/// the forwarding header. Off unless configured, since any client can send
/// these headers.
///
/// ```
/// use axum::body::Body;
/// use http::Request;
/// use pmcp_resilience::rate_limit::RateLimitMiddleware;
/// use pmcp_resilience::server::{ProxyTrust, RequestKey, ResilienceLayer};
/// use std::sync::Arc;
/// use tower::ServiceExt;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let limiter = RateLimitMiddleware::builder().build()?;
/// let layer = ResilienceLayer::builder()
///     .rate_limit(limiter.clone())
///     .key(RequestKey::ClientAddress)
///     .trust_proxy(ProxyTrust::x_forwarded_for(1)) // one load balancer appends the client's address
///     .build()?;
/// let server = pmcp::Server::builder().name("demo").version("1.0.0").build()?;
/// let app = pmcp::axum::concurrent_router(Arc::new(server)).layer(layer);
/// // The client wrote "1.2.3.4" itself; the balancer appended the address it saw.
/// let ping = Request::post("/")
///     .header("content-type", "application/json")
///     .header("accept", "application/json, text/event-stream")
///     .header("x-forwarded-for", "1.2.3.4, 203.0.113.7")
///     .body(Body::from(r#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#))?;
/// app.oneshot(ping).await?;
/// assert_eq!(limiter.metrics().keys[0].key.as_str(), "client:203.0.113.7");
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyTrust {
    /// The header the proxies append to.
    pub header: ProxyHeader,
    /// How many trusted proxies append to it (used when `proxies` is empty).
    pub trusted_hops: usize,
    /// The proxies' own addresses. When set, the header is read only on
    /// connections from one of them, and the client is the right-most
    /// entry that is not one of them.
    pub proxies: Vec<IpAddr>,
}

impl ProxyTrust {
    /// Trust `hops` proxies appending to `X-Forwarded-For`.
    pub fn x_forwarded_for(hops: usize) -> Self {
        ProxyTrust {
            header: ProxyHeader::XForwardedFor,
            trusted_hops: hops,
            proxies: Vec::new(),
        }
    }

    /// Trust `hops` proxies appending to `Forwarded`.
    pub fn forwarded(hops: usize) -> Self {
        ProxyTrust {
            header: ProxyHeader::Forwarded,
            trusted_hops: hops,
            proxies: Vec::new(),
        }
    }

    /// Trust only the proxies at these addresses (the safer choice: a
    /// client reaching the server past the proxies cannot choose its
    /// address by sending the header itself).
    ///
    /// ```
    /// use pmcp_resilience::server::ProxyTrust;
    /// use std::net::IpAddr;
    ///
    /// let lb: IpAddr = "10.0.0.5".parse().unwrap();
    /// let trust = ProxyTrust::x_forwarded_for(1).only_from([lb]);
    /// assert_eq!(trust.proxies, vec![lb]);
    /// ```
    pub fn only_from(mut self, proxies: impl IntoIterator<Item = IpAddr>) -> Self {
        self.proxies = proxies.into_iter().collect();
        self
    }

    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        if self.trusted_hops == 0 && self.proxies.is_empty() {
            return Err(ConfigError::invalid(
                "trust_proxy",
                "trusted_hops must be at least 1, or name the proxies with `only_from` \
                 (or do not configure proxy trust)",
            ));
        }
        Ok(())
    }
}

/// The client's address under the rules of the [module docs](self).
pub(crate) fn client_address(parts: &Parts, trust: Option<&ProxyTrust>) -> Option<IpAddr> {
    let peer = parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(addr)| addr.ip());
    let Some(trust) = trust else {
        return peer;
    };
    let entries: Vec<&str> = match trust.header {
        ProxyHeader::XForwardedFor => parts
            .headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .collect(),
        ProxyHeader::Forwarded => parts
            .headers
            .get_all(http::header::FORWARDED)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|element| {
                element.split(';').find_map(|pair| {
                    let (name, value) = pair.trim().split_once('=')?;
                    name.eq_ignore_ascii_case("for")
                        .then(|| value.trim().trim_matches('"'))
                })
            })
            .collect(),
    };
    if !trust.proxies.is_empty() {
        if !peer.is_some_and(|p| trust.proxies.contains(&p)) {
            return peer;
        }
        let mut client = peer;
        for entry in entries.iter().rev() {
            let Some(ip) = parse_ip(entry) else {
                return client;
            };
            client = Some(ip);
            if !trust.proxies.contains(&ip) {
                break;
            }
        }
        return client;
    }
    if entries.len() < trust.trusted_hops {
        return peer;
    }
    parse_ip(entries[entries.len() - trust.trusted_hops]).or(peer)
}

/// An IP address, possibly bracketed and with a port.
fn parse_ip(raw: &str) -> Option<IpAddr> {
    if let Ok(ip) = raw.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Ok(addr) = raw.parse::<SocketAddr>() {
        return Some(addr.ip());
    }
    raw.strip_prefix('[')
        .and_then(|r| r.split(']').next())
        .and_then(|r| r.parse().ok())
}

/// The key the layer's [`RequestKey`] gives a request, if not the scope's.
pub(crate) fn http_key(
    key: &RequestKey,
    parts: &Parts,
    trust: Option<&ProxyTrust>,
) -> Option<ScopeKey> {
    match key {
        RequestKey::Scope => None,
        RequestKey::ClientAddress => {
            let ip = client_address(parts, trust);
            Some(ScopeKey::new(&match ip {
                Some(ip) => format!("client:{ip}"),
                None => UNKNOWN_CLIENT.to_string(),
            }))
        }
        RequestKey::Custom(f) => f(parts).map(|k| ScopeKey::new(&format!("http:{k}"))),
    }
}

/// The `mcp-session-id` header of a request or response, if readable.
pub(crate) fn session_header(headers: &http::HeaderMap) -> Option<&str> {
    headers.get(SESSION_HEADER).and_then(|v| v.to_str().ok())
}

/// The JSON-RPC content of a POST body.
#[derive(Debug)]
pub(crate) struct Message {
    /// The requests (elements with a method and an id), in order.
    pub(crate) calls: Vec<JSONRPCRequest>,
    /// The id to answer a refusal with: the request's for a single message,
    /// `null` for a batch.
    pub(crate) reply_id: Value,
}

/// Why a body is not JSON-RPC the layer can judge.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum BodyError {
    /// Not JSON (JSON-RPC code -32700).
    Parse(String),
    /// JSON, but not a JSON-RPC message or batch (code -32600).
    Invalid(&'static str),
}

/// Reads the JSON-RPC requests of a body (see the module docs for the rules).
pub(crate) fn parse_message(bytes: &[u8]) -> Result<Message, BodyError> {
    let value: Value =
        serde_json::from_slice(bytes).map_err(|e| BodyError::Parse(e.to_string()))?;
    match value {
        Value::Object(_) => {
            let reply_id = value.get("id").cloned().unwrap_or(Value::Null);
            Ok(Message {
                calls: as_request(value).into_iter().collect(),
                reply_id,
            })
        }
        Value::Array(elements) if elements.is_empty() => Err(BodyError::Invalid(
            "an empty batch is not a valid JSON-RPC message",
        )),
        Value::Array(elements) => Ok(Message {
            calls: elements.into_iter().filter_map(as_request).collect(),
            reply_id: Value::Null,
        }),
        _ => Err(BodyError::Invalid(
            "a JSON-RPC message is an object or an array of objects",
        )),
    }
}

/// The element as a request, if it is one (a method and a usable id).
fn as_request(value: Value) -> Option<JSONRPCRequest> {
    let Value::Object(mut map) = value else {
        return None;
    };
    let method = match map.remove("method")? {
        Value::String(m) => m,
        _ => return None,
    };
    let id: RequestId = serde_json::from_value(map.remove("id")?).ok()?;
    Some(JSONRPCRequest {
        jsonrpc: "2.0".into(),
        method,
        params: map.remove("params"),
        id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(headers: &[(&str, &str)], peer: Option<&str>) -> Parts {
        let mut builder = http::Request::builder().method("POST").uri("/");
        for (k, v) in headers {
            builder = builder.header(*k, *v);
        }
        let (mut parts, ()) = builder.body(()).map(|r| r.into_parts()).unwrap();
        if let Some(p) = peer {
            parts
                .extensions
                .insert(ConnectInfo(p.parse::<SocketAddr>().unwrap()));
        }
        parts
    }

    #[test]
    fn proxy_headers_are_ignored_unless_trusted() {
        let p = parts(&[("x-forwarded-for", "1.1.1.1")], Some("10.0.0.1:5000"));
        assert_eq!(client_address(&p, None), "10.0.0.1".parse().ok());
    }

    #[test]
    fn trusted_hops_pick_the_address_the_outer_proxy_saw() {
        let p = parts(
            &[
                ("x-forwarded-for", "6.6.6.6, 2.2.2.2"),
                ("x-forwarded-for", "10.0.0.9"),
            ],
            Some("10.0.0.1:5000"),
        );
        let one = ProxyTrust::x_forwarded_for(1);
        let two = ProxyTrust::x_forwarded_for(2);
        let four = ProxyTrust::x_forwarded_for(4);
        assert_eq!(client_address(&p, Some(&one)), "10.0.0.9".parse().ok());
        assert_eq!(client_address(&p, Some(&two)), "2.2.2.2".parse().ok());
        assert_eq!(
            client_address(&p, Some(&four)),
            "10.0.0.1".parse().ok(),
            "too few entries: the peer"
        );
        let f = parts(
            &[(
                "forwarded",
                "for=6.6.6.6, for=\"[2001:db8::1]:4711\";proto=http",
            )],
            None,
        );
        assert_eq!(
            client_address(&f, Some(&ProxyTrust::forwarded(1))),
            "2001:db8::1".parse().ok()
        );
    }

    #[test]
    fn named_proxies_are_the_only_ones_believed() {
        let lb: IpAddr = "10.0.0.5".parse().unwrap();
        let trust = ProxyTrust::x_forwarded_for(1).only_from([lb]);
        let via_lb = parts(
            &[("x-forwarded-for", "6.6.6.6, 2.2.2.2, 10.0.0.5")],
            Some("10.0.0.5:5000"),
        );
        assert_eq!(
            client_address(&via_lb, Some(&trust)),
            "2.2.2.2".parse().ok()
        );
        let direct = parts(&[("x-forwarded-for", "2.2.2.2")], Some("7.7.7.7:5000"));
        assert_eq!(
            client_address(&direct, Some(&trust)),
            "7.7.7.7".parse().ok()
        );
        let junk = parts(&[("x-forwarded-for", "nonsense")], Some("10.0.0.5:1"));
        assert_eq!(client_address(&junk, Some(&trust)), Some(lb));
        assert!(ProxyTrust::x_forwarded_for(0).validate().is_err());
        assert!(
            ProxyTrust::x_forwarded_for(0)
                .only_from([lb])
                .validate()
                .is_ok()
        );
    }

    #[test]
    fn http_keys_are_prefixed_and_bounded() {
        let p = parts(&[("x-api-key", "k1")], None);
        assert_eq!(http_key(&RequestKey::Scope, &p, None), None);
        assert_eq!(
            http_key(&RequestKey::ClientAddress, &p, None).map(|k| k.to_string()),
            Some(UNKNOWN_CLIENT.to_string())
        );
        let api: HttpKeyFn = Arc::new(|p: &Parts| {
            p.headers
                .get("x-api-key")?
                .to_str()
                .ok()
                .map(|v| v.repeat(300))
        });
        let key = http_key(&RequestKey::Custom(api), &p, None).map(|k| k.to_string());
        assert!(
            key.as_deref()
                .is_some_and(|k| k.starts_with("http:k1k1") && k.len() <= 200)
        );
        let none: HttpKeyFn = Arc::new(|_: &Parts| None);
        assert_eq!(http_key(&RequestKey::Custom(none), &p, None), None);
    }

    #[test]
    fn bodies_are_read_by_the_documented_rules() {
        let single = parse_message(
            br#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"echo"}}"#,
        )
        .unwrap();
        assert_eq!(single.calls.len(), 1);
        assert_eq!(single.reply_id, serde_json::json!(7));
        let note =
            parse_message(br#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#).unwrap();
        assert!(note.calls.is_empty());
        let batch = parse_message(
            br#"[{"jsonrpc":"2.0","id":1,"method":"ping"},{"jsonrpc":"2.0","method":"n"},3]"#,
        )
        .unwrap();
        assert_eq!(batch.calls.len(), 1);
        assert_eq!(batch.reply_id, Value::Null);
        assert!(matches!(parse_message(b"{nope"), Err(BodyError::Parse(_))));
        assert!(matches!(parse_message(b"[]"), Err(BodyError::Invalid(_))));
        assert!(matches!(parse_message(b"42"), Err(BodyError::Invalid(_))));
    }
}
