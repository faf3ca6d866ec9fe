//! istiod-lite reading the cluster from Kubernetes, against the scripted API server: objects
//! become workload-API resources in the store (translated once for the initial sync, bursts
//! coalesced), label changes re-translate, a dropped watch resumes without relisting, compaction
//! forces a relist that forgets deleted objects, invalid objects are counted while the rest
//! translate (a changed object keeps its last good version), a kind not served (CRD missing)
//! counts as empty until it is, Gateways and GatewayClasses bind waypoints, GRPCRoutes become
//! waypoint routes (a bad one counted), ztunnel's xDS client
//! receives the state, and the binary's `--kubernetes` command line.

mod support;
use support::{Serving, WAIT, eventually, http_status, refused};

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use ambit_core::metrics::Registry;
use ambit_core::readiness::Readiness;
use ambit_fake_apiserver::{FakeApiServer, RecordedRequest};
use ambit_mesh::translate::{Cluster, MeshSettings, translate};
use ambit_proto::discovery::aggregated_discovery_service_server::AggregatedDiscoveryServiceServer;
use ambit_proto::workload::{Address, TunnelProtocol, Workload, address};
use ambit_proto::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};
use istiod_lite::auth::TokenFileAuthenticator;
use istiod_lite::ca::load_or_create;
use istiod_lite::source::watch_kubernetes;
use istiod_lite::store::Store;
use istiod_lite::xds::XdsServer;
use serde_json::{Value, json};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::Server;
use ztunnel::mesh::MeshState;

fn namespace(name: &str, ambient: bool) -> Value {
    let labels = if ambient {
        json!({"istio.io/dataplane-mode": "ambient"})
    } else {
        json!({})
    };
    json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": name, "labels": labels},
    })
}

fn pod(name: &str, app: &str, node: &str, ip: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "demo", "labels": {"app": app}},
        "spec": {"nodeName": node, "serviceAccountName": name},
        "status": {"podIP": ip, "podIPs": [{"ip": ip}]},
    })
}

fn service() -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "echo", "namespace": "demo"},
        "spec": {
            "selector": {"app": "echo"},
            "clusterIP": "10.96.0.10",
            "ports": [{"port": 80, "targetPort": 8080}],
        },
    })
}

fn allow_policy() -> Value {
    json!({
        "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "allow-client", "namespace": "demo"},
        "spec": {
            "action": "ALLOW",
            "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/demo/sa/client"]}}]}],
        },
    })
}

/// The namespace, two pods, the service selecting one of them, and the ALLOW policy.
fn demo() -> Vec<Value> {
    vec![
        namespace("demo", true),
        pod("client", "client", "node-1", "10.244.1.2"),
        pod("echo", "echo", "node-2", "10.244.2.2"),
        service(),
        allow_policy(),
    ]
}

/// What translating exactly these objects gives: type URL → resource name → version.
fn expected(objects: &[Value]) -> BTreeMap<&'static str, BTreeMap<String, String>> {
    let mut parsed = Vec::new();
    for object in objects {
        let (mut ok, errors) = ambit_mesh::parse_object(object.clone(), "expected");
        assert!(errors.is_empty(), "{errors:?}");
        parsed.append(&mut ok);
    }
    let cluster = Cluster::from_objects(parsed);
    let resources = translate(&cluster, &MeshSettings::default());
    let store = Store::new();
    store.replace(cluster, &resources);
    held(&store)
}

/// What the store serves: type URL → resource name → version.
fn held(store: &Store) -> BTreeMap<&'static str, BTreeMap<String, String>> {
    store
        .snapshot()
        .types
        .iter()
        .map(|(url, entries)| {
            (
                *url,
                entries
                    .iter()
                    .map(|(name, entry)| (name.clone(), entry.version.clone()))
                    .collect(),
            )
        })
        .collect()
}

