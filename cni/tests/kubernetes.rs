//! Kubernetes mode end to end, as root: the real agent watching the scripted API server, a pod
//! whose network namespace only a process (`sleep`) keeps alive (so the agent must find it under
//! /proc), ztunnel's in-pod manager taking pods over ZDS, and the probe SNAT table in a "node"
//! namespace. Namespaces are prefixed `akm-`.

use std::net::IpAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use ambit_cni::agent::{Agent, AgentConfig, KubernetesSource, REDIRECTION_ANNOTATION};
use ambit_cni::protocol::PodEvent;
use ambit_core::drain;
use ambit_core::metrics::Registry;
use ambit_core::readiness::Readiness;
use ambit_fake_apiserver::FakeApiServer;
use ambit_identity::ca::CertificateAuthority;
use ambit_identity::store::{CertStore, StoreConfig};
use serde_json::{Value, json};
use ztunnel::inpod::InPodManager;
use ztunnel::mesh::MeshState;
use ztunnel::proxy::{ProxyConfig, ProxyInputs};

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("iproute2");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A named network namespace (the node's).
struct Ns(String);
impl Ns {
    fn new(name: String) -> Self {
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        ip(&["netns", "add", &name]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        Ns(name)
    }
    fn path(&self) -> String {
        format!("/run/netns/{}", self.0)
    }
}
impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

/// A pod's network namespace kept alive only by a process living in it, as a runtime's sandbox
/// is: its name is removed right away, so /proc is the only way to it.
struct PodNetns {
    child: Child,
    ip: IpAddr,
}

impl PodNetns {
    /// A namespace wired to `node` by a veth pair, `ip_cidr` on the pod's end.
    fn new(name: String, node: &Ns, host_if: &str, ip_cidr: &str) -> Self {
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        ip(&["netns", "add", &name]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        ip(&[
            "-n", &node.0, "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns",
            &name,
        ]);
        ip(&["-n", &node.0, "link", "set", host_if, "up"]);
        ip(&["-n", &name, "addr", "add", ip_cidr, "dev", "eth0"]);
        ip(&["-n", &name, "link", "set", "eth0", "up"]);
        let child = Command::new("ip")
            .args(["netns", "exec", &name, "sleep", "600"])
            .stdin(Stdio::null())
            .spawn()
            .expect("sleep in the pod namespace");
        let pod = Self {
            child,
            ip: ip_cidr.split('/').next().unwrap().parse().unwrap(),
        };
        // `ip netns exec` execs sleep once it is inside the namespace.
        for _ in 0..250 {
            if pod.inode() == netns_inode(&format!("/run/netns/{name}")) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(pod.inode(), netns_inode(&format!("/run/netns/{name}")));
        ip(&["netns", "del", &name]);
        pod
    }

    fn path(&self) -> String {
        format!("/proc/{}/ns/net", self.child.id())
    }

    fn inode(&self) -> Option<u64> {
        netns_inode(&self.path())
    }

    fn fd(&self) -> OwnedFd {
        std::fs::File::open(self.path()).unwrap().into()
    }

    fn installed(&self) -> bool {
        ambit_redirect::is_installed(self.fd().as_fd(), &self.path()).unwrap()
    }
}

impl Drop for PodNetns {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn netns_inode(path: &str) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| m.ino())
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

struct Ztunnel {
    manager: InPodManager,
    stop: drain::DrainTrigger,
    task: tokio::task::JoinHandle<()>,
}

fn start_ztunnel(zds: &Path) -> Ztunnel {
    let metrics = Registry::new();
    ztunnel::proxy::metrics::describe(&metrics);
    let ca =
        CertificateAuthority::generate_root("cluster.local", Duration::from_secs(86400)).unwrap();
    let inputs = ProxyInputs {
        config: Arc::new(ProxyConfig::default()),
        mesh: MeshState::new("node-1"),
        certs: CertStore::new(Arc::new(ca), StoreConfig::default()),
        metrics: metrics.clone(),
        connections: Default::default(),
    };
    let manager = InPodManager::new(
        zds.to_path_buf(),
        inputs,
        "cluster.local".into(),
        Duration::from_millis(200),
        metrics,
    );
    let readiness = Readiness::new();
    let (stop, watcher) = drain::new();
    let task = tokio::spawn({
        let manager = manager.clone();
        let first = readiness.register("zds-snapshot");
        async move { manager.run(first, readiness, watcher).await }
    });
    Ztunnel {
        manager,
        stop,
        task,
    }
}

impl Ztunnel {
    async fn stop(self) {
        drop(self.stop);
        let _ = self.task.await;
        self.manager.shutdown_all(Duration::from_millis(100)).await;
    }
}

fn namespace(name: &str, ambient: bool) -> Value {
    let labels = if ambient {
        json!({"istio.io/dataplane-mode": "ambient"})
    } else {
        json!({})
    };
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})
}

fn pod(ns: &str, name: &str, node: &str, ip: IpAddr) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"nodeName": node, "serviceAccountName": "web",
                 "containers": [{"name": "app", "image": "app"}]},
        "status": {"phase": "Running", "podIP": ip.to_string(), "podIPs": [{"ip": ip.to_string()}]}
    })
}

