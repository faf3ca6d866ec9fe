//! The pods the checks look at: real Pods, and the pod templates of workload controllers
//! (Deployment, StatefulSet, DaemonSet, ReplicaSet, Job, CronJob). Files given to
//! `ambitctl analyze` in CI hold templates, not pods, and a selector or subset is checked against
//! what those pods will be labelled.

use std::collections::BTreeMap;

use ambit_mesh::enrollment::{Enrollment, enrollment};
use ambit_mesh::gateway_api::GATEWAY_NAME_LABEL;
use ambit_mesh::translate::Cluster;
use ambit_mesh::{Namespace, Object, Pod};

/// One pod, or the pods of one controller.
#[derive(Clone, Debug)]
pub struct Workload {
    /// `Pod ns/name` or `Deployment ns/name`.
    pub object: String,
    /// Namespace.
    pub namespace: String,
    /// The pod (for a controller: its template as a pod, named after the controller).
    pub pod: Pod,
    /// The strings of its containers' commands and arguments (and, for templates, environment
    /// values), where callers name the Services they call.
    pub mentions: Vec<String>,
}

impl Workload {
    /// Whether it is captured, by [`ambit_mesh::enrollment`] (namespace as given).
    pub fn enrollment(&self, namespace: Option<&Namespace>) -> Enrollment {
        enrollment(&self.pod, namespace)
    }

    /// Pod labels.
    pub fn labels(&self) -> &BTreeMap<String, String> {
        &self.pod.metadata.labels
    }

    /// A waypoint's own pod (never captured, and speaks mTLS with its own identity).
    pub fn is_waypoint(&self) -> bool {
        self.labels().contains_key(GATEWAY_NAME_LABEL)
    }
}

/// Kinds whose `spec.template` is a pod template (CronJob's is under `spec.jobTemplate.spec`).
const CONTROLLERS: [&str; 6] = [
    "Deployment",
    "StatefulSet",
    "DaemonSet",
    "ReplicaSet",
    "Job",
    "CronJob",
];

/// Every pod and pod template in `objects`, in object order.
pub fn collect(objects: &[Object]) -> Vec<Workload> {
    let mut out = Vec::new();
    for object in objects {
        match object {
            Object::Pod(pod) => out.push(Workload {
                object: object.key().to_string(),
                namespace: pod.metadata.namespace.clone(),
                pod: pod.clone(),
                mentions: pod
                    .spec
                    .containers
                    .iter()
                    .flat_map(|c| c.command.iter().chain(&c.args).cloned())
                    .collect(),
            }),
            Object::Other { key, value, .. } if CONTROLLERS.contains(&key.kind.as_str()) => {
                if let Some(workload) = template(key, value) {
                    out.push(workload);
                }
            }
            _ => {}
        }
    }
    out
}

fn template(key: &ambit_mesh::ObjectKey, value: &serde_json::Value) -> Option<Workload> {
    let spec = if key.kind == "CronJob" {
        &value["spec"]["jobTemplate"]["spec"]
    } else {
        &value["spec"]
    };
    let template = spec.get("template")?;
    let mut metadata = template.get("metadata").cloned().unwrap_or_default();
    if !metadata.is_object() {
        metadata = serde_json::json!({});
    }
    metadata["name"] = key.name.clone().into();
    metadata["namespace"] = key.namespace.clone().into();
    let pod_spec = template.get("spec").cloned().unwrap_or_default();
    // A template this crate cannot read as a pod is left out: the object's own schema is the
    // API server's business, and the mesh never sees a template.
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": metadata,
        "spec": if pod_spec.is_object() { pod_spec.clone() } else { serde_json::json!({}) },
    }))
    .ok()?;
    let mut mentions = Vec::new();
    for container in pod_spec["containers"].as_array().into_iter().flatten() {
        for list in ["command", "args"] {
            for item in container[list].as_array().into_iter().flatten() {
                if let Some(s) = item.as_str() {
                    mentions.push(s.to_string());
                }
            }
        }
        for env in container["env"].as_array().into_iter().flatten() {
            if let Some(s) = env["value"].as_str() {
                mentions.push(s.to_string());
            }
        }
    }
    Some(Workload {
        object: key.to_string(),
        namespace: key.namespace.clone(),
        pod,
        mentions,
    })
}

/// `cluster` with each template added as a pod (keyed `<Kind>/<name>`, so it cannot replace a
/// real pod), for the mesh functions that read pods from a [`Cluster`].
pub(crate) fn with_templates(cluster: &Cluster, workloads: &[Workload]) -> Cluster {
    let mut out = cluster.clone();
    for w in workloads {
        if w.object.starts_with("Pod ") {
            continue;
        }
        let mut pod = w.pod.clone();
        pod.metadata.name = w.object.split(' ').next().map_or_else(
            || pod.metadata.name.clone(),
            |kind| format!("{kind}/{}", pod.metadata.name),
        );
        out.insert(Object::Pod(pod));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_become_workloads_with_their_labels_and_mentions() {
        let yaml = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: shop}
spec:
  template:
    metadata: {labels: {app: web, version: v2}}
    spec:
      containers:
      - name: web
        image: web
        args: ["--backend", "http://cart.shop:8080"]
        env: [{name: DB, value: db.data.svc.cluster.local}]
---
apiVersion: batch/v1
kind: CronJob
metadata: {name: nightly, namespace: shop}
spec:
  jobTemplate:
    spec:
      template:
        metadata: {labels: {app: nightly}}
        spec: {containers: [{name: c, image: x}]}
---
apiVersion: v1
kind: Pod
metadata: {name: p, namespace: shop, labels: {app: p}}
"#;
        let (objects, errors) = ambit_mesh::parse_documents(yaml, "t.yaml");
        assert!(errors.is_empty(), "{errors:?}");
        let workloads = collect(&objects);
        let names: Vec<&str> = workloads.iter().map(|w| w.object.as_str()).collect();
        assert_eq!(
            names,
            ["Deployment shop/web", "CronJob shop/nightly", "Pod shop/p"]
        );
        assert_eq!(workloads[0].labels()["version"], "v2");
        assert_eq!(
            workloads[0].mentions,
            [
                "--backend",
                "http://cart.shop:8080",
                "db.data.svc.cluster.local"
            ]
        );
        assert_eq!(workloads[1].labels()["app"], "nightly");
        let cluster = with_templates(&Cluster::from_objects(objects), &workloads);
        assert!(
            cluster
                .pods
                .contains_key(&("shop".to_string(), "Deployment/web".to_string()))
        );
        assert!(
            cluster
                .pods
                .contains_key(&("shop".to_string(), "p".to_string()))
        );
    }
}
