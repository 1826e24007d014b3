//! Real pmcp streamable-HTTP servers on 127.0.0.1 for end-to-end tests.
//!
//! A [`TestServer`] is a real pmcp `Server` served by `pmcp::axum`, with an
//! HTTP switch in front of it so a test can make it answer every request with
//! an HTTP status (503, ...) and heal it again, and tools whose behaviour a test
//! controls. Nothing here is a stub of pmcp: the client talks HTTP over loopback.

#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU16, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::middleware::Next;
use axum::response::IntoResponse;
use parking_lot::Mutex;
use pmcp::server::streamable_http_server::StreamableHttpServerConfig;
use pmcp::shared::AdvancedMiddleware;
use pmcp::shared::streamable_http::{
    StreamableHttpTransport, StreamableHttpTransportConfigBuilder,
};
use pmcp::types::capabilities::ServerCapabilities;
use pmcp::{Client, ClientBuilder, RequestHandlerExtra, Server, ToolHandler};
use serde_json::{Value, json};

/// What the tools and the HTTP switch of a [`TestServer`] do now.
#[derive(Default)]
pub struct Behaviour {
    /// When non-zero, every HTTP request is answered with this status and
    /// never reaches pmcp.
    pub http_status: AtomicU16,
    /// When true, the `flaky` tool fails with an internal error.
    pub flaky_fails: AtomicBool,
    /// Calls that reached each tool's code.
    pub tool_calls: Mutex<HashMap<String, u64>>,
    /// HTTP requests that reached the server at all.
    pub http_requests: AtomicU64,
    /// When non-zero, every `tools/call` is answered with a JSON-RPC error of
    /// this code before pmcp sees it, as a server of another SDK would answer
    /// (pmcp's own server reports every tool error as -32603).
    pub jsonrpc_error: AtomicI32,
    /// When each call reached a tool's code, in order: `(tool, instant)`.
    pub call_times: Mutex<Vec<(String, Instant)>>,
}

impl Behaviour {
    pub fn calls(&self, tool: &str) -> u64 {
        self.tool_calls.lock().get(tool).copied().unwrap_or(0)
    }

    /// When the calls of `tool` reached its code, in order.
    pub fn call_times(&self, tool: &str) -> Vec<Instant> {
        self.call_times
            .lock()
            .iter()
            .filter(|(t, _)| t == tool)
            .map(|(_, at)| *at)
            .collect()
    }

    fn record(&self, tool: &str) {
        *self.tool_calls.lock().entry(tool.to_string()).or_default() += 1;
        self.call_times
            .lock()
            .push((tool.to_string(), Instant::now()));
    }
}

