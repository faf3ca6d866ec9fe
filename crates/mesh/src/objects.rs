//! Typed objects with the Kubernetes field names (camelCase) for exactly the fields Ambit uses.
//! Unknown fields are ignored, as a Kubernetes client would.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use crate::destination_rule::DestinationRule;
pub use crate::gateway_api::{Gateway, GatewayClass, GrpcRoute, HttpRoute};
pub use crate::virtual_service::VirtualService;

/// `metadata` of any object.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    /// Object name.
    #[serde(default)]
    pub name: String,
    /// Namespace (empty for cluster-scoped objects).
    #[serde(default)]
    pub namespace: String,
    /// Unique id assigned by the API server (the lab assigns one when absent).
    #[serde(default)]
    pub uid: String,
    /// Labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Annotations.
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    /// When the API server created it (RFC 3339); routes use it for precedence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_timestamp: Option<String>,
}

/// A namespace.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct Namespace {
    /// Metadata.
    pub metadata: ObjectMeta,
}

/// A pod: the fields the mesh needs.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct Pod {
    /// Metadata.
    pub metadata: ObjectMeta,
    /// Spec.
    #[serde(default)]
    pub spec: PodSpec,
    /// Status as the kubelet reports it.
    #[serde(default)]
    pub status: PodStatus,
}

/// `Pod.spec`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PodSpec {
    /// The node it runs on.
    #[serde(default)]
    pub node_name: String,
    /// Its service account (`default` when empty).
    #[serde(default)]
    pub service_account_name: String,
    /// Uses the node's network namespace (never captured).
    #[serde(default)]
    pub host_network: bool,
    /// Containers (ports by name, for named target ports; image/command for the lab).
    #[serde(default)]
    pub containers: Vec<Container>,
}

/// One container.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Container {
    /// Container name.
    #[serde(default)]
    pub name: String,
    /// Image (the lab maps known images to its own workloads).
    #[serde(default)]
    pub image: String,
    /// Command.
    #[serde(default)]
    pub command: Vec<String>,
    /// Arguments.
    #[serde(default)]
    pub args: Vec<String>,
    /// Declared ports.
    #[serde(default)]
    pub ports: Vec<ContainerPort>,
}

/// A container port.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ContainerPort {
    /// Port name (for named service target ports).
    #[serde(default)]
    pub name: String,
    /// The port.
    pub container_port: u16,
    /// TCP (default), UDP or SCTP.
    #[serde(default)]
    pub protocol: String,
}

/// `Pod.status`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PodStatus {
    /// Primary IP.
    #[serde(default, rename = "podIP")]
    pub pod_ip: String,
    /// All IPs.
    #[serde(default, rename = "podIPs")]
    pub pod_ips: Vec<PodIp>,
    /// Pending, Running, Succeeded, Failed.
    #[serde(default)]
    pub phase: String,
    /// Conditions (Ready decides health).
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

/// One entry of `podIPs`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct PodIp {
    /// The address.
    pub ip: String,
}

/// A status condition.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct Condition {
    /// Condition type (`Ready`).
    #[serde(rename = "type")]
    pub kind: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
}

impl Pod {
    /// Every IP the pod has, primary first.
    pub fn ips(&self) -> Vec<String> {
        let mut out = Vec::new();
        if !self.status.pod_ip.is_empty() {
            out.push(self.status.pod_ip.clone());
        }
        for ip in &self.status.pod_ips {
            if !out.contains(&ip.ip) {
                out.push(ip.ip.clone());
            }
        }
        out
    }

    /// The service account, `default` when unset.
    pub fn service_account(&self) -> &str {
        if self.spec.service_account_name.is_empty() {
            "default"
        } else {
            &self.spec.service_account_name
        }
    }
}

/// A Service: selector, addresses, ports.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct Service {
    /// Metadata.
    pub metadata: ObjectMeta,
    /// Spec.
    #[serde(default)]
    pub spec: ServiceSpec,
}

/// `Service.spec`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpec {
    /// Pods backing it.
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
    /// The VIP (`None` for headless).
    #[serde(default, rename = "clusterIP")]
    pub cluster_ip: String,
    /// All VIPs.
    #[serde(default, rename = "clusterIPs")]
    pub cluster_ips: Vec<String>,
    /// Ports.
    #[serde(default)]
    pub ports: Vec<ServicePort>,
    /// `PreferClose` keeps traffic near the client.
    #[serde(default)]
    pub traffic_distribution: String,
}

/// A service port.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    /// Port name.
    #[serde(default)]
    pub name: String,
    /// The service port.
    pub port: u16,
    /// The pod port: a number or a container port name (defaults to `port`).
    #[serde(default)]
    pub target_port: Option<serde_json::Value>,
    /// TCP (default).
    #[serde(default)]
    pub protocol: String,
    /// `http`, `http2`, `grpc`, `tcp`, ...
    #[serde(default)]
    pub app_protocol: String,
}

