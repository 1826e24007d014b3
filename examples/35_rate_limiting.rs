//! Rate limiting with pmcp-resilience, from the algorithms to the
//! Prometheus text.
//!
//! 1. The four strategies side by side on the same traffic (a simulated
//!    clock, so the table is exact): what each admits at a burst and across
//!    a window edge, and when the leaky bucket lets its burst out.
//! 2. Per-session budgets, with a real pmcp server and two clients on 127.0.0.1.
//! 3. Backpressure: rejecting with a retry hint versus waiting for capacity.
//! 4. The `metrics()` snapshot and the Prometheus text of `MetricsMiddleware`.
//! 5. With `REDIS_URL` set and `--features redis`: two processes sharing one
//!    limit (see the end of this file).
//!
//! Run: `cargo run --example 35_rate_limiting` (no Redis needed; about a second).

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pmcp::server::streamable_http_server::StreamableHttpServerConfig;
use pmcp::shared::streamable_http::{
    StreamableHttpTransport, StreamableHttpTransportConfigBuilder,
};
use pmcp::types::capabilities::ServerCapabilities;
use pmcp::{ClientBuilder, RequestHandlerExtra, Server, ToolHandler};
use pmcp_resilience::display::Seconds;
use pmcp_resilience::observe::{MetricsExporter, MetricsMiddleware};
use pmcp_resilience::{
    BackpressureConfig, RateLimitMiddleware, RateLimitStrategy, RequestTarget, Scope, Timestamp,
};
use serde_json::{Value, json};

type Error = Box<dyn std::error::Error + Send + Sync>;

// ------------------------------------------------------------------ part 1

/// Every strategy set to "5 per second".
fn strategies() -> [RateLimitStrategy; 4] {
    let second = Duration::from_secs(1);
    [
        RateLimitStrategy::FixedWindow {
            max_requests: 5,
            window: second,
        },
        RateLimitStrategy::SlidingWindow {
            max_requests: 5,
            window: second,
        },
        RateLimitStrategy::TokenBucket {
            capacity: 5,
            refill_rate: 5,
        },
        RateLimitStrategy::LeakyBucket {
            capacity: 5,
            leak_rate: 5,
        },
    ]
}

/// The same traffic for every strategy: bursts of 8 requests at these
/// offsets (ms) from a whole second, so 1000 is a fixed-window edge.
const BURSTS_MS: [u64; 4] = [900, 1000, 1500, 3000];
const BURST: usize = 8;

fn compare_strategies() -> Result<(), Error> {
    println!("== 1. four strategies, each set to 5 per second, on the same traffic");
    println!(
        "   bursts of {BURST} requests at t = {} ms (t = 1000 ms is a window edge)\n",
        list(&BURSTS_MS)
    );
    // Fixed windows are aligned to the Unix epoch: start on a whole second.
    let origin_ms: u64 = 1_700_000_000_000;
    let header = ["t=900", "t=1000", "t=1500", "t=3000"];
    println!(
        "   {:<15} {:>8} {:>8} {:>8} {:>8}   most in any rolling 1 s",
        "strategy", header[0], header[1], header[2], header[3]
    );
    let mut leaky_times = Vec::new();
    let mut most = Vec::new();
    for strategy in strategies() {
        let mut state = strategy.initial_state();
        let mut admitted_at = Vec::new(); // when each admitted request proceeds (ms)
        let mut cells = Vec::new();
        for offset in BURSTS_MS {
            let now = Timestamp::from_millis(origin_ms + offset);
            let mut admitted = 0;
            for _ in 0..BURST {
                let decision = strategy.check(&mut state, now, 1);
                if decision.allowed {
                    admitted += 1;
                    admitted_at.push(offset + decision.wait.as_millis() as u64);
                }
            }
            cells.push(format!("{admitted}/{BURST}"));
        }
        println!(
            "   {:<15} {:>8} {:>8} {:>8} {:>8}   {}",
            strategy.label(),
            cells[0],
            cells[1],
            cells[2],
            cells[3],
            most_in_window(&admitted_at, 1000)
        );
        most.push(most_in_window(&admitted_at, 1000));
        if strategy.label() == "leaky_bucket" {
            leaky_times = admitted_at;
        }
    }
    println!(
        "\n   fixed window:   5 at t=900 and 5 more at t=1000: 10 within 100 ms (2x, the edge);"
    );
    println!(
        "   sliding window: still counts the previous window at t=1000, so the edge burst waits;"
    );
    println!("                   at t=1500 it admits 2: 7 in one rolling second, within its bound");
    println!("                   max + previous * elapsed / window = 5 + 5 * 0.5 (see the book);");
    println!("   token bucket:   a full bucket passes at once, then 1 token per 200 ms;");
    println!("   leaky bucket:   admits into a queue of 5 and lets them out 200 ms apart.");
    println!(
        "   leaky bucket admissions proceed at t = {} ms",
        list(&leaky_times)
    );
    println!("   (the middleware waits out each delay; no two closer than 1/leak_rate)\n");
    // The table's point: only the fixed window lets twice the rate through.
    if most != [10, 7, 8, 5] {
        return Err(format!(
            "expected at most 10, 7, 8 and 5 requests in a rolling second, got {most:?}"
        )
        .into());
    }
    Ok(())
}

