//! Redis options for tests about correctness, not latency: timeouts a
//! loaded CI machine does not miss (a lazy connection included).

use std::time::Duration;

use pmcp_resilience::redis_store::RedisOptions;

/// The default options with a 10 s connect timeout and a 5 s call timeout.
pub fn patient() -> RedisOptions {
    RedisOptions::default()
        .connect_timeout(Duration::from_secs(10))
        .call_timeout(Duration::from_secs(5))
}
