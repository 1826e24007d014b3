//! Tests of the collector, the builder and the middleware.

use std::sync::Arc;
use std::time::Duration;

use pmcp::shared::{AdvancedMiddleware, EnhancedMiddlewareChain, MiddlewareContext};
use pmcp::types::{JSONRPCError, JSONRPCRequest, JSONRPCResponse, RequestId};

use crate::ConfigError;
use crate::circuit_breaker::{CircuitBreakerMetrics, CircuitState, KeySnapshot};
use crate::observe::text_format::{parse, value};
use crate::observe::*;
use crate::rate_limit::{KeyUsage, RateLimitMetrics};
use crate::registry::RegistryStats;

fn breaker_report() -> Report {
    let mut r = CircuitBreakerMetrics::new("upstream", "server");
    r.keys.push(
        KeySnapshot::new("https://api.example.com", CircuitState::Closed)
            .with_counts(42, 15, 900, 2),
    );
    r.keys.push(
        KeySnapshot::new("https://b.example.com", CircuitState::Open).with_counts(7, 3, 1, 1),
    );
    r.keys.push(KeySnapshot::new(
        "https://c.example.com",
        CircuitState::HalfOpen,
    ));
    r.total_requests = 968;
    r.successful_requests = 901;
    r.failed_requests = 49;
    r.rejected_requests = 18;
    r.state_transitions = 3;
    r.registry = RegistryStats {
        keys: 3,
        evicted: 5,
        overflowed: 2,
    };
    let latency = DurationHistogram::new();
    latency.record(Duration::from_millis(2));
    r.store = StoreReport::new("redis", "fail_open").with_latency(latency.snapshot());
    Report::CircuitBreaker(r)
}

fn limiter_report() -> Report {
    let mut r = RateLimitMetrics::new("calls", "method");
    r.keys
        .push(KeyUsage::new("tools/call", 85, 100).with_counts(9523, 47));
    r.keys
        .push(KeyUsage::new("tools/list", 0, 0).with_counts(1, 0));
    r.total_requests = 9571;
    r.allowed_requests = 9524;
    r.rejected_requests = 47;
    r.waited_requests = 2;
    let waits = DurationHistogram::new();
    waits.record(Duration::from_millis(300));
    waits.record(Duration::from_secs(2));
    r.wait_histogram = waits.snapshot();
    Report::RateLimit(r)
}

fn metrics_with(sources: Vec<Arc<dyn ReportSource>>) -> MetricsMiddleware {
    let mut b = MetricsMiddleware::builder();
    for s in sources {
        b = b.source(s);
    }
    match b.build() {
        Ok(m) => m,
        Err(e) => panic!("build failed: {e}"),
    }
}

