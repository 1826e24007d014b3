//! Scrapes `MetricsMiddleware::serve` over real HTTP and checks the text
//! format and the JSON snapshot.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use pmcp_resilience::circuit_breaker::{CircuitBreakerMetrics, CircuitState, KeySnapshot};
use pmcp_resilience::observe::{MetricsExporter, MetricsMiddleware, Report};
use pmcp_resilience::rate_limit::{KeyUsage, RateLimitMetrics};
use support::scrape::{get, parse, value};

#[tokio::test]
async fn serve_exposes_text_and_json_over_http() {
    let rejected = Arc::new(AtomicU64::new(0));
    let counter = rejected.clone();
    let breaker = move || {
        let mut r = CircuitBreakerMetrics::new("upstream", "server");
        r.keys.push(
            KeySnapshot::new("https://api.example.com", CircuitState::Open).with_counts(
                42,
                counter.load(Ordering::Relaxed),
                10,
                1,
            ),
        );
        r.rejected_requests = counter.load(Ordering::Relaxed);
        Report::CircuitBreaker(r)
    };
    let limiter = || {
        let mut r = RateLimitMetrics::new("per-session", "session");
        for i in 0..5_000 {
            r.keys
                .push(KeyUsage::new(&format!("session-{i}"), 5, 10).with_counts(2, 1));
        }
        r.allowed_requests = 10_000;
        r.rejected_requests = 5_000;
        Report::RateLimit(r)
    };
    let metrics = MetricsMiddleware::builder()
        .exporter(MetricsExporter::Prometheus {
            endpoint: "/metrics".into(),
        })
        .source(Arc::new(breaker))
        .source(Arc::new(limiter))
        .build()
        .expect("valid config");
    let server = metrics
        .serve("127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("serve");
    let addr = server.local_addr();
    assert_ne!(addr.port(), 0);
    assert_eq!(server.metrics_url(), format!("http://{addr}/metrics"));

    rejected.store(15, Ordering::Relaxed);
    let (status, content_type, body) = get(addr, "/metrics").await;
    assert_eq!(status, 200);
    assert!(content_type.starts_with("text/plain"), "{content_type}");
    let s = parse(&body);
    let key = [
        ("name", "upstream"),
        ("scope", "server"),
        ("key", "https://api.example.com"),
    ];
    assert_eq!(value(&s, "mcp_circuit_breaker_state", &key), 1.0);
    assert_eq!(value(&s, "mcp_circuit_breaker_failures_total", &key), 42.0);
    assert_eq!(
        value(&s, "mcp_circuit_breaker_requests_rejected_total", &key),
        15.0
    );
    let one_hot = |state| {
        value(
            &s,
            "mcp_circuit_breaker_state_info",
            &[
                ("name", "upstream"),
                ("scope", "server"),
                ("key", "https://api.example.com"),
                ("state", state),
            ],
        )
    };
    assert_eq!(
        (one_hot("closed"), one_hot("open"), one_hot("half_open")),
        (0.0, 1.0, 0.0)
    );
    let usage: Vec<_> = s
        .iter()
        .filter(|(n, _, _)| n == "mcp_rate_limit_current_usage")
        .collect();
    assert!(!usage.is_empty() && usage.len() <= 64, "{}", usage.len());
    assert!(
        usage
            .iter()
            .all(|(_, l, v)| l["scope"] == "session" && l["key"].starts_with("h:") && *v == 0.5)
    );
    let allowed: f64 = s
        .iter()
        .filter(|(n, _, _)| n == "mcp_rate_limit_requests_allowed_total")
        .map(|(_, _, v)| v)
        .sum();
    assert_eq!(allowed, 10_000.0);

    // Scrape time, not export time: a change shows on the next scrape.
    rejected.store(16, Ordering::Relaxed);
    let (_, _, body) = get(addr, "/metrics").await;
    assert_eq!(
        value(
            &parse(&body),
            "mcp_circuit_breaker_requests_rejected_total",
            &key
        ),
        16.0
    );

    let (status, content_type, body) = get(addr, "/metrics.json").await;
    assert_eq!(status, 200);
    assert_eq!(content_type, "application/json");
    let json: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(json["totals"]["circuit_breakers"]["keys_open"], 1);
    assert_eq!(json["totals"]["circuit_breakers"]["rejected"], 16);
    assert_eq!(json["totals"]["rate_limits"]["rejected"], 5_000);
    assert_eq!(json["circuit_breakers"][0]["keys"][0]["state"], "open");
    assert_eq!(json["rate_limits"][0]["scope"], "session");

    let (status, _, _) = get(addr, "/nope").await;
    assert_eq!(status, 404);

    server.shutdown().await.expect("clean shutdown");
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}
