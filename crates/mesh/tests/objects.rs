//! Parsing cluster YAML: typed objects, errors naming file, document, object and field, one bad
//! object never hiding the others; and the ambient enrollment rules.

use ambit_mesh::enrollment::{Enrollment, enrollment};
use ambit_mesh::{Object, parse_documents};

const DEMO: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: demo
  labels: {istio.io/dataplane-mode: ambient}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: demo, labels: {app: client}}
spec: {nodeName: node-1, serviceAccountName: client}
status: {podIP: 10.10.1.2}
---
apiVersion: v1
kind: Pod
metadata: {name: opted-out, namespace: demo, labels: {istio.io/dataplane-mode: none}}
spec: {nodeName: node-1}
---
apiVersion: v1
kind: Pod
metadata: {name: Bad_Name, namespace: demo}
---
apiVersion: v1
kind: Pod
metadata: {name: bad-ip, namespace: demo}
status: {podIP: 10.10.1.300}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow, namespace: demo}
"#;

#[test]
fn typed_objects_and_errors_that_name_the_object_and_field() {
    let (objects, errors) = parse_documents(DEMO, "demo.yaml");
    let keys: Vec<String> = objects.iter().map(|o| o.key().to_string()).collect();
    assert_eq!(
        keys,
        [
            "Namespace demo",
            "Pod demo/client",
            "Pod demo/opted-out",
            "AuthorizationPolicy demo/allow"
        ]
    );
    let messages: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
    assert_eq!(
        messages,
        [
            "demo.yaml doc 4: Pod demo/Bad_Name: metadata.name: \"Bad_Name\" is not a valid name (lowercase letters, digits, '-' and '.')",
            "demo.yaml doc 5: Pod demo/bad-ip: status.podIP: \"10.10.1.300\" is not an IP address",
        ]
    );
    let Object::Pod(client) = &objects[1] else {
        panic!()
    };
    assert_eq!(client.ips(), ["10.10.1.2"]);
    assert_eq!(client.service_account(), "client");
}

#[test]
fn enrollment_follows_istio_labels() {
    let (objects, _) = parse_documents(DEMO, "demo.yaml");
    let Object::Namespace(demo) = &objects[0] else {
        panic!()
    };
    let pod = |i: usize| match &objects[i] {
        Object::Pod(p) => p.clone(),
        _ => panic!(),
    };
    assert_eq!(enrollment(&pod(1), Some(demo)), Enrollment::NamespaceLabel);
    assert_eq!(enrollment(&pod(2), Some(demo)), Enrollment::PodOptOut);
    assert_eq!(enrollment(&pod(1), None), Enrollment::NotLabelled);
    let mut labelled = pod(1);
    labelled
        .metadata
        .labels
        .insert("istio.io/dataplane-mode".into(), "ambient".into());
    assert_eq!(enrollment(&labelled, None), Enrollment::PodLabel);
    let mut host = pod(1);
    host.spec.host_network = true;
    assert_eq!(enrollment(&host, Some(demo)), Enrollment::HostNetwork);
    assert!(!Enrollment::HostNetwork.is_ambient());
}

#[test]
fn broken_yaml_is_reported_with_its_document() {
    let (objects, errors) = parse_documents(
        "kind: Namespace\napiVersion: v1\nmetadata: {name: a}\n---\nkind: [",
        "x.yaml",
    );
    assert_eq!(objects.len(), 1);
    assert_eq!(errors.len(), 1);
    assert!(
        errors[0]
            .to_string()
            .starts_with("x.yaml doc 2: ?: -: not valid YAML"),
        "{}",
        errors[0]
    );
}

#[test]
fn api_server_objects_parse_one_at_a_time_and_maintain_a_cluster() {
    use ambit_mesh::translate::Cluster;
    let pod = serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "web-0", "namespace": "shop", "resourceVersion": "42",
                     "managedFields": [{"manager": "kubelet"}]},
        "spec": {"nodeName": "node-1", "serviceAccountName": "web"},
        "status": {"podIP": "10.0.0.7", "phase": "Running"}
    });
    let (objects, errors) = ambit_mesh::parse_object(pod, "Kubernetes");
    assert!(errors.is_empty(), "{errors:?}");
    let mut cluster = Cluster::default();
    let key = objects[0].key();
    cluster.insert(objects.into_iter().next().unwrap());
    assert_eq!(cluster.pods.len(), 1);

    let bad = serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "web-1", "namespace": "shop"},
        "status": {"podIP": "10.0.0.300"}
    });
    let (objects, errors) = ambit_mesh::parse_object(bad, "Kubernetes");
    assert!(objects.is_empty());
    assert_eq!(
        errors[0].to_string(),
        "Kubernetes: Pod shop/web-1: status.podIP: \"10.0.0.300\" is not an IP address"
    );

    assert!(cluster.remove(&key));
    assert!(!cluster.remove(&key));
    assert!(cluster.pods.is_empty());
}
