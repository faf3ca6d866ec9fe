//! Distributed tracing: one server span per request and one client span per upstream try,
//! exported in batches over OTLP/HTTP (protobuf) to a collector.
//!
//! - **Context**: a W3C `traceparent` from the client is continued (same trace id, the client's
//!   span as parent, its sampled flag decides); without one a trace starts here and is sampled
//!   with the configured probability (`TRACE_SAMPLING`, percent, default 1 like Istio's
//!   `tracing.sampling`; 0 samples no new trace). The `traceparent` sent to the backend names the
//!   waypoint's client span, so the backend's spans are its children.
//! - **Spans** carry the attributes Istio's proxies put on theirs (`component: proxy`,
//!   `node_id`, `guid:x-request-id`, `http.url`, `http.method`, `http.protocol`,
//!   `http.status_code`, `response_flags`, `upstream_cluster`, `istio.canonical_service`,
//!   `istio.namespace`, `istio.mesh_id`, ...); the resource's `service.name` is
//!   `<canonical service>.<namespace>` as Istio names a proxy's traces.
//! - **Export never blocks a request**: finished spans go into a bounded queue; a full queue
//!   drops the span and counts it (`ambit_waypoint_spans_dropped_total{reason="queue_full"}`).
//!   The exporter sends a batch when it has [`MAX_BATCH`] spans or every [`FLUSH_EVERY`]; a batch
//!   the collector refuses or does not take in time is dropped and counted
//!   (`reason="export_failed"`). Queuing a span wakes the exporter only when it completes a
//!   batch: waking it per span woke the exporter's thread once or twice per request at 100%
//!   sampling (docs/benchmarks.md).
//!
//! The OTLP messages are written here with prost, field for field as the OpenTelemetry protocol
//! defines them (`opentelemetry/proto/collector/trace/v1`, `trace/v1`, `common/v1`,
//! `resource/v1`).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ambit_core::metrics::Registry;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use prost::Message;
use rand::Rng;
use thiserror::Error;
use tokio::sync::Notify;

/// Spans per export request at most.
pub const MAX_BATCH: usize = 512;
/// Finished spans waiting for export at most (beyond: dropped and counted).
pub const MAX_QUEUE: usize = 4096;
/// How long a finished span waits for its batch at most.
pub const FLUSH_EVERY: Duration = Duration::from_secs(1);
/// How long one export request may take.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// The OTLP messages the exporter sends.
pub mod otlp {
    #![allow(missing_docs)]

    /// `ExportTraceServiceRequest`.
    #[derive(Clone, PartialEq, ::prost::Message)]
    pub struct ExportTraceServiceRequest {
        #[prost(message, repeated, tag = "1")]
        pub resource_spans: Vec<ResourceSpans>,
    }

    /// `ResourceSpans`.
    #[derive(Clone, PartialEq, ::prost::Message)]
    pub struct ResourceSpans {
        #[prost(message, optional, tag = "1")]
        pub resource: Option<Resource>,
        #[prost(message, repeated, tag = "2")]
        pub scope_spans: Vec<ScopeSpans>,
        #[prost(string, tag = "3")]
        pub schema_url: String,
    }

    /// `Resource`.
    #[derive(Clone, PartialEq, ::prost::Message)]
    pub struct Resource {
        #[prost(message, repeated, tag = "1")]
        pub attributes: Vec<KeyValue>,
        #[prost(uint32, tag = "2")]
        pub dropped_attributes_count: u32,
    }

    /// `ScopeSpans`.
    #[derive(Clone, PartialEq, ::prost::Message)]
    pub struct ScopeSpans {
        #[prost(message, optional, tag = "1")]
        pub scope: Option<InstrumentationScope>,
        #[prost(message, repeated, tag = "2")]
        pub spans: Vec<Span>,
        #[prost(string, tag = "3")]
        pub schema_url: String,
    }

