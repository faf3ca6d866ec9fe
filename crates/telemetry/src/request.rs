//! Accounting for one HTTP request at the waypoint: a guard that records Istio's request metrics
//! and one access-log line when dropped.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use ambit_core::metrics::Registry;
use http::{HeaderMap, Method, Uri};

use crate::flags::{ResponseFlag, ResponseFlags};
use crate::labels::TrafficLabels;

/// The `request_protocol` of a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestProtocol {
    /// HTTP/1.1 or HTTP/2.
    Http,
    /// gRPC (`content-type: application/grpc...`).
    Grpc,
}

impl RequestProtocol {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            RequestProtocol::Http => "http",
            RequestProtocol::Grpc => "grpc",
        }
    }

    /// gRPC when the request's `content-type` says so, HTTP otherwise.
    pub fn of(headers: &HeaderMap) -> Self {
        let grpc = headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/grpc"));
        if grpc {
            RequestProtocol::Grpc
        } else {
            RequestProtocol::Http
        }
    }
}

/// One request's accounting. Start it when the request headers arrive; set the upstream, the
/// response status (and gRPC status), body sizes and any failure as they become known. Dropping
/// it records `istio_requests_total`, `istio_request_duration_milliseconds`,
/// `istio_request_bytes` and `istio_response_bytes` and writes the access-log event. A request
/// dropped before a response status was set is recorded as Envoy does: response code `0` and
/// flag `DC` (downstream disconnect), unless a failure already set other flags.
pub struct RequestGuard {
    registry: Registry,
    labels: Arc<TrafficLabels>,
    protocol: RequestProtocol,
    src: SocketAddr,
    method: String,
    path: String,
    authority: String,
    request_id: String,
    trace_id: String,
    upstream: Option<SocketAddr>,
    start: Instant,
    request_bytes: u64,
    response_bytes: u64,
    status: Option<u16>,
    grpc_status: Option<i32>,
    flags: ResponseFlags,
    error: Option<String>,
}

impl fmt::Debug for RequestGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequestGuard")
            .field("method", &self.method)
            .field("path", &self.path)
            .field("status", &self.status)
            .field("flags", &self.flags)
            .finish_non_exhaustive()
    }
}

impl RequestGuard {
    /// Starts accounting for a request from `src` on a connection labelled `labels`. The
    /// protocol is taken from the `content-type`; the log keeps the method, path, authority
    /// (`:authority` or `Host`), `x-request-id` and the trace id of `traceparent`.
    pub fn start(
        registry: &Registry,
        labels: Arc<TrafficLabels>,
        src: SocketAddr,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
    ) -> Self {
        let header = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
        };
        let authority = uri
            .authority()
            .map(|a| a.as_str())
            .unwrap_or_else(|| header("host"));
        RequestGuard {
            registry: registry.clone(),
            labels,
            protocol: RequestProtocol::of(headers),
            src,
            method: method.as_str().to_string(),
            path: uri
                .path_and_query()
                .map_or_else(|| uri.path().to_string(), |p| p.as_str().to_string()),
            authority: authority.to_string(),
            request_id: header("x-request-id").to_string(),
            trace_id: trace_id(header("traceparent")).unwrap_or("").to_string(),
            upstream: None,
            start: Instant::now(),
            request_bytes: 0,
            response_bytes: 0,
            status: None,
            grpc_status: None,
            flags: ResponseFlags::NONE,
            error: None,
        }
    }

    /// Replaces the labels given at the start, once routing has chosen the destination (a
    /// waypoint knows the backend only after the request headers were read).
    pub fn set_labels(&mut self, labels: Arc<TrafficLabels>) {
        self.labels = labels;
    }

    /// Overrides the protocol derived from the headers.
    pub fn set_protocol(&mut self, protocol: RequestProtocol) {
        self.protocol = protocol;
    }

    /// The endpoint the request was sent to.
    pub fn set_upstream(&mut self, upstream: SocketAddr) {
        self.upstream = Some(upstream);
    }

    /// Adds request body bytes received from the client.
    pub fn add_request_bytes(&mut self, n: u64) {
        self.request_bytes = self.request_bytes.saturating_add(n);
    }

    /// Adds response body bytes sent to the client.
    pub fn add_response_bytes(&mut self, n: u64) {
        self.response_bytes = self.response_bytes.saturating_add(n);
    }

    /// The response status sent to the client.
    pub fn respond(&mut self, status: u16) {
        self.status = Some(status);
    }

    /// The gRPC status (`grpc-status` of the trailers, or of a trailers-only response).
    pub fn set_grpc_status(&mut self, status: i32) {
        self.grpc_status = Some(status);
    }

    /// Records a failure; its flags come from the error and add to any already set. The first
    /// error's text is kept for the log. Set the status answered with [`respond`](Self::respond).
    pub fn fail<E: ResponseFlag + fmt::Display + ?Sized>(&mut self, error: &E) {
        self.fail_with(error.response_flag(), error);
    }

    /// [`fail`](Self::fail) with explicit flags.
    pub fn fail_with(&mut self, flags: ResponseFlags, error: impl fmt::Display) {
        self.flags |= flags;
        if self.error.is_none() {
            self.error = Some(error.to_string());
        }
    }
}

