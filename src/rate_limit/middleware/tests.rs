use super::*;
use crate::clock::ManualClock;
use pmcp::types::RequestId;

fn pmcp_like(
    max_requests: u32,
    bucket_size: u32,
    every: Duration,
) -> (RateLimitMiddleware, ManualClock) {
    let clock = ManualClock::new();
    let shared: SharedClock = Arc::new(clock.clone());
    let policy = Policy::TokenBucket {
        capacity: bucket_size,
        interval: pmcp_interval(max_requests, bucket_size, every),
    };
    let engine = Engine::Memory(KeyedRateLimiter::from_policy(
        policy,
        "token_bucket",
        RegistryLimits::default(),
        Arc::clone(&shared),
    ));
    let rl = RateLimitMiddleware::from_parts(
        crate::rate_limit::metrics::DEFAULT_REPORT_NAME.to_owned(),
        Scope::Global,
        engine,
        RequestCost::default(),
        BackpressureConfig::default(),
        1,
        MetricsConfig::default(),
        shared,
        RequestTarget::default(),
    );
    (rl, clock)
}

async fn admitted(rl: &RateLimitMiddleware, n: usize) -> usize {
    let mut ok = 0;
    for _ in 0..n {
        let mut r = JSONRPCRequest {
            jsonrpc: "2.0".into(),
            method: "ping".into(),
            params: None,
            id: RequestId::from(1i64),
        };
        if rl
            .on_request_with_context(&mut r, &MiddlewareContext::default())
            .await
            .is_ok()
        {
            ok += 1;
        }
    }
    ok
}

#[tokio::test]
async fn new_refills_max_requests_per_refill_duration() {
    let (rl, clock) = pmcp_like(2, 3, Duration::from_secs(1));
    assert_eq!(admitted(&rl, 10).await, 3, "a full bucket of 3");
    clock.advance(Duration::from_secs(1));
    assert_eq!(admitted(&rl, 10).await, 2, "2 tokens per second");
    clock.advance(Duration::from_secs(10));
    assert_eq!(admitted(&rl, 10).await, 3, "never more than the bucket");
}

#[tokio::test]
async fn new_with_zero_max_requests_never_refills() {
    let (rl, clock) = pmcp_like(0, 3, Duration::from_secs(1));
    assert_eq!(admitted(&rl, 10).await, 3);
    clock.advance(Duration::from_secs(86_400 * 365));
    assert_eq!(admitted(&rl, 10).await, 0);
}
