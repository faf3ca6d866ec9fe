//! The generic delta xDS client against a real tonic ADS server on loopback (plain HTTP/2, gzip
//! offered by the server): handlers of different types on one stream each get their own
//! resources, one bad resource is NACKed by name while its neighbours apply, held versions are
//! resent on reconnect, and readiness waits for every subscribed type.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ambit_core::drain;
use ambit_core::metrics::Registry;
use ambit_core::readiness::Readiness;
use ambit_proto::discovery::Resource;
use ambit_proto::discovery::aggregated_discovery_service_server::AggregatedDiscoveryServiceServer;
use ambit_proto::envoy_core::Node;
use ambit_proto::waypoint as wp;
use ambit_proto::workload as pb;
use ambit_proto::{
    ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL, L7_POLICY_TYPE_URL, ROUTE_TYPE_URL, pack_any,
};
use ambit_xds::{ControlPlane, Handler, Rejection, TokenSource, XdsClient, XdsConfig};
use tokio::sync::mpsc;
use tokio::time::timeout;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::Status;
use tonic::codec::CompressionEncoding;

const WAIT: Duration = Duration::from_secs(10);

#[path = "support/fake_ads.rs"]
mod fake_ads;

use fake_ads::{FakeAds, Session};

struct Server {
    addr: SocketAddr,
    sessions: mpsc::Receiver<Session>,
}

impl Server {
    /// An ADS server on a fresh loopback port that gzips responses to clients accepting it.
    async fn start() -> Self {
        let (tx, rx) = mpsc::channel(4);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let service = AggregatedDiscoveryServiceServer::new(FakeAds { sessions: tx })
            .send_compressed(CompressionEncoding::Gzip);
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        Self { addr, sessions: rx }
    }

    fn config(&self) -> XdsConfig {
        XdsConfig {
            control_plane: ControlPlane {
                address: format!("http://127.0.0.1:{}", self.addr.port()),
                root_ca: None,
                server_name: None,
                token: TokenSource::None,
                cluster_id: "Kubernetes".into(),
                headers: Vec::new(),
                connect_timeout: Duration::from_secs(5),
            },
            node: node(),
            backoff_initial: Duration::from_millis(10),
            backoff_max: Duration::from_millis(200),
        }
    }

    async fn next_session(&mut self) -> Session {
        timeout(WAIT, self.sessions.recv())
            .await
            .expect("client did not open a stream within 10s")
            .expect("server gone")
    }
}

fn node() -> Node {
    Node {
        id: "waypoint~10.0.0.9~waypoint-abc.demo~demo.svc.cluster.local".into(),
        ..Default::default()
    }
}

/// What one handler was given, call by call: (upserted names, removed names).
type Calls = Arc<Mutex<Vec<(Vec<String>, Vec<String>)>>>;

/// A handler recording its calls and refusing the resources `refuse` names.
fn recorder<M>(refuse: &'static [&'static str]) -> (Calls, impl Handler<M>) {
    let calls: Calls = Arc::default();
    let seen = calls.clone();
    let handler = move |upserts: &[(String, M)], removals: &[String]| {
        let names: Vec<String> = upserts.iter().map(|(n, _)| n.clone()).collect();
        seen.lock()
            .unwrap()
            .push((names.clone(), removals.to_vec()));
        names
            .into_iter()
            .filter(|n| refuse.contains(&n.as_str()))
            .map(|name| Rejection {
                name,
                reason: "refused by the test handler".into(),
            })
            .collect()
    };
    (calls, handler)
}

fn resource(name: &str, version: &str, any: prost_types::Any) -> Resource {
    Resource {
        name: name.into(),
        version: version.into(),
        resource: Some(any),
        ..Default::default()
    }
}

fn workload(uid: &str, version: &str) -> Resource {
    let address = pb::Address {
        r#type: Some(pb::address::Type::Workload(pb::Workload {
            uid: uid.into(),
            name: "echo-1".into(),
            namespace: "demo".into(),
            ..Default::default()
        })),
    };
    resource(uid, version, pack_any(&address))
}

fn route(name: &str, version: &str) -> Resource {
    let route = wp::Route {
        namespace: "demo".into(),
        name: name.rsplit('/').next().unwrap().into(),
        ..Default::default()
    };
    resource(name, version, pack_any(&route))
}

