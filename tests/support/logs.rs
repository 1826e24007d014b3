//! `tracing` output captured in memory, for tests that check what the crate
//! says. Included by path (`#[path = "support/logs.rs"] mod logs;`), so that
//! tests without the server helpers can use it.

#![allow(dead_code)]

use std::sync::Arc;

use parking_lot::Mutex;

/// Every line written, kept.
#[derive(Clone, Default)]
pub struct Lines(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Lines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Lines {
    /// Sets a subscriber writing here, at `level` and above, for as long as
    /// the returned guard lives (on this thread).
    pub fn capture(&self, level: tracing::Level) -> tracing::subscriber::DefaultGuard {
        let writer = self.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .with_max_level(level)
            .finish();
        tracing::subscriber::set_default(subscriber)
    }

    /// All that was written.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock()).into_owned()
    }

    /// The lines containing `needle`.
    pub fn containing(&self, needle: &str) -> Vec<String> {
        self.text()
            .lines()
            .filter(|l| l.contains(needle))
            .map(str::to_owned)
            .collect()
    }

    /// How many lines contain `needle`.
    pub fn count(&self, needle: &str) -> usize {
        self.containing(needle).len()
    }
}

/// Runs `f` with DEBUG output captured; returns its result and the output.
pub fn capture_debug<R>(f: impl FnOnce() -> R) -> (R, String) {
    let lines = Lines::default();
    let result = {
        let _guard = lines.capture(tracing::Level::DEBUG);
        f()
    };
    (result, lines.text())
}