/// `security.istio.io` AuthorizationPolicy.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct AuthorizationPolicy {
    /// Metadata.
    pub metadata: ObjectMeta,
    /// Spec.
    #[serde(default)]
    pub spec: AuthorizationPolicySpec,
}

/// `AuthorizationPolicy.spec`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationPolicySpec {
    /// Workloads it applies to (absent: the whole namespace, or the mesh in the root namespace).
    #[serde(default)]
    pub selector: Option<LabelSelector>,
    /// Gateways or services it applies to (waypoint policies).
    #[serde(default)]
    pub target_refs: Vec<TargetRef>,
    /// ALLOW (default), DENY, AUDIT, CUSTOM.
    #[serde(default)]
    pub action: String,
    /// Rules; absent matches nothing.
    #[serde(default)]
    pub rules: Option<Vec<AuthorizationRule>>,
}

/// A label selector (`matchLabels` only).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct LabelSelector {
    /// Labels that must all match.
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

/// A policy target.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct TargetRef {
    /// API group.
    #[serde(default)]
    pub group: String,
    /// Kind (Gateway, Service).
    #[serde(default)]
    pub kind: String,
    /// Name.
    #[serde(default)]
    pub name: String,
}

/// One rule: from, to, when.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct AuthorizationRule {
    /// Sources (any matches).
    #[serde(default)]
    pub from: Vec<RuleFrom>,
    /// Operations (any matches).
    #[serde(default)]
    pub to: Vec<RuleTo>,
    /// Conditions (all must hold).
    #[serde(default)]
    pub when: Vec<WhenCondition>,
}

/// `from` entry.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct RuleFrom {
    /// The source.
    #[serde(default)]
    pub source: Source,
}

/// `to` entry.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct RuleTo {
    /// The operation.
    #[serde(default)]
    pub operation: Operation,
}

/// A rule source.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Source {
    /// Peer identities (`td/ns/x/sa/y`).
    #[serde(default)]
    pub principals: Vec<String>,
    /// Excluded identities.
    #[serde(default)]
    pub not_principals: Vec<String>,
    /// Peer namespaces.
    #[serde(default)]
    pub namespaces: Vec<String>,
    /// Excluded namespaces.
    #[serde(default)]
    pub not_namespaces: Vec<String>,
    /// Source CIDRs.
    #[serde(default)]
    pub ip_blocks: Vec<String>,
    /// Excluded CIDRs.
    #[serde(default)]
    pub not_ip_blocks: Vec<String>,
    /// Original client CIDRs (same as ipBlocks at L4).
    #[serde(default)]
    pub remote_ip_blocks: Vec<String>,
    /// Excluded original client CIDRs.
    #[serde(default)]
    pub not_remote_ip_blocks: Vec<String>,
    /// JWT principals (L7).
    #[serde(default)]
    pub request_principals: Vec<String>,
    /// Excluded JWT principals (L7).
    #[serde(default)]
    pub not_request_principals: Vec<String>,
}

/// A rule operation.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Operation {
    /// Destination ports.
    #[serde(default)]
    pub ports: Vec<String>,
    /// Excluded ports.
    #[serde(default)]
    pub not_ports: Vec<String>,
    /// Hosts (L7).
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Excluded hosts (L7).
    #[serde(default)]
    pub not_hosts: Vec<String>,
    /// Methods (L7).
    #[serde(default)]
    pub methods: Vec<String>,
    /// Excluded methods (L7).
    #[serde(default)]
    pub not_methods: Vec<String>,
    /// Paths (L7).
    #[serde(default)]
    pub paths: Vec<String>,
    /// Excluded paths (L7).
    #[serde(default)]
    pub not_paths: Vec<String>,
}

/// A `when` condition.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WhenCondition {
    /// The attribute (`source.ip`, `destination.port`, `request.headers[...]`, ...).
    pub key: String,
    /// Accepted values.
    #[serde(default)]
    pub values: Vec<String>,
    /// Rejected values.
    #[serde(default)]
    pub not_values: Vec<String>,
}

/// `security.istio.io` PeerAuthentication.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct PeerAuthentication {
    /// Metadata.
    pub metadata: ObjectMeta,
    /// Spec.
    #[serde(default)]
    pub spec: PeerAuthenticationSpec,
}

/// `PeerAuthentication.spec`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PeerAuthenticationSpec {
    /// Workloads it applies to.
    #[serde(default)]
    pub selector: Option<LabelSelector>,
    /// The mode.
    #[serde(default)]
    pub mtls: Option<MutualTls>,
}