/// The trace id of a W3C `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`).
pub fn trace_id(traceparent: &str) -> Option<&str> {
    let mut parts = traceparent.split('-');
    let (_version, id) = (parts.next()?, parts.next()?);
    (id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())).then_some(id)
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        let code = self.status.unwrap_or(0);
        let mut flags = self.flags;
        if self.status.is_none() && flags.is_empty() {
            flags = ResponseFlags::DOWNSTREAM_DISCONNECT;
        }
        let duration = self.start.elapsed();
        let series = self.labels.http_series(
            &self.registry,
            self.protocol.as_str(),
            code,
            self.grpc_status,
            flags,
        );
        series.requests.increment(1);
        series.duration.record(duration.as_secs_f64() * 1000.0);
        series.request_bytes.record(self.request_bytes as f64);
        series.response_bytes.record(self.response_bytes as f64);

        // The access log: only built when someone listens (the waypoint logs failed requests
        // by default and successful ones on `access=info`).
        let failed = !(flags.is_empty() && code < 500);
        let wanted = if failed {
            tracing::enabled!(target: "access", tracing::Level::WARN)
        } else {
            tracing::enabled!(target: "access", tracing::Level::INFO)
        };
        if !wanted {
            return;
        }

        let l = &self.labels;
        let upstream = self.upstream.map(|u| u.to_string()).unwrap_or_default();
        let duration_ms = u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);
        let grpc_status = self.grpc_status.map(|s| s.to_string()).unwrap_or_default();
        macro_rules! access {
            ($level:ident, $message:literal) => {
                tracing::$level!(
                    target: "access",
                    direction = l.direction(),
                    src.addr = %self.src,
                    src.workload = %l.source_log_name(),
                    src.identity = %l.source().principal,
                    dst.service = %l.service().hostname,
                    dst.workload = %l.destination_log_name(),
                    dst.upstream = %upstream,
                    http.method = %self.method,
                    http.path = %self.path,
                    http.authority = %self.authority,
                    http.status = code,
                    grpc.status = %grpc_status,
                    protocol = self.protocol.as_str(),
                    request_id = %self.request_id,
                    trace_id = %self.trace_id,
                    bytes_received = self.request_bytes,
                    bytes_sent = self.response_bytes,
                    duration_ms,
                    response_flags = %flags,
                    error = %self.error.as_deref().unwrap_or(""),
                    $message
                )
            };
        }
        if !failed {
            access!(info, "request complete");
        } else {
            access!(warn, "request failed");
        }
    }
}
