//! Mirrors a middleware's in-memory registry into a [`FileStore`].
//!
//! The request path stays synchronous and in memory: it only raises a
//! `dirty` flag (one relaxed load, and a store the first time). A background
//! task wakes every flush interval and, if the flag is up, takes a snapshot
//! of the registry (only the entries that still matter), puts it into the
//! store and writes the file. The file is rewritten whole on every write
//! anyway, so reading the whole registry once per interval costs the same
//! order as the write itself, and nothing is serialised per request.
//!
//! Changes that must not wait for the next interval (breaker transitions)
//! go through [`FileBacking::write_through`].

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::Mutex;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::RwLock;
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;

use super::file::{FileStore, FileStoreOptions, LoadReport};
use crate::error::{ConfigError, StoreError};

/// Takes a snapshot of the entries worth keeping; `None` once the registry is gone.
pub(crate) type Snapshot<S> = Box<dyn Fn() -> Option<BTreeMap<String, S>> + Send + Sync>;

/// A freshly opened backing, the entries it loaded, and what the load found.
pub(crate) type Opened<S> = (Arc<FileBacking<S>>, BTreeMap<String, S>, LoadReport);

/// A [`FileStore`] kept in step with a registry.
pub(crate) struct FileBacking<S>
where
    S: Serialize + DeserializeOwned + Clone + PartialEq + Send + Sync + 'static,
{
    /// `None` once shut down. Write-throughs share it; a snapshot sync holds
    /// it exclusively, so a transition written through is never overwritten
    /// by an older snapshot.
    store: RwLock<Option<FileStore<S>>>,
    dirty: AtomicBool,
    every: Duration,
    task: Mutex<Option<JoinHandle<()>>>,
    snapshot: Mutex<Option<Arc<Snapshot<S>>>>,
    warned: AtomicBool,
}

