//! Per-key state kept in one JSON file that survives restarts.
//!
//! The store behind [`StatePersistence::File`](super::StatePersistence::File)
//! (its tests are in `super::tests`).
//!
//! # What is on disk
//!
//! One file holds a versioned envelope around a map from key to state:
//!
//! ```json
//! {"format":"pmcp-resilience-state","version":1,"kind":"rate_limit",
//!  "saved_at_ms":1767225600000,"entries":{"tool:search":{"tokens":3}}}
//! ```
//!
//! `kind` is chosen by the caller ([`KIND_CIRCUIT_BREAKER`], [`KIND_RATE_LIMIT`]),
//! so a breaker file is never read as limiter state.
//!
//! # Guarantees and choices
//!
//! - **Atomic writes.** A write goes to `<name>.tmp` in the same directory, is
//!   flushed to disk (`sync_all`), then renamed over the file, and the
//!   directory is synced (best effort). A crash at any point leaves either the
//!   old file or the new one, never a mix. A leftover `<name>.tmp` is removed
//!   on the next open.
//! - **One owner at a time.** [`FileStore::open`] takes an exclusive OS lock on
//!   the sidecar `<name>.lock` and refuses with [`StoreError::Locked`] when
//!   another process, or another store in this process, holds it. The file is
//!   not shared: two writers would silently overwrite each other's state. Use
//!   one file per process, or Redis to share state. The lock is released when
//!   the store is dropped or shut down (or its process dies); the `.lock` file
//!   itself stays, as deleting lock files races with the next owner.
//! - **Write policy.** [`FileStore::write_through`] returns once the state is
//!   on disk (for breaker transitions). [`FileStore::update`] only changes
//!   memory; a background task writes pending changes at most once per
//!   [`FileStoreOptions::flush_interval`] (default 1 s), so many updates cost
//!   one write, and a crash loses at most that interval of updates.
//!   [`FileStore::shutdown`] writes what is pending; dropping the store does
//!   the same, best effort, blocking briefly.
//! - **Unreadable files.** A truncated, corrupt, foreign or too-new file is
//!   never overwritten. With [`OnCorrupt::StartEmpty`] (the default) it is
//!   renamed to `<name>.corrupt-<unix-ms>`, a warning is logged and the
//!   [`LoadReport`] says where it went; with [`OnCorrupt::Fail`] it is left
//!   in place and [`FileStore::open`] returns [`StoreError::Corrupt`].
//! - **Stale state.** [`FileStoreOptions::expire_on_load`] takes a predicate
//!   "does this state still matter at `now`"; entries for which it says no
//!   (a breaker whose open time is over, a bucket back at full capacity) are
//!   dropped on load.
//!
//! The file I/O is synchronous and runs on Tokio's blocking pool
//! (`spawn_blocking`); the store must be opened inside a Tokio runtime, where
//! its flusher runs.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::Mutex;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;

use crate::clock::{SharedClock, Timestamp, default_clock};
use crate::error::{ConfigError, StoreError};

/// The `format` field of every state file written by this crate.
pub(crate) const FORMAT_NAME: &str = "pmcp-resilience-state";

/// The newest file format version this build reads and the one it writes.
pub(crate) const FORMAT_VERSION: u64 = 1;

/// The `kind` used for circuit breaker state files.
pub(crate) const KIND_CIRCUIT_BREAKER: &str = "circuit_breaker";

/// The `kind` used for rate limiter state files.
pub(crate) const KIND_RATE_LIMIT: &str = "rate_limit";

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
    /// Leave the file where it is and return [`StoreError::Corrupt`], for
    /// deployments where starting without the saved state is worse than not
    /// starting.
    Fail,
}

/// Decides whether a loaded state still matters at `now`; `false` drops it.
type StillMatters<S> = Arc<dyn Fn(&S, Timestamp) -> bool + Send + Sync>;

/// Settings of a middleware's state file ([`StatePersistence::File`](super::StatePersistence::File)):
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
    flush_interval: Duration,
    on_corrupt: OnCorrupt,
    clock: SharedClock,
    still_matters: Option<StillMatters<S>>,
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

/// Where the state of a freshly opened [`FileStore`] came from.
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

/// What [`FileStore::open`] found, for logs and start-up checks.
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

