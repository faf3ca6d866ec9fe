//! Typed objects with the Kubernetes field names (camelCase) for exactly the fields Ambit uses.
//! Unknown fields are ignored, as a Kubernetes client would.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

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
            Object::Other { key, .. } => key.clone(),
        }
    }
}

fn key_of(kind: &str, metadata: &ObjectMeta) -> ObjectKey {
    ObjectKey {
        kind: kind.into(),
        namespace: metadata.namespace.clone(),
        name: metadata.name.clone(),
    }
}
