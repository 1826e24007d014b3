//! What the layer tells HTTP clients: status codes, headers, JSON-RPC bodies.
//!
//! ```
//! use pmcp_resilience::server::signals;
//!
//! // The codes are pmcp's own, so pmcp clients recognise them.
//! assert_eq!(signals::RATE_LIMITED, pmcp::ErrorCode::RATE_LIMITED.as_i32());
//! assert_eq!(signals::CIRCUIT_BREAKER_OPEN, pmcp::ErrorCode::CIRCUIT_BREAKER_OPEN.as_i32());
//! ```
//!
//! # Headers
//!
//! All durations are whole seconds, **rounded up** (a client waiting that
//! long finds capacity), computed from the limiter's decision at the time it
//! was made:
//!
//! | header | value |
//! |---|---|
//! | `Retry-After` (refusals only) | seconds until a request of the same cost would be admitted (rate limit), or until the breaker lets a probe through (open breaker; the policy's open time for a breaker forced open) |
//! | `X-RateLimit-Limit` | the key's limit (capacity, or units per window) |
//! | `X-RateLimit-Remaining` | units left right after this decision |
//! | the `backpressure_header` (default `X-RateLimit-Reset`) | seconds until the key is back at its full limit (a fixed window: until it ends); a *delta*, not a Unix time |
//! | `RateLimit-Policy` | `"<name>";q=<limit>;w=<seconds>`: `w` is the window, or for buckets the time to refill from empty; left out for a custom limiter |
//! | `RateLimit` | `"<name>";r=<remaining>;t=<seconds until reset>` |
//!
//! `<name>` is the layer's policy name (default: the limiter's scope label,
//! such as `session`). For a batch, the headers describe the element that
//! left the fewest units.
//!
//! # Bodies
//!
//! Every answer of the layer's own carries a JSON-RPC error whose `id` is
//! the request's (`null` for a batch or an unreadable body). Refusals come
//! with HTTP 200 by default, or with the status in brackets under
//! [`Refusals::HttpStatus`]:
//! - rate limited (429): code -32005, `data: {"retryAfterMs", "limit", "remaining",
//!   "resetAfterMs", "resetAtMs", "scope", "key"}` (`resetAtMs`: Unix
//!   milliseconds, as in the client-side signal) (`retryAfterMs` is `null` when the
//!   request costs more than the limit and no wait helps; there is then no
//!   `Retry-After`);
//! - breaker open (503): code -32006, `data: {"retryAfterMs", "scope",
//!   "key"}`, `key` being the open breaker's (`retryAfterMs` is never
//!   `null` here, nor is `Retry-After` missing);
//! - the limiter's store failed (503): code -32603;
//! - 400: code -32700 (not JSON) or -32600 (not a JSON-RPC message);
//! - 413: code -32600, body larger than the layer's bound.

use std::time::Duration;

use axum::body::Body;
use http::header::{CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode};
use serde_json::{Value, json};

use crate::clock::Timestamp;
use crate::rate_limit::Decision;
use crate::scope::ScopeKey;

/// JSON-RPC code of a rate-limit refusal (pmcp's `RATE_LIMITED`).
pub const RATE_LIMITED: i32 = -32005;
/// JSON-RPC code of an open breaker (pmcp's `CIRCUIT_BREAKER_OPEN`).
pub const CIRCUIT_BREAKER_OPEN: i32 = -32006;

