//! The environment of a pod's containers (`spec.containers[].env[]` with `name` and `value`),
//! passed to the process the lab runs in the pod, e.g. `ECHO_STATUS` or `ECHO_FAIL_FRACTION`
//! for the echo workload. The typed objects of `ambit-mesh` keep only what the mesh needs, so the
//! lab reads the variables from the documents themselves and carries them on the pod in an
//! annotation until the pod is started; that annotation never reaches the config directory.

use std::path::Path;

use ambit_mesh::{Object, Pod};
use serde::Deserialize;
use serde_json::Value;

/// The annotation carrying a pod's container environment (JSON `[[name, value], ...]`).
const ENV_ANNOTATION: &str = "lab.ambit.io/env";

/// Variables of every container of a pod spec, in order; `valueFrom` entries are skipped (the
/// lab has no ConfigMaps or Secrets), and so are entries without a name.
pub(super) fn of_spec(spec: &Value) -> Vec<(String, String)> {
    spec["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|c| c["env"].as_array().into_iter().flatten())
        .filter_map(|e| {
            let name = e["name"].as_str().filter(|n| !n.is_empty())?;
            let value = match &e["value"] {
                Value::String(s) => s.clone(),
                Value::Null => return None,
                other => other.to_string(),
            };
            Some((name.to_string(), value))
        })
        .collect()
}

/// Stores `env` on `pod` until [`take`] (nothing when empty).
pub(super) fn put(pod: &mut Pod, env: &[(String, String)]) {
    if env.is_empty() {
        return;
    }
    if let Ok(text) = serde_json::to_string(env) {
        pod.metadata
            .annotations
            .insert(ENV_ANNOTATION.to_string(), text);
    }
}

/// Removes the stored environment from `pod` and returns it.
pub(super) fn take(pod: &mut Pod) -> Vec<(String, String)> {
    pod.metadata
        .annotations
        .remove(ENV_ANNOTATION)
        .and_then(|text| serde_json::from_str(&text).ok())
        .unwrap_or_default()
}

/// Every document in `text` (a `List` counts as its items).
fn documents(text: &str, out: &mut Vec<Value>) {
    for document in serde_yaml_ng::Deserializer::from_str(text) {
        let Ok(value) = Value::deserialize(document) else {
            // parse_documents has reported it already.
            return;
        };
        if value["kind"] == "List" {
            out.extend(value["items"].as_array().into_iter().flatten().cloned());
        } else {
            out.push(value);
        }
    }
}

/// The documents of a file, or of every `*.yaml`/`*.yml` file of a directory.
pub(super) fn read_documents(path: &Path) -> Vec<Value> {
    let mut out = Vec::new();
    if path.is_dir() {
        let mut files: Vec<_> = std::fs::read_dir(path)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
            .collect();
        files.sort();
        for file in files {
            if let Ok(text) = std::fs::read_to_string(&file) {
                documents(&text, &mut out);
            }
        }
    } else if let Ok(text) = std::fs::read_to_string(path) {
        documents(&text, &mut out);
    }
    out
}

/// The documents of `text`.
pub(super) fn text_documents(text: &str) -> Vec<Value> {
    let mut out = Vec::new();
    documents(text, &mut out);
    out
}

/// Gives each Pod in `objects` the container environment its document declares.
pub(super) fn attach(objects: &mut [Object], documents: &[Value]) {
    for document in documents.iter().filter(|d| d["kind"] == "Pod") {
        let env = of_spec(&document["spec"]);
        let (namespace, name) = (
            document["metadata"]["namespace"].as_str().unwrap_or(""),
            document["metadata"]["name"].as_str().unwrap_or(""),
        );
        for object in objects.iter_mut() {
            if let Object::Pod(pod) = object
                && pod.metadata.namespace == namespace
                && pod.metadata.name == name
            {
                put(pod, &env);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PODS: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: flaky, namespace: demo}
spec:
  containers:
  - name: echo
    env:
    - {name: ECHO_FAIL_FRACTION, value: "0.5"}
    - {name: ECHO_DELAY_MS, value: 20}
    - {name: FROM_SECRET, valueFrom: {secretKeyRef: {name: s, key: k}}}
  - name: sidecar
    env: [{name: OTHER, value: x}]
---
apiVersion: v1
kind: Pod
metadata: {name: plain, namespace: demo}
spec: {}
"#;

    #[test]
    fn container_env_reaches_the_pod_and_leaves_it_when_taken() {
        let (mut objects, errors) = ambit_mesh::parse_documents(PODS, "pods");
        assert!(errors.is_empty(), "{errors:?}");
        attach(&mut objects, &text_documents(PODS));
        let Object::Pod(flaky) = &mut objects[0] else {
            panic!()
        };
        let env = take(flaky);
        assert_eq!(
            env,
            vec![
                ("ECHO_FAIL_FRACTION".to_string(), "0.5".to_string()),
                ("ECHO_DELAY_MS".to_string(), "20".to_string()),
                ("OTHER".to_string(), "x".to_string()),
            ]
        );
        assert!(flaky.metadata.annotations.is_empty());
        let Object::Pod(plain) = &mut objects[1] else {
            panic!()
        };
        assert!(plain.metadata.annotations.is_empty());
        assert!(take(plain).is_empty());
    }
}
