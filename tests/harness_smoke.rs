//! Checks the end-to-end harness itself against plain pmcp (no middleware of
//! this crate), so the other end-to-end tests rest on facts seen here.

mod support;

use axum::http::StatusCode;
use serde_json::json;
use support::*;

#[tokio::test]
async fn real_server_serves_fails_and_switches_http_status() {
    let server = start_server("smoke").await;
    let mut c = client(transport(&server.url), vec![]);
    initialize(&mut c).await;

    let ok = call(&c, "echo", json!({"message": "hi"})).await;
    assert!(ok.is_ok(), "echo failed: {ok:?}");
    assert_eq!(server.behaviour.calls("echo"), 1);

    let failed = call(&c, "fail", json!({})).await;
    match failed {
        Err(pmcp::Error::Protocol { code, .. }) => assert_eq!(code.as_i32(), -32603),
        other => panic!("expected a JSON-RPC internal error, got {other:?}"),
    }

    server.answer_http(StatusCode::SERVICE_UNAVAILABLE);
    let unavailable = call(&c, "echo", json!({"message": "x"})).await;
    let text = format!("{unavailable:?}");
    assert!(
        text.contains("503"),
        "expected a 503 transport error, got {text}"
    );
    assert_eq!(
        server.behaviour.calls("echo"),
        1,
        "the tool must not run behind a 503"
    );

    server.heal();
    assert!(call(&c, "echo", json!({"message": "y"})).await.is_ok());
}

#[tokio::test]
async fn down_server_refuses_connections() {
    let url = down_url().await;
    let mut c = client(transport(&url), vec![]);
    let result = c.initialize(pmcp::ClientCapabilities::minimal()).await;
    assert!(
        result.is_err(),
        "initialize against a closed port must fail"
    );
}
