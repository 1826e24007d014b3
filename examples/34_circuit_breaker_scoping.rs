//! Circuit breakers per server, per method and per tool, against two real
//! pmcp servers on 127.0.0.1: one healthy, one that fails.
//!
//! What it shows, as it happens:
//! 1. **per server**: the failing server answers HTTP 503; the transport
//!    wrapper shows the breaker those statuses, its breaker opens while the
//!    healthy server keeps serving; after the open time a half-open probe
//!    fails (open again), then, once the server is back, a probe succeeds and
//!    the breaker closes;
//! 2. **per method**: a failing tool opens the `tools/call` breaker, while
//!    `tools/list` (another method) still passes;
//! 3. **per tool**: only the failing tool's breaker opens; the other tool of
//!    the same server keeps working;
//! 4. the `metrics()` snapshot of each breaker.
//!
//! Every state change is printed as it happens (`on_transition`), half-open
//! included, and checked at the end: the example exits with an error if a
//! breaker did not go through the changes it narrates.
//!
//! Run: `cargo run --example 34_circuit_breaker_scoping` (no Redis needed;
//! finishes in about four seconds).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc as Shared, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::middleware::Next;
use axum::response::IntoResponse;
use pmcp::server::streamable_http_server::StreamableHttpServerConfig;
use pmcp::shared::Transport;
use pmcp::shared::streamable_http::{
    StreamableHttpTransport, StreamableHttpTransportConfigBuilder,
};
use pmcp::types::capabilities::ServerCapabilities;
use pmcp::{Client, ClientBuilder, RequestHandlerExtra, Server, ToolHandler};
use pmcp_resilience::circuit_breaker::{CircuitBreakerBuilder, CircuitState};
use pmcp_resilience::display::Seconds;
use pmcp_resilience::{CircuitBreakerMiddleware, ErrorMatcher, Scope};
use serde_json::{Value, json};

type Error = Box<dyn std::error::Error + Send + Sync>;

/// How long a breaker stays open before it lets a probe through (long
/// enough that a busy machine still makes the calls it narrates within it).
const OPEN_FOR: Duration = Duration::from_secs(1);

/// What a demo server does now; the example flips these switches.
#[derive(Default)]
struct Switches {
    /// Answer every HTTP request with 503 before pmcp sees it.
    unavailable: AtomicBool,
    /// Make the `db` tool fail with an internal error.
    db_down: AtomicBool,
    /// Calls that reached the `db` tool's code.
    db_calls: AtomicU64,
}

/// `search` always answers; `db` fails while its database is down.
struct DemoTool {
    name: &'static str,
    switches: Arc<Switches>,
}

#[async_trait]
impl ToolHandler for DemoTool {
    async fn handle(&self, _args: Value, _extra: RequestHandlerExtra) -> pmcp::Result<Value> {
        if self.name == "db" {
            self.switches.db_calls.fetch_add(1, Ordering::SeqCst);
            if self.switches.db_down.load(Ordering::SeqCst) {
                return Err(pmcp::Error::internal("database connection refused"));
            }
        }
        Ok(json!({ "tool": self.name, "ok": true }))
    }
}

