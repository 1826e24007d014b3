//! `MetricsMiddleware`: request metrics for pmcp, plus the aggregation of
//! every registered breaker and limiter.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use parking_lot::{Mutex, RwLock};
use pmcp::shared::{AdvancedMiddleware, MiddlewareContext, MiddlewarePriority};
use pmcp::types::{JSONRPCRequest, JSONRPCResponse, jsonrpc::ResponsePayload};
use serde_json::Value;

use crate::error::ConfigError;
use crate::metrics::HistogramSnapshot;
use crate::metrics::METHOD_METADATA_KEY;
use crate::observe::MetricsError;
use crate::observe::collector::ResilienceCollector;
use crate::observe::report::{NamedSource, Report, ReportSource};
use crate::observe::requests::RequestStats;
use crate::observe::snapshot::Shared;

const LABEL_KEY: &str = "pmcp_resilience.metrics.label";
const START_KEY: &str = "pmcp_resilience.metrics.start_ns";
const ERROR_COUNTED_KEY: &str = "pmcp_resilience.metrics.error_counted";

/// The `method` label of an error whose request this middleware never saw.
pub const UNKNOWN_METHOD: &str = "unknown";

/// The `code` label of a chain error that carries no JSON-RPC code.
pub const INTERNAL_ERROR_CODE: &str = "internal";

/// Nanoseconds since a process-wide origin: context metadata holds strings,
/// and an `Instant` cannot be written as one.
fn now_nanos() -> u64 {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    let origin = *ORIGIN.get_or_init(Instant::now);
    crate::clock::duration_nanos(origin.elapsed())
}

/// The longest export interval: 24 hours. The export task's timer adds the
/// interval to the current instant, which cannot hold any `Duration`.
pub const MAX_EXPORT_INTERVAL: Duration = Duration::from_secs(24 * 60 * 60);

/// How the metrics are exported.
///
/// ```
/// use pmcp_resilience::observe::{MetricsExporter, MetricsMiddleware};
///
/// assert_eq!(MetricsExporter::default(), MetricsExporter::Prometheus { endpoint: "/metrics".into() });
/// let metrics = MetricsMiddleware::builder()
///     .exporter(MetricsExporter::Prometheus { endpoint: "/prom".into() })
///     .build()
///     .expect("valid settings");
/// // The text format at `/prom`, the JSON snapshot at `/prom.json`.
/// assert_eq!(metrics.endpoint(), "/prom");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum MetricsExporter {
    /// The Prometheus text format, served at `endpoint` by
    /// [`MetricsMiddleware::serve`], with the JSON snapshot at
    /// `<endpoint>.json`.
    Prometheus {
        /// The HTTP path, such as `/metrics`.
        endpoint: String,
    },
}

impl Default for MetricsExporter {
    fn default() -> Self {
        MetricsExporter::Prometheus {
            endpoint: "/metrics".into(),
        }
    }
}

/// Builds a [`MetricsMiddleware`]; see [`MetricsMiddleware::builder`].
///
/// ```
/// use pmcp_resilience::observe::{MetricsExporter, MetricsMiddleware};
/// use std::time::Duration;
///
/// let metrics = MetricsMiddleware::builder()
///     .exporter(MetricsExporter::Prometheus { endpoint: "/internal/metrics".into() })
///     .export_interval(Duration::from_secs(300))
///     .max_label_keys(50) // per source; the other keys are exported as `__other__`
///     .build()
///     .expect("valid settings");
/// assert_eq!(metrics.endpoint(), "/internal/metrics");
/// // Settings that cannot work are refused at `build()`.
/// assert!(MetricsMiddleware::builder().export_interval(Duration::ZERO).build().is_err());
/// ```
#[must_use]
pub struct MetricsMiddlewareBuilder {
    export_interval: Duration,
    exporter: MetricsExporter,
    include_breakers: bool,
    include_limiters: bool,
    sources: Vec<Arc<dyn ReportSource>>,
    registry: Option<prometheus::Registry>,
    max_label_keys: usize,
    max_methods: usize,
}