/// Counters of a [`FileStore`]'s writes.
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

/// A map from key to state `S`, kept in one file that survives restarts.
///
/// See the [module documentation](self) for the format and the guarantees.
pub(crate) struct FileStore<S>
where
    S: Serialize + DeserializeOwned + Clone + Send + 'static,
{
    shared: Arc<Shared<S>>,
    flusher: Option<JoinHandle<()>>,
}

impl<S> fmt::Debug for FileStore<S>
where
    S: Serialize + DeserializeOwned + Clone + Send + 'static,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileStore")
            .field("path", &self.shared.path)
            .field("kind", &self.shared.kind)
            .field("flush_interval", &self.shared.flush_interval)
            .field("stats", &self.stats())
            .finish()
    }
}

impl<S> FileStore<S>
where
    S: Serialize + DeserializeOwned + Clone + Send + 'static,
{
    /// Opens the state file at `path` holding state of `kind`, taking
    /// exclusive use of it, and loads what it holds.
    ///
    /// A missing file gives an empty store. An unreadable file is handled by
    /// [`FileStoreOptions::on_corrupt`]. Fails with [`StoreError::Locked`] if
    /// the file is in use, [`StoreError::Config`] for bad options, and
    /// [`StoreError::File`] if the directory cannot be used. Must be called
    /// inside a Tokio runtime.
    pub fn open(
        path: impl Into<PathBuf>,
        kind: &str,
        options: FileStoreOptions<S>,
    ) -> Result<(Self, LoadReport), StoreError> {
        options.validate()?;
        if kind.trim().is_empty() {
            return Err(ConfigError::invalid(
                "kind",
                "must name the state in the file, e.g. \"circuit_breaker\" or \"rate_limit\"",
            )
            .into());
        }
        let path = path.into();
        if path.file_name().is_none() {
            return Err(ConfigError::invalid(
                "path",
                "must name a file, e.g. /var/lib/my-server/breakers.json",
            )
            .into());
        }
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            StoreError::Other(format!(
                "the file store for {} must be opened inside a Tokio runtime, where its flusher runs",
                path.display()
            ))
        })?;

        let lock_path = sibling(&path, ".lock");
        let lock = acquire_lock(&path, &lock_path)?;

        let temp_path = sibling(&path, ".tmp");
        let removed_stale_temp = fs::remove_file(&temp_path).is_ok();
        if removed_stale_temp {
            tracing::debug!(path = %temp_path.display(), "removed a temporary file left by an interrupted write");
        }

        let now = options.clock.now();
        let (entries, mut report) = load::<S>(&path, kind, &options, now)?;
        report.removed_stale_temp = removed_stale_temp;

        let shared = Arc::new(Shared {
            path,
            temp_path,
            kind: kind.to_owned(),
            clock: options.clock,
            flush_interval: options.flush_interval,
            state: Mutex::new(Entries {
                map: entries,
                generation: 0,
            }),
            disk: Mutex::new(Disk {
                lock: Some(lock),
                #[cfg(test)]
                crash_after_bytes: None,
            }),
            written: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            failed_writes: AtomicU64::new(0),
        });
        let flusher = runtime.spawn(flush_periodically(
            Arc::downgrade(&shared),
            options.flush_interval,
        ));
        Ok((
            FileStore {
                shared,
                flusher: Some(flusher),
            },
            report,
        ))
    }

    /// The state of `key`, if any.
    #[cfg(test)]
    pub fn get(&self, key: &str) -> Option<S> {
        self.shared.state.lock().map.get(key).cloned()
    }

    /// A copy of every entry.
    pub fn entries(&self) -> BTreeMap<String, S> {
        self.shared.state.lock().map.clone()
    }

    /// The number of entries.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.shared.state.lock().map.len()
    }

    /// Whether the store has no entries.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.shared.state.lock().map.is_empty()
    }

    /// Sets the state of `key` in memory; the background flusher writes it
    /// within [`FileStoreOptions::flush_interval`].
    pub fn update(&self, key: impl Into<String>, state: S) {
        self.shared.change(|map| {
            map.insert(key.into(), state);
            true
        });
    }

    /// Removes `key` (written like an [`update`](Self::update)) and returns its state.
    pub fn remove(&self, key: &str) -> Option<S> {
        let mut removed = None;
        self.shared.change(|map| {
            removed = map.remove(key);
            removed.is_some()
        });
        removed
    }

    /// Sets the state of `key` and returns once the file holds it.
    ///
    /// For changes that must not be lost, such as breaker transitions. If the
    /// write fails, memory keeps the new state and the flusher retries it.
    pub async fn write_through(&self, key: impl Into<String>, state: S) -> Result<(), StoreError> {
        self.update(key, state);
        self.flush().await
    }

    /// Writes pending changes now, if there are any.
    pub async fn flush(&self) -> Result<(), StoreError> {
        let shared = Arc::clone(&self.shared);
        tokio::task::spawn_blocking(move || shared.write_pending().map(|_| ()))
            .await
            .map_err(|e| StoreError::Other(format!("the file write task failed: {e}")))?
    }

    /// Stops the flusher, writes pending changes and releases the file for
    /// the next owner.
    pub async fn shutdown(mut self) -> Result<(), StoreError> {
        if let Some(flusher) = self.flusher.take() {
            flusher.abort();
            // Cancelled is the expected outcome; a write it started finishes
            // under the disk lock, which `close` waits for.
            let _ = flusher.await;
        }
        let shared = Arc::clone(&self.shared);
        tokio::task::spawn_blocking(move || shared.close())
            .await
            .map_err(|e| StoreError::Other(format!("the file write task failed: {e}")))?
    }

    /// Counters of the writes so far.
    pub fn stats(&self) -> FileStoreStats {
        FileStoreStats {
            writes: self.shared.writes.load(Ordering::Relaxed),
            failed_writes: self.shared.failed_writes.load(Ordering::Relaxed),
            pending: self.shared.is_pending(),
        }
    }

    /// The longest time an [`update`](Self::update) waits before it is written.
    pub fn flush_interval(&self) -> Duration {
        self.shared.flush_interval
    }

    /// Makes every later write stop after `bytes` bytes of the temporary
    /// file and fail before the rename, as a crash would.
    #[cfg(test)]
    pub(crate) fn crash_writes_after(&self, bytes: usize) {
        self.shared.disk.lock().crash_after_bytes = Some(bytes);
    }
}

