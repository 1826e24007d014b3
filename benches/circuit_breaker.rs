//! The cost of one request (`on_request` + `on_response`) through pmcp's
//! `EnhancedMiddlewareChain`, with this crate's breaker (per-endpoint scope,
//! 1 key and 10,000 keys) beside pmcp's own global `CircuitBreakerMiddleware`,
//! on one thread and on two, in the same run.
//!
//! Each request gets a fresh `MiddlewareContext`, as pmcp's client creates one
//! per request. Run: `cargo bench --bench circuit_breaker`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use pmcp::shared::{AdvancedMiddleware, EnhancedMiddlewareChain, MiddlewareContext};
use pmcp::types::{JSONRPCRequest, JSONRPCResponse, RequestId};
use pmcp_resilience::Scope;
use pmcp_resilience::circuit_breaker::CircuitBreakerMiddleware;

fn requests(keys: usize) -> Vec<JSONRPCRequest> {
    (0..keys)
        .map(|i| JSONRPCRequest {
            jsonrpc: "2.0".into(),
            method: if keys == 1 {
                "tools/call".to_string()
            } else {
                format!("method/{i}")
            },
            params: None,
            id: RequestId::from(i as i64),
        })
        .collect()
}

fn chain_with(m: Arc<dyn AdvancedMiddleware>) -> Arc<EnhancedMiddlewareChain> {
    let mut chain = EnhancedMiddlewareChain::new();
    chain.add(m);
    Arc::new(chain)
}

fn ours() -> Arc<dyn AdvancedMiddleware> {
    let cb = match CircuitBreakerMiddleware::builder()
        .scope(Scope::PerEndpoint)
        .failure_threshold(5)
        .timeout(Duration::from_secs(30))
        .build()
    {
        Ok(cb) => cb,
        Err(e) => panic!("bench breaker config: {e}"),
    };
    Arc::new(cb.for_server("http://127.0.0.1:8080/mcp"))
}

fn pmcp_global() -> Arc<dyn AdvancedMiddleware> {
    Arc::new(pmcp::shared::CircuitBreakerMiddleware::new(
        5,
        Duration::from_secs(60),
        Duration::from_secs(30),
    ))
}

/// Runs `iters` requests on each of `threads` threads; returns the mean wall
/// time per request per thread.
fn run(
    chain: &Arc<EnhancedMiddlewareChain>,
    reqs: &Arc<Vec<JSONRPCRequest>>,
    threads: usize,
    iters: u64,
) -> Duration {
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            let chain = chain.clone();
            let reqs = reqs.clone();
            s.spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread().build() {
                    Ok(rt) => rt,
                    Err(e) => panic!("runtime: {e}"),
                };
                rt.block_on(async move {
                    let mut i = t * 7919;
                    for _ in 0..iters {
                        let mut req = reqs[i % reqs.len()].clone();
                        i += 1;
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
                });
            });
        }
    });
    start.elapsed()
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("breaker_request");
    group
        .measurement_time(Duration::from_secs(4))
        .warm_up_time(Duration::from_secs(1))
        .sample_size(30);
    // Both breakers see the same request streams (1 method, or 10,000
    // methods cycling), so the harness's own cost is the same on both sides.
    for threads in [1usize, 2] {
        for keys in [1usize, 10_000] {
            let reqs = Arc::new(requests(keys));
            let pmcp_chain = chain_with(pmcp_global());
            group.bench_with_input(
                BenchmarkId::new(format!("pmcp_global/{threads}t"), keys),
                &threads,
                |b, &t| b.iter_custom(|iters| run(&pmcp_chain, &reqs, t, iters)),
            );
            let chain = chain_with(ours());
            group.bench_with_input(
                BenchmarkId::new(format!("ours_per_endpoint/{threads}t"), keys),
                &threads,
                |b, &t| b.iter_custom(|iters| run(&chain, &reqs, t, iters)),
            );
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