impl std::fmt::Debug for MetricsMiddlewareBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsMiddlewareBuilder")
            .field("export_interval", &self.export_interval)
            .field("exporter", &self.exporter)
            .field("sources", &self.sources.len())
            .field("max_label_keys", &self.max_label_keys)
            .finish_non_exhaustive()
    }
}

impl Default for MetricsMiddlewareBuilder {
    fn default() -> Self {
        MetricsMiddlewareBuilder {
            export_interval: Duration::from_secs(60),
            exporter: MetricsExporter::default(),
            include_breakers: true,
            include_limiters: true,
            sources: Vec::new(),
            registry: None,
            max_label_keys: 100,
            max_methods: 32,
        }
    }
}

impl MetricsMiddlewareBuilder {
    /// How often the export task logs the aggregated snapshot (default 60 s).
    ///
    /// Scraped values do not depend on it: they are read from the sources
    /// at every scrape.
    pub fn export_interval(mut self, interval: Duration) -> Self {
        self.export_interval = interval;
        self
    }

    /// How metrics are exported (default Prometheus at `/metrics`).
    pub fn exporter(mut self, exporter: MetricsExporter) -> Self {
        self.exporter = exporter;
        self
    }

    /// Whether circuit breaker reports are exported (default `true`).
    pub fn include_circuit_breaker_stats(mut self, include: bool) -> Self {
        self.include_breakers = include;
        self
    }

    /// Whether rate limiter reports are exported (default `true`).
    pub fn include_rate_limit_stats(mut self, include: bool) -> Self {
        self.include_limiters = include;
        self
    }

    /// Adds a breaker, a limiter or any other [`ReportSource`].
    ///
    /// Its series carry the name it reports under as the `name` label. A
    /// source whose name is already taken by an earlier breaker (for a
    /// breaker) or limiter (for a limiter) is renamed `<name>_2`, `<name>_3`,
    /// ... in registration order, so two unnamed limiters export as
    /// `rate_limit` and `rate_limit_2` instead of summing into one series.
    pub fn source(mut self, source: Arc<dyn ReportSource>) -> Self {
        self.sources.push(source);
        self
    }

    /// Registers the metrics in your own Prometheus registry instead of a
    /// private one; [`MetricsMiddleware::render`] then renders all of it.
    pub fn registry(mut self, registry: prometheus::Registry) -> Self {
        self.registry = Some(registry);
        self
    }

    /// Most keys of one source exported with their own `key` label
    /// (default 100); see [`cardinality`](crate::observe::cardinality).
    pub fn max_label_keys(mut self, max: usize) -> Self {
        self.max_label_keys = max;
        self
    }

    /// Most methods outside the MCP specification given their own `method`
    /// label (default 32); later ones are counted as `other`.
    pub fn max_methods(mut self, max: usize) -> Self {
        self.max_methods = max;
        self
    }

    /// Checks the settings and registers the collector in the registry.
    pub fn build(self) -> Result<MetricsMiddleware, ConfigError> {
        if self.export_interval.is_zero() {
            return Err(ConfigError::invalid(
                "export_interval",
                "must be greater than zero",
            ));
        }
        if self.export_interval > MAX_EXPORT_INTERVAL {
            return Err(ConfigError::invalid(
                "export_interval",
                format!("must be at most 24 h, not {:?}", self.export_interval),
            ));
        }
        if self.max_label_keys == 0 {
            return Err(ConfigError::invalid(
                "max_label_keys",
                "must be at least 1 (keys beyond it are aggregated into `__other__`)",
            ));
        }
        let endpoint = match &self.exporter {
            MetricsExporter::Prometheus { endpoint } => endpoint.clone(),
        };
        validate_endpoint(&endpoint)?;
        let mut names = Names::default();
        let sources = self
            .sources
            .into_iter()
            .map(|source| names.unique(source))
            .collect();
        let shared = Arc::new(Shared {
            sources: RwLock::new(sources),
            requests: RequestStats::new(self.max_methods),
            include_breakers: self.include_breakers,
            include_limiters: self.include_limiters,
            max_label_keys: self.max_label_keys,
        });
        let registry = self.registry.unwrap_or_default();
        let collector = ResilienceCollector::new(shared.clone())?;
        registry.register(Box::new(collector)).map_err(|e| {
            ConfigError::invalid(
                "registry",
                format!("cannot register the metrics (is another MetricsMiddleware using this registry?): {e}"),
            )
        })?;
        Ok(MetricsMiddleware {
            inner: Arc::new(Inner {
                shared,
                registry,
                endpoint,
                export_interval: self.export_interval,
                exports: AtomicU64::new(0),
                last_export: Mutex::new(None),
                names: Mutex::new(names),
            }),
        })
    }
}