/// `mtls` of a PeerAuthentication.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct MutualTls {
    /// STRICT, PERMISSIVE, DISABLE or UNSET.
    #[serde(default)]
    pub mode: String,
}

/// A `discovery.k8s.io/v1` EndpointSlice (its fields are at the top level, not under `spec`).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct EndpointSlice {
    /// Metadata (label `kubernetes.io/service-name` names the Service).
    pub metadata: ObjectMeta,
    /// `IPv4`, `IPv6` or `FQDN`.
    #[serde(default)]
    pub address_type: String,
    /// Endpoints.
    #[serde(default)]
    pub endpoints: Vec<Endpoint>,
    /// Ports every endpoint serves.
    #[serde(default)]
    pub ports: Vec<EndpointPort>,
}

/// The label naming an EndpointSlice's Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

impl EndpointSlice {
    /// The Service this slice belongs to (label `kubernetes.io/service-name`).
    pub fn service_name(&self) -> Option<&str> {
        self.metadata
            .labels
            .get(SERVICE_NAME_LABEL)
            .map(String::as_str)
            .filter(|n| !n.is_empty())
    }
}

/// One endpoint of a slice.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    /// Addresses (of `addressType`); all are the same backend.
    #[serde(default)]
    pub addresses: Vec<String>,
    /// Readiness.
    #[serde(default)]
    pub conditions: EndpointConditions,
    /// Hostname.
    #[serde(default)]
    pub hostname: Option<String>,
    /// The node hosting it.
    #[serde(default)]
    pub node_name: Option<String>,
    /// Its zone.
    #[serde(default)]
    pub zone: Option<String>,
    /// The object behind it (usually a Pod).
    #[serde(default)]
    pub target_ref: Option<ObjectReference>,
}

/// `endpoints[].conditions`; an absent `ready` means ready.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct EndpointConditions {
    /// Ready for traffic.
    #[serde(default)]
    pub ready: Option<bool>,
    /// Serving (possibly while terminating).
    #[serde(default)]
    pub serving: Option<bool>,
    /// Terminating.
    #[serde(default)]
    pub terminating: Option<bool>,
}

/// A reference to another object.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct ObjectReference {
    /// Kind (`Pod`).
    #[serde(default)]
    pub kind: String,
    /// Name.
    #[serde(default)]
    pub name: String,
    /// Namespace.
    #[serde(default)]
    pub namespace: String,
    /// Uid.
    #[serde(default)]
    pub uid: String,
}

/// A port of an EndpointSlice.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct EndpointPort {
    /// Name (matches the Service port name).
    #[serde(default)]
    pub name: String,
    /// The port (absent: all ports).
    #[serde(default)]
    pub port: Option<u32>,
    /// TCP (default), UDP or SCTP.
    #[serde(default)]
    pub protocol: String,
    /// Application protocol.
    #[serde(default)]
    pub app_protocol: Option<String>,
}

/// A Node (cluster-scoped): its topology labels give workloads their locality.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct Node {
    /// Metadata.
    pub metadata: ObjectMeta,
    /// Status.
    #[serde(default)]
    pub status: NodeStatus,
}

/// Node label for the region.
pub const REGION_LABEL: &str = "topology.kubernetes.io/region";
/// Node label for the zone.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// Node label for Istio's subzone.
pub const SUBZONE_LABEL: &str = "topology.istio.io/subzone";

/// `Node.status`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct NodeStatus {
    /// Addresses.
    #[serde(default)]
    pub addresses: Vec<NodeAddress>,
}

/// A node address.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct NodeAddress {
    /// `InternalIP`, `ExternalIP`, `Hostname`, ...
    #[serde(default, rename = "type")]
    pub kind: String,
    /// The address.
    #[serde(default)]
    pub address: String,
}

/// Which object: kind, namespace, name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    /// `Pod`, `Namespace`, ...
    pub kind: String,
    /// Namespace (empty when cluster-scoped).
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl std::fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{} {}", self.kind, self.name)
        } else {
            write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
        }
    }
}

