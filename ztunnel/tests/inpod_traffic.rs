//! The whole L4 data path with real capture: pods in their own network namespaces with the in-pod
//! redirection installed, pods handed to ztunnel over ZDS, applications that only dial ordinary
//! addresses. Needs root.

mod support;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::AsFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ambit_core::drain;
use ambit_core::metrics::Registry;
use ambit_core::readiness::Readiness;
use ambit_identity::ca::CertificateAuthority;
use ambit_identity::store::{CertStore, StoreConfig};
use ambit_proto::security as sec;
use ambit_proto::workload as pb;
use ambit_redirect::RedirectConfig;
use ambit_zds::WorkloadInfo;
use ambit_zds::server::{SnapshotEntry, ZdsServer};
use support::netns::{Netns, ip};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket};
use ztunnel::inpod::InPodManager;
use ztunnel::mesh::MeshState;
use ztunnel::proxy::{ProxyConfig, ProxyInputs};

const SUBNET: u8 = 41;

fn addr(host: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 198, SUBNET, host))
}

/// Pods on one bridge inside a "node" namespace.
struct Cluster {
    node: Netns,
    pods: Vec<(Netns, IpAddr)>,
}

impl Cluster {
    fn new(hosts: &[(&str, u8)]) -> Self {
        let node = Netns::new("tnode");
        node.exec(&["link", "add", "br0", "type", "bridge"]);
        node.exec(&["link", "set", "br0", "up"]);
        let mut pods = Vec::new();
        for (i, (tag, host)) in hosts.iter().enumerate() {
            let pod = Netns::new(tag);
            let (inside, outside) = (
                "eth0".to_string(),
                format!("vp{}{i}", std::process::id() % 10000),
            );
            ip(&[
                "-n", &pod.name, "link", "add", &inside, "type", "veth", "peer", "name", &outside,
                "netns", &node.name,
            ]);
            pod.exec(&[
                "addr",
                "add",
                &format!("{}/24", addr(*host)),
                "dev",
                &inside,
            ]);
            pod.exec(&["link", "set", &inside, "up"]);
            pod.exec(&["route", "add", "default", "dev", &inside]);
            node.exec(&["link", "set", &outside, "master", "br0"]);
            node.exec(&["link", "set", &outside, "up"]);
            pods.push((pod, addr(*host)));
        }
        Self { node, pods }
    }
}

fn in_pod<T: Send>(pod: &Netns, f: impl FnOnce() -> std::io::Result<T> + Send) -> T {
    let fd = pod.fd();
    ambit_redirect::in_netns(fd.as_fd(), &pod.name, || {
        f().map_err(|e| ("socket".into(), e))
    })
    .unwrap()
}

