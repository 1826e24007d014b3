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
//! # Choosing a strategy
//!
//! A [`RateLimitStrategy::TokenBucket`] lets a burst of `capacity` through at
//! once and then `refill_rate` per second; a
//! [`RateLimitStrategy::LeakyBucket`] of the same numbers spreads the same
//! burst out, one request every `1 / leak_rate`, delaying (not rejecting)
//! the early ones while fewer than `capacity` wait. The fixed window is the
//! cheapest and the least exact at window boundaries; the sliding window
//! fixes most of that with two counters (its bound is stated in
//! [`strategy::sliding_window`]). The table in [`strategy`] compares them.
//!
//! # Costs, waiting, and telling clients when to retry
//!
//! - A request costs 1 unit unless [`RateLimitBuilder::cost_for_tool`],
//!   [`RateLimitBuilder::cost_for_method`] or [`RateLimitBuilder::cost_fn`]
//!   say otherwise. A cost above the limit is rejected at once.
//! - With [`BackpressureConfig::wait_for_capacity`], requests wait for
//!   capacity in a line per key, in order of arrival, up to `max_wait`; one
//!   that gives up leaves the line and those behind move up (see
//!   [`BackpressureConfig`]).
//! - With [`BackpressureConfig::signal_client`], rejections carry
//!   `retryAfterMs` (see [`RateLimitMiddleware`]).
//!
//! # Memory
//!
//! One allocation per key: its state (8 bytes for the buckets, 16 for the
//! windows), two counts (8 bytes) and the key text, plus 16 bytes in the
//! map's table (about 96 bytes in all for a 44-byte `session:<uuid>` key at
//! a million keys). At most
//! [`RegistryLimits::max_keys`](crate::RegistryLimits) of them; a key back at
//! full capacity for `idle_after` is idle and may be dropped (dropping it
//! changes no decision). Beyond the cap, new keys share one
//! overflow limiter.
//!
//! # Testing
//!
//! Give the builder a [`ManualClock`](crate::ManualClock), or a
//! [`TokioClock`](crate::TokioClock) under `#[tokio::test(start_paused = true)]`
//! so that waits take no real time.
//!
//! # Contents
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
mod entry;
mod keyed;
mod limiter;
mod metrics;
mod middleware;
pub mod strategy;
mod waiting;

pub use backpressure::BackpressureConfig;
pub use config::{CostFn, RateLimitBuilder};
pub use keyed::KeyedRateLimiter;
pub use limiter::{Admission, KeyUsage, RateLimiter};
#[allow(deprecated)]
pub use metrics::RateLimitSnapshot;
pub use metrics::{DEFAULT_REPORT_NAME, RateLimitMetrics};
pub use middleware::RateLimitMiddleware;
pub use strategy::{Decision, LimiterState, RateLimitStrategy, Reservation};
