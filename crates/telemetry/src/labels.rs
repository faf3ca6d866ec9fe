//! The Istio label set of the traffic metrics, built once per connection from plain values.

use std::fmt;

use ambit_core::metrics::{LabelSet, label_value};
use metrics::Label;

use crate::flags::ResponseFlags;

/// Which proxy reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reporter {
    /// The client's ztunnel (outbound).
    Source,
    /// The server's ztunnel (inbound).
    Destination,
    /// A waypoint between them.
    Waypoint,
}

impl Reporter {
    /// The `reporter` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Reporter::Source => "source",
            Reporter::Destination => "destination",
            Reporter::Waypoint => "waypoint",
        }
    }

    /// The access log's `direction`.
    pub(crate) fn direction(self) -> &'static str {
        match self {
            Reporter::Source => "outbound",
            Reporter::Destination => "inbound",
            Reporter::Waypoint => "waypoint",
        }
    }
}

impl fmt::Display for Reporter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the metrics say about one end of the traffic. Empty strings are rendered `unknown`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WorkloadLabels {
    /// The workload instance (pod) name; not a label: the access log shows `namespace/name`.
    pub name: String,
    /// `*_workload`: the owning workload (Deployment) name.
    pub workload: String,
    /// `*_workload_namespace`.
    pub namespace: String,
    /// `*_canonical_service`, also `*_app`.
    pub canonical_service: String,
    /// `*_canonical_revision`, also `*_version`.
    pub canonical_revision: String,
    /// `*_principal`: the SPIFFE URI. Fill it only from a proven identity (mTLS).
    pub principal: String,
    /// `*_cluster`.
    pub cluster: String,
    /// `*_region`.
    pub region: String,
    /// `*_zone`.
    pub zone: String,
}

impl WorkloadLabels {
    /// `namespace/name` for the access log, `-` when unknown (written into the line as it is
    /// formatted: no string of its own per connection).
    fn log_name(&self) -> LogName<'_> {
        LogName(self)
    }
}

/// A workload as the access log names it: `namespace/name`, `-` when unknown.
pub(crate) struct LogName<'a>(&'a WorkloadLabels);

impl fmt::Display for LogName<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let w = self.0;
        if w.name.is_empty() {
            f.write_str("-")
        } else {
            write!(f, "{}/{}", w.namespace, w.name)
        }
    }
}

/// The service the client addressed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceLabels {
    /// `destination_service`: the hostname (`echo.demo.svc.cluster.local`).
    pub hostname: String,
    /// `destination_service_namespace`.
    pub namespace: String,
    /// `destination_service_name`.
    pub name: String,
}

/// The full Istio label set of one connection's traffic (every label always present), built
/// once; each series adds only its protocol, response and flags labels.
#[derive(Clone, Debug)]
pub struct TrafficLabels {
    reporter: Reporter,
    source: WorkloadLabels,
    destination: WorkloadLabels,
    service: ServiceLabels,
    mtls: bool,
    /// `reporter` .. `destination_cluster`.
    head: Vec<Label>,
    /// `connection_security_policy` and the localities.
    tail: Vec<Label>,
    /// The request series already looked up for these labels (a lookup clones and hashes the
    /// whole label set; a waypoint records four series per request).
    series: SeriesCache,
    /// The TCP series already looked up for these labels (five per connection otherwise).
    tcp_series: TcpSeriesCache,
}

/// The series a connection with these labels records while open: opened, bytes and the open
/// sockets gauge.
#[derive(Debug)]
pub(crate) struct TcpOpenSeries {
    pub(crate) opened: metrics::Counter,
    pub(crate) received: metrics::Counter,
    pub(crate) sent: metrics::Counter,
    pub(crate) sockets_open: metrics::Gauge,
}

/// What a connection records when it ends with some flags: closed, and failed if it did (a
/// failed series is only registered once a connection failed, so it is never shown at zero).
#[derive(Clone, Debug)]
pub(crate) struct TcpEndSeries {
    pub(crate) closed: metrics::Counter,
    pub(crate) failed: Option<metrics::Counter>,
}

/// The TCP series of one label set, shared by its clones.
#[derive(Clone, Default)]
struct TcpSeriesCache(std::sync::Arc<TcpSeriesCacheInner>);

#[derive(Default)]
struct TcpSeriesCacheInner {
    open: std::sync::OnceLock<std::sync::Arc<TcpOpenSeries>>,
    ended: std::sync::Mutex<Vec<((ResponseFlags, bool), TcpEndSeries)>>,
}

impl fmt::Debug for TcpSeriesCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TcpSeriesCache")
    }
}

