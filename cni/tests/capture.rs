//! The capture side end to end, as root, in namespaces this test creates: a "node" namespace with
//! the reference `bridge` + `host-local` plugins creating pod interfaces and `ambit-cni` chained
//! after them, the real node agent, and ztunnel's in-pod manager taking pods over ZDS.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use ambit_cni::agent::{Agent, AgentConfig};
use ambit_core::drain;
use ambit_core::metrics::Registry;
use ambit_core::readiness::Readiness;
use ambit_identity::ca::CertificateAuthority;
use ambit_identity::store::{CertStore, StoreConfig};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use ztunnel::inpod::InPodManager;
use ztunnel::mesh::MeshState;
use ztunnel::proxy::{ProxyConfig, ProxyInputs};

const CNI_BIN: &str = "/usr/lib/cni";

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("iproute2");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

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

struct Lab {
    dir: tempfile::TempDir,
    node: Ns,
    subnet: u8,
    pods: BTreeMap<String, Ns>,
}

const NAMESPACES: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: demo, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: legacy}
"#;

impl Lab {
    fn new(tag: &str, subnet: u8) -> Self {
        assert!(
            nix::unistd::geteuid().is_root(),
            "capture tests need root; run sudo scripts/test"
        );
        assert!(
            Path::new(CNI_BIN).join("bridge").exists(),
            "the reference CNI plugins are missing: apt-get install containernetworking-plugins"
        );
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("config")).unwrap();
        std::fs::write(dir.path().join("config/namespaces.yaml"), NAMESPACES).unwrap();
        let node = Ns::new(format!("ambit-cn-{}-{tag}", std::process::id()));
        Self {
            dir,
            node,
            subnet,
            pods: BTreeMap::new(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn agent_config(&self) -> AgentConfig {
        AgentConfig {
            node_name: "node-1".into(),
            plugin_socket: self.path("agent.sock"),
            zds_socket: self.path("zds.sock"),
            state_dir: self.path("state"),
            config_dir: Some(self.path("config")),
            kubernetes: None,
            host_netns: Some(PathBuf::from(self.node.path())),
            redirect: ambit_redirect::RedirectConfig::default(),
            reconcile_every: Duration::from_millis(100),
        }
    }

    fn write_namespaces(&self, demo_ambient: bool) {
        let text = if demo_ambient {
            NAMESPACES.to_string()
        } else {
            NAMESPACES.replace("labels: {istio.io/dataplane-mode: ambient}", "labels: {}")
        };
        std::fs::write(self.path("config/namespaces.yaml"), text).unwrap();
    }

    /// Runs one CNI plugin inside the node namespace, as a runtime does.
    fn exec_plugin(
        &self,
        plugin: &Path,
        command: &str,
        pod: &str,
        ns: &str,
        conf: &Value,
    ) -> (i32, String) {
        let netns = self.pods.get(pod).map(Ns::path).unwrap_or_default();
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.node.0])
            .arg(plugin)
            .env_clear()
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", format!("ctr-{pod}"))
            .env("CNI_NETNS", netns)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", CNI_BIN)
            .env("CNI_ARGS", format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={ns};K8S_POD_NAME={pod};K8S_POD_UID=uid-{pod}"))
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(conf.to_string().as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).to_string(),
        )
    }

    fn bridge_conf(&self) -> Value {
        json!({
            "cniVersion": "1.0.0", "name": "ambit-test", "type": "bridge", "bridge": "cni0",
            "isGateway": true,
            "ipam": {"type": "host-local", "dataDir": self.path("ipam"),
                     "ranges": [[{"subnet": format!("10.197.{}.0/24", self.subnet)}]],
                     "routes": [{"dst": "0.0.0.0/0"}]}
        })
    }

    fn ambit_conf(&self, prev: &Value, fail_closed: bool) -> Value {
        json!({
            "cniVersion": "1.0.0", "name": "ambit-test", "type": "ambit-cni",
            "agentSocket": self.path("agent.sock"),
            "enrollmentFile": self.path("state/enrollment.json"),
            "pendingDir": self.path("state/pending"),
            "failClosed": fail_closed,
            "prevResult": prev,
        })
    }

