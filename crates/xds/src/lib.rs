//! The control-plane side every Ambit proxy shares: a delta xDS client generic over resource
//! types, and the connection it (and the CA client) makes to the control plane.
//!
//! - [`control`]: how to reach and authenticate to istiod(-lite): the gRPC channel over TLS
//!   verified against a configured root (no client certificate), the per-call metadata
//!   (`authorization: Bearer <token>` read fresh each call, `clusterid`, extra headers), and the
//!   reconnect [`Backoff`].
//! - [`ca`]: the Istio CA client (`CreateCertificate`, with or without impersonation) behind a
//!   certificate store, and the certificate gauges every proxy exports.
//! - [`client`]: one `DeltaAggregatedResources` stream carrying every type a proxy subscribes
//!   to, with one handler per type. ztunnel subscribes to `istio.workload.Address` and
//!   `istio.security.Authorization`; the waypoint to `istio.workload.Address` plus Ambit's
//!   `ambit.waypoint.v1.Route` and `ambit.waypoint.v1.Policy`.
//!
//! ```no_run
//! # use ambit_xds::{Rejection, XdsClient, XdsConfig};
//! # use ambit_proto::workload as pb;
//! # fn example(config: XdsConfig, metrics: ambit_core::metrics::Registry) {
//! let client = XdsClient::builder(config, metrics)
//!     .subscribe::<pb::Address>(|upserts: &[(String, pb::Address)], removals: &[String]| {
//!         // Apply what is valid; name what is not. Rejected resources are NACKed.
//!         Vec::<Rejection>::new()
//!     })
//!     .build();
//! # let _ = client;
//! # }
//! ```
//!
//! What the client guarantees, for every subscribed type:
//! - the initial requests go out in subscription order, each a wildcard subscription carrying
//!   the caller's [`Node`](ambit_proto::envoy_core::Node);
//! - each response's resources are decoded into the type's message and handed to its handler at
//!   once; a resource that does not decode, or that the handler rejects, is NACKed by name with
//!   its reason while the others apply, and is not reported as held;
//! - on reconnect, `initial_resource_versions` lists every resource held, so an unchanged control
//!   plane pushes nothing;
//! - gzip is accepted, responses up to 200 MiB;
//! - readiness (a [`BlockReady`](ambit_core::readiness::BlockReady)) is released once a response
//!   of every subscribed type has been processed;
//! - connection errors back off exponentially; routine stream ends reconnect at once;
//! - metrics: `istio_xds_connection_terminations_total{reason}`, `istio_xds_message_total{url}`,
//!   `istio_xds_message_bytes_total{url}`, `ambit_xds_rejected_resources_total{url}`.
#![forbid(unsafe_code)]

pub mod ca;
pub mod client;
pub mod control;

pub use ca::{CaClient, certificate_gauges};
pub use client::{Handler, XdsClient, XdsClientBuilder, XdsConfig, XdsError, describe_metrics};
pub use control::{Backoff, ControlError, ControlPlane, ControlPlaneEnv, TokenSource, error_chain};

/// A resource a handler refused, with the reason: sent back in the NACK as `"<name>: <reason>"`
/// (and logged by configuration sources that have no NACK, such as ztunnel's local file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// The xDS resource name (workload uid, `namespace/hostname`, policy `namespace/name`, ...).
    pub name: String,
    /// Why it was refused.
    pub reason: String,
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.name, self.reason)
    }
}
