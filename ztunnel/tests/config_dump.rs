//! `/config_dump` as `istioctl ztunnel-config` and Kiali read it: upstream ztunnel's field names
//! and JSON types for workloads, services, policies, certificates and the pods' live
//! connections, read over HTTP from the real admin handler while a real HBONE connection between
//! two pods' proxies (loopback, host mode) is open.

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
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::time::timeout;
use ztunnel::admin::{AdminState, admin_handler};
use ztunnel::mesh::MeshState;
use ztunnel::proxy::{ListenAddrs, PodSpec, ProxyConfig, ProxyInputs, RunningPod};
use ztunnel::socket::HostSockets;

const WAIT: Duration = Duration::from_secs(10);

/// A distinct 127.N.0.0/24 per run, away from the ranges other test binaries use.
fn subnet() -> u8 {
    static NEXT: AtomicU8 = AtomicU8::new(0);
    10 + (std::process::id() % 30) as u8 + NEXT.fetch_add(1, Ordering::Relaxed)
}

fn ip(subnet: u8, host: u8) -> IpAddr {
    IpAddr::V4(std::net::Ipv4Addr::new(127, subnet, 0, host))
}

fn apply(state: &MeshState, address: pb::address::Type, name: String) {
    let rejected = state.apply_addresses(
        &[(
            name,
            pb::Address {
                r#type: Some(address),
            },
        )],
        &[],
    );
    assert!(rejected.is_empty(), "{rejected:?}");
}

fn waypoint(ns: &str, name: &str) -> Option<pb::GatewayAddress> {
    Some(pb::GatewayAddress {
        hbone_mtls_port: 15008,
        destination: Some(pb::gateway_address::Destination::Hostname(
            pb::NamespacedHostname {
                namespace: ns.into(),
                hostname: format!("{name}.{ns}.svc.cluster.local"),
            },
        )),
    })
}

/// An application that greets each connection, then echoes.
async fn echo_app(addr: SocketAddr) {
    let listener = TcpListener::bind(addr).await.unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = stream.write_all(b"hello\n").await;
                let (mut r, mut w) = stream.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
}

async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
    let mut response = String::new();
    timeout(WAIT, stream.read_to_string(&mut response))
        .await
        .expect("admin answered within 10s")
        .unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, body.to_string())
}

/// Asserts `value[key]` exists with the JSON type `kind` (`string`, `number`, `bool`, `array`,
/// `object`).
fn has(value: &Value, what: &str, key: &str, kind: &str) {
    let field = &value[key];
    let ok = match kind {
        "string" => field.is_string(),
        "number" => field.is_number(),
        "bool" => field.is_boolean(),
        "array" => field.is_array(),
        "object" => field.is_object(),
        other => panic!("unknown kind {other}"),
    };
    assert!(
        ok,
        "{what}: `{key}` should be a {kind}, got {field} in {value:#}"
    );
}

fn find<'a>(list: &'a Value, key: &str, value: &str) -> &'a Value {
    list.as_array()
        .and_then(|l| l.iter().find(|v| v[key] == value))
        .unwrap_or_else(|| panic!("no entry with {key}={value} in {list:#}"))
}