    /// Creates a pod the way a runtime does: netns, bridge+host-local, then ambit-cni. Returns
    /// the pod IP and our plugin's exit status and stdout.
    fn add_pod(&mut self, pod: &str, ns: &str, fail_closed: bool) -> (IpAddr, i32, String) {
        let netns = Ns::new(format!("ambit-cp-{}-{pod}", std::process::id()));
        self.pods.insert(pod.to_string(), netns);
        let (status, out) = self.exec_plugin(
            &Path::new(CNI_BIN).join("bridge"),
            "ADD",
            pod,
            ns,
            &self.bridge_conf(),
        );
        assert_eq!(status, 0, "bridge ADD failed: {out}");
        let prev: Value = serde_json::from_str(&out).unwrap();
        let ip: IpAddr = prev["ips"][0]["address"]
            .as_str()
            .unwrap()
            .split('/')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        let (status, stdout) = self.exec_plugin(
            Path::new(env!("CARGO_BIN_EXE_ambit-cni")),
            "ADD",
            pod,
            ns,
            &self.ambit_conf(&prev, fail_closed),
        );
        if status == 0 {
            let ours: Value = serde_json::from_str(&stdout).unwrap();
            assert_eq!(ours, prev, "prevResult passes through unchanged");
        }
        (ip, status, stdout)
    }

    fn cni(&self, command: &str, pod: &str, ns: &str) -> (i32, String) {
        let conf = self.ambit_conf(&json!({"cniVersion": "1.0.0"}), true);
        self.exec_plugin(
            Path::new(env!("CARGO_BIN_EXE_ambit-cni")),
            command,
            pod,
            ns,
            &conf,
        )
    }

    fn netns_fd(&self, pod: &str) -> std::os::fd::OwnedFd {
        std::fs::File::open(self.pods[pod].path()).unwrap().into()
    }

    fn installed(&self, pod: &str) -> bool {
        ambit_redirect::is_installed(self.netns_fd(pod).as_fd(), pod).unwrap()
    }

    /// True when something accepts on 127.0.0.1:port inside the pod.
    async fn listening(&self, pod: &str, port: u16) -> bool {
        let fd = self.netns_fd(pod);
        let socket = ztunnel::socket::in_netns(&fd, tokio::net::TcpSocket::new_v4).unwrap();
        matches!(
            tokio::time::timeout(
                Duration::from_secs(1),
                socket.connect(SocketAddr::from(([127, 0, 0, 1], port)))
            )
            .await,
            Ok(Ok(_))
        )
    }

    /// An application server in a pod answering `<tag> saw <peer>`.
    fn app(&self, pod: &str, port: u16, tag: &'static str) {
        let fd = self.netns_fd(pod);
        let listener = ztunnel::socket::in_netns(&fd, || {
            let l = std::net::TcpListener::bind(("0.0.0.0", port))?;
            l.set_nonblocking(true)?;
            Ok(l)
        })
        .unwrap();
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, peer)) = listener.accept().await {
                let _ = s
                    .write_all(format!("{tag} saw {}\n", peer.ip()).as_bytes())
                    .await;
            }
        });
    }

    async fn call(&self, pod: &str, dst: SocketAddr) -> String {
        self.call_from(self.netns_fd(pod), dst).await
    }

    /// A connection from the node itself (as the kubelet's probes are).
    async fn call_from_node(&self, dst: SocketAddr) -> String {
        self.call_from(std::fs::File::open(self.node.path()).unwrap().into(), dst)
            .await
    }

    fn probe_set(&self) -> Option<Vec<IpAddr>> {
        let fd: std::os::fd::OwnedFd = std::fs::File::open(self.node.path()).unwrap().into();
        ambit_redirect::host::list(fd.as_fd(), &self.node.0).unwrap()
    }

    async fn call_from(&self, fd: std::os::fd::OwnedFd, dst: SocketAddr) -> String {
        let socket = ztunnel::socket::in_netns(&fd, tokio::net::TcpSocket::new_v4).unwrap();
        let Ok(Ok(mut stream)) =
            tokio::time::timeout(Duration::from_secs(3), socket.connect(dst)).await
        else {
            return String::new();
        };
        let mut out = String::new();
        let _ = tokio::time::timeout(Duration::from_secs(3), stream.read_to_string(&mut out)).await;
        out.trim().to_string()
    }
}

async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    for _ in 0..250 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("never happened: {what}");
}