fn validate_endpoint(endpoint: &str) -> Result<(), ConfigError> {
    if !endpoint.starts_with('/') {
        return Err(ConfigError::invalid(
            "exporter",
            format!("endpoint `{endpoint}` must start with '/', such as \"/metrics\""),
        ));
    }
    if endpoint.len() < 2 || endpoint.ends_with('/') {
        return Err(ConfigError::invalid(
            "exporter",
            format!(
                "endpoint `{endpoint}` must name a path and not end with '/', such as \"/metrics\""
            ),
        ));
    }
    if endpoint
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || "{}*?#%".contains(c))
    {
        return Err(ConfigError::invalid(
            "exporter",
            format!(
                "endpoint `{endpoint}` must be a plain path, without spaces, '{{', '}}', '*', '?', '#' or '%'"
            ),
        ));
    }
    Ok(())
}

pub(crate) struct Inner {
    pub(crate) shared: Arc<Shared>,
    registry: prometheus::Registry,
    pub(crate) endpoint: String,
    export_interval: Duration,
    exports: AtomicU64,
    last_export: Mutex<Option<Value>>,
    names: Mutex<Names>,
}

/// The names taken so far, per kind of source: the `name` label must tell
/// every registered breaker (and every limiter) apart.
#[derive(Default)]
struct Names {
    taken: HashSet<(&'static str, String)>,
}

impl Names {
    /// `source`, renamed `<name>_<n>` (the lowest free `n` from 2) when an
    /// earlier source of its kind reports under the same name.
    fn unique(&mut self, source: Arc<dyn ReportSource>) -> Arc<dyn ReportSource> {
        let report = source.report();
        let kind = match &report {
            Report::CircuitBreaker(_) => "circuit_breaker",
            Report::RateLimit(_) => "rate_limit",
        };
        let name = report.name().to_owned();
        if self.taken.insert((kind, name.clone())) {
            return source;
        }
        let mut n = 2u64;
        let renamed = loop {
            let candidate = format!("{name}_{n}");
            if self.taken.insert((kind, candidate.clone())) {
                break candidate;
            }
            n += 1;
        };
        tracing::debug!(
            from = %name,
            to = %renamed,
            "a {kind} of this name is already registered with the metrics; renamed"
        );
        Arc::new(NamedSource::new(renamed, SharedSource(source)))
    }
}

/// An `Arc<dyn ReportSource>` as a [`ReportSource`], to be wrapped.
struct SharedSource(Arc<dyn ReportSource>);

impl ReportSource for SharedSource {
    fn report(&self) -> Report {
        self.0.report()
    }
}

/// Request metrics for pmcp clients and servers, and one place where every
/// breaker and limiter is observed.
///
/// Cloning is cheap and clones share everything: install one clone in the
/// pmcp chain (`Arc::new(metrics.clone())`) and keep another to serve or
/// render the metrics. See the [module documentation](crate::observe).
///
/// ```
/// use pmcp::shared::{AdvancedMiddleware, MiddlewareContext};
/// use pmcp::types::{JSONRPCRequest, JSONRPCResponse, RequestId};
/// use pmcp_resilience::observe::MetricsMiddleware;
/// use pmcp_resilience::RateLimitMiddleware;
/// use std::sync::Arc;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let limiter = RateLimitMiddleware::builder().name("api").build()?;
/// let metrics = MetricsMiddleware::builder().source(Arc::new(limiter.clone())).build()?;
/// // In a pmcp chain, the middleware counts every request and its answer.
/// let context = MiddlewareContext::default();
/// let mut ping = JSONRPCRequest { jsonrpc: "2.0".into(), method: "ping".into(), params: None, id: RequestId::from(1i64) };
/// metrics.on_request_with_context(&mut ping, &context).await?;
/// let mut pong = JSONRPCResponse::success(RequestId::from(1i64), serde_json::json!({}));
/// metrics.on_response_with_context(&mut pong, &context).await?;
/// assert_eq!(metrics.get_request_count("ping"), 1);
/// // The limiter's series are read from it at every scrape.
/// assert!(metrics.render().contains(r#"mcp_rate_limit_requests_total{name="api",scope="global"} 0"#));
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct MetricsMiddleware {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for MetricsMiddleware {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsMiddleware")
            .field("endpoint", &self.inner.endpoint)
            .field("export_interval", &self.inner.export_interval)
            .field("sources", &self.inner.shared.sources.read().len())
            .finish_non_exhaustive()
    }
}

impl MetricsMiddleware {
    /// A builder with the defaults: Prometheus at `/metrics`, export every
    /// 60 s, breakers and limiters included, 100 keys per source.
    pub fn builder() -> MetricsMiddlewareBuilder {
        MetricsMiddlewareBuilder::default()
    }

