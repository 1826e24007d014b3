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

mod disk;
mod options;

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{self, File};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::Mutex;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;

use crate::clock::SharedClock;
use crate::error::{ConfigError, StoreError};

use disk::*;
pub(crate) use disk::{KIND_CIRCUIT_BREAKER, KIND_RATE_LIMIT};
#[cfg(test)]
pub(crate) use options::{FileProblem, LoadOutcome};
pub use options::{FileStoreOptions, MAX_FLUSH_INTERVAL, OnCorrupt};
pub(crate) use options::{FileStoreStats, LoadReport};

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

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

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
