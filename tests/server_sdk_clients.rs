//! The official MCP SDK clients (Python `mcp` 1.x and 2.x, the TypeScript
//! SDK) through the layer: refused by the limiter and by the breaker, they
//! read the retry hint and keep their sessions, and a second session beside
//! them is unaffected.
//!
//! The clients are installed by `.ci/run` under `target/sdk` (override with
//! `PMCP_RESILIENCE_SDK_DIR`): `py-mcp1` and `py-mcp2` (virtual
//! environments) and `ts/node_modules`; `scripts/install-sdk-clients.sh`
//! installs them. A missing client fails its test with that hint; set
//! `PMCP_RESILIENCE_SKIP_SDK_CLIENTS=1` to skip them on purpose (it is
//! printed, never silent).

mod support;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use pmcp::server::streamable_http_server::StreamableHttpServerConfig;
use pmcp_resilience::rate_limit::{RateLimitMiddleware, RateLimitStrategy};
use pmcp_resilience::server::{Refusals, ResilienceLayer};
use pmcp_resilience::{CircuitBreakerMiddleware, ManualClock, Scope};
use serde_json::Value;
use support::{TestServer, start_server_configured};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;

const PATIENCE: Duration = Duration::from_secs(120);

fn sdk_dir() -> PathBuf {
    match std::env::var_os("PMCP_RESILIENCE_SDK_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("target/sdk"),
    }
}

/// `path` if it exists; otherwise fails the test, unless the user asked to
/// skip the SDK clients.
fn installed(path: PathBuf, what: &str) -> Option<PathBuf> {
    if path.exists() {
        return Some(path);
    }
    if std::env::var_os("PMCP_RESILIENCE_SKIP_SDK_CLIENTS").is_some() {
        eprintln!(
            "SKIPPED on request (PMCP_RESILIENCE_SKIP_SDK_CLIENTS): {what} is not installed at {}",
            path.display()
        );
        return None;
    }
    panic!(
        "{what} is not installed at {}: run scripts/install-sdk-clients.sh (needs python3 with venv, node and npm), \
         or set PMCP_RESILIENCE_SKIP_SDK_CLIENTS=1 to skip these tests",
        path.display()
    );
}

/// The server: a per-session limit of 10 calls a minute (on a clock the test
/// moves) and a per-tool breaker that opens at the first failure.
async fn server(clock: &ManualClock, refusals: Refusals) -> TestServer {
    let limiter = RateLimitMiddleware::builder()
        .scope(Scope::PerSession)
        .strategy(RateLimitStrategy::FixedWindow {
            max_requests: 10,
            window: Duration::from_secs(60),
        })
        .clock(Arc::new(clock.clone()))
        .build()
        .expect("valid limiter");
    let breaker = CircuitBreakerMiddleware::builder()
        .scope(Scope::PerTool)
        .failure_threshold(1)
        .timeout(Duration::from_secs(600))
        .build()
        .expect("valid breaker");
    let layer = ResilienceLayer::builder()
        .rate_limit(limiter)
        .circuit_breaker(breaker)
        .tools(["echo", "fail", "flaky", "slow", "strict"])
        .refusals(refusals)
        .build()
        .expect("valid layer");
    let config = StreamableHttpServerConfig {
        enable_json_response: true,
        ..Default::default()
    };
    start_server_configured("sdk", config, |b| b, move |r| r.layer(layer)).await
}

/// Runs `command` (a client script taking the URL) against a fresh server
/// and returns the steps it printed; the client must succeed.
async fn run(command: Command) -> Vec<Value> {
    let (steps, succeeded) = run_with(command, Refusals::JsonRpcError).await;
    assert!(succeeded, "the client failed: {steps:#?}");
    steps
}

