use super::*;

use pmcp::types::RequestId;
use serde_json::json;

#[test]
fn control_bytes_are_found_wherever_they_are() {
    for len in 0..20 {
        for at in 0..len {
            for b in 0..=255u8 {
                let mut bytes = vec![b'a'; len];
                bytes[at] = b;
                let expected = b < 0x20 || b == 0x7f;
                assert_eq!(
                    has_control(&bytes),
                    expected,
                    "byte {b:#x} at {at} of {len}"
                );
            }
        }
        assert!(!has_control(&vec![b'~'; len]));
    }
}

fn request(method: &str, params: Option<serde_json::Value>) -> JSONRPCRequest {
    JSONRPCRequest {
        jsonrpc: "2.0".into(),
        method: method.into(),
        params,
        id: RequestId::from(7i64),
    }
}

fn target() -> RequestTarget {
    RequestTarget::default()
        .with_server_url("http://127.0.0.1:1/mcp")
        .with_session_id("abc")
}

#[test]
fn every_scope_resolves() {
    let r = request("tools/call", Some(json!({"name": "echo", "arguments": {}})));
    let t = target();
    assert_eq!(Scope::Global.key(&r, &t).as_str(), "global");
    assert_eq!(
        Scope::PerServer.key(&r, &t).as_str(),
        "server:http://127.0.0.1:1/mcp"
    );
    assert_eq!(Scope::PerMethod.key(&r, &t).as_str(), "method:tools/call");
    assert_eq!(
        Scope::PerEndpoint.key(&r, &t).as_str(),
        "endpoint:tools/call@http://127.0.0.1:1/mcp"
    );
    assert_eq!(Scope::PerSession.key(&r, &t).as_str(), "session:abc");
    assert_eq!(Scope::PerTool.key(&r, &t).as_str(), "tool:echo");
    let custom = Scope::Custom(Arc::new(|r: &JSONRPCRequest| {
        r.params
            .as_ref()
            .and_then(|p| p.get("user_id"))
            .and_then(|v| v.as_str())
            .unwrap_or("default")
            .to_string()
    }));
    assert_eq!(custom.key(&r, &t).as_str(), "custom:default");
    let with_user = request("tools/call", Some(json!({"user_id": "u1"})));
    assert_eq!(custom.key(&with_user, &t).as_str(), "custom:u1");
}

#[test]
fn per_tool_falls_back_to_method() {
    let t = target();
    assert_eq!(
        Scope::PerTool.key(&request("ping", None), &t).as_str(),
        "method:ping"
    );
    let no_name = request("tools/call", Some(json!({"arguments": {}})));
    assert_eq!(
        Scope::PerTool.key(&no_name, &t).as_str(),
        "method:tools/call"
    );
}

#[test]
fn missing_url_and_session_use_documented_fallbacks() {
    let r = request("ping", None);
    let empty = RequestTarget::default();
    assert_eq!(
        Scope::PerServer.key(&r, &empty).as_str(),
        "server:unknown-server"
    );
    assert_eq!(
        Scope::PerEndpoint.key(&r, &empty).as_str(),
        "endpoint:ping@unknown-server"
    );
    assert_eq!(
        Scope::PerSession.key(&r, &empty).as_str(),
        "session:no-session"
    );
    let ctx = pmcp::shared::MiddlewareContext::default();
    let resolved = key_in_context(&Scope::PerSession, &r, &ctx, &empty);
    assert_eq!(resolved.missing, Some(MissingPart::SessionId));
    let resolved = key_in_context(&Scope::PerServer, &r, &ctx, &empty);
    assert_eq!(resolved.missing, Some(MissingPart::ServerUrl));
    let resolved = key_in_context(&Scope::PerMethod, &r, &ctx, &empty);
    assert_eq!(resolved.missing, None);
}

#[test]
fn initialize_without_a_session_is_keyed_no_session_and_not_reported_missing() {
    let init = request("initialize", Some(json!({"protocolVersion": "2025-06-18"})));
    let ctx = pmcp::shared::MiddlewareContext::default();
    let resolved = key_in_context(&Scope::PerSession, &init, &ctx, &RequestTarget::default());
    assert_eq!(resolved.key.as_str(), "session:no-session");
    assert_eq!(resolved.missing, None);
    // The server URL is still reported: initialize has one like any request.
    let resolved = key_in_context(&Scope::PerServer, &init, &ctx, &RequestTarget::default());
    assert_eq!(resolved.missing, Some(MissingPart::ServerUrl));
}

#[test]
fn context_metadata_serves_unbound_handles_only() {
    let r = request("ping", None);
    let ctx = pmcp::shared::MiddlewareContext::default();
    ctx.set_metadata(SERVER_URL_METADATA.into(), "http://other/".into());
    ctx.set_metadata(SESSION_ID_METADATA.into(), "s2".into());
    let bound = target();
    assert_eq!(
        key_in_context(&Scope::PerServer, &r, &ctx, &bound)
            .key
            .as_str(),
        "server:http://127.0.0.1:1/mcp"
    );
    assert_eq!(
        key_in_context(&Scope::PerSession, &r, &ctx, &bound)
            .key
            .as_str(),
        "session:abc"
    );
    let t = RequestTarget::default();
    assert_eq!(
        key_in_context(&Scope::PerServer, &r, &ctx, &t).key.as_str(),
        "server:http://other/"
    );
    assert_eq!(
        key_in_context(&Scope::PerSession, &r, &ctx, &t)
            .key
            .as_str(),
        "session:s2"
    );
}

#[test]
fn untrusted_parts_are_bounded_and_cleaned() {
    let t = target();
    let long_a = "a".repeat(10_000);
    let mut long_b = long_a.clone();
    long_b.push('b');
    let ka = Scope::PerTool.key(&request("tools/call", Some(json!({"name": long_a}))), &t);
    let kb = Scope::PerTool.key(&request("tools/call", Some(json!({"name": long_b}))), &t);
    assert!(ka.as_str().len() <= MAX_KEY_PART + "tool:".len());
    assert_ne!(ka, kb, "long values must keep distinct keys");
    let evil = Scope::PerTool.key(
        &request("tools/call", Some(json!({"name": "a\nb\u{0}c"}))),
        &t,
    );
    assert_eq!(evil.as_str(), "tool:a?b?c");
    let multibyte = "é".repeat(500);
    let km = ScopeKey::new(&multibyte);
    assert!(km.as_str().len() <= MAX_KEY_PART);
}