/// Served workloads by `namespace/name`.
fn workloads(store: &Store) -> BTreeMap<String, Workload> {
    store.snapshot().types[ADDRESS_TYPE_URL]
        .values()
        .filter_map(|entry| {
            match ambit_proto::unpack_any::<Address>(&entry.any)
                .unwrap()
                .r#type
            {
                Some(address::Type::Workload(w)) => {
                    Some((format!("{}/{}", w.namespace, w.name), w))
                }
                _ => None,
            }
        })
        .collect()
}

/// Served services by `namespace/name`.
fn services(store: &Store) -> Vec<String> {
    store.snapshot().types[ADDRESS_TYPE_URL]
        .values()
        .filter_map(|entry| {
            match ambit_proto::unpack_any::<Address>(&entry.any)
                .unwrap()
                .r#type
            {
                Some(address::Type::Service(s)) => Some(format!("{}/{}", s.namespace, s.name)),
                _ => None,
            }
        })
        .collect()
}

/// Served policy resource names.
fn policies(store: &Store) -> Vec<String> {
    store.snapshot().types[AUTHORIZATION_TYPE_URL]
        .keys()
        .cloned()
        .collect()
}

/// The store, metrics and readiness of a Kubernetes source watching `server`.
struct Source {
    store: Store,
    metrics: Registry,
    readiness: Readiness,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Source {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn start_source(server: &FakeApiServer, debounce: Duration) -> Source {
    let store = Store::new();
    let metrics = Registry::new();
    let readiness = Readiness::new();
    let task = tokio::spawn(watch_kubernetes(
        support::kube_client(server).await,
        MeshSettings::default(),
        store.clone(),
        metrics.clone(),
        debounce,
        Some(readiness.register("config")),
    ));
    Source {
        store,
        metrics,
        readiness,
        task,
    }
}

/// Serves `objects` from `server`, starts a source on it and waits until it serves exactly them.
async fn synced_source(server: &FakeApiServer, objects: &[Value], debounce: Duration) -> Source {
    for object in objects {
        server.apply(object.clone());
    }
    let source = start_source(server, debounce).await;
    let want = expected(objects);
    eventually("the initial state is served", || {
        held(&source.store) == want
    })
    .await;
    source
}

/// Collection lists (not watches) of `path`.
fn lists(requests: &[RecordedRequest], path: &str) -> usize {
    requests
        .iter()
        .filter(|r| r.method == "GET" && !r.watch && r.path == path)
        .count()
}

/// Watches of `path`.
fn watches(requests: &[RecordedRequest], path: &str) -> Vec<RecordedRequest> {
    requests
        .iter()
        .filter(|r| r.watch && r.path == path)
        .cloned()
        .collect()
}

#[tokio::test]
async fn api_objects_become_workload_resources_translated_once_and_relabelled() {
    let server = FakeApiServer::start().await;
    let mut objects = demo();
    let source = synced_source(&server, &objects, Duration::from_millis(100)).await;
    assert!(
        source.readiness.is_ready(),
        "{:?}",
        source.readiness.pending()
    );
    assert_eq!(
        source.store.snapshot().generation,
        1,
        "the initial sync of every kind is translated once"
    );

    let served = workloads(&source.store);
    assert_eq!(
        served.keys().collect::<Vec<_>>(),
        ["demo/client", "demo/echo"]
    );
    for workload in served.values() {
        assert_eq!(
            workload.tunnel_protocol,
            TunnelProtocol::Hbone as i32,
            "{} is in an ambient namespace",
            workload.name
        );
    }
    assert_eq!(
        served["demo/echo"].addresses,
        vec![vec![10, 244, 2, 2]],
        "the pod's IP"
    );
    assert_eq!(services(&source.store), ["demo/echo"]);
    assert_eq!(policies(&source.store), ["demo/allow-client"]);
    let text = source.metrics.render();
    assert!(text.contains("ambit_config_objects 5"), "{text}");

    // The namespace leaves ambient: its pods are no longer captured.
    server.apply(namespace("demo", false));
    objects[0] = namespace("demo", false);
    let want = expected(&objects);
    eventually("the namespace label change is translated", || {
        held(&source.store) == want
    })
    .await;
    assert!(
        workloads(&source.store)
            .values()
            .all(|w| w.tunnel_protocol == TunnelProtocol::None as i32),
        "{:?}",
        workloads(&source.store)
    );

    // A pod relabelled away from the service's selector leaves the service.
    server.apply(namespace("demo", true));
    objects[0] = namespace("demo", true);
    server.apply(pod("echo", "other", "node-2", "10.244.2.2"));
    objects[2] = pod("echo", "other", "node-2", "10.244.2.2");
    let want = expected(&objects);
    eventually("the pod label change is translated", || {
        held(&source.store) == want
    })
    .await;
    assert!(
        workloads(&source.store)["demo/echo"].services.is_empty(),
        "no service selects app=other"
    );

    // A burst of changes is translated together, not once per object.
    let before = source.store.snapshot().generation;
    for i in 0..30 {
        let object = pod(
            &format!("burst-{i}"),
            "echo",
            "node-1",
            &format!("10.244.3.{i}"),
        );
        server.apply(object.clone());
        objects.push(object);
    }
    let want = expected(&objects);
    eventually("the burst is translated", || held(&source.store) == want).await;
    let translations = source.store.snapshot().generation - before;
    assert!(
        translations <= 2,
        "30 changes within the debounce interval were translated {translations} times"
    );
    let text = source.metrics.render();
    assert!(text.contains("ambit_config_objects 35"), "{text}");
}

#[tokio::test]
async fn a_dropped_watch_resumes_without_relisting_and_delivers_changes_made_meanwhile() {
    let server = FakeApiServer::start().await;
    let mut objects = demo();
    let source = synced_source(&server, &objects, Duration::from_millis(20)).await;
    assert!(server.wait_for_watches("/api/v1/pods", 1, WAIT).await);

    server.drop_watches();
    let added = pod("late", "echo", "node-1", "10.244.1.9");
    server.apply(added.clone());
    objects.push(added);
    let want = expected(&objects);
    eventually("the pod made while the watch was down arrives", || {
        held(&source.store) == want
    })
    .await;
    assert!(workloads(&source.store).contains_key("demo/late"));

    let requests = server.requests();
    assert_eq!(
        lists(&requests, "/api/v1/pods"),
        1,
        "the pods were relisted: {requests:#?}"
    );
    assert!(
        watches(&requests, "/api/v1/pods").len() >= 2,
        "the watch was reopened: {requests:#?}"
    );
}

#[tokio::test]
async fn compaction_forces_a_relist_that_forgets_objects_deleted_meanwhile() {
    let server = FakeApiServer::start().await;
    let mut objects = demo();
    let source = synced_source(&server, &objects, Duration::from_millis(20)).await;
    assert!(server.wait_for_watches("/api/v1/pods", 1, WAIT).await);
    assert!(workloads(&source.store).contains_key("demo/echo"));

    // No await between these: the watch is gone before the deletion, and the history that would
    // replay it is compacted before the watcher can reconnect.
    server.drop_watches();
    assert!(server.delete("v1", "Pod", "demo", "echo"));
    objects.retain(|o| o["metadata"]["name"] != "echo" || o["kind"] != "Pod");
    let added = pod("fresh", "echo", "node-2", "10.244.2.7");
    server.apply(added.clone());
    objects.push(added);
    server.compact();

    let want = expected(&objects);
    eventually("the relisted state is served", || {
        held(&source.store) == want
    })
    .await;
    let served = workloads(&source.store);
    assert!(!served.contains_key("demo/echo"), "{served:?}");
    assert!(served.contains_key("demo/fresh"), "{served:?}");
    let requests = server.requests();
    assert_eq!(
        lists(&requests, "/api/v1/pods"),
        2,
        "410 Gone forces exactly one relist: {requests:#?}"
    );
}

#[tokio::test]
async fn invalid_objects_are_counted_and_the_rest_translate() {
    let server = FakeApiServer::start().await;
    let mut objects = demo();
    for object in &objects {
        server.apply(object.clone());
    }
    server.apply(pod("broken", "echo", "node-1", "10.0.0.300"));
    let source = start_source(&server, Duration::from_millis(20)).await;
    let want = expected(&objects);
    eventually("the valid objects are served", || {
        held(&source.store) == want
    })
    .await;
    assert!(source.readiness.is_ready());
    let rejected = |n: u64| format!("ambit_config_rejected_objects_total{{kind=\"Pod\"}} {n}");
    let text = source.metrics.render();
    assert!(text.contains(&rejected(1)), "{text}");
    assert!(!workloads(&source.store).contains_key("demo/broken"));

    // A valid pod changed into an invalid one keeps its last good version.
    let before = held(&source.store);
    server.apply(pod("echo", "echo", "node-2", "10.244.2.300"));
    eventually("the refusal is counted", || {
        source.metrics.render().contains(&rejected(2))
    })
    .await;
    assert_eq!(held(&source.store), before, "the last good version stays");
    assert_eq!(
        workloads(&source.store)["demo/echo"].addresses,
        vec![vec![10, 244, 2, 2]]
    );

    // Fixed: the new version is served, nothing more is counted.
    server.apply(pod("echo", "echo", "node-2", "10.244.2.3"));
    objects[2] = pod("echo", "echo", "node-2", "10.244.2.3");
    let want = expected(&objects);
    eventually("the fixed pod is served", || held(&source.store) == want).await;
    let text = source.metrics.render();
    assert!(text.contains(&rejected(2)), "{text}");
}

#[tokio::test]
async fn a_kind_not_served_counts_as_empty_and_is_picked_up_once_served() {
    let server = FakeApiServer::start().await;
    let objects = demo();
    for object in &objects {
        server.apply(object.clone());
    }
    // AuthorizationPolicy's CRD "missing" for the first four lists (404), then installed: the
    // retries back off 250 ms, 500 ms, 1 s, 2 s (plus jitter).
    const POLICIES: &str = "/apis/security.istio.io/v1/authorizationpolicies";
    for _ in 0..4 {
        server.fail_next("GET", POLICIES, 404);
    }
    let source = start_source(&server, Duration::from_millis(20)).await;
    let without_policy: Vec<Value> = objects
        .iter()
        .filter(|o| o["kind"] != "AuthorizationPolicy")
        .cloned()
        .collect();
    let want = expected(&without_policy);
    eventually("ready without the missing kind", || {
        source.readiness.is_ready() && held(&source.store) == want
    })
    .await;
    assert!(
        lists(&server.requests(), POLICIES) < 5,
        "readiness waited for the kind: {:#?}",
        server.requests()
    );
    assert!(policies(&source.store).is_empty());

    let want = expected(&objects);
    eventually("the policy is served once its kind is", || {
        held(&source.store) == want
    })
    .await;
    assert_eq!(policies(&source.store), ["demo/allow-client"]);
    assert_eq!(lists(&server.requests(), POLICIES), 5);
}

/// A waypoint Gateway in `demo`, addressed by its service's hostname, with no `waypoint-for`
/// label of its own.
fn waypoint_gateway() -> Value {
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
        "metadata": {"name": "wp", "namespace": "demo"},
        "spec": {
            "gatewayClassName": "istio-waypoint",
            "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}],
        },
        "status": {"addresses": [{"type": "Hostname", "value": "wp.demo.svc.cluster.local"}]},
    })
}