/// Runs `command` against a fresh server refusing as `refusals` says: the
/// steps it printed, and whether it exited successfully.
async fn run_with(mut command: Command, refusals: Refusals) -> (Vec<Value>, bool) {
    let clock = ManualClock::new();
    let server = server(&clock, refusals).await;
    let mut child = command
        .arg(&server.url)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("the client starts");
    let mut stdin = child.stdin.take().expect("piped stdin");
    let mut lines = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
    let mut steps = Vec::new();
    loop {
        let line = tokio::time::timeout(PATIENCE, lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("the client hung after {steps:?}"))
            .expect("readable output");
        let Some(line) = line else { break };
        let step: Value = serde_json::from_str(&line).unwrap_or(Value::String(line));
        if step["step"] == "wait" {
            // The client read the retry hint; its time passes.
            clock.advance(Duration::from_secs(61));
            stdin.write_all(b"go\n").await.expect("client alive");
            stdin.flush().await.expect("client alive");
        }
        steps.push(step);
    }
    let status = tokio::time::timeout(PATIENCE, child.wait())
        .await
        .expect("the client exits")
        .expect("an exit status");
    assert_eq!(
        server.behaviour.calls("fail"),
        1,
        "the open breaker kept it from running"
    );
    (steps, status.success())
}

fn step<'a>(steps: &'a [Value], name: &str) -> &'a Value {
    steps
        .iter()
        .find(|s| s["step"] == name)
        .unwrap_or_else(|| panic!("no step {name} in {steps:#?}"))
}

/// What every client must see.
fn check(steps: &[Value]) {
    assert_eq!(step(steps, "fail")["ok"], false);
    let breaker = step(steps, "breaker");
    assert_eq!(breaker["code"], -32006, "{steps:#?}");
    assert!(
        breaker["retryAfterMs"].as_u64().is_some_and(|ms| ms > 0),
        "{breaker}"
    );
    assert_eq!(breaker["key"], "tool:fail");
    assert_eq!(
        step(steps, "after-breaker")["ok"],
        true,
        "the session lives on"
    );
    let limited = step(steps, "limited");
    assert_eq!(limited["code"], -32005, "{steps:#?}");
    assert!(
        limited["retryAfterMs"].as_u64().is_some_and(|ms| ms > 0),
        "{limited}"
    );
    assert_eq!(
        step(steps, "second-session")["ok"],
        true,
        "another session is unaffected"
    );
    assert_eq!(
        step(steps, "after-wait")["ok"],
        true,
        "the session lives on"
    );
    step(steps, "done");
}

fn python(venv: &str) -> Option<Command> {
    let python = installed(sdk_dir().join(venv).join("bin/python"), venv)?;
    let mut command = Command::new(python);
    command.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/sdk_client.py"));
    Some(command)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_mcp_1_keeps_its_session_through_refusals() {
    if let Some(command) = python("py-mcp1") {
        check(&run(command).await);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_mcp_2_keeps_its_session_through_refusals() {
    if let Some(command) = python("py-mcp2") {
        check(&run(command).await);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_typescript_sdk_keeps_its_session_through_refusals() {
    let Some(modules) = installed(sdk_dir().join("ts/node_modules"), "the TypeScript SDK") else {
        return;
    };
    let mut command = Command::new("node");
    command
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/sdk_client.cjs"))
        .env("TS_SDK_NODE_MODULES", modules);
    check(&run(command).await);
}

/// Why refusals are 200 by default: answered 503, Python `mcp` 1.x raises
/// out of its transport and the session is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_mcp_1_loses_its_session_to_a_503() {
    let Some(command) = python("py-mcp1") else {
        return;
    };
    let (steps, succeeded) = run_with(command, Refusals::HttpStatus).await;
    assert!(!succeeded, "{steps:#?}");
    assert!(
        !steps.iter().any(|s| s["step"] == "after-breaker"),
        "{steps:#?}"
    );
}

/// Answered 503, the TypeScript SDK sees the status but no JSON-RPC code
/// or retry hint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_typescript_sdk_gets_no_retry_hint_from_a_503() {
    let Some(modules) = installed(sdk_dir().join("ts/node_modules"), "the TypeScript SDK") else {
        return;
    };
    let mut command = Command::new("node");
    command
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/sdk_client.cjs"))
        .env("TS_SDK_NODE_MODULES", modules);
    let (steps, _) = run_with(command, Refusals::HttpStatus).await;
    let breaker = step(&steps, "breaker");
    assert_eq!(
        breaker["code"], 503,
        "the HTTP status, not -32006: {breaker}"
    );
    assert!(breaker["retryAfterMs"].is_null(), "{breaker}");
}
