//! Turning a [`StatePersistence`] into the store that decides for a breaker
//! or a limiter.
//!
//! Memory and file are the middlewares' own key registry (a file mirrors
//! it), so they have no store here (`None`). Custom, Redis and Redis
//! Cluster are stores behind the seams the cores define
//! ([`CircuitBreakerStateStore`], [`RateLimiter`]): the builders call these
//! functions at `build()` and never name a backend themselves.

use std::sync::Arc;

use super::StatePersistence;
use crate::circuit_breaker::state::BreakerPolicy;
use crate::circuit_breaker::store::CircuitBreakerStateStore;
use crate::error::ConfigError;
use crate::rate_limit::{RateLimitStrategy, RateLimiter};
use crate::registry::RegistryLimits;

#[cfg(feature = "redis")]
pub(crate) use crate::redis_store::RedisOptions;

/// The store a breaker of `policy` keeps its state in under `persistence`,
/// or `None` for memory and file. A Redis store's `key_prefix` is the
/// persistence's, and `policy` is checked against what it supports.
pub(crate) fn breaker_store(
    persistence: &StatePersistence,
    policy: &BreakerPolicy,
    #[cfg(feature = "redis")] redis: RedisOptions,
) -> Result<Option<Arc<dyn CircuitBreakerStateStore>>, ConfigError> {
    match persistence {
        StatePersistence::Memory | StatePersistence::File(_) => {
            let _ = policy; // only a Redis store checks it
            Ok(None)
        }
        StatePersistence::Custom(store) => Ok(Some(Arc::clone(store))),
        #[cfg(feature = "redis")]
        _ => redis::breaker_store(persistence, policy, redis),
    }
}

/// The limiter that decides for a middleware of `strategy` under
/// `persistence`, or `None` for memory and file (and for a custom store,
/// which the builder refuses: a limiter of your own is given with
/// `RateLimitBuilder::limiter`). `local_limits` bound a Redis limiter's
/// local fallback.
pub(crate) fn rate_limiter(
    persistence: &StatePersistence,
    strategy: RateLimitStrategy,
    #[cfg(feature = "redis")] redis: RedisOptions,
    local_limits: RegistryLimits,
) -> Result<Option<Arc<dyn RateLimiter>>, ConfigError> {
    match persistence {
        StatePersistence::Memory | StatePersistence::File(_) | StatePersistence::Custom(_) => {
            let _ = (strategy, local_limits);
            Ok(None)
        }
        #[cfg(feature = "redis")]
        _ => redis::rate_limiter(persistence, strategy, redis, local_limits),
    }
}

#[cfg(feature = "redis")]
mod redis {
    use super::*;
    use crate::redis_store::{RedisBreakerStore, RedisRateLimiter, Target};

    /// The Redis behind `persistence`, with its key prefix.
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

    pub(super) fn breaker_store(
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

    pub(super) fn rate_limiter(
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
}