impl<S> Drop for FileStore<S>
where
    S: Serialize + DeserializeOwned + Clone + Send + 'static,
{
    fn drop(&mut self) {
        if let Some(flusher) = self.flusher.take() {
            flusher.abort();
        }
        // Best effort: a short blocking write, so an orderly exit that forgot
        // `shutdown` loses nothing.
        if let Err(error) = self.shared.close() {
            tracing::warn!(
                path = %self.shared.path.display(),
                %error,
                "could not write pending state while dropping the file store"
            );
        }
    }
}

struct Entries<S> {
    map: BTreeMap<String, S>,
    /// Counts changes; compared with [`Shared::written`] to know what is pending.
    generation: u64,
}

/// The writing side, locked for the whole of a write so writes never interleave.
struct Disk {
    /// The held OS lock; `None` once the store is closed.
    lock: Option<File>,
    #[cfg(test)]
    crash_after_bytes: Option<usize>,
}

struct Shared<S> {
    path: PathBuf,
    temp_path: PathBuf,
    kind: String,
    clock: SharedClock,
    flush_interval: Duration,
    state: Mutex<Entries<S>>,
    disk: Mutex<Disk>,
    /// The generation the file holds; only raised under the `disk` lock.
    written: AtomicU64,
    writes: AtomicU64,
    failed_writes: AtomicU64,
}

impl<S: Serialize + Clone> Shared<S> {
    fn change(&self, f: impl FnOnce(&mut BTreeMap<String, S>) -> bool) {
        let mut state = self.state.lock();
        if f(&mut state.map) {
            state.generation += 1;
        }
    }

    fn is_pending(&self) -> bool {
        self.state.lock().generation > self.written.load(Ordering::Acquire)
    }

    /// Writes the file if memory has changes it lacks; `Ok(true)` if it wrote.
    fn write_pending(&self) -> Result<bool, StoreError> {
        let mut disk = self.disk.lock();
        self.write_pending_locked(&mut disk)
    }