#[test]
fn collector_exports_the_requested_names_labels_and_values() {
    let m = metrics_with(vec![Arc::new(breaker_report), Arc::new(limiter_report)]);
    let text = m.render();
    let s = parse(&text);
    let api = [
        ("name", "upstream"),
        ("scope", "server"),
        ("key", "https://api.example.com"),
    ];
    let b = [
        ("name", "upstream"),
        ("scope", "server"),
        ("key", "https://b.example.com"),
    ];
    let c = [
        ("name", "upstream"),
        ("scope", "server"),
        ("key", "https://c.example.com"),
    ];
    assert_eq!(value(&s, "mcp_circuit_breaker_state", &api), Some(0.0));
    assert_eq!(value(&s, "mcp_circuit_breaker_state", &b), Some(1.0));
    assert_eq!(value(&s, "mcp_circuit_breaker_state", &c), Some(2.0));
    assert_eq!(
        value(&s, "mcp_circuit_breaker_failures_total", &api),
        Some(42.0)
    );
    assert_eq!(
        value(&s, "mcp_circuit_breaker_requests_rejected_total", &api),
        Some(15.0)
    );
    assert_eq!(
        value(&s, "mcp_circuit_breaker_successes_total", &api),
        Some(900.0)
    );
    assert_eq!(
        value(&s, "mcp_circuit_breaker_transitions_total", &b),
        Some(1.0)
    );
    let tc = [
        ("name", "calls"),
        ("scope", "method"),
        ("key", "tools/call"),
    ];
    assert_eq!(
        value(&s, "mcp_rate_limit_requests_allowed_total", &tc),
        Some(9523.0)
    );
    assert_eq!(
        value(&s, "mcp_rate_limit_requests_rejected_total", &tc),
        Some(47.0)
    );
    assert_eq!(value(&s, "mcp_rate_limit_current_usage", &tc), Some(0.85));
    let tl = [
        ("name", "calls"),
        ("scope", "method"),
        ("key", "tools/list"),
    ];
    assert_eq!(value(&s, "mcp_rate_limit_current_usage", &tl), Some(0.0));
    let calls = |outcome| {
        [
            ("name", "upstream"),
            ("scope", "server"),
            ("outcome", outcome),
        ]
    };
    assert_eq!(
        value(&s, "mcp_circuit_breaker_calls_total", &calls("failed")),
        Some(49.0)
    );
    assert_eq!(
        value(&s, "mcp_circuit_breaker_calls_total", &calls("rejected")),
        Some(18.0)
    );
    let keys = |state| [("name", "upstream"), ("scope", "server"), ("state", state)];
    assert_eq!(
        value(&s, "mcp_circuit_breaker_keys", &keys("open")),
        Some(1.0)
    );
    assert_eq!(
        value(&s, "mcp_circuit_breaker_keys", &keys("closed")),
        Some(1.0)
    );
    let lim = [("name", "calls"), ("scope", "method")];
    assert_eq!(value(&s, "mcp_rate_limit_waits_total", &lim), Some(2.0));
    assert_eq!(
        value(&s, "mcp_rate_limit_requests_total", &lim),
        Some(9571.0)
    );
    assert_eq!(
        value(&s, "mcp_rate_limit_wait_seconds_count", &lim),
        Some(2.0)
    );
    assert_eq!(
        value(&s, "mcp_rate_limit_wait_seconds_sum", &lim),
        Some(2.3)
    );
    let le = |le| [("name", "calls"), ("scope", "method"), ("le", le)];
    assert_eq!(
        value(&s, "mcp_rate_limit_wait_seconds_bucket", &le("0.25")),
        Some(0.0)
    );
    assert_eq!(
        value(&s, "mcp_rate_limit_wait_seconds_bucket", &le("0.5")),
        Some(1.0)
    );
    assert_eq!(
        value(&s, "mcp_rate_limit_wait_seconds_bucket", &le("+Inf")),
        Some(2.0)
    );
    let src = [
        ("component", "circuit_breaker"),
        ("name", "upstream"),
        ("scope", "server"),
    ];
    assert_eq!(value(&s, "mcp_resilience_keys", &src), Some(3.0));
    assert_eq!(
        value(&s, "mcp_resilience_key_evictions_total", &src),
        Some(5.0)
    );
    assert_eq!(
        value(&s, "mcp_resilience_key_overflows_total", &src),
        Some(2.0)
    );
    assert_eq!(
        value(
            &s,
            "mcp_resilience_store_mode",
            &[("kind", "redis"), ("mode", "fail_open")]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &s,
            "mcp_resilience_store_mode",
            &[("kind", "redis"), ("mode", "normal")]
        ),
        Some(0.0)
    );
    assert_eq!(
        value(
            &s,
            "mcp_resilience_store_mode",
            &[("kind", "memory"), ("mode", "normal")]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &s,
            "mcp_resilience_store_latency_seconds_count",
            &[("kind", "redis")]
        ),
        Some(1.0)
    );
    assert!(text.contains("# TYPE mcp_circuit_breaker_state gauge"));
    assert!(text.contains("# TYPE mcp_circuit_breaker_failures_total counter"));
    assert!(text.contains("# TYPE mcp_rate_limit_wait_seconds histogram"));
}