    /// `InstrumentationScope`.
    #[derive(Clone, PartialEq, ::prost::Message)]
    pub struct InstrumentationScope {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(string, tag = "2")]
        pub version: String,
    }

    /// `Span`.
    #[derive(Clone, PartialEq, ::prost::Message)]
    pub struct Span {
        #[prost(bytes = "vec", tag = "1")]
        pub trace_id: Vec<u8>,
        #[prost(bytes = "vec", tag = "2")]
        pub span_id: Vec<u8>,
        #[prost(string, tag = "3")]
        pub trace_state: String,
        #[prost(bytes = "vec", tag = "4")]
        pub parent_span_id: Vec<u8>,
        #[prost(string, tag = "5")]
        pub name: String,
        #[prost(enumeration = "SpanKind", tag = "6")]
        pub kind: i32,
        #[prost(fixed64, tag = "7")]
        pub start_time_unix_nano: u64,
        #[prost(fixed64, tag = "8")]
        pub end_time_unix_nano: u64,
        #[prost(message, repeated, tag = "9")]
        pub attributes: Vec<KeyValue>,
        #[prost(message, optional, tag = "15")]
        pub status: Option<Status>,
        #[prost(fixed32, tag = "16")]
        pub flags: u32,
    }

    /// `Span.SpanKind`.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, ::prost::Enumeration)]
    #[repr(i32)]
    pub enum SpanKind {
        Unspecified = 0,
        Internal = 1,
        Server = 2,
        Client = 3,
    }

    /// `Status`.
    #[derive(Clone, PartialEq, ::prost::Message)]
    pub struct Status {
        #[prost(string, tag = "2")]
        pub message: String,
        #[prost(enumeration = "StatusCode", tag = "3")]
        pub code: i32,
    }

    /// `Status.StatusCode`.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, ::prost::Enumeration)]
    #[repr(i32)]
    pub enum StatusCode {
        Unset = 0,
        Ok = 1,
        Error = 2,
    }

    /// `KeyValue`.
    #[derive(Clone, PartialEq, ::prost::Message)]
    pub struct KeyValue {
        #[prost(string, tag = "1")]
        pub key: String,
        #[prost(message, optional, tag = "2")]
        pub value: Option<AnyValue>,
    }

    /// `AnyValue`.
    #[derive(Clone, PartialEq, ::prost::Message)]
    pub struct AnyValue {
        #[prost(oneof = "any_value::Value", tags = "1, 2, 3, 4")]
        pub value: Option<any_value::Value>,
    }

    /// `AnyValue.value`.
    pub mod any_value {
        /// One value.
        #[derive(Clone, PartialEq, ::prost::Oneof)]
        pub enum Value {
            #[prost(string, tag = "1")]
            StringValue(String),
            #[prost(bool, tag = "2")]
            BoolValue(bool),
            #[prost(int64, tag = "3")]
            IntValue(i64),
            #[prost(double, tag = "4")]
            DoubleValue(f64),
        }
    }
}

/// An attribute value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// A string.
    Str(String),
    /// An integer.
    Int(i64),
    /// A boolean.
    Bool(bool),
}

impl From<&str> for Value {
    fn from(s: &str) -> Self {
        Value::Str(s.to_string())
    }
}

impl From<String> for Value {
    fn from(s: String) -> Self {
        Value::Str(s)
    }
}

fn key_value(key: &str, value: Value) -> otlp::KeyValue {
    use otlp::any_value::Value as V;
    otlp::KeyValue {
        key: key.to_string(),
        value: Some(otlp::AnyValue {
            value: Some(match value {
                Value::Str(s) => V::StringValue(s),
                Value::Int(i) => V::IntValue(i),
                Value::Bool(b) => V::BoolValue(b),
            }),
        }),
    }
}

/// Why tracing could not be set up.
#[derive(Debug, Error)]
pub enum TracingError {
    /// The collector endpoint is not an `http://host:port[/path]` URL.
    #[error("OTLP endpoint {endpoint:?} ({variable}): {reason}")]
    Endpoint {
        /// The variable it came from.
        variable: String,
        /// Its value.
        endpoint: String,
        /// What is wrong.
        reason: String,
    },
}

