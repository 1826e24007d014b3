//! The Grafana dashboard (`dashboards/grafana.json`) and the alert rules of
//! the book's chapter 11 refer only to metrics the crate really exports.
//!
//! The list of exported names comes from the crate itself: a
//! `MetricsMiddleware` with a real circuit breaker and a real rate limiter
//! registered, after requests (failures, a rejection, a wait) went through
//! them, rendered to Prometheus text; every `# TYPE` line gives a name, and
//! histograms add their `_bucket`, `_sum` and `_count` series.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use pmcp::shared::{AdvancedMiddleware, MiddlewareContext};
use pmcp::types::jsonrpc::ResponsePayload;
use pmcp::types::{JSONRPCError, JSONRPCRequest, JSONRPCResponse, RequestId};
use pmcp_resilience::observe::{
    DurationHistogram, MetricsExporter, MetricsMiddleware, NamedSource, Report, StoreReport,
};
use pmcp_resilience::{
    BackpressureConfig, CircuitBreakerMiddleware, RateLimitMiddleware, RateLimitStrategy, Scope,
};
use serde_json::{Value, json};

const DASHBOARD: &str = include_str!("../dashboards/grafana.json");
const CHAPTER: &str = include_str!("../book/ch11-middleware.md");

fn call(id: i64, tool: &str) -> JSONRPCRequest {
    JSONRPCRequest {
        jsonrpc: "2.0".into(),
        method: "tools/call".into(),
        params: Some(json!({ "name": tool, "arguments": {} })),
        id: RequestId::from(id),
    }
}

fn internal_error(id: i64) -> JSONRPCResponse {
    JSONRPCResponse {
        jsonrpc: "2.0".into(),
        id: RequestId::from(id),
        payload: ResponsePayload::Error(JSONRPCError {
            code: -32603,
            message: "database down".into(),
            data: None,
        }),
    }
}

/// Every metric name (with histogram series) the crate exports, read from
/// its own Prometheus text after driving a breaker and two limiters.
async fn exported_names() -> BTreeSet<String> {
    let breaker = CircuitBreakerMiddleware::builder()
        .scope(Scope::PerTool)
        .failure_threshold(2)
        .build()
        .unwrap_or_else(|e| panic!("breaker: {e}"));
    let rejecting = RateLimitMiddleware::builder()
        .scope(Scope::PerMethod)
        .strategy(RateLimitStrategy::FixedWindow {
            max_requests: 1,
            window: Duration::from_secs(60),
        })
        .build()
        .unwrap_or_else(|e| panic!("limiter: {e}"));
    let waiting = RateLimitMiddleware::builder()
        .scope(Scope::PerTool)
        .strategy(RateLimitStrategy::TokenBucket {
            capacity: 1,
            refill_rate: 100,
        })
        .backpressure(BackpressureConfig::wait_up_to(Duration::from_secs(1)))
        .build()
        .unwrap_or_else(|e| panic!("limiter: {e}"));

    // A store that measures its latency, as the Redis store does: the
    // breaker's own report, with such a store.
    let reporting_breaker = breaker.clone();
    let store_source = Arc::new(move || {
        let mut report = reporting_breaker.metrics();
        report.name = "shared".into();
        let latency = DurationHistogram::new();
        latency.record(Duration::from_millis(1));
        report.store = StoreReport::new("redis", "normal").with_latency(latency.snapshot());
        Report::CircuitBreaker(report)
    });
    let metrics = MetricsMiddleware::builder()
        .exporter(MetricsExporter::Prometheus {
            endpoint: "/metrics".into(),
        })
        .include_circuit_breaker_stats(true)
        .include_rate_limit_stats(true)
        .source(Arc::new(NamedSource::new("tools", breaker.clone())))
        .source(Arc::new(NamedSource::new("calls", rejecting.clone())))
        .source(Arc::new(NamedSource::new("smooth", waiting.clone())))
        .source(store_source)
        .build()
        .unwrap_or_else(|e| panic!("metrics: {e}"));

    // Two failures open the breaker of `db`; the third call is rejected.
    for id in 0..3 {
        let context = MiddlewareContext::with_request_id(format!("r{id}"));
        let mut request = call(id, "db");
        let _ = metrics
            .on_request_with_context(&mut request, &context)
            .await;
        if breaker
            .on_request_with_context(&mut request, &context)
            .await
            .is_ok()
        {
            let mut response = internal_error(id);
            let _ = breaker
                .on_response_with_context(&mut response, &context)
                .await;
            let _ = metrics
                .on_response_with_context(&mut response, &context)
                .await;
        }
    }
    // One admitted, one rejected; one admitted at once, one after a wait.
    for id in 10..12 {
        let context = MiddlewareContext::with_request_id(format!("r{id}"));
        let _ = rejecting
            .on_request_with_context(&mut call(id, "search"), &context)
            .await;
        let _ = waiting
            .on_request_with_context(&mut call(id, "search"), &context)
            .await;
    }

    let text = metrics.render();
    let mut names = BTreeSet::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if let (Some("#"), Some("TYPE"), Some(name), Some(kind)) =
            (words.next(), words.next(), words.next(), words.next())
        {
            names.insert(name.to_string());
            if kind == "histogram" || kind == "summary" {
                for suffix in ["_bucket", "_sum", "_count"] {
                    names.insert(format!("{name}{suffix}"));
                }
            }
        }
    }
    names
}

