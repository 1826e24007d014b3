//! Per-method request counts, error counts and durations.
//!
//! Durations go into a `prometheus::Histogram` (this module is built only
//! with the `prometheus` feature), with the buckets of the crate's own
//! [`DurationHistogram`](crate::metrics::DurationHistogram).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::{Mutex, RwLock};

use prometheus::core::Metric;
use prometheus::{Histogram, HistogramOpts};

use crate::metrics::{BUCKET_BOUNDS_SECONDS, HistogramSnapshot};

/// The `method` label of requests whose method is not given its own label.
pub const OTHER_METHOD: &str = "other";

/// The `code` label of error codes beyond a method's cap.
const OTHER_CODE: &str = "other";

/// Distinct error codes kept per method before folding into `other`.
const MAX_CODES_PER_METHOD: usize = 16;

/// Longest method name given its own label.
const MAX_METHOD_LEN: usize = 64;

/// Methods of the MCP specification: always labelled, never counted
/// against the cap, so a peer sending junk methods first cannot push them
/// into `other`.
const KNOWN_METHODS: &[&str] = &[
    "initialize",
    "ping",
    "tools/list",
    "tools/call",
    "resources/list",
    "resources/read",
    "resources/templates/list",
    "resources/subscribe",
    "resources/unsubscribe",
    "prompts/list",
    "prompts/get",
    "logging/setLevel",
    "completion/complete",
    "sampling/createMessage",
    "roots/list",
    "elicitation/create",
    "tasks/get",
    "tasks/list",
    "tasks/result",
    "tasks/cancel",
];

pub(crate) struct MethodStats {
    requests: AtomicU64,
    errors: Mutex<BTreeMap<String, u64>>,
    duration: Histogram,
}

impl Default for MethodStats {
    fn default() -> Self {
        let opts = HistogramOpts::new("mcp_request_duration_seconds", "request duration")
            .buckets(BUCKET_BOUNDS_SECONDS.to_vec());
        MethodStats {
            requests: AtomicU64::new(0),
            errors: Mutex::new(BTreeMap::new()),
            // Refused only for a bad name or unsorted buckets: both are constants here.
            duration: Histogram::with_opts(opts).expect("constant, valid histogram options"),
        }
    }
}

/// The counts of `histogram` in the shape the collector and the JSON
/// snapshot read.
fn snapshot_of(histogram: &Histogram) -> HistogramSnapshot {
    let metric = histogram.metric();
    let h = metric.get_histogram();
    HistogramSnapshot {
        buckets: h
            .get_bucket()
            .iter()
            .map(|b| (b.upper_bound(), b.cumulative_count()))
            .collect(),
        count: h.get_sample_count(),
        sum_seconds: h.get_sample_sum(),
    }
}

impl MethodStats {
    pub(crate) fn count_request(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_error(&self, code: &str) {
        let mut errors = self.errors.lock();
        let code = if errors.contains_key(code) || errors.len() < MAX_CODES_PER_METHOD {
            code
        } else {
            OTHER_CODE
        };
        *errors.entry(code.to_owned()).or_default() += 1;
    }

    pub(crate) fn record_duration(&self, duration: Duration) {
        self.duration.observe(duration.as_secs_f64());
    }
}

/// What the metrics know about one method label.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct MethodSnapshot {
    pub(crate) method: String,
    pub(crate) requests: u64,
    pub(crate) errors: BTreeMap<String, u64>,
    pub(crate) duration: HistogramSnapshot,
}

/// All methods' statistics, with a bounded set of method labels.
pub(crate) struct RequestStats {
    methods: RwLock<HashMap<String, Arc<MethodStats>>>,
    max_custom_methods: usize,
    custom_methods: AtomicU64,
}

impl RequestStats {
    pub(crate) fn new(max_custom_methods: usize) -> Self {
        RequestStats {
            methods: RwLock::new(HashMap::new()),
            max_custom_methods,
            custom_methods: AtomicU64::new(0),
        }
    }

