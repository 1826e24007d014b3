//! The key text `state_of` and `retry_after` take: `tool:search`, as
//! `key_of_tool` builds it; a bare `search` is no key, and the log says so.

#[path = "support/logs.rs"]
mod logs;

use std::sync::Arc;
use std::time::Duration;

use logs::capture_debug;
use pmcp_resilience::{
    CircuitBreakerMiddleware, CircuitState, ManualClock, RateLimitMiddleware, RateLimitStrategy,
    Scope,
};

#[test]
fn breaker_keys_carry_the_scope_prefix() {
    let clock = ManualClock::new();
    let breaker = match CircuitBreakerMiddleware::builder()
        .scope(Scope::PerTool)
        .failure_threshold(1)
        .timeout(Duration::from_secs(30))
        .clock(Arc::new(clock.clone()))
        .build()
    {
        Ok(cb) => cb,
        Err(e) => panic!("breaker: {e}"),
    };
    let key = breaker.key_of_tool("search");
    assert_eq!(key.as_str(), "tool:search");
    breaker.force_open(key.as_str());
    assert_eq!(breaker.state_of(key.as_str()), Some(CircuitState::Open));

    let (state, log) = capture_debug(|| breaker.state_of("search"));
    assert_eq!(state, None, "a bare tool name is no key");
    assert!(
        log.contains("tool:search") && log.contains("key_of_tool"),
        "the log should say which key was meant: {log}"
    );
    // A well-formed key that is simply not held logs nothing.
    let (state, log) = capture_debug(|| breaker.state_of("tool:other"));
    assert_eq!(state, None);
    assert!(
        !log.contains("prefix"),
        "no hint for a well-formed key: {log}"
    );
}

#[test]
fn limiter_keys_carry_the_scope_prefix() {
    let clock = ManualClock::new();
    let limiter = match RateLimitMiddleware::builder()
        .scope(Scope::PerMethod)
        .strategy(RateLimitStrategy::FixedWindow {
            max_requests: 1,
            window: Duration::from_secs(60),
        })
        .clock(Arc::new(clock.clone()))
        .build()
    {
        Ok(rl) => rl,
        Err(e) => panic!("limiter: {e}"),
    };
    assert_eq!(limiter.key_of_tool("search").as_str(), "method:tools/call");
    let (wait, log) = capture_debug(|| limiter.retry_after("tools/call"));
    assert_eq!(wait, None);
    assert!(
        log.contains("method:tools/call"),
        "the log should show the prefixed form: {log}"
    );
}
