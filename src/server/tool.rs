//! The rate limiter as a pmcp [`ToolMiddleware`], for per-tool limits inside
//! the server.
//!
//! ```
//! use pmcp_resilience::rate_limit::{RateLimitMiddleware, RateLimitStrategy};
//! use pmcp_resilience::server::ToolRateLimit;
//! use pmcp_resilience::Scope;
//! use std::sync::Arc;
//! use std::time::Duration;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // Each tool: at most 10 calls a minute, whoever calls.
//! let limiter = RateLimitMiddleware::builder()
//!     .scope(Scope::PerTool)
//!     .strategy(RateLimitStrategy::SlidingWindow { max_requests: 10, window: Duration::from_secs(60) })
//!     .build()?;
//! let _server = pmcp::Server::builder()
//!     .name("per-tool")
//!     .version("1.0.0")
//!     .tool_middleware(Arc::new(ToolRateLimit::new(limiter)))
//!     .build()?;
//! # Ok(())
//! # }
//! ```
//!
//! pmcp runs tool middleware just before the tool, after the request has
//! been parsed and routed; it passes no session id there on the `Server`
//! path (a [`Scope::PerSession`](crate::Scope::PerSession) limiter then keys
//! every call `session:no-session`; use the HTTP layer for per-session
//! limits). [`Scope::PerTool`](crate::Scope::PerTool) is the natural scope.
//!
//! # What the client sees
//!
//! pmcp turns a tool middleware's `Err` into a JSON-RPC error with code
//! -32603 and the error's text, dropping any `data` (pmcp's `ToolRejected`
//! is not mapped on this path either). The retry hint is therefore in the
//! text: with [`BackpressureConfig::signal_client`](crate::BackpressureConfig)
//! on, the message reads `Protocol error: -32005 - rate limit exceeded for
//! tool:<name>; retry after <n> ms`; without it, `Rate limit exceeded`.

use async_trait::async_trait;
use pmcp::server::cancellation::RequestHandlerExtra;
use pmcp::server::tool_middleware::{ToolContext, ToolMiddleware};
use pmcp::shared::{AdvancedMiddleware, MiddlewareContext};
use pmcp::types::{JSONRPCRequest, RequestId};
use serde_json::{Value, json};

use crate::rate_limit::RateLimitMiddleware;
use crate::scope::SESSION_ID_METADATA;

/// A [`RateLimitMiddleware`] installed with `Server::builder().tool_middleware(..)`.
///
/// ```
/// use pmcp_resilience::rate_limit::{BackpressureConfig, RateLimitMiddleware, RateLimitStrategy};
/// use pmcp_resilience::server::ToolRateLimit;
/// use pmcp_resilience::Scope;
/// use std::sync::Arc;
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let limiter = RateLimitMiddleware::builder()
///     .scope(Scope::PerTool)
///     .strategy(RateLimitStrategy::TokenBucket { capacity: 5, refill_rate: 1 })
///     .backpressure(BackpressureConfig::reject().with_client_signal())
///     .build()?;
/// let server = pmcp::Server::builder()
///     .name("limited")
///     .version("1.0.0")
///     .tool_middleware(Arc::new(ToolRateLimit::new(limiter)))
///     .build()?;
/// # let _ = server;
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct ToolRateLimit {
    limiter: RateLimitMiddleware,
    priority: i32,
}

impl ToolRateLimit {
    /// Limits tool calls with `limiter` (a handle: state is shared). Runs
    /// early among tool middlewares (priority 5), so that nothing else runs
    /// for a refused call.
    pub fn new(limiter: RateLimitMiddleware) -> Self {
        ToolRateLimit {
            limiter,
            priority: 5,
        }
    }

    /// Another place among the tool middlewares (lower runs first).
    pub fn with_priority(mut self, priority: i32) -> Self {
        self.priority = priority;
        self
    }
}

#[async_trait]
impl ToolMiddleware for ToolRateLimit {
    async fn on_request(
        &self,
        tool_name: &str,
        args: &mut Value,
        _extra: &mut RequestHandlerExtra,
        context: &ToolContext,
    ) -> pmcp::Result<()> {
        // The limiter sees the call as the `tools/call` request it came in;
        // the arguments are lent, not copied.
        let mut request = JSONRPCRequest {
            jsonrpc: "2.0".into(),
            method: "tools/call".into(),
            params: Some(json!({ "name": tool_name, "arguments": std::mem::take(args) })),
            id: RequestId::from(context.request_id.clone()),
        };
        let middleware_context = MiddlewareContext::with_request_id(context.request_id.clone());
        if let Some(session) = &context.session_id {
            middleware_context.set_metadata(SESSION_ID_METADATA.to_string(), session.clone());
        }
        let result = self
            .limiter
            .on_request_with_context(&mut request, &middleware_context)
            .await;
        if let Some(Value::Object(mut params)) = request.params
            && let Some(lent) = params.remove("arguments")
        {
            *args = lent;
        }
        result
    }

    fn priority(&self) -> i32 {
        self.priority
    }
}