    fn write_pending_locked(&self, disk: &mut Disk) -> Result<bool, StoreError> {
        if disk.lock.is_none() {
            return Err(StoreError::Other(format!(
                "the file store for {} is shut down; open it again to write",
                self.path.display()
            )));
        }
        // Copy under the state lock, encode outside it: updates are not held
        // up by serialisation.
        let (snapshot, generation) = {
            let state = self.state.lock();
            if state.generation <= self.written.load(Ordering::Acquire) {
                return Ok(false);
            }
            (state.map.clone(), state.generation)
        };
        let result = encode(&self.kind, self.clock.now(), &snapshot).and_then(|bytes| {
            #[cfg(test)]
            if let Some(limit) = disk.crash_after_bytes {
                return simulate_crash(&self.temp_path, &bytes, limit);
            }
            write_atomic(&self.path, &self.temp_path, &bytes)
        });
        match result {
            Ok(()) => {
                self.written.store(generation, Ordering::Release);
                self.writes.fetch_add(1, Ordering::Relaxed);
                Ok(true)
            }
            Err(error) => {
                self.failed_writes.fetch_add(1, Ordering::Relaxed);
                Err(error)
            }
        }
    }

    /// Writes what is pending and releases the OS lock; later writes fail.
    fn close(&self) -> Result<(), StoreError> {
        let mut disk = self.disk.lock();
        if disk.lock.is_none() {
            return Ok(());
        }
        let result = self.write_pending_locked(&mut disk).map(|_| ());
        if let Some(lock) = disk.lock.take() {
            // Closing the file releases the lock too; unlocking first makes
            // the release independent of other handles to the same file.
            let _ = lock.unlock();
        }
        result
    }
}

async fn flush_periodically<S>(shared: Weak<Shared<S>>, every: Duration)
where
    S: Serialize + Clone + Send + 'static,
{
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // Warn once when writes start failing (a full disk would otherwise log
    // every interval); the count is in `FileStoreStats::failed_writes`.
    let mut failing = false;
    loop {
        ticker.tick().await;
        // The store owns the only strong reference between writes: once it
        // is dropped the flusher ends.
        let Some(shared) = shared.upgrade() else {
            return;
        };
        if !shared.is_pending() {
            continue;
        }
        let path = shared.path.clone();
        let error = match tokio::task::spawn_blocking(move || shared.write_pending()).await {
            Ok(Ok(_)) => None,
            Ok(Err(error)) => Some(error.to_string()),
            Err(error) => Some(format!("the file write task failed: {error}")),
        };
        match error {
            None if failing => {
                failing = false;
                tracing::info!(path = %path.display(), "state file writes succeed again");
            }
            None => {}
            Some(error) if !failing => {
                failing = true;
                tracing::warn!(
                    path = %path.display(),
                    %error,
                    "could not write the state file; retrying at every flush"
                );
            }
            Some(error) => {
                tracing::debug!(path = %path.display(), %error, "state file write failed again")
            }
        }
    }
}

/// `path` with `suffix` appended to its file name.
fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(suffix);
    path.with_file_name(name)
}

fn acquire_lock(path: &Path, lock_path: &Path) -> Result<File, StoreError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(lock_path)
        .map_err(|e| {
            StoreError::file(
                "create the lock file (does the directory exist and is it writable?)",
                lock_path,
                e,
            )
        })?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(TryLockError::WouldBlock) => Err(StoreError::Locked {
            path: path.to_owned(),
            lock_path: lock_path.to_owned(),
        }),
        Err(TryLockError::Error(e)) => Err(StoreError::file("lock", lock_path, e)),
    }
}

#[derive(Serialize)]
struct EnvelopeOut<'a, S> {
    format: &'a str,
    version: u64,
    kind: &'a str,
    saved_at_ms: u64,
    entries: &'a BTreeMap<String, S>,
}

/// The fields that say whether a file is ours; read before the entries so a
/// foreign or newer file is named as such rather than as a type mismatch.
#[derive(Deserialize)]
struct Header {
    format: Option<String>,
    version: Option<u64>,
    kind: Option<String>,
}

#[derive(Deserialize)]
struct EnvelopeIn<S> {
    #[serde(default)]
    saved_at_ms: u64,
    entries: BTreeMap<String, S>,
}

