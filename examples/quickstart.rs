//! A real pmcp server and client on loopback, with a per-tool circuit breaker
//! and a per-method rate limiter from pmcp-resilience. No Redis needed.
//!
//! Run: `cargo run --example quickstart`

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use pmcp::server::streamable_http_server::StreamableHttpServerConfig;
use pmcp::shared::streamable_http::{
    StreamableHttpTransport, StreamableHttpTransportConfigBuilder,
};
use pmcp::types::capabilities::ServerCapabilities;
use pmcp::{ClientBuilder, RequestHandlerExtra, Server, ToolHandler};
use pmcp_resilience::display::Seconds;
use pmcp_resilience::{
    BackpressureConfig, CircuitBreakerMiddleware, RateLimitMiddleware, RateLimitStrategy, Scope,
};
use serde_json::{Value, json};

/// A tool that succeeds.
struct Search;

#[async_trait]
impl ToolHandler for Search {
    async fn handle(&self, args: Value, _extra: RequestHandlerExtra) -> pmcp::Result<Value> {
        Ok(json!({ "results": [format!("about {}", args["q"])] }))
    }
}

/// A tool whose database is down: every call fails on the server.
struct FlakyDb {
    calls: Arc<AtomicU64>,
}

#[async_trait]
impl ToolHandler for FlakyDb {
    async fn handle(&self, _args: Value, _extra: RequestHandlerExtra) -> pmcp::Result<Value> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Err(pmcp::Error::internal("database connection refused"))
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // 1. A real pmcp streamable-HTTP server on 127.0.0.1.
    let db_calls = Arc::new(AtomicU64::new(0));
    let server = Server::builder()
        .name("quickstart")
        .version("1.0.0")
        .capabilities(ServerCapabilities::tools_only())
        .tool("search", Search)
        .tool(
            "flaky_db",
            FlakyDb {
                calls: db_calls.clone(),
            },
        )
        .build()?;
    let config = pmcp::axum::RouterConfig {
        server_config: StreamableHttpServerConfig {
            enable_json_response: true,
            ..Default::default()
        },
        ..Default::default()
    };
    let app = pmcp::axum::concurrent_router_with_config(Arc::new(server), config);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    println!("server listening on {url}");

    // 2. One breaker per tool; one limiter per JSON-RPC method.
    let breaker = CircuitBreakerMiddleware::builder()
        .scope(Scope::PerTool)
        .failure_threshold(3)
        .success_threshold(1)
        .timeout(Duration::from_secs(30))
        .build()?;
    let limiter = RateLimitMiddleware::builder()
        .scope(Scope::PerMethod)
        .strategy(RateLimitStrategy::TokenBucket {
            capacity: 5,
            refill_rate: 1,
        })
        .backpressure(BackpressureConfig::reject().with_client_signal())
        .build()?;

    // 3. A pmcp client with both, as drop-in middlewares.
    let transport = StreamableHttpTransport::new(
        StreamableHttpTransportConfigBuilder::new(url.parse()?).build(),
    );
    let mut client = ClientBuilder::new(transport)
        .with_middleware(Arc::new(breaker.clone()))
        .with_middleware(Arc::new(limiter.clone()))
        .build();
    client
        .initialize(pmcp::ClientCapabilities::minimal())
        .await?;

    println!("\n-- the database tool fails; its breaker opens after 3 failures");
    for i in 1..=5 {
        match client.call_tool("flaky_db".into(), json!({})).await {
            Ok(_) => println!("call {i}: ok"),
            Err(pmcp::Error::CircuitBreakerOpen) => println!(
                "call {i}: rejected locally, breaker {} (retry in {})",
                breaker
                    .state_of("tool:flaky_db")
                    .map_or("-".into(), |s| s.to_string()),
                Seconds(breaker.retry_after("tool:flaky_db").unwrap_or_default())
            ),
            Err(e) => println!("call {i}: server error: {e}"),
        }
    }
    println!(
        "the server ran flaky_db {} times; the breaker kept the other calls off it",
        db_calls.load(Ordering::SeqCst)
    );

    println!(
        "\n-- search has its own breaker and keeps working, until the tools/call budget runs out"
    );
    for i in 1..=4 {
        match client.call_tool("search".into(), json!({"q": "mcp"})).await {
            Ok(_) => println!("search {i}: ok"),
            Err(pmcp::Error::Protocol { code, data, .. }) if code.as_i32() == -32005 => {
                let wait = data.as_ref().and_then(|d| d.get("retryAfterMs")).cloned();
                println!(
                    "search {i}: rate limited, retry after {} ms",
                    wait.unwrap_or(Value::Null)
                );
            }
            Err(e) => println!("search {i}: {e}"),
        }
    }

    println!("\n-- metrics snapshots");
    let cb = breaker.metrics();
    println!(
        "breaker: {} calls = {} ok + {} failed + {} neutral (refused by the limiter after it) + {} rejected",
        cb.total_requests,
        cb.successful_requests,
        cb.failed_requests,
        cb.neutral_requests,
        cb.rejected_requests,
    );
    for key in &cb.keys {
        println!("  {}: {}", key.key, key.state);
    }
    let rl = limiter.metrics();
    println!(
        "limiter: {} allowed, {} rejected",
        rl.allowed_requests, rl.rejected_requests
    );
    let now = limiter.now();
    for key in &rl.keys {
        println!(
            "  {}: {} of {} used, full again at {} (in {})",
            key.key,
            key.used,
            key.limit,
            key.reset_at,
            Seconds(key.reset_at.saturating_since(now))
        );
    }

    // What the example shows, checked: it fails loudly if that stops being true.
    let counted = cb.successful_requests
        + cb.failed_requests
        + cb.neutral_requests
        + cb.rejected_requests
        + cb.in_flight
        + cb.untracked_requests;
    if db_calls.load(Ordering::SeqCst) != 3 || counted != cb.total_requests {
        return Err(format!(
            "expected 3 calls to reach flaky_db and counts that add up; got {} calls, {counted} of {} counted",
            db_calls.load(Ordering::SeqCst),
            cb.total_requests
        )
        .into());
    }
    Ok(())
}
