//! The delta xDS stream as istiod-lite mounts it ([`istiod_lite::xds::service`]), where a client
//! subscribing with nothing is sent each type's whole set encoded and compressed once per
//! generation, with ztunnel's own xDS client and raw tonic clients over TLS on loopback: several
//! ztunnels starting together converge and then receive deltas; clients with and without gzip get
//! exactly the store's resources under their own nonces, and their NACKs are counted while the
//! stream goes on; a resume gets only what differs (nothing when current); a waypoint accepting
//! gzip gets every Address but only its own routes.

mod support;
use support::{WAIT, eventually};

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ambit_core::metrics::Registry;
use ambit_core::readiness::Readiness;
use ambit_mesh::parse_documents;
use ambit_mesh::translate::{Cluster, MeshSettings, translate};
use ambit_proto::discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use ambit_proto::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use ambit_proto::envoy_core::Node;
use ambit_proto::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL, ROUTE_TYPE_URL};
use ambit_xds::ControlPlane;
use istiod_lite::auth::TokenFileAuthenticator;
use istiod_lite::ca::load_or_create;
use istiod_lite::store::Store;
use istiod_lite::xds::XdsServer;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::transport::Server;
use ztunnel::mesh::MeshState;

/// Pods in the generated cluster: enough that the whole set spans many HTTP/2 frames.
const PODS: usize = 300;
const SERVICES: usize = PODS / 10;

/// `PODS` ambient pods in one namespace, one Service per ten, plus `extra` documents.
fn cluster_yaml(extra: &str) -> String {
    cluster_yaml_without(extra, None)
}

/// The same, without pod number `without`.
fn cluster_yaml_without(extra: &str, without: Option<usize>) -> String {
    let mut text = String::from(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: demo, labels: {istio.io/dataplane-mode: ambient}}\n",
    );
    for s in 0..SERVICES {
        let _ = write!(
            text,
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: svc-{s}, namespace: demo}}\nspec: {{selector: {{app: svc-{s}}}, clusterIP: 10.96.0.{}, ports: [{{name: http, port: 80, targetPort: 8080}}]}}\n",
            s + 1
        );
    }
    for p in (0..PODS).filter(|p| Some(*p) != without) {
        let s = p / 10;
        let _ = write!(
            text,
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: pod-{p}, namespace: demo, labels: {{app: svc-{s}}}}}\nspec: {{nodeName: node-{}, serviceAccountName: svc-{s}}}\nstatus: {{podIP: 10.244.{}.{}}}\n",
            p % 2 + 1,
            p / 200,
            p % 200 + 2
        );
    }
    text.push_str(extra);
    text
}

const POLICY: &str = r#"---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-svc-0, namespace: demo}
spec: {rules: [{from: [{source: {principals: [cluster.local/ns/demo/sa/svc-0]}}]}]}
"#;

fn load(store: &Store, text: &str) {
    let (objects, errors) = parse_documents(text, "test.yaml");
    assert!(errors.is_empty(), "{errors:?}");
    let cluster = Cluster::from_objects(objects);
    let resources = translate(&cluster, &MeshSettings::default());
    store.replace(cluster, &resources);
}

/// istiod-lite's xDS service over TLS on loopback, accepting the token `t`.
struct Fixture {
    addr: SocketAddr,
    dir: tempfile::TempDir,
    store: Store,
    metrics: Registry,
}