struct Ztunnel {
    manager: InPodManager,
    mesh: MeshState,
    metrics: Registry,
    stop: drain::DrainTrigger,
    task: tokio::task::JoinHandle<()>,
}

fn start_ztunnel(zds: &Path) -> Ztunnel {
    let metrics = Registry::new();
    ztunnel::proxy::metrics::describe(&metrics);
    let mesh = MeshState::new("node-1");
    let ca =
        CertificateAuthority::generate_root("cluster.local", Duration::from_secs(86400)).unwrap();
    let inputs = ProxyInputs {
        config: Arc::new(ProxyConfig {
            connect_timeout: Duration::from_secs(2),
            ..ProxyConfig::default()
        }),
        mesh: mesh.clone(),
        certs: CertStore::new(Arc::new(ca), StoreConfig::default()),
        metrics: metrics.clone(),
        connections: Default::default(),
    };
    let manager = InPodManager::new(
        zds.to_path_buf(),
        inputs,
        "cluster.local".into(),
        Duration::from_millis(200),
        metrics.clone(),
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
        mesh,
        metrics,
        stop,
        task,
    }
}

impl Ztunnel {
    /// Tells ztunnel (as xDS would) about a captured pod.
    fn know(&self, ns: &str, name: &str, ip: IpAddr) {
        use ambit_proto::workload as pb;
        let w = pb::Workload {
            uid: format!("Kubernetes//Pod/{ns}/{name}"),
            name: name.into(),
            namespace: ns.into(),
            addresses: vec![match ip {
                IpAddr::V4(v4) => v4.octets().to_vec(),
                IpAddr::V6(v6) => v6.octets().to_vec(),
            }],
            tunnel_protocol: pb::TunnelProtocol::Hbone as i32,
            node: "node-1".into(),
            ..Default::default()
        };
        let address = pb::Address {
            r#type: Some(pb::address::Type::Workload(w)),
        };
        assert!(
            self.mesh
                .apply_addresses(&[(address.resource_name().unwrap(), address)], &[])
                .is_empty()
        );
    }

    async fn stop(self) {
        drop(self.stop);
        let _ = self.task.await;
        self.manager.shutdown_all(Duration::from_millis(100)).await;
    }
}