/// Metric-like identifiers (`mcp_...`) in a PromQL expression or text.
fn metric_names_in(text: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(pos) = text[i..].find("mcp_") {
        let start = i + pos;
        let boundary = start == 0 || {
            let b = bytes[start - 1];
            !(b.is_ascii_alphanumeric() || b == b'_')
        };
        let end = text[start..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map_or(text.len(), |n| start + n);
        if boundary {
            found.insert(text[start..end].to_string());
        }
        i = end;
    }
    found
}

fn expressions(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                match v {
                    Value::String(s) if k == "expr" || k == "query" || k == "definition" => {
                        out.push(s.clone())
                    }
                    _ => expressions(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| expressions(v, out)),
        _ => {}
    }
}

#[tokio::test]
async fn the_crate_exports_what_the_operator_needs() {
    let names = exported_names().await;
    for expected in [
        "mcp_circuit_breaker_state",
        "mcp_circuit_breaker_requests_rejected_total",
        "mcp_rate_limit_requests_allowed_total",
        "mcp_rate_limit_requests_rejected_total",
        "mcp_rate_limit_current_usage",
        "mcp_rate_limit_wait_seconds_bucket",
        "mcp_request_duration_seconds_bucket",
        "mcp_resilience_store_mode",
        "mcp_resilience_store_latency_seconds_bucket",
    ] {
        assert!(
            names.contains(expected),
            "{expected} not exported: {names:?}"
        );
    }
}

#[tokio::test]
async fn dashboard_refers_only_to_exported_metrics() {
    let dashboard: Value =
        serde_json::from_str(DASHBOARD).unwrap_or_else(|e| panic!("dashboard is not JSON: {e}"));
    assert!(dashboard["title"].is_string());
    let panels = dashboard["panels"]
        .as_array()
        .unwrap_or_else(|| panic!("no panels array"));
    assert!(panels.len() >= 10, "only {} panels", panels.len());
    for panel in panels.iter().filter(|p| p["type"] != "row") {
        let targets = panel["targets"].as_array().map_or(0, Vec::len);
        assert!(targets > 0, "panel {} has no query", panel["title"]);
    }

    let mut exprs = Vec::new();
    expressions(&dashboard, &mut exprs);
    let referenced: BTreeSet<String> = exprs.iter().flat_map(|e| metric_names_in(e)).collect();
    assert!(
        referenced.len() >= 15,
        "few metrics referenced: {referenced:?}"
    );
    assert!(referenced.contains("mcp_rate_limit_wait_seconds_bucket"));
    assert!(referenced.contains("mcp_circuit_breaker_state"));

    let exported = exported_names().await;
    let unknown: Vec<_> = referenced.difference(&exported).collect();
    assert!(
        unknown.is_empty(),
        "the dashboard refers to metrics the crate does not export: {unknown:?}\nexported: {exported:?}"
    );
}

#[tokio::test]
async fn chapter_alert_rules_refer_only_to_exported_metrics() {
    let mut yaml = String::new();
    let mut inside = false;
    for line in CHAPTER.lines() {
        if line.starts_with("```") {
            inside = line.trim() == "```yaml";
            continue;
        }
        if inside {
            yaml.push_str(line);
            yaml.push('\n');
        }
    }
    let referenced = metric_names_in(&yaml);
    assert!(
        referenced.len() >= 6,
        "no alert rules found: {referenced:?}"
    );
    let exported = exported_names().await;
    let unknown: Vec<_> = referenced.difference(&exported).collect();
    assert!(
        unknown.is_empty(),
        "the alert rules refer to metrics the crate does not export: {unknown:?}"
    );
}