struct Setup {
    dir: tempfile::TempDir,
    node: Ns,
    server: FakeApiServer,
}

impl Setup {
    fn config(&self) -> AgentConfig {
        let path = |name: &str| self.dir.path().join(name);
        AgentConfig {
            node_name: "node-1".into(),
            plugin_socket: path("agent.sock"),
            zds_socket: path("zds.sock"),
            state_dir: path("state"),
            config_dir: None,
            kubernetes: Some(KubernetesSource {
                kubeconfig: None,
                url: Some(self.server.url()),
            }),
            host_netns: Some(PathBuf::from(self.node.path())),
            redirect: ambit_redirect::RedirectConfig::default(),
            reconcile_every: Duration::from_millis(100),
        }
    }

    async fn start_agent(&self) -> (Agent, tokio::task::JoinHandle<()>) {
        let (agent, plugin, zds) = Agent::start(self.config()).await.unwrap();
        let running = agent.clone();
        let task = tokio::spawn(async move { running.run(plugin, zds).await });
        (agent, task)
    }

    fn annotation(&self, ns: &str, name: &str) -> Option<String> {
        self.server.get("v1", "Pod", ns, name).and_then(|p| {
            p["metadata"]["annotations"][REDIRECTION_ANNOTATION]
                .as_str()
                .map(String::from)
        })
    }

    fn probe_set(&self) -> Vec<IpAddr> {
        let fd: OwnedFd = std::fs::File::open(self.node.path()).unwrap().into();
        ambit_redirect::host::list(fd.as_fd(), &self.node.0)
            .unwrap()
            .unwrap_or_default()
    }

    /// Re-applies the stored pod with `edit` applied (keeping what the agent wrote).
    fn edit_pod(&self, ns: &str, name: &str, edit: impl FnOnce(&mut Value)) {
        let mut object = self.server.get("v1", "Pod", ns, name).unwrap();
        edit(&mut object);
        self.server.apply(object);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_mode_captures_existing_pods_from_labels_and_releases_them() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "Kubernetes mode tests need root (network namespaces, nftables); run sudo scripts/test"
    );
    let pid = std::process::id();
    let setup = Setup {
        dir: tempfile::tempdir().unwrap(),
        node: Ns::new(format!("akm-node-{pid}")),
        server: FakeApiServer::start().await,
    };
    let web = PodNetns::new(
        format!("akm-web-{pid}"),
        &setup.node,
        "vweb",
        "10.196.41.2/24",
    );
    let far = PodNetns::new(
        format!("akm-far-{pid}"),
        &setup.node,
        "vfar",
        "10.196.41.3/24",
    );
    let server = &setup.server;
    server.apply(namespace("shop", false));
    let web_uid = server.apply(pod("shop", "web", "node-1", web.ip))["metadata"]["uid"]
        .as_str()
        .unwrap()
        .to_string();
    // The same namespace, another node: never this agent's business.
    server.apply(pod("shop", "far", "node-2", far.ip));