/// A running pmcp server on loopback.
pub struct TestServer {
    pub addr: SocketAddr,
    pub url: String,
    pub behaviour: Arc<Behaviour>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TestServer {
    /// Answer every HTTP request with `status` (for example 503) until healed.
    pub fn answer_http(&self, status: StatusCode) {
        self.behaviour
            .http_status
            .store(status.as_u16(), Ordering::SeqCst);
    }

    /// Answer every `tools/call` with a JSON-RPC error of `code` until healed.
    pub fn answer_jsonrpc_error(&self, code: i32) {
        self.behaviour.jsonrpc_error.store(code, Ordering::SeqCst);
    }

    /// Serve normally again and let the `flaky` tool succeed.
    pub fn heal(&self) {
        self.behaviour.http_status.store(0, Ordering::SeqCst);
        self.behaviour.jsonrpc_error.store(0, Ordering::SeqCst);
        self.behaviour.flaky_fails.store(false, Ordering::SeqCst);
    }

    /// Make the `flaky` tool fail (JSON-RPC internal error) until healed.
    pub fn break_flaky(&self) {
        self.behaviour.flaky_fails.store(true, Ordering::SeqCst);
    }
}

struct Tool {
    name: &'static str,
    behaviour: Arc<Behaviour>,
}

#[async_trait]
impl ToolHandler for Tool {
    async fn handle(&self, args: Value, _extra: RequestHandlerExtra) -> pmcp::Result<Value> {
        self.behaviour.record(self.name);
        match self.name {
            "echo" => Ok(json!({ "echo": args.get("message").cloned().unwrap_or(Value::Null) })),
            "fail" => Err(pmcp::Error::internal("the fail tool always fails")),
            "flaky" if self.behaviour.flaky_fails.load(Ordering::SeqCst) => {
                Err(pmcp::Error::internal("flaky tool is failing"))
            }
            "flaky" => Ok(json!({ "ok": true })),
            "slow" => {
                let ms = args.get("ms").and_then(Value::as_u64).unwrap_or(100);
                tokio::time::sleep(Duration::from_millis(ms)).await;
                Ok(json!({ "slept_ms": ms }))
            }
            "strict" => Err(pmcp::Error::protocol(
                pmcp::ErrorCode::INVALID_PARAMS,
                "strict wants a `value` argument",
            )),
            other => Err(pmcp::Error::internal(format!("unknown test tool {other}"))),
        }
    }
}

/// Starts a pmcp server on 127.0.0.1 with the tools `echo`, `fail`, `flaky`,
/// `slow` and `strict`, handling requests concurrently.
pub async fn start_server(name: &str) -> TestServer {
    start_server_wrapped(name, |b| b, |r| r).await
}

/// Like [`start_server`], with `customize` applied to the server builder
/// (tool middlewares, ...) and `wrap` to the finished router (outermost
/// layers). Served with `ConnectInfo<SocketAddr>`.
pub async fn start_server_wrapped(
    name: &str,
    customize: impl FnOnce(pmcp::server::ServerBuilder) -> pmcp::server::ServerBuilder,
    wrap: impl FnOnce(axum::Router) -> axum::Router,
) -> TestServer {
    let config = StreamableHttpServerConfig {
        enable_json_response: true,
        ..Default::default()
    };
    start_server_configured(name, config, customize, wrap).await
}

/// Like [`start_server_wrapped`], with pmcp's server `config` (for example
/// `Default::default()`: answers over SSE).
pub async fn start_server_configured(
    name: &str,
    server_config: StreamableHttpServerConfig,
    customize: impl FnOnce(pmcp::server::ServerBuilder) -> pmcp::server::ServerBuilder,
    wrap: impl FnOnce(axum::Router) -> axum::Router,
) -> TestServer {
    let behaviour = Arc::new(Behaviour::default());
    let mut builder = Server::builder()
        .name(name)
        .version("1.0.0")
        .capabilities(ServerCapabilities::tools_only());
    for tool in ["echo", "fail", "flaky", "slow", "strict"] {
        builder = builder.tool(
            tool,
            Tool {
                name: tool,
                behaviour: behaviour.clone(),
            },
        );
    }
    let server = match customize(builder).build() {
        Ok(server) => server,
        Err(e) => panic!("test server {name} failed to build: {e}"),
    };
    let config = pmcp::axum::RouterConfig {
        server_config,
        ..Default::default()
    };
    let switch = behaviour.clone();
    let app = pmcp::axum::concurrent_router_with_config(Arc::new(server), config).layer(
        axum::middleware::from_fn(move |req: Request<Body>, next: Next| {
            let switch = switch.clone();
            async move {
                switch.http_requests.fetch_add(1, Ordering::SeqCst);
                let status = switch.http_status.load(Ordering::SeqCst);
                if let (true, Ok(code)) = (status != 0, StatusCode::from_u16(status)) {
                    return (code, "switched off by the test").into_response();
                }
                let error_code = switch.jsonrpc_error.load(Ordering::SeqCst);
                if error_code == 0 {
                    return next.run(req).await;
                }
                let (parts, body) = req.into_parts();
                let bytes = match axum::body::to_bytes(body, 1 << 20).await {
                    Ok(b) => b,
                    Err(_) => return StatusCode::BAD_REQUEST.into_response(),
                };
                let message: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                if message.get("method").and_then(Value::as_str) == Some("tools/call") {
                    let answer = json!({
                        "jsonrpc": "2.0",
                        "id": message.get("id").cloned().unwrap_or(Value::Null),
                        "error": { "code": error_code, "message": "answered by the test switch" }
                    });
                    return (
                        [(axum::http::header::CONTENT_TYPE, "application/json")],
                        answer.to_string(),
                    )
                        .into_response();
                }
                next.run(Request::from_parts(parts, Body::from(bytes)))
                    .await
            }
        }),
    );
    let listener = match tokio::net::TcpListener::bind("127.0.0.1:0").await {
        Ok(l) => l,
        Err(e) => panic!("cannot bind a loopback port: {e}"),
    };
    let addr = match listener.local_addr() {
        Ok(a) => a,
        Err(e) => panic!("no local address: {e}"),
    };
    let app = wrap(app);
    let task = tokio::spawn(async move {
        let _ = axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await;
    });
    TestServer {
        addr,
        url: format!("http://{addr}/"),
        behaviour,
        task,
    }
}

/// A loopback URL where nothing listens (connection refused).
pub async fn down_url() -> String {
    let listener = match tokio::net::TcpListener::bind("127.0.0.1:0").await {
        Ok(l) => l,
        Err(e) => panic!("cannot bind a loopback port: {e}"),
    };
    let addr = match listener.local_addr() {
        Ok(a) => a,
        Err(e) => panic!("no local address: {e}"),
    };
    drop(listener);
    format!("http://{addr}/")
}

/// A pmcp streamable-HTTP transport to `url` (JSON responses).
pub fn transport(url: &str) -> StreamableHttpTransport {
    let parsed = match url::Url::parse(url) {
        Ok(u) => u,
        Err(e) => panic!("bad test url {url}: {e}"),
    };
    StreamableHttpTransport::new(StreamableHttpTransportConfigBuilder::new(parsed).build())
}

/// A client over `transport` with `middlewares`, not yet initialized.
pub fn client<T: pmcp::shared::Transport + 'static>(
    transport: T,
    middlewares: Vec<Arc<dyn AdvancedMiddleware>>,
) -> Client<T> {
    let mut builder = ClientBuilder::new(transport);
    for m in middlewares {
        builder = builder.with_middleware(m);
    }
    builder.build()
}

/// Initializes `client`, panicking with the error if it fails.
pub async fn initialize<T: pmcp::shared::Transport + 'static>(client: &mut Client<T>) {
    if let Err(e) = client.initialize(pmcp::ClientCapabilities::minimal()).await {
        panic!("initialize failed: {e}");
    }
}

/// Calls `tool` with `args`, returning the error if any.
pub async fn call<T: pmcp::shared::Transport + 'static>(
    client: &Client<T>,
    tool: &str,
    args: Value,
) -> pmcp::Result<Value> {
    client
        .call_tool(tool.to_string(), args)
        .await
        .map(|r| serde_json::to_value(r).unwrap_or(Value::Null))
}
pub mod raw_http;
pub mod redis;
pub mod scrape;
pub mod sse;
pub mod stream;