/// The four request series of one label set and outcome.
#[derive(Debug)]
pub(crate) struct HttpSeries {
    pub(crate) requests: metrics::Counter,
    pub(crate) duration: metrics::Histogram,
    pub(crate) request_bytes: metrics::Histogram,
    pub(crate) response_bytes: metrics::Histogram,
}

type SeriesKey = (&'static str, u16, Option<i32>, ResponseFlags);

/// Handles by outcome; shared by clones of the same labels.
#[derive(Clone, Default)]
struct SeriesCache(
    std::sync::Arc<
        std::sync::Mutex<std::collections::HashMap<SeriesKey, std::sync::Arc<HttpSeries>>>,
    >,
);

impl fmt::Debug for SeriesCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SeriesCache")
    }
}

/// Outcomes kept per label set; beyond this (a pathological spread of codes) lookups go to the
/// registry every time.
const MAX_CACHED_SERIES: usize = 64;

impl TrafficLabels {
    /// The labels for traffic reported by `reporter` from `source` to `destination` (the
    /// workload, or the waypoint carrying it) for `service`, over mutual TLS or not.
    pub fn new(
        reporter: Reporter,
        source: WorkloadLabels,
        destination: WorkloadLabels,
        service: ServiceLabels,
        mtls: bool,
    ) -> Self {
        let mut head = Vec::with_capacity(20);
        head.push(Label::new("reporter", reporter.as_str()));
        push_workload(&mut head, "source", &source);
        head.push(Label::new(
            "destination_service",
            label_value(&service.hostname),
        ));
        head.push(Label::new(
            "destination_service_namespace",
            label_value(&service.namespace),
        ));
        head.push(Label::new(
            "destination_service_name",
            label_value(&service.name),
        ));
        push_workload(&mut head, "destination", &destination);
        let tail = vec![
            Label::new(
                "connection_security_policy",
                if mtls { "mutual_tls" } else { "unknown" },
            ),
            Label::new("source_region", label_value(&source.region)),
            Label::new("source_zone", label_value(&source.zone)),
            Label::new("destination_region", label_value(&destination.region)),
            Label::new("destination_zone", label_value(&destination.zone)),
        ];
        TrafficLabels {
            reporter,
            source,
            destination,
            service,
            mtls,
            head,
            tail,
            series: SeriesCache::default(),
            tcp_series: TcpSeriesCache::default(),
        }
    }

    /// The request series for an outcome, looked up in the registry once per label set.
    pub(crate) fn http_series(
        &self,
        registry: &ambit_core::metrics::Registry,
        protocol: &'static str,
        code: u16,
        grpc_status: Option<i32>,
        flags: ResponseFlags,
    ) -> std::sync::Arc<HttpSeries> {
        let key = (protocol, code, grpc_status, flags);
        let mut cache = self.series.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(series) = cache.get(&key) {
            return series.clone();
        }
        let labels = self.http(protocol, code, grpc_status, flags);
        let series = std::sync::Arc::new(HttpSeries {
            requests: registry.counter("istio_requests_total", &labels),
            duration: registry.histogram("istio_request_duration_milliseconds", &labels),
            request_bytes: registry.histogram("istio_request_bytes", &labels),
            response_bytes: registry.histogram("istio_response_bytes", &labels),
        });
        if cache.len() < MAX_CACHED_SERIES {
            cache.insert(key, series.clone());
        }
        series
    }

    /// The series of an open connection, looked up in `registry` once per label set (the first
    /// registry asked: a label set records into one registry).
    pub(crate) fn tcp_open_series(
        &self,
        registry: &ambit_core::metrics::Registry,
    ) -> std::sync::Arc<TcpOpenSeries> {
        self.tcp_series
            .0
            .open
            .get_or_init(|| {
                let ok = self.tcp(ResponseFlags::NONE);
                std::sync::Arc::new(TcpOpenSeries {
                    opened: registry.counter("istio_tcp_connections_opened_total", &ok),
                    received: registry.counter("istio_tcp_received_bytes_total", &ok),
                    sent: registry.counter("istio_tcp_sent_bytes_total", &ok),
                    sockets_open: registry.gauge(
                        "istio_tcp_sockets_open",
                        &[("reporter", self.reporter.as_str().to_string())],
                    ),
                })
            })
            .clone()
    }

    /// The closed series for a connection ending with `flags`, and the failed one if it
    /// `failed`; looked up once per label set and outcome.
    pub(crate) fn tcp_end_series(
        &self,
        registry: &ambit_core::metrics::Registry,
        flags: ResponseFlags,
        failed: bool,
    ) -> TcpEndSeries {
        let mut ended = self
            .tcp_series
            .0
            .ended
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let key = (flags, failed);
        if let Some((_, series)) = ended.iter().find(|(k, _)| *k == key) {
            return series.clone();
        }
        let labels = self.tcp(flags);
        let series = TcpEndSeries {
            closed: registry.counter("istio_tcp_connections_closed_total", &labels),
            failed: failed.then(|| registry.counter("istio_tcp_connections_failed_total", &labels)),
        };
        if ended.len() < MAX_CACHED_SERIES {
            ended.push((key, series.clone()));
        }
        series
    }