    let (agent, agent_task) = setup.start_agent().await;
    let zt = start_ztunnel(&setup.dir.path().join("zds.sock"));
    eventually("ztunnel connected with an empty snapshot", async || {
        zt.manager.pods().await.is_empty() && agent.pods().is_empty()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!web.installed(), "namespace not labelled: not captured");
    assert!(zt.manager.pods().await.is_empty());
    assert_eq!(setup.annotation("shop", "web"), None);

    // Labelling the namespace captures the running pod: its namespace found under /proc.
    server.apply(namespace("shop", true));
    eventually("pod captured", async || {
        web.installed() && zt.manager.pods().await == vec![web_uid.clone()]
    })
    .await;
    eventually("pod annotated", async || {
        setup.annotation("shop", "web").as_deref() == Some("enabled")
    })
    .await;
    let record = agent
        .pods()
        .into_iter()
        .find(|p| p.name == "web")
        .expect("the agent knows the pod");
    assert!(record.captured);
    assert_eq!(record.netns_inode, web.inode(), "{record:?}");
    assert!(record.netns.starts_with("/proc/"), "{record:?}");
    assert_eq!(setup.probe_set(), vec![web.ip]);
    // The pod on the other node: never captured, never annotated, never asked about.
    assert!(!far.installed());
    assert_eq!(setup.annotation("shop", "far"), None);
    let requests = server.requests();
    assert!(
        requests.iter().any(|r| r.path == "/api/v1/pods"
            && r.query.get("fieldSelector").map(String::as_str) == Some("spec.nodeName=node-1")),
        "pods are watched on this node only: {requests:?}"
    );
    assert!(
        !requests.iter().any(|r| r.path.ends_with("/pods/far")),
        "{requests:?}"
    );

    // The pod opts out: released, annotation removed, probe entry gone.
    setup.edit_pod("shop", "web", |p| {
        p["metadata"]["labels"] = json!({"istio.io/dataplane-mode": "none"});
    });
    eventually("pod released", async || {
        !web.installed() && zt.manager.pods().await.is_empty()
    })
    .await;
    eventually("annotation removed", async || {
        setup.annotation("shop", "web").is_none()
    })
    .await;
    assert!(setup.probe_set().is_empty());
    assert!(agent.pods().iter().all(|p| !p.captured));

    // Opting back in captures it again; an agent restart keeps it captured throughout.
    setup.edit_pod("shop", "web", |p| {
        p["metadata"]["labels"] = json!({});
    });
    eventually("captured again", async || {
        web.installed()
            && zt.manager.pods().await == vec![web_uid.clone()]
            && setup.annotation("shop", "web").as_deref() == Some("enabled")
    })
    .await;
    agent_task.abort();
    let _ = agent_task.await;
    drop(agent);
    assert!(web.installed(), "captured while the agent is down");
    assert_eq!(
        setup.probe_set(),
        vec![web.ip],
        "probes keep working meanwhile"
    );
    let patches_before = server
        .requests()
        .iter()
        .filter(|r| r.method == "PATCH")
        .count();
    let (agent, _agent_task) = setup.start_agent().await;
    assert!(
        agent.pods().iter().any(|p| p.name == "web" && p.captured),
        "restored as captured: {:?}",
        agent.pods()
    );
    assert!(web.installed());
    eventually(
        "ztunnel keeps the pod after the agent's restart",
        async || zt.manager.pods().await == vec![web_uid.clone()],
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(web.installed());
    assert_eq!(setup.annotation("shop", "web").as_deref(), Some("enabled"));
    assert_eq!(setup.probe_set(), vec![web.ip]);
    assert_eq!(
        server
            .requests()
            .iter()
            .filter(|r| r.method == "PATCH")
            .count(),
        patches_before,
        "nothing to re-annotate after a restart"
    );

    // The pod object goes away: released and forgotten.
    server.delete("v1", "Pod", "shop", "web");
    eventually("deleted pod released", async || {
        !web.installed() && zt.manager.pods().await.is_empty() && agent.pods().is_empty()
    })
    .await;
    assert!(setup.probe_set().is_empty());
    assert!(!far.installed());
    zt.stop().await;
    agent.shutdown();
    assert_eq!(
        ambit_redirect::host::list(
            std::fs::File::open(setup.node.path()).unwrap().as_fd(),
            &setup.node.0
        )
        .unwrap(),
        None,
        "shutdown with nothing captured removes the probe SNAT table"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_network_pods_plugin_pods_and_a_relist_in_kubernetes_mode() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "Kubernetes mode tests need root (network namespaces, nftables); run sudo scripts/test"
    );
    let pid = std::process::id();
    let setup = Setup {
        dir: tempfile::tempdir().unwrap(),
        node: Ns::new(format!("akm-node2-{pid}")),
        server: FakeApiServer::start().await,
    };
    let one = PodNetns::new(
        format!("akm-one-{pid}"),
        &setup.node,
        "vone",
        "10.196.42.2/24",
    );
    let server = &setup.server;
    server.apply(namespace("apps", true));
    let mut host_pod = pod("apps", "hostnet", "node-1", "10.196.42.9".parse().unwrap());
    host_pod["spec"]["hostNetwork"] = json!(true);
    server.apply(host_pod);
    server.apply(pod("apps", "one", "node-1", one.ip));

    // A pod that existed before the agent started is captured at start.
    let (agent, _task) = setup.start_agent().await;
    eventually("existing pod captured", async || {
        one.installed() && setup.annotation("apps", "one").as_deref() == Some("enabled")
    })
    .await;
    assert!(
        agent.pods().iter().all(|p| p.name != "hostnet"),
        "hostNetwork pods are never captured: {:?}",
        agent.pods()
    );
    assert_eq!(setup.annotation("apps", "hostnet"), None);

    // A new pod comes through the plugin (its IP not yet in the API, so only the plugin can
    // name its namespace): one record under the runtime's container id, annotated.
    let two = PodNetns::new(
        format!("akm-two-{pid}"),
        &setup.node,
        "vtwo",
        "10.196.42.4/24",
    );
    let mut two_object = pod("apps", "two", "node-1", two.ip);
    two_object["status"] = json!({"phase": "Pending"});
    let two_uid = server.apply(two_object)["metadata"]["uid"]
        .as_str()
        .unwrap()
        .to_string();
    let event = |command: &str| PodEvent {
        command: command.into(),
        container_id: "ctr-two".into(),
        netns: two.path(),
        pod_namespace: "apps".into(),
        pod_name: "two".into(),
        pod_uid: two_uid.clone(),
        ips: vec![two.ip.to_string()],
    };
    let verdict = agent.handle(event("ADD")).await;
    assert!(verdict.captured && verdict.error.is_none(), "{verdict:?}");
    assert!(two.installed());
    eventually("plugin pod annotated", async || {
        setup.annotation("apps", "two").as_deref() == Some("enabled")
    })
    .await;
    setup.edit_pod("apps", "two", |p| {
        p["status"] = json!({"phase": "Running", "podIP": "10.196.42.4", "podIPs": [{"ip": "10.196.42.4"}]});
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let records: Vec<_> = agent
        .pods()
        .into_iter()
        .filter(|p| p.name == "two")
        .collect();
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0].container_id, "ctr-two");
    assert_eq!(
        records[0].netns_inode, None,
        "the runtime's path is trusted as is"
    );
    // DEL: released, and not found again under /proc while the sandbox is torn down.
    agent.handle(event("DEL")).await;
    assert!(!two.installed());
    eventually("annotation removed after DEL", async || {
        setup.annotation("apps", "two").is_none()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!two.installed(), "a deleted sandbox is not captured again");
    assert!(agent.pods().iter().all(|p| p.name != "two"));
    // A DEL for a pod the agent found under /proc (no container id of ours) releases it too;
    // an ADD for its new sandbox captures it again.
    assert!(one.installed());
    let del_one = PodEvent {
        command: "DEL".into(),
        container_id: "ctr-unknown".into(),
        netns: one.path(),
        pod_namespace: "apps".into(),
        pod_name: "one".into(),
        pod_uid: String::new(),
        ips: vec![],
    };
    agent.handle(del_one.clone()).await;
    assert!(!one.installed());
    assert!(agent.pods().is_empty(), "{:?}", agent.pods());
    let verdict = agent
        .handle(PodEvent {
            command: "ADD".into(),
            ips: vec![one.ip.to_string()],
            ..del_one
        })
        .await;
    assert!(verdict.captured, "{verdict:?}");
    assert!(one.installed());

    // The pod disappears while the watch is away (its next attempt fails) and history is
    // compacted: the watch must relist (410 Gone), the list no longer has the pod, and the
    // agent releases it.
    let lists = || {
        server
            .requests()
            .iter()
            .filter(|r| r.method == "GET" && r.path == "/api/v1/pods" && !r.watch)
            .count()
    };
    let lists_before = lists();
    server.fail_next("GET", "/api/v1/pods", 500);
    server.drop_watches();
    server.delete("v1", "Pod", "apps", "one");
    server.compact();
    eventually("vanished pod released after the relist", async || {
        !one.installed() && agent.pods().is_empty()
    })
    .await;
    assert!(lists() > lists_before, "the pods were listed again");
    assert!(setup.probe_set().is_empty());
}
