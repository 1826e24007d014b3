//! End to end: a breaker with file persistence on a real pmcp client, against
//! a real pmcp streamable-HTTP server on 127.0.0.1, across a "restart" (the
//! client and breaker are dropped and built again on the same file).

mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use pmcp::shared::AdvancedMiddleware;
use pmcp_resilience::circuit_breaker::{CircuitBreakerMiddleware, CircuitState};
use pmcp_resilience::{ManualClock, Scope, StatePersistence};
use serde_json::json;
use support::*;

fn breaker(path: &Path, clock: &ManualClock) -> CircuitBreakerMiddleware {
    // Per method, so `initialize` of the next client is not blocked by the
    // open breaker of `tools/call`.
    match CircuitBreakerMiddleware::builder()
        .scope(Scope::PerMethod)
        .failure_threshold(3)
        .timeout(Duration::from_secs(30))
        .clock(Arc::new(clock.clone()))
        .persistence(StatePersistence::File(path.to_owned()))
        .build()
    {
        Ok(cb) => cb,
        Err(e) => panic!("breaker config rejected: {e}"),
    }
}

fn as_mw(cb: &CircuitBreakerMiddleware) -> Vec<Arc<dyn AdvancedMiddleware>> {
    vec![Arc::new(cb.clone())]
}

#[tokio::test]
async fn a_breaker_opened_before_a_restart_rejects_at_once_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("breakers.json");
    let clock = ManualClock::new();
    let server = start_server("failing").await;
    server.break_flaky();

    let cb = breaker(&path, &clock);
    let mut first = client(transport(&server.url), as_mw(&cb));
    initialize(&mut first).await;
    for _ in 0..3 {
        let r = call(&first, "flaky", json!({})).await;
        assert!(matches!(r, Err(pmcp::Error::Protocol { .. })), "{r:?}");
    }
    assert_eq!(cb.state_of("method:tools/call"), Some(CircuitState::Open));
    let ran = server.behaviour.calls("flaky");
    assert_eq!(ran, 3);

    // The "process" ends without an orderly shutdown.
    drop(first);
    drop(cb);

    let cb = breaker(&path, &clock);
    assert_eq!(cb.state_of("method:tools/call"), Some(CircuitState::Open));
    let mut second = client(transport(&server.url), as_mw(&cb));
    initialize(&mut second).await;
    let r = call(&second, "flaky", json!({})).await;
    assert!(matches!(r, Err(pmcp::Error::CircuitBreakerOpen)), "{r:?}");
    assert_eq!(
        server.behaviour.calls("flaky"),
        ran,
        "the tool must not run while the breaker is open"
    );

    // Once its time is up, a probe reaches the healed server and closes it.
    server.heal();
    clock.advance(Duration::from_secs(30));
    let r = call(&second, "flaky", json!({})).await;
    assert!(r.is_ok(), "{r:?}");
    assert_eq!(cb.state_of("method:tools/call"), Some(CircuitState::Closed));
    cb.shutdown().await.unwrap();
}
