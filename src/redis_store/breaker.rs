//! [`RedisBreakerStore`]: the breaker's state machine as Lua scripts.

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use async_trait::async_trait;

use super::conn::Target;
use super::keys;
use super::link::Link;
use super::options::{FailurePolicy, RedisHealth, RedisOptions};
use super::scripts;
use crate::circuit_breaker::metrics::KeySnapshot;
use crate::circuit_breaker::state::CircuitBreakerState;
use crate::circuit_breaker::state::{
    Admission, BreakerMode, BreakerPolicy, CircuitState, Probe, ProbeId, Transition,
    TransitionReason, Verdict,
};
use crate::circuit_breaker::store::CircuitBreakerStateStore;
use crate::clock::Timestamp;
use crate::error::{ConfigError, StoreError};

/// Keys read by one [`get_metrics`](CircuitBreakerStateStore::get_metrics).
const MAX_METRIC_KEYS: usize = 10_000;

/// A [`CircuitBreakerStateStore`] in Redis, shared by every process using
/// the same Redis and key prefix: failures seen by one process open the
/// breaker for all, and half-open probes are limited across all of them
/// together (at most `half_open_max_probes` in the fleet, each with its
/// deadline).
///
/// [`acquire`](CircuitBreakerStateStore::acquire) and
/// [`record`](CircuitBreakerStateStore::record) are each one Lua script
/// mirroring [`store::acquire`](crate::store::acquire) and
/// [`store::record`](crate::store::record), on Redis `TIME`
/// in whole microseconds (the `now` and `jitter` arguments are not used).
/// [`set_mode`](CircuitBreakerStateStore::set_mode) is one script call too,
/// so a trip recorded by another process at the same moment is kept; a
/// forced, disabled or metrics-only key does not expire until its mode is
/// reset.
///
/// # When Redis fails
///
/// Under [`FailurePolicy::FailOpen`] a call is admitted (and nothing is
/// counted), under [`FailurePolicy::FailClosed`] it is rejected with
/// [`RedisOptions::retry_interval`] as the retry hint. Under
/// [`FailurePolicy::LocalFallback`] the store returns the error, and the
/// breaker decides from the last state Redis reported for the key, in its
/// bounded key registry (see
/// [`CircuitBreakerStateStore`]).
///
/// # Supported policy
///
/// `consecutive_failures`, `success_threshold`, `timeout`,
/// `half_open_max_probes`, `probe_deadline`, and every [`BreakerMode`].
/// Window rules (`failures_in_window`, `failure_rate`, `slow_calls`) and
/// `open_backoff` are refused by [`supports`](Self::supports) with a
/// [`ConfigError`] (and by `acquire`/`record` with a [`StoreError`]);
/// `window` is ignored, and the window buckets of a state are not stored.
///
/// ```no_run
/// use pmcp_resilience::circuit_breaker::BreakerPolicy;
/// use pmcp_resilience::redis_store::{RedisBreakerStore, RedisOptions};
/// use pmcp_resilience::store::{Admission, CircuitBreakerStateStore};
/// use pmcp_resilience::Timestamp;
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let client = redis::Client::open("redis://127.0.0.1:6380/")?;
/// let store = RedisBreakerStore::new(client, RedisOptions::default())?;
/// let policy = BreakerPolicy::default();
/// RedisBreakerStore::supports(&policy)?;
/// let (admission, _) = store.acquire("server:https://api", &policy, Timestamp::from_nanos(0), 0.5).await?;
/// assert!(matches!(admission, Admission::Allowed { .. }));
/// # Ok(())
/// # }
/// ```
///
/// Building one connects nothing, so it can be checked without Redis:
///
/// ```
/// use pmcp_resilience::circuit_breaker::{BreakerPolicy, FailureRate};
/// use pmcp_resilience::redis_store::{RedisBreakerStore, RedisOptions};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let client = redis::Client::open("redis://127.0.0.1:6380/")?;
/// let store = RedisBreakerStore::new(client, RedisOptions::default().key_prefix("myapp:"))?;
/// assert_eq!(store.redis_key("tool:search"), "myapp:{tool:search}:cb");
/// assert_eq!(store.health().round_trips, 0); // the first call connects
/// // Window rules are not in the script: a policy with one is refused up front.
/// assert!(RedisBreakerStore::supports(&BreakerPolicy::default()).is_ok());
/// let rated = BreakerPolicy { failure_rate: Some(FailureRate { threshold: 0.5, minimum_calls: 10 }), ..BreakerPolicy::default() };
/// assert!(RedisBreakerStore::supports(&rated).is_err());
/// # Ok(())
/// # }
/// ```
pub struct RedisBreakerStore {
    link: Link,
    script: redis::Script,
}

