//! The per-pod proxies on loopback (host mode): real listeners, real mutual TLS with certificates
//! from a CA, real HBONE between two pods' proxies, a real application. What is not exercised
//! here is the in-pod redirect (tested with network namespaces elsewhere): connections are handed
//! to the outbound and plaintext handlers with their original destination, exactly as the
//! listeners do after `SO_ORIGINAL_DST`.

mod support;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use ambit_core::drain;
use ambit_core::metrics::Registry;
use ambit_identity::Identity;
use ambit_identity::ca::CertificateAuthority;
use ambit_identity::store::{CertStore, StoreConfig};
use ambit_proto::security as sec;
use ambit_proto::workload as pb;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::time::timeout;
use ztunnel::mesh::MeshState;
use ztunnel::proxy::outbound::{Route, RouteError, route};
use ztunnel::proxy::{ListenAddrs, PodSpec, ProxyConfig, ProxyInputs, RunningPod};
use ztunnel::socket::HostSockets;

const WAIT: Duration = Duration::from_secs(10);

/// A distinct 127.N.0.0/24 per test so tests can bind the fixed ztunnel ports in parallel.
fn subnet() -> u8 {
    static NEXT: AtomicU8 = AtomicU8::new(0);
    let pid_part = (std::process::id() % 50) as u8;
    50 + pid_part * 4 + NEXT.fetch_add(1, Ordering::Relaxed)
}

fn ip(subnet: u8, host: u8) -> IpAddr {
    IpAddr::V4(std::net::Ipv4Addr::new(127, subnet, 0, host))
}

struct Mesh {
    subnet: u8,
    inputs: ProxyInputs,
    state: MeshState,
    metrics: Registry,
}

fn pod_workload(
    ns: &str,
    name: &str,
    sa: &str,
    addr: IpAddr,
    services: &[(&str, &[(u32, u32)])],
) -> pb::Workload {
    let mut w = support::workload(ns, name, &addr.to_string(), "node-1", services);
    w.service_account = sa.into();
    w
}

impl Mesh {
    fn new() -> Self {
        let subnet = subnet();
        let ca =
            CertificateAuthority::generate_root("cluster.local", Duration::from_secs(86400 * 10))
                .unwrap();
        let certs = CertStore::new(Arc::new(ca), StoreConfig::default());
        let state = MeshState::new("node-1");
        let metrics = Registry::new();
        ztunnel::proxy::metrics::describe(&metrics);
        let inputs = ProxyInputs {
            config: Arc::new(ProxyConfig {
                connect_timeout: Duration::from_secs(5),
                ..ProxyConfig::default()
            }),
            mesh: state.clone(),
            certs,
            metrics: metrics.clone(),
            connections: Default::default(),
        };
        Self {
            subnet,
            inputs,
            state,
            metrics,
        }
    }

    fn ip(&self, host: u8) -> IpAddr {
        ip(self.subnet, host)
    }

    fn add(&self, workload: pb::Workload) {
        let name = workload.uid.clone();
        let rejected = self.state.apply_addresses(
            &[(
                name,
                pb::Address {
                    r#type: Some(pb::address::Type::Workload(workload)),
                },
            )],
            &[],
        );
        assert!(rejected.is_empty(), "{rejected:?}");
    }

    fn add_service(&self, service: pb::Service) {
        let name = service.resource_name();
        let rejected = self.state.apply_addresses(
            &[(
                name,
                pb::Address {
                    r#type: Some(pb::address::Type::Service(service)),
                },
            )],
            &[],
        );
        assert!(rejected.is_empty(), "{rejected:?}");
    }

    fn policy(&self, policy: sec::Authorization) {
        let name = policy.resource_name();
        let rejected = self.state.apply_policies(&[(name, policy)], &[]);
        assert!(rejected.is_empty(), "{rejected:?}");
    }

    fn start_pod(&self, ns: &str, name: &str, sa: &str, host: u8) -> RunningPod {
        RunningPod::start(
            &self.inputs,
            PodSpec {
                uid: format!("uid-{name}"),
                namespace: ns.into(),
                name: name.into(),
                identity: Identity::new("cluster.local", ns, sa).unwrap(),
            },
            Arc::new(HostSockets {
                mark: None,
                local_ip: Some(self.ip(host)),
            }),
            ListenAddrs::on(self.ip(host), &self.inputs.config),
        )
        .unwrap()
    }

