//! The plugin ↔ agent exchange: one JSON object per line over a Unix stream socket. The plugin
//! sends a [`PodEvent`], the agent answers with a [`Verdict`].

use serde::{Deserialize, Serialize};

/// Default agent socket.
pub const DEFAULT_AGENT_SOCKET: &str = "/var/run/ambit/cni.sock";
/// Default file where the agent publishes which namespaces and pods are ambient, read by the
/// plugin only when the agent is unreachable.
pub const DEFAULT_ENROLLMENT_FILE: &str = "/var/run/ambit/enrollment.json";

/// What happened to a pod, as the runtime told the plugin.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PodEvent {
    /// `ADD`, `DEL` or `CHECK`.
    pub command: String,
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `CNI_NETNS`: path of the pod's network namespace.
    pub netns: String,
    /// Pod namespace (`K8S_POD_NAMESPACE`).
    pub pod_namespace: String,
    /// Pod name (`K8S_POD_NAME`).
    pub pod_name: String,
    /// Pod uid (`K8S_POD_UID`), when the runtime passes it.
    #[serde(default)]
    pub pod_uid: String,
    /// The pod's IPs from the previous plugin's result.
    #[serde(default)]
    pub ips: Vec<String>,
}

/// The agent's answer.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Verdict {
    /// The pod is in the ambient mesh.
    pub ambient: bool,
    /// Its traffic is redirected to ztunnel.
    pub captured: bool,
    /// Why (enrollment reason or what failed).
    pub reason: String,
    /// Set when the agent could not do what the pod needs; the plugin fails the pod with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What the agent publishes for the plugin's agent-down fallback.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct EnrollmentHint {
    /// Namespaces labelled ambient.
    pub ambient_namespaces: Vec<String>,
    /// `namespace/name` of pods labelled ambient themselves.
    pub ambient_pods: Vec<String>,
    /// `namespace/name` of pods opting out.
    pub opted_out_pods: Vec<String>,
}

impl EnrollmentHint {
    /// Whether `namespace/name` is ambient according to the hint.
    pub fn is_ambient(&self, namespace: &str, name: &str) -> bool {
        let key = format!("{namespace}/{name}");
        if self.opted_out_pods.contains(&key) {
            return false;
        }
        self.ambient_pods.contains(&key) || self.ambient_namespaces.iter().any(|n| n == namespace)
    }
}
