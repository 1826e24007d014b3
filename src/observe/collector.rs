//! The Prometheus collector: pulls reports from the sources at scrape time.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use prometheus::core::{Collector, Desc};
use prometheus::proto::{
    Bucket, Counter, Gauge, Histogram, LabelPair, Metric, MetricFamily, MetricType,
};

use crate::circuit_breaker::{CircuitState, KeySnapshot};
use crate::error::ConfigError;
use crate::metrics::HistogramSnapshot;
use crate::metrics::StoreReport;
use crate::observe::cardinality::KeyRow;
use crate::observe::snapshot::{Gathered, Shared};
use crate::rate_limit::KeyUsage;

struct Spec {
    name: &'static str,
    help: &'static str,
    kind: MetricType,
    labels: &'static [&'static str],
}

const fn spec(
    name: &'static str,
    help: &'static str,
    kind: MetricType,
    labels: &'static [&'static str],
) -> Spec {
    Spec {
        name,
        help,
        kind,
        labels,
    }
}

/// Per-key series: the middleware instance, its scope, and the key in the
/// API's own text (`tool:search`; session and custom keys hashed).
const SCOPE_KEY: &[&str] = &["name", "scope", "key"];
const SOURCE: &[&str] = &["component", "name", "scope"];

/// Every family the collector exports, in output order.
const SPECS: &[Spec] = &[
    spec(
        "mcp_requests_total",
        "MCP requests seen by the metrics middleware.",
        MetricType::COUNTER,
        &["method"],
    ),
    spec(
        "mcp_request_errors_total",
        "MCP requests answered with a JSON-RPC error or failed in the middleware chain, by error code.",
        MetricType::COUNTER,
        &["method", "code"],
    ),
    spec(
        "mcp_request_duration_seconds",
        "Time from sending an MCP request to its response.",
        MetricType::HISTOGRAM,
        &["method"],
    ),
    spec(
        "mcp_circuit_breaker_state",
        "Circuit breaker state: 0 closed, 1 open, 2 half-open.",
        MetricType::GAUGE,
        SCOPE_KEY,
    ),
    spec(
        "mcp_circuit_breaker_state_info",
        "Circuit breaker state, one-hot: 1 for the current state, 0 for the others.",
        MetricType::GAUGE,
        &["name", "scope", "key", "state"],
    ),
    spec(
        "mcp_circuit_breaker_failures_total",
        "Calls the circuit breaker counted as failures.",
        MetricType::COUNTER,
        SCOPE_KEY,
    ),
    spec(
        "mcp_circuit_breaker_requests_rejected_total",
        "Calls the circuit breaker rejected.",
        MetricType::COUNTER,
        SCOPE_KEY,
    ),
    spec(
        "mcp_circuit_breaker_successes_total",
        "Calls the circuit breaker counted as successes.",
        MetricType::COUNTER,
        SCOPE_KEY,
    ),
    spec(
        "mcp_circuit_breaker_transitions_total",
        "Circuit breaker state changes.",
        MetricType::COUNTER,
        SCOPE_KEY,
    ),
    spec(
        "mcp_circuit_breaker_calls_total",
        "Calls through a circuit breaker, all keys, by outcome.",
        MetricType::COUNTER,
        &["name", "scope", "outcome"],
    ),
    spec(
        "mcp_circuit_breaker_keys",
        "Keys of a circuit breaker in each state.",
        MetricType::GAUGE,
        &["name", "scope", "state"],
    ),
    spec(
        "mcp_rate_limit_requests_allowed_total",
        "Requests the rate limiter allowed.",
        MetricType::COUNTER,
        SCOPE_KEY,
    ),
    spec(
        "mcp_rate_limit_requests_rejected_total",
        "Requests the rate limiter rejected.",
        MetricType::COUNTER,
        SCOPE_KEY,
    ),
    spec(
        "mcp_rate_limit_current_usage",
        "Fraction of the limit in use, 0 to 1.",
        MetricType::GAUGE,
        SCOPE_KEY,
    ),
    spec(
        "mcp_rate_limit_requests_total",
        "Requests through a rate limiter, all keys.",
        MetricType::COUNTER,
        &["name", "scope"],
    ),
    spec(
        "mcp_rate_limit_waits_total",
        "Requests that waited for rate limit capacity.",
        MetricType::COUNTER,
        &["name", "scope"],
    ),
    spec(
        "mcp_rate_limit_wait_seconds",
        "Time requests waited for rate limit capacity.",
        MetricType::HISTOGRAM,
        &["name", "scope"],
    ),
    spec(
        "mcp_resilience_keys",
        "Keys held by a breaker or limiter registry.",
        MetricType::GAUGE,
        SOURCE,
    ),
    spec(
        "mcp_resilience_key_evictions_total",
        "Idle keys evicted from a breaker or limiter registry.",
        MetricType::COUNTER,
        SOURCE,
    ),
    spec(
        "mcp_resilience_key_overflows_total",
        "Requests served by the shared overflow key because the registry was full.",
        MetricType::COUNTER,
        SOURCE,
    ),
    spec(
        "mcp_resilience_store_mode",
        "Number of breakers and limiters whose store of this kind is in this failure-policy mode.",
        MetricType::GAUGE,
        &["kind", "mode"],
    ),
    spec(
        "mcp_resilience_store_degraded_decisions_total",
        "Decisions taken without the store (unreachable or slow) under its failure policy.",
        MetricType::COUNTER,
        &["kind"],
    ),
    spec(
        "mcp_resilience_store_latency_seconds",
        "Latency of state store operations.",
        MetricType::HISTOGRAM,
        &["kind"],
    ),
];