#[tokio::test]
async fn config_dump_has_upstream_field_names_and_types_with_live_connections() {
    let net = subnet();
    let ca =
        CertificateAuthority::generate_root("cluster.local", Duration::from_secs(86400)).unwrap();
    let certs = CertStore::new(Arc::new(ca), StoreConfig::default());
    let state = MeshState::new("node-1");
    let inputs = ProxyInputs {
        config: Arc::new(ProxyConfig {
            connect_timeout: Duration::from_secs(5),
            ..ProxyConfig::default()
        }),
        mesh: state.clone(),
        certs: certs.clone(),
        metrics: Registry::new(),
        connections: Default::default(),
    };

    let echo_key = "demo/echo.demo.svc.cluster.local";
    let mut client = support::workload("demo", "client", &ip(net, 2).to_string(), "node-1", &[]);
    client.service_account = "client".into();
    let mut echo = support::workload(
        "demo",
        "echo-1",
        &ip(net, 3).to_string(),
        "node-1",
        &[(echo_key, &[(80, 8080)])],
    );
    echo.service_account = "echo".into();
    let mut other = support::workload("demo", "other", &ip(net, 4).to_string(), "node-2", &[]);
    other.waypoint = waypoint("demo", "waypoint");
    for w in [client, echo, other] {
        let name = w.uid.clone();
        apply(&state, pb::address::Type::Workload(w), name);
    }
    let vip = ip(net, 100);
    let service = support::service("demo", "echo", &vip.to_string(), &[(80, 8080)]);
    apply(&state, pb::address::Type::Service(service), echo_key.into());
    let mut reviews = support::service(
        "demo",
        "reviews",
        &ip(net, 101).to_string(),
        &[(9080, 9080)],
    );
    reviews.waypoint = waypoint("demo", "waypoint");
    apply(
        &state,
        pb::address::Type::Service(reviews),
        "demo/reviews.demo.svc.cluster.local".into(),
    );
    let policy = sec::Authorization {
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
                    destination_ports: vec![8080],
                    ..Default::default()
                }],
            }],
        }],
        ..Default::default()
    };
    let rejected = state.apply_policies(&[("demo/echo-allow-client".into(), policy)], &[]);
    assert!(rejected.is_empty(), "{rejected:?}");

    echo_app(SocketAddr::new(ip(net, 3), 8080)).await;
    let start = |name: &str, sa: &str, host: u8| {
        RunningPod::start(
            &inputs,
            PodSpec {
                uid: format!("Kubernetes//Pod/demo/{name}"),
                namespace: "demo".into(),
                name: name.into(),
                identity: Identity::new("cluster.local", "demo", sa).unwrap(),
            },
            Arc::new(HostSockets {
                mark: None,
                local_ip: Some(ip(net, host)),
            }),
            ListenAddrs::on(ip(net, host), &inputs.config),
        )
        .unwrap()
    };
    let client_pod = start("client", "client", 2);
    let _echo_pod = start("echo-1", "echo", 3);

    // A long connection from the client to the service, over HBONE to echo-1, kept open.
    let listener = TcpListener::bind(SocketAddr::new(ip(net, 2), 0))
        .await
        .unwrap();
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(ip(net, 2), 0)).unwrap();
    let mut conn = socket
        .connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (accepted, peer) = listener.accept().await.unwrap();
    let (trigger, watcher) = drain::new();
    {
        let inputs = inputs.clone();
        let context = client_pod.context.clone();
        let dst = SocketAddr::new(vip, 80);
        tokio::spawn(async move {
            ztunnel::proxy::outbound::proxy(&inputs, &context, accepted, peer, dst, watcher).await;
        });
    }
    let mut greeting = [0u8; 6];
    timeout(WAIT, conn.read_exact(&mut greeting))
        .await
        .expect("greeting within 10s")
        .unwrap();
    conn.write_all(b"ping\n").await.unwrap();
    let mut echoed = [0u8; 5];
    timeout(WAIT, conn.read_exact(&mut echoed))
        .await
        .expect("echo within 10s")
        .unwrap();
    assert_eq!(&echoed, b"ping\n");

    let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin_addr = admin.local_addr().unwrap();
    let (_admin_trigger, admin_drain) = drain::new();
    tokio::spawn(ambit_core::http::serve(
        admin,
        admin_handler(AdminState {
            mesh: state.clone(),
            certs: certs.clone(),
            log: None,
            config: vec![("CLUSTER_ID".into(), "Kubernetes".into())],
            connections: inputs.connections.clone(),
            inpod: None,
        }),
        admin_drain,
    ));

    // Both pods' certificates are fetched when they start; the connection's bytes are live.
    let deadline = tokio::time::Instant::now() + WAIT;
    let dump = loop {
        let (status, body) = get(admin_addr, "/config_dump").await;
        assert_eq!(status, 200, "{body}");
        let dump: Value = serde_json::from_str(&body).expect("config_dump is JSON");
        let available = dump["certificates"]
            .as_array()
            .is_some_and(|c| c.len() == 2 && c.iter().all(|c| c["state"] == "Available"));
        let counted = dump["workloadState"]["Kubernetes//Pod/demo/client"]["connections"]
            ["outbound"][0]["bytesReceived"]
            .as_u64()
            .is_some_and(|b| b >= 5);
        if available && counted {
            assert!(!body.contains("PRIVATE KEY"), "a dump never shows keys");
            break dump;
        }
        assert!(tokio::time::Instant::now() < deadline, "{dump:#}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    for (key, kind) in [
        ("workloads", "array"),
        ("services", "array"),
        ("policies", "array"),
        ("certificates", "array"),
        ("workloadState", "object"),
        ("staticConfig", "object"),
        ("version", "object"),
        ("config", "object"),
    ] {
        has(&dump, "dump", key, kind);
    }
    assert_eq!(dump["config"]["CLUSTER_ID"], "Kubernetes");
    for key in ["version", "gitRevision", "rustVersion", "buildProfile"] {
        has(&dump["version"], "version", key, "string");
    }

    // Workloads.
    let workload = find(&dump["workloads"], "name", "echo-1");
    for (key, kind) in [
        ("uid", "string"),
        ("workloadIps", "array"),
        ("protocol", "string"),
        ("name", "string"),
        ("namespace", "string"),
        ("serviceAccount", "string"),
        ("trustDomain", "string"),
        ("node", "string"),
        ("status", "string"),
        ("workloadName", "string"),
        ("workloadType", "string"),
        ("canonicalName", "string"),
        ("canonicalRevision", "string"),
        ("clusterId", "string"),
        ("network", "string"),
        ("authorizationPolicies", "array"),
        ("services", "array"),
        ("capacity", "number"),
    ] {
        has(workload, "workload", key, kind);
    }
    assert_eq!(workload["uid"], "Kubernetes//Pod/demo/echo-1");
    assert_eq!(workload["workloadIps"][0], ip(net, 3).to_string());
    assert_eq!(workload["protocol"], "HBONE");
    assert_eq!(workload["status"], "Healthy");
    assert_eq!(workload["serviceAccount"], "echo");
    assert_eq!(workload["services"][0], echo_key);
    assert!(workload.get("waypoint").is_none(), "{workload}");
    let other = find(&dump["workloads"], "name", "other");
    assert_eq!(other["node"], "node-2");
    has(
        &other["waypoint"],
        "workload waypoint",
        "destination",
        "string",
    );
    has(
        &other["waypoint"],
        "workload waypoint",
        "hboneMtlsPort",
        "number",
    );
    assert_eq!(
        other["waypoint"]["destination"],
        "demo/waypoint.demo.svc.cluster.local"
    );

    // Services.
    let echo = find(&dump["services"], "name", "echo");
    for (key, kind) in [
        ("name", "string"),
        ("namespace", "string"),
        ("hostname", "string"),
        ("vips", "array"),
        ("ports", "object"),
        ("endpoints", "object"),
        ("subjectAltNames", "array"),
    ] {
        has(echo, "service", key, kind);
    }
    assert_eq!(echo["hostname"], "echo.demo.svc.cluster.local");
    assert_eq!(echo["vips"][0], format!("/{vip}"));
    assert_eq!(echo["ports"]["80"], 8080);
    let endpoint = &echo["endpoints"]["Kubernetes//Pod/demo/echo-1"];
    has(endpoint, "endpoint", "workloadUid", "string");
    has(endpoint, "endpoint", "port", "object");
    has(endpoint, "endpoint", "status", "string");
    assert_eq!(endpoint["port"]["80"], 8080);
    let reviews = find(&dump["services"], "name", "reviews");
    assert_eq!(
        reviews["waypoint"]["destination"],
        "demo/waypoint.demo.svc.cluster.local"
    );
    assert_eq!(reviews["waypoint"]["hboneMtlsPort"], 15008);

    // Policies.
    let policy = find(&dump["policies"], "name", "echo-allow-client");
    for (key, kind) in [
        ("name", "string"),
        ("namespace", "string"),
        ("scope", "string"),
        ("action", "string"),
        ("rules", "array"),
        ("dryRun", "bool"),
    ] {
        has(policy, "policy", key, kind);
    }
    assert_eq!(policy["scope"], "Namespace");
    assert_eq!(policy["action"], "Allow");
    let first = &policy["rules"][0][0][0];
    assert_eq!(
        first["principals"][0]["Exact"],
        "cluster.local/ns/demo/sa/client"
    );
    assert_eq!(first["destinationPorts"][0], 8080);

    // Certificates.
    let cert = find(
        &dump["certificates"],
        "identity",
        "spiffe://cluster.local/ns/demo/sa/echo",
    );
    for (key, kind) in [
        ("identity", "string"),
        ("state", "string"),
        ("certChain", "array"),
        ("rootCerts", "array"),
    ] {
        has(cert, "certificate", key, kind);
    }
    for entry in [&cert["certChain"][0], &cert["rootCerts"][0]] {
        for key in ["pem", "serialNumber", "validFrom", "expirationTime"] {
            has(entry, "certificate entry", key, "string");
        }
        let serial = entry["serialNumber"].as_str().unwrap_or_default();
        assert!(
            !serial.is_empty() && serial.bytes().all(|b| b.is_ascii_digit()),
            "{entry}"
        );
    }

    // Live connections, under the pod that carries them.
    let state_of = |uid: &str| dump["workloadState"][uid].clone();
    let client_state = state_of("Kubernetes//Pod/demo/client");
    has(&client_state, "workloadState", "state", "string");
    has(&client_state, "workloadState", "info", "object");
    for key in ["name", "namespace", "trustDomain", "serviceAccount"] {
        has(&client_state["info"], "workloadState.info", key, "string");
    }
    assert_eq!(client_state["info"]["name"], "client");
    let outbound = &client_state["connections"]["outbound"][0];
    for (key, kind) in [
        ("src", "string"),
        ("originalDst", "string"),
        ("actualDst", "string"),
        ("protocol", "string"),
        ("peerIdentity", "string"),
        ("bytesSent", "number"),
        ("bytesReceived", "number"),
    ] {
        has(outbound, "outbound connection", key, kind);
    }
    assert_eq!(outbound["src"], peer.to_string());
    assert_eq!(outbound["originalDst"], format!("{vip}:80"));
    assert_eq!(outbound["actualDst"], format!("{}:15008", ip(net, 3)));
    assert_eq!(outbound["protocol"], "HBONE");
    assert_eq!(
        outbound["peerIdentity"],
        "spiffe://cluster.local/ns/demo/sa/echo"
    );
    let inbound = &state_of("Kubernetes//Pod/demo/echo-1")["connections"]["inbound"][0];
    assert_eq!(inbound["originalDst"], "echo.demo.svc.cluster.local");
    assert_eq!(inbound["actualDst"], format!("{}:8080", ip(net, 3)));
    assert_eq!(
        inbound["peerIdentity"],
        "spiffe://cluster.local/ns/demo/sa/client"
    );

    // Closed, the connection leaves the table.
    drop(conn);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (_, body) = get(admin_addr, "/config_dump").await;
        let dump: Value = serde_json::from_str(&body).unwrap();
        let open = dump["workloadState"]
            .as_object()
            .map_or(0, |pods| pods.len());
        if open == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{:#}",
            dump["workloadState"]
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(trigger);
}
