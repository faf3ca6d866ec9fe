//! istiod-lite's waypoint controller against the scripted API server: a Gateway of class
//! istio-waypoint gets its ServiceAccount, Service and Deployment (server-side applied, owned by
//! the Gateway) and its status (address, Accepted, Programmed); an unchanged world makes no
//! writes; a changed Gateway is re-applied; a deleted one is no longer reconciled. Routes with
//! Service parents get Accepted and ResolvedRefs, bound Services istio.io/WaypointBound.

mod support;
use support::{Serving, eventually, kube_client, refused};

use std::time::Duration;

use ambit_fake_apiserver::FakeApiServer;
use ambit_mesh::translate::MeshSettings;
use istiod_lite::waypoint_controller::{Controller, WaypointSettings, WaypointTracing};
use serde_json::{Value, json};

const GW: &str = "gateway.networking.k8s.io/v1";

fn settings() -> WaypointSettings {
    WaypointSettings {
        image: "registry.test/ambit/waypoint:test".into(),
        xds_address: "https://istiod.istio-system.svc:15012".into(),
        mesh: MeshSettings::default(),
        tracing: Some(WaypointTracing {
            endpoint: "http://otel-collector.observability:4318".into(),
            sampling: 2.5,
        }),
    }
}

fn namespace(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
}

fn waypoint(labels: Value) -> Value {
    json!({
        "apiVersion": GW, "kind": "Gateway",
        "metadata": {"name": "wp", "namespace": "demo", "labels": {"istio.io/waypoint-for": "service"}},
        "spec": {
            "gatewayClassName": "istio-waypoint",
            "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}],
            "infrastructure": {"labels": labels, "annotations": {"team.example/owner": "payments"}},
        },
    })
}

fn service(name: &str, labels: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "demo", "labels": labels},
        "spec": {"clusterIP": "10.96.0.10", "selector": {"app": name}, "ports": [{"name": "http", "port": 80}]},
    })
}

/// A controller on `server` with its cache fed and listed.
async fn controller(server: &FakeApiServer) -> (Controller, tokio::task::JoinHandle<()>) {
    let (controller, feed) = Controller::new(kube_client(server).await, settings());
    let task = tokio::spawn(feed);
    eventually("the controller's cache lists every kind", || {
        controller.cache().synced()
    })
    .await;
    (controller, task)
}

/// Reconciles until a reconcile makes no write (the cache having seen the previous writes).
async fn settle(controller: &Controller) {
    let mut changes = controller.cache().subscribe();
    for _ in 0..50 {
        changes.borrow_and_update();
        let made = controller.reconcile().await.expect("writes accepted");
        if made == 0 {
            return;
        }
        // Our own writes come back through the watches.
        let _ = tokio::time::timeout(Duration::from_secs(2), changes.changed()).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the controller kept writing");
}

fn patches(server: &FakeApiServer) -> usize {
    server
        .requests()
        .iter()
        .filter(|r| r.method == "PATCH")
        .count()
}

fn condition<'a>(conditions: &'a Value, kind: &str) -> &'a Value {
    conditions
        .as_array()
        .and_then(|list| list.iter().find(|c| c["type"] == kind))
        .unwrap_or_else(|| panic!("no {kind} condition in {conditions}"))
}

fn env<'a>(container: &'a Value, name: &str) -> &'a Value {
    container["env"]
        .as_array()
        .and_then(|list| list.iter().find(|e| e["name"] == name))
        .unwrap_or_else(|| panic!("no env {name}"))
}

