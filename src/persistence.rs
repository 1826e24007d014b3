//! Where breaker and limiter state lives.
//!
//! [`StatePersistence::Memory`] is the embedded default: state lives in the
//! process and is lost on restart.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use crate::circuit_breaker::CircuitBreakerStateStore;

/// Where a middleware keeps its per-key state.
#[derive(Clone, Default)]
#[non_exhaustive]
pub enum StatePersistence {
    /// In memory only: fast, lost on restart, private to the process.
    #[default]
    Memory,
    /// In a file, written atomically, read back on start.
    File(PathBuf),
    /// In a store of your own (circuit breakers only).
    Custom(Arc<dyn CircuitBreakerStateStore>),
}

impl fmt::Debug for StatePersistence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StatePersistence::Memory => f.write_str("Memory"),
            StatePersistence::File(path) => f.debug_tuple("File").field(path).finish(),
            StatePersistence::Custom(_) => f.write_str("Custom(..)"),
        }
    }
}
