//! [`RedisRateLimiter`]: one Lua script per decision, Redis time.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;

use super::conn::Target;
use super::denial::DenialCache;
use super::keys;
use super::link::Link;
use super::options::{FailurePolicy, RedisHealth, RedisOptions};
use super::scripts;
use crate::clock::{Timestamp, default_clock};
use crate::error::{ConfigError, StoreError};
use crate::rate_limit::strategy::{
    FixedWindowState, LeakyBucketState, LimiterState, Policy, SlidingWindowState, TokenBucketState,
};
use crate::rate_limit::{
    Admission, Decision, KeyedRateLimiter, RateLimitStrategy, RateLimiter, Reservation,
};

/// The largest product the scripts multiply, kept exact in Lua's doubles
/// (2^51: sums of up to three such terms stay below 2^53).
const EXACT: u64 = 1 << 51;

/// A [`RateLimiter`] whose state lives in Redis, shared by every process
/// using the same Redis and key prefix.
///
/// Each decision ([`check`](RateLimiter::check),
/// [`acquire`](RateLimiter::acquire) with reservations,
/// [`cancel`](RateLimiter::cancel)) is one `EVALSHA` of a script mirroring
/// the strategy's pure function, on Redis `TIME` in whole microseconds. The
/// `now` argument of the trait does not decide anything (only the local
/// fallback decides on it); a decision's `reset_at` is given on its clock:
/// `now` plus the time Redis says is left, so usage headers computed from
/// `reset_at - now` hold whatever the skew between the two clocks. A key
/// already over its limit is answered from a local denial cache until its
/// retry time. See the [module docs](super) for keys, expiry and failures.
///
/// Reservations carry the states the script saw, in nanoseconds (whole
/// microseconds); give them back to the limiter that made them.
///
/// ```no_run
/// use pmcp_resilience::rate_limit::{RateLimitStrategy, RateLimiter};
/// use pmcp_resilience::redis_store::{RedisOptions, RedisRateLimiter};
/// use pmcp_resilience::{ScopeKey, Timestamp};
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let client = redis::Client::open("redis://127.0.0.1:6380/")?;
/// let strategy = RateLimitStrategy::TokenBucket { capacity: 10, refill_rate: 1 };
/// let limiter = RedisRateLimiter::new(client, strategy, RedisOptions::default())?;
/// let decision = limiter.check(&ScopeKey::new("tool:search"), 1, Timestamp::from_nanos(0)).await?;
/// assert!(decision.allowed);
/// # Ok(())
/// # }
/// ```
///
/// Building one connects nothing, so it can be checked without Redis:
///
/// ```
/// use pmcp_resilience::rate_limit::{RateLimitMiddleware, RateLimitStrategy};
/// use pmcp_resilience::redis_store::{RedisOptions, RedisRateLimiter};
/// use std::sync::Arc;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let client = redis::Client::open("redis://127.0.0.1:6380/")?;
/// let strategy = RateLimitStrategy::TokenBucket { capacity: 10, refill_rate: 1 };
/// let limiter = Arc::new(RedisRateLimiter::new(client, strategy, RedisOptions::default().key_prefix("myapp:"))?);
/// assert_eq!(limiter.redis_key("tool:search"), "myapp:{tool:search}:rl:token_bucket");
/// let middleware = RateLimitMiddleware::builder().limiter(limiter.clone()).build()?;
/// assert_eq!(middleware.metrics().store.kind, "redis");
/// assert_eq!(limiter.health().round_trips, 0); // the first request connects
/// # Ok(())
/// # }
/// ```
pub struct RedisRateLimiter {
    link: Link,
    strategy: RateLimitStrategy,
    micros: Policy,
    pub(crate) kind: u8,
    p1: u64,
    p2: u64,
    suffix: String,
    script: redis::Script,
    denials: DenialCache,
    local: KeyedRateLimiter,
}

impl fmt::Debug for RedisRateLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisRateLimiter")
            .field("strategy", &self.strategy)
            .field("prefix", &self.link.options.key_prefix)
            .field("health", &self.link.health())
            .finish()
    }
}