impl fmt::Debug for RedisBreakerStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisBreakerStore")
            .field("prefix", &self.link.options.key_prefix)
            .field("health", &self.link.health())
            .finish()
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros())
        .unwrap_or(u64::MAX)
        .min(1 << 51)
}

fn state_code(s: i64) -> CircuitState {
    match s {
        1 => CircuitState::Open,
        2 => CircuitState::HalfOpen,
        _ => CircuitState::Closed,
    }
}

fn transition(from: i64, to: i64, reason: i64) -> Option<Transition> {
    if from < 0 {
        return None;
    }
    let reason = match reason {
        0 => TransitionReason::ConsecutiveFailures,
        1 => TransitionReason::ProbeFailed,
        2 => TransitionReason::ProbeDeadline,
        3 => TransitionReason::OpenTimeElapsed,
        _ => TransitionReason::ProbesSucceeded,
    };
    Some(Transition {
        from: state_code(from),
        to: state_code(to),
        reason,
    })
}

fn mode_code(mode: BreakerMode) -> u64 {
    match mode {
        BreakerMode::ForcedOpen => 1,
        BreakerMode::ForcedClosed => 2,
        BreakerMode::Disabled => 3,
        BreakerMode::MetricsOnly => 4,
        _ => 0,
    }
}

/// The stored text of a state (see [`scripts::BREAKER`]).
fn encode(s: &CircuitBreakerState) -> String {
    let st = match s.state {
        CircuitState::Closed => 0,
        CircuitState::Open => 1,
        CircuitState::HalfOpen => 2,
    };
    let mut out = format!(
        "{st} {} {} {} {} {} {} {}",
        mode_code(s.mode),
        s.consecutive_failures,
        s.half_open_successes,
        s.trips,
        s.opened_at.as_nanos() / 1000,
        s.open_until.as_nanos() / 1000,
        s.next_probe
    );
    for p in &s.probes {
        out.push_str(&format!(" {} {}", p.id.0, p.deadline.as_nanos() / 1000));
    }
    out
}

fn decode(text: &str) -> Result<CircuitBreakerState, StoreError> {
    let fields: Result<Vec<u64>, _> = text.split(' ').map(str::parse::<u64>).collect();
    let f = fields.map_err(|e| StoreError::Corrupt(format!("breaker state {text:?}: {e}")))?;
    if f.len() < 8 || f.len() % 2 != 0 {
        return Err(StoreError::Corrupt(format!(
            "breaker state {text:?} has {} fields",
            f.len()
        )));
    }
    let small = |v: u64| u32::try_from(v).unwrap_or(u32::MAX);
    let ts = |us: u64| Timestamp::from_nanos(us.saturating_mul(1000));
    Ok(CircuitBreakerState {
        state: state_code(i64::from(small(f[0]).min(3))),
        mode: match f[1] {
            1 => BreakerMode::ForcedOpen,
            2 => BreakerMode::ForcedClosed,
            3 => BreakerMode::Disabled,
            4 => BreakerMode::MetricsOnly,
            _ => BreakerMode::Normal,
        },
        consecutive_failures: small(f[2]),
        half_open_successes: small(f[3]),
        trips: small(f[4]),
        opened_at: ts(f[5]),
        open_until: ts(f[6]),
        next_probe: small(f[7]),
        probes: f[8..]
            .chunks(2)
            .map(|c| Probe {
                id: ProbeId(small(c[0])),
                deadline: ts(c[1]),
            })
            .collect(),
        ..CircuitBreakerState::default()
    })
}