fn waypoint_class(waypoint_for: &str) -> Value {
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "GatewayClass",
        "metadata": {"name": "istio-waypoint", "labels": {"istio.io/waypoint-for": waypoint_for}},
        "spec": {"controllerName": "istio.io/mesh-controller"},
    })
}

#[tokio::test]
async fn gateways_and_their_class_from_the_api_server_bind_waypoints() {
    let server = FakeApiServer::start().await;
    let mut ns = namespace("demo", true);
    ns["metadata"]["labels"]["istio.io/use-waypoint"] = json!("wp");
    let mut objects = demo();
    objects[0] = ns;
    objects.push(waypoint_gateway());
    objects.push(waypoint_class("workload"));
    let source = synced_source(&server, &objects, Duration::from_millis(50)).await;
    let bound = |store: &Store| {
        workloads(store)["demo/echo"]
            .waypoint
            .as_ref()
            .map(|w| w.hbone_mtls_port)
    };
    assert_eq!(
        bound(&source.store),
        Some(15008),
        "the class says the waypoint takes workload traffic"
    );

    // The class is deleted: the Gateway falls back to the default (service traffic only).
    assert!(server.delete(
        "gateway.networking.k8s.io/v1",
        "GatewayClass",
        "",
        "istio-waypoint"
    ));
    objects.pop();
    let want = expected(&objects);
    eventually("the class deletion is translated", || {
        held(&source.store) == want
    })
    .await;
    assert_eq!(
        bound(&source.store),
        None,
        "default waypoint-for is service"
    );
}

