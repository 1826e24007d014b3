//! The [`RateLimiter`] trait: what the middleware asks of a limiter, in
//! memory ([`KeyedRateLimiter`](super::KeyedRateLimiter)), in Redis or your own.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;

use crate::clock::Timestamp;
use crate::error::StoreError;
use crate::metrics::StoreReport;
use crate::registry::RegistryStats;
use crate::scope::ScopeKey;

use super::strategy::{Decision, Reservation};

/// The outcome of [`RateLimiter::acquire`]: the decision, and the slot held
/// for a request that must wait (to give back if it does not).
///
/// ```
/// use pmcp_resilience::rate_limit::{Admission, KeyedRateLimiter, RateLimitStrategy};
/// use pmcp_resilience::Timestamp;
/// use std::time::Duration;
///
/// let limiter = KeyedRateLimiter::with_strategy(RateLimitStrategy::TokenBucket { capacity: 1, refill_rate: 2 })?;
/// let now = Timestamp::from_millis(1_767_225_600_000);
/// let first: Admission = limiter.acquire_key_at("alice", 1, now, Duration::from_secs(1));
/// assert!(first.decision.allowed && first.decision.wait.is_zero());
/// assert!(first.reservation.is_none()); // nothing to give back
/// // The next token is 500 ms away, within the second the caller will wait.
/// let second = limiter.acquire_key_at("alice", 1, now, Duration::from_secs(1));
/// assert_eq!(second.decision.wait, Duration::from_millis(500));
/// assert!(second.reservation.is_some());
/// # Ok::<(), pmcp_resilience::ConfigError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admission {
    /// The decision.
    pub decision: Decision,
    /// For an admitted request with a [`Decision::wait`]: its reservation.
    pub reservation: Option<Reservation>,
}

/// The use of one key, as reported by [`RateLimiter::usage`].
///
/// ```
/// use pmcp_resilience::rate_limit::{KeyUsage, KeyedRateLimiter, RateLimitStrategy};
/// use pmcp_resilience::Timestamp;
/// use std::time::Duration;
///
/// let limiter = KeyedRateLimiter::with_strategy(RateLimitStrategy::TokenBucket { capacity: 4, refill_rate: 1 })?;
/// let now = Timestamp::from_millis(1_767_225_600_000);
/// limiter.check_key_at("tool:search", 3, now);
/// let rows: Vec<KeyUsage> = limiter.usage_at(now);
/// let row = &rows[0];
/// assert_eq!((row.key.as_str(), row.used, row.limit), ("tool:search", 3, 4));
/// assert_eq!(row.usage(), 0.75);
/// assert_eq!((row.allowed, row.rejected), (1, 0));
/// assert_eq!(row.reset_at, now.saturating_add(Duration::from_secs(3))); // a token a second
/// # Ok::<(), pmcp_resilience::ConfigError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyUsage {
    /// The key.
    pub key: ScopeKey,
    /// Units in use now (tokens taken, requests counted in the window,
    /// units queued).
    pub used: u32,
    /// The key's limit.
    pub limit: u32,
    /// When the key is back at full capacity if nothing else arrives.
    pub reset_at: Timestamp,
    /// Requests admitted for this key since it was created.
    pub allowed: u64,
    /// Requests rejected for this key since it was created.
    pub rejected: u64,
}

impl KeyUsage {
    /// A key using `used` of `limit`, full again now, with zero counters
    /// (for a limiter or a report of your own).
    ///
    /// ```
    /// use pmcp_resilience::rate_limit::KeyUsage;
    ///
    /// let row = KeyUsage::new("tool:search", 3, 4).with_counts(6, 3);
    /// assert_eq!(row.key.as_str(), "tool:search");
    /// assert_eq!(row.usage(), 0.75);
    /// ```
    pub fn new(key: &str, used: u32, limit: u32) -> Self {
        KeyUsage {
            key: ScopeKey::new(key),
            used,
            limit,
            reset_at: Timestamp::ZERO,
            allowed: 0,
            rejected: 0,
        }
    }