impl RedisBreakerStore {
    /// A store in the Redis behind `client`. Nothing is connected yet: the
    /// first call connects.
    pub fn new(client: redis::Client, options: RedisOptions) -> Result<Self, ConfigError> {
        Self::on(Target::Single(client), options)
    }

    /// A store in a Redis Cluster (cargo feature `redis-cluster`): each
    /// decision is one script call on its key's slot, `MOVED`/`ASK` are
    /// followed and a script lost in a failover is loaded again. Nothing is
    /// connected yet: the first call connects.
    #[cfg(feature = "redis-cluster")]
    #[cfg_attr(docsrs, doc(cfg(feature = "redis-cluster")))]
    pub fn cluster(
        client: redis::cluster::ClusterClient,
        options: RedisOptions,
    ) -> Result<Self, ConfigError> {
        Self::on(Target::Cluster(client), options)
    }

    pub(crate) fn on(target: Target, options: RedisOptions) -> Result<Self, ConfigError> {
        options.validate()?;
        Ok(RedisBreakerStore {
            link: Link::new(target, options, "breaker"),
            script: redis::Script::new(scripts::BREAKER),
        })
    }

    /// Checks that Redis answers and holds the breaker script (loading it),
    /// within the connect timeout plus the call timeout.
    pub async fn verify(&self) -> Result<(), ConfigError> {
        self.link.verify(&[&self.script]).await
    }

    /// [`verify`](Self::verify) for synchronous code (the builders' `build()`
    /// with [`RedisOptions::verify_on_build`]): blocks the calling thread.
    pub fn verify_blocking(&self) -> Result<(), ConfigError> {
        self.link.verify_blocking(&[&self.script])
    }

    /// Whether this store can run `policy` with its options: the rules of
    /// [`supports`](Self::supports), and a [`RedisOptions::breaker_ttl`] that
    /// outlives the open time plus the probe deadline (a key that expired
    /// while open would close the breaker early).
    pub fn check(&self, policy: &BreakerPolicy) -> Result<(), ConfigError> {
        Self::supports(policy)?;
        let needed = policy.timeout.saturating_add(policy.probe_deadline);
        if self.link.options.breaker_ttl < needed {
            return Err(ConfigError::invalid(
                "breaker_ttl",
                format!(
                    "the Redis breaker TTL ({:?}) must be at least the open time plus the probe \
                     deadline ({needed:?}), or an open breaker could expire and close early",
                    self.link.options.breaker_ttl
                ),
            ));
        }
        Ok(())
    }

