//! Waypoints on the delta xDS stream, with a real tonic client: a waypoint (named by its Node
//! metadata) receives the routes and policies of its own scope and every Address, another
//! waypoint does not see them, a ztunnel subscribing to the waypoint types gets nothing of them,
//! a rebinding pushes a removal to the waypoint that lost a route and an addition to the one that
//! gained it, a bad route is counted and logged while the others are served, and a VirtualService
//! and DestinationRule reach the waypoint of their Service (and no ztunnel).

mod support;
use support::{WAIT, eventually};

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use ambit_core::metrics::Registry;
use ambit_mesh::parse_documents;
use ambit_mesh::translate::{Cluster, MeshSettings, translate};
use ambit_proto::discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use ambit_proto::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use ambit_proto::envoy_core::Node;
use ambit_proto::waypoint as wp;
use ambit_proto::{
    ADDRESS_TYPE_URL, DESTINATION_POLICY_TYPE_URL, L7_POLICY_TYPE_URL, ROUTE_TYPE_URL,
};
use istiod_lite::auth::TokenFileAuthenticator;
use istiod_lite::store::Store;
use istiod_lite::xds::XdsServer;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::transport::Server;

const OBJECTS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: wp}}
---
apiVersion: v1
kind: Namespace
metadata: {name: pay, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: pay-wp}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: wp, namespace: shop}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
status: {addresses: [{type: Hostname, value: wp.shop.svc.cluster.local}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: pay-wp, namespace: pay}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE, allowedRoutes: {namespaces: {from: All}}}]}
status: {addresses: [{type: Hostname, value: pay-wp.pay.svc.cluster.local}]}
---
apiVersion: v1
kind: Service
metadata: {name: pay, namespace: pay}
spec: {clusterIP: 10.96.2.1, ports: [{name: http, port: 80}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: cart, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: cart}]
  rules: [{backendRefs: [{name: cart, port: 80}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: pay, namespace: pay}
spec:
  parentRefs: [{group: "", kind: Service, name: pay}]
  rules: [{matches: [{method: {service: pay.v1.Pay}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: shop-gets, namespace: shop}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: wp}]
  rules: [{to: [{operation: {methods: [GET]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: pay-posts, namespace: pay}
spec:
  targetRefs: [{group: "", kind: Service, name: pay}]
  rules: [{to: [{operation: {methods: [POST]}}]}]
"#;

/// The cart Service bound to the shop waypoint (first), or rebound to the pay waypoint.
fn cart(use_waypoint: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: cart, namespace: shop, labels: {{{use_waypoint}}}}}\nspec: {{clusterIP: 10.96.1.1, ports: [{{name: http, port: 80}}]}}\n"
    )
}

const REBOUND: &str = "istio.io/use-waypoint: pay-wp, istio.io/use-waypoint-namespace: pay";

fn load(store: &Store, text: &str) {
    let (objects, errors) = parse_documents(text, "test.yaml");
    assert!(errors.is_empty(), "{errors:?}");
    let cluster = Cluster::from_objects(objects);
    let resources = translate(&cluster, &MeshSettings::default());
    store.replace(cluster, &resources);
}

/// An xDS server over plain gRPC on loopback, serving `store`, accepting the token `t`.
async fn serve(store: &Store, dir: &tempfile::TempDir) -> SocketAddr {
    let tokens = dir.path().join("tokens.json");
    std::fs::write(&tokens, r#"{"tokens": [{"token": "t", "node": "node-1"}]}"#).unwrap();
    let xds = XdsServer {
        store: store.clone(),
        auth: TokenFileAuthenticator::new(tokens).into(),
        metrics: Registry::new(),
        debounce: Duration::from_millis(20),
        shutdown: Default::default(),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        Server::builder()
            .add_service(istiod_lite::xds::service(xds))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    addr
}

/// One delta xDS stream and what its client holds, by type URL.
struct Client {
    requests: mpsc::Sender<DeltaDiscoveryRequest>,
    responses: tonic::Streaming<DeltaDiscoveryResponse>,
    holds: BTreeMap<String, BTreeSet<String>>,
    routes: BTreeMap<String, wp::Route>,
    destination_policies: BTreeMap<String, wp::DestinationPolicy>,
}

impl Client {
    /// Connects as a waypoint of Gateway `gateway` (`(namespace, name)`), or as a ztunnel when
    /// `None`, and subscribes to `types`, waiting for the first answer to each.
    async fn connect(addr: SocketAddr, gateway: Option<(&str, &str)>, types: &[&str]) -> Self {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut client = AggregatedDiscoveryServiceClient::new(channel);
        let (tx, rx) = mpsc::channel(16);
        let mut request = tonic::Request::new(ReceiverStream::new(rx));
        request
            .metadata_mut()
            .insert("authorization", "Bearer t".parse().unwrap());
        let metadata = gateway.map(|(ns, name)| prost_types::Struct {
            fields: [
                ("GATEWAY_NAMESPACE", ns),
                ("GATEWAY_NAME", name),
                ("NAME", "waypoint-pod"),
            ]
            .into_iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    prost_types::Value {
                        kind: Some(prost_types::value::Kind::StringValue(v.into())),
                    },
                )
            })
            .collect(),
        });
        let id = match gateway {
            Some((ns, _)) => format!("waypoint~10.0.0.9~wp-1.{ns}~{ns}.svc.cluster.local"),
            None => "ztunnel~10.0.0.1~zt.istio-system~istio-system.svc.cluster.local".into(),
        };
        for (i, type_url) in types.iter().enumerate() {
            tx.send(DeltaDiscoveryRequest {
                node: (i == 0).then(|| Node {
                    id: id.clone(),
                    metadata: metadata.clone(),
                    ..Default::default()
                }),
                type_url: type_url.to_string(),
                ..Default::default()
            })
            .await
            .unwrap();
        }
        let responses = client
            .delta_aggregated_resources(request)
            .await
            .unwrap()
            .into_inner();
        let mut this = Client {
            requests: tx,
            responses,
            holds: BTreeMap::new(),
            routes: BTreeMap::new(),
            destination_policies: BTreeMap::new(),
        };
        for _ in types {
            this.next().await;
        }
        this
    }

    /// The next response, applied to what the client holds and acknowledged.
    async fn next(&mut self) -> DeltaDiscoveryResponse {
        let response = tokio::time::timeout(WAIT, self.responses.message())
            .await
            .expect("a response within the wait")
            .unwrap()
            .expect("the stream stays open");
        let held = self.holds.entry(response.type_url.clone()).or_default();
        for resource in &response.resources {
            held.insert(resource.name.clone());
            if response.type_url == ROUTE_TYPE_URL {
                let route: wp::Route =
                    ambit_proto::unpack_any(resource.resource.as_ref().unwrap()).unwrap();
                self.routes.insert(resource.name.clone(), route);
            }
            if response.type_url == DESTINATION_POLICY_TYPE_URL {
                let policy: wp::DestinationPolicy =
                    ambit_proto::unpack_any(resource.resource.as_ref().unwrap()).unwrap();
                self.destination_policies
                    .insert(resource.name.clone(), policy);
            }
        }
        for name in &response.removed_resources {
            held.remove(name);
            self.routes.remove(name);
            self.destination_policies.remove(name);
        }
        self.requests
            .send(DeltaDiscoveryRequest {
                type_url: response.type_url.clone(),
                response_nonce: response.nonce.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
        response
    }

    fn held(&self, type_url: &str) -> Vec<&str> {
        self.holds
            .get(type_url)
            .map(|names| names.iter().map(String::as_str).collect())
            .unwrap_or_default()
    }
}

const WAYPOINT_TYPES: [&str; 3] = [ADDRESS_TYPE_URL, ROUTE_TYPE_URL, L7_POLICY_TYPE_URL];

#[tokio::test]
async fn each_waypoint_gets_its_own_routes_and_policies_and_a_rebinding_moves_a_route() {
    let store = Store::new();
    load(&store, &format!("{OBJECTS}{}", cart("")));
    let dir = tempfile::tempdir().unwrap();
    let addr = serve(&store, &dir).await;

    let mut shop = Client::connect(addr, Some(("shop", "wp")), &WAYPOINT_TYPES).await;
    let mut pay = Client::connect(addr, Some(("pay", "pay-wp")), &WAYPOINT_TYPES).await;
    assert_eq!(shop.held(ROUTE_TYPE_URL), ["HTTPRoute/shop/cart"]);
    assert_eq!(shop.held(L7_POLICY_TYPE_URL), ["shop/shop-gets"]);
    assert_eq!(pay.held(ROUTE_TYPE_URL), ["GRPCRoute/pay/pay"]);
    assert_eq!(pay.held(L7_POLICY_TYPE_URL), ["pay/pay-posts"]);
    for client in [&shop, &pay] {
        assert!(
            client
                .held(ADDRESS_TYPE_URL)
                .contains(&"shop/cart.shop.svc.cluster.local"),
            "every Address, as ztunnel gets them"
        );
    }
    let route = &shop.routes["HTTPRoute/shop/cart"];
    assert_eq!(
        route.rules[0].backends[0].service,
        "shop/cart.shop.svc.cluster.local"
    );

    // A ztunnel subscribing to the waypoint types is answered (it waits for that), with nothing.
    let ztunnel = Client::connect(addr, None, &WAYPOINT_TYPES).await;
    assert!(ztunnel.held(ROUTE_TYPE_URL).is_empty());
    assert!(ztunnel.held(L7_POLICY_TYPE_URL).is_empty());
    assert!(!ztunnel.held(ADDRESS_TYPE_URL).is_empty());

    // Rebinding cart to the pay waypoint changes no route resource, only who is served it.
    load(&store, &format!("{OBJECTS}{}", cart(REBOUND)));
    let mut removed = false;
    for _ in 0..WAYPOINT_TYPES.len() {
        let response = shop.next().await;
        if response.type_url == ROUTE_TYPE_URL {
            assert_eq!(response.removed_resources, ["HTTPRoute/shop/cart"]);
            assert!(response.resources.is_empty());
            removed = true;
            break;
        }
    }
    assert!(removed, "the shop waypoint was told to remove the route");
    for _ in 0..WAYPOINT_TYPES.len() {
        if pay.held(ROUTE_TYPE_URL).len() == 2 {
            break;
        }
        pay.next().await;
    }
    assert_eq!(
        pay.held(ROUTE_TYPE_URL),
        ["GRPCRoute/pay/pay", "HTTPRoute/shop/cart"]
    );
}

#[tokio::test]
async fn a_bad_route_is_counted_and_the_others_are_served() {
    let config = tempfile::tempdir().unwrap();
    std::fs::write(
        config.path().join("mesh.yaml"),
        format!("{OBJECTS}{}", cart("")),
    )
    .unwrap();
    // Refused by validation (the regex does not compile) and by translation (a consumer route).
    std::fs::write(
        config.path().join("bad.yaml"),
        r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: broken, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: cart}]
  rules: [{matches: [{path: {type: RegularExpression, value: "/a("}}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: consumer, namespace: pay}
spec:
  parentRefs: [{group: "", kind: Service, name: cart, namespace: shop}]
"#,
    )
    .unwrap();
    let store = Store::new();
    let metrics = Registry::new();
    let source = tokio::spawn(istiod_lite::source::watch_directory(
        config.path().to_path_buf(),
        MeshSettings::default(),
        store.clone(),
        metrics.clone(),
        Duration::from_millis(50),
        None,
    ));
    eventually("the directory translated", || {
        !store.snapshot().types[ROUTE_TYPE_URL].is_empty()
    })
    .await;
    let text = metrics.render();
    assert!(
        text.contains(r#"ambit_config_rejected_objects_total{kind="HTTPRoute"} 1"#),
        "{text}"
    );
    assert!(text.contains("ambit_config_warnings 2"), "{text}");

    let dir = tempfile::tempdir().unwrap();
    let addr = serve(&store, &dir).await;
    let shop = Client::connect(addr, Some(("shop", "wp")), &WAYPOINT_TYPES).await;
    assert_eq!(shop.held(ROUTE_TYPE_URL), ["HTTPRoute/shop/cart"]);
    assert_eq!(shop.held(L7_POLICY_TYPE_URL), ["shop/shop-gets"]);
    source.abort();
}

/// The canary VirtualService and DestinationRule of issue 13 on `cart`, with a v1 and a v2 pod.
const CANARY: &str = r#"---
apiVersion: v1
kind: Pod
metadata: {name: cart-v1, namespace: shop, labels: {app: cart, version: v1}}
status: {podIP: 10.0.1.1}
---
apiVersion: v1
kind: Pod
metadata: {name: cart-v2, namespace: shop, labels: {app: cart, version: v2}}
status: {podIP: 10.0.1.2}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: cart, namespace: shop}
spec:
  hosts: [cart]
  http:
  - match: [{headers: {x-canary: {exact: "true"}}}]
    route: [{destination: {host: cart, subset: canary}}]
  - route:
    - {destination: {host: cart, subset: stable}, weight: 90}
    - {destination: {host: cart, subset: canary}, weight: 10}
    retries: {attempts: 3, perTryTimeout: 2s}
    timeout: 10s
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: cart, namespace: shop}
spec:
  host: cart
  trafficPolicy:
    connectionPool: {http: {h2UpgradePolicy: UPGRADE}}
    outlierDetection: {consecutive5xxErrors: 3, interval: 30s, baseEjectionTime: 60s}
  subsets:
  - {name: stable, labels: {version: v1}}
  - {name: canary, labels: {version: v2}}
"#;

/// The selector of the cart Service, so that the pods above are its endpoints.
fn cart_with_pods() -> String {
    "---\napiVersion: v1\nkind: Service\nmetadata: {name: cart, namespace: shop}\nspec: {clusterIP: 10.96.1.1, selector: {app: cart}, ports: [{name: http, port: 80}]}\n".to_string()
}

#[tokio::test]
async fn a_waypoint_gets_the_virtual_service_and_destination_policy_of_its_service() {
    let store = Store::new();
    load(&store, &format!("{OBJECTS}{}{CANARY}", cart_with_pods()));
    let dir = tempfile::tempdir().unwrap();
    let addr = serve(&store, &dir).await;
    let types = [
        ADDRESS_TYPE_URL,
        ROUTE_TYPE_URL,
        L7_POLICY_TYPE_URL,
        DESTINATION_POLICY_TYPE_URL,
    ];

    let shop = Client::connect(addr, Some(("shop", "wp")), &types).await;
    assert_eq!(
        shop.held(ROUTE_TYPE_URL),
        ["HTTPRoute/shop/cart", "VirtualService/shop/cart"]
    );
    assert_eq!(shop.held(DESTINATION_POLICY_TYPE_URL), ["shop/cart"]);
    let route = &shop.routes["VirtualService/shop/cart"];
    assert_eq!(route.kind(), wp::RouteKind::VirtualService);
    let split: Vec<(&str, u32)> = route.rules[1]
        .backends
        .iter()
        .map(|b| (b.subset.as_str(), b.weight))
        .collect();
    assert_eq!(split, [("stable", 90), ("canary", 10)]);
    assert_eq!(route.rules[1].retry.as_ref().unwrap().attempts, 3);
    let policy = &shop.destination_policies["shop/cart"];
    let subsets: Vec<(&str, Vec<&str>)> = policy
        .subsets
        .iter()
        .map(|s| {
            (
                s.name.as_str(),
                s.workloads.iter().map(String::as_str).collect(),
            )
        })
        .collect();
    assert_eq!(
        subsets,
        [
            ("stable", vec!["Kubernetes//Pod/shop/cart-v1"]),
            ("canary", vec!["Kubernetes//Pod/shop/cart-v2"]),
        ]
    );
    let pool = policy
        .traffic_policy
        .as_ref()
        .and_then(|t| t.connection_pool.as_ref())
        .unwrap();
    assert!(pool.h2_upgrade);

    // Another waypoint and a ztunnel get none of it (answered, because they wait for that).
    let pay = Client::connect(addr, Some(("pay", "pay-wp")), &types).await;
    assert_eq!(pay.held(ROUTE_TYPE_URL), ["GRPCRoute/pay/pay"]);
    assert!(pay.held(DESTINATION_POLICY_TYPE_URL).is_empty());
    let ztunnel = Client::connect(addr, None, &types).await;
    assert!(ztunnel.held(ROUTE_TYPE_URL).is_empty());
    assert!(ztunnel.held(DESTINATION_POLICY_TYPE_URL).is_empty());
    assert!(!ztunnel.held(ADDRESS_TYPE_URL).is_empty());
}
