//! Circuit breakers: one per scope key, each a small pure state machine.
//!
//! ```
//! use pmcp_resilience::circuit_breaker::{CircuitBreakerMiddleware, CircuitState, ErrorMatcher};
//! use pmcp_resilience::{Scope, ManualClock};
//! use pmcp::shared::{AdvancedMiddleware, MiddlewareContext};
//! use pmcp::types::{JSONRPCError, JSONRPCRequest, JSONRPCResponse, RequestId};
//! use pmcp::types::jsonrpc::ResponsePayload;
//! use std::sync::Arc;
//! use std::time::Duration;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let clock = ManualClock::new();
//! let cb = CircuitBreakerMiddleware::builder()
//!     .scope(Scope::PerMethod)
//!     .failure_threshold(2)
//!     .timeout(Duration::from_secs(10))
//!     .clock(Arc::new(clock.clone()))
//!     .build()
//!     .expect("valid settings");
//!
//! // Two internal errors from the server open the breaker of `tools/call`.
//! for i in 0..2 {
//!     let context = MiddlewareContext::with_request_id(format!("r{i}"));
//!     let mut request = JSONRPCRequest {
//!         jsonrpc: "2.0".into(),
//!         method: "tools/call".into(),
//!         params: None,
//!         id: RequestId::from(i as i64),
//!     };
//!     cb.on_request_with_context(&mut request, &context).await.expect("closed");
//!     let mut response = JSONRPCResponse {
//!         jsonrpc: "2.0".into(),
//!         id: RequestId::from(i as i64),
//!         payload: ResponsePayload::Error(JSONRPCError { code: -32603, message: "boom".into(), data: None }),
//!     };
//!     cb.on_response_with_context(&mut response, &context).await.expect("recorded");
//! }
//! assert_eq!(cb.state_of("method:tools/call"), Some(CircuitState::Open));
//! assert_eq!(cb.retry_after("method:tools/call"), Some(Duration::from_secs(10)));
//! # }
//! ```

mod calls;
mod config;
mod control;
mod core;
mod entry;
pub(crate) mod machine;
mod matcher;
pub mod metrics;
mod middleware;
mod permit;
mod persist;
mod policy;
pub(crate) mod state;
pub(crate) mod store;
#[cfg(test)]
mod tests;
mod transport;

pub use config::CircuitBreakerBuilder;
pub use matcher::{ErrorMatcher, Outcome, OutcomePredicate};
#[allow(deprecated)]
pub use metrics::MetricsSnapshot;
pub use metrics::{CircuitBreakerMetrics, DEFAULT_REPORT_NAME, KeySnapshot};
pub use middleware::CircuitBreakerMiddleware;
pub use permit::{Permit, Rejected};
pub use policy::{BreakerPolicy, FailureRate, OpenBackoff, SlidingWindow, SlowCalls};
pub use state::{CircuitState, Transition, TransitionReason, Verdict};
pub use transport::ObservedTransport;