/// Any object Ambit reads.
// Objects are built once and moved into a `Cluster`: unboxed variants keep matching simple.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum Object {
    /// A namespace.
    Namespace(Namespace),
    /// A pod.
    Pod(Pod),
    /// A service.
    Service(Service),
    /// An AuthorizationPolicy.
    AuthorizationPolicy(AuthorizationPolicy),
    /// A PeerAuthentication.
    PeerAuthentication(PeerAuthentication),
    /// A Gateway API Gateway (waypoints).
    Gateway(Gateway),
    /// A Gateway API GatewayClass (cluster-scoped).
    GatewayClass(GatewayClass),
    /// A Gateway API HTTPRoute.
    HttpRoute(HttpRoute),
    /// A Gateway API GRPCRoute.
    GrpcRoute(GrpcRoute),
    /// An Istio DestinationRule.
    DestinationRule(DestinationRule),
    /// An Istio VirtualService.
    VirtualService(VirtualService),
    /// An EndpointSlice.
    EndpointSlice(EndpointSlice),
    /// A Node (cluster-scoped).
    Node(Node),
    /// A kind this crate does not model (kept so other readers can handle it).
    Other {
        /// Its key.
        key: ObjectKey,
        /// `apiVersion`.
        api_version: String,
        /// The whole document.
        value: serde_json::Value,
    },
}

impl Object {
    /// The object's key.
    pub fn key(&self) -> ObjectKey {
        match self {
            Object::Namespace(n) => ObjectKey {
                kind: "Namespace".into(),
                namespace: String::new(),
                name: n.metadata.name.clone(),
            },
            Object::Pod(p) => ObjectKey {
                kind: "Pod".into(),
                namespace: p.metadata.namespace.clone(),
                name: p.metadata.name.clone(),
            },
            Object::Service(s) => key_of("Service", &s.metadata),
            Object::AuthorizationPolicy(p) => key_of("AuthorizationPolicy", &p.metadata),
            Object::PeerAuthentication(p) => key_of("PeerAuthentication", &p.metadata),
            Object::Gateway(g) => key_of("Gateway", &g.metadata),
            Object::GatewayClass(c) => cluster_key("GatewayClass", &c.metadata),
            Object::HttpRoute(r) => key_of("HTTPRoute", &r.metadata),
            Object::GrpcRoute(r) => key_of("GRPCRoute", &r.metadata),
            Object::DestinationRule(d) => key_of("DestinationRule", &d.metadata),
            Object::VirtualService(v) => key_of("VirtualService", &v.metadata),
            Object::EndpointSlice(e) => key_of("EndpointSlice", &e.metadata),
            Object::Node(n) => cluster_key("Node", &n.metadata),
            Object::Other { key, .. } => key.clone(),
        }
    }

    /// The `apiVersion` this object is written with.
    pub fn api_version(&self) -> &str {
        match self {
            Object::Namespace(_) | Object::Pod(_) | Object::Service(_) | Object::Node(_) => "v1",
            Object::AuthorizationPolicy(_) | Object::PeerAuthentication(_) => {
                "security.istio.io/v1"
            }
            Object::Gateway(_)
            | Object::GatewayClass(_)
            | Object::HttpRoute(_)
            | Object::GrpcRoute(_) => "gateway.networking.k8s.io/v1",
            Object::DestinationRule(_) | Object::VirtualService(_) => "networking.istio.io/v1",
            Object::EndpointSlice(_) => "discovery.k8s.io/v1",
            Object::Other { api_version, .. } => api_version,
        }
    }

    /// The object as a Kubernetes document, with `apiVersion` and `kind`.
    pub fn to_value(&self) -> serde_json::Value {
        let value = match self {
            Object::Namespace(o) => serde_json::to_value(o),
            Object::Pod(o) => serde_json::to_value(o),
            Object::Service(o) => serde_json::to_value(o),
            Object::AuthorizationPolicy(o) => serde_json::to_value(o),
            Object::PeerAuthentication(o) => serde_json::to_value(o),
            Object::Gateway(o) => serde_json::to_value(o),
            Object::GatewayClass(o) => serde_json::to_value(o),
            Object::HttpRoute(o) => serde_json::to_value(o),
            Object::GrpcRoute(o) => serde_json::to_value(o),
            Object::DestinationRule(o) => serde_json::to_value(o),
            Object::VirtualService(o) => serde_json::to_value(o),
            Object::EndpointSlice(o) => serde_json::to_value(o),
            Object::Node(o) => serde_json::to_value(o),
            Object::Other { value, .. } => Ok(value.clone()),
        };
        // Plain structs with string keys always serialize.
        let mut value = value.unwrap_or_default();
        if let serde_json::Value::Object(map) = &mut value {
            map.insert("apiVersion".into(), self.api_version().into());
            map.insert("kind".into(), self.key().kind.into());
        }
        value
    }
}

fn cluster_key(kind: &str, metadata: &ObjectMeta) -> ObjectKey {
    ObjectKey {
        kind: kind.into(),
        namespace: String::new(),
        name: metadata.name.clone(),
    }
}

fn key_of(kind: &str, metadata: &ObjectMeta) -> ObjectKey {
    ObjectKey {
        kind: kind.into(),
        namespace: metadata.namespace.clone(),
        name: metadata.name.clone(),
    }
}
