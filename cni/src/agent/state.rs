//! What the agent remembers across restarts: one JSON file of known pods, written atomically, and
//! the enrollment hint the plugin reads when the agent is down.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::protocol::{EnrollmentHint, PodEvent};

/// A pod the agent knows.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PodRecord {
    /// CNI container id (the key).
    pub container_id: String,
    /// Kubernetes pod uid, when known.
    pub uid: String,
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Path of its network namespace.
    pub netns: String,
    /// IPs from the interface plugin.
    pub ips: Vec<String>,
    /// Redirection installed and ztunnel told.
    pub captured: bool,
    /// For a namespace found under `/proc` (Kubernetes mode, a pod the plugin never saw): its
    /// inode, so a reused process id is never mistaken for the pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns_inode: Option<u64>,
}

impl PodRecord {
    /// A record for a plugin event (not yet captured).
    pub fn from_event(event: &PodEvent) -> Self {
        Self {
            container_id: event.container_id.clone(),
            uid: event.pod_uid.clone(),
            namespace: event.pod_namespace.clone(),
            name: event.pod_name.clone(),
            netns: event.netns.clone(),
            ips: event.ips.clone(),
            captured: false,
            netns_inode: None,
        }
    }

    /// The uid ztunnel knows the pod by: the pod uid, or the container id without one.
    pub fn zds_uid(&self) -> String {
        if self.uid.is_empty() {
            self.container_id.clone()
        } else {
            self.uid.clone()
        }
    }
}

const PODS_FILE: &str = "pods.json";
const HINT_FILE: &str = "enrollment.json";

fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(tmp, path)
}

/// Loads the known pods (none when the file does not exist yet).
pub(crate) fn load(dir: &Path) -> anyhow::Result<Vec<PodRecord>> {
    let path = dir.join(PODS_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map_err(|e| anyhow::anyhow!("agent state {} is corrupt: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(anyhow::anyhow!(
            "reading agent state {}: {e}",
            path.display()
        )),
    }
}

pub(crate) fn save(dir: &Path, records: &[PodRecord]) -> std::io::Result<()> {
    write_atomic(
        &dir.join(PODS_FILE),
        &serde_json::to_vec_pretty(records).unwrap_or_default(),
    )
}

pub(crate) fn save_hint(dir: &Path, hint: &EnrollmentHint) -> std::io::Result<()> {
    write_atomic(
        &dir.join(HINT_FILE),
        &serde_json::to_vec_pretty(hint).unwrap_or_default(),
    )
}