#[test]
fn state_info_is_one_hot() {
    let m = metrics_with(vec![Arc::new(breaker_report)]);
    let s = parse(&m.render());
    for (key, current) in [
        ("https://api.example.com", "closed"),
        ("https://b.example.com", "open"),
        ("https://c.example.com", "half_open"),
    ] {
        let mut total = 0.0;
        for state in ["closed", "open", "half_open"] {
            let v = value(
                &s,
                "mcp_circuit_breaker_state_info",
                &[
                    ("name", "upstream"),
                    ("scope", "server"),
                    ("key", key),
                    ("state", state),
                ],
            );
            let expected = if state == current { 1.0 } else { 0.0 };
            assert_eq!(v, Some(expected), "{key} {state}");
            total += expected;
        }
        assert_eq!(total, 1.0);
    }
    let series = s
        .iter()
        .filter(|x| x.name == "mcp_circuit_breaker_state_info")
        .count();
    assert_eq!(series, 9);
}

#[test]
fn values_are_read_at_scrape_time() {
    let state = Arc::new(parking_lot::Mutex::new(CircuitState::Closed));
    let shared = state.clone();
    let m = metrics_with(vec![Arc::new(move || {
        let mut r = CircuitBreakerMetrics::new("b", "global");
        r.keys.push(KeySnapshot::new("global", *shared.lock()));
        Report::CircuitBreaker(r)
    })]);
    let key = [("name", "b"), ("scope", "global"), ("key", "global")];
    assert_eq!(
        value(&parse(&m.render()), "mcp_circuit_breaker_state", &key),
        Some(0.0)
    );
    *state.lock() = CircuitState::Open;
    assert_eq!(
        value(&parse(&m.render()), "mcp_circuit_breaker_state", &key),
        Some(1.0)
    );
}

fn session_limiter(n: usize) -> Report {
    let mut r = RateLimitMetrics::new("per-session", "session");
    for i in 0..n {
        r.keys
            .push(KeyUsage::new(&format!("sess-{i:05}"), 1, 10).with_counts(1, 0));
    }
    Report::RateLimit(r)
}

#[test]
fn ten_thousand_session_keys_stay_under_the_cap() {
    for cap in [10usize, 100] {
        let m = match MetricsMiddleware::builder()
            .max_label_keys(cap)
            .source(Arc::new(|| session_limiter(10_000)))
            .build()
        {
            Ok(m) => m,
            Err(e) => panic!("{e}"),
        };
        let s = parse(&m.render());
        let series: Vec<_> = s
            .iter()
            .filter(|x| x.name == "mcp_rate_limit_requests_allowed_total")
            .collect();
        assert!(
            series.len() <= cap + 1,
            "{} series for cap {cap}",
            series.len()
        );
        assert!(series.len() <= 64 + 1);
        assert!(series.iter().all(|x| !x.labels["key"].starts_with("sess-")));
        let total: f64 = series.iter().map(|x| x.value).sum();
        assert_eq!(total, 10_000.0, "aggregation keeps every request");
    }
}

#[test]
fn many_server_keys_fold_into_other() {
    let m = match MetricsMiddleware::builder()
        .max_label_keys(5)
        .source(Arc::new(|| {
            let mut r = CircuitBreakerMetrics::new("b", "server");
            for i in 0..1_000u64 {
                r.keys.push(
                    KeySnapshot::new(format!("srv-{i:04}"), CircuitState::Closed)
                        .with_counts(i, 0, 0, 0),
                );
            }
            r.keys
                .push(KeySnapshot::new("quiet-but-open", CircuitState::Open));
            Report::CircuitBreaker(r)
        }))
        .build()
    {
        Ok(m) => m,
        Err(e) => panic!("{e}"),
    };
    let s = parse(&m.render());
    let failures: Vec<_> = s
        .iter()
        .filter(|x| x.name == "mcp_circuit_breaker_failures_total")
        .collect();
    assert_eq!(failures.len(), 6);
    let labelled = |key: &str| {
        value(
            &s,
            "mcp_circuit_breaker_failures_total",
            &[("name", "b"), ("scope", "server"), ("key", key)],
        )
    };
    assert_eq!(labelled("quiet-but-open"), Some(0.0));
    assert_eq!(labelled("srv-0999"), Some(999.0));
    assert_eq!(labelled("srv-0996"), Some(996.0));
    assert_eq!(labelled("srv-0995"), None);
    let folded: u64 = (0..996).sum();
    assert_eq!(labelled("__other__"), Some(folded as f64));
}