fn policy(name: &str, version: &str) -> Resource {
    let policy = wp::Policy {
        namespace: "demo".into(),
        name: name.rsplit('/').next().unwrap().into(),
        ..Default::default()
    };
    resource(name, version, pack_any(&policy))
}

fn start(client: XdsClient) -> drain::DrainTrigger {
    let (trigger, watcher) = drain::new();
    tokio::spawn(client.run(watcher));
    trigger
}

#[tokio::test]
async fn two_types_on_one_stream_each_reach_their_own_handler() {
    let mut server = Server::start().await;
    let readiness = Readiness::new();
    let metrics = Registry::new();
    let (addresses, address_handler) = recorder::<pb::Address>(&[]);
    let (routes, route_handler) = recorder::<wp::Route>(&[]);
    let _drain = start(
        XdsClient::builder(server.config(), metrics.clone())
            .subscribe::<pb::Address>(address_handler)
            .subscribe::<wp::Route>(route_handler)
            .ready(Some(readiness.register("xds")))
            .build(),
    );
    let mut session = server.next_session().await;
    let accepted = session
        .metadata
        .get("grpc-accept-encoding")
        .map(|v| v.to_str().unwrap().to_string());
    assert!(
        accepted.as_deref().is_some_and(|v| v.contains("gzip")),
        "the client accepts gzip: {accepted:?}"
    );

    // One wildcard request per type, in subscription order, naming the caller's node.
    let first = session.next_request().await;
    let second = session.next_request().await;
    assert_eq!(first.type_url, ADDRESS_TYPE_URL);
    assert_eq!(second.type_url, ROUTE_TYPE_URL);
    for r in [&first, &second] {
        assert!(r.resource_names_subscribe.is_empty(), "wildcard");
        assert!(r.initial_resource_versions.is_empty());
        assert_eq!(r.node.as_ref().unwrap().id, node().id);
    }

    let ack = session
        .push(
            ADDRESS_TYPE_URL,
            "a1",
            vec![workload("Kubernetes//Pod/demo/echo-1", "1")],
            &[],
        )
        .await;
    assert!(ack.error_detail.is_none());
    let ack = session
        .push(
            ROUTE_TYPE_URL,
            "r1",
            vec![route("HTTPRoute/demo/echo", "1")],
            &["HTTPRoute/demo/old"],
        )
        .await;
    assert!(ack.error_detail.is_none());

    assert_eq!(
        *addresses.lock().unwrap(),
        vec![(vec!["Kubernetes//Pod/demo/echo-1".to_string()], vec![])]
    );
    assert_eq!(
        *routes.lock().unwrap(),
        vec![(
            vec!["HTTPRoute/demo/echo".to_string()],
            vec!["HTTPRoute/demo/old".to_string()]
        )]
    );

    // A type nobody subscribed to reaches no handler and is NACKed.
    let nack = session
        .push(AUTHORIZATION_TYPE_URL, "z1", vec![], &[])
        .await;
    let detail = nack.error_detail.expect("an unsubscribed type is NACKed");
    assert_eq!(
        detail.message,
        format!("{AUTHORIZATION_TYPE_URL}: type not subscribed by this client")
    );
    assert_eq!(addresses.lock().unwrap().len(), 1);
    assert_eq!(routes.lock().unwrap().len(), 1);

    let text = metrics.render();
    for url in [ADDRESS_TYPE_URL, ROUTE_TYPE_URL] {
        assert!(
            text.contains(&format!("istio_xds_message_total{{url=\"{url}\"}} 1")),
            "{text}"
        );
    }
    assert!(
        text.contains(&format!(
            "ambit_xds_rejected_resources_total{{url=\"{AUTHORIZATION_TYPE_URL}\"}} 1"
        )),
        "{text}"
    );
}

