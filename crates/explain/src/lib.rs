//! `ambitctl explain`: one flow through the mesh, hop by hop, decided by the proxies' own code.
//!
//! From the cluster's objects [`explain`] builds exactly what the control plane would serve
//! ([`ambit_mesh::translate::translate`]: workloads, services, L4 policies, and each waypoint's
//! routes, policies and destination rules as istiod-lite scopes them), indexes it as the proxies
//! do ([`ambit_state::StateIndex`], [`ambit_authz::PolicyStore`],
//! [`waypoint::routes::RouteTable`], [`waypoint::traffic::Destinations`]), then walks the flow:
//!
//! 1. the source pod: node, identity, captured or not (the enrollment rules);
//! 2. the destination: a host name resolved as the pod's DNS would (short name in the source's
//!    namespace, `name.ns`, FQDN), a Service VIP or a pod IP, to the Service and port (target
//!    port, app protocol) and its endpoints, or to the workload;
//! 3. the waypoint: in the path or not, decided by ztunnel's own [`ambit_state::route::route`],
//!    and why (which `istio.io/use-waypoint` label on which object, `istio.io/waypoint-for`,
//!    service- or pod-addressed);
//! 4. the route, when the waypoint serves the port over HTTP: the rule that matches (the
//!    waypoint's [`RouteTable::decide`](waypoint::routes::RouteTable::decide)), its filters, and
//!    the backends and endpoints it can choose;
//! 5. authorization at each hop with the engine the proxies use ([`ambit_authz`]): at the
//!    waypoint (L7, the source's identity), at the destination ztunnel (L4; the waypoint's
//!    identity when a waypoint is in the path), every applicable policy with whether it matched
//!    and which rule, and the one that decided; STRICT PeerAuthentication shows as its
//!    synthesized DENY policy;
//! 6. the [`Verdict`].
//!
//! The report is [`Explanation`]: serializable (the JSON `ambitctl explain -o json` prints, field
//! names in camelCase, outcomes in kebab-case) and printable as text ([`Explanation::to_text`]).
#![forbid(unsafe_code)]

mod report;
mod text;
mod walk;

pub use report::{
    Backend, Destination, Endpoint, Explanation, FlowSummary, Header, Hop, HopKind, LabelRef,
    Outcome, PathKind, PolicyRef, PolicyVerdict, RouteStep, ServiceInfo, Source, Verdict,
    WaypointStep,
};
pub use walk::explain;

use thiserror::Error;

/// The flow to explain, as the user gave it.
#[derive(Clone, Debug, Default)]
pub struct Flow {
    /// The source pod, `namespace/pod`.
    pub from: String,
    /// The destination, `host:port` or `ip:port` (`[v6]:port`).
    pub to: String,
    /// The HTTP method (default `GET` when the port speaks HTTP).
    pub method: Option<String>,
    /// The HTTP path, possibly with a query (default `/`).
    pub path: Option<String>,
    /// Request headers, in order.
    pub headers: Vec<(String, String)>,
}

impl Flow {
    /// True when the user described an HTTP request (a method, a path or a header).
    pub fn has_request(&self) -> bool {
        self.method.is_some() || self.path.is_some() || !self.headers.is_empty()
    }
}

/// Why a flow cannot be explained. Each names what the user gave and what is wrong with it.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ExplainError {
    /// `--from` is not `namespace/pod`.
    #[error("--from {0:?}: expected <namespace>/<pod>")]
    From(String),
    /// The source pod does not exist.
    #[error("--from {namespace}/{name}: there is no Pod {namespace}/{name}")]
    UnknownPod {
        /// Namespace given.
        namespace: String,
        /// Pod name given.
        name: String,
    },
    /// `--to` is not `host:port`.
    #[error("--to {to:?}: {reason}")]
    To {
        /// What was given.
        to: String,
        /// What is wrong.
        reason: String,
    },
    /// The host name does not resolve to a Service.
    #[error(
        "--to {host}: no Service {namespace}/{name} (names resolve as a pod's DNS does: <service>, <service>.<namespace>, <service>.<namespace>.svc[.<domain>]); use an IP for anything else"
    )]
    UnknownHost {
        /// The host given.
        host: String,
        /// The namespace it was looked up in.
        namespace: String,
        /// The Service name it was read as.
        name: String,
    },
    /// The Service has no VIP (headless): DNS answers with pod IPs.
    #[error(
        "--to {host}: Service {namespace}/{name} is headless (no clusterIP): DNS answers with its pods' IPs; explain a pod IP instead"
    )]
    Headless {
        /// The host given.
        host: String,
        /// Service namespace.
        namespace: String,
        /// Service name.
        name: String,
    },
    /// A `--header` is not a valid HTTP header.
    #[error("--header {0:?}: expected NAME=VALUE with a valid HTTP header name and value")]
    Header(String),
    /// `--method` or `--path` cannot form an HTTP request.
    #[error("--method/--path: {0}")]
    Request(String),
}

/// Parses `K=V` (or `K:V`) into a header pair.
pub fn parse_header(text: &str) -> Result<(String, String), ExplainError> {
    let (name, value) = text
        .split_once('=')
        .or_else(|| text.split_once(':'))
        .ok_or_else(|| ExplainError::Header(text.to_string()))?;
    let name = name.trim();
    if name.is_empty() || http::HeaderName::from_bytes(name.as_bytes()).is_err() {
        return Err(ExplainError::Header(text.to_string()));
    }
    let value = value.trim();
    if http::HeaderValue::from_str(value).is_err() {
        return Err(ExplainError::Header(text.to_string()));
    }
    Ok((name.to_ascii_lowercase(), value.to_string()))
}

#[cfg(test)]
mod tests;
