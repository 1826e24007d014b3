//! Scoped, persistent, observable circuit breakers and rate limiters for
//! [pmcp](https://crates.io/crates/pmcp), the Rust SDK for the Model Context
//! Protocol.
//!
//! The middlewares of this crate are drop-in replacements for pmcp's
//! `CircuitBreakerMiddleware` and `RateLimitMiddleware`: they implement
//! `pmcp::shared::AdvancedMiddleware` and reject with the same errors, but
//! keep one breaker or limiter per key ([`scope::Scope`]), can keep their
//! state in a file or Redis, and report what they do.
//!
//! ```
//! use pmcp_resilience::{
//!     BackpressureConfig, CircuitBreakerMiddleware, RateLimitMiddleware, RateLimitStrategy, Scope,
//! };
//! use std::sync::Arc;
//! use std::time::Duration;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // One breaker per tool, one token bucket per MCP session.
//! let breaker = CircuitBreakerMiddleware::builder()
//!     .scope(Scope::PerTool)
//!     .failure_threshold(3)
//!     .timeout(Duration::from_secs(30))
//!     .build()?;
//! let limiter = RateLimitMiddleware::builder()
//!     .scope(Scope::PerSession)
//!     .strategy(RateLimitStrategy::TokenBucket { capacity: 20, refill_rate: 5 })
//!     .backpressure(BackpressureConfig::reject().with_client_signal())
//!     .build()?;
//! // Both are pmcp middlewares: `ClientBuilder::new(transport).with_middleware(..)`.
//! let chain: Vec<Arc<dyn pmcp::shared::AdvancedMiddleware>> =
//!     vec![Arc::new(breaker), Arc::new(limiter)];
//! # assert_eq!(chain.len(), 2);
//! # Ok(())
//! # }
//! ```
//!
//! `cargo run --example quickstart` runs a real pmcp server and client with
//! both; the book's chapter (`book/ch11-middleware.md`) explains the choices.
//!
//! # Layout
//!
//! - [`clock`]: injectable time; every decision is a pure function of state and time.
//! - [`scope`]: how a request maps to a key.
//! - [`registry`]: the bounded map of per-key state.
//! - [`circuit_breaker`]: the breaker's state machine, middleware and metrics.
//! - [`rate_limit`]: the limiter strategies, backpressure, middleware and metrics.
//! - [`metrics`]: what both middlewares report in: counter settings, the
//!   store's state, durations.
//! - [`observe`]: reads the `metrics()` snapshots of breakers and limiters; with
//!   feature `prometheus`, `MetricsMiddleware`, Prometheus export and the JSON
//!   snapshot of all of them.
//! - `server` (feature `server`): protecting a pmcp server: a tower layer with HTTP 429/503 signals, and a tool middleware.
//! - [`persistence`]: where state lives (memory, file, Redis, your own store).
//! - [`store`]: for authors of stores: the breaker's store trait and the state
//!   machine a store runs.
//! - `redis_store` (feature `redis`): limiter and breaker state shared through Redis.
//! - [`error`]: configuration and store errors.
//!
//! Dependencies run one way. At the bottom, `clock`, `scope`, `registry`,
//! `error` and `metrics` (the vocabulary of reports) import no middleware.
//! The cores, `circuit_breaker` and `rate_limit`, define what they report
//! (`CircuitBreakerMetrics`, `RateLimitMetrics`) and the store seam they
//! need (`CircuitBreakerStateStore`, `RateLimiter`); at `build()` they ask
//! `persistence` for the store a `StatePersistence` names (memory and file
//! are their own registry; custom, Redis and Redis Cluster are stores behind
//! the seam). `redis_store` implements the seams with Lua that mirrors the
//! cores' pure state machines. `observe` only reads the cores' snapshots,
//! and `server` adapts the cores to tower; neither is imported by a core.
//!
//! # Features
//!
//! `server` and `prometheus` are on by default; `redis`, `redis-cluster`
//! and `redis-tls` are off. With `default-features = false` the crate builds
//! the breakers, limiters, scopes, persistence and reports without axum,
//! hyper, tower or prometheus: what a pmcp client needs.

#![warn(missing_docs)]
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod circuit_breaker;
pub mod clock;
pub mod display;
pub mod error;
mod hooks;
pub mod metrics;
pub mod observe;
pub mod persistence;
pub mod rate_limit;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub mod redis_store;
pub mod registry;
pub mod scope;
#[cfg(feature = "server")]
#[cfg_attr(docsrs, doc(cfg(feature = "server")))]
pub mod server;
pub mod store;

pub use circuit_breaker::{
    CircuitBreakerMetrics, CircuitBreakerMiddleware, CircuitState, ErrorMatcher,
};
pub use clock::{Clock, ManualClock, SystemClock, Timestamp, TokioClock};
pub use error::{ConfigError, StoreError};
pub use metrics::MetricsConfig;
pub use persistence::StatePersistence;
pub use rate_limit::{
    BackpressureConfig, RateLimitMetrics, RateLimitMiddleware, RateLimitStrategy, RateLimiter,
};
pub use registry::{RegistryLimits, RegistryStats};
pub use scope::{CircuitBreakerScope, RateLimitScope, RequestTarget, Scope, ScopeKey};
pub use store::{CircuitBreakerState, CircuitBreakerStateStore};

/// The README's examples, compiled as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

/// The book's middleware chapter (`book/ch11-middleware.md`), compiled as doctests.
#[cfg(doctest)]
#[doc = include_str!("../book/ch11-middleware.md")]
pub struct Ch11Middleware;