    /// Whether this store can run `policy` (see "Supported policy" above).
    pub fn supports(policy: &BreakerPolicy) -> Result<(), ConfigError> {
        let refuse = |field: &'static str| {
            Err(ConfigError::invalid(
                field,
                "the Redis breaker store supports consecutive_failures, success_threshold, \
                 timeout, half_open_max_probes and probe_deadline; remove this rule or use \
                 StatePersistence::Memory",
            ))
        };
        if policy.failures_in_window.is_some() {
            return refuse("failures_in_window");
        }
        if policy.failure_rate.is_some() {
            return refuse("failure_rate");
        }
        if policy.slow_calls.is_some() {
            return refuse("slow_calls");
        }
        if policy.open_backoff.is_some() {
            return refuse("open_backoff");
        }
        Ok(())
    }

    /// The mode (normal or the failure policy's) and the counters, for metrics.
    pub fn health(&self) -> RedisHealth {
        self.link.health()
    }

    /// The Redis key holding `scope_key`'s breaker.
    pub fn redis_key(&self, scope_key: &str) -> String {
        keys::key(&self.link.options.key_prefix, scope_key, "cb")
    }

    fn ttl_ms(&self) -> u64 {
        u64::try_from(self.link.options.breaker_ttl.as_millis()).unwrap_or(u64::MAX)
    }

    #[allow(clippy::too_many_arguments)]
    async fn run(
        &self,
        key: &str,
        policy: &BreakerPolicy,
        op: &str,
        result: u8,
        probe: i64,
        now_us: i64,
    ) -> Result<Vec<i64>, StoreError> {
        Self::supports(policy).map_err(|e| StoreError::Other(e.to_string()))?;
        let mut cmd = scripts::evalsha(&self.script, &self.redis_key(key), 10);
        cmd.arg(now_us)
            .arg(op)
            .arg(policy.consecutive_failures)
            .arg(policy.success_threshold)
            .arg(micros(policy.timeout))
            .arg(policy.half_open_max_probes)
            .arg(micros(policy.probe_deadline))
            .arg(self.ttl_ms())
            .arg(result)
            .arg(probe);
        let script = &self.script;
        self.link
            .call(|mut conn| async move { scripts::run(script, &cmd, &mut conn).await })
            .await
    }

    /// [`store::acquire`](crate::store::acquire) in Redis;
    /// `now_us` is `-1` (Redis `TIME`) except in tests.
    pub(crate) async fn acquire_at(
        &self,
        key: &str,
        policy: &BreakerPolicy,
        now_us: i64,
    ) -> Result<(Admission, Option<Transition>), StoreError> {
        let r = self.run(key, policy, "a", 0, -1, now_us).await?;
        if r.len() != 6 {
            return Err(StoreError::Corrupt(format!(
                "breaker script replied with {} values, expected 6",
                r.len()
            )));
        }
        let admission = if r[0] == 1 {
            Admission::Allowed {
                probe: u32::try_from(r[1]).ok().map(ProbeId),
            }
        } else {
            Admission::Rejected {
                retry_after: Duration::from_micros(u64::try_from(r[2]).unwrap_or(0)),
            }
        };
        Ok((admission, transition(r[3], r[4], r[5])))
    }

    /// [`store::record`](crate::store::record) in Redis;
    /// `now_us` is `-1` (Redis `TIME`) except in tests.
    pub(crate) async fn record_at(
        &self,
        key: &str,
        policy: &BreakerPolicy,
        result: Verdict,
        probe: Option<ProbeId>,
        now_us: i64,
    ) -> Result<Option<Transition>, StoreError> {
        let code = match result {
            Verdict::Success => 0,
            Verdict::Failure | Verdict::TimedOut => 1,
            Verdict::Neutral => 2,
        };
        let probe = probe.map_or(-1, |p| i64::from(p.0));
        let r = self.run(key, policy, "r", code, probe, now_us).await?;
        if r.len() != 3 {
            return Err(StoreError::Corrupt(format!(
                "breaker script replied with {} values, expected 3",
                r.len()
            )));
        }
        Ok(transition(r[0], r[1], r[2]))
    }

    /// [`store::set_mode`](crate::store::set_mode) in Redis.
    pub(crate) async fn set_mode_at(
        &self,
        key: &str,
        mode: BreakerMode,
        now_us: i64,
    ) -> Result<(), StoreError> {
        let mut cmd = scripts::evalsha(&self.script, &self.redis_key(key), 10);
        cmd.arg(now_us)
            .arg("m")
            .arg(0)
            .arg(0)
            .arg(0)
            .arg(0)
            .arg(0)
            .arg(self.ttl_ms())
            .arg(mode_code(mode))
            .arg(-1);
        let script = &self.script;
        self.link
            .call(|mut conn| async move { scripts::run::<Vec<i64>, _>(script, &cmd, &mut conn).await })
            .await
            .map(drop)
    }

    /// The failure policy, counting one decision taken without Redis.
    fn degraded(&self) -> FailurePolicy {
        self.link.count_degraded();
        self.link.options.failure_policy
    }
}

#[async_trait]
impl CircuitBreakerStateStore for RedisBreakerStore {
    fn check_policy(&self, policy: &BreakerPolicy) -> Result<(), ConfigError> {
        self.check(policy)
    }

    fn store_report(&self) -> crate::metrics::StoreReport {
        self.link.store_report()
    }

    async fn get_state(&self, key: &str) -> Result<Option<CircuitBreakerState>, StoreError> {
        let redis_key = self.redis_key(key);
        let text: Option<String> = self
            .link
            .call(|mut conn| async move {
                redis::cmd("GET")
                    .arg(redis_key)
                    .query_async(&mut conn)
                    .await
            })
            .await?;
        text.as_deref().map(decode).transpose()
    }