#[test]
fn odd_keys_are_escaped() {
    let odd = "a\"b\\c\nd é {x=\"1\"}";
    let m = metrics_with(vec![Arc::new(move || {
        let mut r = CircuitBreakerMetrics::new("b", "endpoint");
        r.keys.push(KeySnapshot::new(odd, CircuitState::Open));
        Report::CircuitBreaker(r)
    })]);
    let text = m.render();
    assert!(text.contains(r#"key="a\"b\\c\nd é {x=\"1\"}""#), "{text}");
    let s = parse(&text);
    assert_eq!(
        value(
            &s,
            "mcp_circuit_breaker_state",
            &[("name", "b"), ("scope", "endpoint"), ("key", odd)]
        ),
        Some(1.0)
    );
}

#[test]
fn two_breakers_on_the_same_key_are_two_series_told_apart_by_name() {
    let one = || {
        let mut r = CircuitBreakerMetrics::new("a", "server");
        r.keys
            .push(KeySnapshot::new("x", CircuitState::Closed).with_counts(1, 0, 0, 0));
        Report::CircuitBreaker(r)
    };
    let two = || {
        let mut r = CircuitBreakerMetrics::new("b", "server");
        r.keys
            .push(KeySnapshot::new("x", CircuitState::Open).with_counts(2, 0, 0, 0));
        Report::CircuitBreaker(r)
    };
    let m = metrics_with(vec![Arc::new(one), Arc::new(two)]);
    let s = parse(&m.render());
    let key = |name| [("name", name), ("scope", "server"), ("key", "x")];
    assert_eq!(
        value(&s, "mcp_circuit_breaker_failures_total", &key("a")),
        Some(1.0)
    );
    assert_eq!(
        value(&s, "mcp_circuit_breaker_failures_total", &key("b")),
        Some(2.0)
    );
    assert_eq!(value(&s, "mcp_circuit_breaker_state", &key("a")), Some(0.0));
    assert_eq!(value(&s, "mcp_circuit_breaker_state", &key("b")), Some(1.0));
}

#[test]
fn include_flags_leave_out_sources() {
    let m = match MetricsMiddleware::builder()
        .include_circuit_breaker_stats(false)
        .source(Arc::new(breaker_report))
        .source(Arc::new(limiter_report))
        .build()
    {
        Ok(m) => m,
        Err(e) => panic!("{e}"),
    };
    let text = m.render();
    assert!(!text.contains("mcp_circuit_breaker"));
    assert!(text.contains("mcp_rate_limit_current_usage"));
    let json = m.snapshot_json();
    assert_eq!(json["circuit_breakers"].as_array().map(Vec::len), Some(0));
    assert_eq!(json["rate_limits"].as_array().map(Vec::len), Some(1));
}

#[test]
fn json_snapshot_aggregates_every_source() {
    let m = metrics_with(vec![Arc::new(breaker_report), Arc::new(limiter_report)]);
    m.register(Arc::new(|| session_limiter(500)));
    let json = m.snapshot_json();
    assert_eq!(json["totals"]["circuit_breakers"]["keys_open"], 1);
    assert_eq!(json["totals"]["circuit_breakers"]["keys_half_open"], 1);
    assert_eq!(json["totals"]["circuit_breakers"]["rejected"], 18);
    assert_eq!(json["totals"]["rate_limits"]["allowed"], 9524);
    assert_eq!(json["circuit_breakers"][0]["store"]["mode"], "fail_open");
    assert_eq!(json["circuit_breakers"][0]["registry"]["evicted"], 5);
    assert_eq!(json["rate_limits"][0]["keys"][0]["key"], "tools/call");
    assert_eq!(json["rate_limits"][0]["keys"][0]["usage"], 0.85);
    let session_keys = json["rate_limits"][1]["keys"]
        .as_array()
        .map_or(0, Vec::len);
    assert!(session_keys <= 64, "{session_keys}");
}

#[test]
fn builder_rejects_bad_settings() {
    let err = |b: MetricsMiddlewareBuilder| match b.build() {
        Ok(_) => panic!("expected an error"),
        Err(ConfigError::Invalid { field, .. }) => field,
        Err(e) => panic!("unexpected {e}"),
    };
    assert_eq!(
        err(MetricsMiddleware::builder().export_interval(Duration::ZERO)),
        "export_interval"
    );
    assert_eq!(
        err(MetricsMiddleware::builder().max_label_keys(0)),
        "max_label_keys"
    );
    for endpoint in ["metrics", "/", "/metrics/", "/me trics", "/{x}"] {
        let b = MetricsMiddleware::builder().exporter(MetricsExporter::Prometheus {
            endpoint: endpoint.into(),
        });
        assert_eq!(err(b), "exporter", "{endpoint}");
    }
    let registry = prometheus::Registry::new();
    assert!(
        MetricsMiddleware::builder()
            .registry(registry.clone())
            .build()
            .is_ok()
    );
    assert_eq!(
        err(MetricsMiddleware::builder().registry(registry)),
        "registry"
    );
}

#[test]
fn a_users_registry_renders_its_own_metrics_too() {
    let registry = prometheus::Registry::new();
    let mine = prometheus::IntCounter::new("my_app_things_total", "things");
    let Ok(mine) = mine else { panic!("counter") };
    assert!(registry.register(Box::new(mine.clone())).is_ok());
    mine.inc();
    let m = match MetricsMiddleware::builder()
        .registry(registry.clone())
        .source(Arc::new(breaker_report))
        .build()
    {
        Ok(m) => m,
        Err(e) => panic!("{e}"),
    };
    let s = parse(&m.render());
    assert_eq!(value(&s, "my_app_things_total", &[]), Some(1.0));
    assert!(
        registry
            .gather()
            .iter()
            .any(|f| f.name() == "mcp_circuit_breaker_state")
    );
}

fn request(id: i64, method: &str) -> JSONRPCRequest {
    JSONRPCRequest {
        jsonrpc: "2.0".into(),
        method: method.into(),
        params: None,
        id: RequestId::from(id),
    }
}

#[tokio::test]
async fn middleware_records_counts_durations_and_errors_through_the_chain() {
    let m = metrics_with(vec![]);
    let mut chain = EnhancedMiddlewareChain::new();
    chain.add(Arc::new(m.clone()));
    assert_eq!(m.name(), "metrics");

    for id in 0..3 {
        let context = MiddlewareContext::with_request_id(id.to_string());
        let mut req = request(id, "tools/call");
        assert!(
            chain
                .process_request_with_context(&mut req, &context)
                .await
                .is_ok()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
        let mut resp = if id == 2 {
            JSONRPCResponse::error(RequestId::from(id), JSONRPCError::new(-32603, "boom"))
        } else {
            JSONRPCResponse::success(RequestId::from(id), serde_json::json!({}))
        };
        assert!(
            chain
                .process_response_with_context(&mut resp, &context)
                .await
                .is_ok()
        );
    }
    assert_eq!(m.get_request_count("tools/call"), 3);
    assert_eq!(m.get_error_count("tools/call"), 1);
    let d = m.request_duration("tools/call");
    let Some(d) = d else { panic!("no durations") };
    assert_eq!(d.count, 3);
    assert!(d.sum_seconds >= 0.06, "{}", d.sum_seconds);
    assert!(m.get_average_duration("tools/call") >= 20_000);

    let s = parse(&m.render());
    assert_eq!(
        value(&s, "mcp_requests_total", &[("method", "tools/call")]),
        Some(3.0)
    );
    assert_eq!(
        value(
            &s,
            "mcp_request_errors_total",
            &[("method", "tools/call"), ("code", "-32603")]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &s,
            "mcp_request_duration_seconds_count",
            &[("method", "tools/call")]
        ),
        Some(3.0)
    );
    assert_eq!(
        value(
            &s,
            "mcp_request_duration_seconds_bucket",
            &[("method", "tools/call"), ("le", "0.01")]
        ),
        Some(0.0)
    );
}

/// Rejects every request, as a breaker or limiter would.
struct Rejecting;

#[async_trait::async_trait]
impl AdvancedMiddleware for Rejecting {
    fn priority(&self) -> pmcp::shared::MiddlewarePriority {
        pmcp::shared::MiddlewarePriority::Critical
    }
    async fn on_request_with_context(
        &self,
        request: &mut JSONRPCRequest,
        context: &MiddlewareContext,
    ) -> pmcp::Result<()> {
        if request.method == "tools/call" {
            context.set_metadata(METHOD_METADATA_KEY.into(), request.method.clone());
        }
        Err(pmcp::Error::RateLimited)
    }
}

#[tokio::test]
async fn chain_errors_are_counted_once_under_the_method() {
    let m = metrics_with(vec![]);
    let mut chain = EnhancedMiddlewareChain::new();
    chain.add(Arc::new(m.clone()));
    chain.add(Arc::new(Rejecting));
    let context = MiddlewareContext::with_request_id("1".into());
    let mut req = request(1, "tools/call");
    assert!(
        chain
            .process_request_with_context(&mut req, &context)
            .await
            .is_err()
    );
    // Rejected before this middleware ran: counted as a request and an error.
    assert_eq!(m.get_request_count("tools/call"), 1);
    assert_eq!(m.get_error_count("tools/call"), 1);
    let context = MiddlewareContext::with_request_id("2".into());
    let mut req = request(2, "prompts/list");
    assert!(
        chain
            .process_request_with_context(&mut req, &context)
            .await
            .is_err()
    );
    assert_eq!(m.get_error_count(UNKNOWN_METHOD), 1);
    let s = parse(&m.render());
    assert_eq!(
        value(
            &s,
            "mcp_request_errors_total",
            &[("method", "tools/call"), ("code", "-32005")]
        ),
        Some(1.0)
    );
}

#[tokio::test]
async fn hostile_methods_fold_into_other() {
    let m = match MetricsMiddleware::builder().max_methods(3).build() {
        Ok(m) => m,
        Err(e) => panic!("{e}"),
    };
    for i in 0..1_000 {
        let context = MiddlewareContext::default();
        let mut req = request(i, &format!("x/{i}"));
        assert!(m.on_request_with_context(&mut req, &context).await.is_ok());
    }
    let s = parse(&m.render());
    let series = s.iter().filter(|x| x.name == "mcp_requests_total").count();
    assert_eq!(series, 4);
    assert_eq!(
        value(&s, "mcp_requests_total", &[("method", OTHER_METHOD)]),
        Some(997.0)
    );
}

#[tokio::test(start_paused = true)]
async fn export_task_emits_a_snapshot_every_interval() {
    let m = match MetricsMiddleware::builder()
        .export_interval(Duration::from_secs(10))
        .source(Arc::new(breaker_report))
        .build()
    {
        Ok(m) => m,
        Err(e) => panic!("{e}"),
    };
    let task = match m.start_export() {
        Ok(t) => t,
        Err(e) => panic!("{e}"),
    };
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(m.export_count(), 0);
    tokio::time::sleep(Duration::from_secs(21)).await;
    assert_eq!(m.export_count(), 2);
    let last = m.last_export();
    assert_eq!(
        last.map(|j| j["totals"]["circuit_breakers"]["keys_open"].clone()),
        Some(serde_json::json!(1))
    );
    task.stop();
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(m.export_count(), 2);
}

#[test]
fn start_export_needs_a_runtime() {
    let m = metrics_with(vec![]);
    assert!(matches!(m.start_export(), Err(MetricsError::NoRuntime)));
}
