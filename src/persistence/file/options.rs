//! What a file store is told (its options) and what it reports (its
//! load and its writes).

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::clock::{SharedClock, Timestamp, default_clock};
use crate::error::ConfigError;

use super::disk::FORMAT_NAME;

/// What a middleware does at `build()` with a state file it cannot read.
///
/// ```
/// use pmcp_resilience::persistence::{FileStoreOptions, OnCorrupt};
/// use pmcp_resilience::{CircuitBreakerMiddleware, StatePersistence};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let dir = tempfile::tempdir()?;
/// let path = dir.path().join("breakers.json");
/// std::fs::write(&path, b"{ not json")?;
/// let strict = CircuitBreakerMiddleware::builder()
///     .persistence(StatePersistence::File(path.clone()))
///     .file_options(FileStoreOptions::default().on_corrupt(OnCorrupt::Fail))
///     .build();
/// assert!(strict.is_err()); // the file is left where it is
/// let lenient = CircuitBreakerMiddleware::builder() // OnCorrupt::StartEmpty, the default
///     .persistence(StatePersistence::File(path))
///     .build();
/// assert!(lenient.is_ok()); // the file was set aside as breakers.json.corrupt-<ms>
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum OnCorrupt {
    /// Rename the file to `<name>.corrupt-<unix-ms>`, log a warning and start
    /// with empty state; the warning says where the file went.
    #[default]
    StartEmpty,
    /// Leave the file where it is and return [`StoreError::Corrupt`](crate::StoreError::Corrupt), for
    /// deployments where starting without the saved state is worse than not
    /// starting.
    Fail,
}

/// Decides whether a loaded state still matters at `now`; `false` drops it.
type StillMatters<S> = Arc<dyn Fn(&S, Timestamp) -> bool + Send + Sync>;

/// Settings of a middleware's state file ([`StatePersistence::File`](crate::StatePersistence::File)):
/// how often it writes and what it does with an unreadable file. Give them
/// to the builders' `file_options(..)`.
///
/// The defaults: a 1 s flush interval and [`OnCorrupt::StartEmpty`]. (The
/// middleware sets the clock and which loaded entries are stale itself.)
///
/// ```
/// use pmcp_resilience::persistence::{FileStoreOptions, OnCorrupt};
/// use pmcp_resilience::{ConfigError, RateLimitMiddleware, StatePersistence};
/// use std::time::Duration;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let options = FileStoreOptions::default()
///     .flush_interval(Duration::from_millis(250)) // a crash loses at most 250 ms
///     .on_corrupt(OnCorrupt::Fail); // refuse to start on an unreadable file
/// assert!(options.validate().is_ok());
/// let dir = tempfile::tempdir()?;
/// let limiter = RateLimitMiddleware::builder()
///     .persistence(StatePersistence::File(dir.path().join("limits.json")))
///     .file_options(options)
///     .build()?;
/// # drop(limiter);
/// let never = FileStoreOptions::<()>::default().flush_interval(Duration::ZERO);
/// assert!(matches!(never.validate(), Err(ConfigError::Invalid { field: "flush_interval", .. })));
/// # Ok(())
/// # }
/// ```
pub struct FileStoreOptions<S> {
    pub(super) flush_interval: Duration,
    pub(super) on_corrupt: OnCorrupt,
    pub(super) clock: SharedClock,
    pub(super) still_matters: Option<StillMatters<S>>,
}

impl<S> Default for FileStoreOptions<S> {
    fn default() -> Self {
        FileStoreOptions {
            flush_interval: Duration::from_secs(1),
            on_corrupt: OnCorrupt::default(),
            clock: default_clock(),
            still_matters: None,
        }
    }
}

impl<S> Clone for FileStoreOptions<S> {
    fn clone(&self) -> Self {
        FileStoreOptions {
            flush_interval: self.flush_interval,
            on_corrupt: self.on_corrupt,
            clock: Arc::clone(&self.clock),
            still_matters: self.still_matters.clone(),
        }
    }
}

impl<S> fmt::Debug for FileStoreOptions<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileStoreOptions")
            .field("flush_interval", &self.flush_interval)
            .field("on_corrupt", &self.on_corrupt)
            .field("clock", &self.clock)
            .field("expire_on_load", &self.still_matters.is_some())
            .finish()
    }
}

/// The longest flush interval: 24 hours. The flusher's timer adds the
/// interval to the current instant, which cannot hold any `Duration`.
pub const MAX_FLUSH_INTERVAL: Duration = Duration::from_secs(24 * 60 * 60);

