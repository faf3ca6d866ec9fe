//! The delta xDS client against a real tonic ADS server over TLS on loopback: subscription order,
//! authentication metadata, ACK/NACK, last-good state, removals, resume with held versions, and
//! readiness only after both types arrived.

#[path = "../../crates/xds/tests/support/fake_ads.rs"]
mod fake_ads;
mod support;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use ambit_core::drain;
use ambit_core::metrics::Registry;
use ambit_core::readiness::Readiness;
use ambit_identity::ca::CertificateAuthority;
use ambit_proto::discovery::Resource;
use ambit_proto::discovery::aggregated_discovery_service_server::AggregatedDiscoveryServiceServer;
use ambit_proto::envoy_core::Node;
use ambit_proto::security as sec;
use ambit_proto::workload as pb;
use ambit_proto::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL, pack_any};
use ambit_xds::{ControlPlane, TokenSource, XdsConfig};
use support::tls_server::TlsFixture;
use tokio::sync::{Mutex, mpsc};
use tokio::time::timeout;
use tonic::Status;
use ztunnel::mesh::MeshState;

use fake_ads::{FakeAds, Session};

const WAIT: Duration = Duration::from_secs(10);

struct ControlPlaneFixture {
    addr: SocketAddr,
    sessions: Arc<Mutex<mpsc::Receiver<Session>>>,
    tls: TlsFixture,
}

impl ControlPlaneFixture {
    async fn start() -> Self {
        let tls = TlsFixture::new();
        let (tx, rx) = mpsc::channel(4);
        let addr = TlsFixture::spawn(tls.server().add_service(
            AggregatedDiscoveryServiceServer::new(FakeAds { sessions: tx }),
        ))
        .await;
        Self {
            addr,
            sessions: Arc::new(Mutex::new(rx)),
            tls,
        }
    }

    fn control_plane(&self, token: TokenSource) -> ControlPlane {
        self.tls.control_plane(self.addr, token)
    }

    async fn next_session(&self) -> Session {
        timeout(WAIT, self.sessions.lock().await.recv())
            .await
            .expect("client did not open a stream within 10s")
            .expect("server gone")
    }
}

fn node() -> Node {
    Node {
        id: "ztunnel~10.0.0.1~ztunnel-abc.istio-system~istio-system.svc.cluster.local".into(),
        ..Default::default()
    }
}

fn start_client(
    control: ControlPlane,
    state: &MeshState,
    readiness: &Readiness,
    metrics: &Registry,
) -> drain::DrainTrigger {
    let (trigger, watcher) = drain::new();
    let client = ztunnel::xds::client(
        XdsConfig {
            control_plane: control,
            node: node(),
            backoff_initial: Duration::from_millis(10),
            backoff_max: Duration::from_millis(200),
        },
        state,
        metrics.clone(),
        Some(readiness.register("xds")),
    );
    tokio::spawn(client.run(watcher));
    trigger
}

fn address_resource(name: &str, version: &str, address: pb::Address) -> Resource {
    Resource {
        name: name.into(),
        version: version.into(),
        resource: Some(pack_any(&address)),
        ..Default::default()
    }
}

fn workload_resource(w: pb::Workload, version: &str) -> Resource {
    let name = w.uid.clone();
    address_resource(
        &name,
        version,
        pb::Address {
            r#type: Some(pb::address::Type::Workload(w)),
        },
    )
}

fn service_resource(s: pb::Service, version: &str) -> Resource {
    let name = s.resource_name();
    address_resource(
        &name,
        version,
        pb::Address {
            r#type: Some(pb::address::Type::Service(s)),
        },
    )
}

fn allow_policy(ns: &str, name: &str) -> sec::Authorization {
    sec::Authorization {
        name: name.into(),
        namespace: ns.into(),
        scope: sec::Scope::Namespace as i32,
        action: sec::Action::Allow as i32,
        rules: vec![sec::Rule {
            clauses: vec![sec::Clause {
                matches: vec![sec::Match {
                    destination_ports: vec![8080],
                    ..Default::default()
                }],
            }],
        }],
        ..Default::default()
    }
}

fn policy_resource(p: sec::Authorization, version: &str) -> Resource {
    Resource {
        name: p.resource_name(),
        version: version.into(),
        resource: Some(pack_any(&p)),
        ..Default::default()
    }
}

fn echo_workload() -> pb::Workload {
    support::workload(
        "demo",
        "echo-1",
        "10.1.0.5",
        "node-1",
        &[("demo/echo.demo.svc.cluster.local", &[(80, 8080)])],
    )
}

