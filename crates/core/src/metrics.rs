//! The metrics registry every component is handed explicitly.
//!
//! Built on the `metrics` crate's [`Recorder`] API with the Prometheus recorder from
//! `metrics-exporter-prometheus`, used directly rather than installed as the global recorder, so two
//! registries (two ztunnels in one test, say) never mix. Names are passed in full, counters with
//! their `_total` suffix, exactly as Istio dashboards expect them.

use std::fmt;
use std::sync::{Arc, Mutex};

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Label, Metadata, Recorder, SharedString};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

/// Buckets for latencies in seconds: 0.5 ms to 30 s.
const SECONDS_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// Envoy's default buckets, which Istio's request histograms (`istio_request_duration_milliseconds`
/// in milliseconds, `istio_request_bytes` and `istio_response_bytes` in bytes) use: dashboards
/// and alerts written for Istio expect these `le` values.
const ISTIO_REQUEST_BUCKETS: &[f64] = &[
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];
/// Buckets for sizes in bytes: 64 B to 64 MiB.
const BYTES_BUCKETS: &[f64] = &[
    64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0, 16777216.0,
    67108864.0,
];

/// A set of labels for one metric series. Components define typed structs and implement this
/// once, so label names cannot drift between call sites.
pub trait LabelSet {
    /// The labels in exposition order.
    fn to_labels(&self) -> Vec<Label>;
}

impl LabelSet for () {
    fn to_labels(&self) -> Vec<Label> {
        Vec::new()
    }
}

impl LabelSet for [(&'static str, String)] {
    fn to_labels(&self) -> Vec<Label> {
        self.iter()
            .map(|(k, v)| Label::new(*k, v.clone()))
            .collect()
    }
}

impl<const N: usize> LabelSet for [(&'static str, String); N] {
    fn to_labels(&self) -> Vec<Label> {
        self.as_slice().to_labels()
    }
}

impl LabelSet for Vec<(&'static str, String)> {
    fn to_labels(&self) -> Vec<Label> {
        self.as_slice().to_labels()
    }
}

/// Istio renders a missing label value as `unknown`.
pub fn label_value(value: &str) -> String {
    if value.is_empty() {
        "unknown".to_string()
    } else {
        value.to_string()
    }
}

/// Appends series computed at render time (process metrics, say) to the exposition text.
type Collector = Arc<dyn Fn(&mut String) + Send + Sync>;

/// A Prometheus registry. Cheap to clone; clones share the series.
#[derive(Clone)]
pub struct Registry {
    recorder: Arc<PrometheusRecorder>,
    handle: PrometheusHandle,
    collectors: Arc<Mutex<Vec<Collector>>>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry").finish_non_exhaustive()
    }
}

impl Default for Registry {
    fn default() -> Self {
        Self::new()
    }
}

fn metadata() -> Metadata<'static> {
    Metadata::new(module_path!(), metrics::Level::INFO, Some(module_path!()))
}

impl Registry {
    /// An empty registry. Histograms whose names end in `_seconds` or `_bytes` get buckets and
    /// render as Prometheus histograms; Istio's request histograms get Envoy's buckets (a full
    /// name matcher takes precedence over a suffix).
    pub fn new() -> Self {
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
            .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_bytes".into()), BYTES_BUCKETS))
            .and_then(|b| {
                [
                    "istio_request_duration_milliseconds",
                    "istio_request_bytes",
                    "istio_response_bytes",
                ]
                .into_iter()
                .try_fold(b, |b, name| {
                    b.set_buckets_for_metric(Matcher::Full(name.into()), ISTIO_REQUEST_BUCKETS)
                })
            })
            .expect("bucket lists are non-empty constants");
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        Registry {
            recorder: Arc::new(recorder),
            handle,
            collectors: Arc::default(),
        }
    }