impl<S> fmt::Debug for FileBacking<S>
where
    S: Serialize + DeserializeOwned + Clone + PartialEq + Send + Sync + 'static,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileBacking")
            .field("every", &self.every)
            .field("dirty", &self.dirty.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl<S> FileBacking<S>
where
    S: Serialize + DeserializeOwned + Clone + PartialEq + Send + Sync + 'static,
{
    /// Opens the file; fails with a [`ConfigError::Store`] that says what to
    /// change (no runtime, file in use, unreadable file under `OnCorrupt::Fail`).
    pub(crate) fn open(
        path: &std::path::Path,
        kind: &str,
        options: FileStoreOptions<S>,
    ) -> Result<Opened<S>, ConfigError> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(ConfigError::Store(format!(
                "file persistence ({}) needs a Tokio runtime: call build() inside one \
                 (for example in `#[tokio::main]`), where the file is flushed in the background",
                path.display()
            )));
        }
        let (store, report) = FileStore::open(path, kind, options)?;
        let every = store.flush_interval();
        let entries = store.entries();
        let backing = FileBacking {
            store: RwLock::new(Some(store)),
            dirty: AtomicBool::new(false),
            every,
            task: Mutex::new(None),
            snapshot: Mutex::new(None),
            warned: AtomicBool::new(false),
        };
        Ok((Arc::new(backing), entries, report))
    }

    /// Starts the background sync: every flush interval, if something
    /// changed, `snapshot` replaces the store's contents and the file is written.
    pub(crate) fn start(self: &Arc<Self>, snapshot: Snapshot<S>) {
        let snapshot = Arc::new(snapshot);
        *self.snapshot.lock() = Some(Arc::clone(&snapshot));
        let weak: Weak<Self> = Arc::downgrade(self);
        let every = self.every;
        let handle = tokio::spawn(async move {
            let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
            loop {
                ticker.tick().await;
                let Some(this) = weak.upgrade() else {
                    return;
                };
                if !this.dirty.swap(false, Ordering::AcqRel) {
                    continue;
                }
                let result = this.sync_and_flush().await;
                this.note(result);
            }
        });
        *self.task.lock() = Some(handle);
    }

    /// Notes that the registry changed (the request path: keep it cheap).
    #[inline]
    pub(crate) fn mark_dirty(&self) {
        if !self.dirty.load(Ordering::Relaxed) {
            self.dirty.store(true, Ordering::Relaxed);
        }
    }

    /// Writes `state` for `key` and returns once it is on disk.
    pub(crate) async fn write_through(&self, key: &str, state: S) -> Result<(), StoreError> {
        let guard = self.store.read().await;
        match guard.as_ref() {
            Some(store) => store.write_through(key, state).await,
            None => Ok(()),
        }
    }

    /// Like [`write_through`](Self::write_through) from code that cannot
    /// wait: a task writes it when a runtime is at hand; otherwise the
    /// store's own flusher writes it within its interval.
    pub(crate) fn write_detached(self: &Arc<Self>, key: &str, state: S) {
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                let this = Arc::clone(self);
                let key = key.to_owned();
                handle.spawn(async move {
                    let result = this.write_through(&key, state).await;
                    this.note(result);
                });
            }
            Err(_) => {
                if let Ok(guard) = self.store.try_read()
                    && let Some(store) = guard.as_ref()
                {
                    store.update(key, state);
                }
            }
        }
    }

    /// Puts the current snapshot into the store and writes the file now.
    pub(crate) async fn sync_and_flush(&self) -> Result<(), StoreError> {
        let guard = self.store.write().await;
        let Some(store) = guard.as_ref() else {
            return Ok(());
        };
        self.sync_into(store);
        let guard = guard.downgrade();
        match guard.as_ref() {
            Some(store) => store.flush().await,
            None => Ok(()),
        }
    }

    /// Writes everything and releases the file for the next owner; later
    /// changes stay in memory only.
    pub(crate) async fn shutdown(&self) -> Result<(), StoreError> {
        if let Some(task) = self.task.lock().take() {
            task.abort();
        }
        let mut guard = self.store.write().await;
        let Some(store) = guard.take() else {
            return Ok(());
        };
        self.sync_into(&store);
        store.shutdown().await
    }

    /// Best effort for the owner's `Drop` (where its snapshot closure can no
    /// longer reach it): puts `entries` into the store if no write is
    /// running; the store's own `Drop` then writes them.
    pub(crate) fn sync_now(&self, entries: BTreeMap<String, S>) {
        if let Ok(guard) = self.store.try_write()
            && let Some(store) = guard.as_ref()
        {
            replace(store, entries);
        }
    }

    fn sync_into(&self, store: &FileStore<S>) {
        let snapshot = self.snapshot.lock().clone();
        if let Some(entries) = snapshot.and_then(|take| take()) {
            replace(store, entries);
        }
    }

    /// Logs the first failure of a run of failures (a full disk would
    /// otherwise log every interval).
    pub(crate) fn note(&self, result: Result<(), StoreError>) {
        match result {
            Ok(()) => {
                if self.warned.swap(false, Ordering::Relaxed) {
                    tracing::info!("state file writes succeed again");
                }
            }
            Err(error) => {
                // Try again at the next interval.
                self.dirty.store(true, Ordering::Relaxed);
                if !self.warned.swap(true, Ordering::Relaxed) {
                    tracing::warn!(%error, "could not write the state file; retrying every flush interval");
                } else {
                    tracing::debug!(%error, "state file write failed again");
                }
            }
        }
    }
}

/// Makes the store hold exactly `entries`, touching only what differs.
fn replace<S>(store: &FileStore<S>, entries: BTreeMap<String, S>)
where
    S: Serialize + DeserializeOwned + Clone + PartialEq + Send + 'static,
{
    let current = store.entries();
    for key in current.keys() {
        if !entries.contains_key(key) {
            store.remove(key);
        }
    }
    for (key, state) in entries {
        if current.get(&key) != Some(&state) {
            store.update(key, state);
        }
    }
}

impl<S> Drop for FileBacking<S>
where
    S: Serialize + DeserializeOwned + Clone + PartialEq + Send + Sync + 'static,
{
    fn drop(&mut self) {
        if let Some(task) = self.task.get_mut().take() {
            task.abort();
        }
        // The store (dropped right after) writes what is pending and
        // releases the file.
    }
}