#[tokio::test]
async fn grpc_routes_from_the_api_server_become_waypoint_routes_and_bad_ones_are_counted() {
    let server = FakeApiServer::start().await;
    server.register(ambit_fake_apiserver::KindInfo::new(
        "gateway.networking.k8s.io/v1",
        "GRPCRoute",
        "grpcroutes",
        true,
    ));
    let mut ns = namespace("demo", true);
    ns["metadata"]["labels"]["istio.io/use-waypoint"] = json!("wp");
    server.apply(ns);
    server.apply(service());
    server.apply(waypoint_gateway());
    let route = |name: &str, method: &str| {
        json!({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "GRPCRoute",
            "metadata": {"name": name, "namespace": "demo"},
            "spec": {
                "parentRefs": [{"group": "", "kind": "Service", "name": "echo"}],
                "rules": [{"matches": [{"method": {"type": "RegularExpression", "method": method}}]}],
            },
        })
    };
    server.apply(route("g", "Get.*"));
    server.apply(route("broken", "Get("));
    let source = start_source(&server, Duration::from_millis(20)).await;
    eventually("the GRPCRoute is translated", || {
        source.store.snapshot().types[ambit_proto::ROUTE_TYPE_URL].contains_key("GRPCRoute/demo/g")
    })
    .await;
    let snapshot = source.store.snapshot();
    let entry = &snapshot.types[ambit_proto::ROUTE_TYPE_URL]["GRPCRoute/demo/g"];
    let served: ambit_proto::waypoint::Route = ambit_proto::unpack_any(&entry.any).unwrap();
    assert!(
        served.creation_timestamp > 0,
        "the API server's creationTimestamp is the precedence tie-break"
    );
    assert_eq!(
        snapshot.waypoint_scopes["demo/wp"]
            .routes
            .iter()
            .collect::<Vec<_>>(),
        ["GRPCRoute/demo/g"]
    );
    let text = source.metrics.render();
    assert!(
        text.contains(r#"ambit_config_rejected_objects_total{kind="GRPCRoute"} 1"#),
        "{text}"
    );
}

#[tokio::test]
async fn ztunnel_receives_the_state_from_a_kubernetes_sourced_server() {
    let server = FakeApiServer::start().await;
    for object in demo() {
        server.apply(object);
    }
    let source = start_source(&server, Duration::from_millis(20)).await;
    eventually("the source is ready", || source.readiness.is_ready()).await;

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("tokens.json"),
        r#"{"tokens": [{"token": "node-1-token", "node": "node-1"}]}"#,
    )
    .unwrap();
    let ca = Arc::new(load_or_create(&dir.path().join("ca"), "cluster.local").unwrap());
    let auth: istiod_lite::auth::Authenticator =
        TokenFileAuthenticator::new(dir.path().join("tokens.json")).into();
    let tls = support::serving_tls(&ca);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let xds = XdsServer {
        store: source.store.clone(),
        auth,
        metrics: source.metrics.clone(),
        debounce: Duration::from_millis(20),
        shutdown: Default::default(),
    };
    let serving_task = tokio::spawn(
        Server::builder()
            .tls_config(tls)
            .unwrap()
            .add_service(AggregatedDiscoveryServiceServer::new(xds))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );

    let state = MeshState::new("node-1");
    let readiness = Readiness::new();
    let client_task = support::start_xds_client(
        support::control_plane(
            addr.port(),
            dir.path().join("ca/root-cert.pem"),
            Some("node-1-token"),
        ),
        &state,
        &readiness,
    );
    eventually("ztunnel synced the Kubernetes state", || {
        readiness.is_ready()
            && state.index().len() == (2, 1)
            && state.policies().get("demo/allow-client").is_some()
    })
    .await;

    // A change in the API server reaches ztunnel.
    assert!(server.delete(
        "security.istio.io/v1",
        "AuthorizationPolicy",
        "demo",
        "allow-client"
    ));
    server.apply(pod("third", "echo", "node-1", "10.244.1.3"));
    eventually("ztunnel received the change", || {
        state.index().len() == (3, 1) && state.policies().get("demo/allow-client").is_none()
    })
    .await;
    client_task.abort();
    serving_task.abort();
}