    /// Adds series written straight in the text format at each render, for values the
    /// recorder's types cannot hold (a counter of fractional seconds, say). The collector
    /// writes complete `# HELP`/`# TYPE`/sample lines.
    pub fn add_collector(&self, collector: impl Fn(&mut String) + Send + Sync + 'static) {
        self.collectors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Arc::new(collector));
    }

    /// Adds `# HELP` text for a counter.
    pub fn describe_counter(&self, name: &'static str, help: &'static str) {
        self.recorder.describe_counter(
            KeyName::from_const_str(name),
            None,
            SharedString::const_str(help),
        );
    }

    /// Adds `# HELP` text for a gauge.
    pub fn describe_gauge(&self, name: &'static str, help: &'static str) {
        self.recorder.describe_gauge(
            KeyName::from_const_str(name),
            None,
            SharedString::const_str(help),
        );
    }

    /// Adds `# HELP` text for a histogram.
    pub fn describe_histogram(&self, name: &'static str, help: &'static str) {
        self.recorder.describe_histogram(
            KeyName::from_const_str(name),
            None,
            SharedString::const_str(help),
        );
    }

    fn key(name: &'static str, labels: &(impl LabelSet + ?Sized)) -> Key {
        Key::from_parts(name, labels.to_labels())
    }

    /// The counter series `name{labels}`; the same series on every call with equal labels.
    pub fn counter(&self, name: &'static str, labels: &(impl LabelSet + ?Sized)) -> Counter {
        self.recorder
            .register_counter(&Self::key(name, labels), &metadata())
    }

    /// The gauge series `name{labels}`.
    pub fn gauge(&self, name: &'static str, labels: &(impl LabelSet + ?Sized)) -> Gauge {
        self.recorder
            .register_gauge(&Self::key(name, labels), &metadata())
    }

    /// The histogram series `name{labels}`.
    pub fn histogram(&self, name: &'static str, labels: &(impl LabelSet + ?Sized)) -> Histogram {
        self.recorder
            .register_histogram(&Self::key(name, labels), &metadata())
    }

    /// The Prometheus text exposition of every series.
    pub fn render(&self) -> String {
        self.handle.run_upkeep();
        let mut text = self.handle.render();
        let collectors = self
            .collectors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for collector in collectors {
            if !text.is_empty() && !text.ends_with('\n') {
                text.push('\n');
            }
            collector(&mut text);
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct TcpLabels {
        reporter: &'static str,
        source_workload: String,
        destination_workload: String,
    }

    impl LabelSet for TcpLabels {
        fn to_labels(&self) -> Vec<Label> {
            vec![
                Label::new("reporter", self.reporter),
                Label::new("source_workload", label_value(&self.source_workload)),
                Label::new(
                    "destination_workload",
                    label_value(&self.destination_workload),
                ),
            ]
        }
    }

    #[test]
    fn counters_render_with_exact_name_and_labels() {
        let registry = Registry::new();
        registry.describe_counter(
            "istio_tcp_connections_opened_total",
            "TCP connections opened",
        );
        let labels = TcpLabels {
            reporter: "source",
            source_workload: "client".into(),
            destination_workload: String::new(),
        };
        registry
            .counter("istio_tcp_connections_opened_total", &labels)
            .increment(2);
        registry
            .counter("istio_tcp_connections_opened_total", &labels)
            .increment(1);
        let text = registry.render();
        assert!(
            text.contains("# HELP istio_tcp_connections_opened_total TCP connections opened"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE istio_tcp_connections_opened_total counter"),
            "{text}"
        );
        assert!(
            text.contains(
                "istio_tcp_connections_opened_total{reporter=\"source\",source_workload=\"client\",destination_workload=\"unknown\"} 3"
            ),
            "{text}"
        );
    }

    #[test]
    fn registries_are_independent() {
        let a = Registry::new();
        let b = Registry::new();
        a.counter("only_in_a_total", &()).increment(1);
        assert!(a.render().contains("only_in_a_total 1"));
        assert!(!b.render().contains("only_in_a_total"));
    }

    #[test]
    fn gauges_go_up_and_down() {
        let r = Registry::new();
        let g = r.gauge(
            "workload_manager_active_proxy_count",
            &[("node", "n1".to_string())],
        );
        g.increment(3.0);
        g.decrement(1.0);
        assert!(
            r.render()
                .contains("workload_manager_active_proxy_count{node=\"n1\"} 2"),
            "{}",
            r.render()
        );
    }

    #[test]
    fn seconds_histograms_have_buckets() {
        let r = Registry::new();
        r.histogram("xds_push_duration_seconds", &()).record(0.003);
        let text = r.render();
        assert!(
            text.contains("# TYPE xds_push_duration_seconds histogram"),
            "{text}"
        );
        assert!(
            text.contains("xds_push_duration_seconds_bucket{le=\"0.005\"} 1"),
            "{text}"
        );
        assert!(text.contains("xds_push_duration_seconds_count 1"), "{text}");
    }
}
