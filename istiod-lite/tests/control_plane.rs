//! istiod-lite in process over real TLS on loopback, with ztunnel's own xDS and CA clients:
//! translation reaches the client, changes arrive as deltas, a reconnect with held versions gets
//! nothing it has, and the CA signs only for pods on the caller's node; the binary closes xDS
//! streams and exits promptly on SIGTERM.

mod support;
use support::eventually;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ambit_core::metrics::Registry;
use ambit_core::readiness::Readiness;
use ambit_identity::Identity;
use ambit_identity::store::{CertStore, StoreConfig};
use ambit_mesh::parse_documents;
use ambit_mesh::translate::{Cluster, MeshSettings, translate};
use ambit_proto::ca::istio_certificate_service_client::IstioCertificateServiceClient;
use ambit_proto::ca::istio_certificate_service_server::IstioCertificateServiceServer;
use ambit_proto::discovery::DeltaDiscoveryRequest;
use ambit_proto::discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use ambit_proto::discovery::aggregated_discovery_service_server::AggregatedDiscoveryServiceServer;
use ambit_proto::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};
use ambit_xds::{CaClient, ControlPlane};
use istiod_lite::auth::TokenFileAuthenticator;
use istiod_lite::ca::{CaService, load_or_create};
use istiod_lite::store::Store;
use istiod_lite::xds::XdsServer;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::Server;
use ztunnel::mesh::MeshState;

const OBJECTS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: demo, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: demo, labels: {app: client}}
spec: {nodeName: node-1, serviceAccountName: client}
status: {podIP: 10.244.1.2}
---
apiVersion: v1
kind: Pod
metadata: {name: echo, namespace: demo, labels: {app: echo}}
spec: {nodeName: node-2, serviceAccountName: echo}
status: {podIP: 10.244.2.2}
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: demo}
spec: {selector: {app: echo}, clusterIP: 10.96.0.10, ports: [{port: 80, targetPort: 8080}]}
"#;

const POLICY: &str = r#"
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-client, namespace: demo}
spec: {rules: [{from: [{source: {principals: [cluster.local/ns/demo/sa/client]}}]}]}
"#;

fn load(store: &Store, text: &str) {
    let (objects, errors) = parse_documents(text, "test.yaml");
    assert!(errors.is_empty(), "{errors:?}");
    let cluster = Cluster::from_objects(objects);
    let resources = translate(&cluster, &MeshSettings::default());
    store.replace(cluster, &resources);
}

struct Fixture {
    addr: SocketAddr,
    dir: tempfile::TempDir,
    store: Store,
    metrics: Registry,
}

impl Fixture {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("tokens.json"),
            r#"{"tokens": [{"token": "node-1-token", "node": "node-1"}, {"token": "node-2-token", "node": "node-2"}]}"#,
        )
        .unwrap();
        let ca = Arc::new(load_or_create(&dir.path().join("ca"), "cluster.local").unwrap());
        let store = Store::new();
        load(&store, OBJECTS);
        let metrics = Registry::new();
        let auth: istiod_lite::auth::Authenticator =
            TokenFileAuthenticator::new(dir.path().join("tokens.json")).into();
        let tls = support::serving_tls(&ca);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let ca_service = CaService {
            ca,
            store: store.clone(),
            auth: auth.clone(),
            trusted_node_accounts: istiod_lite::ca::default_trusted_node_accounts(),
            trust_domain: "cluster.local".into(),
            default_ttl: Duration::from_secs(3600),
            max_ttl: Duration::from_secs(7200),
            metrics: metrics.clone(),
        };
        let xds = XdsServer {
            store: store.clone(),
            auth,
            metrics: metrics.clone(),
            debounce: Duration::from_millis(20),
            shutdown: Default::default(),
        };
        tokio::spawn(
            Server::builder()
                .tls_config(tls)
                .unwrap()
                .add_service(IstioCertificateServiceServer::new(ca_service))
                .add_service(AggregatedDiscoveryServiceServer::new(xds))
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        Self {
            addr,
            dir,
            store,
            metrics,
        }
    }

    fn control(&self, token: Option<&str>) -> ControlPlane {
        support::control_plane(
            self.addr.port(),
            self.dir.path().join("ca/root-cert.pem"),
            token,
        )
    }
}

