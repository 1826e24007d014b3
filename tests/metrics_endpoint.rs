//! Scrapes `MetricsMiddleware::serve` over real HTTP and checks the text
//! format and the JSON snapshot.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use pmcp_resilience::observe::{
    BreakerKeyReport, BreakerReport, BreakerStateReport, LimiterKeyReport, LimiterReport,
    MetricsExporter, MetricsMiddleware, Report,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A plain HTTP/1.1 GET; returns status, content type and body.
async fn get(addr: SocketAddr, path: &str) -> (u16, String, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(req.as_bytes()).await.expect("write");
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.expect("read");
    let raw = String::from_utf8(raw).expect("utf-8");
    let (head, body) = raw.split_once("\r\n\r\n").expect("head and body");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status");
    let content_type = head
        .lines()
        .find_map(|l| l.strip_prefix("content-type: "))
        .unwrap_or_default()
        .to_owned();
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_owned()
    };
    (status, content_type, body)
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n").expect("chunk size");
        let size = usize::from_str_radix(size.trim(), 16).expect("hex size");
        if size == 0 {
            return out;
        }
        out.push_str(&rest[..size]);
        body = &rest[size + 2..];
    }
}

/// `name{labels} value` lines, as (name, labels, value).
fn parse(text: &str) -> Vec<(String, BTreeMap<String, String>, f64)> {
    let mut out = Vec::new();
    for line in text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let (series, value) = line.rsplit_once(' ').expect("value");
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            v => v.parse().expect("number"),
        };
        let (name, labels) = match series.split_once('{') {
            None => (series.to_owned(), BTreeMap::new()),
            Some((name, rest)) => {
                let rest = rest.strip_suffix('}').expect("closing brace");
                let mut labels = BTreeMap::new();
                let mut chars = rest.chars().peekable();
                while chars.peek().is_some() {
                    let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
                    assert_eq!(chars.next(), Some('"'));
                    let mut val = String::new();
                    while let Some(c) = chars.next() {
                        match c {
                            '\\' => match chars.next() {
                                Some('n') => val.push('\n'),
                                Some(c) => val.push(c),
                                None => panic!("dangling escape"),
                            },
                            '"' => break,
                            c => val.push(c),
                        }
                    }
                    if chars.peek() == Some(&',') {
                        chars.next();
                    }
                    labels.insert(key, val);
                }
                (name.to_owned(), labels)
            }
        };
        out.push((name, labels, value));
    }
    out
}

fn value(
    samples: &[(String, BTreeMap<String, String>, f64)],
    name: &str,
    labels: &[(&str, &str)],
) -> f64 {
    let want: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    let found: Vec<f64> = samples
        .iter()
        .filter(|(n, l, _)| n == name && *l == want)
        .map(|(_, _, v)| *v)
        .collect();
    assert_eq!(found.len(), 1, "{name} {labels:?}: {found:?}");
    found[0]
}

#[tokio::test]
async fn serve_exposes_text_and_json_over_http() {
    let rejected = Arc::new(AtomicU64::new(0));
    let counter = rejected.clone();
    let breaker =
        move || {
            let mut r = BreakerReport::new("upstream", "server");
            r.keys.push(
                BreakerKeyReport::new("https://api.example.com", BreakerStateReport::Open)
                    .with_counts(42, counter.load(Ordering::Relaxed), 10, 1),
            );
            r.rejected = counter.load(Ordering::Relaxed);
            Report::CircuitBreaker(r)
        };
    let limiter = || {
        let mut r = LimiterReport::new("per-session", "session");
        for i in 0..5_000 {
            r.keys
                .push(LimiterKeyReport::new(format!("session-{i}"), 5, 10).with_counts(2, 1));
        }
        r.allowed = 10_000;
        r.rejected = 5_000;
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
    let key = [("scope", "server"), ("key", "https://api.example.com")];
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