enum Sample {
    Value(f64),
    Histogram(HistogramSnapshot),
}

/// Samples by family and label values; adding to an existing series sums.
#[derive(Default)]
struct Families {
    series: HashMap<&'static str, BTreeMap<Vec<String>, Sample>>,
}

impl Families {
    fn add(&mut self, name: &'static str, labels: &[&str], value: f64) {
        let entry = self
            .series
            .entry(name)
            .or_default()
            .entry(labels.iter().map(|l| (*l).to_owned()).collect())
            .or_insert(Sample::Value(0.0));
        if let Sample::Value(v) = entry {
            *v += value;
        }
    }

    fn histogram(&mut self, name: &'static str, labels: &[&str], snapshot: &HistogramSnapshot) {
        let entry = self
            .series
            .entry(name)
            .or_default()
            .entry(labels.iter().map(|l| (*l).to_owned()).collect())
            .or_insert_with(|| Sample::Histogram(HistogramSnapshot::default()));
        if let Sample::Histogram(h) = entry
            && !h.merge(snapshot)
        {
            tracing::debug!(
                metric = name,
                "histograms with different buckets not merged"
            );
        }
    }

    fn into_families(mut self) -> Vec<MetricFamily> {
        let mut out = Vec::new();
        for spec in SPECS {
            let Some(series) = self.series.remove(spec.name) else {
                continue;
            };
            let metrics = series
                .into_iter()
                .map(|(values, sample)| metric(spec, values, sample))
                .collect();
            let mut family = MetricFamily::default();
            family.set_name(spec.name.to_owned());
            family.set_help(spec.help.to_owned());
            family.set_field_type(spec.kind);
            family.set_metric(metrics);
            out.push(family);
        }
        out
    }
}

/// The states of the one-hot gauge `mcp_circuit_breaker_state_info`, in order.
const STATES: [CircuitState; 3] = [
    CircuitState::Closed,
    CircuitState::Open,
    CircuitState::HalfOpen,
];

/// The value of `mcp_circuit_breaker_state`: 0 closed, 1 open, 2 half-open.
fn state_gauge(state: CircuitState) -> f64 {
    match state {
        CircuitState::Closed => 0.0,
        CircuitState::Open => 1.0,
        CircuitState::HalfOpen => 2.0,
    }
}