/// Starts a pmcp streamable-HTTP server on 127.0.0.1 and returns its URL.
async fn start_server(name: &str, switches: Arc<Switches>) -> Result<String, Error> {
    let mut builder = Server::builder()
        .name(name)
        .version("1.0.0")
        .capabilities(ServerCapabilities::tools_only());
    for tool in ["search", "db"] {
        builder = builder.tool(
            tool,
            DemoTool {
                name: tool,
                switches: switches.clone(),
            },
        );
    }
    let config = pmcp::axum::RouterConfig {
        server_config: StreamableHttpServerConfig {
            enable_json_response: true,
            ..Default::default()
        },
        ..Default::default()
    };
    let app = pmcp::axum::concurrent_router_with_config(Arc::new(builder.build()?), config).layer(
        axum::middleware::from_fn(move |req: Request<Body>, next: Next| {
            let switches = switches.clone();
            async move {
                if switches.unavailable.load(Ordering::SeqCst) {
                    return (StatusCode::SERVICE_UNAVAILABLE, "down for maintenance")
                        .into_response();
                }
                next.run(req).await
            }
        }),
    );
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

/// Prints one line per event, with the time since the start.
#[derive(Clone)]
struct Log(Instant);

impl Log {
    fn line(&self, text: impl AsRef<str>) {
        println!("[{:>5} ms] {}", self.0.elapsed().as_millis(), text.as_ref());
    }
}

/// The state changes a breaker made, as `key: from -> to`.
type Changes = Shared<Mutex<Vec<String>>>;

/// Prints each state change of the breaker as it happens and keeps it.
fn watched(builder: CircuitBreakerBuilder, log: &Log, changes: &Changes) -> CircuitBreakerBuilder {
    let (log, changes) = (log.clone(), changes.clone());
    builder.on_transition(move |key, t| {
        log.line(format!("         breaker {key}: {t}"));
        if let Ok(mut seen) = changes.lock() {
            seen.push(format!("{}: {} -> {}", short_key(key), t.from, t.to));
        }
    })
}

/// A key without the random port of the demo servers.
fn short_key(key: &str) -> &str {
    if key.starts_with("server:") {
        "server"
    } else {
        key
    }
}

/// Fails the example unless `changes` went through `expected`, in order.
fn check(what: &str, changes: &Changes, expected: &[&str]) -> Result<(), Error> {
    let seen = changes.lock().map(|s| s.clone()).unwrap_or_default();
    if seen != expected {
        return Err(format!("{what}: expected the changes {expected:?}, saw {seen:?}").into());
    }
    println!("checked {what}: {}", seen.join(", "));
    Ok(())
}

/// Calls `tool` and describes what happened, with the breaker state of `key` after it.
async fn call<T: Transport + 'static>(
    log: &Log,
    who: &str,
    client: &Client<T>,
    tool: &str,
    cb: &CircuitBreakerMiddleware,
    key: &str,
) {
    let outcome = match client.call_tool(tool.to_string(), json!({})).await {
        Ok(_) => "ok".to_string(),
        Err(pmcp::Error::CircuitBreakerOpen) => format!(
            "REJECTED by the open breaker, not sent (retry in {})",
            Seconds(cb.retry_after(key).unwrap_or_default())
        ),
        Err(e) => format!("failed: {}", short(&e.to_string())),
    };
    let state = cb.state_of(key).map_or("-".to_string(), |s| s.to_string());
    log.line(format!(
        "{who:<8} {tool:<6} -> {outcome:<52} breaker {state}"
    ));
}

fn short(text: &str) -> String {
    let text = text
        .replace(
            "Transport error: Request error: Request failed with status: ",
            "HTTP ",
        )
        .replace("Protocol error: ", "JSON-RPC ");
    text.chars().take(42).collect()
}