    /// Sets the counters: allowed, rejected.
    pub fn with_counts(mut self, allowed: u64, rejected: u64) -> Self {
        self.allowed = allowed;
        self.rejected = rejected;
        self
    }

    /// `used / limit`, clamped to `0.0..=1.0` (a zero limit counts as full).
    pub fn usage(&self) -> f64 {
        if self.limit == 0 {
            return if self.used == 0 { 0.0 } else { 1.0 };
        }
        (f64::from(self.used) / f64::from(self.limit)).clamp(0.0, 1.0)
    }

    /// Requests that reached the key: allowed and rejected.
    pub(crate) fn traffic(&self) -> u64 {
        self.allowed.saturating_add(self.rejected)
    }
}

/// A rate limiter keyed by [`ScopeKey`]: implement it to plug in a limiter
/// of your own with `RateLimitMiddleware::builder().limiter(..)`.
///
/// Only [`check`](Self::check) is required. The time is passed in, so a
/// store may use it or its own clock (a Redis script would use Redis `TIME`,
/// so that clients with skewed clocks agree).
///
/// ```
/// use async_trait::async_trait;
/// use pmcp_resilience::rate_limit::{Decision, RateLimiter};
/// use pmcp_resilience::{ScopeKey, StoreError, Timestamp};
/// use std::time::Duration;
///
/// /// Admits everything except requests for the key `custom:blocked`.
/// #[derive(Debug)]
/// struct Blocklist;
///
/// #[async_trait]
/// impl RateLimiter for Blocklist {
///     async fn check(&self, key: &ScopeKey, _cost: u32, now: Timestamp) -> Result<Decision, StoreError> {
///         let allowed = key.as_str() != "custom:blocked";
///         Ok(Decision {
///             allowed,
///             remaining: if allowed { 1 } else { 0 },
///             limit: 1,
///             reset_at: now,
///             retry_after: if allowed { Some(Duration::ZERO) } else { None },
///             wait: Duration::ZERO,
///         })
///     }
/// }
/// ```
#[async_trait]
pub trait RateLimiter: Send + Sync + fmt::Debug {
    /// Decides on a request of `cost` units for `key` at `now`, without
    /// waiting, and records it if admitted.
    async fn check(
        &self,
        key: &ScopeKey,
        cost: u32,
        now: Timestamp,
    ) -> Result<Decision, StoreError>;

    /// Like [`check`](Self::check), but may reserve a later slot within
    /// `max_wait` (the returned decision's `wait`). The default never
    /// reserves.
    async fn acquire(
        &self,
        key: &ScopeKey,
        cost: u32,
        now: Timestamp,
        max_wait: Duration,
    ) -> Result<Admission, StoreError> {
        let _ = max_wait;
        Ok(Admission {
            decision: self.check(key, cost, now).await?,
            reservation: None,
        })
    }

    /// Gives back a reservation whose request stopped waiting; returns
    /// whether it was given back (see [`Reservation`] for when it can be).
    async fn cancel(
        &self,
        key: &ScopeKey,
        reservation: &Reservation,
        now: Timestamp,
    ) -> Result<bool, StoreError> {
        let _ = (key, reservation, now);
        Ok(false)
    }

    /// The use of every key (for metrics); may be empty for remote stores.
    fn usage(&self, now: Timestamp) -> Vec<KeyUsage> {
        let _ = now;
        Vec::new()
    }

    /// Counters of the store's key map, if it has one.
    fn stats(&self) -> RegistryStats {
        RegistryStats::default()
    }

    /// Where the limiter keeps its state and how that store is doing, for
    /// the unified metrics (default: kind `custom`, mode `normal`).
    fn store_report(&self) -> StoreReport {
        StoreReport::new("custom", "normal")
    }
}