impl Fixture {
    async fn start(objects: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("tokens.json"),
            r#"{"tokens": [{"token": "t", "node": "node-1"}]}"#,
        )
        .unwrap();
        let ca = Arc::new(load_or_create(&dir.path().join("ca"), "cluster.local").unwrap());
        let store = Store::new();
        load(&store, objects);
        let metrics = Registry::new();
        let xds = XdsServer {
            store: store.clone(),
            auth: TokenFileAuthenticator::new(dir.path().join("tokens.json")).into(),
            metrics: metrics.clone(),
            debounce: Duration::from_millis(20),
            shutdown: Default::default(),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(
            Server::builder()
                .tls_config(support::serving_tls(&ca))
                .unwrap()
                .add_service(istiod_lite::xds::service(xds))
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        Self {
            addr,
            dir,
            store,
            metrics,
        }
    }

    fn control(&self) -> ControlPlane {
        support::control_plane(
            self.addr.port(),
            self.dir.path().join("ca/root-cert.pem"),
            Some("t"),
        )
    }

    /// name → version of what the store serves of `type_url`.
    fn served(&self, type_url: &str) -> BTreeMap<String, String> {
        self.store.snapshot().types[type_url]
            .iter()
            .map(|(n, e)| (n.clone(), e.version.clone()))
            .collect()
    }
}

/// One raw delta xDS stream; every response is checked against what the client held.
struct Raw {
    requests: mpsc::Sender<DeltaDiscoveryRequest>,
    responses: tonic::Streaming<DeltaDiscoveryResponse>,
    /// The response's `grpc-encoding` header.
    encoding: Option<String>,
    nonces: BTreeSet<String>,
}

impl Raw {
    /// Opens a stream (offering gzip when `gzip`) and sends `first` requests.
    async fn open(cp: &Fixture, gzip: bool, first: Vec<DeltaDiscoveryRequest>) -> Self {
        let channel = cp.control().connect().await.unwrap();
        let mut client =
            AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(64 << 20);
        if gzip {
            client = client.accept_compressed(tonic::codec::CompressionEncoding::Gzip);
        }
        let (tx, rx) = mpsc::channel(16);
        for request in first {
            tx.send(request).await.unwrap();
        }
        let mut request = tonic::Request::new(ReceiverStream::new(rx));
        request
            .metadata_mut()
            .insert("authorization", "Bearer t".parse().unwrap());
        let response = client.delta_aggregated_resources(request).await.unwrap();
        let encoding = response
            .metadata()
            .get("grpc-encoding")
            .map(|v| v.to_str().unwrap().to_string());
        Self {
            requests: tx,
            responses: response.into_inner(),
            encoding,
            nonces: BTreeSet::new(),
        }
    }

    async fn next(&mut self) -> DeltaDiscoveryResponse {
        let response = tokio::time::timeout(WAIT, self.responses.message())
            .await
            .expect("a response within the wait")
            .expect("a well-formed response")
            .expect("the stream stays open");
        assert!(
            self.nonces.insert(response.nonce.clone()),
            "nonce {} reused on the stream",
            response.nonce
        );
        response
    }

