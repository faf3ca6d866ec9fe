//! Istio's traffic metrics and access logs, shared by ztunnel and the waypoint.
//!
//! - [`TrafficLabels`]: the full Istio label set of a connection (reporter, source and
//!   destination workloads, service, security policy, localities; every label always present,
//!   `unknown` when missing), built once per connection from plain values ([`WorkloadLabels`],
//!   [`ServiceLabels`]) so this crate knows nothing of the state index.
//! - [`ConnectionGuard`]: counts a TCP connection opened when created, its bytes live, and closed
//!   (and failed) with one access-log event when dropped, so a cancelled connection is counted
//!   too. There is no `finish` to remember: a failure is set on the guard.
//! - [`LiveConnections`]: the connections open right now (ends, identities, bytes so far), which
//!   a guard joins with [`ConnectionGuard::track`] and leaves when dropped, for config dumps.
//! - [`RequestGuard`]: the same for one HTTP request at a waypoint (`istio_requests_total`, the
//!   duration and size histograms with Envoy's buckets, one access-log event per request).
//! - [`ResponseFlags`] and the [`ResponseFlag`] trait: each data path's `thiserror` error says
//!   which flag it is counted under, and the guard takes it from the error.
//!
//! Access-log events use the tracing target `access` with dotted field names (`src.addr`,
//! `src.identity`, `dst.service`, ...). Series are recorded in the
//! [`Registry`](ambit_core::metrics::Registry) handed in, never a global one.
#![forbid(unsafe_code)]

mod connection;
pub mod dump;
mod flags;
mod labels;
mod live;
mod request;

pub use connection::ConnectionGuard;
pub use flags::{ResponseFlag, ResponseFlags};
pub use labels::{Reporter, ServiceLabels, TrafficLabels, WorkloadLabels};
pub use live::{ByteSource, LiveConnection, LiveConnections};
pub use request::{RequestGuard, RequestProtocol, trace_id};

use ambit_core::metrics::Registry;

/// Registers the help texts of the TCP metrics.
pub fn describe_tcp(registry: &Registry) {
    registry.describe_counter(
        "istio_tcp_connections_opened_total",
        "TCP connections opened, by source and destination workload",
    );
    registry.describe_counter(
        "istio_tcp_connections_closed_total",
        "TCP connections closed, by source and destination workload and response flags",
    );
    registry.describe_counter(
        "istio_tcp_connections_failed_total",
        "TCP connections that ended with an error, by response flags",
    );
    registry.describe_counter(
        "istio_tcp_received_bytes_total",
        "Bytes received from the client (request direction)",
    );
    registry.describe_counter(
        "istio_tcp_sent_bytes_total",
        "Bytes sent to the client (response direction)",
    );
    registry.describe_gauge(
        "istio_tcp_sockets_open",
        "Client sockets of proxied TCP connections open now, by reporter",
    );
}

/// Registers the help texts of the request metrics.
pub fn describe_http(registry: &Registry) {
    registry.describe_counter(
        "istio_requests_total",
        "Requests, by source and destination workload, response code and flags",
    );
    registry.describe_histogram(
        "istio_request_duration_milliseconds",
        "Request duration from the first request byte to the last response byte, in milliseconds",
    );
    registry.describe_histogram("istio_request_bytes", "Request body sizes in bytes");
    registry.describe_histogram("istio_response_bytes", "Response body sizes in bytes");
}

#[cfg(test)]
mod tests;