fn metric(spec: &Spec, values: Vec<String>, sample: Sample) -> Metric {
    let labels = spec
        .labels
        .iter()
        .zip(values)
        .map(|(name, value)| {
            let mut pair = LabelPair::default();
            pair.set_name((*name).to_owned());
            pair.set_value(value);
            pair
        })
        .collect();
    let mut m = Metric::default();
    m.set_label(labels);
    match (sample, spec.kind) {
        (Sample::Value(v), MetricType::COUNTER) => {
            let mut c = Counter::default();
            c.set_value(v);
            m.set_counter(c);
        }
        (Sample::Value(v), _) => {
            let mut g = Gauge::default();
            g.set_value(v);
            m.set_gauge(g);
        }
        (Sample::Histogram(h), _) => {
            let mut out = Histogram::default();
            out.set_sample_count(h.count);
            out.set_sample_sum(h.sum_seconds);
            out.set_bucket(
                h.buckets
                    .iter()
                    .map(|(bound, count)| {
                        let mut b = Bucket::default();
                        b.set_upper_bound(*bound);
                        b.set_cumulative_count(*count);
                        b
                    })
                    .collect(),
            );
            m.set_histogram(out);
        }
    }
    m
}

/// Turns one pull of everything into metric families.
pub(crate) fn families(gathered: &Gathered) -> Vec<MetricFamily> {
    let mut f = Families::default();
    for m in &gathered.requests {
        f.add("mcp_requests_total", &[&m.method], m.requests as f64);
        for (code, n) in &m.errors {
            f.add("mcp_request_errors_total", &[&m.method, code], *n as f64);
        }
        f.histogram("mcp_request_duration_seconds", &[&m.method], &m.duration);
    }

    // Two sources under one name (handles of one breaker reported twice)
    // merge into one series; two names are two series.
    let mut breaker_rows: BTreeMap<(&str, &str, String), KeySnapshot> = BTreeMap::new();
    for b in &gathered.breakers {
        let r = &b.report;
        for row in &b.rows {
            match breaker_rows.get_mut(&(r.name.as_str(), r.scope, row.key.clone())) {
                Some(existing) => existing.absorb(row),
                None => {
                    breaker_rows.insert((r.name.as_str(), r.scope, row.key.clone()), row.clone());
                }
            }
        }
        for (outcome, n) in [
            ("successful", r.successful_requests),
            ("failed", r.failed_requests),
            ("rejected", r.rejected_requests),
            ("neutral", r.neutral_requests),
            ("timed_out", r.timed_out_requests),
            ("untracked", r.untracked_requests),
        ] {
            f.add(
                "mcp_circuit_breaker_calls_total",
                &[&r.name, r.scope, outcome],
                n as f64,
            );
        }
        for (state, n) in ["closed", "open", "half_open"].iter().zip(b.states) {
            f.add(
                "mcp_circuit_breaker_keys",
                &[&r.name, r.scope, state],
                n as f64,
            );
        }
        source_stats(
            &mut f,
            "circuit_breaker",
            &r.name,
            r.scope,
            &r.registry,
            &r.store,
        );
    }
    for ((name, scope, key), row) in &breaker_rows {
        let labels = [*name, *scope, key.as_str()];
        f.add("mcp_circuit_breaker_state", &labels, state_gauge(row.state));
        for state in STATES {
            let hot = if state == row.state { 1.0 } else { 0.0 };
            f.add(
                "mcp_circuit_breaker_state_info",
                &[name, scope, key, state.label()],
                hot,
            );
        }
        f.add(
            "mcp_circuit_breaker_failures_total",
            &labels,
            row.failures as f64,
        );
        f.add(
            "mcp_circuit_breaker_requests_rejected_total",
            &labels,
            row.rejections as f64,
        );
        f.add(
            "mcp_circuit_breaker_successes_total",
            &labels,
            row.successes as f64,
        );
        f.add(
            "mcp_circuit_breaker_transitions_total",
            &labels,
            row.transitions as f64,
        );
    }

    let mut limiter_rows: BTreeMap<(&str, &str, String), KeyUsage> = BTreeMap::new();
    for l in &gathered.limiters {
        let r = &l.report;
        for row in &l.rows {
            match limiter_rows.get_mut(&(r.name.as_str(), r.scope, row.key.to_string())) {
                Some(existing) => existing.absorb(row),
                None => {
                    limiter_rows
                        .insert((r.name.as_str(), r.scope, row.key.to_string()), row.clone());
                }
            }
        }
        f.add(
            "mcp_rate_limit_requests_total",
            &[&r.name, r.scope],
            r.total_requests as f64,
        );
        f.add(
            "mcp_rate_limit_waits_total",
            &[&r.name, r.scope],
            r.waited_requests as f64,
        );
        f.histogram(
            "mcp_rate_limit_wait_seconds",
            &[&r.name, r.scope],
            &r.wait_histogram,
        );
        source_stats(
            &mut f,
            "rate_limit",
            &r.name,
            r.scope,
            &r.registry,
            &r.store,
        );
    }
    for ((name, scope, key), row) in &limiter_rows {
        let labels = [*name, *scope, key.as_str()];
        f.add(
            "mcp_rate_limit_requests_allowed_total",
            &labels,
            row.allowed as f64,
        );
        f.add(
            "mcp_rate_limit_requests_rejected_total",
            &labels,
            row.rejected as f64,
        );
        f.add("mcp_rate_limit_current_usage", &labels, row.usage());
    }
    f.into_families()
}

