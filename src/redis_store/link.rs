//! The connection to Redis, its timeouts, and the store's mode: normal, or
//! degraded under the failure policy (logged once per change).

use std::future::Future;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::Instant;

use parking_lot::Mutex;

use super::conn::{Conn, Target};
use super::options::{RedisHealth, RedisOptions, StoreMode};
use crate::clock::duration_nanos;
use crate::error::{ConfigError, StoreError};
use crate::metrics::{DurationHistogram, StoreReport};

/// One lazily created, self-reconnecting connection plus the store's health.
pub(crate) struct Link {
    pub(crate) target: Target,
    conn: Mutex<Option<Conn>>,
    pub(crate) options: RedisOptions,
    /// `"limiter"` or `"breaker"`, for the log lines.
    store: &'static str,
    origin: Instant,
    /// Until this many nanoseconds after `origin`, calls skip Redis.
    down_until: AtomicU64,
    mode: AtomicU8,
    errors: AtomicU64,
    round_trips: AtomicU64,
    degraded: AtomicU64,
    pub(crate) cached_denials: AtomicU64,
    /// Round-trip time of calls that reached Redis.
    latency: DurationHistogram,
}

impl Link {
    pub(crate) fn new(target: Target, options: RedisOptions, store: &'static str) -> Self {
        Link {
            target,
            conn: Mutex::new(None),
            options,
            store,
            origin: Instant::now(),
            down_until: AtomicU64::new(0),
            mode: AtomicU8::new(StoreMode::Normal.to_u8()),
            errors: AtomicU64::new(0),
            round_trips: AtomicU64::new(0),
            degraded: AtomicU64::new(0),
            latency: DurationHistogram::new(),
            cached_denials: AtomicU64::new(0),
        }
    }

    fn elapsed(&self) -> u64 {
        duration_nanos(self.origin.elapsed())
    }

    fn mode(&self) -> StoreMode {
        StoreMode::from_u8(self.mode.load(Ordering::Relaxed))
    }

    /// The store as the unified metrics see it: kind, current mode, latency
    /// and decisions taken without Redis.
    pub(crate) fn store_report(&self) -> StoreReport {
        StoreReport::new("redis", self.mode().label())
            .with_latency(self.latency.snapshot())
            .with_degraded_decisions(self.degraded.load(Ordering::Relaxed))
    }

    pub(crate) fn health(&self) -> RedisHealth {
        RedisHealth {
            mode: self.mode(),
            store_errors: self.errors.load(Ordering::Relaxed),
            round_trips: self.round_trips.load(Ordering::Relaxed),
            degraded_decisions: self.degraded.load(Ordering::Relaxed),
            cached_denials: self.cached_denials.load(Ordering::Relaxed),
        }
    }

    /// Counts one decision taken without Redis.
    pub(crate) fn count_degraded(&self) {
        self.degraded.fetch_add(1, Ordering::Relaxed);
    }

    /// The connection, created on first use without waiting for it.
    fn connection(&self) -> Result<Conn, StoreError> {
        let mut slot = self.conn.lock();
        if let Some(conn) = slot.as_ref() {
            return Ok(conn.clone());
        }
        let o = &self.options;
        let conn = self
            .target
            .connect_lazily(o.connect_timeout, o.call_timeout, o.retry_interval)
            .map_err(|e| StoreError::Unavailable(format!("redis connection: {e}")))?;
        *slot = Some(conn.clone());
        Ok(conn)
    }

    /// Runs one call on Redis within the call timeout, recording the outcome.
    /// While Redis is known to be down (for the retry interval after a
    /// failure), fails at once without a round trip.
    pub(crate) async fn call<T, F, Fut>(&self, f: F) -> Result<T, StoreError>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        if self.elapsed() < self.down_until.load(Ordering::Relaxed) {
            return Err(StoreError::Unavailable(
                "redis failed recently; waiting for the retry interval".into(),
            ));
        }
        let conn = self.connection()?;
        self.round_trips.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        match tokio::time::timeout(self.options.call_timeout, f(conn)).await {
            Ok(Ok(v)) => {
                self.latency.record(started.elapsed());
                self.answered();
                Ok(v)
            }
            Ok(Err(e)) => {
                let unreachable = e.is_io_error()
                    || e.is_connection_dropped()
                    || e.is_connection_refusal()
                    || e.is_timeout();
                let error = StoreError::Unavailable(format!("redis: {e}"));
                self.failed(&error, unreachable);
                Err(error)
            }
            Err(_) => {
                let error = StoreError::Unavailable(format!(
                    "redis did not answer within the call timeout ({:?})",
                    self.options.call_timeout
                ));
                self.failed(&error, true);
                Err(error)
            }
        }
    }

    /// Redis answered: back to normal, said once.
    fn answered(&self) {
        let was = self.mode.swap(StoreMode::Normal.to_u8(), Ordering::Relaxed);
        if was != StoreMode::Normal.to_u8() {
            tracing::info!(
                store = self.store,
                prefix = %self.options.key_prefix,
                "redis answers again: decisions are shared by the fleet again"
            );
        }
    }

    fn failed(&self, error: &StoreError, unreachable: bool) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let degraded = self.options.failure_policy.degraded_mode();
        let was = self.mode.swap(degraded.to_u8(), Ordering::Relaxed);
        if was == StoreMode::Normal.to_u8() {
            tracing::warn!(
                store = self.store,
                prefix = %self.options.key_prefix,
                %error,
                mode = degraded.label(),
                retry_interval = ?self.options.retry_interval,
                "redis failed: deciding under the failure policy until it answers again"
            );
        }
        if unreachable && self.target.is_cluster() {
            // A cluster connection retries a dead master with a growing
            // backoff of its own; a fresh one finds a restarted master at
            // once (made at most once per retry interval).
            *self.conn.lock() = None;
        }
        if unreachable {
            let until = self
                .elapsed()
                .saturating_add(duration_nanos(self.options.retry_interval));
            self.down_until.fetch_max(until, Ordering::Relaxed);
        }
    }

    /// Checks that Redis answers a `PING` and holds `scripts`, loading them,
    /// within the connect timeout plus the call timeout.
    pub(crate) async fn verify(&self, scripts: &[&redis::Script]) -> Result<(), ConfigError> {
        let budget = self.options.connect_timeout + self.options.call_timeout;
        let check = async {
            let mut conn = self.target.connect_now().await?;
            redis::cmd("PING").query_async::<()>(&mut conn).await?;
            for script in scripts {
                script.load_async(&mut conn).await?;
            }
            Ok::<(), redis::RedisError>(())
        };
        let outcome = match tokio::time::timeout(budget, check).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {budget:?}"),
        };
        Err(self.unverified(outcome))
    }

    /// [`Link::verify`] for a synchronous `build()`: blocks this thread for
    /// at most the connect timeout plus twice the call timeout.
    pub(crate) fn verify_blocking(&self, scripts: &[&redis::Script]) -> Result<(), ConfigError> {
        let o = &self.options;
        self.target
            .check_blocking(scripts, o.connect_timeout, o.call_timeout)
            .map_err(|e| self.unverified(e.to_string()))
    }

    fn unverified(&self, why: String) -> ConfigError {
        tracing::warn!(store = self.store, error = %why, "redis did not answer the check at build");
        ConfigError::invalid(
            "redis",
            format!(
                "redis did not answer ({why}); start it, fix the URL, or build without \
                 RedisOptions::verify_on_build to let the failure policy decide until it answers"
            ),
        )
    }
}
