//! The waypoint's side of Istio's telemetry: labels from the workload index, and response
//! bodies that feed the request guard (body bytes, gRPC status from trailers) and record it when
//! the response ends or is abandoned.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use ambit_core::metrics::Registry;
use ambit_state::{Service, Workload};
use ambit_telemetry::{Reporter, RequestGuard, ServiceLabels, TrafficLabels, WorkloadLabels};
use bytes::Bytes;
use http::{HeaderMap, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;

use crate::upstream::{BoxError, RequestBody};

/// The objects a label set is built from, by address: a workload or service that changes is a
/// new object (the index replaces, never mutates), so a changed one is a new key.
type LabelKey = (usize, String, usize, usize);

/// A cached label set, holding the objects whose addresses key it (so no address is reused by
/// another object while the entry lives).
type Cached = (
    Option<Arc<Workload>>,
    Option<Arc<Workload>>,
    Option<Arc<Service>>,
    Arc<TrafficLabels>,
);

/// Label sets kept before the cache starts over.
const MAX_CACHED_LABELS: usize = 4096;

/// Labels and guards for one waypoint.
#[derive(Debug, Clone)]
pub struct Telemetry {
    registry: Registry,
    labels: Arc<std::sync::Mutex<std::collections::HashMap<LabelKey, Cached>>>,
}

impl Telemetry {
    /// Records into `registry`.
    pub fn new(registry: Registry) -> Self {
        ambit_telemetry::describe_http(&registry);
        ambit_telemetry::describe_tcp(&registry);
        Self {
            registry,
            labels: Arc::default(),
        }
    }

    /// The registry.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The label set of traffic from `source` (proven as `principal`) to `destination` for
    /// `service`, reported by the waypoint.
    pub fn labels(
        &self,
        source: Option<&Arc<Workload>>,
        principal: &str,
        destination: Option<&Arc<Workload>>,
        service: Option<&Arc<Service>>,
    ) -> Arc<TrafficLabels> {
        fn address<T>(value: Option<&Arc<T>>) -> usize {
            value.map_or(0, |v| Arc::as_ptr(v) as usize)
        }
        let key = (
            address(source),
            principal.to_string(),
            address(destination),
            address(service),
        );
        let mut cache = self.labels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, _, _, labels)) = cache.get(&key) {
            return labels.clone();
        }
        if cache.len() >= MAX_CACHED_LABELS {
            cache.clear();
        }
        let labels = Self::build(
            source.map(|w| &**w),
            principal,
            destination.map(|w| &**w),
            service.map(|s| &**s),
        );
        cache.insert(
            key,
            (
                source.cloned(),
                destination.cloned(),
                service.cloned(),
                labels.clone(),
            ),
        );
        labels
    }

    fn build(
        source: Option<&Workload>,
        principal: &str,
        destination: Option<&Workload>,
        service: Option<&Service>,
    ) -> Arc<TrafficLabels> {
        let mut source = source.map(workload_labels).unwrap_or_default();
        source.principal = principal.to_string();
        let destination = destination
            .map(|w| {
                let mut labels = workload_labels(w);
                labels.principal = w.identity().to_string();
                labels
            })
            .unwrap_or_default();
        let service = service.map(service_labels).unwrap_or_default();
        Arc::new(TrafficLabels::new(
            Reporter::Waypoint,
            source,
            destination,
            service,
            true,
        ))
    }
}

/// What the metrics say about a workload.
pub fn workload_labels(w: &Workload) -> WorkloadLabels {
    let locality = w.locality.as_deref();
    WorkloadLabels {
        name: w.name.to_string(),
        workload: if w.workload_name.is_empty() {
            w.name.to_string()
        } else {
            w.workload_name.to_string()
        },
        namespace: w.namespace.to_string(),
        canonical_service: w.canonical_name.to_string(),
        canonical_revision: w.canonical_revision.to_string(),
        principal: String::new(),
        cluster: w.cluster_id.to_string(),
        region: locality.map(|l| l.region.to_string()).unwrap_or_default(),
        zone: locality.map(|l| l.zone.to_string()).unwrap_or_default(),
    }
}

