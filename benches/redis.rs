//! Redis-backed decisions against the bare round trips they are made of,
//! side by side in one run, on one Redis node and (cargo feature
//! `redis-cluster`) a cluster of three masters, each started by the bench on
//! free loopback ports:
//! - at 1 in flight: a token bucket decision and a breaker decision against
//!   a `PING` on the same kind of connection (routed to the key's master on
//!   a cluster);
//! - at 64 in flight (64 futures joined on one task, sharing one multiplexed
//!   connection): the same decisions against 64 raw `EVALSHA` of the same
//!   script with the same arguments.
//!
//! Also: a key over its limit (answered by the local denial cache) and an
//! in-memory check. At the end, the medians of this run are printed as
//! ratios (decision / baseline).
//!
//! `cargo bench --features redis,redis-cluster --bench redis`

#[path = "../tests/support/redis.rs"]
mod server;

#[cfg(feature = "redis-cluster")]
#[path = "../tests/support/redis_cluster.rs"]
mod cluster;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use criterion::{
    BenchmarkGroup, Criterion, criterion_group, criterion_main, measurement::WallTime,
};
use parking_lot::Mutex;
use pmcp_resilience::circuit_breaker::BreakerPolicy;
use pmcp_resilience::rate_limit::{KeyedRateLimiter, RateLimitStrategy, RateLimiter};
use pmcp_resilience::redis_store::{RedisBreakerStore, RedisOptions, RedisRateLimiter};
use pmcp_resilience::{CircuitBreakerStateStore, ScopeKey, Timestamp};
use redis::aio::ConnectionLike;
use tokio::runtime::Runtime;

const LIMITER_LUA: &str = include_str!("../src/redis_store/limiter.lua");
const BREAKER_LUA: &str = include_str!("../src/redis_store/breaker.lua");

/// Never empties at bench rates: 2147 tokens, one back every microsecond.
const CAPACITY: u32 = u32::MAX / 2_000_000;
const REFILL_PER_S: u32 = 1_000_000;
const LIMITER_KEY: &str = "bench:limiter";
const BREAKER_KEY: &str = "bench:breaker";
const IN_FLIGHT: usize = 64;

/// Wakes the joining task and files one future as ready to be polled.
struct Wakes {
    index: usize,
    ready: Arc<Mutex<Vec<usize>>>,
    task: Arc<Mutex<Option<Waker>>>,
}

impl Wake for Wakes {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.ready.lock().push(self.index);
        if let Some(task) = self.task.lock().as_ref() {
            task.wake_by_ref();
        }
    }
}