    /// The label `method` is counted under.
    pub(crate) fn label_of(&self, method: &str) -> String {
        if KNOWN_METHODS.contains(&method) || self.methods.read().contains_key(method) {
            return method.to_owned();
        }
        let acceptable = method.len() <= MAX_METHOD_LEN
            && !method.is_empty()
            && method
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"/_-.$:".contains(&b));
        if !acceptable {
            return OTHER_METHOD.to_owned();
        }
        let mut methods = self.methods.write();
        if methods.contains_key(method) {
            return method.to_owned();
        }
        if self.custom_methods.load(Ordering::Relaxed) >= self.max_custom_methods as u64 {
            return OTHER_METHOD.to_owned();
        }
        self.custom_methods.fetch_add(1, Ordering::Relaxed);
        methods.insert(method.to_owned(), Arc::default());
        method.to_owned()
    }

    /// The statistics of a label returned by [`label_of`](Self::label_of).
    pub(crate) fn stats(&self, label: &str) -> Arc<MethodStats> {
        if let Some(stats) = self.methods.read().get(label) {
            return stats.clone();
        }
        self.methods
            .write()
            .entry(label.to_owned())
            .or_default()
            .clone()
    }

    pub(crate) fn get(&self, method: &str) -> Option<Arc<MethodStats>> {
        self.methods.read().get(method).cloned()
    }

    pub(crate) fn request_count(&self, method: &str) -> u64 {
        self.get(method)
            .map_or(0, |s| s.requests.load(Ordering::Relaxed))
    }

    pub(crate) fn error_count(&self, method: &str) -> u64 {
        self.get(method)
            .map_or(0, |s| s.errors.lock().values().sum())
    }

    pub(crate) fn duration(&self, method: &str) -> Option<HistogramSnapshot> {
        self.get(method).map(|s| snapshot_of(&s.duration))
    }

    /// Every method label, sorted.
    pub(crate) fn snapshot(&self) -> Vec<MethodSnapshot> {
        let mut out: Vec<MethodSnapshot> = self
            .methods
            .read()
            .iter()
            .map(|(method, stats)| MethodSnapshot {
                method: method.clone(),
                requests: stats.requests.load(Ordering::Relaxed),
                errors: stats.errors.lock().clone(),
                duration: snapshot_of(&stats.duration),
            })
            .collect();
        out.sort_by(|a, b| a.method.cmp(&b.method));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_methods_are_labelled_even_after_the_cap_is_reached() {
        let stats = RequestStats::new(2);
        assert_eq!(stats.label_of("x/one"), "x/one");
        assert_eq!(stats.label_of("x/two"), "x/two");
        assert_eq!(stats.label_of("x/three"), OTHER_METHOD);
        assert_eq!(stats.label_of("x/one"), "x/one");
        assert_eq!(stats.label_of("tools/call"), "tools/call");
    }

    #[test]
    fn odd_or_long_methods_fold_into_other() {
        let stats = RequestStats::new(100);
        assert_eq!(stats.label_of("bad\"method"), OTHER_METHOD);
        assert_eq!(stats.label_of(""), OTHER_METHOD);
        assert_eq!(stats.label_of(&"m".repeat(65)), OTHER_METHOD);
    }

    #[test]
    fn ten_thousand_random_methods_stay_bounded() {
        let stats = RequestStats::new(8);
        for i in 0..10_000 {
            let label = stats.label_of(&format!("junk/{i}"));
            stats.stats(&label).count_request();
        }
        let snapshot = stats.snapshot();
        assert_eq!(snapshot.len(), 9);
        assert_eq!(stats.request_count(OTHER_METHOD), 10_000 - 8);
    }

    #[test]
    fn error_codes_per_method_are_capped() {
        let stats = RequestStats::new(8);
        let s = stats.stats("tools/call");
        for code in 0..100 {
            s.count_error(&code.to_string());
        }
        let snapshot = stats.snapshot();
        assert_eq!(snapshot[0].errors.len(), MAX_CODES_PER_METHOD + 1);
        assert_eq!(snapshot[0].errors.get(OTHER_CODE), Some(&84));
        assert_eq!(stats.error_count("tools/call"), 100);
    }
}
