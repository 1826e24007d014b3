//! Per-check cost of this crate's keyed limiter beside governor 0.10's keyed
//! limiter (`DefaultKeyedRateLimiter<String>`, DashMap store, `check_key`), on
//! the same keys in the same run: 1, 10,000 and 1,000,000 keys, one thread and
//! two; all four strategies; and the whole middleware path through pmcp's
//! `EnhancedMiddlewareChain` beside pmcp's own `RateLimitMiddleware`.
//!
//! Quotas are generous so that both sides admit (the common path).
//! Run: `cargo bench --bench rate_limit`.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter as Governor};
use pmcp::shared::{AdvancedMiddleware, EnhancedMiddlewareChain, MiddlewareContext};
use pmcp::types::{JSONRPCRequest, JSONRPCResponse, RequestId};
use pmcp_resilience::rate_limit::{KeyedRateLimiter, RateLimitMiddleware, RateLimitStrategy};
use pmcp_resilience::{RegistryLimits, Scope, SystemClock};

const RATE: u32 = 1_000_000_000;

fn keys(n: usize) -> Arc<Vec<String>> {
    Arc::new(
        (0..n)
            .map(|i| format!("session:{i:08x}-0000-4000-8000-000000000000"))
            .collect(),
    )
}

fn ours(strategy: RateLimitStrategy) -> Arc<KeyedRateLimiter> {
    let limits = RegistryLimits {
        max_keys: 2_000_000,
        idle_after: Duration::from_secs(3600),
    };
    match KeyedRateLimiter::new(strategy, limits, Arc::new(SystemClock::new())) {
        Ok(l) => Arc::new(l),
        Err(e) => panic!("bench limiter config: {e}"),
    }
}

fn governor() -> Arc<DefaultKeyedRateLimiter<String>> {
    let rate = NonZeroU32::new(RATE).unwrap_or(NonZeroU32::MIN);
    let burst = NonZeroU32::new(1000).unwrap_or(NonZeroU32::MIN);
    Arc::new(Governor::keyed(Quota::per_second(rate).allow_burst(burst)))
}

/// `iters` checks on each of `threads` threads, each thread walking the keys
/// from its own offset; returns the wall time (so per-thread time per check).
fn run_threads(
    threads: usize,
    iters: u64,
    keys: &Arc<Vec<String>>,
    check: impl Fn(&String) -> bool + Sync,
) -> Duration {
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            let keys = keys.clone();
            let check = &check;
            s.spawn(move || {
                let n = keys.len();
                let mut i = (t * 7919) % n;
                let mut admitted = 0u64;
                for _ in 0..iters {
                    admitted += u64::from(check(&keys[i]));
                    i += 1;
                    if i == n {
                        i = 0;
                    }
                }
                std::hint::black_box(admitted);
            });
        }
    });
    start.elapsed()
}

fn strategies() -> Vec<(&'static str, RateLimitStrategy)> {
    vec![
        (
            "token_bucket",
            RateLimitStrategy::TokenBucket {
                capacity: 1000,
                refill_rate: RATE,
            },
        ),
        (
            "fixed_window",
            RateLimitStrategy::FixedWindow {
                max_requests: u32::MAX,
                window: Duration::from_secs(1),
            },
        ),
        (
            "sliding_window",
            RateLimitStrategy::SlidingWindow {
                max_requests: u32::MAX,
                window: Duration::from_secs(1),
            },
        ),
        (
            "leaky_bucket",
            RateLimitStrategy::LeakyBucket {
                capacity: u32::MAX,
                leak_rate: RATE,
            },
        ),
    ]
}

fn check(c: &mut Criterion) {
    let mut group = c.benchmark_group("check");
    group
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1))
        .sample_size(20);
    for n in [1usize, 10_000, 1_000_000] {
        let ks = keys(n);
        for threads in [1usize, 2] {
            let g = governor();
            for k in ks.iter() {
                let _ = g.check_key(k);
            }
            group.bench_with_input(
                BenchmarkId::new(format!("governor/{threads}t"), n),
                &threads,
                |b, &t| {
                    b.iter_custom(|iters| run_threads(t, iters, &ks, |k| g.check_key(k).is_ok()))
                },
            );
            for (name, strategy) in strategies() {
                if n == 1_000_000 && threads == 2 && name != "token_bucket" {
                    continue; // keep the run short: the big-map case matters for the target strategy
                }
                let ours = ours(strategy);
                for k in ks.iter() {
                    let _ = ours.check_key(k, 1);
                }
                group.bench_with_input(
                    BenchmarkId::new(format!("{name}/{threads}t"), n),
                    &threads,
                    |b, &t| {
                        b.iter_custom(|iters| {
                            run_threads(t, iters, &ks, |k| ours.check_key(k, 1).allowed)
                        })
                    },
                );
            }
        }
    }
    group.finish();
}

fn chain_with(m: Arc<dyn AdvancedMiddleware>) -> EnhancedMiddlewareChain {
    let mut chain = EnhancedMiddlewareChain::new();
    chain.add(m);
    chain
}

fn middleware_path(c: &mut Criterion) {
    let mut group = c.benchmark_group("middleware_request");
    group
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1))
        .sample_size(20);
    let rt = match tokio::runtime::Builder::new_current_thread().build() {
        Ok(rt) => rt,
        Err(e) => panic!("runtime: {e}"),
    };
    let pmcp_chain = chain_with(Arc::new(pmcp::shared::RateLimitMiddleware::new(
        RATE,
        RATE,
        Duration::from_secs(1),
    )));
    let ours = match RateLimitMiddleware::builder()
        .scope(Scope::Global)
        .strategy(RateLimitStrategy::TokenBucket {
            capacity: RATE,
            refill_rate: RATE,
        })
        .build()
    {
        Ok(m) => m,
        Err(e) => panic!("bench middleware config: {e}"),
    };
    let our_chain = chain_with(Arc::new(ours));
    for (name, chain) in [
        ("pmcp_rate_limit", &pmcp_chain),
        ("ours_token_bucket", &our_chain),
    ] {
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let start = Instant::now();
                    for i in 0..iters {
                        let mut req = JSONRPCRequest {
                            jsonrpc: "2.0".into(),
                            method: "tools/call".into(),
                            params: None,
                            id: RequestId::from(i as i64),
                        };
                        let ctx = MiddlewareContext::with_request_id(i.to_string());
                        if chain
                            .process_request_with_context(&mut req, &ctx)
                            .await
                            .is_ok()
                        {
                            let mut resp =
                                JSONRPCResponse::success(req.id.clone(), serde_json::Value::Null);
                            let _ = chain.process_response_with_context(&mut resp, &ctx).await;
                        }
                    }
                    start.elapsed()
                })
            })
        });
    }
    group.finish();
}

criterion_group!(benches, check, middleware_path);
criterion_main!(benches);