#[tokio::test]
async fn ztunnel_syncs_receives_deltas_and_resumes_without_resends() {
    let cp = Fixture::start().await;
    let state = MeshState::new("node-1");
    let readiness = Readiness::new();
    let _client = support::start_xds_client(cp.control(Some("node-1-token")), &state, &readiness);
    eventually("initial sync", || {
        readiness.is_ready() && state.index().len() == (2, 1)
    })
    .await;
    assert!(
        state.policies().is_empty(),
        "an empty Authorization response arrived (readiness needs it)"
    );

    load(&cp.store, &format!("{OBJECTS}{POLICY}"));
    eventually("policy pushed", || {
        state.policies().get("demo/allow-client").is_some()
    })
    .await;
    let text = cp.metrics.render();
    assert!(text.contains("ambit_xds_connected_proxies 1"), "{text}");

    // A reconnecting client that reports what it holds receives no resources.
    let channel = cp.control(Some("node-2-token")).connect().await.unwrap();
    let mut raw = AggregatedDiscoveryServiceClient::new(channel.clone());
    let snapshot = cp.store.snapshot();
    let held = |t: &str| {
        snapshot.types[t]
            .iter()
            .map(|(n, e)| (n.clone(), e.version.clone()))
            .collect()
    };
    let requests = vec![
        DeltaDiscoveryRequest {
            type_url: ADDRESS_TYPE_URL.into(),
            initial_resource_versions: held(ADDRESS_TYPE_URL),
            ..Default::default()
        },
        DeltaDiscoveryRequest {
            type_url: AUTHORIZATION_TYPE_URL.into(),
            initial_resource_versions: held(AUTHORIZATION_TYPE_URL),
            ..Default::default()
        },
    ];
    let mut request = tonic::Request::new(tokio_stream::iter(requests));
    request
        .metadata_mut()
        .insert("authorization", "Bearer node-2-token".parse().unwrap());
    let mut responses = raw
        .delta_aggregated_resources(request)
        .await
        .unwrap()
        .into_inner();
    for _ in 0..2 {
        let response = tokio::time::timeout(Duration::from_secs(5), responses.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(
            response.resources.is_empty() && response.removed_resources.is_empty(),
            "nothing resent: {response:?}"
        );
    }

    // Unauthenticated streams are refused.
    let mut raw = AggregatedDiscoveryServiceClient::new(channel);
    let refused = raw
        .delta_aggregated_resources(tokio_stream::iter(Vec::<DeltaDiscoveryRequest>::new()))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
}

#[tokio::test]
async fn the_ca_signs_only_for_pods_on_the_callers_node() {
    let cp = Fixture::start().await;
    let store = CertStore::new(
        Arc::new(CaClient::new(cp.control(Some("node-1-token")), true)),
        StoreConfig {
            initial_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_millis(50),
            ..StoreConfig::default()
        },
    );
    let client = Identity::new("cluster.local", "demo", "client").unwrap();
    let cert = store
        .get(&client)
        .await
        .expect("a pod with this account runs on node-1");
    assert_eq!(cert.identity(), &client);
    let lifetime = cert.not_after().duration_since(cert.not_before()).unwrap();
    assert!(
        lifetime <= Duration::from_secs(7200),
        "capped at the maximum: {lifetime:?}"
    );

    let echo = Identity::new("cluster.local", "demo", "echo").unwrap();
    let refused = store.get(&echo).await.unwrap_err().to_string();
    assert!(
        refused.contains("no pod with service account demo/echo runs on node node-1"),
        "{refused}"
    );

    let anonymous = CertStore::new(
        Arc::new(CaClient::new(cp.control(None), true)),
        StoreConfig::default(),
    );
    let refused = anonymous.get(&client).await.unwrap_err().to_string();
    assert!(refused.contains("no bearer token"), "{refused}");

    // A CSR whose SAN is not the identity asked for.
    let csr = ambit_identity::csr::generate(&echo).unwrap();
    let channel = cp.control(None).connect().await.unwrap();
    let mut raw = IstioCertificateServiceClient::new(channel);
    let mut request = tonic::Request::new(ambit_proto::ca::IstioCertificateRequest {
        csr: csr.csr_pem,
        validity_duration: 3600,
        metadata: Some(prost_types::Struct {
            fields: [(
                "ImpersonatedIdentity".to_string(),
                prost_types::Value {
                    kind: Some(prost_types::value::Kind::StringValue(client.to_string())),
                },
            )]
            .into_iter()
            .collect(),
        }),
    });
    request
        .metadata_mut()
        .insert("authorization", "Bearer node-1-token".parse().unwrap());
    let status = raw.create_certificate(request).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status
            .message()
            .contains("CSR for spiffe://cluster.local/ns/demo/sa/client"),
        "{}",
        status.message()
    );
    let text = cp.metrics.render();
    assert!(
        text.contains("ambit_ca_refused_total{reason=\"not-on-node\"}"),
        "{text}"
    );
    assert!(text.contains("ambit_ca_signed_total 1"), "{text}");
}

#[tokio::test]
async fn the_binary_closes_xds_streams_and_exits_on_sigterm() {
    use support::{Serving, http_status};

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config");
    std::fs::create_dir(&config).unwrap();
    std::fs::write(config.join("demo.yaml"), OBJECTS).unwrap();
    let tokens = dir.path().join("tokens.json");
    std::fs::write(
        &tokens,
        r#"{"tokens": [{"token": "node-1-token", "node": "node-1"}]}"#,
    )
    .unwrap();
    let ca = dir.path().join("ca");
    let mut serving = Serving::start(&[
        "--config-dir",
        config.to_str().unwrap(),
        "--ca-dir",
        ca.to_str().unwrap(),
        "--tokens",
        tokens.to_str().unwrap(),
        "--ip",
        "127.0.0.1",
    ])
    .await;
    let deadline = tokio::time::Instant::now() + support::WAIT;
    while !matches!(
        http_status(serving.monitoring, "/ready").await,
        Some((200, _))
    ) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "istiod-lite never became ready: {}",
            serving.stderr()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A ztunnel holds an xDS stream open, as every ztunnel of a cluster does.
    let state = MeshState::new("node-1");
    let readiness = Readiness::new();
    let client_task = support::start_xds_client(
        support::control_plane(
            serving.listen.port(),
            ca.join("root-cert.pem"),
            Some("node-1-token"),
        ),
        &state,
        &readiness,
    );
    eventually("ztunnel synced", || {
        readiness.is_ready() && state.index().len() == (2, 1)
    })
    .await;

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(serving.binary.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let deadline = std::time::Instant::now() + support::WAIT;
    let status = loop {
        if let Some(status) = serving.binary.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "istiod-lite still running {:?} after SIGTERM with a connected ztunnel",
            support::WAIT
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "istiod-lite exited with {status}");
    let stderr = serving.stderr_after_exit();
    assert!(
        stderr.contains("istiod-lite stopped") && !stderr.contains("drain deadline"),
        "stopped without waiting for the deadline: {stderr}"
    );
    // The ztunnel keeps its last state while it retries.
    assert_eq!(state.index().len(), (2, 1));
    client_task.abort();
}
