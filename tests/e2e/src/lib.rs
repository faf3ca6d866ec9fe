//! Shared pieces of the end-to-end tests: finding the built binaries, a two-node cluster with
//! cni-agent and ztunnel per node (ztunnel configured from a local file and a local CA until the
//! control plane joins), echo workloads, and helpers to call them and read metrics.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use ambit_netlab::{Chain, NetlabError, Process, Topology};

pub mod bench;
use serde_json::{Value, json};

/// A binary built by `cargo build --workspace --bins` next to the test executable.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first (cargo build --workspace --bins), as scripts/test does",
        path.display()
    );
    path
}

/// Runs `ambitctl` against a test lab of its own (namespace prefix and directory), so a
/// developer's running lab is never touched. Returns the exit code, stdout and stderr.
pub fn ambitctl_lab(prefix: &str, dir: &str, args: &[&str]) -> (i32, String, String) {
    ambitctl_lab_with(prefix, dir, &[], args)
}

/// [`ambitctl_lab`] with extra environment variables for `ambitctl`.
pub fn ambitctl_lab_with(
    prefix: &str,
    dir: &str,
    env: &[(&str, &std::ffi::OsStr)],
    args: &[&str],
) -> (i32, String, String) {
    let out = Command::new(binary("ambitctl"))
        .args(args)
        .env(
            "AMBIT_BIN_DIR",
            binary("ztunnel").parent().expect("bin dir"),
        )
        .env("AMBIT_LAB_PREFIX", prefix)
        .env("AMBIT_LAB_DIR", dir)
        .envs(env.iter().copied())
        .output()
        .expect("ambitctl runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// Polls `check` every 50 ms until it holds or `limit` passes.
pub fn wait_until(what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while start.elapsed() < limit {
        if check() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out after {limit:?} waiting for: {what}");
}

/// A pod in the test cluster's configuration.
#[derive(Clone, Debug)]
pub struct PodSpec {
    /// Namespace.
    pub namespace: &'static str,
    /// Name.
    pub name: &'static str,
    /// Service account.
    pub service_account: &'static str,
    /// Node index.
    pub node: usize,
    /// `app` label (and canonical service).
    pub app: &'static str,
}

/// Two nodes, cni-agent and ztunnel on each, echo workloads in pods.
#[derive(Debug)]
pub struct Cluster {
    /// The network.
    pub topology: Topology,
    /// Per node: (cni-agent, ztunnel).
    pub agents: Vec<Option<Process>>,
    /// Per node ztunnel.
    pub ztunnels: Vec<Option<Process>>,
    /// Workload processes.
    pub workloads: Vec<Process>,
    /// Shared config directory the agents read.
    pub config_dir: PathBuf,
    /// ztunnel's local configuration file.
    pub ztunnel_config: PathBuf,
    ca_dir: PathBuf,
    extra_env: Vec<(&'static str, String)>,
}

impl Cluster {
    /// Builds the network and starts the node components.
    pub fn start(
        prefix: &str,
        nodes: usize,
        ztunnel_env: &[(&'static str, String)],
    ) -> Result<Self, NetlabError> {
        let dir = PathBuf::from(format!("/tmp/{prefix}dir"));
        let _ = std::fs::remove_dir_all(&dir);
        let topology = Topology::create(prefix, &dir, nodes)?;
        let config_dir = dir.join("config");
        let ca_dir = dir.join("ca");
        std::fs::create_dir_all(&config_dir).expect("config dir");
        std::fs::create_dir_all(&ca_dir).expect("ca dir");
        let ca = ambit_identity::ca::CertificateAuthority::generate_root(
            "cluster.local",
            Duration::from_secs(86400),
        )
        .expect("test CA");
        std::fs::write(ca_dir.join("ca-cert.pem"), ca.cert_pem()).expect("ca cert");
        std::fs::write(ca_dir.join("ca-key.pem"), ca.key_pem()).expect("ca key");
        let ztunnel_config = dir.join("ztunnel.yaml");
        std::fs::write(&ztunnel_config, "").expect("ztunnel config");
        let mut cluster = Cluster {
            topology,
            agents: Vec::new(),
            ztunnels: Vec::new(),
            workloads: Vec::new(),
            config_dir,
            ztunnel_config,
            ca_dir,
            extra_env: ztunnel_env.to_vec(),
        };
        for i in 0..nodes {
            let agent = cluster.start_agent(i)?;
            cluster.agents.push(Some(agent));
            let ztunnel = cluster.start_ztunnel(i)?;
            cluster.ztunnels.push(Some(ztunnel));
        }
        Ok(cluster)
    }

    fn chain_for(&self, node: usize) -> Chain {
        let dir = &self.topology.nodes[node].dir;
        Chain {
            plugins: vec![(
                binary("ambit-cni"),
                json!({"type": "ambit-cni", "agentSocket": dir.join("agent.sock"), "enrollmentFile": dir.join("state/enrollment.json"), "pendingDir": dir.join("state/pending")}),
            )],
        }
    }

    /// Starts node `i`'s cni-agent.
    pub fn start_agent(&self, i: usize) -> Result<Process, NetlabError> {
        let node = &self.topology.nodes[i];
        let (dir, config) = (
            node.dir.display().to_string(),
            self.config_dir.display().to_string(),
        );
        let args = [
            "run",
            "--node",
            &node.name,
            "--plugin-socket",
            &format!("{dir}/agent.sock"),
            "--zds-socket",
            &format!("{dir}/zds.sock"),
            "--state-dir",
            &format!("{dir}/state"),
            "--config-dir",
            &config,
        ];
        let process = self.topology.spawn(
            "cni-agent",
            &node.netns,
            &binary("cni-agent"),
            &args,
            &[],
            &node.dir.join("cni-agent.log"),
        )?;
        let socket = node.dir.join("agent.sock");
        wait_until("cni-agent socket", Duration::from_secs(20), || {
            socket.exists()
        });
        Ok(process)
    }

    /// Starts node `i`'s ztunnel.
    pub fn start_ztunnel(&self, i: usize) -> Result<Process, NetlabError> {
        let node = &self.topology.nodes[i];
        let mut env = vec![
            ("NODE_NAME", node.name.clone()),
            ("LOCAL_XDS_PATH", self.ztunnel_config.display().to_string()),
            ("LOCAL_CA_DIR", self.ca_dir.display().to_string()),
            ("INPOD_UDS", node.dir.join("zds.sock").display().to_string()),
            ("STATS_ADDR", format!("{}:15020", node.ip)),
            ("READINESS_ADDR", format!("{}:15021", node.ip)),
            ("ADMIN_ADDR", "127.0.0.1:15000".to_string()),
            ("RUST_LOG", "info".to_string()),
        ];
        env.extend(self.extra_env.iter().cloned());
        self.topology.spawn(
            "ztunnel",
            &node.netns,
            &binary("ztunnel"),
            &[],
            &env,
            &node.dir.join("ztunnel.log"),
        )
    }

    /// Writes the agents' view of namespaces and pods.
    pub fn write_objects(&self, ambient_namespaces: &[&str], pods: &[PodSpec]) {
        let mut docs = Vec::new();
        for ns in ["demo", "legacy", "other"] {
            let labels = if ambient_namespaces.contains(&ns) {
                "{istio.io/dataplane-mode: ambient}"
            } else {
                "{}"
            };
            docs.push(format!(
                "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}, labels: {labels}}}\n"
            ));
        }
        for pod in pods {
            docs.push(format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: {}, namespace: {}, labels: {{app: {}}}}}\nspec: {{nodeName: node-{}, serviceAccountName: {}}}\n",
                pod.name, pod.namespace, pod.app, pod.node + 1, pod.service_account
            ));
        }
        std::fs::write(self.config_dir.join("cluster.yaml"), docs.join("---\n"))
            .expect("write objects");
    }

    /// Creates a pod through the CNI chain and starts the echo workload in it.
    pub fn add_pod(&mut self, spec: &PodSpec) -> Result<IpAddr, NetlabError> {
        let chain = self.chain_for(spec.node);
        let uid = format!("uid-{}-{}", spec.namespace, spec.name);
        let pod = self
            .topology
            .add_pod(spec.node, spec.namespace, spec.name, &uid, &chain)?;
        let node = &self.topology.nodes[spec.node];
        let env = [
            ("POD_NAME", spec.name.to_string()),
            ("POD_NAMESPACE", spec.namespace.to_string()),
            ("NODE_NAME", node.name.clone()),
        ];
        let log = node
            .dir
            .join(format!("echo-{}-{}.log", spec.namespace, spec.name));
        let process = self.topology.spawn(
            "echo",
            &pod.netns,
            &binary("ambit-echo"),
            &["serve"],
            &env,
            &log,
        )?;
        self.workloads.push(process);
        Ok(pod.ip)
    }

    /// Deletes a pod through the CNI chain.
    pub fn delete_pod(&mut self, namespace: &str, name: &str) {
        let node = self
            .topology
            .pod(namespace, name)
            .map(|p| p.node)
            .unwrap_or(0);
        let chain = self.chain_for(node);
        let _ = self.topology.delete_pod(namespace, name, &chain);
    }

    /// Runs `ambit-echo <args>` inside pod `namespace/name`.
    pub fn echo(&self, namespace: &str, name: &str, args: &[&str]) -> (i32, String, String) {
        let pod = self.topology.pod(namespace, name).expect("pod exists");
        self.topology.exec(&pod.netns, &binary("ambit-echo"), args)
    }

    /// GET a node's ztunnel endpoint (`port` 15020/15021) and return (status, body).
    pub fn node_http(&self, node: usize, port: u16, path: &str) -> (u16, String) {
        let n = &self.topology.nodes[node];
        self.http_in(&n.netns, SocketAddr::new(IpAddr::V4(n.ip), port), path)
    }

    /// GET inside a network namespace using the echo client's raw HTTP.
    pub fn http_in(&self, netns: &str, addr: SocketAddr, path: &str) -> (u16, String) {
        let (_, out, _) = self.topology.exec(
            netns,
            Path::new("/usr/bin/curl"),
            &[
                "-s",
                "-m",
                "5",
                "-w",
                "\n%{http_code}",
                &format!("http://{addr}{path}"),
            ],
        );
        let (body, code) = out.rsplit_once('\n').unwrap_or(("", "0"));
        (code.trim().parse().unwrap_or(0), body.to_string())
    }

    /// Waits until every ztunnel reports ready.
    pub fn wait_ready(&self) {
        for i in 0..self.topology.nodes.len() {
            wait_until(
                &format!("ztunnel on node {} ready", i + 1),
                Duration::from_secs(30),
                || self.node_http(i, 15021, "/healthz/ready").0 == 200,
            );
        }
    }

    /// The value of the metric line matching every `labels` fragment on node `i` (sum).
    pub fn metric(&self, node: usize, name: &str, labels: &[&str]) -> f64 {
        let (_, text) = self.node_http(node, 15020, "/metrics");
        text.lines()
            .filter(|l| l.starts_with(name) && labels.iter().all(|f| l.contains(f)))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

/// Parses `ambit-echo call` output.
pub fn summary(out: &str) -> Value {
    serde_json::from_str(out.trim()).unwrap_or(Value::Null)
}

/// Keeps one TCP connection open for `duration`, echoing a message every 500 ms. Ok if every
/// echo came back.
pub fn long_connection(netns: &str, target: &str, duration: Duration) -> Result<(), String> {
    use std::io::{BufRead, BufReader, Write};
    let script = format!(
        "exec 3<>/dev/tcp/{}/{}; head -n1 <&3 >/dev/null; end=$((SECONDS+{})); while [ $SECONDS -lt $end ]; do echo tick >&3 || exit 3; read -t 3 line <&3 || exit 4; [ \"$line\" = tick ] || exit 5; sleep 0.5; done",
        target.split(':').next().unwrap(),
        target.split(':').nth(1).unwrap(),
        duration.as_secs()
    );
    let mut child = Command::new("ip")
        .args(["netns", "exec", netns, "bash", "-c", &script])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let _ = (
        BufReader::new(child.stdout.take().unwrap()).lines().count(),
        std::io::stdout().flush(),
    );
    let status = child.wait().map_err(|e| e.to_string())?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("connection broke: exit {:?}", status.code()))
    }
}