/// Where spans go and which requests make them.
#[derive(Debug, Clone, PartialEq)]
pub struct TracingSettings {
    /// The collector's OTLP/HTTP traces URL (`http://collector:4318/v1/traces`); `None`: off.
    pub endpoint: Option<Uri>,
    /// Percent of new traces sampled (0-100).
    pub sampling: f64,
    /// The resource's `service.name`.
    pub service_name: String,
    /// Attributes every span carries (`node_id`, `istio.*`, `component`).
    pub span_attributes: Vec<(String, String)>,
}

/// Parses an OTLP/HTTP endpoint: `base` is `OTEL_EXPORTER_OTLP_ENDPOINT` (the traces path
/// `/v1/traces` is added), `traces` is `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (used as is, and
/// preferred). Only `http://` is supported (a collector in the cluster, reached in plaintext).
pub fn endpoint(base: Option<&str>, traces: Option<&str>) -> Result<Option<Uri>, TracingError> {
    let (variable, raw, add_path) = match (traces, base) {
        (Some(t), _) if !t.is_empty() => ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", t, false),
        (_, Some(b)) if !b.is_empty() => ("OTEL_EXPORTER_OTLP_ENDPOINT", b, true),
        _ => return Ok(None),
    };
    let bad = |reason: &str| TracingError::Endpoint {
        variable: variable.to_string(),
        endpoint: raw.to_string(),
        reason: reason.to_string(),
    };
    let uri: Uri = raw
        .parse()
        .map_err(|_| bad("not a URL (expected http://host:4318)"))?;
    if uri.scheme_str() != Some("http") {
        return Err(bad(
            "only http:// is supported (OTLP/HTTP to a collector, plaintext)",
        ));
    }
    let authority = uri
        .authority()
        .ok_or_else(|| bad("no host"))?
        .as_str()
        .to_string();
    let path = if add_path {
        format!("{}/v1/traces", uri.path().trim_end_matches('/'))
    } else if uri.path().is_empty() {
        "/".to_string()
    } else {
        uri.path().to_string()
    };
    Uri::builder()
        .scheme("http")
        .authority(authority)
        .path_and_query(path)
        .build()
        .map(Some)
        .map_err(|_| bad("not a URL"))
}

/// A trace context: trace id, the span it continues, and whether it is sampled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceContext {
    /// The trace id.
    pub trace_id: [u8; 16],
    /// The parent's span id (the client's, from its `traceparent`).
    pub parent: Option<[u8; 8]>,
    /// Sampled (recorded and exported).
    pub sampled: bool,
}

/// Reads a W3C `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`, lower-case hex only); invalid ones
/// (another alphabet, all-zero ids, wrong lengths, version `ff`, anything after the flags of
/// version `00`) are ignored as the spec says. A later version may add fields after the flags.
pub fn parse_traceparent(value: &str) -> Option<TraceContext> {
    let mut parts = value.trim().split('-');
    let version = parts.next().filter(|v| is_lower_hex(v, 2) && *v != "ff")?;
    let trace = parts.next().filter(|t| is_lower_hex(t, 32))?;
    let parent = parts.next().filter(|p| is_lower_hex(p, 16))?;
    let flags = parts.next().filter(|f| is_lower_hex(f, 2))?;
    if version == "00" && parts.next().is_some() {
        return None;
    }
    let trace_id = u128::from_str_radix(trace, 16)
        .ok()
        .filter(|t| *t != 0)?
        .to_be_bytes();
    let parent_id = u64::from_str_radix(parent, 16)
        .ok()
        .filter(|p| *p != 0)?
        .to_be_bytes();
    let flags = u8::from_str_radix(flags, 16).ok()?;
    Some(TraceContext {
        trace_id,
        parent: Some(parent_id),
        sampled: flags & 1 == 1,
    })
}

/// `len` lower-case hex digits (the only alphabet `traceparent` allows).
fn is_lower_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn traceparent(trace_id: &[u8; 16], span_id: &[u8; 8], sampled: bool) -> Option<HeaderValue> {
    let flags = if sampled { "01" } else { "00" };
    HeaderValue::from_str(&format!("00-{}-{}-{flags}", hex(trace_id), hex(span_id))).ok()
}

fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

fn random_span_id() -> [u8; 8] {
    rand::rng().random_range(1..=u64::MAX).to_be_bytes()
}