/// Runs every future on the current task until all are done: they are in
/// flight together, with no task spawned per request. Each future has a
/// waker of its own and is polled again only when it was woken, as a task
/// of its own would be (polling all of them on every wake would cost the
/// deeper futures more than the shallow ones).
async fn join_all<F: Future<Output = ()>>(futures: Vec<F>) {
    let n = futures.len();
    let mut pending: Vec<Option<Pin<Box<F>>>> =
        futures.into_iter().map(|f| Some(Box::pin(f))).collect();
    let ready = Arc::new(Mutex::new((0..n).collect::<Vec<_>>()));
    let task = Arc::new(Mutex::new(None::<Waker>));
    let wakers: Vec<Waker> = (0..n)
        .map(|index| {
            Waker::from(Arc::new(Wakes {
                index,
                ready: Arc::clone(&ready),
                task: Arc::clone(&task),
            }))
        })
        .collect();
    let mut left = n;
    // Out of tokio's cooperative budget: a future that runs out of it is
    // woken only when the runtime gets round to it (about a timer tick
    // later), which would time the runtime, not Redis.
    let joined = std::future::poll_fn(move |cx| {
        *task.lock() = Some(cx.waker().clone());
        // One pass per poll: a future woken while it is polled is polled
        // on the next one.
        let batch = std::mem::take(&mut *ready.lock());
        for i in batch {
            let Some(f) = pending[i].as_mut() else {
                continue;
            };
            if f.as_mut()
                .poll(&mut Context::from_waker(&wakers[i]))
                .is_ready()
            {
                pending[i] = None;
                left -= 1;
            }
        }
        if left == 0 {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    });
    tokio::task::unconstrained(joined).await
}

/// `EVALSHA <sha of source> 1 <key>`, to which the arguments are added.
fn evalsha(source: &str, key: &str) -> redis::Cmd {
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(redis::Script::new(source).get_hash())
        .arg(1)
        .arg(key);
    cmd
}

/// A `PING` on a connection, as one place routes it.
type Ping<C> = Arc<dyn Fn(C) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// One place to bench: a connection of the kind the stores use, and the
/// stores on the same Redis.
struct Place<C> {
    name: &'static str,
    conn: C,
    /// `PING` as this place routes it (to the key's master on a cluster).
    ping: Ping<C>,
    limiter: Arc<RedisRateLimiter>,
    breaker: Arc<RedisBreakerStore>,
}

fn options() -> RedisOptions {
    // Generous: a timeout must not turn a slow sample into a local decision.
    RedisOptions::default()
        .call_timeout(Duration::from_secs(5))
        .key_prefix("bench:")
}

fn strategy() -> RateLimitStrategy {
    RateLimitStrategy::TokenBucket {
        capacity: CAPACITY,
        refill_rate: REFILL_PER_S,
    }
}

/// The command the limiter sends for a check: Redis time, token bucket,
/// capacity, interval (µs), acquire, cost 1, no wait, the states only with
/// a reservation.
fn limiter_cmd(limiter: &RedisRateLimiter) -> redis::Cmd {
    let mut cmd = evalsha(LIMITER_LUA, &limiter.redis_key(LIMITER_KEY));
    cmd.arg(-1)
        .arg(3)
        .arg(CAPACITY)
        .arg(1_000_000 / REFILL_PER_S)
        .arg("a")
        .arg(1)
        .arg(0)
        .arg(0);
    cmd
}

/// The command the breaker store sends for an acquire under `policy`.
fn breaker_cmd(breaker: &RedisBreakerStore, policy: &BreakerPolicy) -> redis::Cmd {
    let us = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
    let ttl_ms = u64::try_from(options().breaker_ttl.as_millis()).unwrap_or(u64::MAX);
    let mut cmd = evalsha(BREAKER_LUA, &breaker.redis_key(BREAKER_KEY));
    cmd.arg(-1)
        .arg("a")
        .arg(policy.consecutive_failures)
        .arg(policy.success_threshold)
        .arg(us(policy.timeout))
        .arg(policy.half_open_max_probes)
        .arg(us(policy.probe_deadline))
        .arg(ttl_ms)
        .arg(0)
        .arg(-1);
    cmd
}

fn bench_place<C>(g: &mut BenchmarkGroup<'_, WallTime>, rt: &Runtime, place: &Place<C>)
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    let name = place.name;
    let policy = BreakerPolicy::default();
    let limiter_key = ScopeKey::new(LIMITER_KEY);
    let t0 = Timestamp::from_nanos(0);
    // Loads both scripts on the keys' masters, so the raw calls find them.
    rt.block_on(async {
        let _ = place.limiter.check(&limiter_key, 1, t0).await;
        let _ = place.breaker.acquire(BREAKER_KEY, &policy, t0, 0.5).await;
    });
    let limiter_raw = limiter_cmd(&place.limiter);
    let breaker_raw = breaker_cmd(&place.breaker, &policy);
    rt.block_on(async {
        let mut c = place.conn.clone();
        let l: redis::RedisResult<Vec<i64>> = limiter_raw.query_async(&mut c).await;
        let b: redis::RedisResult<Vec<i64>> = breaker_raw.query_async(&mut c).await;
        if let Err(e) = l.and(b) {
            eprintln!("{name}: raw EVALSHA failed ({e}); its figures mean nothing");
        }
    });

    for n in [1, IN_FLIGHT] {
        g.bench_function(format!("{name}_ping_{n}"), |b| {
            b.to_async(rt)
                .iter(|| join_all((0..n).map(|_| (place.ping)(place.conn.clone())).collect()))
        });
        g.bench_function(format!("{name}_token_bucket_{n}"), |b| {
            b.to_async(rt).iter(|| {
                join_all(
                    (0..n)
                        .map(|_| async {
                            let _ = place.limiter.check(&limiter_key, 1, t0).await;
                        })
                        .collect(),
                )
            })
        });
        g.bench_function(format!("{name}_evalsha_token_bucket_{n}"), |b| {
            b.to_async(rt).iter(|| {
                join_all(
                    (0..n)
                        .map(|_| {
                            let mut c = place.conn.clone();
                            let cmd = &limiter_raw;
                            async move {
                                let _: redis::RedisResult<Vec<i64>> = cmd.query_async(&mut c).await;
                            }
                        })
                        .collect(),
                )
            })
        });
        g.bench_function(format!("{name}_breaker_{n}"), |b| {
            b.to_async(rt).iter(|| {
                join_all(
                    (0..n)
                        .map(|_| async {
                            let _ = place.breaker.acquire(BREAKER_KEY, &policy, t0, 0.5).await;
                        })
                        .collect(),
                )
            })
        });
        g.bench_function(format!("{name}_evalsha_breaker_{n}"), |b| {
            b.to_async(rt).iter(|| {
                join_all(
                    (0..n)
                        .map(|_| {
                            let mut c = place.conn.clone();
                            let cmd = &breaker_raw;
                            async move {
                                let _: redis::RedisResult<Vec<i64>> = cmd.query_async(&mut c).await;
                            }
                        })
                        .collect(),
                )
            })
        });
    }
}

fn stores(
    limiter: Result<RedisRateLimiter, pmcp_resilience::ConfigError>,
    breaker: Result<RedisBreakerStore, pmcp_resilience::ConfigError>,
) -> Option<(Arc<RedisRateLimiter>, Arc<RedisBreakerStore>)> {
    match (limiter, breaker) {
        (Ok(l), Ok(b)) => Some((Arc::new(l), Arc::new(b))),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("stores: {e}");
            None
        }
    }
}