/// An application in `pod` answering `<tag> saw <peer ip>` then echoing.
fn app(pod: &Netns, port: u16, tag: &'static str) {
    let listener = in_pod(pod, || {
        let l = std::net::TcpListener::bind(("0.0.0.0", port))?;
        l.set_nonblocking(true)?;
        Ok(l)
    });
    let listener = TcpListener::from_std(listener).unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, peer)) = listener.accept().await {
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

/// Connects from inside `pod` like an application would; returns the first line or "" if the
/// connection was refused or closed.
async fn call(pod: &Netns, dst: SocketAddr) -> String {
    let socket = in_pod(pod, || {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        s.set_nonblocking(true)?;
        Ok(std::net::TcpStream::from(s))
    });
    let socket = TcpSocket::from_std_stream(socket);
    let Ok(Ok(mut stream)) =
        tokio::time::timeout(Duration::from_secs(5), socket.connect(dst)).await
    else {
        return String::new();
    };
    let mut buf = vec![0u8; 256];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
        .await
        .map(|r| r.unwrap_or(0))
        .unwrap_or(0);
    String::from_utf8_lossy(&buf[..n]).trim().to_string()
}

fn workload(
    ns: &str,
    name: &str,
    sa: &str,
    ip: IpAddr,
    protocol: pb::TunnelProtocol,
    services: &[(&str, &[(u32, u32)])],
) -> pb::Address {
    let mut w = support::workload(ns, name, &ip.to_string(), "node-1", services);
    w.service_account = sa.into();
    w.tunnel_protocol = protocol as i32;
    pb::Address {
        r#type: Some(pb::address::Type::Workload(w)),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn captured_pods_talk_over_hbone_with_policy_and_plaintext_rules() {
    let cluster = Cluster::new(&[("client", 2), ("echo", 3), ("legacy", 4)]);
    let (client, echo, legacy) = (&cluster.pods[0], &cluster.pods[1], &cluster.pods[2]);
    let _ = &cluster.node;
    let redirect = RedirectConfig::default();
    for (pod, _) in [client, echo] {
        ambit_redirect::install(pod.fd().as_fd(), &pod.name, &redirect).unwrap();
    }
    app(&echo.0, 8080, "echo");
    app(&legacy.0, 9000, "legacy");

    // Configuration: two captured pods, one legacy pod outside the mesh, service echo.
    let mesh = MeshState::new("node-1");
    let vip = IpAddr::V4(Ipv4Addr::new(10, 96, SUBNET, 10));
    let echo_key = "demo/echo.demo.svc.cluster.local";
    let mut resources = vec![
        workload(
            "demo",
            "client",
            "client",
            client.1,
            pb::TunnelProtocol::Hbone,
            &[],
        ),
        workload(
            "demo",
            "echo",
            "echo",
            echo.1,
            pb::TunnelProtocol::Hbone,
            &[(echo_key, &[(80, 8080)])],
        ),
        workload(
            "legacy",
            "legacy",
            "default",
            legacy.1,
            pb::TunnelProtocol::None,
            &[],
        ),
    ];
    let service = support::service("demo", "echo", &vip.to_string(), &[(80, 8080)]);
    resources.push(pb::Address {
        r#type: Some(pb::address::Type::Service(service)),
    });
    let named: Vec<(String, pb::Address)> = resources
        .into_iter()
        .map(|a| (a.resource_name().unwrap(), a))
        .collect();
    assert!(mesh.apply_addresses(&named, &[]).is_empty());

    let metrics = Registry::new();
    ztunnel::proxy::metrics::describe(&metrics);
    let ca =
        CertificateAuthority::generate_root("cluster.local", Duration::from_secs(86400)).unwrap();
    let inputs = ProxyInputs {
        config: Arc::new(ProxyConfig {
            connect_timeout: Duration::from_secs(3),
            ..ProxyConfig::default()
        }),
        mesh: mesh.clone(),
        certs: CertStore::new(Arc::new(ca), StoreConfig::default()),
        metrics: metrics.clone(),
        connections: Default::default(),
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ztunnel.sock");
    let info = |name: &str, sa: &str| WorkloadInfo {
        name: name.into(),
        namespace: "demo".into(),
        service_account: sa.into(),
    };
    let snapshot: Arc<Mutex<Vec<SnapshotEntry>>> = Arc::new(Mutex::new(vec![
        SnapshotEntry {
            uid: "uid-client".into(),
            info: info("client", "client"),
            netns: Some(Arc::new(client.0.fd())),
        },
        SnapshotEntry {
            uid: "uid-echo".into(),
            info: info("echo", "echo"),
            netns: Some(Arc::new(echo.0.fd())),
        },
    ]));
    let source = {
        let s = snapshot.clone();
        move || s.lock().unwrap().clone()
    };
    let (agent, listener) = ZdsServer::bind(&path, Arc::new(source)).unwrap();
    tokio::spawn(async move { agent.serve(listener).await });
    let manager = InPodManager::new(
        path,
        inputs,
        "cluster.local".into(),
        Duration::from_millis(500),
        metrics.clone(),
    );
    let readiness = Readiness::new();
    let (_trigger, watcher) = drain::new();
    tokio::spawn({
        let first = readiness.register("zds-snapshot");
        let readiness = readiness.clone();
        async move { manager.run(first, readiness, watcher).await }
    });
    for _ in 0..300 {
        if readiness.is_ready() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(readiness.is_ready(), "snapshot processed");

    // 1. The client calls the service VIP: captured, tunnelled, the app sees the client's IP.
    assert_eq!(
        call(&client.0, SocketAddr::new(vip, 80)).await,
        format!("echo saw {}", client.1)
    );
    // 2. And the pod IP directly.
    assert_eq!(
        call(&client.0, SocketAddr::new(echo.1, 8080)).await,
        format!("echo saw {}", client.1)
    );
    // 3. A legacy pod outside the mesh: outbound passthrough from the client...
    assert_eq!(
        call(&client.0, SocketAddr::new(legacy.1, 9000)).await,
        format!("legacy saw {}", client.1)
    );
    // ...and plaintext inbound from it is admitted under PERMISSIVE.
    assert_eq!(
        call(&legacy.0, SocketAddr::new(echo.1, 8080)).await,
        format!("echo saw {}", legacy.1)
    );

    // 4. The tunnel really is HBONE: the destination reported mutual TLS with the client's identity.
    let text = metrics.render();
    assert!(
        text.lines()
            .any(|l| l.starts_with("istio_tcp_connections_opened_total")
                && l.contains("reporter=\"destination\"")
                && l.contains("source_principal=\"spiffe://cluster.local/ns/demo/sa/client\"")
                && l.contains("connection_security_policy=\"mutual_tls\"")),
        "{text}"
    );

    // 5. STRICT: plaintext from the legacy pod is refused, mesh traffic still flows.
    let strict = sec::Authorization {
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
    };
    assert!(
        mesh.apply_policies(&[(strict.resource_name(), strict)], &[])
            .is_empty()
    );
    assert_eq!(call(&legacy.0, SocketAddr::new(echo.1, 8080)).await, "");
    assert_eq!(
        call(&client.0, SocketAddr::new(vip, 80)).await,
        format!("echo saw {}", client.1)
    );
}