/// A span being recorded; exported when [`Tracer::end`] is called with it.
#[derive(Debug, Clone)]
pub struct ActiveSpan {
    trace_id: [u8; 16],
    span_id: [u8; 8],
    parent: Option<[u8; 8]>,
    trace_state: String,
    name: String,
    kind: otlp::SpanKind,
    start: u64,
    attributes: Vec<(String, Value)>,
}

impl ActiveSpan {
    /// Sets (or adds) an attribute.
    pub fn set(&mut self, key: &str, value: impl Into<Value>) {
        let value = value.into();
        match self.attributes.iter_mut().find(|(k, _)| k == key) {
            Some((_, v)) => *v = value,
            None => self.attributes.push((key.to_string(), value)),
        }
    }

    /// Sets an integer attribute.
    pub fn set_int(&mut self, key: &str, value: i64) {
        self.set(key, Value::Int(value));
    }

    /// The span's name.
    pub fn rename(&mut self, name: String) {
        self.name = name;
    }

    /// The trace id, hex.
    pub fn trace_id(&self) -> String {
        hex(&self.trace_id)
    }

    /// A client span (one upstream try) under this one; `headers` (the try's request) get a
    /// `traceparent` naming it.
    pub fn child(&self, name: String, headers: &mut HeaderMap) -> ActiveSpan {
        let span_id = random_span_id();
        if let Some(v) = traceparent(&self.trace_id, &span_id, true) {
            headers.insert("traceparent", v);
        }
        ActiveSpan {
            trace_id: self.trace_id,
            span_id,
            parent: Some(self.span_id),
            trace_state: self.trace_state.clone(),
            name,
            kind: otlp::SpanKind::Client,
            start: now_nanos(),
            attributes: Vec::new(),
        }
    }
}

/// Finished spans on their way to the exporter.
#[derive(Default)]
struct Queue {
    state: Mutex<QueueState>,
    /// Signalled when a batch is complete and when the last tracer is gone.
    ready: Notify,
}

#[derive(Default)]
struct QueueState {
    spans: Vec<otlp::Span>,
    /// Every [`Tracer`] is gone: the exporter sends what is left and ends.
    closed: bool,
}

impl Queue {
    /// Queues `span`; false when the queue is full (the span is dropped).
    fn push(&self, span: otlp::Span) -> bool {
        let mut state = lock(&self.state);
        if state.spans.len() >= MAX_QUEUE {
            return false;
        }
        state.spans.push(span);
        let batch_complete = state.spans.len() == MAX_BATCH;
        drop(state);
        if batch_complete {
            self.ready.notify_one();
        }
        true
    }

    /// Up to [`MAX_BATCH`] queued spans, oldest first, and whether the tracers are gone.
    fn take_batch(&self) -> (Vec<otlp::Span>, bool) {
        let mut state = lock(&self.state);
        let n = state.spans.len().min(MAX_BATCH);
        let batch = state.spans.drain(..n).collect();
        (batch, state.closed)
    }

    fn close(&self) {
        lock(&self.state).closed = true;
        self.ready.notify_one();
    }
}

/// Locks a std mutex, recovering from poisoning (a push or drain cannot leave it inconsistent).
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

struct Inner {
    queue: Arc<Queue>,
    sampling: f64,
    common: Vec<(String, String)>,
    registry: Registry,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The last tracer is gone: the exporter sends what is queued and ends.
        self.queue.close();
    }
}

/// Makes spans and hands them to the exporter. Cheap to clone; [`Tracer::disabled`] makes none.
#[derive(Clone, Default)]
pub struct Tracer {
    inner: Option<Arc<Inner>>,
}

impl std::fmt::Debug for Tracer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracer")
            .field("enabled", &self.inner.is_some())
            .finish()
    }
}

/// Sends batches of spans to the collector; run it on any runtime (it ends when every
/// [`Tracer`] clone is gone, after a last flush).
pub struct Exporter {
    queue: Arc<Queue>,
    endpoint: Uri,
    resource: otlp::Resource,
    registry: Registry,
}

