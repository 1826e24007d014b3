//! Where breaker and limiter state lives.
//!
//! [`StatePersistence::Memory`] is the embedded default: state lives in the
//! process and is lost on restart.

use std::path::PathBuf;

/// Where a middleware keeps its per-key state.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub enum StatePersistence {
    /// In memory only: fast, lost on restart, private to the process.
    #[default]
    Memory,
    /// In a file, written atomically, read back on start.
    File(PathBuf),
}
