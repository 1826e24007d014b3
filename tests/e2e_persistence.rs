//! End to end: a breaker with file persistence on a real pmcp client, against
//! a real pmcp streamable-HTTP server on 127.0.0.1, across a "restart" (the
//! client and breaker are dropped and built again on the same file).

mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use pmcp::shared::AdvancedMiddleware;
use pmcp_resilience::circuit_breaker::{CircuitBreakerMiddleware, CircuitState};
use pmcp_resilience::{ConfigError, ManualClock, Scope, StatePersistence};
use serde_json::json;
use support::*;

fn build(path: &Path, clock: &ManualClock) -> Result<CircuitBreakerMiddleware, ConfigError> {
    // Per method, so `initialize` of the next client is not blocked by the
    // open breaker of `tools/call`.
    CircuitBreakerMiddleware::builder()
        .scope(Scope::PerMethod)
        .failure_threshold(3)
        .timeout(Duration::from_secs(30))
        .clock(Arc::new(clock.clone()))
        .persistence(StatePersistence::File(path.to_owned()))
        .build()
}

fn breaker(path: &Path, clock: &ManualClock) -> CircuitBreakerMiddleware {
    match build(path, clock) {
        Ok(cb) => cb,
        Err(e) => panic!("breaker config rejected: {e}"),
    }
}

/// The breaker on `path`, once the previous one has let go of the file
/// (up to 30 s on a loaded machine).
async fn reopen(path: &Path, clock: &ManualClock) -> CircuitBreakerMiddleware {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        match build(path, clock) {
            Ok(cb) => return cb,
            Err(_) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("the state file was never released: {e}"),
        }
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

    // The client's background task lets go of its middleware (and with it
    // the state file) when the runtime gets to it: wait for that, not for
    // a fixed time.
    let cb = reopen(&path, &clock).await;
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
