//! Protecting a pmcp server: rate limits and circuit breakers decided before
//! a request reaches pmcp, with standard HTTP signals.
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
//! // One call per minute per tool, signalled with 429 and headers.
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
//! assert_eq!(second.status(), StatusCode::TOO_MANY_REQUESTS);
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
//!   answers 429 or 503 itself, so no tool code runs for a refused call. The
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
//! # What the breaker counts as a failure
//!
//! Each JSON-RPC request admitted by the breaker is one call. Its outcome is
//! handed to the breaker's [`ErrorMatcher`](crate::ErrorMatcher) (by default:
//! HTTP 5xx, JSON-RPC -32603 and the other server-error codes except
//! -32005/-32006):
//! - a non-2xx status from the wrapped service is an HTTP-status outcome;
//! - a 2xx JSON answer (`enable_json_response: true`) is read, only when a
//!   breaker is configured, and each request is judged by the JSON-RPC
//!   response with its id (a tool's `Err` reaches pmcp's wire as -32603);
//! - any other 2xx answer (an SSE stream) counts as a success: its events
//!   are not read;
//! - a request abandoned before the answer (the client went away) is
//!   released without being counted.

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
pub use layer::{DEFAULT_MAX_BODY_BYTES, ResilienceLayer, ResilienceLayerBuilder};
pub use service::ResilienceService;
pub use signals::Refusals;
pub use tool::ToolRateLimit;
pub use tools::UNKNOWN_TOOL;
pub use trust::DEFAULT_MAX_SESSIONS;
