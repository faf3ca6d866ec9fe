//! In-pod mode with real network namespaces and a real ZDS agent: pods handed over ZDS get their
//! listeners inside their own namespace, leave cleanly on Del, a refused pod does not disturb the
//! others, readiness waits for the snapshot, and an agent restart reconciles against its snapshot.
//! Needs root.

mod support;

use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ambit_core::drain;
use ambit_core::metrics::Registry;
use ambit_core::readiness::Readiness;
use ambit_identity::ca::CertificateAuthority;
use ambit_identity::store::{CertStore, StoreConfig};
use ambit_zds::server::{SnapshotEntry, ZdsServer};
use ambit_zds::{WorkloadInfo, ZdsError};
use support::netns::Netns;
use tokio::net::TcpSocket;
use ztunnel::inpod::InPodManager;
use ztunnel::mesh::MeshState;
use ztunnel::proxy::{ProxyConfig, ProxyInputs};

type Pods = Arc<Mutex<Vec<SnapshotEntry>>>;

fn info(name: &str, ns: &str) -> WorkloadInfo {
    WorkloadInfo {
        name: name.into(),
        namespace: ns.into(),
        service_account: "default".into(),
    }
}

/// True when something accepts TCP on 127.0.0.1:`port` inside `netns`.
async fn listening(netns: &OwnedFd, port: u16) -> bool {
    let socket = ztunnel::socket::in_netns(netns, TcpSocket::new_v4).unwrap();
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    matches!(
        tokio::time::timeout(Duration::from_secs(2), socket.connect(addr)).await,
        Ok(Ok(_))
    )
}

async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    for _ in 0..300 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("never happened: {what}");
}

fn start_agent(path: &std::path::Path, pods: Pods) -> (ZdsServer, tokio::task::JoinHandle<()>) {
    let source = move || pods.lock().unwrap().clone();
    let (server, listener) = ZdsServer::bind(path, Arc::new(source)).unwrap();
    let serving = server.clone();
    let task = tokio::spawn(async move { serving.serve(listener).await });
    (server, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_get_listeners_in_their_own_namespace_and_lose_them_when_they_leave() {
    let pod_a = Netns::new("inpod-a");
    let pod_b = Netns::new("inpod-b");
    let (fd_a, fd_b) = (pod_a.fd(), pod_b.fd());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ztunnel.sock");

    let pods: Pods = Arc::new(Mutex::new(vec![SnapshotEntry {
        uid: "uid-a".into(),
        info: info("a", "demo"),
        netns: Some(Arc::new(pod_a.fd())),
    }]));
    let (agent, agent_task) = start_agent(&path, pods.clone());

    let ca =
        CertificateAuthority::generate_root("cluster.local", Duration::from_secs(86400)).unwrap();
    let metrics = Registry::new();
    let inputs = ProxyInputs {
        config: Arc::new(ProxyConfig::default()),
        mesh: MeshState::new("node-1"),
        certs: CertStore::new(Arc::new(ca), StoreConfig::default()),
        metrics: metrics.clone(),
        connections: Default::default(),
    };
    let manager = InPodManager::new(
        path.clone(),
        inputs,
        "cluster.local".into(),
        Duration::from_millis(200),
        metrics.clone(),
    );
    let readiness = Readiness::new();
    let (_trigger, watcher) = drain::new();
    tokio::spawn({
        let manager = manager.clone();
        let first = readiness.register("zds-snapshot");
        let readiness = readiness.clone();
        async move { manager.run(first, readiness, watcher).await }
    });

    eventually("ready after the snapshot", async || readiness.is_ready()).await;
    for port in [15001, 15006, 15008] {
        assert!(
            listening(&fd_a, port).await,
            "pod a listens on {port} in its namespace"
        );
        assert!(!listening(&fd_b, port).await, "pod b is not served yet");
    }

    agent
        .add("uid-b", info("b", "demo"), fd_b.as_fd())
        .await
        .unwrap();
    assert!(listening(&fd_b, 15008).await);
    assert_eq!(manager.pods().await, vec!["uid-a", "uid-b"]);

    // A pod ztunnel cannot serve (its HBONE port is taken inside the pod) is refused with the
    // reason; the others keep running.
    let pod_c = Netns::new("inpod-c");
    let fd_c = pod_c.fd();
    let _squatter =
        ztunnel::socket::in_netns(&fd_c, || std::net::TcpListener::bind("0.0.0.0:15008")).unwrap();
    let refused = agent.add("uid-c", info("c", "demo"), fd_c.as_fd()).await;
    match refused {
        Err(ZdsError::Refused(reason)) => {
            assert!(
                reason.contains("pod demo/c (uid-c): cannot start its listeners"),
                "{reason}"
            )
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(listening(&fd_a, 15008).await && listening(&fd_b, 15008).await);

    agent.del("uid-a").await.unwrap();
    eventually("pod a's listeners closed", async || {
        !listening(&fd_a, 15008).await
    })
    .await;
    assert!(listening(&fd_b, 15008).await);

    // The agent restarts knowing only pod b: ztunnel reconnects, keeps b, and is ready again.
    agent_task.abort();
    drop(agent);
    let _ = agent_task.await;
    *pods.lock().unwrap() = vec![SnapshotEntry {
        uid: "uid-b".into(),
        info: info("b", "demo"),
        netns: Some(Arc::new(pod_b.fd())),
    }];
    let (_agent, _task) = start_agent(&path, pods.clone());
    eventually("reconnected and resynced", async || {
        readiness.is_ready() && manager.pods().await == vec!["uid-b".to_string()]
    })
    .await;
    assert!(
        listening(&fd_b, 15008).await,
        "pod b kept its proxies across the agent restart"
    );
    let text = metrics.render();
    assert!(
        text.contains("workload_manager_active_proxy_count 1"),
        "{text}"
    );
    assert!(
        text.contains("ambit_zds_refused_messages_total 1"),
        "{text}"
    );
}