impl<S> FileStoreOptions<S> {
    /// Sets the longest time a change waits before it is written (breaker
    /// transitions are written at once): the most a crash can lose (default 1 s; above zero and at
    /// most [`MAX_FLUSH_INTERVAL`], 24 h).
    pub fn flush_interval(mut self, every: Duration) -> Self {
        self.flush_interval = every;
        self
    }

    /// Sets what happens to a file that cannot be read (default [`OnCorrupt::StartEmpty`]).
    pub fn on_corrupt(mut self, policy: OnCorrupt) -> Self {
        self.on_corrupt = policy;
        self
    }

    /// Sets the clock that gives `now` for expiry and the file's `saved_at_ms`.
    pub(crate) fn clock(mut self, clock: SharedClock) -> Self {
        self.clock = clock;
        self
    }

    /// Drops loaded entries for which `still_matters(state, now)` is `false`.
    ///
    /// Without it every loaded entry is kept.
    pub(crate) fn expire_on_load(
        mut self,
        still_matters: impl Fn(&S, Timestamp) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.still_matters = Some(Arc::new(still_matters));
        self
    }

    /// Checks the settings, as `build()` does: a flush interval
    /// above zero and at most [`MAX_FLUSH_INTERVAL`].
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.flush_interval.is_zero() {
            return Err(ConfigError::invalid(
                "flush_interval",
                "must be greater than zero; it bounds how much state a crash can lose (1s is a good start)",
            ));
        }
        if self.flush_interval > MAX_FLUSH_INTERVAL {
            return Err(ConfigError::invalid(
                "flush_interval",
                format!(
                    "must be at most 24 h, not {:?}; it bounds how much state a crash can lose",
                    self.flush_interval
                ),
            ));
        }
        Ok(())
    }
}

/// Why a state file could not be loaded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum FileProblem {
    /// The file is empty or ends in the middle of its JSON.
    #[error("the file is empty or cut short (truncated)")]
    Truncated,
    /// The file is not JSON.
    #[error("the file is not valid JSON ({0})")]
    NotJson(String),
    /// The file is JSON but not a state file of this crate.
    #[error("the file is not a `{FORMAT_NAME}` file of a supported version")]
    Foreign,
    /// The file holds state of another kind (e.g. a breaker file read as limiter state).
    #[error("the file holds `{found}` state, but `{expected}` state was asked for")]
    WrongKind {
        /// The kind the caller asked for.
        expected: String,
        /// The kind in the file.
        found: String,
    },
    /// The file was written by a newer version of this crate.
    #[error(
        "the file has format version {found}, newer than version {supported} that this build reads; \
         upgrade pmcp-resilience or point this build at another file"
    )]
    TooNew {
        /// The version in the file.
        found: u64,
        /// The newest version this build reads.
        supported: u64,
    },
    /// The envelope is fine but its entries do not fit the state type.
    #[error("the entries do not match the expected state type ({0})")]
    BadEntries(String),
}

/// Where the state of a freshly opened [`FileStore`](super::FileStore) came from.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub(crate) enum LoadOutcome {
    /// There was no file: the store starts empty and creates it on first write.
    NoFile,
    /// The file was read.
    Loaded {
        /// When the file was written, per its `saved_at_ms`.
        saved_at: Timestamp,
    },
    /// The file could not be read and was renamed to `moved_to`; the store
    /// starts empty ([`OnCorrupt::StartEmpty`]).
    SetAside {
        /// What was wrong with it.
        problem: FileProblem,
        /// Where the unreadable file is now.
        moved_to: PathBuf,
    },
}

/// What [`FileStore::open`](super::FileStore::open) found, for logs and start-up checks.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub(crate) struct LoadReport {
    /// The state file.
    pub path: PathBuf,
    /// Whether the file was missing, read, or set aside.
    pub outcome: LoadOutcome,
    /// Entries kept.
    pub loaded: usize,
    /// Entries dropped because they no longer mattered ([`FileStoreOptions::expire_on_load`]).
    pub expired: usize,
    /// Whether a temporary file left by an interrupted write was removed.
    pub removed_stale_temp: bool,
}

/// Counters of a [`FileStore`](super::FileStore)'s writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub(crate) struct FileStoreStats {
    /// Successful writes of the file.
    pub writes: u64,
    /// Writes that failed (each is retried at the next flush).
    pub failed_writes: u64,
    /// Whether memory holds changes not yet on disk.
    pub pending: bool,
}
