//! For authors of stores: keeping breaker state somewhere of your own.
//!
//! A middleware keeps its state in memory, a file or Redis
//! ([`StatePersistence`](crate::StatePersistence)); this module is what you
//! need to keep a circuit breaker's state anywhere else (a database, a
//! service of your own) and plug it in with
//! [`StatePersistence::Custom`](crate::StatePersistence::Custom):
//!
//! - [`CircuitBreakerStateStore`], the trait to implement: four methods move
//!   [`CircuitBreakerState`] values; the others have defaults;
//! - [`CircuitBreakerState`], one key's state: small, opaque and serialisable
//!   with serde, so a store keeps it as it is;
//! - [`acquire`], [`record`] and [`set_mode`], the breaker's state machine as
//!   pure functions over that state (no lock, map or clock), for a store that
//!   runs a decision in its own atomic step: the trait's default methods read
//!   the state, run them and write it back;
//! - [`Admission`], [`ProbeId`] and [`BreakerMode`], the values those functions
//!   take and return; the rules they apply are a
//!   [`BreakerPolicy`](crate::circuit_breaker::BreakerPolicy), a call's outcome
//!   a [`Verdict`](crate::circuit_breaker::Verdict), a change of state a
//!   [`Transition`](crate::circuit_breaker::Transition);
//! - [`InMemoryStateStore`], the reference implementation.
//!
//! A rate limiter of your own is not a store but a limiter: implement
//! [`RateLimiter`](crate::rate_limit::RateLimiter) (its docs have an example)
//! and give it to `RateLimitMiddleware::builder().limiter(..)`; the built-in
//! strategies run on your side through
//! [`RateLimitStrategy::check`](crate::RateLimitStrategy::check).
//!
//! # Example
//!
//! A store that keeps every key's state as JSON text (where a database would
//! keep a row), shared by two breakers:
//!
//! ```
//! use async_trait::async_trait;
//! use pmcp_resilience::circuit_breaker::KeySnapshot;
//! use pmcp_resilience::store::{CircuitBreakerState, CircuitBreakerStateStore};
//! use pmcp_resilience::{CircuitBreakerMiddleware, CircuitState, StatePersistence, StoreError};
//! use std::collections::HashMap;
//! use std::sync::{Arc, Mutex};
//!
//! #[derive(Default)]
//! struct JsonRows(Mutex<HashMap<String, String>>);
//!
//! fn store_error(e: impl std::fmt::Display) -> StoreError {
//!     StoreError::Other(e.to_string())
//! }
//!
//! #[async_trait]
//! impl CircuitBreakerStateStore for JsonRows {
//!     async fn get_state(&self, key: &str) -> Result<Option<CircuitBreakerState>, StoreError> {
//!         let rows = self.0.lock().map_err(store_error)?;
//!         rows.get(key).map(|row| serde_json::from_str(row).map_err(store_error)).transpose()
//!     }
//!
//!     async fn set_state(&self, key: &str, state: CircuitBreakerState) -> Result<(), StoreError> {
//!         let row = serde_json::to_string(&state).map_err(store_error)?;
//!         self.0.lock().map_err(store_error)?.insert(key.to_owned(), row);
//!         Ok(())
//!     }
//!
//!     async fn get_metrics(&self) -> Result<HashMap<String, KeySnapshot>, StoreError> {
//!         Ok(HashMap::new()) // a store may keep state only
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let rows = Arc::new(JsonRows::default());
//! let one = CircuitBreakerMiddleware::builder()
//!     .failure_threshold(1)
//!     .persistence(StatePersistence::Custom(rows.clone()))
//!     .build()?;
//! let other = CircuitBreakerMiddleware::builder()
//!     .failure_threshold(1)
//!     .persistence(StatePersistence::Custom(rows.clone()))
//!     .build()?;
//!
//! // A failure seen by one breaker opens the key for both.
//! let permit = one.acquire("global").await?;
//! permit.record(pmcp_resilience::circuit_breaker::Verdict::Failure).await;
//! assert!(other.acquire("global").await.is_err());
//! let state = rows.get_state("global").await?.expect("stored");
//! assert_eq!(state.effective_state(), CircuitState::Open);
//! # Ok(())
//! # }
//! ```
//!
//! The default [`acquire`](CircuitBreakerStateStore::acquire) and
//! [`record`](CircuitBreakerStateStore::record) read, decide and write back,
//! which is atomic only for a store private to one process. A store shared by
//! several processes overrides them to run [`acquire`] and [`record`] in one
//! atomic step (a transaction, a compare-and-swap; the Redis store runs the
//! same state machine as a Lua script).

pub use crate::circuit_breaker::machine::{acquire, record, set_mode};
pub use crate::circuit_breaker::state::{Admission, BreakerMode, CircuitBreakerState, ProbeId};
pub use crate::circuit_breaker::store::{CircuitBreakerStateStore, InMemoryStateStore};