    async fn set_state(&self, key: &str, state: CircuitBreakerState) -> Result<(), StoreError> {
        let redis_key = self.redis_key(key);
        let text = encode(&state);
        let mut set = redis::cmd("SET");
        set.arg(redis_key).arg(text);
        // An operator's mode lasts until it is reset, whatever the TTL.
        if state.mode == BreakerMode::Normal {
            set.arg("PX").arg(self.ttl_ms());
        }
        self.link
            .call(|mut conn| async move { set.query_async::<()>(&mut conn).await })
            .await
    }

    async fn get_metrics(&self) -> Result<HashMap<String, KeySnapshot>, StoreError> {
        if self.link.target.is_cluster() {
            // A SCAN walks one node; the breakers' own reports cover a cluster.
            return Err(StoreError::Other(
                "listing every breaker key is not supported on Redis Cluster".into(),
            ));
        }
        let prefix = &self.link.options.key_prefix;
        let mut pattern = String::new();
        for c in prefix.chars() {
            if matches!(c, '*' | '?' | '[' | ']' | '\\') {
                pattern.push('\\');
            }
            pattern.push(c);
        }
        pattern.push_str("{*}:cb");
        let mut names: Vec<String> = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let pattern = pattern.clone();
            let (next, batch): (u64, Vec<String>) = self
                .link
                .call(|mut conn| async move {
                    redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(pattern)
                        .arg("COUNT")
                        .arg(1000)
                        .query_async(&mut conn)
                        .await
                })
                .await?;
            names.extend(batch);
            cursor = next;
            if cursor == 0 || names.len() >= MAX_METRIC_KEYS {
                break;
            }
        }
        let mut rows = HashMap::new();
        for chunk in names.chunks(100) {
            let mut pipe = redis::pipe();
            for name in chunk {
                pipe.cmd("GET").arg(name);
            }
            let values: Vec<Option<String>> = self
                .link
                .call(|mut conn| async move { pipe.query_async(&mut conn).await })
                .await?;
            for (name, value) in chunk.iter().zip(values) {
                let Some(text) = value else { continue };
                let Ok(state) = decode(&text) else { continue };
                let tag = name
                    .strip_prefix(prefix.as_str())
                    .and_then(|rest| rest.strip_prefix('{'))
                    .and_then(|rest| rest.strip_suffix("}:cb"))
                    .unwrap_or(name);
                let key = keys::untag(tag);
                rows.insert(
                    key.clone(),
                    KeySnapshot {
                        key,
                        state: state.effective_state(),
                        successes: 0,
                        failures: 0,
                        rejections: 0,
                        transitions: 0,
                    },
                );
            }
        }
        Ok(rows)
    }

    async fn acquire(
        &self,
        key: &str,
        policy: &BreakerPolicy,
        _now: Timestamp,
        _jitter: f64,
    ) -> Result<(Admission, Option<Transition>), StoreError> {
        match self.acquire_at(key, policy, -1).await {
            Ok(v) => Ok(v),
            Err(StoreError::Other(e)) => Err(StoreError::Other(e)),
            Err(e) => match self.degraded() {
                FailurePolicy::FailOpen => Ok((Admission::Allowed { probe: None }, None)),
                FailurePolicy::FailClosed => Ok((
                    Admission::Rejected {
                        retry_after: self.link.options.retry_interval,
                    },
                    None,
                )),
                // The breaker decides from its own last view of the key.
                _ => Err(e),
            },
        }
    }

    async fn record(
        &self,
        key: &str,
        policy: &BreakerPolicy,
        _now: Timestamp,
        result: Verdict,
        _elapsed: Duration,
        probe: Option<ProbeId>,
        _jitter: f64,
    ) -> Result<Option<Transition>, StoreError> {
        match self.record_at(key, policy, result, probe, -1).await {
            Ok(v) => Ok(v),
            Err(StoreError::Other(e)) => Err(StoreError::Other(e)),
            Err(e) => match self.link.options.failure_policy {
                FailurePolicy::FailOpen | FailurePolicy::FailClosed => Ok(None),
                _ => Err(e),
            },
        }
    }

    async fn set_mode(&self, key: &str, mode: BreakerMode) -> Result<(), StoreError> {
        self.set_mode_at(key, mode, -1).await
    }
}