/// The strategy in whole microseconds, as the script runs it.
pub(crate) fn micro_policy(strategy: &RateLimitStrategy) -> Result<Policy, ConfigError> {
    strategy.validate()?;
    let window_us = |field: &'static str, w: Duration| -> Result<u64, ConfigError> {
        let us = u64::try_from(w.as_micros()).unwrap_or(u64::MAX);
        if us == 0 || us > EXACT {
            return Err(ConfigError::invalid(
                field,
                "a Redis-backed limiter needs a window between 1 µs and 2^51 µs (it works in whole microseconds)",
            ));
        }
        Ok(us)
    };
    let interval_us = |field: &'static str, rate: u32| -> Result<u64, ConfigError> {
        if rate > 1_000_000 {
            return Err(ConfigError::invalid(
                field,
                "a Redis-backed limiter allows at most 1 000 000 units per second (it works in whole microseconds)",
            ));
        }
        Ok(1_000_000 / u64::from(rate))
    };
    let exact = |field: &'static str, limit: u32, span: u64| -> Result<(), ConfigError> {
        if u64::from(limit).saturating_mul(span) > EXACT {
            return Err(ConfigError::invalid(
                field,
                "limit × window (or capacity × interval) in microseconds must stay below 2^51 \
                 for exact arithmetic in Redis scripts; lower the limit or the window",
            ));
        }
        Ok(())
    };
    Ok(match *strategy {
        RateLimitStrategy::FixedWindow {
            max_requests,
            window,
        } => Policy::FixedWindow {
            max: max_requests,
            window: window_us("window", window)?,
        },
        RateLimitStrategy::SlidingWindow {
            max_requests,
            window,
        } => {
            let window = window_us("window", window)?;
            exact("max_requests", max_requests, window)?;
            Policy::SlidingWindow {
                max: max_requests,
                window,
            }
        }
        RateLimitStrategy::TokenBucket {
            capacity,
            refill_rate,
        } => {
            let interval = interval_us("refill_rate", refill_rate)?;
            exact("capacity", capacity, interval)?;
            Policy::TokenBucket { capacity, interval }
        }
        RateLimitStrategy::LeakyBucket {
            capacity,
            leak_rate,
        } => {
            let interval = interval_us("leak_rate", leak_rate)?;
            exact("capacity", capacity, interval)?;
            Policy::LeakyBucket { capacity, interval }
        }
    })
}

/// The reply of the limiter script to an acquire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ScriptReply {
    pub(crate) allowed: bool,
    pub(crate) remaining: u64,
    /// `reset_at` minus the Redis time the script decided at (µs).
    pub(crate) reset_in: i64,
    /// `None`: never.
    pub(crate) retry_after: Option<u64>,
    pub(crate) wait: u64,
    /// The states before and after, when the script sent them (a
    /// reservation, or asked for).
    pub(crate) states: Option<([u64; 3], [u64; 3])>,
}

impl ScriptReply {
    fn parse(r: &[i64]) -> Result<Self, StoreError> {
        if r.len() != 5 && r.len() != 11 {
            return Err(StoreError::Corrupt(format!(
                "limiter script replied with {} values, expected 5 or 11",
                r.len()
            )));
        }
        let u = |i: usize| u64::try_from(r[i]).unwrap_or(0);
        Ok(ScriptReply {
            allowed: r[0] == 1,
            remaining: u(1),
            reset_in: r[2],
            retry_after: (r[3] >= 0).then(|| u(3)),
            wait: u(4),
            states: (r.len() == 11).then(|| ([u(5), u(6), u(7)], [u(8), u(9), u(10)])),
        })
    }
}

fn to_u32(v: u64) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}

impl RedisRateLimiter {
    /// A limiter applying `strategy` to every key, in the Redis behind
    /// `client`. Nothing is connected yet: the first request connects.
    ///
    /// Fails on invalid options or a strategy outside the exact range of the
    /// scripts (see the [module docs](super#time-resolution)).
    pub fn new(
        client: redis::Client,
        strategy: RateLimitStrategy,
        options: RedisOptions,
    ) -> Result<Self, ConfigError> {
        Self::on(Target::Single(client), strategy, options)
    }

    /// A limiter whose keys live in a Redis Cluster (cargo feature
    /// `redis-cluster`): each decision is one script call on its key's slot,
    /// `MOVED`/`ASK` are followed and a script lost in a failover is loaded
    /// again. Nothing is connected yet: the first request connects.
    #[cfg(feature = "redis-cluster")]
    #[cfg_attr(docsrs, doc(cfg(feature = "redis-cluster")))]
    pub fn cluster(
        client: redis::cluster::ClusterClient,
        strategy: RateLimitStrategy,
        options: RedisOptions,
    ) -> Result<Self, ConfigError> {
        Self::on(Target::Cluster(client), strategy, options)
    }

    pub(crate) fn on(
        target: Target,
        strategy: RateLimitStrategy,
        options: RedisOptions,
    ) -> Result<Self, ConfigError> {
        options.validate()?;
        let micros = micro_policy(&strategy)?;
        let (kind, p1, p2) = match micros {
            Policy::FixedWindow { max, window } => (1, u64::from(max), window),
            Policy::SlidingWindow { max, window } => (2, u64::from(max), window),
            Policy::TokenBucket { capacity, interval } => (3, u64::from(capacity), interval),
            Policy::LeakyBucket { capacity, interval } => (4, u64::from(capacity), interval),
        };
        let local = KeyedRateLimiter::new(strategy, options.local_limits, default_clock())?;
        Ok(RedisRateLimiter {
            denials: DenialCache::new(options.denial_cache_capacity),
            link: Link::new(target, options, "limiter"),
            strategy,
            micros,
            kind,
            p1,
            p2,
            suffix: format!("rl:{}", strategy.label()),
            script: redis::Script::new(scripts::LIMITER),
            local,
        })
    }

