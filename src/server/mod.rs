//! Protecting a pmcp server: rate limits and circuit breakers decided before
//! a request reaches pmcp, with signals every MCP client can read.
//!
//! ```
//! use axum::body::Body;
//! use http::{Request, StatusCode};
//! use pmcp_resilience::rate_limit::{RateLimitMiddleware, RateLimitStrategy};
//! use pmcp_resilience::server::ResilienceLayer;
//! use pmcp_resilience::Scope;
//! use std::sync::Arc;
//! use std::time::Duration;
//! use tower::ServiceExt;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let server = pmcp::Server::builder().name("demo").version("1.0.0").build()?;
//! // One call per minute per tool.
//! let limiter = RateLimitMiddleware::builder()
//!     .scope(Scope::PerTool)
//!     .strategy(RateLimitStrategy::FixedWindow { max_requests: 1, window: Duration::from_secs(60) })
//!     .build()?;
//! let layer = ResilienceLayer::builder().rate_limit(limiter).build()?;
//! let app = pmcp::axum::concurrent_router(Arc::new(server)).layer(layer);
//!
//! let call = || {
//!     Request::post("/")
//!         .header("content-type", "application/json")
//!         .header("accept", "application/json, text/event-stream")
//!         .body(Body::from(r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"search"}}"#))
//! };
//! let _first = app.clone().oneshot(call()?).await?; // reaches pmcp
//! let second = app.oneshot(call()?).await?;
//! // Refused before pmcp: a JSON-RPC error every MCP client reads, with the
//! // HTTP signals beside it.
//! assert_eq!(second.status(), StatusCode::OK);
//! assert_eq!(second.headers()["ratelimit-policy"], r#""tool";q=1;w=60"#);
//! assert!(second.headers().contains_key("retry-after"));
//! # Ok(())
//! # }
//! ```
//!
//! # Where each piece runs
//!
//! - [`ResilienceLayer`]: a tower layer around the router of pmcp's
//!   streamable-HTTP server (`pmcp::axum::router`, `concurrent_router`, ...).
//!   It reads the JSON-RPC body (bounded), keys the request
//!   ([`keys`] states the rules), asks the limiter and the breaker, and
//!   answers a refusal itself, so no tool code runs for a refused call. The
//!   limiter and the breaker are the same handles as on the client side:
//!   their strategies, scopes, stores, costs, backpressure and metrics apply.
//!   With [`BackpressureConfig::wait_for_capacity`](crate::BackpressureConfig)
//!   the layer waits (fairly, up to `max_wait`) instead of refusing.
//!   [`signals`] documents every header and body. The limiter decides
//!   first, then the breaker: a call refused by an open breaker has used
//!   its rate-limit units, and a flood is turned away before it reaches the
//!   breaker's bookkeeping.
//! - pmcp's protocol chain (`ServerCoreBuilder::protocol_middleware`):
//!   [`RateLimitMiddleware`](crate::RateLimitMiddleware) and
//!   [`CircuitBreakerMiddleware`](crate::CircuitBreakerMiddleware) are
//!   `AdvancedMiddleware`s and work there as they are. `ServerCore` answers
//!   a middleware's refusal with a JSON-RPC error -32603 whose message is the
//!   error's text (`Protocol error: -32005 - rate limit exceeded for <key>;
//!   retry after <n> ms` with `signal_client`). The high-level
//!   `pmcp::Server` served by `pmcp::axum` has no protocol chain: use the
//!   layer there.
//! - [`ToolRateLimit`]: the limiter as a pmcp `ToolMiddleware`, for
//!   per-tool limits ([`tool`] says what the client sees).
//!
//! # Refusals
//!
//! By default ([`Refusals::JsonRpcError`]) a refusal is HTTP 200 with the
//! JSON-RPC error (-32005 rate limited, -32006 breaker open) and its
//! `data.retryAfterMs`: pmcp, Python `mcp` 1.x and 2.x and the TypeScript
//! SDK all read it and keep their sessions, whereas a 429 or 503 makes
//! Python `mcp` 1.x drop the session and gives pmcp and TypeScript clients
//! no retry hint. `Retry-After` and the RateLimit fields come with it
//! either way. [`Refusals::HttpStatus`] answers 429/503 instead, for
//! deployments where gateways act on the status. Every answer of the
//! layer's own carries the CORS fields pmcp's router uses (for
//! [`CorsOrigins`], set like pmcp's `allowed_origins`), exposing the retry
//! and usage headers too, and `Cache-Control: no-store`.
//!
//! Where your clients allow it, serve with pmcp's
//! `StreamableHttpServerConfig { enable_json_response: true, .. }`: answers
//! are plain JSON, cheaper for the layer to read, and Python `mcp` 2.3
//! cannot use pmcp's default SSE configuration at all (with or without this
//! layer: pmcp answers its POSTs with 202 once its GET stream is open).
//!
//! # What the breaker counts
//!
//! Each JSON-RPC request admitted by the breaker holds a
//! [`Permit`](crate::circuit_breaker::Permit) until its answer is seen,
//! which the breaker judges with its failure and neutral matchers (by
//! default: HTTP 5xx, JSON-RPC -32603 and the other server-error codes
//! count; the caller's mistakes, -32700/-32600/-32601/-32602 and HTTP 4xx,
//! are neutral). The answer is read wherever pmcp sends it:
//! - a non-2xx status from the wrapped service: an HTTP-status outcome;
//! - a JSON body (`enable_json_response: true`): read whole, each request
//!   judged by the response with its id;
//! - an event stream (pmcp's default configuration): read as it passes,
//!   each chunk forwarded unchanged the moment it arrives, each request
//!   judged when the event with its response ends;
//! - `202 Accepted`, once a client (pmcp's own, for one) has opened the
//!   session's GET stream: pmcp sends the response on that stream, where
//!   the layer finds it by session and JSON-RPC id.
//!
//! A call whose answer never comes where the layer can see it (the client
//! went away, the stream ended first) ends neutral, never as a success; one
//! with no answer within the breaker's `call_timeout` ends as timed out.
//!
//! # Invented tool names
//!
//! pmcp answers a call of a tool it does not have with -32603, the code of
//! a real failure. Give the layer the server's tools
//! ([`tools`](ResilienceLayerBuilder::tools) or
//! [`tools_of`](ResilienceLayerBuilder::tools_of)): calls of other tools
//! then share one key, `tool:<unknown>`, and are always neutral. Without
//! them, each name is a key of its own, and pmcp's `Tool '<name>' not
//! found` answer is judged neutral. Either way no invented name opens a
//! breaker. When a breaker's key registry is full, a closed key idle longer
//! than the registry's `idle_after` is evicted; if none is, a new key is
//! admitted untracked (its calls run, unprotected and uncounted) rather
//! than sharing a breaker other keys could open. A limiter's registry at
//! its cap shares one overflow budget among new keys: with a per-tool
//! limiter, give the layer the tool list so junk names cannot fill it.

mod calls;
mod cors;
pub mod keys;
mod layer;
mod service;
pub mod signals;
mod sse;
pub mod tool;
mod tools;
mod trust;

pub use cors::CorsOrigins;
pub use keys::{HttpKeyFn, ProxyHeader, ProxyTrust, RequestKey, SESSION_HEADER};
pub use layer::{ResilienceLayer, ResilienceLayerBuilder};
pub use service::ResilienceService;
pub use signals::Refusals;
pub use tool::ToolRateLimit;
pub use tools::UNKNOWN_TOOL;
