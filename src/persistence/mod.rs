//! Where breaker and limiter state lives.
//!
//! ```
//! use pmcp_resilience::persistence::{FileStoreOptions, OnCorrupt};
//! use pmcp_resilience::{CircuitBreakerMiddleware, CircuitState, StatePersistence};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let path = dir.path().join("breakers.json");
//! let breaker = |path| {
//!     CircuitBreakerMiddleware::builder()
//!         .failure_threshold(1)
//!         .persistence(StatePersistence::File(path))
//!         .file_options(FileStoreOptions::default().on_corrupt(OnCorrupt::Fail))
//!         .build()
//! };
//! let first = breaker(path.clone())?;
//! first.force_open("tool:search"); // on disk before this returns
//! first.shutdown().await?;
//! // The next process starts where the last one stopped.
//! let next = breaker(path)?;
//! assert_eq!(next.state_of("tool:search"), Some(CircuitState::Open));
//! # Ok(())
//! # }
//! ```
//!
//! [`StatePersistence::Memory`] is the embedded default: state lives in the
//! process and is lost on restart. [`StatePersistence::File`] keeps it in a
//! file: one file per process, written atomically, read back on start.
//!
//! The middlewares take either through their builders' `persistence(..)`
//! (and `file_options(..)` for the flush interval and the corrupt-file
//! policy). With a file, a breaker writes each transition through before the
//! hook that caused it returns, and a rate limiter writes its changes at
//! most one flush interval later; both write everything on `shutdown()` and,
//! best effort, when dropped. Give each middleware its own file: a second one
//! on the same file is refused at `build()`.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use crate::circuit_breaker::store::CircuitBreakerStateStore;

mod backing;
mod file;
mod shared;
#[cfg(test)]
mod tests;

pub(crate) use backing::FileBacking;
#[cfg(test)]
pub(crate) use file::{FileProblem, FileStore, LoadOutcome};
pub(crate) use file::{KIND_CIRCUIT_BREAKER, KIND_RATE_LIMIT, LoadReport};
#[cfg(feature = "redis")]
pub(crate) use shared::RedisOptions;
pub(crate) use shared::{breaker_store, rate_limiter};

pub use file::{FileStoreOptions, MAX_FLUSH_INTERVAL, OnCorrupt};

/// Where a middleware keeps its per-key state.
///
/// ```
/// use pmcp_resilience::{RateLimitMiddleware, StatePersistence};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let dir = tempfile::tempdir()?;
/// let in_memory = RateLimitMiddleware::builder().build()?; // StatePersistence::Memory
/// let in_a_file = RateLimitMiddleware::builder()
///     .persistence(StatePersistence::File(dir.path().join("limits.json")))
///     .build()?;
/// # drop((in_memory, in_a_file));
/// # Ok(())
/// # }
/// ```
// A configuration value, built once per middleware: its size does not matter.
#[cfg_attr(feature = "redis", allow(clippy::large_enum_variant))]
#[derive(Clone, Default)]
#[non_exhaustive]
pub enum StatePersistence {
    /// In memory only: fast, lost on restart, private to the process.
    #[default]
    Memory,
    /// In a file, written atomically, read back on start (`build()` must run
    /// inside a Tokio runtime).
    File(PathBuf),
    /// In Redis, shared by every process pointed at the same server and
    /// prefix: each decision is one Lua script using the server's clock.
    /// Tune timeouts and the failure policy with the builders'
    /// `redis_options(..)`. `rediss://` URLs (TLS) need the cargo feature
    /// `redis-tls`; a private CA is given with `redis::Client::build_with_tls`.
    #[cfg(feature = "redis")]
    #[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
    Redis {
        /// The Redis client (for example `redis::Client::open("redis://127.0.0.1/")?`).
        client: redis::Client,
        /// Prepended to every key (at most 64 bytes; no braces).
        key_prefix: String,
    },
    /// In a Redis Cluster (cargo feature `redis-cluster`): like
    /// [`StatePersistence::Redis`], each decision one script call on the
    /// slot of its key (the keys of one scope key share a hash tag), with
    /// `MOVED`/`ASK` redirections followed and scripts loaded again after a
    /// failover. `rediss://` node URLs need the feature `redis-tls`.
    #[cfg(feature = "redis-cluster")]
    #[cfg_attr(docsrs, doc(cfg(feature = "redis-cluster")))]
    RedisCluster {
        /// The cluster client (for example
        /// `redis::cluster::ClusterClient::new(vec!["redis://10.0.0.1:6379/"])?`).
        client: redis::cluster::ClusterClient,
        /// Prepended to every key (at most 64 bytes; no braces).
        key_prefix: String,
    },
    /// In a store of your own (circuit breakers only; a rate limiter takes a
    /// limiter of your own through `RateLimitMiddleware::builder().limiter(..)`).
    Custom(Arc<dyn CircuitBreakerStateStore>),
}

impl fmt::Debug for StatePersistence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StatePersistence::Memory => f.write_str("Memory"),
            StatePersistence::File(path) => f.debug_tuple("File").field(path).finish(),
            StatePersistence::Custom(_) => f.write_str("Custom(..)"),
            #[cfg(feature = "redis")]
            StatePersistence::Redis { key_prefix, .. } => f
                .debug_struct("Redis")
                .field("key_prefix", key_prefix)
                .finish_non_exhaustive(),
            #[cfg(feature = "redis-cluster")]
            StatePersistence::RedisCluster { key_prefix, .. } => f
                .debug_struct("RedisCluster")
                .field("key_prefix", key_prefix)
                .finish_non_exhaustive(),
        }
    }
}