/// `[900, 1000]` as `900, 1000`.
fn list(values: &[u64]) -> String {
    values
        .iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The largest number of times falling in any window `(t - width, t]`.
fn most_in_window(times: &[u64], width: u64) -> usize {
    times
        .iter()
        .map(|&end| {
            times
                .iter()
                .filter(|&&t| t <= end && t + width > end)
                .count()
        })
        .max()
        .unwrap_or(0)
}

// ------------------------------------------------------------------ server

struct Search;

#[async_trait]
impl ToolHandler for Search {
    async fn handle(&self, _args: Value, _extra: RequestHandlerExtra) -> pmcp::Result<Value> {
        Ok(json!({ "results": ["..."] }))
    }
}

/// A real pmcp streamable-HTTP server on 127.0.0.1; returns its URL.
async fn start_server() -> Result<String, Error> {
    let server = Server::builder()
        .name("limits-demo")
        .version("1.0.0")
        .capabilities(ServerCapabilities::tools_only())
        .tool("search", Search)
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
    Ok(url)
}

fn transport(url: &str) -> Result<StreamableHttpTransport, Error> {
    Ok(StreamableHttpTransport::new(
        StreamableHttpTransportConfigBuilder::new(url.parse()?).build(),
    ))
}

/// What one call returned, in a few words.
fn describe(result: &pmcp::Result<pmcp::types::CallToolResult>) -> String {
    match result {
        Ok(_) => "ok".into(),
        Err(pmcp::Error::Protocol { code, data, .. }) if code.as_i32() == -32005 => {
            match data
                .as_ref()
                .and_then(|d| d.get("retryAfterMs"))
                .and_then(Value::as_u64)
            {
                Some(ms) => format!(
                    "rate limited, retry in {}",
                    Seconds(Duration::from_millis(ms))
                ),
                None => "rate limited".into(),
            }
        }
        Err(pmcp::Error::RateLimited) => "rate limited".into(),
        Err(e) => format!("error: {e}"),
    }
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    #[cfg(feature = "redis")]
    if let Ok(prefix) = std::env::var(redis_part::CHILD_ENV) {
        // Re-spawned by part 5: use the shared limit, report, and exit.
        let admitted = redis_part::use_shared_limit(&prefix, "child").await?;
        println!("{admitted}");
        return Ok(());
    }
    compare_strategies()?;
    let url = start_server().await?;
    println!("pmcp server on {url}");

    // ---------------------------------------------------------- part 2
    println!("\n== 2. per-session budgets: 3 calls per minute for each MCP session");
    let per_session = RateLimitMiddleware::builder()
        .name("per-session") // the `name` label of its metrics
        .scope(Scope::PerSession)
        .strategy(RateLimitStrategy::FixedWindow {
            max_requests: 3,
            window: Duration::from_secs(60),
        })
        .backpressure(BackpressureConfig::reject().with_client_signal())
        .build()?;
    let metrics = MetricsMiddleware::builder()
        .exporter(MetricsExporter::Prometheus {
            endpoint: "/metrics".into(),
        })
        .include_rate_limit_stats(true)
        .source(Arc::new(per_session.clone()))
        .build()?;
    let mut sessions = Vec::new();
    for _ in 0..2 {
        let t = transport(&url)?;
        // The handle reads this client's session id from its transport
        // (pmcp's middleware hooks do not see it).
        let seen = t.clone();
        let handle = per_session
            .with_target(RequestTarget::default().with_session_source(move || seen.session_id()));
        let mut client = ClientBuilder::new(t.clone())
            .with_middleware(Arc::new(metrics.clone()))
            .with_middleware(Arc::new(handle))
            .build();
        client
            .initialize(pmcp::ClientCapabilities::minimal())
            .await?;
        sessions.push((t.session_id().unwrap_or_default(), client));
    }
    println!("   (each `initialize` ran before the server assigned a session id: it counts under");
    println!("   the documented fallback key `session:no-session`)");
    let mut admitted_per_session = Vec::new();
    for (name, calls, (session, client)) in [("A", 5, &sessions[0]), ("B", 3, &sessions[1])] {
        let short: String = session.chars().take(8).collect();
        let mut admitted = 0;
        for i in 1..=calls {
            let r = client.call_tool("search".into(), json!({})).await;
            admitted += usize::from(r.is_ok());
            println!("   session {name} ({short}..) call {i}: {}", describe(&r));
        }
        admitted_per_session.push(admitted);
    }
    // Each session has its own budget of 3: A is refused twice, B never.
    if admitted_per_session != [3, 3] {
        return Err(
            format!("expected 3 calls admitted per session, got {admitted_per_session:?}").into(),
        );
    }

    // ---------------------------------------------------------- part 3
    println!("\n== 3. backpressure: a token bucket of 2, refilled at 10/s; 6 calls in a row");
    let bucket = RateLimitStrategy::TokenBucket {
        capacity: 2,
        refill_rate: 10,
    };
    let rejecting = RateLimitMiddleware::builder()
        .name("rejecting")
        .scope(Scope::PerTool)
        .strategy(bucket)
        .backpressure(BackpressureConfig::reject().with_client_signal())
        .build()?;
    let waiting = RateLimitMiddleware::builder()
        .name("waiting")
        .scope(Scope::PerTool)
        .strategy(bucket)
        .backpressure(BackpressureConfig::wait_up_to(Duration::from_secs(1)))
        .build()?;
    metrics.register(Arc::new(rejecting.clone()));
    metrics.register(Arc::new(waiting.clone()));
    let mut admitted_by_mode = Vec::new();
    for (label, limiter) in [("reject", &rejecting), ("wait  ", &waiting)] {
        let mut client = ClientBuilder::new(transport(&url)?)
            .with_middleware(Arc::new(metrics.clone()))
            .with_middleware(Arc::new(limiter.clone()))
            .build();
        client
            .initialize(pmcp::ClientCapabilities::minimal())
            .await?;
        let start = Instant::now();
        let mut admitted = 0;
        for i in 1..=6 {
            let r = client.call_tool("search".into(), json!({})).await;
            admitted += usize::from(r.is_ok());
            println!(
                "   {label} call {i} done at {:>4} ms: {}",
                start.elapsed().as_millis(),
                describe(&r)
            );
        }
        admitted_by_mode.push(admitted);
    }
    // A bucket of 2 admits 2 at once and refuses the rest; waiting admits all 6.
    if admitted_by_mode != [2, 6] {
        return Err(format!(
            "expected 2 calls admitted when rejecting and 6 when waiting, got {admitted_by_mode:?}"
        )
        .into());
    }

    // ---------------------------------------------------------- part 4
    println!("\n== 4. metrics() snapshots");
    for (label, limiter) in [
        ("per-session", &per_session),
        ("rejecting", &rejecting),
        ("waiting", &waiting),
    ] {
        let m = limiter.metrics();
        println!(
            "   {label:<11}: total {} allowed {} rejected {} waited {} (wait time {})",
            m.total_requests,
            m.allowed_requests,
            m.rejected_requests,
            m.waited_requests,
            Seconds(m.wait_time),
        );
        if m.total_requests != m.allowed_requests + m.rejected_requests {
            return Err(format!("{label}: the counts do not add up: {m:?}").into());
        }
        for u in &m.keys {
            let key: String = u.key.as_str().chars().take(24).collect();
            println!("       {key:<24} used {}/{}", u.used, u.limit);
        }
    }

    println!("\n   Prometheus text (MetricsMiddleware::render(), histogram buckets left out):");
    let text = metrics.render();
    for line in text.lines() {
        if !line.contains("_bucket{") && !line.starts_with("# HELP") {
            println!("   {line}");
        }
    }
    // Two limiters on one key, told apart by their `name` label.
    for expected in [
        r#"mcp_rate_limit_requests_allowed_total{name="rejecting",scope="tool",key="tool:search"} 2"#,
        r#"mcp_rate_limit_requests_rejected_total{name="rejecting",scope="tool",key="tool:search"} 4"#,
        r#"mcp_rate_limit_requests_allowed_total{name="waiting",scope="tool",key="tool:search"} 6"#,
    ] {
        if !text.lines().any(|line| line == expected) {
            return Err(format!("the Prometheus text lacks `{expected}`").into());
        }
    }

    // ---------------------------------------------------------- part 5
    shared_limit_through_redis().await?;
    Ok(())
}

/// Part 5: two processes sharing one limit through Redis.
///
/// With `REDIS_URL` and `--features redis`, this process and a copy of it
/// (re-spawned as a child) each try 10 requests against one fixed window of
/// 10 per minute kept in Redis: together they get 10, not 20.
async fn shared_limit_through_redis() -> Result<(), Error> {
    println!("\n== 5. two processes sharing one limit through Redis");
    match std::env::var("REDIS_URL") {
        Err(_) => println!("   skipped: set REDIS_URL and build with --features redis to run it"),
        #[cfg(feature = "redis")]
        Ok(_) => redis_part::run().await?,
        #[cfg(not(feature = "redis"))]
        Ok(_) => {
            println!("   skipped: rebuild with --features redis to share a limit through Redis")
        }
    }
    Ok(())
}

#[cfg(feature = "redis")]
mod redis_part {
    use super::Error;
    use pmcp::shared::{AdvancedMiddleware, MiddlewareContext};
    use pmcp::types::{JSONRPCRequest, RequestId};
    use pmcp_resilience::{RateLimitMiddleware, RateLimitStrategy, StatePersistence};
    use std::time::Duration;

    /// Set in the child's environment: the key prefix to share.
    pub const CHILD_ENV: &str = "EXAMPLE35_REDIS_CHILD_PREFIX";

    /// Tries 10 requests through a limiter whose state is in Redis under
    /// `prefix`; returns how many were admitted.
    pub async fn use_shared_limit(prefix: &str, who: &str) -> Result<u32, Error> {
        let url = std::env::var("REDIS_URL")?;
        let limiter = RateLimitMiddleware::builder()
            .strategy(RateLimitStrategy::FixedWindow {
                max_requests: 10,
                window: Duration::from_secs(60),
            })
            .persistence(StatePersistence::Redis {
                client: redis::Client::open(url.as_str())?,
                key_prefix: prefix.to_string(),
            })
            .build()?;
        let mut admitted = 0;
        for i in 0..10 {
            let mut request = JSONRPCRequest {
                jsonrpc: "2.0".into(),
                method: "tools/call".into(),
                params: None,
                id: RequestId::from(i as i64),
            };
            let context = MiddlewareContext::with_request_id(format!("{who}-{i}"));
            if limiter
                .on_request_with_context(&mut request, &context)
                .await
                .is_ok()
            {
                admitted += 1;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(admitted)
    }

    pub async fn run() -> Result<(), Error> {
        let prefix = format!("example35:{}:", std::process::id());
        let child = tokio::process::Command::new(std::env::current_exe()?)
            .env(CHILD_ENV, &prefix)
            .output();
        let (mine, theirs) = tokio::join!(use_shared_limit(&prefix, "parent"), child);
        let mine = mine?;
        let theirs: u32 = String::from_utf8_lossy(&theirs?.stdout).trim().parse()?;
        println!("   this process admitted {mine} of 10, the other process {theirs} of 10");
        println!(
            "   together {} against one shared limit of 10 per minute",
            mine + theirs
        );
        if mine + theirs != 10 {
            return Err(format!("one shared limit of 10 admitted {}", mine + theirs).into());
        }
        Ok(())
    }
}