#[tokio::test]
async fn a_waypoint_gateway_is_deployed_owned_and_reported_and_then_left_alone() {
    let server = FakeApiServer::start().await;
    server.apply(namespace("demo"));
    let gateway = server.apply(waypoint(json!({"team": "payments"})));
    let uid = gateway["metadata"]["uid"].as_str().unwrap().to_string();
    let (controller, _feed) = controller(&server).await;
    settle(&controller).await;

    // Three objects, server-side applied by istiod-lite, owned by the Gateway.
    let applies: Vec<_> = server
        .requests()
        .into_iter()
        .filter(|r| r.method == "PATCH" && !r.path.ends_with("/status"))
        .collect();
    assert!(
        applies
            .iter()
            .all(|r| r.query.get("fieldManager").map(String::as_str) == Some("istiod-lite")),
        "{applies:?}"
    );
    let get = |api: &str, kind: &str| {
        server
            .get(api, kind, "demo", "wp")
            .unwrap_or_else(|| panic!("{kind} demo/wp was not created"))
    };
    let account = get("v1", "ServiceAccount");
    let service = get("v1", "Service");
    let deployment = get("apps/v1", "Deployment");
    for object in [&account, &service, &deployment] {
        let owner = &object["metadata"]["ownerReferences"][0];
        assert_eq!(owner["kind"], "Gateway");
        assert_eq!(owner["name"], "wp");
        assert_eq!(owner["uid"], uid.as_str());
        let labels = &object["metadata"]["labels"];
        assert_eq!(labels["gateway.networking.k8s.io/gateway-name"], "wp");
        assert_eq!(labels["team"], "payments", "infrastructure labels copied");
        assert_eq!(
            object["metadata"]["annotations"]["team.example/owner"],
            "payments"
        );
    }

    let ports: Vec<(String, u64)> = service["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap().to_string(),
                p["port"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        ports,
        [
            ("mesh".to_string(), 15008),
            ("status-port".to_string(), 15021)
        ]
    );
    assert_eq!(
        service["spec"]["selector"],
        json!({"gateway.networking.k8s.io/gateway-name": "wp"})
    );

    let spec = &deployment["spec"];
    assert_eq!(spec["replicas"], 1);
    let pod = &spec["template"];
    assert_eq!(pod["metadata"]["labels"]["istio.io/dataplane-mode"], "none");
    assert_eq!(
        pod["metadata"]["labels"]["gateway.networking.k8s.io/gateway-name"],
        "wp"
    );
    assert_eq!(
        pod["metadata"]["annotations"]["prometheus.io/port"],
        "15020"
    );
    assert_eq!(
        pod["metadata"]["annotations"]["prometheus.io/scrape"],
        "true"
    );
    assert_eq!(pod["spec"]["serviceAccountName"], "wp");
    let container = &pod["spec"]["containers"][0];
    assert_eq!(container["name"], "waypoint");
    assert_eq!(container["image"], "registry.test/ambit/waypoint:test");
    for (name, path) in [
        ("POD_NAME", "metadata.name"),
        ("POD_NAMESPACE", "metadata.namespace"),
        ("SERVICE_ACCOUNT", "spec.serviceAccountName"),
        ("NODE_NAME", "spec.nodeName"),
        ("INSTANCE_IP", "status.podIP"),
    ] {
        assert_eq!(
            env(container, name)["valueFrom"]["fieldRef"]["fieldPath"],
            path
        );
    }
    for (name, value) in [
        ("XDS_ADDRESS", "https://istiod.istio-system.svc:15012"),
        ("XDS_ROOT_CA", "/var/run/secrets/istio/root-cert.pem"),
        ("AUTH_TOKEN", "/var/run/secrets/tokens/istio-token"),
        ("GATEWAY_NAME", "wp"),
        ("GATEWAY_NAMESPACE", "demo"),
        ("TRUST_DOMAIN", "cluster.local"),
        ("CLUSTER_ID", "Kubernetes"),
        ("HBONE_ADDR", "[::]:15008"),
        ("READINESS_ADDR", "[::]:15021"),
        // The trace export configured for every waypoint.
        (
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "http://otel-collector.observability:4318",
        ),
        ("TRACE_SAMPLING", "2.5"),
    ] {
        assert_eq!(env(container, name)["value"], value, "{name}");
    }
    let container_ports: Vec<u64> = container["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["containerPort"].as_u64().unwrap())
        .collect();
    assert_eq!(container_ports, [15008, 15020, 15021]);
    assert_eq!(
        container["readinessProbe"]["httpGet"],
        json!({"path": "/healthz/ready", "port": 15021, "scheme": "HTTP"})
    );
    assert_eq!(
        container["resources"],
        json!({"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"cpu": "2", "memory": "1Gi"}})
    );
    let security = &container["securityContext"];
    assert_eq!(security["runAsNonRoot"], true);
    assert_eq!(security["readOnlyRootFilesystem"], true);
    assert_eq!(security["capabilities"]["drop"], json!(["ALL"]));
    let volumes = pod["spec"]["volumes"].as_array().unwrap();
    let token = volumes.iter().find(|v| v["name"] == "istio-token").unwrap();
    assert_eq!(
        token["projected"]["sources"][0]["serviceAccountToken"]["audience"],
        "istio-ca"
    );
    let root = volumes
        .iter()
        .find(|v| v["name"] == "istiod-ca-cert")
        .unwrap();
    assert_eq!(root["configMap"]["name"], "istio-ca-root-cert");
    let mounts = container["volumeMounts"].as_array().unwrap();
    assert!(
        mounts
            .iter()
            .any(|m| m["name"] == "istio-token" && m["mountPath"] == "/var/run/secrets/tokens")
    );

    // Status: the Service's name as address, accepted, not programmed before a replica is up.
    let status = &server.get(GW, "Gateway", "demo", "wp").unwrap()["status"];
    assert_eq!(
        status["addresses"],
        json!([{"type": "Hostname", "value": "wp.demo.svc.cluster.local"}])
    );
    let accepted = condition(&status["conditions"], "Accepted");
    assert_eq!(accepted["status"], "True");
    assert_eq!(accepted["observedGeneration"], 1);
    let programmed = condition(&status["conditions"], "Programmed");
    assert_eq!(programmed["status"], "False");
    assert_eq!(programmed["reason"], "Pending");

    // The deployment controller reports an available replica: programmed.
    let mut ready = server.get("apps/v1", "Deployment", "demo", "wp").unwrap();
    ready["status"] = json!({"replicas": 1, "availableReplicas": 1});
    server.apply(ready);
    eventually("the cache sees the replica", || {
        controller
            .cache()
            .get("Deployment", "demo", "wp")
            .is_some_and(|d| d["status"]["availableReplicas"] == 1)
    })
    .await;
    settle(&controller).await;
    let status = &server.get(GW, "Gateway", "demo", "wp").unwrap()["status"];
    let programmed = condition(&status["conditions"], "Programmed");
    assert_eq!(programmed["status"], "True", "{programmed}");
    assert_eq!(programmed["reason"], "Programmed");

    // Nothing changed: nothing written.
    let before = patches(&server);
    assert_eq!(controller.reconcile().await.expect("reconcile"), 0);
    assert_eq!(
        patches(&server),
        before,
        "an unchanged world is not written"
    );

    // A changed Gateway is applied again.
    server.apply(waypoint(json!({"team": "checkout"})));
    eventually("the cache sees the change", || {
        controller
            .cache()
            .get("Gateway", "demo", "wp")
            .is_some_and(|g| g["spec"]["infrastructure"]["labels"]["team"] == "checkout")
    })
    .await;
    settle(&controller).await;
    let deployment = server.get("apps/v1", "Deployment", "demo", "wp").unwrap();
    assert_eq!(deployment["metadata"]["labels"]["team"], "checkout");
    assert_eq!(
        deployment["spec"]["template"]["metadata"]["labels"]["team"],
        "checkout"
    );
    let status = &server.get(GW, "Gateway", "demo", "wp").unwrap()["status"];
    assert_eq!(
        condition(&status["conditions"], "Accepted")["observedGeneration"],
        2
    );

    // Deleted: its objects are collected and not made again.
    server.delete(GW, "Gateway", "demo", "wp");
    eventually("the cache sees the deletion", || {
        controller.cache().get("Gateway", "demo", "wp").is_none()
            && controller.cache().get("Deployment", "demo", "wp").is_none()
    })
    .await;
    let before = patches(&server);
    assert_eq!(controller.reconcile().await.expect("reconcile"), 0);
    assert_eq!(patches(&server), before);
    for (api, kind) in [
        ("v1", "ServiceAccount"),
        ("v1", "Service"),
        ("apps/v1", "Deployment"),
    ] {
        assert!(server.get(api, kind, "demo", "wp").is_none(), "{kind} left");
    }
}

#[tokio::test]
async fn routes_and_bound_services_get_their_conditions() {
    let server = FakeApiServer::start().await;
    server.apply(namespace("demo"));
    server.apply(waypoint(json!({})));
    server.apply(service("echo", json!({"istio.io/use-waypoint": "wp"})));
    server.apply(service("lost", json!({"istio.io/use-waypoint": "nowhere"})));
    server.apply(service("plain", json!({})));
    server.apply(json!({
        "apiVersion": GW, "kind": "HTTPRoute",
        "metadata": {"name": "canary", "namespace": "demo"},
        "spec": {
            "parentRefs": [{"group": "", "kind": "Service", "name": "echo", "port": 80}],
            "rules": [{"backendRefs": [{"name": "echo", "port": 80}, {"name": "missing", "port": 80}]}],
        },
        "status": {"parents": [{
            "parentRef": {"name": "edge"},
            "controllerName": "example.com/other",
            "conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted", "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"}],
        }]},
    }));
    let (controller, _feed) = controller(&server).await;
    let run = tokio::spawn(controller.clone().run(Duration::from_millis(20)));
    // The running controller reconciles on the cache's changes (the first list among them).
    server.apply(namespace("other"));

    eventually("the route's parent status", || {
        server
            .get(GW, "HTTPRoute", "demo", "canary")
            .is_some_and(|r| {
                r["status"]["parents"].as_array().is_some_and(|p| {
                    p.iter()
                        .any(|p| p["controllerName"] == "istio.io/gateway-controller")
                })
            })
    })
    .await;
    // The waypoint becomes usable once its address is written; the route is then accepted.
    eventually("the route accepted by the bound waypoint", || {
        server
            .get(GW, "HTTPRoute", "demo", "canary")
            .is_some_and(|r| {
                r["status"]["parents"].as_array().is_some_and(|p| {
                    p.iter().any(|p| {
                        p["controllerName"] == "istio.io/gateway-controller"
                            && condition(&p["conditions"], "Accepted")["status"] == "True"
                    })
                })
            })
    })
    .await;
    let route = server.get(GW, "HTTPRoute", "demo", "canary").unwrap();
    let parents = route["status"]["parents"].as_array().unwrap();
    assert_eq!(parents.len(), 2, "{parents:?}");
    assert_eq!(parents[0]["controllerName"], "example.com/other", "kept");
    let ours = &parents[1];
    assert_eq!(
        ours["parentRef"],
        json!({"group": "", "kind": "Service", "name": "echo", "port": 80})
    );
    let resolved = condition(&ours["conditions"], "ResolvedRefs");
    assert_eq!(resolved["status"], "False");
    assert_eq!(resolved["reason"], "BackendNotFound");
    assert!(
        resolved["message"]
            .as_str()
            .unwrap()
            .contains("demo/missing"),
        "{resolved}"
    );
    assert_eq!(
        condition(&ours["conditions"], "Accepted")["observedGeneration"],
        1
    );

    // False until the waypoint has its address, then True.
    eventually("WaypointBound on the bound Service", || {
        server
            .get("v1", "Service", "demo", "echo")
            .is_some_and(|s| {
                s["status"]["conditions"].as_array().is_some_and(|c| {
                    c.iter()
                        .any(|c| c["type"] == "istio.io/WaypointBound" && c["status"] == "True")
                })
            })
    })
    .await;
    let echo = server.get("v1", "Service", "demo", "echo").unwrap();
    let bound = condition(&echo["status"]["conditions"], "istio.io/WaypointBound");
    assert_eq!(bound["status"], "True", "{bound}");
    let time = bound["lastTransitionTime"].as_str().unwrap();
    assert!(time.len() == 20 && time.ends_with('Z'), "{time}");
    assert!(
        bound["message"].as_str().unwrap().contains("demo/wp"),
        "{bound}"
    );
    let lost = server.get("v1", "Service", "demo", "lost").unwrap();
    let unbound = condition(&lost["status"]["conditions"], "istio.io/WaypointBound");
    assert_eq!(unbound["status"], "False");
    assert_eq!(unbound["reason"], "WaypointIsNotReady");
    assert!(
        unbound["message"]
            .as_str()
            .unwrap()
            .contains("does not exist"),
        "{unbound}"
    );
    let plain = server.get("v1", "Service", "demo", "plain").unwrap();
    assert!(plain["status"]["conditions"].is_null(), "{plain}");

    // Unbound: the condition goes (the rest of the status stays).
    let mut relabelled = server.get("v1", "Service", "demo", "echo").unwrap();
    relabelled["metadata"]["labels"] = json!({});
    server.apply(relabelled);
    eventually("WaypointBound removed", || {
        server
            .get("v1", "Service", "demo", "echo")
            .is_some_and(|s| {
                s["status"]["conditions"]
                    .as_array()
                    .is_some_and(|c| c.iter().all(|c| c["type"] != "istio.io/WaypointBound"))
            })
    })
    .await;
    run.abort();
}

#[test]
fn waypoint_flags_need_kubernetes_mode() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path().to_str().unwrap();
    let text = refused(&["--config-dir", dir, "--waypoint-image", "x/waypoint:1"]);
    assert!(
        text.contains("--waypoint-image needs --kubernetes"),
        "{text}"
    );
}

#[tokio::test]
async fn the_binary_in_kubernetes_mode_deploys_waypoints_with_the_image_given() {
    let server = FakeApiServer::start().await;
    server.apply(namespace("demo"));
    server.apply(waypoint(json!({})));
    let mut serving = Serving::start(&[
        "--kubernetes",
        "--kube-url",
        &server.url(),
        "--waypoint-image",
        "registry.test/waypoint:cli",
    ])
    .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    let image = loop {
        if let Some(d) = server.get("apps/v1", "Deployment", "demo", "wp") {
            break d["spec"]["template"]["spec"]["containers"][0]["image"].clone();
        }
        serving.assert_running();
        assert!(
            tokio::time::Instant::now() < deadline,
            "no Deployment demo/wp within 90s; istiod-lite printed: {}\nrequests: {:#?}",
            serving.stderr(),
            server.requests()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(image, "registry.test/waypoint:cli");
}

fn policy(name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": "demo"},
        "spec": spec,
    })
}

fn policy_condition(server: &FakeApiServer, name: &str, kind: &str) -> Option<Value> {
    let policy = server.get("security.istio.io/v1", "AuthorizationPolicy", "demo", name)?;
    policy["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == kind)
        .cloned()
}

/// AuthorizationPolicies say who enforces them, as Istio's do: ZtunnelAccepted for policies
/// ztunnel enforces (with the HTTP attributes it leaves out), WaypointAccepted for targetRefs
/// (bound to which waypoint, or why not), each for the generation it describes; fixing a policy
/// updates its condition.
#[tokio::test]
async fn authorization_policies_say_who_enforces_them() {
    let server = FakeApiServer::start().await;
    server.apply(namespace("demo"));
    server.apply(waypoint(json!({})));
    server.apply(service("echo", json!({"istio.io/use-waypoint": "wp"})));
    server.apply(service("plain", json!({})));
    server.apply(policy(
        "l4",
        json!({"rules": [{"from": [{"source": {"namespaces": ["demo"]}}]}]}),
    ));
    server.apply(policy(
        "l7-on-ztunnel",
        json!({"selector": {"matchLabels": {"app": "echo"}}, "rules": [{"to": [{"operation": {"methods": ["GET"]}}]}]}),
    ));
    server.apply(policy(
        "on-echo",
        json!({"targetRefs": [{"kind": "Service", "group": "", "name": "echo"}], "rules": [{"to": [{"operation": {"paths": ["/admin"]}}]}], "action": "DENY"}),
    ));
    server.apply(policy(
        "on-plain",
        json!({"targetRefs": [{"kind": "Service", "group": "", "name": "plain"}]}),
    ));
    let (controller, _feed) = controller(&server).await;
    let run = tokio::spawn(controller.clone().run(Duration::from_millis(20)));
    server.apply(namespace("other"));

    eventually("every policy's condition", || {
        policy_condition(&server, "l4", "ZtunnelAccepted").is_some()
            && policy_condition(&server, "l7-on-ztunnel", "ZtunnelAccepted").is_some()
            && policy_condition(&server, "on-plain", "WaypointAccepted").is_some()
            // Bound once the waypoint has its address.
            && policy_condition(&server, "on-echo", "WaypointAccepted")
                .is_some_and(|c| c["status"] == "True")
    })
    .await;
    let l4 = policy_condition(&server, "l4", "ZtunnelAccepted").unwrap();
    let generation = server
        .get("security.istio.io/v1", "AuthorizationPolicy", "demo", "l4")
        .unwrap()["metadata"]["generation"]
        .clone();
    assert!(generation.is_i64(), "the API server sets a generation");
    assert_eq!(
        (
            &l4["status"],
            &l4["reason"],
            &l4["message"],
            &l4["observedGeneration"]
        ),
        (
            &json!("True"),
            &json!("Accepted"),
            &json!("attached to ztunnel"),
            &generation
        )
    );
    let l7 = policy_condition(&server, "l7-on-ztunnel", "ZtunnelAccepted").unwrap();
    assert_eq!(
        (&l7["status"], &l7["reason"]),
        (&json!("True"), &json!("UnsupportedValue"))
    );
    let message = l7["message"].as_str().unwrap();
    assert!(
        message.contains("found: methods") && message.contains("waypoint"),
        "{message}"
    );
    let on_echo = policy_condition(&server, "on-echo", "WaypointAccepted").unwrap();
    assert_eq!(on_echo["reason"], "Accepted");
    assert!(
        on_echo["message"].as_str().unwrap().contains("demo/wp"),
        "{on_echo}"
    );
    assert!(policy_condition(&server, "on-echo", "ZtunnelAccepted").is_none());
    let on_plain = policy_condition(&server, "on-plain", "WaypointAccepted").unwrap();
    assert_eq!(
        (&on_plain["status"], &on_plain["reason"]),
        (&json!("False"), &json!("AncestorNotBound"))
    );

    // Fixed: bind plain to the waypoint, and the policy's condition follows.
    server.apply(service("plain", json!({"istio.io/use-waypoint": "wp"})));
    eventually("the policy on plain accepted", || {
        policy_condition(&server, "on-plain", "WaypointAccepted")
            .is_some_and(|c| c["status"] == "True" && c["reason"] == "Accepted")
    })
    .await;
    run.abort();
}
