//! The connection to Redis, its timeouts and the failure bookkeeping.

use std::future::Future;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::Instant;

use parking_lot::Mutex;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::options::{RedisHealth, RedisOptions, StoreMode};
use crate::clock::duration_nanos;
use crate::error::StoreError;
use crate::observe::{DurationHistogram, StoreReport};

/// One lazily created, self-reconnecting connection plus the store's health.
pub(crate) struct Link {
    pub(crate) client: redis::Client,
    conn: Mutex<Option<ConnectionManager>>,
    pub(crate) options: RedisOptions,
    origin: Instant,
    /// Until this many nanoseconds after `origin`, calls skip Redis.
    down_until: AtomicU64,
    mode: AtomicU8,
    errors: AtomicU64,
    round_trips: AtomicU64,
    pub(crate) degraded: AtomicU64,
    pub(crate) cached_denials: AtomicU64,
    /// Round-trip time of calls that reached Redis.
    latency: DurationHistogram,
}

impl Link {
    pub(crate) fn new(client: redis::Client, options: RedisOptions) -> Self {
        Link {
            client,
            conn: Mutex::new(None),
            options,
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

    /// The store as the unified metrics see it: kind, current mode, latency.
    pub(crate) fn store_report(&self) -> StoreReport {
        StoreReport::new(
            "redis",
            StoreMode::from_u8(self.mode.load(Ordering::Relaxed)).label(),
        )
        .with_latency(self.latency.snapshot())
    }

    pub(crate) fn health(&self) -> RedisHealth {
        RedisHealth {
            mode: StoreMode::from_u8(self.mode.load(Ordering::Relaxed)),
            store_errors: self.errors.load(Ordering::Relaxed),
            round_trips: self.round_trips.load(Ordering::Relaxed),
            degraded_decisions: self.degraded.load(Ordering::Relaxed),
            cached_denials: self.cached_denials.load(Ordering::Relaxed),
        }
    }

    /// The connection, created on first use without waiting for it.
    fn connection(&self) -> Result<ConnectionManager, StoreError> {
        let mut slot = self.conn.lock();
        if let Some(conn) = slot.as_ref() {
            return Ok(conn.clone());
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.options.connect_timeout))
            .set_response_timeout(Some(self.options.call_timeout))
            .set_number_of_retries(2)
            .set_max_delay(self.options.retry_interval);
        let conn = ConnectionManager::new_lazy_with_config(self.client.clone(), config)
            .map_err(|e| StoreError::Unavailable(format!("redis connection: {e}")))?;
        *slot = Some(conn.clone());
        Ok(conn)
    }

    /// Runs one call on Redis within the call timeout, recording the outcome.
    /// While Redis is known to be down, fails at once.
    pub(crate) async fn call<T, F, Fut>(&self, f: F) -> Result<T, StoreError>
    where
        F: FnOnce(ConnectionManager) -> Fut,
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
                self.mode
                    .store(StoreMode::Normal.to_u8(), Ordering::Relaxed);
                Ok(v)
            }
            Ok(Err(e)) => {
                let unreachable = e.is_io_error()
                    || e.is_connection_dropped()
                    || e.is_connection_refusal()
                    || e.is_timeout();
                self.failed(unreachable);
                Err(StoreError::Unavailable(format!("redis: {e}")))
            }
            Err(_) => {
                self.failed(true);
                Err(StoreError::Unavailable(format!(
                    "redis did not answer within {:?}",
                    self.options.call_timeout
                )))
            }
        }
    }

    fn failed(&self, unreachable: bool) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        self.mode.store(
            self.options.failure_policy.degraded_mode().to_u8(),
            Ordering::Relaxed,
        );
        if unreachable {
            let until = self
                .elapsed()
                .saturating_add(duration_nanos(self.options.retry_interval));
            self.down_until.fetch_max(until, Ordering::Relaxed);
        }
    }
}