fn service_labels(s: &Service) -> ServiceLabels {
    ServiceLabels {
        hostname: s.hostname.to_string(),
        namespace: s.namespace.to_string(),
        name: s.name.to_string(),
    }
}

/// Counts the bytes of a request body as they are read.
pub fn counted_request(body: hyper::body::Incoming, counter: Arc<AtomicU64>) -> RequestBody {
    Counted {
        inner: body,
        counter,
    }
    .map_err(|e| -> BoxError { Box::new(e) })
    .boxed()
}

struct Counted<B> {
    inner: B,
    counter: Arc<AtomicU64>,
}

impl<B: Body<Data = Bytes> + Unpin> Body for Counted<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            self.counter.fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Hands `response` to the client with `guard` riding on its body: the status is recorded now,
/// body bytes and the gRPC status as they pass, and the guard records when the body ends or is
/// dropped. `request_bytes` is the request body's running count. A trace `span` ends with the
/// body too, with the request and response sizes.
pub fn finish<B>(
    mut guard: RequestGuard,
    request_bytes: Arc<AtomicU64>,
    response: Response<B>,
    span: Option<(crate::tracing::Tracer, crate::tracing::ActiveSpan)>,
) -> Response<crate::proxy::ResponseBody>
where
    B: Body<Data = Bytes, Error = BoxError> + Send + Sync + Unpin + 'static,
{
    guard.respond(response.status().as_u16());
    if let Some(status) = grpc_status(response.headers()) {
        guard.set_grpc_status(status);
    }
    let status = response.status().as_u16();
    let (parts, body) = response.into_parts();
    let body = Recorded {
        inner: body,
        guard: Some(guard),
        request_bytes,
        span: span.map(|(tracer, span)| (tracer, span, status)),
        response_bytes: 0,
    };
    Response::from_parts(parts, body.boxed())
}

fn grpc_status(headers: &HeaderMap) -> Option<i32> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

struct Recorded<B> {
    inner: B,
    guard: Option<RequestGuard>,
    request_bytes: Arc<AtomicU64>,
    span: Option<(crate::tracing::Tracer, crate::tracing::ActiveSpan, u16)>,
    response_bytes: u64,
}

impl<B> Recorded<B> {
    fn record(&mut self) {
        let request_bytes = self.request_bytes.load(Ordering::Relaxed);
        if let Some(mut guard) = self.guard.take() {
            guard.add_request_bytes(request_bytes);
            drop(guard);
        }
        if let Some((tracer, mut span, status)) = self.span.take() {
            span.set_int(
                "request_size",
                i64::try_from(request_bytes).unwrap_or(i64::MAX),
            );
            span.set_int(
                "response_size",
                i64::try_from(self.response_bytes).unwrap_or(i64::MAX),
            );
            tracer.end(span, status);
        }
    }
}

impl<B> Drop for Recorded<B> {
    fn drop(&mut self) {
        self.record();
    }
}

impl<B: Body<Data = Bytes, Error = BoxError> + Unpin> Body for Recorded<B> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.response_bytes += data.len() as u64;
                }
                if let Some(guard) = self.guard.as_mut() {
                    if let Some(data) = frame.data_ref() {
                        guard.add_response_bytes(data.len() as u64);
                    } else if let Some(status) = frame.trailers_ref().and_then(grpc_status) {
                        guard.set_grpc_status(status);
                    }
                }
            }
            Poll::Ready(Some(Err(error))) => {
                let text = error.to_string();
                if let Some(guard) = self.guard.as_mut() {
                    guard.fail_with(
                        ambit_telemetry::ResponseFlags::UPSTREAM_CONNECTION_TERMINATION,
                        text,
                    );
                }
                self.record();
            }
            Poll::Ready(None) => self.record(),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
