//! kube-rs against the fake API server's controller-facing parts: server-side apply by field
//! manager, the status subresource, `metadata.generation`, and garbage collection through
//! `ownerReferences`.

use ambit_fake_apiserver::FakeApiServer;
use k8s_openapi::api::core::v1::{Service, ServiceAccount};
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::{Client, Config, ResourceExt};
use serde_json::json;

fn client(server: &FakeApiServer) -> Client {
    let config = Config::new(server.url().parse().expect("server URL"));
    Client::try_from(config).expect("kube client")
}

#[tokio::test]
async fn server_side_apply_creates_merges_and_drops_what_the_manager_stopped_applying() {
    let server = FakeApiServer::start().await;
    let api: Api<ServiceAccount> = Api::namespaced(client(&server), "demo");
    let params = PatchParams::apply("istiod-lite").force();
    let first = json!({
        "apiVersion": "v1", "kind": "ServiceAccount",
        "metadata": {"name": "wp", "labels": {"a": "1", "b": "2"}},
    });
    let created = api
        .patch("wp", &params, &Patch::Apply(&first))
        .await
        .expect("apply creates");
    assert_eq!(created.labels().get("b").map(String::as_str), Some("2"));
    assert_eq!(created.metadata.namespace.as_deref(), Some("demo"));

    // Someone else's label survives; the label the manager stopped applying goes.
    let merge = json!({"metadata": {"labels": {"theirs": "x"}}});
    api.patch("wp", &PatchParams::default(), &Patch::Merge(&merge))
        .await
        .expect("merge patch");
    let second = json!({
        "apiVersion": "v1", "kind": "ServiceAccount",
        "metadata": {"name": "wp", "labels": {"a": "1"}},
    });
    let applied = api
        .patch("wp", &params, &Patch::Apply(&second))
        .await
        .expect("apply updates");
    let labels = applied.labels();
    assert_eq!(labels.get("a").map(String::as_str), Some("1"));
    assert_eq!(labels.get("b"), None);
    assert_eq!(labels.get("theirs").map(String::as_str), Some("x"));
    let last = server.requests().into_iter().last().expect("requests");
    assert_eq!(last.method, "PATCH");
    assert_eq!(
        last.query.get("fieldManager").map(String::as_str),
        Some("istiod-lite")
    );

    match api
        .patch("wp", &PatchParams::default(), &Patch::Apply(&second))
        .await
    {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 400, "{s:?}"),
        other => panic!("an apply without a field manager must fail, got {other:?}"),
    }
}

#[tokio::test]
async fn status_writes_change_only_status_and_generation_counts_spec_changes() {
    let server = FakeApiServer::start().await;
    let stored = server.apply(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "echo", "namespace": "demo"},
        "spec": {"ports": [{"port": 80}]},
    }));
    assert_eq!(stored["metadata"]["generation"], 1);
    let api: Api<Service> = Api::namespaced(client(&server), "demo");
    let patch = json!({
        "metadata": {"labels": {"ignored": "yes"}},
        "spec": {"ports": [{"port": 81}]},
        "status": {"conditions": [{"type": "Ready", "status": "True", "reason": "R", "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"}]},
    });
    let patched = api
        .patch_status("echo", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("status patch");
    assert!(patched.labels().is_empty());
    assert_eq!(
        patched.spec.as_ref().unwrap().ports.as_ref().unwrap()[0].port,
        80
    );
    let conditions = patched.status.unwrap().conditions.unwrap();
    assert_eq!(conditions[0].type_, "Ready");
    assert_eq!(patched.metadata.generation, Some(1), "status is not spec");

    let spec = json!({"spec": {"ports": [{"port": 82}]}});
    let patched = api
        .patch("echo", &PatchParams::default(), &Patch::Merge(&spec))
        .await
        .expect("spec patch");
    assert_eq!(patched.metadata.generation, Some(2));
}

#[tokio::test]
async fn deleting_an_owner_collects_its_dependents() {
    let server = FakeApiServer::start().await;
    let gateway = server.apply(json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
        "metadata": {"name": "wp", "namespace": "demo"},
        "spec": {"gatewayClassName": "istio-waypoint"},
    }));
    let owner = json!([{
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
        "name": "wp", "uid": gateway["metadata"]["uid"],
    }]);
    for (api_version, kind) in [("v1", "ServiceAccount"), ("apps/v1", "Deployment")] {
        server.apply(json!({
            "apiVersion": api_version, "kind": kind,
            "metadata": {"name": "wp", "namespace": "demo", "ownerReferences": owner},
        }));
    }
    server.apply(json!({
        "apiVersion": "v1", "kind": "ServiceAccount",
        "metadata": {"name": "unowned", "namespace": "demo"},
    }));
    let api: Api<kube::api::DynamicObject> = Api::namespaced_with(
        client(&server),
        "demo",
        &kube::api::ApiResource {
            group: "gateway.networking.k8s.io".into(),
            version: "v1".into(),
            api_version: "gateway.networking.k8s.io/v1".into(),
            kind: "Gateway".into(),
            plural: "gateways".into(),
        },
    );
    api.delete("wp", &DeleteParams::default())
        .await
        .expect("delete");
    assert!(server.get("v1", "ServiceAccount", "demo", "wp").is_none());
    assert!(server.get("apps/v1", "Deployment", "demo", "wp").is_none());
    assert!(
        server
            .get("v1", "ServiceAccount", "demo", "unowned")
            .is_some()
    );
}