fn source_stats(
    f: &mut Families,
    component: &str,
    name: &str,
    scope: &str,
    registry: &crate::registry::RegistryStats,
    store: &StoreReport,
) {
    let labels = [component, name, scope];
    f.add("mcp_resilience_keys", &labels, registry.keys as f64);
    f.add(
        "mcp_resilience_key_evictions_total",
        &labels,
        registry.evicted as f64,
    );
    f.add(
        "mcp_resilience_key_overflows_total",
        &labels,
        registry.overflowed as f64,
    );
    for mode in StoreReport::MODES {
        let current = if mode == store.mode { 1.0 } else { 0.0 };
        f.add("mcp_resilience_store_mode", &[store.kind, mode], current);
    }
    if !StoreReport::MODES.contains(&store.mode) {
        f.add("mcp_resilience_store_mode", &[store.kind, store.mode], 1.0);
    }
    if let Some(decisions) = store.degraded_decisions {
        f.add(
            "mcp_resilience_store_degraded_decisions_total",
            &[store.kind],
            decisions as f64,
        );
    }
    if let Some(latency) = &store.latency {
        f.histogram(
            "mcp_resilience_store_latency_seconds",
            &[store.kind],
            latency,
        );
    }
}

/// A [`prometheus::core::Collector`] that reads every source when the
/// registry is gathered, so scraped values are current at scrape time.
pub(crate) struct ResilienceCollector {
    shared: Arc<Shared>,
    descs: Vec<Desc>,
}

impl ResilienceCollector {
    pub(crate) fn new(shared: Arc<Shared>) -> Result<Self, ConfigError> {
        let descs = SPECS
            .iter()
            .map(|s| {
                Desc::new(
                    s.name.to_owned(),
                    s.help.to_owned(),
                    s.labels.iter().map(|l| (*l).to_owned()).collect(),
                    HashMap::new(),
                )
                .map_err(|e| ConfigError::invalid("registry", format!("metric {}: {e}", s.name)))
            })
            .collect::<Result<_, _>>()?;
        Ok(ResilienceCollector { shared, descs })
    }
}

impl Collector for ResilienceCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        families(&self.shared.gather())
    }
}