fn single_node(rt: &Runtime, url: &str) -> Option<Place<redis::aio::ConnectionManager>> {
    let client = redis::Client::open(url).ok()?;
    let conn = rt
        .block_on(redis::aio::ConnectionManager::new(client.clone()))
        .ok()?;
    let (limiter, breaker) = stores(
        RedisRateLimiter::new(client.clone(), strategy(), options()),
        RedisBreakerStore::new(client, options()),
    )?;
    Some(Place {
        name: "single",
        conn,
        ping: Arc::new(|mut c| {
            Box::pin(async move {
                let _: redis::RedisResult<String> = redis::cmd("PING").query_async(&mut c).await;
            })
        }),
        limiter,
        breaker,
    })
}

#[cfg(feature = "redis-cluster")]
fn cluster_of(
    rt: &Runtime,
    urls: Vec<String>,
) -> Option<Place<redis::cluster_async::ClusterConnection>> {
    use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
    let client = redis::cluster::ClusterClient::new(urls).ok()?;
    let conn = rt.block_on(client.get_async_connection()).ok()?;
    let (limiter, breaker) = stores(
        RedisRateLimiter::cluster(client.clone(), strategy(), options()),
        RedisBreakerStore::cluster(client, options()),
    )?;
    // A cluster sends a bare PING to every master: route it to the one
    // holding the limiter's key instead, as a decision is routed.
    let key = limiter.redis_key(LIMITER_KEY);
    Some(Place {
        name: "cluster",
        conn,
        ping: Arc::new(move |mut c| {
            let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(
                Route::with_key(key.as_bytes(), SlotAddr::Master),
            ));
            Box::pin(async move {
                let _ = c.route_command(redis::cmd("PING"), route).await;
            })
        }),
        limiter,
        breaker,
    })
}

/// The median of one bench of this run, in ns, as criterion saved it.
fn median_ns(group: &str, id: &str) -> Option<f64> {
    let dir = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into());
    let path = format!("{dir}/criterion/{group}/{id}/new/estimates.json");
    let text = std::fs::read_to_string(path).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v["median"]["point_estimate"].as_f64()
}

fn print_ratios(group: &str, places: &[&str]) {
    println!("\nmedians of this run (decision / baseline):");
    for place in places {
        for n in [1, IN_FLIGHT] {
            for (what, base) in [("token_bucket", "ping"), ("breaker", "ping")]
                .into_iter()
                .chain(
                    [
                        ("token_bucket", "evalsha_token_bucket"),
                        ("breaker", "evalsha_breaker"),
                    ]
                    .into_iter()
                    .filter(|_| n == IN_FLIGHT),
                )
            {
                let a = median_ns(group, &format!("{place}_{what}_{n}"));
                let b = median_ns(group, &format!("{place}_{base}_{n}"));
                if let (Some(a), Some(b)) = (a, b) {
                    println!(
                        "  {place:7} {n:2} in flight  {what:12} {:>10.1} us  vs {base:20} {:>10.1} us  = {:.2}x",
                        a / 1e3,
                        b / 1e3,
                        a / b
                    );
                }
            }
        }
    }
}

fn bench(c: &mut Criterion) {
    let Ok(rt) = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    else {
        eprintln!("no tokio runtime; skipping");
        return;
    };
    let single = server::RedisServer::start();
    #[cfg(feature = "redis-cluster")]
    let cluster = cluster::RedisCluster::start();

    const GROUP: &str = "redis";
    let mut g = c.benchmark_group(GROUP);
    g.measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1));
    let mut places = Vec::new();
    if let Some(place) = single_node(&rt, &single.url()) {
        bench_place(&mut g, &rt, &place);
        places.push(place.name);
    }
    #[cfg(feature = "redis-cluster")]
    if let Some(place) = cluster_of(&rt, cluster.urls()) {
        bench_place(&mut g, &rt, &place);
        places.push(place.name);
    }

    // A key over its limit: answered by the local denial cache.
    let full = RateLimitStrategy::FixedWindow {
        max_requests: 1,
        window: Duration::from_secs(3600),
    };
    let t0 = Timestamp::from_nanos(0);
    if let Ok(client) = redis::Client::open(single.url())
        && let Ok(denied) = RedisRateLimiter::new(client, full, options())
    {
        let k = ScopeKey::new("bench:denied");
        rt.block_on(async {
            let _ = denied.check(&k, 1, t0).await;
            let _ = denied.check(&k, 1, t0).await;
        });
        g.bench_function("denied_key_local_cache", |b| {
            b.to_async(&rt).iter(|| denied.check(&k, 1, t0))
        });
    }
    if let Ok(memory) = KeyedRateLimiter::with_strategy(strategy()) {
        let k = ScopeKey::new(LIMITER_KEY);
        g.bench_function("in_memory_check", |b| {
            b.to_async(&rt).iter(|| memory.check(&k, 1, t0))
        });
    }
    g.finish();
    print_ratios(GROUP, &places);
}

criterion_group!(benches, bench);
criterion_main!(benches);