fn echo_service() -> pb::Service {
    support::service("demo", "echo", "10.96.0.10", &[(80, 8080)])
}

#[tokio::test]
async fn subscribes_in_order_with_credentials_applies_acks_and_becomes_ready() {
    let cp = ControlPlaneFixture::start().await;
    let state = MeshState::new("node-1");
    let readiness = Readiness::new();
    let metrics = Registry::new();
    let _drain = start_client(
        cp.control_plane(TokenSource::Static("secret-token".into())),
        &state,
        &readiness,
        &metrics,
    );
    let mut session = cp.next_session().await;
    assert_eq!(
        session.metadata.get("authorization").unwrap(),
        "Bearer secret-token"
    );
    assert_eq!(session.metadata.get("clusterid").unwrap(), "lab-cluster");
    assert_eq!(session.metadata.get("x-extra").unwrap(), "yes");

    let first = session.next_request().await;
    let second = session.next_request().await;
    assert_eq!(first.type_url, ADDRESS_TYPE_URL);
    assert_eq!(second.type_url, AUTHORIZATION_TYPE_URL);
    for r in [&first, &second] {
        assert!(
            r.resource_names_subscribe.is_empty(),
            "wildcard subscription"
        );
        assert!(r.initial_resource_versions.is_empty());
        assert_eq!(r.node.as_ref().unwrap().id, node().id);
    }

    let ack = session
        .push(
            ADDRESS_TYPE_URL,
            "n1",
            vec![
                workload_resource(echo_workload(), "1"),
                service_resource(echo_service(), "1"),
            ],
            &[],
        )
        .await;
    assert!(ack.error_detail.is_none(), "valid resources are ACKed");
    assert_eq!(state.index().len(), (1, 1));
    assert_eq!(readiness.pending(), vec!["xds".to_string()]);

    // An empty Authorization response is what completes the initial sync.
    let ack = session
        .push(AUTHORIZATION_TYPE_URL, "n2", vec![], &[])
        .await;
    assert!(ack.error_detail.is_none());
    assert!(readiness.is_ready(), "ready once both types arrived");

    let ack = session
        .push(
            AUTHORIZATION_TYPE_URL,
            "n3",
            vec![policy_resource(allow_policy("demo", "allow-8080"), "1")],
            &[],
        )
        .await;
    assert!(ack.error_detail.is_none());
    assert!(state.policies().get("demo/allow-8080").is_some());

    let text = metrics.render();
    assert!(
        text.contains(
            "istio_xds_message_total{url=\"type.googleapis.com/istio.workload.Address\"} 1"
        ),
        "{text}"
    );
}

#[tokio::test]
async fn invalid_resources_are_nacked_by_name_and_the_last_good_state_keeps_serving() {
    let cp = ControlPlaneFixture::start().await;
    let state = MeshState::new("node-1");
    let readiness = Readiness::new();
    let _drain = start_client(
        cp.control_plane(TokenSource::None),
        &state,
        &readiness,
        &Registry::new(),
    );
    let mut session = cp.next_session().await;
    assert!(session.metadata.get("authorization").is_none());
    session.next_request().await;
    session.next_request().await;
    session
        .push(
            ADDRESS_TYPE_URL,
            "a1",
            vec![workload_resource(echo_workload(), "1")],
            &[],
        )
        .await;

    let mut broken = echo_workload();
    broken.addresses = vec![vec![10, 1, 0]];
    let mut bad_policy = allow_policy("demo", "bad");
    bad_policy.rules[0].clauses[0].matches[0].source_ips = vec![sec::Address {
        address: vec![10, 0, 0, 0],
        length: 40,
    }];
    let nack = session
        .push(
            ADDRESS_TYPE_URL,
            "a2",
            vec![
                workload_resource(broken, "2"),
                service_resource(echo_service(), "1"),
                Resource {
                    name: "demo/garbage".into(),
                    version: "1".into(),
                    resource: Some(prost_types::Any {
                        type_url: ADDRESS_TYPE_URL.into(),
                        value: vec![0xff, 0xff, 0xff],
                    }),
                    ..Default::default()
                },
            ],
            &[],
        )
        .await;
    let detail = nack.error_detail.expect("a NACK carries the reasons");
    assert!(
        detail.message.contains("Kubernetes//Pod/demo/echo-1: "),
        "{}",
        detail.message
    );
    assert!(detail.message.contains("address"), "{}", detail.message);
    assert!(
        detail.message.contains("demo/garbage: "),
        "{}",
        detail.message
    );
    // The valid service in the same response was applied, the old workload still serves.
    assert_eq!(state.index().len(), (1, 1));
    let ip: IpAddr = "10.1.0.5".parse().unwrap();
    assert!(state.index().workload_by_ip("", ip).is_some());

    let nack = session
        .push(
            AUTHORIZATION_TYPE_URL,
            "p1",
            vec![policy_resource(bad_policy, "1")],
            &[],
        )
        .await;
    let detail = nack.error_detail.expect("bad policy NACKed");
    assert!(
        detail.message.starts_with("demo/bad: "),
        "{}",
        detail.message
    );
    assert!(state.policies().is_empty());
}