    async fn ack(&self, response: &DeltaDiscoveryResponse) {
        self.requests
            .send(DeltaDiscoveryRequest {
                type_url: response.type_url.clone(),
                response_nonce: response.nonce.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
    }

    async fn nack(&self, response: &DeltaDiscoveryResponse, why: &str) {
        self.requests
            .send(DeltaDiscoveryRequest {
                type_url: response.type_url.clone(),
                response_nonce: response.nonce.clone(),
                error_detail: Some(ambit_proto::google_rpc::Status {
                    code: 3,
                    message: why.into(),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .unwrap();
    }
}

fn subscribe(type_url: &str, held: BTreeMap<String, String>) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        node: Some(Node {
            id: "ztunnel~10.0.0.1~zt.istio-system~istio-system.svc.cluster.local".into(),
            ..Default::default()
        }),
        type_url: type_url.into(),
        initial_resource_versions: held.into_iter().collect(),
        ..Default::default()
    }
}

/// name → version of a response's resources, each checked to be the store's own `Any`.
fn received(cp: &Fixture, response: &DeltaDiscoveryResponse) -> BTreeMap<String, String> {
    let snapshot = cp.store.snapshot();
    response
        .resources
        .iter()
        .map(|r| {
            let entry = &snapshot.types[response.type_url.as_str()][&r.name];
            assert_eq!(r.resource.as_ref(), Some(&entry.any), "{}", r.name);
            (r.name.clone(), r.version.clone())
        })
        .collect()
}

#[tokio::test]
async fn ztunnels_starting_together_converge_from_one_encoding_and_then_get_deltas() {
    let cp = Fixture::start(&cluster_yaml("")).await;
    let ztunnels: Vec<(MeshState, Readiness, _)> = (0..4)
        .map(|_| {
            let state = MeshState::new("node-1");
            let readiness = Readiness::new();
            let task = support::start_xds_client(cp.control(), &state, &readiness);
            (state, readiness, task)
        })
        .collect();
    eventually("every ztunnel synced", || {
        ztunnels
            .iter()
            .all(|(state, ready, _)| ready.is_ready() && state.index().len() == (PODS, SERVICES))
    })
    .await;

    load(&cp.store, &cluster_yaml(POLICY));
    eventually("the policy pushed to every ztunnel", || {
        ztunnels
            .iter()
            .all(|(state, _, _)| state.policies().get("demo/allow-svc-0").is_some())
    })
    .await;
    // A pod gone: removed everywhere, as a delta.
    load(&cp.store, &cluster_yaml_without(POLICY, Some(7)));
    eventually("the pod removed from every ztunnel", || {
        ztunnels
            .iter()
            .all(|(state, _, _)| state.index().len() == (PODS - 1, SERVICES))
    })
    .await;
    let text = cp.metrics.render();
    assert!(text.contains("ambit_xds_connected_proxies 4"), "{text}");
    assert!(
        text.contains(&format!(
            r#"ambit_xds_pushed_resources_total{{url="{AUTHORIZATION_TYPE_URL}"}} 4"#
        )),
        "only the policy was pushed as a delta: {text}"
    );
    for (_, _, task) in ztunnels {
        task.abort();
    }
}

#[tokio::test]
async fn clients_with_and_without_gzip_get_the_store_under_their_own_nonces_and_may_nack() {
    let cp = Fixture::start(&cluster_yaml("")).await;
    for (n, gzip) in [false, true].into_iter().enumerate() {
        let mut raw = Raw::open(
            &cp,
            gzip,
            vec![
                subscribe(ADDRESS_TYPE_URL, BTreeMap::new()),
                subscribe(AUTHORIZATION_TYPE_URL, BTreeMap::new()),
            ],
        )
        .await;
        assert_eq!(
            raw.encoding.as_deref(),
            gzip.then_some("gzip"),
            "compressed exactly when offered"
        );
        let addresses = raw.next().await;
        assert_eq!(addresses.type_url, ADDRESS_TYPE_URL);
        assert_eq!(received(&cp, &addresses), cp.served(ADDRESS_TYPE_URL));
        assert_eq!(addresses.resources.len(), PODS + SERVICES);
        assert!(addresses.removed_resources.is_empty());
        raw.ack(&addresses).await;
        let policies = raw.next().await;
        assert_eq!(policies.type_url, AUTHORIZATION_TYPE_URL);
        assert!(policies.resources.is_empty(), "none yet, but answered");
        raw.ack(&policies).await;

        // A change arrives as a delta; the client refuses it, which is counted, and the stream
        // goes on to the next change.
        load(&cp.store, &cluster_yaml(POLICY));
        let added = raw.next().await;
        assert_eq!(added.type_url, AUTHORIZATION_TYPE_URL);
        assert_eq!(
            received(&cp, &added).into_keys().collect::<Vec<_>>(),
            ["demo/allow-svc-0"]
        );
        raw.nack(&added, "policy refused by the test").await;
        let nacks = format!(
            r#"ambit_xds_nacks_total{{url="{AUTHORIZATION_TYPE_URL}"}} {}"#,
            n + 1
        );
        eventually("the NACK counted", || cp.metrics.render().contains(&nacks)).await;
        load(&cp.store, &cluster_yaml(""));
        let removed = raw.next().await;
        assert_eq!(removed.type_url, AUTHORIZATION_TYPE_URL);
        assert!(removed.resources.is_empty());
        assert_eq!(removed.removed_resources, ["demo/allow-svc-0"]);
        raw.ack(&removed).await;
    }
}

#[tokio::test]
async fn a_resume_gets_only_what_differs_and_nothing_when_current() {
    let cp = Fixture::start(&cluster_yaml(POLICY)).await;
    let mut raw = Raw::open(
        &cp,
        true,
        vec![
            subscribe(ADDRESS_TYPE_URL, cp.served(ADDRESS_TYPE_URL)),
            subscribe(AUTHORIZATION_TYPE_URL, cp.served(AUTHORIZATION_TYPE_URL)),
        ],
    )
    .await;
    for _ in 0..2 {
        let response = raw.next().await;
        assert!(
            response.resources.is_empty() && response.removed_resources.is_empty(),
            "nothing resent: {} resources, {:?} removed",
            response.resources.len(),
            response.removed_resources
        );
    }

    // Held: one Address at an old version, one that no longer exists, the rest current.
    let mut held = cp.served(ADDRESS_TYPE_URL);
    let (stale, _) = held
        .iter()
        .nth(5)
        .map(|(n, v)| (n.clone(), v.clone()))
        .unwrap();
    held.insert(stale.clone(), "0000000000000000".into());
    held.insert("demo/deleted-while-away".into(), "0123456789abcdef".into());
    let mut raw = Raw::open(&cp, true, vec![subscribe(ADDRESS_TYPE_URL, held)]).await;
    let response = raw.next().await;
    assert_eq!(
        received(&cp, &response).into_keys().collect::<Vec<_>>(),
        [stale]
    );
    assert_eq!(response.removed_resources, ["demo/deleted-while-away"]);
}

const WAYPOINT: &str = r#"---
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: wp}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: wp, namespace: shop}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
status: {addresses: [{type: Hostname, value: wp.shop.svc.cluster.local}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: other, namespace: shop}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
status: {addresses: [{type: Hostname, value: other.shop.svc.cluster.local}]}
---
apiVersion: v1
kind: Service
metadata: {name: cart, namespace: shop}
spec: {clusterIP: 10.96.1.1, ports: [{name: http, port: 80}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: cart, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: cart}]
  rules: [{backendRefs: [{name: cart, port: 80}]}]
"#;

fn waypoint_node(name: &str) -> Node {
    let field = |v: &str| prost_types::Value {
        kind: Some(prost_types::value::Kind::StringValue(v.into())),
    };
    Node {
        id: format!("waypoint~10.0.0.9~{name}-1.shop~shop.svc.cluster.local"),
        metadata: Some(prost_types::Struct {
            fields: [
                ("GATEWAY_NAMESPACE".to_string(), field("shop")),
                ("GATEWAY_NAME".to_string(), field(name)),
            ]
            .into_iter()
            .collect(),
        }),
        ..Default::default()
    }
}

#[tokio::test]
async fn a_waypoint_accepting_gzip_gets_every_address_but_only_its_own_routes() {
    let cp = Fixture::start(&cluster_yaml(WAYPOINT)).await;
    assert!(!cp.served(ROUTE_TYPE_URL).is_empty());
    for (gateway, routes) in [("wp", vec!["HTTPRoute/shop/cart"]), ("other", vec![])] {
        let mut first = subscribe(ADDRESS_TYPE_URL, BTreeMap::new());
        first.node = Some(waypoint_node(gateway));
        let mut raw = Raw::open(
            &cp,
            true,
            vec![first, subscribe(ROUTE_TYPE_URL, BTreeMap::new())],
        )
        .await;
        let addresses = raw.next().await;
        assert_eq!(received(&cp, &addresses), cp.served(ADDRESS_TYPE_URL));
        let got = raw.next().await;
        assert_eq!(got.type_url, ROUTE_TYPE_URL);
        assert_eq!(
            received(&cp, &got).into_keys().collect::<Vec<_>>(),
            routes,
            "{gateway}"
        );
    }
}

#[tokio::test]
async fn unauthenticated_streams_and_other_methods_are_refused() {
    let cp = Fixture::start(&cluster_yaml("")).await;
    let channel = cp.control().connect().await.unwrap();
    let refused = AggregatedDiscoveryServiceClient::new(channel.clone())
        .delta_aggregated_resources(tokio_stream::iter(Vec::<DeltaDiscoveryRequest>::new()))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);

    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let other = grpc
        .unary::<DeltaDiscoveryRequest, DeltaDiscoveryResponse, _>(
            tonic::Request::new(DeltaDiscoveryRequest::default()),
            "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"
                .parse()
                .unwrap(),
            tonic_prost::ProstCodec::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(other.code(), tonic::Code::Unimplemented);
}