/// How the layer answers a refusal (rate limit, open breaker, a limiter
/// whose store failed). Both carry the same headers (`Retry-After`, the
/// usage fields) and the same JSON-RPC error body.
///
/// | client | `JsonRpcError` (HTTP 200) | `HttpStatus` (429/503) |
/// |---|---|---|
/// | pmcp 2.23 | `Error::Protocol { code, data }`: the retry hint | `Error::Transport("Request failed with status: 429 ..")`: no hint |
/// | Python `mcp` 2.x | the JSON-RPC error with its `data` | an error with code -32005/-32006 and the `data` |
/// | Python `mcp` 1.x | the JSON-RPC error with its `data` | `HTTPStatusError` raised out of the transport: the session is lost |
/// | TypeScript SDK 1.x | the JSON-RPC error with its `data` | `StreamableHTTPError` with the status only |
/// | gateways, curl, load balancers | a 200 (only the headers tell) | a 429/503 they understand |
///
/// ```
/// use axum::body::Body;
/// use http::{Request, StatusCode};
/// use pmcp_resilience::rate_limit::{RateLimitMiddleware, RateLimitStrategy};
/// use pmcp_resilience::server::{Refusals, ResilienceLayer};
/// use std::sync::Arc;
/// use std::time::Duration;
/// use tower::ServiceExt;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let server = pmcp::Server::builder().name("demo").version("1.0.0").build()?;
/// let once_a_minute = RateLimitStrategy::FixedWindow { max_requests: 1, window: Duration::from_secs(60) };
/// let layer = ResilienceLayer::builder()
///     .rate_limit(RateLimitMiddleware::builder().strategy(once_a_minute).build()?)
///     .refusals(Refusals::HttpStatus) // for gateways that act on the status
///     .build()?;
/// let app = pmcp::axum::concurrent_router(Arc::new(server)).layer(layer);
/// let ping = || {
///     Request::post("/")
///         .header("content-type", "application/json")
///         .header("accept", "application/json, text/event-stream")
///         .body(Body::from(r#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#))
/// };
/// let _first = app.clone().oneshot(ping()?).await?;
/// let refused = app.oneshot(ping()?).await?;
/// assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
/// assert!(refused.headers().contains_key("retry-after"));
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Refusals {
    /// HTTP 200 with the JSON-RPC error (the default): every MCP client
    /// known reads it and keeps its session.
    #[default]
    JsonRpcError,
    /// HTTP 429 (rate limit) or 503 (open breaker, store failure): for
    /// deployments where gateways or plain HTTP clients act on the status.
    HttpStatus,
}

/// Whole seconds, rounded up.
pub(crate) fn ceil_secs(d: Duration) -> u64 {
    u64::try_from(d.as_nanos().div_ceil(1_000_000_000)).unwrap_or(u64::MAX)
}

pub(crate) use crate::clock::ceil_millis;

/// How the usage headers are named and labelled.
#[derive(Debug, Clone)]
pub(crate) struct HeaderNames {
    pub(crate) reset: HeaderName,
    pub(crate) policy_name: String,
}

/// A decision, as the headers describe it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Usage {
    pub(crate) decision: Decision,
    pub(crate) now: Timestamp,
    pub(crate) window: Option<Duration>,
}

impl Usage {
    fn reset_after(&self) -> Duration {
        self.decision.reset_at.saturating_since(self.now)
    }

    /// Adds the usage headers (everything but `Retry-After`).
    pub(crate) fn write(&self, names: &HeaderNames, headers: &mut HeaderMap) {
        let d = &self.decision;
        let reset = ceil_secs(self.reset_after());
        let name = &names.policy_name;
        headers.insert("x-ratelimit-limit", HeaderValue::from(d.limit));
        headers.insert("x-ratelimit-remaining", HeaderValue::from(d.remaining));
        headers.insert(names.reset.clone(), HeaderValue::from(reset));
        let policy = match self.window {
            Some(w) => format!("\"{name}\";q={};w={}", d.limit, ceil_secs(w)),
            None => format!("\"{name}\";q={}", d.limit),
        };
        if let Ok(v) = HeaderValue::from_str(&policy) {
            headers.insert("ratelimit-policy", v);
        }
        if let Ok(v) = HeaderValue::from_str(&format!("\"{name}\";r={};t={reset}", d.remaining)) {
            headers.insert("ratelimit", v);
        }
    }
}

