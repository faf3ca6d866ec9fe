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
            Object::Other { key, .. } => key.clone(),
        }
    }
}