async fn start_agent(lab: &Lab) -> (Agent, tokio::task::JoinHandle<()>) {
    let (agent, plugin, zds) = Agent::start(lab.agent_config()).await.unwrap();
    let running = agent.clone();
    let task = tokio::spawn(async move { running.run(plugin, zds).await });
    (agent, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_chain_captures_ambient_pods_and_follows_labels() {
    let mut lab = Lab::new("a", 31);
    let (agent, _agent_task) = start_agent(&lab).await;
    let zt = start_ztunnel(&lab.path("zds.sock"));

    let (app_ip, status, out) = lab.add_pod("app", "demo", true);
    assert_eq!(status, 0, "{out}");
    zt.know("demo", "app", app_ip);
    let (legacy_ip, status, out) = lab.add_pod("legacy", "legacy", true);
    assert_eq!(status, 0, "{out}");
    assert!(lab.installed("app") && !lab.installed("legacy"));
    eventually("ztunnel serves the ambient pod", async || {
        zt.manager.pods().await == vec!["uid-app".to_string()]
    })
    .await;
    assert!(
        lab.listening("app", 15008).await,
        "ztunnel listens inside the pod"
    );
    assert!(!lab.listening("legacy", 15008).await);
    assert_eq!(lab.cni("CHECK", "app", "demo").0, 0);
    assert_eq!(lab.cni("CHECK", "legacy", "legacy").0, 0);

    // Traffic: the ambient pod's outbound and inbound both go through ztunnel.
    lab.app("legacy", 9000, "legacy");
    lab.app("app", 8080, "app");
    assert_eq!(
        lab.call("app", SocketAddr::new(legacy_ip, 9000)).await,
        format!("legacy saw {app_ip}")
    );
    assert_eq!(
        lab.call("legacy", SocketAddr::new(app_ip, 8080)).await,
        format!("app saw {legacy_ip}")
    );
    let text = zt.metrics.render();
    let opened = |reporter: &str| {
        text.lines().any(|l| {
            l.starts_with("istio_tcp_connections_opened_total")
                && l.contains(&format!("reporter=\"{reporter}\""))
        })
    };
    assert!(
        opened("source") && opened("destination"),
        "both directions captured:\n{text}"
    );
    // The node's own connection (a kubelet probe) goes straight to the application, from the
    // probe address.
    assert_eq!(lab.probe_set(), Some(vec![app_ip]));
    assert_eq!(
        lab.call_from_node(SocketAddr::new(app_ip, 8080)).await,
        "app saw 169.254.7.127"
    );

    // Un-labelling the namespace releases the pod: rules gone, ztunnel drops it, traffic direct.
    lab.write_namespaces(false);
    eventually("rules removed", async || !lab.installed("app")).await;
    eventually("ztunnel released the pod", async || {
        zt.manager.pods().await.is_empty()
    })
    .await;
    assert_eq!(
        lab.call("legacy", SocketAddr::new(app_ip, 8080)).await,
        format!("app saw {legacy_ip}")
    );
    // The agent removes the pod's rules, then its node-side probe entry: wait for both.
    eventually("the node's probe entry removed", async || {
        lab.probe_set() == Some(vec![])
    })
    .await;
    assert_eq!(lab.probe_set(), Some(vec![]));
    assert_eq!(
        lab.call_from_node(SocketAddr::new(app_ip, 8080)).await,
        format!("app saw 10.197.{}.1", lab.subnet),
        "released: the node's connection arrives as itself"
    );
    // And labelling it again captures it again.
    lab.write_namespaces(true);
    eventually("captured again", async || {
        lab.installed("app") && zt.manager.pods().await.len() == 1
    })
    .await;

    // DEL releases and forgets.
    assert_eq!(lab.cni("DEL", "app", "demo").0, 0);
    assert!(!lab.installed("app"));
    assert_eq!(lab.cni("DEL", "app", "demo").0, 0, "DEL is idempotent");
    assert!(agent.pods().iter().all(|p| p.name != "app"));
    zt.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarts_of_ztunnel_and_the_agent_lose_no_pod() {
    let mut lab = Lab::new("b", 32);
    let (_agent, agent_task) = start_agent(&lab).await;
    let zt = start_ztunnel(&lab.path("zds.sock"));
    let mut ips = Vec::new();
    for pod in ["one", "two"] {
        let (ip, status, out) = lab.add_pod(pod, "demo", true);
        assert_eq!(status, 0, "{out}");
        ips.push(ip);
    }
    eventually("both pods served", async || {
        zt.manager.pods().await.len() == 2
    })
    .await;

    // ztunnel restarts: the agent replays its snapshot to the new one.
    zt.stop().await;
    let zt = start_ztunnel(&lab.path("zds.sock"));
    eventually("snapshot replayed", async || {
        zt.manager.pods().await == vec!["uid-one".to_string(), "uid-two".to_string()]
    })
    .await;
    assert!(lab.listening("one", 15008).await && lab.listening("two", 15008).await);

    // The agent goes away; an ambient pod created meanwhile fails clearly (fail-closed)...
    agent_task.abort();
    let _ = agent_task.await;
    drop(_agent);
    let (_, status, out) = lab.add_pod("three", "demo", true);
    assert_eq!(status, 1);
    let error: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(error["code"], 11, "{out}");
    // ...or, fail-open, starts and is queued.
    let (four_ip, status, out) = lab.add_pod("four", "demo", false);
    assert_eq!(status, 0, "{out}");
    assert!(
        lab.installed("one"),
        "captured pods stay captured while the agent is down"
    );

    // The agent returns: nothing lost, the queued pod captured, ztunnel resynced.
    let (agent, _task) = start_agent(&lab).await;
    let captured: Vec<String> = agent
        .pods()
        .iter()
        .filter(|p| p.captured)
        .map(|p| p.name.clone())
        .collect();
    assert_eq!(captured.len(), 3, "{captured:?}");
    assert!(lab.installed("four"));
    ips.push(four_ip);
    ips.sort();
    assert_eq!(
        lab.probe_set(),
        Some(ips),
        "the probe SNAT set holds exactly the captured pods after the restart"
    );
    eventually("ztunnel has every pod", async || {
        zt.manager.pods().await
            == vec![
                "uid-four".to_string(),
                "uid-one".to_string(),
                "uid-two".to_string(),
            ]
    })
    .await;
    zt.stop().await;
}