    /// The strategy this limiter applies.
    pub fn strategy(&self) -> RateLimitStrategy {
        self.strategy
    }

    /// Checks that Redis answers and holds the limiter script (loading it),
    /// within the connect timeout plus the call timeout.
    pub async fn verify(&self) -> Result<(), ConfigError> {
        self.link.verify(&[&self.script]).await
    }

    /// [`verify`](Self::verify) for synchronous code (the builders' `build()`
    /// with [`RedisOptions::verify_on_build`]): blocks the calling thread.
    pub fn verify_blocking(&self) -> Result<(), ConfigError> {
        self.link.verify_blocking(&[&self.script])
    }

    /// Keys held by the local fallback limiter (bounded by
    /// [`RedisOptions::local_limits`]).
    pub fn local_keys(&self) -> usize {
        self.local.registry_stats().keys
    }

    /// The mode (normal or the failure policy's) and the counters, for metrics.
    pub fn health(&self) -> RedisHealth {
        self.link.health()
    }

    /// The Redis key holding `scope_key`'s state.
    pub fn redis_key(&self, scope_key: &str) -> String {
        keys::key(&self.link.options.key_prefix, scope_key, &self.suffix)
    }

    /// The policy the script runs, in microseconds (for the parity tests).
    #[cfg(test)]
    pub(crate) fn micro(&self) -> Policy {
        self.micros
    }

    /// Runs the script's acquire; `now_us` is `-1` (Redis `TIME`) except in
    /// tests, which also ask for the states in every reply (`with_states`).
    pub(crate) async fn script_acquire(
        &self,
        key: &str,
        cost: u32,
        max_wait: Duration,
        now_us: i64,
        with_states: bool,
    ) -> Result<ScriptReply, StoreError> {
        let redis_key = self.redis_key(key);
        let max_wait = u64::try_from(max_wait.as_micros()).unwrap_or(u64::MAX);
        let mut cmd = scripts::evalsha(&self.script, &redis_key, 8);
        cmd.arg(now_us)
            .arg(self.kind)
            .arg(self.p1)
            .arg(self.p2)
            .arg("a")
            .arg(cost)
            .arg(max_wait.min(EXACT))
            .arg(u8::from(with_states));
        let script = &self.script;
        let reply: Vec<i64> = self
            .link
            .call(|mut conn| async move { scripts::run(script, &cmd, &mut conn).await })
            .await?;
        ScriptReply::parse(&reply)
    }

    /// Runs the script's cancel (refund).
    pub(crate) async fn script_cancel(
        &self,
        key: &str,
        before: [u64; 3],
        after: [u64; 3],
        now_us: i64,
    ) -> Result<bool, StoreError> {
        let redis_key = self.redis_key(key);
        let mut cmd = scripts::evalsha(&self.script, &redis_key, 11);
        cmd.arg(now_us)
            .arg(self.kind)
            .arg(self.p1)
            .arg(self.p2)
            .arg("c")
            .arg(&before[..])
            .arg(&after[..]);
        let script = &self.script;
        let reply: Vec<i64> = self
            .link
            .call(|mut conn| async move { scripts::run(script, &cmd, &mut conn).await })
            .await?;
        Ok(reply.first() == Some(&1))
    }

    /// The script's reply as a decision on the caller's clock: `reset_at`
    /// is a Redis time, so it is measured from the Redis time the script
    /// decided at and that duration is added to the caller's `now`.
    fn decision(&self, r: &ScriptReply, now: Timestamp) -> Decision {
        Decision {
            allowed: r.allowed,
            remaining: to_u32(r.remaining),
            limit: self.micros.limit(),
            reset_at: now.saturating_add(Duration::from_micros(
                u64::try_from(r.reset_in).unwrap_or(0),
            )),
            retry_after: if r.allowed {
                Some(Duration::ZERO)
            } else {
                r.retry_after.map(Duration::from_micros)
            },
            wait: if r.allowed {
                Duration::from_micros(r.wait)
            } else {
                Duration::ZERO
            },
        }
    }