fn print_metrics(title: &str, cb: &CircuitBreakerMiddleware) -> Result<(), Error> {
    let m = cb.metrics();
    println!(
        "{title}: {} calls = {} ok + {} failed + {} neutral + {} rejected + {} in flight; {} state changes",
        m.total_requests,
        m.successful_requests,
        m.failed_requests,
        m.neutral_requests,
        m.rejected_requests,
        m.in_flight,
        m.state_transitions,
    );
    let ended = m.successful_requests
        + m.failed_requests
        + m.neutral_requests
        + m.rejected_requests
        + m.in_flight
        + m.untracked_requests;
    if ended != m.total_requests {
        return Err(format!(
            "{title}: the counts do not add up ({ended} of {})",
            m.total_requests
        )
        .into());
    }
    for key in m.keys {
        println!(
            "    {:<34} {:<9} successes {} failures {} rejections {}",
            key.key, key.state, key.successes, key.failures, key.rejections
        );
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let log = Log(Instant::now());
    let healthy = Arc::new(Switches::default());
    let failing = Arc::new(Switches::default());
    let healthy_url = start_server("healthy", healthy.clone()).await?;
    let failing_url = start_server("failing", failing.clone()).await?;
    log.line(format!("healthy server on {healthy_url}"));
    log.line(format!("failing server on {failing_url}"));

    // ---------------------------------------------------------------- 1
    println!("\n== 1. one breaker per server; HTTP 503 seen through the transport wrapper");
    let server_changes = Changes::default();
    let per_server = watched(CircuitBreakerMiddleware::builder(), &log, &server_changes)
        .scope(Scope::PerServer)
        .failure_threshold(3)
        .success_threshold(1)
        .timeout(OPEN_FOR)
        .trigger_errors(ErrorMatcher::Any(vec![
            ErrorMatcher::ServerErrors,
            ErrorMatcher::StatusCodes(vec![
                StatusCode::BAD_GATEWAY,
                StatusCode::SERVICE_UNAVAILABLE,
            ]),
        ]))
        .build()?;
    // One breaker, one handle per server: the handle tells it the URL
    // (pmcp's middleware hooks do not see it). The transport wrapper shows it
    // the HTTP statuses and transport failures no pmcp hook sees.
    let to_healthy_cb = per_server.for_server(&healthy_url);
    let to_failing_cb = per_server.for_server(&failing_url);
    let mut to_healthy = ClientBuilder::new(to_healthy_cb.wrap_transport(transport(&healthy_url)?))
        .with_middleware(Arc::new(to_healthy_cb.clone()))
        .build();
    let mut to_failing = ClientBuilder::new(to_failing_cb.wrap_transport(transport(&failing_url)?))
        .with_middleware(Arc::new(to_failing_cb.clone()))
        .build();
    to_healthy
        .initialize(pmcp::ClientCapabilities::minimal())
        .await?;
    to_failing
        .initialize(pmcp::ClientCapabilities::minimal())
        .await?;
    let healthy_key = format!("server:{healthy_url}");
    let failing_key = format!("server:{failing_url}");
    let call_failing = async || {
        call(
            &log,
            "failing",
            &to_failing,
            "search",
            &per_server,
            &failing_key,
        )
        .await
    };

    failing.unavailable.store(true, Ordering::SeqCst);
    log.line("the failing server now answers every request with HTTP 503");
    for _ in 0..4 {
        call_failing().await;
        call(
            &log,
            "healthy",
            &to_healthy,
            "search",
            &per_server,
            &healthy_key,
        )
        .await;
    }

    tokio::time::sleep(OPEN_FOR + Duration::from_millis(50)).await;
    log.line(
        "open time over: the next call goes out as the half-open probe; the server is still down",
    );
    for _ in 0..2 {
        call_failing().await;
    }

    failing.unavailable.store(false, Ordering::SeqCst);
    log.line("the failing server is back");
    tokio::time::sleep(OPEN_FOR + Duration::from_millis(50)).await;
    log.line("open time over again: the probe succeeds and the breaker closes");
    for _ in 0..2 {
        call_failing().await;
    }

    // ---------------------------------------------------------------- 2
    println!("\n== 2. one breaker per JSON-RPC method: tools/call opens, tools/list still passes");
    let method_changes = Changes::default();
    let per_method = watched(CircuitBreakerMiddleware::builder(), &log, &method_changes)
        .scope(Scope::PerMethod)
        .failure_threshold(2)
        .timeout(OPEN_FOR)
        .build()?;
    let mut client = ClientBuilder::new(transport(&failing_url)?)
        .with_middleware(Arc::new(per_method.clone()))
        .build();
    client
        .initialize(pmcp::ClientCapabilities::minimal())
        .await?;
    failing.db_down.store(true, Ordering::SeqCst);
    log.line("the failing server's database is down: the `db` tool answers -32603");
    for tool in ["db", "db", "search"] {
        call(
            &log,
            "failing",
            &client,
            tool,
            &per_method,
            "method:tools/call",
        )
        .await;
    }
    let listed = client.list_tools(None).await.map(|r| r.tools.len());
    log.line(format!(
        "failing  tools/list -> {} tools; breaker of method:tools/list {}",
        listed.map_or("no".to_string(), |n| n.to_string()),
        per_method
            .state_of("method:tools/list")
            .map_or("-".to_string(), |s| s.to_string())
    ));

    // ---------------------------------------------------------------- 3
    println!("\n== 3. one breaker per tool: only `db` opens, `search` keeps working");
    let tool_changes = Changes::default();
    let per_tool = watched(CircuitBreakerMiddleware::builder(), &log, &tool_changes)
        .scope(Scope::PerTool)
        .failure_threshold(2)
        .timeout(OPEN_FOR)
        .build()?;
    let mut client = ClientBuilder::new(transport(&failing_url)?)
        .with_middleware(Arc::new(per_tool.clone()))
        .build();
    client
        .initialize(pmcp::ClientCapabilities::minimal())
        .await?;
    let db_calls_before = failing.db_calls.load(Ordering::SeqCst);
    for tool in ["db", "search", "db", "search", "db", "db", "search"] {
        call(
            &log,
            "failing",
            &client,
            tool,
            &per_tool,
            &format!("tool:{tool}"),
        )
        .await;
    }
    log.line(format!(
        "the `db` tool ran {} times for 4 calls: the open breaker kept the rest off the server",
        failing.db_calls.load(Ordering::SeqCst) - db_calls_before
    ));
    failing.db_down.store(false, Ordering::SeqCst);
    log.line("the database is back");
    tokio::time::sleep(OPEN_FOR + Duration::from_millis(50)).await;
    call(&log, "failing", &client, "db", &per_tool, "tool:db").await;

    // ---------------------------------------------------------------- 4
    println!("\n== 4. metrics snapshots");
    print_metrics("per server", &per_server)?;
    print_metrics("per method", &per_method)?;
    print_metrics("per tool  ", &per_tool)?;

    println!();
    check(
        "per server",
        &server_changes,
        &[
            "server: closed -> open",
            "server: open -> half-open",
            "server: half-open -> open",
            "server: open -> half-open",
            "server: half-open -> closed",
        ],
    )?;
    check(
        "per method",
        &method_changes,
        &["method:tools/call: closed -> open"],
    )?;
    check(
        "per tool",
        &tool_changes,
        &[
            "tool:db: closed -> open",
            "tool:db: open -> half-open",
            "tool:db: half-open -> closed",
        ],
    )?;
    if per_tool.state_of("tool:search") != Some(CircuitState::Closed) {
        return Err("the healthy tool's breaker should have stayed closed".into());
    }
    Ok(())
}