/// A response with a JSON-RPC error body.
fn error_response(
    status: StatusCode,
    id: Value,
    code: i32,
    message: &str,
    data: Option<Value>,
) -> Response<Body> {
    let mut error = json!({ "code": code, "message": message });
    if let Some(data) = data {
        error["data"] = data;
    }
    let body = json!({ "jsonrpc": "2.0", "id": id, "error": error }).to_string();
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// HTTP 429 for a refused request.
pub(crate) fn rate_limited(
    id: Value,
    usage: &Usage,
    names: &HeaderNames,
    scope: &str,
    key: &ScopeKey,
) -> Response<Body> {
    let d = &usage.decision;
    let retry_ms = d.retry_after.map(ceil_millis);
    let message = match retry_ms {
        Some(ms) => format!("rate limit exceeded for {key}; retry after {ms} ms"),
        None => format!(
            "rate limit exceeded for {key}: this request costs more than the limit of {} and can never be admitted",
            d.limit
        ),
    };
    let data = json!({
        "retryAfterMs": retry_ms,
        "limit": d.limit,
        "remaining": d.remaining,
        "resetAfterMs": ceil_millis(usage.reset_after()),
        "resetAtMs": d.reset_at.as_millis(),
        "scope": scope,
        "key": key.as_str(),
    });
    let mut response = error_response(
        StatusCode::TOO_MANY_REQUESTS,
        id,
        RATE_LIMITED,
        &message,
        Some(data),
    );
    usage.write(names, response.headers_mut());
    if let Some(retry) = d.retry_after {
        response
            .headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from(ceil_secs(retry)));
    }
    response
}

/// HTTP 503 for a call refused by an open breaker.
pub(crate) fn circuit_open(
    id: Value,
    retry_after: Option<Duration>,
    scope: &str,
    key: &ScopeKey,
) -> Response<Body> {
    let retry_ms = retry_after.map(ceil_millis);
    let message = match retry_ms {
        Some(ms) => format!("circuit breaker open for `{key}`; retry after {ms} ms"),
        None => format!("circuit breaker open for `{key}`"),
    };
    let data = json!({ "retryAfterMs": retry_ms, "scope": scope, "key": key.as_str() });
    let mut response = error_response(
        StatusCode::SERVICE_UNAVAILABLE,
        id,
        CIRCUIT_BREAKER_OPEN,
        &message,
        Some(data),
    );
    if let Some(retry) = retry_after {
        response
            .headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from(ceil_secs(retry)));
    }
    response
}

/// HTTP 503 when the limiter could not decide (its store failed).
pub(crate) fn limiter_failed(id: Value, error: &pmcp::Error) -> Response<Body> {
    error_response(
        StatusCode::SERVICE_UNAVAILABLE,
        id,
        pmcp::ErrorCode::INTERNAL_ERROR.as_i32(),
        &error.to_string(),
        None,
    )
}

/// HTTP 502 when the wrapped service's answer could not be read.
pub(crate) fn upstream_failed(why: &str) -> Response<Body> {
    error_response(
        StatusCode::BAD_GATEWAY,
        Value::Null,
        pmcp::ErrorCode::INTERNAL_ERROR.as_i32(),
        &format!("could not read the server's answer: {why}"),
        None,
    )
}

/// HTTP 400 for a body that is not JSON-RPC.
pub(crate) fn bad_request(code: i32, message: &str) -> Response<Body> {
    error_response(StatusCode::BAD_REQUEST, Value::Null, code, message, None)
}

/// HTTP 413 for a body over the bound.
pub(crate) fn too_large(max: usize) -> Response<Body> {
    error_response(
        StatusCode::PAYLOAD_TOO_LARGE,
        Value::Null,
        pmcp::ErrorCode::INVALID_REQUEST.as_i32(),
        &format!("request body larger than {max} bytes"),
        None,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_round_up() {
        assert_eq!(ceil_secs(Duration::from_millis(1)), 1);
        assert_eq!(ceil_secs(Duration::from_secs(2)), 2);
        assert_eq!(ceil_secs(Duration::from_millis(2001)), 3);
        assert_eq!(ceil_secs(Duration::ZERO), 0);
        assert_eq!(ceil_millis(Duration::from_nanos(1)), 1);
    }
}
