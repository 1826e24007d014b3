//! Errors of this crate.
//!
//! ```
//! use pmcp_resilience::{ConfigError, RateLimitMiddleware, RateLimitStrategy};
//! use std::time::Duration;
//!
//! let zero_window = RateLimitMiddleware::builder()
//!     .strategy(RateLimitStrategy::FixedWindow { max_requests: 10, window: Duration::ZERO })
//!     .build();
//! match zero_window {
//!     Err(e @ ConfigError::Invalid { .. }) => println!("fix the settings: {e}"),
//!     other => panic!("expected a configuration error, got {other:?}"),
//! }
//! ```
//!
//! Configuration mistakes are caught by the builders and returned as
//! [`ConfigError`]; failures of a state store are [`StoreError`]s. Rejections
//! of requests are pmcp's own errors (`pmcp::Error::CircuitBreakerOpen`,
//! `pmcp::Error::RateLimited`), so existing callers keep working.

use std::borrow::Cow;

/// An invalid configuration, found when a builder's `build()` runs.
///
/// ```
/// use pmcp_resilience::{CircuitBreakerMiddleware, ConfigError};
///
/// let error = CircuitBreakerMiddleware::builder().failure_threshold(0).build().expect_err("zero");
/// // The field is named as the builder method is, and the message says what to change.
/// assert!(matches!(error, ConfigError::Invalid { field: "failure_threshold", .. }));
/// assert!(error.to_string().starts_with("invalid `failure_threshold`: "));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A setting has a value that cannot work.
    #[error("invalid `{field}`: {reason}")]
    Invalid {
        /// The setting, as named by the builder method.
        field: &'static str,
        /// What is wrong and what to change.
        reason: Cow<'static, str>,
    },
    /// The chosen persistence is not available in this build or for this middleware.
    #[error("unsupported persistence: {0}")]
    UnsupportedPersistence(Cow<'static, str>),
    /// The state store could not be opened: the state file is in use by
    /// another process or middleware, it is unreadable under
    /// `OnCorrupt::Fail`, its directory cannot be used, or `build()` ran
    /// outside a Tokio runtime. The message says which and what to change.
    #[error("could not open the state store: {0}")]
    Store(String),
}

impl ConfigError {
    /// An [`ConfigError::Invalid`] for `field`.
    pub fn invalid(field: &'static str, reason: impl Into<Cow<'static, str>>) -> Self {
        ConfigError::Invalid {
            field,
            reason: reason.into(),
        }
    }
}

impl From<StoreError> for ConfigError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Config(config) => config,
            other => ConfigError::Store(other.to_string()),
        }
    }
}

/// A failure of a state store (file, Redis, or a custom store).
///
/// ```
/// use pmcp_resilience::{CircuitBreakerMiddleware, ConfigError, StoreError};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// // What a store of your own returns when its backend does not answer...
/// let down = StoreError::Unavailable("connection refused".into());
/// assert_eq!(down.to_string(), "state store unavailable: connection refused");
/// // ...and what a builder makes of it when the store cannot be opened.
/// assert!(matches!(ConfigError::from(down), ConfigError::Store(_)));
/// // A breaker's `flush` and `shutdown` report the store's failures.
/// let cb = CircuitBreakerMiddleware::builder().build().expect("valid");
/// assert!(cb.flush().await.is_ok()); // the memory store never fails
/// # }
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The store could not be reached or did not answer in time.
    #[error("state store unavailable: {0}")]
    Unavailable(String),
    /// Stored state could not be read (corrupt, truncated or foreign data).
    #[error("stored state is corrupt: {0}")]
    Corrupt(String),
    /// An I/O error of a file store.
    #[error("state store I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// Another failure, described.
    #[error("state store error: {0}")]
    Other(String),
    /// The state file is held by another process or another store in this
    /// process: a file store is for one owner at a time.
    #[error(
        "state file {} is already in use (lock {} is held by another process or store); \
         give each process its own file, or stop the other one first",
        path.display(),
        lock_path.display()
    )]
    Locked {
        /// The state file that was asked for.
        path: std::path::PathBuf,
        /// The sidecar lock file that is held.
        lock_path: std::path::PathBuf,
    },
    /// A file operation of a file store failed.
    #[error("could not {action} {}: {source}", path.display())]
    File {
        /// What was being done, e.g. "write the temporary file".
        action: &'static str,
        /// The file or directory concerned.
        path: std::path::PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The store was given an invalid configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
}

impl StoreError {
    /// A [`StoreError::File`] for `action` on `path`.
    pub(crate) fn file(
        action: &'static str,
        path: impl Into<std::path::PathBuf>,
        source: std::io::Error,
    ) -> Self {
        StoreError::File {
            action,
            path: path.into(),
            source,
        }
    }
}
