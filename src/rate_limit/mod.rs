//! Rate limiters: one per scope key, four strategies, fair waiting.
//!
//! ```
//! use pmcp::shared::{AdvancedMiddleware, MiddlewareContext};
//! use pmcp::types::{JSONRPCRequest, RequestId};
//! use pmcp_resilience::rate_limit::{RateLimitMiddleware, RateLimitStrategy};
//! use pmcp_resilience::Scope;
//! use std::time::Duration;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // Each method gets 2 requests per minute.
//! let limiter = RateLimitMiddleware::builder()
//!     .scope(Scope::PerMethod)
//!     .strategy(RateLimitStrategy::FixedWindow { max_requests: 2, window: Duration::from_secs(60) })
//!     .build()?;
//!
//! let context = MiddlewareContext::default();
//! let mut ping = JSONRPCRequest {
//!     jsonrpc: "2.0".into(),
//!     method: "ping".into(),
//!     params: None,
//!     id: RequestId::from(1i64),
//! };
//! assert!(limiter.on_request_with_context(&mut ping, &context).await.is_ok());
//! assert!(limiter.on_request_with_context(&mut ping, &context).await.is_ok());
//! let third = limiter.on_request_with_context(&mut ping, &context).await;
//! assert!(matches!(third, Err(pmcp::Error::RateLimited)));
//! assert!(limiter.retry_after("method:ping").is_some());
//! # Ok(())
//! # }
//! ```
//!
//! - [`strategy`]: the algorithms, pure functions of (state, now, cost).
//! - [`RateLimitBuilder`]: settings, validation and request costs.
//! - [`BackpressureConfig`]: waiting instead of rejecting, fairly.
//! - [`RateLimiter`] and [`KeyedRateLimiter`]: the pluggable limiter and the
//!   built-in one.
//! - [`RateLimitMiddleware`]: the pmcp middleware.
//! - [`RateLimitMetrics`]: what it reports.

mod backpressure;
mod config;
mod limiter;
mod metrics;
mod middleware;
pub mod strategy;

pub use backpressure::{BackpressureConfig, DEFAULT_MAX_WAITERS};
pub use config::{CostFn, RateLimitBuilder, RequestCost};
pub use limiter::{Admission, KeyUsage, KeyedRateLimiter, RateLimiter};
pub use metrics::{RateLimitMetrics, RateLimitSnapshot, RateLimitUsage};
pub use middleware::RateLimitMiddleware;
pub use strategy::{Decision, LimiterState, RateLimitStrategy, Reservation};