    /// Adds a breaker, limiter or other source after the middleware is built;
    /// a name already taken is made unique as
    /// [`MetricsMiddlewareBuilder::source`] says.
    pub fn register(&self, source: Arc<dyn ReportSource>) {
        let mut names = self.inner.names.lock();
        let source = names.unique(source);
        self.inner.shared.sources.write().push(source);
    }

    /// The Prometheus registry the metrics are registered in.
    pub fn registry(&self) -> &prometheus::Registry {
        &self.inner.registry
    }

    /// The HTTP path of the text format (the JSON snapshot is at `<path>.json`).
    pub fn endpoint(&self) -> &str {
        &self.inner.endpoint
    }

    /// The Prometheus text format of the whole registry, values read now.
    pub fn render(&self) -> String {
        let families = self.inner.registry.gather();
        prometheus::TextEncoder::new()
            .encode_to_string(&families)
            .unwrap_or_else(|e| {
                tracing::warn!(error = %e, "cannot encode metrics");
                format!("# error encoding metrics: {e}\n")
            })
    }

    /// The aggregated JSON snapshot of requests, breakers and limiters, read now.
    pub fn snapshot_json(&self) -> Value {
        self.inner.shared.gather().to_json()
    }

    /// Requests counted for `method` (its label: `other` for folded methods).
    pub fn get_request_count(&self, method: &str) -> u64 {
        self.inner.shared.requests.request_count(method)
    }

    /// Errors counted for `method`, all codes.
    pub fn get_error_count(&self, method: &str) -> u64 {
        self.inner.shared.requests.error_count(method)
    }

    /// Mean duration of `method`'s requests in microseconds, 0 if none.
    pub fn get_average_duration(&self, method: &str) -> u64 {
        self.request_duration(method)
            .map_or(0, |h| (h.mean_seconds() * 1e6) as u64)
    }

    /// The duration histogram of `method`.
    pub fn request_duration(&self, method: &str) -> Option<HistogramSnapshot> {
        self.inner.shared.requests.duration(method)
    }

    /// Starts the export task: every `export_interval`, the aggregated
    /// snapshot is emitted as a `tracing` event (target
    /// `pmcp_resilience::metrics`, level INFO, field `snapshot`) and kept as
    /// [`last_export`](Self::last_export). It runs until the returned
    /// handle is dropped. [`serve`](Self::serve) starts one itself.
    pub fn start_export(&self) -> Result<ExportTask, MetricsError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| MetricsError::NoRuntime)?;
        let inner = self.inner.clone();
        let task = runtime.spawn(async move {
            let mut ticks = tokio::time::interval(inner.export_interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            ticks.tick().await;
            loop {
                ticks.tick().await;
                let snapshot = inner.shared.gather().to_json();
                tracing::info!(target: "pmcp_resilience::metrics", snapshot = %snapshot, "metrics snapshot");
                *inner.last_export.lock() = Some(snapshot);
                inner.exports.fetch_add(1, Ordering::Relaxed);
            }
        });
        Ok(ExportTask { task })
    }