impl std::fmt::Debug for Exporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exporter")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

impl Tracer {
    /// A tracer that makes no span (the `traceparent` is still added when missing).
    pub fn disabled() -> Self {
        Self { inner: None }
    }

    /// A tracer exporting to `settings.endpoint` (none: [`Tracer::disabled`]), counting into
    /// `registry`; the [`Exporter`] must be spawned.
    pub fn new(settings: &TracingSettings, registry: &Registry) -> (Self, Option<Exporter>) {
        let Some(endpoint) = settings.endpoint.clone() else {
            return (Self::disabled(), None);
        };
        registry.describe_counter(
            "ambit_waypoint_spans_exported_total",
            "Trace spans the OTLP collector accepted",
        );
        registry.describe_counter(
            "ambit_waypoint_spans_dropped_total",
            "Trace spans dropped, by reason: queue_full (the export queue was full), export_failed (the collector refused them or could not be reached)",
        );
        for reason in ["queue_full", "export_failed"] {
            registry
                .counter(
                    "ambit_waypoint_spans_dropped_total",
                    &[("reason", reason.to_string())],
                )
                .increment(0);
        }
        registry
            .counter("ambit_waypoint_spans_exported_total", &())
            .increment(0);
        let queue = Arc::new(Queue::default());
        let resource = otlp::Resource {
            attributes: vec![
                key_value("service.name", settings.service_name.as_str().into()),
                key_value("telemetry.sdk.name", "ambit-waypoint".into()),
                key_value("telemetry.sdk.language", "rust".into()),
                key_value("telemetry.sdk.version", env!("CARGO_PKG_VERSION").into()),
            ],
            dropped_attributes_count: 0,
        };
        let tracer = Self {
            inner: Some(Arc::new(Inner {
                queue: queue.clone(),
                sampling: settings.sampling.clamp(0.0, 100.0),
                common: settings.span_attributes.clone(),
                registry: registry.clone(),
            })),
        };
        let exporter = Exporter {
            queue,
            endpoint,
            resource,
            registry: registry.clone(),
        };
        (tracer, Some(exporter))
    }

    /// True when spans are made.
    pub fn enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// The server span of an incoming request, when it is sampled: continues the client's
    /// `traceparent` or starts a trace (sampled with the configured probability), and rewrites
    /// `traceparent` to name the waypoint's span. Without tracing, or for a request not
    /// sampled, only makes sure a `traceparent` is there (not sampled when a new trace was not).
    pub fn start(
        &self,
        headers: &mut HeaderMap,
        name: impl FnOnce() -> String,
    ) -> Option<ActiveSpan> {
        let incoming = headers
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_traceparent);
        let Some(inner) = &self.inner else {
            if incoming.is_none() {
                let trace: [u8; 16] = rand::rng().random_range(1..=u128::MAX).to_be_bytes();
                if let Some(v) = traceparent(&trace, &random_span_id(), true) {
                    headers.insert("traceparent", v);
                }
            }
            return None;
        };
        let context = incoming.unwrap_or_else(|| TraceContext {
            trace_id: rand::rng().random_range(1..=u128::MAX).to_be_bytes(),
            parent: None,
            sampled: inner.sampling > 0.0 && rand::rng().random_range(0.0..100.0) < inner.sampling,
        });
        let span_id = random_span_id();
        if let Some(v) = traceparent(&context.trace_id, &span_id, context.sampled) {
            headers.insert("traceparent", v);
        }
        if !context.sampled {
            return None;
        }
        let trace_state = headers
            .get("tracestate")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        Some(ActiveSpan {
            trace_id: context.trace_id,
            span_id,
            parent: context.parent,
            trace_state,
            name: name(),
            kind: otlp::SpanKind::Server,
            start: now_nanos(),
            attributes: inner
                .common
                .iter()
                .map(|(k, v)| (k.clone(), Value::Str(v.clone())))
                .collect(),
        })
    }

    /// Ends `span` now with HTTP status `status` (a 5xx, or 0 for no answer, is an error) and
    /// queues it for export; a full queue drops it (counted).
    pub fn end(&self, mut span: ActiveSpan, status: u16) {
        let Some(inner) = &self.inner else {
            return;
        };
        if span.kind == otlp::SpanKind::Client {
            span.attributes.extend(
                inner
                    .common
                    .iter()
                    .filter(|(k, _)| k == "component" || k == "node_id")
                    .map(|(k, v)| (k.clone(), Value::Str(v.clone()))),
            );
        }
        if status != 0 {
            span.set_int("http.status_code", i64::from(status));
        }
        let error = status == 0 || status >= 500;
        if error {
            span.set("error", Value::Bool(true));
        }
        let otlp_span = otlp::Span {
            trace_id: span.trace_id.to_vec(),
            span_id: span.span_id.to_vec(),
            trace_state: span.trace_state,
            parent_span_id: span.parent.map(|p| p.to_vec()).unwrap_or_default(),
            name: span.name,
            kind: span.kind as i32,
            start_time_unix_nano: span.start,
            end_time_unix_nano: now_nanos().max(span.start),
            attributes: span
                .attributes
                .into_iter()
                .map(|(k, v)| key_value(&k, v))
                .collect(),
            status: Some(otlp::Status {
                message: String::new(),
                code: if error {
                    otlp::StatusCode::Error as i32
                } else {
                    otlp::StatusCode::Unset as i32
                },
            }),
            // Sampled, and whether the parent is remote (the client's span, for a server span).
            flags: 0x101
                | u32::from(span.kind == otlp::SpanKind::Server && span.parent.is_some()) << 9,
        };
        if !inner.queue.push(otlp_span) {
            inner
                .registry
                .counter(
                    "ambit_waypoint_spans_dropped_total",
                    &[("reason", "queue_full".to_string())],
                )
                .increment(1);
        }
    }
}

