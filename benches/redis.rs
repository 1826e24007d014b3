//! Redis-backed checks against a plain round trip through the same client,
//! and keys over their limit (denial cache) against an in-memory check.
//! Starts its own `redis-server` on a free port.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use futures_like::join_all;
use pmcp_resilience::rate_limit::{KeyedRateLimiter, RateLimitStrategy, RateLimiter};
use pmcp_resilience::redis_store::{RedisOptions, RedisRateLimiter};
use pmcp_resilience::{ScopeKey, Timestamp};

mod futures_like {
    /// Awaits every future (spawned on the runtime, so they are in flight together).
    pub async fn join_all<F>(futures: Vec<F>)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let handles: Vec<_> = futures.into_iter().map(tokio::spawn).collect();
        for h in handles {
            let _ = h.await;
        }
    }
}

struct Server(Child, u16);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start() -> Option<Server> {
    let port = TcpListener::bind("127.0.0.1:0")
        .ok()?
        .local_addr()
        .ok()?
        .port();
    let child = Command::new("redis-server")
        .args([
            "--bind",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let server = Server(child, port);
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Some(server);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

fn strategies() -> [RateLimitStrategy; 4] {
    [
        RateLimitStrategy::TokenBucket {
            capacity: u32::MAX / 2_000_000,
            refill_rate: 1_000_000,
        },
        RateLimitStrategy::LeakyBucket {
            capacity: 1_000,
            leak_rate: 1_000_000,
        },
        RateLimitStrategy::FixedWindow {
            max_requests: u32::MAX,
            window: Duration::from_secs(1),
        },
        RateLimitStrategy::SlidingWindow {
            max_requests: 1_000_000,
            window: Duration::from_secs(1),
        },
    ]
}

fn bench(c: &mut Criterion) {
    let Some(server) = start() else {
        eprintln!("redis-server could not be started; skipping");
        return;
    };
    let url = format!("redis://127.0.0.1:{}/", server.1);
    let Ok(rt) = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    else {
        return;
    };
    let Ok(client) = redis::Client::open(url.as_str()) else {
        return;
    };
    let options = RedisOptions::default().call_timeout(Duration::from_secs(2));
    let token = strategies()[0];
    let Ok(limiter) = RedisRateLimiter::new(client.clone(), token, options.clone()) else {
        return;
    };
    let limiter = std::sync::Arc::new(limiter);
    let Ok(conn) = rt.block_on(redis::aio::ConnectionManager::new(client.clone())) else {
        return;
    };
    let key = ScopeKey::new("bench:key");
    let t0 = Timestamp::from_nanos(0);

    // MEMORY USAGE per key for each strategy.
    rt.block_on(async {
        for s in strategies() {
            let Ok(l) = RedisRateLimiter::new(client.clone(), s, options.clone()) else {
                continue;
            };
            let _ = l.check(&ScopeKey::new("memory:probe"), 1, t0).await;
            let mut c = conn.clone();
            let bytes: redis::RedisResult<Option<u64>> = redis::cmd("MEMORY")
                .arg("USAGE")
                .arg(l.redis_key("memory:probe"))
                .query_async(&mut c)
                .await;
            println!(
                "MEMORY USAGE {}: {:?} bytes",
                s.label(),
                bytes.ok().flatten()
            );
        }
    });

    let mut g = c.benchmark_group("redis");
    g.measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1));
    for inflight in [1usize, 64] {
        g.bench_function(format!("ping_{inflight}_in_flight"), |b| {
            b.to_async(&rt).iter(|| {
                let futures: Vec<_> = (0..inflight)
                    .map(|_| {
                        let mut c = conn.clone();
                        async move {
                            let _: redis::RedisResult<String> =
                                redis::cmd("PING").query_async(&mut c).await;
                        }
                    })
                    .collect();
                join_all(futures)
            })
        });
        g.bench_function(format!("check_{inflight}_in_flight"), |b| {
            b.to_async(&rt).iter(|| {
                let futures: Vec<_> = (0..inflight)
                    .map(|_| {
                        let l = limiter.clone();
                        let key = key.clone();
                        async move {
                            let _ = l.check(&key, 1, t0).await;
                        }
                    })
                    .collect();
                join_all(futures)
            })
        });
    }
    // A key over its limit: answered by the local denial cache.
    let full = RateLimitStrategy::FixedWindow {
        max_requests: 1,
        window: Duration::from_secs(3600),
    };
    if let Ok(denied) = RedisRateLimiter::new(client.clone(), full, options.clone()) {
        let k = ScopeKey::new("bench:denied");
        rt.block_on(async {
            let _ = denied.check(&k, 1, t0).await;
            let _ = denied.check(&k, 1, t0).await;
        });
        g.bench_function("denied_key_local_cache", |b| {
            b.iter(|| rt.block_on(denied.check(&k, 1, t0)))
        });
    }
    if let Ok(memory) = KeyedRateLimiter::with_strategy(token) {
        g.bench_function("in_memory_check", |b| {
            b.iter(|| rt.block_on(memory.check(&key, 1, t0)))
        });
    }
    g.finish();
    drop(server);
}

criterion_group!(benches, bench);
criterion_main!(benches);