    /// The snapshot of the latest export tick, if any.
    pub fn last_export(&self) -> Option<Value> {
        self.inner.last_export.lock().clone()
    }

    /// Export ticks so far.
    pub fn export_count(&self) -> u64 {
        self.inner.exports.load(Ordering::Relaxed)
    }

    fn label_from_context(&self, context: &MiddlewareContext) -> Option<String> {
        context.get_metadata(LABEL_KEY).or_else(|| {
            context
                .get_metadata(METHOD_METADATA_KEY)
                .map(|m| self.inner.shared.requests.label_of(&m))
        })
    }
}

/// The running export task of [`MetricsMiddleware::start_export`]; dropping
/// it stops the task.
///
/// ```
/// use pmcp_resilience::observe::MetricsMiddleware;
/// use std::time::Duration;
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() {
/// let metrics = MetricsMiddleware::builder()
///     .export_interval(Duration::from_secs(60))
///     .build()
///     .expect("valid settings");
/// let task = metrics.start_export().expect("inside a runtime");
/// tokio::time::sleep(Duration::from_secs(61)).await; // paused time: no real wait
/// assert_eq!(metrics.export_count(), 1);
/// assert!(metrics.last_export().is_some());
/// task.stop(); // dropping the handle stops it too
/// # }
/// ```
#[must_use = "the export task stops when this handle is dropped"]
#[derive(Debug)]
pub struct ExportTask {
    task: tokio::task::JoinHandle<()>,
}

impl ExportTask {
    /// Stops the task.
    pub fn stop(self) {}
}

impl Drop for ExportTask {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[async_trait]
impl AdvancedMiddleware for MetricsMiddleware {
    fn name(&self) -> &'static str {
        "metrics"
    }

    fn priority(&self) -> MiddlewarePriority {
        MiddlewarePriority::Low
    }

    crate::hooks::chain_hooks!();

    async fn on_request_with_context(
        &self,
        request: &mut JSONRPCRequest,
        context: &MiddlewareContext,
    ) -> pmcp::Result<()> {
        let requests = &self.inner.shared.requests;
        let label = requests.label_of(&request.method);
        requests.stats(&label).count_request();
        context.set_metadata(METHOD_METADATA_KEY.into(), request.method.clone());
        context.set_metadata(LABEL_KEY.into(), label);
        context.set_metadata(START_KEY.into(), now_nanos().to_string());
        Ok(())
    }

    async fn on_response_with_context(
        &self,
        response: &mut JSONRPCResponse,
        context: &MiddlewareContext,
    ) -> pmcp::Result<()> {
        let Some(label) = self.label_from_context(context) else {
            return Ok(());
        };
        let stats = self.inner.shared.requests.stats(&label);
        let elapsed = match context
            .get_metadata(START_KEY)
            .and_then(|s| s.parse::<u64>().ok())
        {
            Some(start) => Duration::from_nanos(now_nanos().saturating_sub(start)),
            None => context.start_time.elapsed(),
        };
        stats.record_duration(elapsed);
        if let ResponsePayload::Error(error) = &response.payload {
            stats.count_error(&error.code.to_string());
            context.set_metadata(ERROR_COUNTED_KEY.into(), "1".into());
        }
        Ok(())
    }

    async fn on_error(&self, error: &pmcp::Error, context: &MiddlewareContext) -> pmcp::Result<()> {
        if context.get_metadata(ERROR_COUNTED_KEY).is_some() {
            return Ok(());
        }
        context.set_metadata(ERROR_COUNTED_KEY.into(), "1".into());
        let requests = &self.inner.shared.requests;
        let label = self
            .label_from_context(context)
            .unwrap_or_else(|| UNKNOWN_METHOD.to_owned());
        let stats = requests.stats(&label);
        // A request rejected before this middleware ran was not counted yet.
        if context.get_metadata(START_KEY).is_none() {
            stats.count_request();
            context.set_metadata(START_KEY.into(), now_nanos().to_string());
        }
        let code = error
            .error_code()
            .map_or_else(|| INTERNAL_ERROR_CODE.to_owned(), |c| c.0.to_string());
        stats.count_error(&code);
        Ok(())
    }
}