impl Exporter {
    /// Sends batches until every tracer is gone.
    pub async fn run(self) {
        let mut connection: Option<hyper::client::conn::http1::SendRequest<Full<Bytes>>> = None;
        loop {
            // A batch completes, the flush time comes, or the tracers are gone.
            let _ = tokio::time::timeout(FLUSH_EVERY, self.queue.ready.notified()).await;
            // Everything queued by now goes, a batch at a time.
            loop {
                let (spans, closed) = self.queue.take_batch();
                if spans.is_empty() {
                    if closed {
                        return;
                    }
                    break;
                }
                let count = spans.len() as u64;
                match self.export(&mut connection, spans).await {
                    Ok(()) => self
                        .registry
                        .counter("ambit_waypoint_spans_exported_total", &())
                        .increment(count),
                    Err(error) => {
                        connection = None;
                        ::tracing::warn!(endpoint = %self.endpoint, %error, spans = count, "OTLP export failed; spans dropped");
                        self.registry
                            .counter(
                                "ambit_waypoint_spans_dropped_total",
                                &[("reason", "export_failed".to_string())],
                            )
                            .increment(count);
                    }
                }
            }
        }
    }

    async fn export(
        &self,
        connection: &mut Option<hyper::client::conn::http1::SendRequest<Full<Bytes>>>,
        spans: Vec<otlp::Span>,
    ) -> Result<(), String> {
        let body = otlp::ExportTraceServiceRequest {
            resource_spans: vec![otlp::ResourceSpans {
                resource: Some(self.resource.clone()),
                scope_spans: vec![otlp::ScopeSpans {
                    scope: Some(otlp::InstrumentationScope {
                        name: "ambit-waypoint".to_string(),
                        version: env!("CARGO_PKG_VERSION").to_string(),
                    }),
                    spans,
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            }],
        }
        .encode_to_vec();
        let authority = self
            .endpoint
            .authority()
            .map(|a| a.as_str().to_string())
            .unwrap_or_default();
        let sending = async {
            let reusable = connection.as_ref().is_some_and(|c| !c.is_closed());
            if !reusable {
                let port = self.endpoint.port_u16().unwrap_or(80);
                let host = self.endpoint.host().unwrap_or("localhost");
                let host = host.trim_start_matches('[').trim_end_matches(']');
                let stream = match host.parse::<std::net::IpAddr>() {
                    Ok(ip) => tokio::net::TcpStream::connect(SocketAddr::new(ip, port)).await,
                    Err(_) => tokio::net::TcpStream::connect((host, port)).await,
                }
                .map_err(|e| format!("connect: {e}"))?;
                let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                    .await
                    .map_err(|e| format!("handshake: {e}"))?;
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                *connection = Some(sender);
            }
            let Some(sender) = connection.as_mut() else {
                return Err("no connection".to_string());
            };
            sender
                .ready()
                .await
                .map_err(|e| format!("connection: {e}"))?;
            let request = Request::post(
                self.endpoint
                    .path_and_query()
                    .map_or("/v1/traces", |p| p.as_str()),
            )
            .header(http::header::HOST, authority)
            .header(http::header::CONTENT_TYPE, "application/x-protobuf")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| e.to_string())?;
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| format!("request: {e}"))?;
            let status = response.status();
            let _ = response.into_body().collect().await;
            if status.is_success() {
                Ok(())
            } else {
                Err(format!("the collector answered {status}"))
            }
        };
        tokio::time::timeout(EXPORT_TIMEOUT, sending)
            .await
            .map_err(|_| format!("no answer within {EXPORT_TIMEOUT:?}"))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_is_read_as_w3c_says() {
        let ctx = parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
            .expect("valid");
        assert_eq!(hex(&ctx.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(hex(&ctx.parent.unwrap()), "00f067aa0ba902b7");
        assert!(ctx.sampled);
        let unsampled =
            parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00").unwrap();
        assert!(!unsampled.sampled);
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-+bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "zz-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-+1",
            "garbage",
        ] {
            assert_eq!(parse_traceparent(bad), None, "{bad}");
        }
        // A later version may carry more fields.
        assert!(
            parse_traceparent("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-future")
                .is_some()
        );
    }

    /// The spec's grammar, written out independently of the parser.
    fn valid_by_the_spec(value: &str) -> bool {
        let parts: Vec<&str> = value.trim().split('-').collect();
        let lower_hex = |s: &str, n: usize| {
            s.len() == n
                && s.chars()
                    .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
        };
        parts.len() >= 4
            && lower_hex(parts[0], 2)
            && parts[0] != "ff"
            && (parts[0] != "00" || parts.len() == 4)
            && lower_hex(parts[1], 32)
            && parts[1].chars().any(|c| c != '0')
            && lower_hex(parts[2], 16)
            && parts[2].chars().any(|c| c != '0')
            && lower_hex(parts[3], 2)
    }

    proptest::proptest! {
        /// Any header value: read exactly when the spec's grammar allows it, never a panic.
        #[test]
        fn any_traceparent_is_read_only_when_the_spec_allows_it(
            value in "([0-9a-fA-F+ -]{0,4}|[0-9a-f]{2})(-[0-9a-fA-Fx+]{0,33}){0,5}"
        ) {
            proptest::prop_assert_eq!(parse_traceparent(&value).is_some(), valid_by_the_spec(&value));
        }

        /// What the waypoint writes, it reads back.
        #[test]
        fn written_trace_contexts_read_back(
            trace in 1u128..,
            span in 1u64..,
            sampled in proptest::bool::ANY,
        ) {
            let written = traceparent(&trace.to_be_bytes(), &span.to_be_bytes(), sampled).unwrap();
            let read = parse_traceparent(written.to_str().unwrap()).unwrap();
            proptest::prop_assert_eq!(read.trace_id, trace.to_be_bytes());
            proptest::prop_assert_eq!(read.parent, Some(span.to_be_bytes()));
            proptest::prop_assert_eq!(read.sampled, sampled);
        }

        #[test]
        fn arbitrary_text_never_panics(value in proptest::prelude::any::<String>()) {
            let _ = parse_traceparent(&value);
        }
    }

    #[test]
    fn endpoints_from_the_otel_variables() {
        let e = endpoint(Some("http://collector:4318"), None)
            .unwrap()
            .unwrap();
        assert_eq!(e.to_string(), "http://collector:4318/v1/traces");
        let e = endpoint(
            Some("http://collector:4318/"),
            Some("http://other:4318/custom"),
        )
        .unwrap()
        .unwrap();
        assert_eq!(e.to_string(), "http://other:4318/custom");
        assert_eq!(endpoint(None, None).unwrap(), None);
        let error = endpoint(Some("https://collector:4318"), None)
            .unwrap_err()
            .to_string();
        assert!(error.contains("OTEL_EXPORTER_OTLP_ENDPOINT"), "{error}");
    }

    #[tokio::test]
    async fn sampling_continues_the_client_trace_and_starts_new_ones_by_probability() {
        let registry = Registry::new();
        let settings = |sampling| TracingSettings {
            endpoint: Some("http://127.0.0.1:9/v1/traces".parse().unwrap()),
            sampling,
            service_name: "waypoint.demo".into(),
            span_attributes: vec![("component".into(), "proxy".into())],
        };
        let (tracer, _exporter) = Tracer::new(&settings(0.0), &registry);
        // The client's sampled trace is continued whatever the sampling percentage.
        let mut headers = HeaderMap::new();
        headers.insert(
            "traceparent",
            HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        );
        let span = tracer.start(&mut headers, || "x".into()).expect("sampled");
        assert_eq!(span.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        let sent = headers["traceparent"].to_str().unwrap().to_string();
        assert!(
            sent.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
            "{sent}"
        );
        assert!(
            !sent.contains("00f067aa0ba902b7"),
            "the parent is now ours: {sent}"
        );
        // A new trace at 0%: not sampled, marked so downstream.
        let mut headers = HeaderMap::new();
        assert!(tracer.start(&mut headers, || "x".into()).is_none());
        assert!(headers["traceparent"].to_str().unwrap().ends_with("-00"));
        // At 100%: every new trace.
        let (tracer, _exporter) = Tracer::new(&settings(100.0), &registry);
        let mut headers = HeaderMap::new();
        assert!(tracer.start(&mut headers, || "x".into()).is_some());
        assert!(headers["traceparent"].to_str().unwrap().ends_with("-01"));
    }

    #[tokio::test]
    async fn the_exporter_is_woken_per_batch_not_per_span() {
        let queue = Queue::default();
        let span = || otlp::Span {
            name: "x".into(),
            ..otlp::Span::default()
        };
        for _ in 0..MAX_BATCH - 1 {
            assert!(queue.push(span()));
        }
        // Nothing signalled yet: an exporter waiting now would sleep until its flush time.
        let early = tokio::time::timeout(Duration::from_millis(20), queue.ready.notified()).await;
        assert!(early.is_err(), "woken before a batch was complete");
        assert!(queue.push(span()));
        tokio::time::timeout(Duration::from_secs(5), queue.ready.notified())
            .await
            .expect("a complete batch wakes the exporter");
        for _ in 0..10 {
            assert!(queue.push(span()));
        }
        let (first, closed) = queue.take_batch();
        assert_eq!((first.len(), closed), (MAX_BATCH, false));
        queue.close();
        let (rest, closed) = queue.take_batch();
        assert_eq!((rest.len(), closed), (10, true));
        tokio::time::timeout(Duration::from_secs(5), queue.ready.notified())
            .await
            .expect("closing wakes the exporter for its last flush");
    }

    #[tokio::test]
    async fn a_full_queue_drops_spans_and_counts_them() {
        let registry = Registry::new();
        let (tracer, exporter) = Tracer::new(
            &TracingSettings {
                endpoint: Some("http://127.0.0.1:9/v1/traces".parse().unwrap()),
                sampling: 100.0,
                service_name: "waypoint.demo".into(),
                span_attributes: Vec::new(),
            },
            &registry,
        );
        // The exporter is not running: the queue fills and the rest is dropped.
        for _ in 0..MAX_QUEUE + 5 {
            let mut headers = HeaderMap::new();
            let span = tracer.start(&mut headers, || "x".into()).unwrap();
            tracer.end(span, 200);
        }
        let text = registry.render();
        assert!(
            text.contains("ambit_waypoint_spans_dropped_total{reason=\"queue_full\"} 5"),
            "{text}"
        );
        drop(exporter);
    }
}