#[tokio::test]
async fn removals_apply_and_reconnect_resumes_from_held_versions() {
    let cp = ControlPlaneFixture::start().await;
    let state = MeshState::new("node-1");
    let readiness = Readiness::new();
    let metrics = Registry::new();
    let _drain = start_client(
        cp.control_plane(TokenSource::None),
        &state,
        &readiness,
        &metrics,
    );
    let mut session = cp.next_session().await;
    session.next_request().await;
    session.next_request().await;
    let other = support::workload("demo", "echo-2", "10.1.0.6", "node-2", &[]);
    let mut broken = support::workload("demo", "broken", "10.1.0.7", "node-2", &[]);
    broken.addresses = vec![vec![1]];
    session
        .push(
            ADDRESS_TYPE_URL,
            "a1",
            vec![
                workload_resource(echo_workload(), "v1"),
                workload_resource(other, "v7"),
                workload_resource(broken, "v1"),
                service_resource(echo_service(), "v3"),
            ],
            &[],
        )
        .await;
    session
        .push(
            AUTHORIZATION_TYPE_URL,
            "p1",
            vec![policy_resource(allow_policy("demo", "allow"), "p9")],
            &[],
        )
        .await;
    session
        .push(
            ADDRESS_TYPE_URL,
            "a2",
            vec![],
            &["Kubernetes//Pod/demo/echo-2"],
        )
        .await;
    assert_eq!(state.index().len(), (1, 1));

    // The server ends the stream (as istiod does at max connection age).
    session
        .responses
        .send(Err(Status::unavailable("going away")))
        .await
        .unwrap();
    drop(session);

    let mut session = cp.next_session().await;
    let address = session.next_request().await;
    let authz = session.next_request().await;
    let mut held: Vec<_> = address.initial_resource_versions.into_iter().collect();
    held.sort();
    assert_eq!(
        held,
        vec![
            ("Kubernetes//Pod/demo/echo-1".to_string(), "v1".to_string()),
            (
                "demo/echo.demo.svc.cluster.local".to_string(),
                "v3".to_string()
            ),
        ],
        "removed and rejected resources are not reported as held"
    );
    assert_eq!(
        authz
            .initial_resource_versions
            .get("demo/allow")
            .map(String::as_str),
        Some("p9")
    );
    // The state kept serving across the reconnect.
    assert_eq!(state.index().len(), (1, 1));
    let text = metrics.render();
    assert!(
        text.contains("istio_xds_connection_terminations_total{reason=\"Error\"} 1"),
        "{text}"
    );
}

#[tokio::test]
async fn a_server_certificate_from_another_root_is_refused_and_retried() {
    let cp = ControlPlaneFixture::start().await;
    let other =
        CertificateAuthority::generate_root("cluster.local", Duration::from_secs(3600)).unwrap();
    let wrong_root = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(wrong_root.path(), other.root_pem()).unwrap();
    let mut control = cp.control_plane(TokenSource::None);
    control.root_ca = Some(wrong_root.path().to_path_buf());
    let state = MeshState::new("node-1");
    let readiness = Readiness::new();
    let metrics = Registry::new();
    let _drain = start_client(control, &state, &readiness, &metrics);
    // Several attempts fail; the client never gets a stream and never becomes ready.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let text = metrics.render();
        if let Some(line) = text.lines().find(|l| {
            l.starts_with("istio_xds_connection_terminations_total{reason=\"ConnectionError\"}")
        }) {
            let count: u64 = line.rsplit(' ').next().unwrap().parse().unwrap();
            if count >= 3 {
                break;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no retries seen: {text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!readiness.is_ready());
    assert!(
        timeout(Duration::from_millis(100), cp.sessions.lock().await.recv())
            .await
            .is_err(),
        "no stream may be established with an untrusted server"
    );
}
