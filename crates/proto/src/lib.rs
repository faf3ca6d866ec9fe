//! Protobuf and gRPC types Ambit shares with Istio ambient peers (ztunnel, istiod, istio-cni).
//!
//! The `.proto` files under `proto/` are Ambit's own, written so that package names, message
//! names, field numbers and types match the upstream wire format exactly. `build.rs` compiles
//! them with `protox` (no `protoc` needed) into prost messages plus tonic clients and servers.
//!
//! | Module | Protobuf package | Role |
//! |---|---|---|
//! | [`workload`] | `istio.workload` | WDS resources: [`workload::Address`] (a Workload or a Service) pushed by the control plane to ztunnel |
//! | [`security`] | `istio.security` | L4 authorization policies ([`security::Authorization`]) pushed over the same xDS stream |
//! | [`zds`] | `istio.workload.zds` | node agent ↔ ztunnel messages on the ZDS Unix socket (one datagram each) |
//! | [`ca`] | `istio.v1.auth` | the CA's `CreateCertificate` RPC used to obtain workload certificates |
//! | [`discovery`] | `envoy.service.discovery.v3` | the delta ADS stream (`DeltaAggregatedResources`) carrying WDS and authorization resources |
//! | [`envoy_core`] | `envoy.config.core.v3` | the `Node` a client identifies itself with, plus `Locality` and `ControlPlane` |
//! | [`google_rpc`] | `google.rpc` | `Status`, the error detail of an xDS NACK |
//! | [`waypoint`] | `ambit.waypoint.v1` | Ambit's own waypoint resources: routes (HTTPRoute/GRPCRoute) and L7 authorization policies |
//!
//! Every generated message implements [`prost::Name`] with the `type.googleapis.com/` prefix,
//! so [`pack_any`] and [`unpack_any`] produce and accept the type URLs xDS peers use.

use prost::Name;
use thiserror::Error;

/// The generated code, nested exactly like the protobuf packages so that cross-package
/// references emitted by prost (`super::super::...`) resolve. The public modules at the crate
/// root re-export the leaves.
// `Address` holds a Workload or a Service inline, as prost generates oneofs.
#[allow(clippy::large_enum_variant)]
mod generated {
    pub(crate) mod istio {
        /// Workload discovery resources (`istio.workload`): the `Address` resource wraps either a
        /// `Workload` (one pod or VM, keyed by uid) or a `Service` (keyed by
        /// `<namespace>/<hostname>`). Type URL: [`crate::ADDRESS_TYPE_URL`].
        pub mod workload {
            include!(concat!(env!("OUT_DIR"), "/istio.workload.rs"));

            /// ZDS (`istio.workload.zds`): the node agent tells ztunnel which pods to proxy.
            /// Each message is one `SOCK_SEQPACKET` datagram under 1 KiB, no length prefix;
            /// `AddWorkload` carries the pod's netns FD. ztunnel opens with `ZdsHello`, then
            /// answers every `WorkloadRequest` with a `WorkloadResponse` ack.
            pub mod zds {
                include!(concat!(env!("OUT_DIR"), "/istio.workload.zds.rs"));
            }
        }

        /// Ambient L4 authorization (`istio.security`): policies enforced by the destination
        /// ztunnel. Type URL: [`crate::AUTHORIZATION_TYPE_URL`].
        pub mod security {
            include!(concat!(env!("OUT_DIR"), "/istio.security.rs"));
        }

        pub(crate) mod v1 {
            /// The Istio CA API (`istio.v1.auth`): `IstioCertificateService/CreateCertificate`
            /// signs a CSR and returns the chain leaf-first, root(s) last.
            pub mod auth {
                include!(concat!(env!("OUT_DIR"), "/istio.v1.auth.rs"));
            }
        }
    }

    pub(crate) mod ambit {
        pub(crate) mod waypoint {
            /// Ambit's waypoint resources (`ambit.waypoint.v1`): one [`Route`](v1::Route) per
            /// HTTPRoute/GRPCRoute bound to a Service and one [`Policy`](v1::Policy) per
            /// AuthorizationPolicy a waypoint enforces. Type URLs: [`crate::ROUTE_TYPE_URL`],
            /// [`crate::L7_POLICY_TYPE_URL`].
            pub mod v1 {
                include!(concat!(env!("OUT_DIR"), "/ambit.waypoint.v1.rs"));
            }
        }
    }

    pub(crate) mod envoy {
        pub(crate) mod service {
            pub(crate) mod discovery {
                /// Delta aggregated xDS (`envoy.service.discovery.v3`): the only transport
                /// ztunnel uses for WDS and authorization resources.
                pub mod v3 {
                    include!(concat!(env!("OUT_DIR"), "/envoy.service.discovery.v3.rs"));
                }
            }
        }

        pub(crate) mod config {
            pub(crate) mod core {
                /// Envoy core types (`envoy.config.core.v3`) needed by the xDS transport:
                /// `Node` identifies the client (ztunnel puts its role in the id prefix),
                /// `Locality`, `ControlPlane`.
                pub mod v3 {
                    include!(concat!(env!("OUT_DIR"), "/envoy.config.core.v3.rs"));
                }
            }
        }
    }

