//! State shared by several processes through Redis (cargo feature `redis`).
//!
//! [`RedisRateLimiter`] and [`RedisBreakerStore`] keep each scope key's state
//! in Redis and decide with one Lua script per request: one round trip, no
//! read-modify-write from the client, and the time taken from the Redis
//! server's `TIME`, so clients with skewed clocks still agree.
//!
//! ```no_run
//! use pmcp_resilience::rate_limit::{RateLimitMiddleware, RateLimitStrategy};
//! use pmcp_resilience::redis_store::{FailurePolicy, RedisOptions, RedisRateLimiter};
//! use std::sync::Arc;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let client = redis::Client::open("redis://127.0.0.1:6380/")?;
//! let options = RedisOptions::default()
//!     .key_prefix("myapp:")
//!     .failure_policy(FailurePolicy::LocalFallback);
//! let limiter = RedisRateLimiter::new(
//!     client,
//!     RateLimitStrategy::TokenBucket { capacity: 100, refill_rate: 10 },
//!     options,
//! )?;
//! let middleware = RateLimitMiddleware::builder().limiter(Arc::new(limiter)).build()?;
//! # drop(middleware);
//! # Ok(())
//! # }
//! ```
//!
//! # Key layout
//!
//! `<prefix>{<scope key>}:rl:<strategy>` for a limiter and
//! `<prefix>{<scope key>}:cb` for a breaker. The braces are a Redis Cluster
//! hash tag: every key of one scope key lives in one slot, so no script ever
//! spans slots (no `CROSSSLOT`). In the scope key, `%`, `{` and `}` are
//! percent-escaped, so an untrusted part (a session id, a tool name) cannot
//! close the tag early; a scope key longer than 256 bytes once escaped is
//! replaced by its first 128 bytes and a 64-bit FNV-1a digest of the whole.
//! The prefix may not contain braces.
//!
//! # Time resolution
//!
//! Redis scripts run Lua 5.1, whose numbers are doubles: integers are exact
//! only up to 2^53, and nanoseconds since the epoch (about 1.8e18) are not.
//! The scripts therefore work in **whole microseconds** (about 1.8e15, well
//! below 2^53 = 9.007e15): the time is `TIME` seconds × 10^6 + microseconds,
//! windows are rounded down to whole microseconds and a refill interval is
//! `10^6 / rate` microseconds, rounded down. The Rust side runs the very same
//! pure functions of [`crate::rate_limit::strategy`] on microsecond values,
//! and a test holds both to identical decisions. Limits that would leave the
//! exact range are refused with a [`ConfigError`](crate::ConfigError::Invalid): rates
//! above 10^6 per second, windows under 1 µs, and sliding windows with
//! `max_requests × window_µs > 2^51`. Numbers are written to Redis with
//! `string.format('%.0f')` (never `tostring`, which keeps 14 digits), and
//! every reply is an integer.
//!
//! # Expiry
//!
//! A limiter key is written (`SET … PX`) only when a request is admitted, and
//! expires when the key is back at full capacity; a rejected request writes
//! nothing and does not touch the expiry. A breaker key is written only when
//! its state changes, and expires after [`RedisOptions::breaker_ttl`] without
//! a change; a closed breaker that never went half-open and counts nothing is
//! deleted.
//!
//! # When Redis cannot be reached
//!
//! Every call has a timeout ([`RedisOptions::call_timeout`]); the connection
//! is a `redis::aio::ConnectionManager` that reconnects by itself. On an
//! error the [`FailurePolicy`] decides (see there for what each policy means
//! for limits and breakers), and for [`RedisOptions::retry_interval`] the
//! store does not wait on Redis again; the first call after that tries
//! Redis, and a success puts the store back in [`StoreMode::Normal`]. Each
//! change to a degraded mode is one `tracing` warning with the error, each
//! return one info line. [`RedisHealth`] shows the mode and counters, and
//! the metrics export them (`mcp_resilience_store_mode`,
//! `mcp_resilience_store_degraded_decisions_total`).
//! [`RedisOptions::verify_on_build`] makes the builders check that Redis
//! answers before `build()` succeeds.

mod breaker;
mod conn;
mod denial;
mod keys;
mod limiter;
mod link;
mod options;
mod scripts;

#[cfg(test)]
mod tests;

use std::sync::Arc;

pub use breaker::RedisBreakerStore;
pub use limiter::RedisRateLimiter;
pub use options::{FailurePolicy, RedisHealth, RedisOptions, StoreMode};

use conn::Target;

use crate::circuit_breaker::state::BreakerPolicy;
use crate::circuit_breaker::store::CircuitBreakerStateStore;
use crate::error::ConfigError;
use crate::persistence::StatePersistence;
use crate::rate_limit::{RateLimitStrategy, RateLimiter};
use crate::registry::RegistryLimits;

/// The Redis behind `persistence`, with its key prefix; `None` for the
/// other kinds of persistence.
fn target_of(persistence: &StatePersistence) -> Option<(Target, &str)> {
    match persistence {
        StatePersistence::Redis { client, key_prefix } => {
            Some((Target::Single(client.clone()), key_prefix))
        }
        #[cfg(feature = "redis-cluster")]
        StatePersistence::RedisCluster { client, key_prefix } => {
            Some((Target::Cluster(client.clone()), key_prefix))
        }
        _ => None,
    }
}

/// The Redis breaker store of `persistence` for the builders (`None` if it
/// is not Redis): its `key_prefix` overrides the one in `options`, and
/// `policy` is checked against what the store supports.
pub(crate) fn breaker_store_for(
    persistence: &StatePersistence,
    policy: &BreakerPolicy,
    options: RedisOptions,
) -> Result<Option<Arc<dyn CircuitBreakerStateStore>>, ConfigError> {
    let Some((target, key_prefix)) = target_of(persistence) else {
        return Ok(None);
    };
    let verify = options.verify_on_build;
    let store = RedisBreakerStore::on(target, options.key_prefix(key_prefix))?;
    store.check(policy)?;
    if verify {
        store.verify_blocking()?;
    }
    Ok(Some(Arc::new(store)))
}

/// The Redis rate limiter of `persistence` for the builders (`None` if it is
/// not Redis): its `key_prefix` overrides the one in `options`, and
/// `local_limits` (the builder's registry limits) bound the local fallback.
pub(crate) fn rate_limiter_for(
    persistence: &StatePersistence,
    strategy: RateLimitStrategy,
    options: RedisOptions,
    local_limits: RegistryLimits,
) -> Result<Option<Arc<dyn RateLimiter>>, ConfigError> {
    let Some((target, key_prefix)) = target_of(persistence) else {
        return Ok(None);
    };
    let verify = options.verify_on_build;
    let options = options.key_prefix(key_prefix).local_limits(local_limits);
    let limiter = RedisRateLimiter::on(target, strategy, options)?;
    if verify {
        limiter.verify_blocking()?;
    }
    Ok(Some(Arc::new(limiter)))
}