#[tokio::test]
async fn one_bad_resource_is_nacked_by_name_while_the_rest_apply_and_only_good_ones_are_held() {
    let mut server = Server::start().await;
    let metrics = Registry::new();
    let (routes, route_handler) = recorder::<wp::Route>(&["HTTPRoute/demo/refused"]);
    let _drain = start(
        XdsClient::builder(server.config(), metrics.clone())
            .subscribe::<wp::Route>(route_handler)
            .build(),
    );
    let mut session = server.next_session().await;
    assert_eq!(session.next_request().await.type_url, ROUTE_TYPE_URL);

    let nack = session
        .push(
            ROUTE_TYPE_URL,
            "r1",
            vec![
                route("HTTPRoute/demo/a", "va"),
                route("HTTPRoute/demo/refused", "v1"),
                // A Policy where a Route belongs: does not decode as a Route.
                policy("HTTPRoute/demo/wrong-type", "v1"),
                route("HTTPRoute/demo/b", "vb"),
                route("HTTPRoute/demo/gone", "vg"),
            ],
            &[],
        )
        .await;
    let detail = nack.error_detail.expect("a NACK carries the reasons");
    assert!(
        detail
            .message
            .contains("HTTPRoute/demo/refused: refused by the test handler"),
        "{}",
        detail.message
    );
    assert!(
        detail.message.contains(
            "HTTPRoute/demo/wrong-type: protobuf Any has type URL \"type.googleapis.com/ambit.waypoint.v1.Policy\""
        ),
        "the decode failure names the resource and the type found: {}",
        detail.message
    );
    for good in [
        "HTTPRoute/demo/a",
        "HTTPRoute/demo/b",
        "HTTPRoute/demo/gone",
    ] {
        assert!(!detail.message.contains(good), "{}", detail.message);
    }
    // Everything that decoded reached the handler, in order; the undecodable one did not.
    assert_eq!(
        routes.lock().unwrap()[0].0,
        vec![
            "HTTPRoute/demo/a",
            "HTTPRoute/demo/refused",
            "HTTPRoute/demo/b",
            "HTTPRoute/demo/gone"
        ]
    );
    let ack = session
        .push(ROUTE_TYPE_URL, "r2", vec![], &["HTTPRoute/demo/gone"])
        .await;
    assert!(ack.error_detail.is_none());
    assert!(
        metrics.render().contains(&format!(
            "ambit_xds_rejected_resources_total{{url=\"{ROUTE_TYPE_URL}\"}} 2"
        )),
        "{}",
        metrics.render()
    );

    // The server ends the stream; the client resumes with what it holds.
    session
        .responses
        .send(Err(Status::unavailable("going away")))
        .await
        .unwrap();
    drop(session);
    let mut session = server.next_session().await;
    let resumed = session.next_request().await;
    let mut held: Vec<_> = resumed.initial_resource_versions.into_iter().collect();
    held.sort();
    assert_eq!(
        held,
        vec![
            ("HTTPRoute/demo/a".to_string(), "va".to_string()),
            ("HTTPRoute/demo/b".to_string(), "vb".to_string()),
        ],
        "refused, undecodable and removed resources are not held"
    );
}

#[tokio::test]
async fn readiness_waits_for_a_response_of_every_subscribed_type() {
    let mut server = Server::start().await;
    let readiness = Readiness::new();
    let (_, address_handler) = recorder::<pb::Address>(&[]);
    let (_, route_handler) = recorder::<wp::Route>(&[]);
    let (_, policy_handler) = recorder::<wp::Policy>(&[]);
    let _drain = start(
        XdsClient::builder(server.config(), Registry::new())
            .subscribe::<pb::Address>(address_handler)
            .subscribe::<wp::Route>(route_handler)
            .subscribe::<wp::Policy>(policy_handler)
            .ready(Some(readiness.register("xds")))
            .build(),
    );
    let mut session = server.next_session().await;
    let mut order = Vec::new();
    for _ in 0..3 {
        order.push(session.next_request().await.type_url);
    }
    assert_eq!(
        order,
        vec![ADDRESS_TYPE_URL, ROUTE_TYPE_URL, L7_POLICY_TYPE_URL]
    );

    // Responses in another order than the subscriptions; empty ones count.
    session.push(L7_POLICY_TYPE_URL, "p1", vec![], &[]).await;
    assert_eq!(readiness.pending(), vec!["xds".to_string()]);
    session
        .push(
            ADDRESS_TYPE_URL,
            "a1",
            vec![workload("Kubernetes//Pod/demo/echo-1", "1")],
            &[],
        )
        .await;
    assert_eq!(readiness.pending(), vec!["xds".to_string()]);
    // A second response of a type already seen does not make up for the missing one.
    session.push(L7_POLICY_TYPE_URL, "p2", vec![], &[]).await;
    assert!(!readiness.is_ready());
    session.push(ROUTE_TYPE_URL, "r1", vec![], &[]).await;
    assert!(readiness.is_ready(), "ready once every type arrived");
}