fn encode<S: Serialize>(
    kind: &str,
    now: Timestamp,
    entries: &BTreeMap<String, S>,
) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(&EnvelopeOut {
        format: FORMAT_NAME,
        version: FORMAT_VERSION,
        kind,
        saved_at_ms: now.as_millis(),
        entries,
    })
    .map_err(|e| StoreError::Other(format!("could not serialise the state: {e}")))
}

fn decode<S: DeserializeOwned>(
    bytes: &[u8],
    expected_kind: &str,
) -> Result<EnvelopeIn<S>, FileProblem> {
    let header: Header = serde_json::from_slice(bytes).map_err(|e| match e.classify() {
        serde_json::error::Category::Eof => FileProblem::Truncated,
        serde_json::error::Category::Data => FileProblem::Foreign,
        _ => FileProblem::NotJson(e.to_string()),
    })?;
    let (Some(format), Some(version)) = (header.format, header.version) else {
        return Err(FileProblem::Foreign);
    };
    if format != FORMAT_NAME || version == 0 {
        return Err(FileProblem::Foreign);
    }
    if version > FORMAT_VERSION {
        return Err(FileProblem::TooNew {
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    let found = header.kind.unwrap_or_default();
    if found != expected_kind {
        return Err(FileProblem::WrongKind {
            expected: expected_kind.to_owned(),
            found,
        });
    }
    serde_json::from_slice(bytes).map_err(|e| FileProblem::BadEntries(e.to_string()))
}

fn load<S: DeserializeOwned>(
    path: &Path,
    kind: &str,
    options: &FileStoreOptions<S>,
    now: Timestamp,
) -> Result<(BTreeMap<String, S>, LoadReport), StoreError> {
    let mut report = LoadReport {
        path: path.to_owned(),
        outcome: LoadOutcome::NoFile,
        loaded: 0,
        expired: 0,
        removed_stale_temp: false,
    };
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((BTreeMap::new(), report)),
        Err(e) => return Err(StoreError::file("read the state file", path, e)),
    };
    match decode::<S>(&bytes, kind) {
        Ok(envelope) => {
            let mut entries = envelope.entries;
            let before = entries.len();
            if let Some(still_matters) = &options.still_matters {
                entries.retain(|_, state| still_matters(state, now));
            }
            report.outcome = LoadOutcome::Loaded {
                saved_at: Timestamp::from_millis(envelope.saved_at_ms),
            };
            report.loaded = entries.len();
            report.expired = before - entries.len();
            Ok((entries, report))
        }
        Err(problem) => match options.on_corrupt {
            OnCorrupt::Fail => Err(StoreError::Corrupt(format!(
                "{}: {problem}. The file was left as it is: move it away or delete it to start \
                 with empty state, or use OnCorrupt::StartEmpty to have it set aside automatically",
                path.display()
            ))),
            OnCorrupt::StartEmpty => {
                let moved_to = set_aside(path, now)?;
                tracing::warn!(
                    path = %path.display(),
                    moved_to = %moved_to.display(),
                    %problem,
                    "state file could not be loaded; it was set aside and the store starts empty"
                );
                report.outcome = LoadOutcome::SetAside { problem, moved_to };
                Ok((BTreeMap::new(), report))
            }
        },
    }
}

/// Renames an unreadable file to `<name>.corrupt-<unix-ms>`, never over an existing file.
fn set_aside(path: &Path, now: Timestamp) -> Result<PathBuf, StoreError> {
    let base = format!(".corrupt-{}", now.as_millis());
    let mut target = sibling(path, &base);
    let mut n = 1;
    while target.exists() {
        target = sibling(path, &format!("{base}-{n}"));
        n += 1;
    }
    fs::rename(path, &target)
        .map_err(|e| StoreError::file("set aside the unreadable state file", path, e))?;
    sync_parent(path);
    Ok(target)
}

/// Replaces `path` with `bytes` so that a crash leaves the old or the new file, whole.
fn write_atomic(path: &Path, temp_path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let result = (|| {
        let mut file = create_private(temp_path)
            .map_err(|e| StoreError::file("create the temporary file", temp_path, e))?;
        file.write_all(bytes)
            .map_err(|e| StoreError::file("write the temporary file", temp_path, e))?;
        file.sync_all()
            .map_err(|e| StoreError::file("flush to disk the temporary file", temp_path, e))?;
        drop(file);
        fs::rename(temp_path, path)
            .map_err(|e| StoreError::file("rename the temporary file over", path, e))
    })();
    if result.is_err() {
        // The target is untouched; do not leave a half-written file behind.
        let _ = fs::remove_file(temp_path);
    }
    result?;
    sync_parent(path);
    Ok(())
}

/// Writes only the first `limit` bytes to the temporary file and stops before
/// the rename, leaving what a crash would.
#[cfg(test)]
fn simulate_crash(temp_path: &Path, bytes: &[u8], limit: usize) -> Result<(), StoreError> {
    let mut file = create_private(temp_path)?;
    file.write_all(&bytes[..limit.min(bytes.len())])?;
    Err(StoreError::Other("simulated crash before rename".into()))
}

/// Creates (or truncates) a file readable only by its owner: keys may hold session ids.
fn create_private(path: &Path) -> io::Result<File> {
    let mut options = OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    options.open(path)
}

/// Makes a rename in `path`'s directory durable. Best effort: not every
/// platform can sync a directory, and the data itself is already on disk.
fn sync_parent(path: &Path) {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    if let Ok(dir) = File::open(dir) {
        let _ = dir.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options() -> FileStoreOptions<u32> {
        FileStoreOptions::default()
    }

    #[tokio::test]
    async fn a_crash_before_the_rename_leaves_the_previous_file_loadable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let (store, _) = FileStore::open(&path, KIND_RATE_LIMIT, options()).unwrap();
        store.write_through("a", 1).await.unwrap();
        let before = fs::read(&path).unwrap();

        store.crash_writes_after(20);
        let err = store.write_through("a", 2).await.unwrap_err();
        assert!(err.to_string().contains("simulated crash"), "{err}");
        drop(store); // its best-effort write "crashes" too

        assert_eq!(fs::read(&path).unwrap(), before, "the file was not touched");
        let temp = sibling(&path, ".tmp");
        assert_eq!(
            fs::read(&temp).unwrap().len(),
            20,
            "a partial temp file is left"
        );

        let (store, report) = FileStore::<u32>::open(&path, KIND_RATE_LIMIT, options()).unwrap();
        assert!(report.removed_stale_temp);
        assert!(matches!(report.outcome, LoadOutcome::Loaded { .. }));
        assert_eq!(store.get("a"), Some(1));
        assert!(!temp.exists());
    }

    #[tokio::test]
    async fn a_failed_write_keeps_the_change_pending_and_is_retried() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let (store, _) = FileStore::open(&path, KIND_RATE_LIMIT, options()).unwrap();
        store.crash_writes_after(0);
        assert!(store.write_through("a", 7).await.is_err());
        assert!(store.stats().pending);
        assert_eq!(store.stats().failed_writes, 1);

        store.shared.disk.lock().crash_after_bytes = None;
        store.flush().await.unwrap();
        assert!(!store.stats().pending);
        drop(store);
        let (store, _) = FileStore::<u32>::open(&path, KIND_RATE_LIMIT, options()).unwrap();
        assert_eq!(store.get("a"), Some(7));
    }

    #[tokio::test(start_paused = true)]
    async fn the_flusher_retries_a_failed_write_at_the_next_interval() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let every = Duration::from_millis(200);
        let (store, _) =
            FileStore::open(&path, KIND_RATE_LIMIT, options().flush_interval(every)).unwrap();
        store.crash_writes_after(0);
        store.update("a", 5);
        tokio::time::sleep(every + Duration::from_millis(10)).await;
        assert_eq!(store.stats().failed_writes, 1);
        assert!(store.stats().pending);
        assert!(!path.exists());

        store.shared.disk.lock().crash_after_bytes = None;
        tokio::time::sleep(every).await;
        assert_eq!(store.stats().writes, 1);
        assert!(!store.stats().pending);
        assert!(fs::read_to_string(&path).unwrap().contains(r#""a":5"#));
    }

    #[test]
    fn sibling_appends_to_the_file_name() {
        assert_eq!(
            sibling(Path::new("/x/state.json"), ".lock"),
            PathBuf::from("/x/state.json.lock")
        );
        assert_eq!(
            sibling(Path::new("state.json"), ".tmp"),
            PathBuf::from("state.json.tmp")
        );
    }
}
