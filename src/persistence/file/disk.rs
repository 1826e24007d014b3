//! What is on disk: the versioned envelope, the owner's lock file and
//! atomic writes.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::clock::Timestamp;
use crate::error::StoreError;

use super::options::{FileProblem, FileStoreOptions, LoadOutcome, LoadReport, OnCorrupt};

/// The `format` field of every state file written by this crate.
pub(crate) const FORMAT_NAME: &str = "pmcp-resilience-state";

/// The newest file format version this build reads and the one it writes.
pub(crate) const FORMAT_VERSION: u64 = 1;

/// The `kind` used for circuit breaker state files.
pub(crate) const KIND_CIRCUIT_BREAKER: &str = "circuit_breaker";

/// The `kind` used for rate limiter state files.
pub(crate) const KIND_RATE_LIMIT: &str = "rate_limit";

pub(super) fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(suffix);
    path.with_file_name(name)
}

pub(super) fn acquire_lock(path: &Path, lock_path: &Path) -> Result<File, StoreError> {
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
pub(super) struct EnvelopeOut<'a, S> {
    format: &'a str,
    version: u64,
    kind: &'a str,
    saved_at_ms: u64,
    entries: &'a BTreeMap<String, S>,
}

/// The fields that say whether a file is ours; read before the entries so a
/// foreign or newer file is named as such rather than as a type mismatch.
#[derive(Deserialize)]
pub(super) struct Header {
    format: Option<String>,
    version: Option<u64>,
    kind: Option<String>,
}

#[derive(Deserialize)]
pub(super) struct EnvelopeIn<S> {
    #[serde(default)]
    saved_at_ms: u64,
    entries: BTreeMap<String, S>,
}

pub(super) fn encode<S: Serialize>(
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

pub(super) fn decode<S: DeserializeOwned>(
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

pub(super) fn load<S: DeserializeOwned>(
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
pub(super) fn set_aside(path: &Path, now: Timestamp) -> Result<PathBuf, StoreError> {
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
pub(super) fn write_atomic(path: &Path, temp_path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
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
pub(super) fn simulate_crash(
    temp_path: &Path,
    bytes: &[u8],
    limit: usize,
) -> Result<(), StoreError> {
    let mut file = create_private(temp_path)?;
    file.write_all(&bytes[..limit.min(bytes.len())])?;
    Err(StoreError::Other("simulated crash before rename".into()))
}

/// Creates (or truncates) a file readable only by its owner: keys may hold session ids.
pub(super) fn create_private(path: &Path) -> io::Result<File> {
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
pub(super) fn sync_parent(path: &Path) {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    if let Ok(dir) = File::open(dir) {
        let _ = dir.sync_all();
    }
}