    /// Makes a connection from `src` that the outbound proxy of `pod` handles as if redirected
    /// from `dst`; returns the application's side of it.
    async fn call_outbound(&self, pod: &RunningPod, src: IpAddr, dst: SocketAddr) -> TcpStream {
        self.call_outbound_sending(pod, src, dst, b"").await
    }

    /// [`call_outbound`](Self::call_outbound) with `first` already sent by the client when the
    /// proxy takes the connection, so it is read before the tunnel is answered.
    async fn call_outbound_sending(
        &self,
        pod: &RunningPod,
        src: IpAddr,
        dst: SocketAddr,
        first: &[u8],
    ) -> TcpStream {
        let (mut client, accepted, peer) = self.pair(src).await;
        client.write_all(first).await.unwrap();
        let inputs = self.inputs.clone();
        let context = pod.context.clone();
        let (_trigger, watcher) = drain::new();
        tokio::spawn(async move {
            let _trigger = _trigger;
            ztunnel::proxy::outbound::proxy(&inputs, &context, accepted, peer, dst, watcher).await;
        });
        client
    }

    async fn call_plaintext(&self, pod: &RunningPod, src: IpAddr, dst: SocketAddr) -> TcpStream {
        let (client, accepted, peer) = self.pair(src).await;
        let inputs = self.inputs.clone();
        let context = pod.context.clone();
        let (_trigger, watcher) = drain::new();
        tokio::spawn(async move {
            let _trigger = _trigger;
            ztunnel::proxy::inbound::proxy_plaintext(
                &inputs, &context, accepted, peer, dst, watcher,
            )
            .await;
        });
        client
    }

    /// A connected pair whose client end is bound to `src`.
    async fn pair(&self, src: IpAddr) -> (TcpStream, TcpStream, SocketAddr) {
        let listener = TcpListener::bind(SocketAddr::new(src, 0)).await.unwrap();
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::new(src, 0)).unwrap();
        let client = socket
            .connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, peer) = listener.accept().await.unwrap();
        (client, accepted, peer)
    }

    fn metric_lines(&self, name: &str) -> Vec<String> {
        self.metrics
            .render()
            .lines()
            .filter(|l| l.starts_with(name))
            .map(str::to_string)
            .collect()
    }
}

/// An application that answers each connection with `<its tag> saw <peer ip>\n` and then echoes.
async fn echo_app(addr: SocketAddr, tag: &'static str) {
    let listener = TcpListener::bind(addr).await.unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, peer)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let _ = stream
                    .write_all(format!("{tag} saw {}\n", peer.ip()).as_bytes())
                    .await;
                let (mut r, mut w) = stream.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
}

async fn read_line(stream: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        let n = timeout(WAIT, stream.read(&mut byte))
            .await
            .expect("no answer within 10s")
            .unwrap_or(0);
        if n == 0 || byte[0] == b'\n' {
            return String::from_utf8(out).unwrap();
        }
        out.push(byte[0]);
    }
}

/// The demo layout: `demo/client` (sa client) and `demo/other` (sa other) calling service `echo`
/// (port 80 -> 8080) backed by `demo/echo-1`.
async fn demo() -> (Mesh, RunningPod, RunningPod, RunningPod, SocketAddr) {
    let mesh = Mesh::new();
    let echo_key = "demo/echo.demo.svc.cluster.local";
    mesh.add(pod_workload("demo", "client", "client", mesh.ip(2), &[]));
    mesh.add(pod_workload("demo", "other", "other", mesh.ip(4), &[]));
    mesh.add(pod_workload(
        "demo",
        "echo-1",
        "echo",
        mesh.ip(3),
        &[(echo_key, &[(80, 8080)])],
    ));
    let vip = mesh.ip(100);
    mesh.add_service(support::service(
        "demo",
        "echo",
        &vip.to_string(),
        &[(80, 8080)],
    ));
    echo_app(SocketAddr::new(mesh.ip(3), 8080), "echo-1").await;
    let client = mesh.start_pod("demo", "client", "client", 2);
    let other = mesh.start_pod("demo", "other", "other", 4);
    let echo = mesh.start_pod("demo", "echo-1", "echo", 3);
    (mesh, client, other, echo, SocketAddr::new(vip, 80))
}