    /// A state as the script stores it (µs) as a [`LimiterState`] (ns).
    fn state(&self, s: [u64; 3]) -> LimiterState {
        let ns = s[0].saturating_mul(1000);
        match self.kind {
            1 => LimiterState::FixedWindow(FixedWindowState {
                window_start: ns,
                count: s[1],
            }),
            2 => LimiterState::SlidingWindow(SlidingWindowState {
                window_start: ns,
                current: to_u32(s[1]),
                previous: to_u32(s[2]),
            }),
            3 => LimiterState::TokenBucket(TokenBucketState { tat: ns }),
            _ => LimiterState::LeakyBucket(LeakyBucketState { next_free: ns }),
        }
    }

    /// A [`LimiterState`] (ns) as the script stores it (µs).
    fn script_state(&self, s: &LimiterState) -> Option<[u64; 3]> {
        Some(match (self.kind, s) {
            (1, LimiterState::FixedWindow(s)) => [s.window_start / 1000, s.count, 0],
            (2, LimiterState::SlidingWindow(s)) => [
                s.window_start / 1000,
                u64::from(s.current),
                u64::from(s.previous),
            ],
            (3, LimiterState::TokenBucket(s)) => [s.tat / 1000, 0, 0],
            (4, LimiterState::LeakyBucket(s)) => [s.next_free / 1000, 0, 0],
            _ => return None,
        })
    }

    /// A decision from the denial cache, the script, or (Redis failing) the
    /// failure policy.
    async fn admit(&self, key: &str, cost: u32, now: Timestamp, max_wait: Duration) -> Admission {
        let limit = self.micros.limit();
        if cost > limit {
            return Admission {
                decision: Decision::never(limit, now),
                reservation: None,
            };
        }
        if let Some(decision) = self.denials.lookup(key, cost, max_wait, now) {
            self.link
                .cached_denials
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Admission {
                decision,
                reservation: None,
            };
        }
        match self.script_acquire(key, cost, max_wait, -1, false).await {
            Ok(reply) => {
                let decision = self.decision(&reply, now);
                if !decision.allowed {
                    self.denials.insert(key, cost, decision, now);
                }
                // The script sends the states exactly when there is a wait.
                let reservation = reply
                    .states
                    .filter(|_| decision.allowed && !decision.wait.is_zero())
                    .map(|(before, after)| Reservation {
                        cost,
                        before: self.state(before),
                        after: self.state(after),
                    });
                Admission {
                    decision,
                    reservation,
                }
            }
            Err(_) => self.degraded(key, cost, now, max_wait),
        }
    }

    fn degraded(&self, key: &str, cost: u32, now: Timestamp, max_wait: Duration) -> Admission {
        self.link.count_degraded();
        let limit = self.micros.limit();
        let decision = match self.link.options.failure_policy {
            FailurePolicy::FailOpen => Decision::allow(limit, limit, now.as_nanos(), 0),
            FailurePolicy::FailClosed => Decision::deny(
                0,
                limit,
                now.as_nanos(),
                crate::clock::duration_nanos(self.link.options.retry_interval),
            ),
            FailurePolicy::LocalFallback => {
                return self.local.acquire_key_at(key, cost, now, max_wait);
            }
        };
        Admission {
            decision,
            reservation: None,
        }
    }
}

#[async_trait]
impl RateLimiter for RedisRateLimiter {
    fn store_report(&self) -> crate::metrics::StoreReport {
        self.link.store_report()
    }

    async fn check(
        &self,
        key: &crate::ScopeKey,
        cost: u32,
        now: Timestamp,
    ) -> Result<Decision, StoreError> {
        // Not through `acquire`: that would box a second future per check.
        Ok(self
            .admit(key.as_str(), cost, now, Duration::ZERO)
            .await
            .decision)
    }

    async fn acquire(
        &self,
        key: &crate::ScopeKey,
        cost: u32,
        now: Timestamp,
        max_wait: Duration,
    ) -> Result<Admission, StoreError> {
        Ok(self.admit(key.as_str(), cost, now, max_wait).await)
    }

    async fn cancel(
        &self,
        key: &crate::ScopeKey,
        reservation: &Reservation,
        now: Timestamp,
    ) -> Result<bool, StoreError> {
        let key = key.as_str();
        // A reservation made by the local fallback while Redis was down is
        // given back there: it matches only the local state, and trying Redis
        // first (which may be back) would lose the refund.
        if self.local.cancel_at(key, reservation, now) {
            return Ok(true);
        }
        let (Some(before), Some(after)) = (
            self.script_state(&reservation.before),
            self.script_state(&reservation.after),
        ) else {
            return Ok(false);
        };
        match self.script_cancel(key, before, after, -1).await {
            Ok(refunded) => {
                if refunded {
                    self.denials.forget(key);
                }
                Ok(refunded)
            }
            Err(_) => Ok(self.local.cancel_at(key, reservation, now)),
        }
    }
}