#[tokio::test]
async fn the_binary_needs_exactly_one_config_source_and_becomes_ready_from_kubernetes() {
    let dir = tempfile::tempdir().unwrap();
    let config_dir = dir.path().to_str().unwrap();
    let both = refused(&["--kubernetes", "--config-dir", config_dir]);
    assert!(
        both.contains("--config-dir and --kubernetes are exclusive"),
        "{both}"
    );
    let neither = refused(&[]);
    assert!(
        neither.contains("no config source") && neither.contains("--kubernetes"),
        "{neither}"
    );
    let stray = refused(&[
        "--config-dir",
        config_dir,
        "--kube-url",
        "http://127.0.0.1:1",
    ]);
    assert!(stray.contains("--kube-url needs --kubernetes"), "{stray}");
    let stray = refused(&["--config-dir", config_dir, "--kubeconfig", "/nonexistent"]);
    assert!(stray.contains("--kubeconfig needs --kubernetes"), "{stray}");

    // Kubernetes mode against the fake API server: the CA in Secrets, TokenReview, the config
    // from the watch; /ready answers 200 once every kind was listed.
    let server = FakeApiServer::start().await;
    for object in demo() {
        server.apply(object);
    }
    let serving = Serving::start(&[
        "--kubernetes",
        "--kube-url",
        &server.url(),
        // The waypoint controller keeps watches of its own (tests/waypoint_controller.rs);
        // this test counts the config source's.
        "--no-waypoint-controller",
    ])
    .await;
    let monitoring = serving.monitoring;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut last = None;
    loop {
        last = http_status(monitoring, "/ready").await.or(last);
        if matches!(&last, Some((200, _))) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never ready; last answer: {last:?}; istiod-lite printed: {}\nrequests: {:#?}",
            serving.stderr(),
            server.requests()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, metrics) = http_status(monitoring, "/metrics").await.unwrap();
    assert!(metrics.contains("ambit_config_objects 5"), "{metrics}");
    let requests = server.requests();
    for path in [
        "/api/v1/pods",
        "/api/v1/services",
        "/apis/security.istio.io/v1/authorizationpolicies",
        "/apis/discovery.k8s.io/v1/endpointslices",
    ] {
        assert_eq!(
            lists(&requests, path),
            1,
            "{path} listed once: {requests:#?}"
        );
    }
}