    pub(crate) mod google {
        /// `google.rpc.Status`, carried as `error_detail` in an xDS NACK.
        pub mod rpc {
            include!(concat!(env!("OUT_DIR"), "/google.rpc.rs"));
        }
    }
}

pub use generated::ambit::waypoint::v1 as waypoint;
pub use generated::envoy::config::core::v3 as envoy_core;
pub use generated::envoy::service::discovery::v3 as discovery;
pub use generated::google::rpc as google_rpc;
pub use generated::istio::security;
pub use generated::istio::v1::auth as ca;
pub use generated::istio::workload;
pub use generated::istio::workload::zds;

/// Type URL of the WDS resource (`istio.workload.Address`) on the delta xDS stream.
pub const ADDRESS_TYPE_URL: &str = "type.googleapis.com/istio.workload.Address";

/// Type URL of L4 authorization policies (`istio.security.Authorization`) on the delta xDS stream.
pub const AUTHORIZATION_TYPE_URL: &str = "type.googleapis.com/istio.security.Authorization";

/// Type URL of a waypoint route (`ambit.waypoint.v1.Route`: one HTTPRoute or GRPCRoute).
pub const ROUTE_TYPE_URL: &str = "type.googleapis.com/ambit.waypoint.v1.Route";

/// Type URL of a waypoint's L7 authorization policy (`ambit.waypoint.v1.Policy`).
pub const L7_POLICY_TYPE_URL: &str = "type.googleapis.com/ambit.waypoint.v1.Policy";

/// Type URL of a waypoint's destination policy (`ambit.waypoint.v1.DestinationPolicy`: one
/// DestinationRule).
pub const DESTINATION_POLICY_TYPE_URL: &str =
    "type.googleapis.com/ambit.waypoint.v1.DestinationPolicy";

/// Why an `Any` could not be turned back into the expected message.
#[derive(Debug, Error)]
pub enum UnpackError {
    /// The `Any` holds a different message type than the caller asked for.
    #[error(
        "protobuf Any has type URL {actual:?} but {expected:?} was expected; \
         the sender put a different resource type on this stream"
    )]
    TypeMismatch {
        /// Type URL of the message the caller asked for.
        expected: String,
        /// Type URL found in the `Any`.
        actual: String,
    },
    /// The type URL matched but the payload is not a valid encoding of that message.
    #[error(
        "protobuf Any of type {type_url:?} does not decode: {source}; \
         the sender's message definition likely disagrees with ours"
    )]
    Decode {
        /// Type URL found in the `Any`.
        type_url: String,
        /// What prost rejected.
        #[source]
        source: prost::DecodeError,
    },
}

/// Wraps a message in `google.protobuf.Any` with its `type.googleapis.com/...` type URL, as
/// xDS resources are carried.
pub fn pack_any<M: Name>(message: &M) -> prost_types::Any {
    prost_types::Any {
        type_url: M::type_url(),
        value: message.encode_to_vec(),
    }
}

/// Decodes an `Any` as `M`, after checking that it names `M`.
///
/// Only the part after the last `/` is compared, as the protobuf spec asks, so any type URL
/// host prefix is accepted.
pub fn unpack_any<M: Name + Default>(any: &prost_types::Any) -> Result<M, UnpackError> {
    let carried = any.type_url.rsplit('/').next().unwrap_or_default();
    if carried != M::full_name() {
        return Err(UnpackError::TypeMismatch {
            expected: M::type_url(),
            actual: any.type_url.clone(),
        });
    }
    M::decode(any.value.as_slice()).map_err(|source| UnpackError::Decode {
        type_url: any.type_url.clone(),
        source,
    })
}

impl workload::Service {
    /// The xDS resource name of a service: `<namespace>/<hostname>`. ztunnel parses removals of
    /// non-workload names in exactly this form.
    pub fn resource_name(&self) -> String {
        format!("{}/{}", self.namespace, self.hostname)
    }
}

impl workload::Address {
    /// The xDS resource name of this address: the workload uid or the service's
    /// `<namespace>/<hostname>`. `None` when neither variant is set.
    pub fn resource_name(&self) -> Option<String> {
        match self.r#type.as_ref()? {
            workload::address::Type::Workload(w) => Some(w.uid.clone()),
            workload::address::Type::Service(s) => Some(s.resource_name()),
        }
    }
}

impl waypoint::Route {
    /// The xDS resource name of a route: `<kind>/<namespace>/<name>`, kind `HTTPRoute` or
    /// `GRPCRoute`.
    pub fn resource_name(&self) -> String {
        let kind = match self.kind() {
            waypoint::RouteKind::Http => "HTTPRoute",
            waypoint::RouteKind::Grpc => "GRPCRoute",
            waypoint::RouteKind::VirtualService => "VirtualService",
        };
        format!("{kind}/{}/{}", self.namespace, self.name)
    }
}

impl waypoint::Policy {
    /// The xDS resource name of a waypoint policy: `<namespace>/<name>`.
    pub fn resource_name(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

impl waypoint::DestinationPolicy {
    /// The xDS resource name of a destination policy: `<namespace>/<name>`.
    pub fn resource_name(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

impl security::Authorization {
    /// The xDS resource name of a policy: `<namespace>/<name>`.
    pub fn resource_name(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}