#[tokio::test]
async fn service_call_goes_over_hbone_with_identities_source_address_and_metrics() {
    let (mesh, client, _other, _echo, vip) = demo().await;
    let mut conn = mesh.call_outbound(&client, mesh.ip(2), vip).await;
    assert_eq!(
        read_line(&mut conn).await,
        format!("echo-1 saw {}", mesh.ip(2))
    );
    conn.write_all(b"ping\n").await.unwrap();
    assert_eq!(read_line(&mut conn).await, "ping");
    conn.shutdown().await.unwrap();
    let mut rest = Vec::new();
    timeout(WAIT, conn.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    drop(conn);

    // Both ends report the connection with the workload labels dashboards use.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let closed = mesh.metric_lines("istio_tcp_connections_closed_total");
        if closed.len() >= 2 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{closed:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let opened = mesh.metric_lines("istio_tcp_connections_opened_total");
    for reporter in ["source", "destination"] {
        let line = opened
            .iter()
            .find(|l| l.contains(&format!("reporter=\"{reporter}\"")))
            .unwrap_or_else(|| panic!("no {reporter} series: {opened:?}"));
        for label in [
            "source_workload=\"client\"",
            "source_workload_namespace=\"demo\"",
            "source_principal=\"spiffe://cluster.local/ns/demo/sa/client\"",
            "destination_workload=\"echo\"",
            "destination_principal=\"spiffe://cluster.local/ns/demo/sa/echo\"",
            "destination_service=\"echo.demo.svc.cluster.local\"",
            "connection_security_policy=\"mutual_tls\"",
            "response_flags=\"-\"",
            "request_protocol=\"tcp\"",
        ] {
            assert!(line.contains(label), "{label} missing in {line}");
        }
        assert!(line.ends_with(" 1"), "{line}");
    }
    // 5 bytes each way plus the greeting from the app.
    let received = mesh.metric_lines("istio_tcp_received_bytes_total");
    assert!(received.iter().all(|l| l.ends_with(" 5")), "{received:?}");
    let sent = mesh.metric_lines("istio_tcp_sent_bytes_total");
    let greeting = format!("echo-1 saw {}\n", mesh.ip(2)).len() + 5;
    assert!(
        sent.iter().all(|l| l.ends_with(&format!(" {greeting}"))),
        "{sent:?}"
    );
}

#[tokio::test]
async fn allow_policy_admits_its_principal_and_refuses_others_with_deny() {
    let (mesh, client, other, _echo, vip) = demo().await;
    mesh.policy(sec::Authorization {
        name: "echo-allow-client".into(),
        namespace: "demo".into(),
        scope: sec::Scope::Namespace as i32,
        action: sec::Action::Allow as i32,
        rules: vec![sec::Rule {
            clauses: vec![sec::Clause {
                matches: vec![sec::Match {
                    principals: vec![sec::StringMatch {
                        match_type: Some(sec::string_match::MatchType::Exact(
                            "cluster.local/ns/demo/sa/client".into(),
                        )),
                    }],
                    ..Default::default()
                }],
            }],
        }],
        ..Default::default()
    });
    let mut allowed = mesh.call_outbound(&client, mesh.ip(2), vip).await;
    assert_eq!(
        read_line(&mut allowed).await,
        format!("echo-1 saw {}", mesh.ip(2))
    );

    let mut refused = mesh.call_outbound(&other, mesh.ip(4), vip).await;
    assert_eq!(
        read_line(&mut refused).await,
        "",
        "refused connection is closed without data"
    );
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let denied: Vec<String> = mesh
            .metric_lines("istio_tcp_connections_closed_total")
            .into_iter()
            .filter(|l| l.contains("response_flags=\"DENY\""))
            .collect();
        if denied.len() == 2 {
            assert!(denied.iter().all(|l| {
                l.contains("source_principal=\"spiffe://cluster.local/ns/demo/sa/other\"")
            }));
            // Both reporters also count the refusal as a failed connection, under its flag.
            let failed = mesh.metric_lines("istio_tcp_connections_failed_total");
            assert_eq!(failed.len(), 2, "{failed:?}");
            assert!(
                failed
                    .iter()
                    .all(|l| l.contains("response_flags=\"DENY\"") && l.ends_with(" 1")),
                "{failed:?}"
            );
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{denied:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until both reporters counted a closed connection; returns the metric's lines.
async fn wait_for_both_closed(mesh: &Mesh) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let closed = mesh.metric_lines("istio_tcp_connections_closed_total");
        if closed.len() >= 2 {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{closed:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A pod-addressed call names no service: the client's ztunnel reports `unknown`, the
/// destination's the service whose target port was dialled (as upstream ztunnel guesses it), so
/// the service's dashboards show the pod's inbound traffic however it was addressed.
#[tokio::test]
async fn a_pod_addressed_call_is_reported_at_the_destination_under_the_service_of_its_port() {
    let (mesh, client, _other, _echo, _vip) = demo().await;
    let pod = SocketAddr::new(mesh.ip(3), 8080);
    let mut conn = mesh.call_outbound(&client, mesh.ip(2), pod).await;
    assert_eq!(
        read_line(&mut conn).await,
        format!("echo-1 saw {}", mesh.ip(2))
    );
    drop(conn);
    wait_for_both_closed(&mesh).await;
    let opened = mesh.metric_lines("istio_tcp_connections_opened_total");
    let service = |reporter: &str| {
        let line = opened
            .iter()
            .find(|l| l.contains(&format!("reporter=\"{reporter}\"")))
            .unwrap_or_else(|| panic!("no {reporter} series: {opened:?}"));
        line.split("destination_service=\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .map(str::to_string)
    };
    assert_eq!(service("source").as_deref(), Some("unknown"), "{opened:?}");
    assert_eq!(
        service("destination").as_deref(),
        Some("echo.demo.svc.cluster.local"),
        "{opened:?}"
    );
}

#[tokio::test]
async fn bytes_the_client_sent_before_the_tunnel_opened_arrive_once_and_are_counted() {
    let (mesh, client, _other, _echo, vip) = demo().await;
    // Sent before the outbound proxy reads anything: they go with the CONNECT, ahead of the 200.
    let mut conn = mesh
        .call_outbound_sending(&client, mesh.ip(2), vip, b"ping\n")
        .await;
    assert_eq!(
        read_line(&mut conn).await,
        format!("echo-1 saw {}", mesh.ip(2))
    );
    assert_eq!(read_line(&mut conn).await, "ping");
    conn.write_all(b"pong\n").await.unwrap();
    assert_eq!(read_line(&mut conn).await, "pong");
    conn.shutdown().await.unwrap();
    let mut rest = Vec::new();
    timeout(WAIT, conn.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    assert!(rest.is_empty(), "nothing echoed twice: {rest:?}");
    drop(conn);

    wait_for_both_closed(&mesh).await;
    // Both reporters count the early bytes with the rest: 10 bytes from the client.
    let received = mesh.metric_lines("istio_tcp_received_bytes_total");
    assert_eq!(received.len(), 2, "{received:?}");
    assert!(received.iter().all(|l| l.ends_with(" 10")), "{received:?}");
    let closed = mesh.metric_lines("istio_tcp_connections_closed_total");
    assert!(
        closed.iter().all(|l| l.contains("response_flags=\"-\"")),
        "{closed:?}"
    );
}

#[tokio::test]
async fn a_refused_tunnel_closes_a_client_that_already_sent_bytes_and_counts_deny() {
    let (mesh, _client, other, _echo, vip) = demo().await;
    // Nobody may call echo: its ztunnel answers 401 after the client's bytes were sent.
    mesh.policy(sec::Authorization {
        name: "echo-deny-all".into(),
        namespace: "demo".into(),
        scope: sec::Scope::Namespace as i32,
        action: sec::Action::Deny as i32,
        rules: vec![sec::Rule::default()],
        ..Default::default()
    });
    let mut refused = mesh
        .call_outbound_sending(&other, mesh.ip(4), vip, b"GET / HTTP/1.1\r\n\r\n")
        .await;
    assert_eq!(
        read_line(&mut refused).await,
        "",
        "refused connection is closed without data"
    );

    wait_for_both_closed(&mesh).await;
    let failed = mesh.metric_lines("istio_tcp_connections_failed_total");
    assert_eq!(failed.len(), 2, "{failed:?}");
    for reporter in ["source", "destination"] {
        assert!(
            failed
                .iter()
                .any(|l| l.contains(&format!("reporter=\"{reporter}\""))
                    && l.contains("response_flags=\"DENY\"")
                    && l.ends_with(" 1")),
            "{reporter}: {failed:?}"
        );
    }
    // Nothing reached the application, so the destination received nothing.
    let received = mesh.metric_lines("istio_tcp_received_bytes_total");
    assert!(
        received
            .iter()
            .filter(|l| l.contains("reporter=\"destination\""))
            .all(|l| l.ends_with(" 0")),
        "{received:?}"
    );
}

#[tokio::test]
async fn a_workload_that_changes_is_reported_with_its_new_labels() {
    let (mesh, client, _other, _echo, vip) = demo().await;
    let mut first = mesh.call_outbound(&client, mesh.ip(2), vip).await;
    assert_eq!(
        read_line(&mut first).await,
        format!("echo-1 saw {}", mesh.ip(2))
    );
    drop(first);
    // The client's Deployment rolls to v2: the next connection carries the new revision.
    let mut updated = pod_workload("demo", "client", "client", mesh.ip(2), &[]);
    updated.canonical_revision = "v2".into();
    mesh.add(updated);
    let mut second = mesh.call_outbound(&client, mesh.ip(2), vip).await;
    assert_eq!(
        read_line(&mut second).await,
        format!("echo-1 saw {}", mesh.ip(2))
    );
    drop(second);

    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let opened = mesh.metric_lines("istio_tcp_connections_opened_total");
        let by_revision = |revision: &str| {
            opened
                .iter()
                .filter(|l| {
                    l.contains("reporter=\"source\"")
                        && l.contains(&format!("source_canonical_revision=\"{revision}\""))
                        && l.ends_with(" 1")
                })
                .count()
        };
        if by_revision("v1") == 1 && by_revision("v2") == 1 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{opened:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn plaintext_inbound_is_admitted_unless_strict_peer_authentication_denies_it() {
    let (mesh, _client, _other, echo, _vip) = demo().await;
    let outside = mesh.ip(50);
    let app = SocketAddr::new(mesh.ip(3), 8080);
    let mut conn = mesh.call_plaintext(&echo, outside, app).await;
    assert_eq!(read_line(&mut conn).await, format!("echo-1 saw {outside}"));

    // STRICT PeerAuthentication arrives as istiod's synthesized DENY of unauthenticated peers.
    mesh.policy(sec::Authorization {
        name: "istio_converted_static_strict".into(),
        namespace: "demo".into(),
        scope: sec::Scope::Namespace as i32,
        action: sec::Action::Deny as i32,
        rules: vec![sec::Rule {
            clauses: vec![sec::Clause {
                matches: vec![sec::Match {
                    not_principals: vec![sec::StringMatch {
                        match_type: Some(sec::string_match::MatchType::Presence(())),
                    }],
                    ..Default::default()
                }],
            }],
        }],
        ..Default::default()
    });
    let mut conn = mesh.call_plaintext(&echo, outside, app).await;
    assert_eq!(read_line(&mut conn).await, "", "STRICT refuses plaintext");
}

#[tokio::test]
async fn passthrough_and_non_mesh_workloads_get_plain_tcp() {
    let (mesh, client, _other, _echo, _vip) = demo().await;
    // A workload outside the mesh (no HBONE) and an address nobody knows.
    let mut legacy = pod_workload("legacy", "db", "db", mesh.ip(60), &[]);
    legacy.tunnel_protocol = pb::TunnelProtocol::None as i32;
    mesh.add(legacy);
    echo_app(SocketAddr::new(mesh.ip(60), 5432), "db").await;
    echo_app(SocketAddr::new(mesh.ip(61), 9000), "outside").await;
    let mut conn = mesh
        .call_outbound(&client, mesh.ip(2), SocketAddr::new(mesh.ip(60), 5432))
        .await;
    assert_eq!(read_line(&mut conn).await, format!("db saw {}", mesh.ip(2)));
    let mut conn = mesh
        .call_outbound(&client, mesh.ip(2), SocketAddr::new(mesh.ip(61), 9000))
        .await;
    assert_eq!(
        read_line(&mut conn).await,
        format!("outside saw {}", mesh.ip(2))
    );
}

#[tokio::test]
async fn routing_decisions_name_their_reasons() {
    let mesh = Mesh::new();
    let echo_key = "demo/echo.demo.svc.cluster.local";
    let client = pod_workload("demo", "client", "client", mesh.ip(2), &[]);
    mesh.add(client);
    let vip = mesh.ip(100);
    mesh.add_service(support::service(
        "demo",
        "echo",
        &vip.to_string(),
        &[(80, 8080)],
    ));
    let index = mesh.state.index();
    let source = index.workload("Kubernetes//Pod/demo/client").cloned();
    let err = route(
        &index,
        "",
        15008,
        source.as_deref(),
        SocketAddr::new(vip, 80),
    )
    .unwrap_err();
    assert_eq!(
        err,
        RouteError::NoEndpoint {
            service: echo_key.into(),
            port: 80
        }
    );
    assert!(
        err.to_string()
            .contains("has no healthy endpoint for port 80")
    );
    let err = route(
        &index,
        "",
        15008,
        source.as_deref(),
        SocketAddr::new(vip, 81),
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("service {echo_key} does not expose port 81")
    );
    drop(index);

    // A waypoint bound to the service takes service-addressed traffic with the VIP authority.
    let waypoint_key = "demo/waypoint.demo.svc.cluster.local";
    mesh.add(pod_workload(
        "demo",
        "waypoint-0",
        "waypoint",
        mesh.ip(9),
        &[(waypoint_key, &[(15008, 15008)])],
    ));
    mesh.add_service(support::service(
        "demo",
        "waypoint",
        &mesh.ip(99).to_string(),
        &[(15008, 15008)],
    ));
    mesh.add(pod_workload(
        "demo",
        "echo-1",
        "echo",
        mesh.ip(3),
        &[(echo_key, &[(80, 8080)])],
    ));
    let mut with_waypoint = support::service("demo", "echo", &vip.to_string(), &[(80, 8080)]);
    with_waypoint.waypoint = Some(pb::GatewayAddress {
        destination: Some(pb::gateway_address::Destination::Hostname(
            pb::NamespacedHostname {
                namespace: "demo".into(),
                hostname: "waypoint.demo.svc.cluster.local".into(),
            },
        )),
        hbone_mtls_port: 15008,
    });
    mesh.add_service(with_waypoint);
    let index = mesh.state.index();
    match route(
        &index,
        "",
        15008,
        source.as_deref(),
        SocketAddr::new(vip, 80),
    )
    .unwrap()
    {
        Route::Hbone {
            next_hop,
            authority,
            expected,
            waypoint,
            ..
        } => {
            assert!(waypoint);
            assert_eq!(next_hop, SocketAddr::new(mesh.ip(9), 15008));
            assert_eq!(authority, SocketAddr::new(vip, 80));
            assert_eq!(
                expected[0].to_string(),
                "spiffe://cluster.local/ns/demo/sa/waypoint"
            );
        }
        other => panic!("expected the waypoint, got {other:?}"),
    }
    // Pod-addressed traffic to a pod without its own waypoint binding goes straight there.
    match route(
        &index,
        "",
        15008,
        source.as_deref(),
        SocketAddr::new(mesh.ip(3), 8080),
    )
    .unwrap()
    {
        Route::Hbone {
            next_hop,
            authority,
            waypoint,
            ..
        } => {
            assert!(!waypoint);
            assert_eq!(next_hop, SocketAddr::new(mesh.ip(3), 15008));
            assert_eq!(authority, SocketAddr::new(mesh.ip(3), 8080));
        }
        other => panic!("expected direct HBONE, got {other:?}"),
    }
    // The waypoint itself is not sent back to itself.
    let waypoint_source = index.workload("Kubernetes//Pod/demo/waypoint-0").cloned();
    match route(
        &index,
        "",
        15008,
        waypoint_source.as_deref(),
        SocketAddr::new(vip, 80),
    )
    .unwrap()
    {
        Route::Hbone {
            waypoint, next_hop, ..
        } => {
            assert!(!waypoint);
            assert_eq!(next_hop, SocketAddr::new(mesh.ip(3), 15008));
        }
        other => panic!("expected the endpoint, got {other:?}"),
    }
}

#[tokio::test]
async fn pod_shutdown_drains_then_closes_what_is_left() {
    let (mesh, client, _other, echo, vip) = demo().await;
    let mut conn = mesh.call_outbound(&client, mesh.ip(2), vip).await;
    assert_eq!(
        read_line(&mut conn).await,
        format!("echo-1 saw {}", mesh.ip(2))
    );
    // The echo pod leaves: its listeners close at once and the open tunnel is cut at the deadline.
    let outcome = echo.shutdown(Duration::from_millis(300)).await;
    assert!(
        !outcome.graceful,
        "an open connection outlived the deadline"
    );
    let mut rest = Vec::new();
    let read = timeout(WAIT, conn.read_to_end(&mut rest))
        .await
        .expect("connection closed");
    assert!(read.is_ok() || read.is_err());
    // New connections to the pod's HBONE port are refused now.
    assert!(
        TcpStream::connect(SocketAddr::new(mesh.ip(3), 15008))
            .await
            .is_err()
    );
}