    /// Who reports.
    pub fn reporter(&self) -> Reporter {
        self.reporter
    }

    /// The source end.
    pub fn source(&self) -> &WorkloadLabels {
        &self.source
    }

    /// The destination end.
    pub fn destination(&self) -> &WorkloadLabels {
        &self.destination
    }

    /// The service addressed.
    pub fn service(&self) -> &ServiceLabels {
        &self.service
    }

    /// Carried over mutual TLS.
    pub fn mtls(&self) -> bool {
        self.mtls
    }

    pub(crate) fn direction(&self) -> &'static str {
        self.reporter.direction()
    }

    /// The series labels of a TCP metric.
    pub(crate) fn tcp(&self, flags: ResponseFlags) -> Labels {
        self.series(&[
            Label::new("request_protocol", "tcp"),
            Label::new("response_flags", flags.as_label()),
        ])
    }

    /// The series labels of a request metric.
    pub(crate) fn http(
        &self,
        protocol: &'static str,
        code: u16,
        grpc_status: Option<i32>,
        flags: ResponseFlags,
    ) -> Labels {
        self.series(&[
            Label::new("request_protocol", protocol),
            Label::new("response_code", code.to_string()),
            Label::new(
                "grpc_response_status",
                grpc_status.map_or_else(|| "unknown".to_string(), |s| s.to_string()),
            ),
            Label::new("response_flags", flags.as_label()),
        ])
    }

    fn series(&self, middle: &[Label]) -> Labels {
        let mut all = Vec::with_capacity(self.head.len() + middle.len() + self.tail.len());
        all.extend_from_slice(&self.head);
        all.extend_from_slice(middle);
        all.extend_from_slice(&self.tail);
        Labels(all)
    }

    pub(crate) fn source_log_name(&self) -> LogName<'_> {
        self.source.log_name()
    }

    pub(crate) fn destination_log_name(&self) -> LogName<'_> {
        self.destination.log_name()
    }
}

fn push_workload(out: &mut Vec<Label>, prefix: &str, w: &WorkloadLabels) {
    let values = [
        ("workload", &w.workload),
        ("canonical_service", &w.canonical_service),
        ("canonical_revision", &w.canonical_revision),
        ("workload_namespace", &w.namespace),
        ("principal", &w.principal),
        ("app", &w.canonical_service),
        ("version", &w.canonical_revision),
        ("cluster", &w.cluster),
    ];
    for (name, value) in values {
        out.push(Label::new(format!("{prefix}_{name}"), label_value(value)));
    }
}

/// One series' labels, in exposition order.
#[derive(Debug)]
pub(crate) struct Labels(Vec<Label>);

impl LabelSet for Labels {
    fn to_labels(&self) -> Vec<Label> {
        self.0.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_label_is_present_in_istio_order_and_missing_values_are_unknown() {
        let labels = TrafficLabels::new(
            Reporter::Source,
            WorkloadLabels {
                workload: "client".into(),
                namespace: "demo".into(),
                ..Default::default()
            },
            WorkloadLabels::default(),
            ServiceLabels::default(),
            false,
        );
        let rendered: Vec<String> = labels
            .tcp(ResponseFlags::NONE)
            .to_labels()
            .iter()
            .map(|l| format!("{}={}", l.key(), l.value()))
            .collect();
        assert_eq!(
            rendered,
            [
                "reporter=source",
                "source_workload=client",
                "source_canonical_service=unknown",
                "source_canonical_revision=unknown",
                "source_workload_namespace=demo",
                "source_principal=unknown",
                "source_app=unknown",
                "source_version=unknown",
                "source_cluster=unknown",
                "destination_service=unknown",
                "destination_service_namespace=unknown",
                "destination_service_name=unknown",
                "destination_workload=unknown",
                "destination_canonical_service=unknown",
                "destination_canonical_revision=unknown",
                "destination_workload_namespace=unknown",
                "destination_principal=unknown",
                "destination_app=unknown",
                "destination_version=unknown",
                "destination_cluster=unknown",
                "request_protocol=tcp",
                "response_flags=-",
                "connection_security_policy=unknown",
                "source_region=unknown",
                "source_zone=unknown",
                "destination_region=unknown",
                "destination_zone=unknown",
            ]
        );
    }
}
