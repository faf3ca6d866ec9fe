//! A cluster's network on one Linux host: a "fabric" namespace holding the bridge that joins the
//! nodes, one namespace per node (with its pod bridge, made by the reference `bridge` plugin),
//! and one namespace per pod whose interface is created by a real CNI chain, exactly as a
//! container runtime would. Processes started here are killed when the topology is dropped, and
//! every namespace carries the topology's prefix so a crashed run can be cleaned up by name.
//!
//! Addresses: nodes are `10.240.0.(10+i)/24` on the fabric; node `i` owns pod CIDR
//! `10.244.(i+1).0/24` (gateway `.1`), routed from every other node.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use serde_json::{Value, json};
use thiserror::Error;

/// Where Debian's containernetworking-plugins live.
pub const CNI_BIN_DIR: &str = "/usr/lib/cni";

/// A failure building or changing the topology.
#[derive(Debug, Error)]
pub enum NetlabError {
    /// A command failed.
    #[error("{command}: {detail}")]
    Command {
        /// The command line.
        command: String,
        /// stderr or the spawn error.
        detail: String,
    },
    /// A CNI plugin failed.
    #[error("CNI {plugin} {command} for pod {pod}: {detail}")]
    Cni {
        /// Which plugin.
        plugin: String,
        /// ADD/DEL/CHECK.
        command: String,
        /// `namespace/name`.
        pod: String,
        /// What it printed.
        detail: String,
    },
    /// Something is missing on the host.
    #[error("{0}")]
    Missing(String),
    /// File trouble.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// Runs `ip` with `args`.
pub fn ip(args: &[&str]) -> Result<String, NetlabError> {
    run(Command::new("ip").args(args))
}

fn run(command: &mut Command) -> Result<String, NetlabError> {
    let line = format!("{command:?}");
    let out = command.output().map_err(|e| NetlabError::Command {
        command: line.clone(),
        detail: e.to_string(),
    })?;
    if !out.status.success() {
        return Err(NetlabError::Command {
            command: line,
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

/// Every named network namespace whose name starts with `prefix`.
pub fn namespaces_with_prefix(prefix: &str) -> Vec<String> {
    ip(&["netns", "list"])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(prefix))
        .map(str::to_string)
        .collect()
}

/// Deletes every namespace with `prefix` (after a crash or a half-finished setup).
pub fn delete_namespaces(prefix: &str) -> usize {
    let names = namespaces_with_prefix(prefix);
    for name in &names {
        let _ = ip(&["netns", "del", name]);
    }
    names.len()
}

/// A simulated node.
#[derive(Clone, Debug)]
pub struct Node {
    /// Node name (`node-1`, ...).
    pub name: String,
    /// Its network namespace.
    pub netns: String,
    /// Its address on the fabric.
    pub ip: Ipv4Addr,
    /// Its pod CIDR's third octet (`10.244.<n>.0/24`).
    pub pod_subnet: u8,
    /// Its directory (sockets, CNI configuration, state).
    pub dir: PathBuf,
}

impl Node {
    /// The pod CIDR.
    pub fn pod_cidr(&self) -> String {
        format!("10.244.{}.0/24", self.pod_subnet)
    }
}

/// A pod's network.
#[derive(Clone, Debug)]
pub struct PodNet {
    /// Kubernetes namespace.
    pub namespace: String,
    /// Pod name.
    pub name: String,
    /// Pod uid.
    pub uid: String,
    /// Index of its node.
    pub node: usize,
    /// Its network namespace.
    pub netns: String,
    /// Its IP.
    pub ip: IpAddr,
}

impl PodNet {
    /// `/run/netns/<netns>`.
    pub fn netns_path(&self) -> String {
        format!("/run/netns/{}", self.netns)
    }

    /// The CNI container id the lab uses for this pod.
    pub fn container_id(&self) -> String {
        format!("lab-{}-{}", self.namespace, self.name)
    }
}

/// A started process, killed (and reaped) on drop.
#[derive(Debug)]
pub struct Process {
    /// What it is (for messages).
    pub name: String,
    child: Option<Child>,
}

impl Process {
    /// The OS process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Lets it run on after this handle is dropped (the lab's components outlive `lab up`);
    /// returns its pid.
    pub fn detach(mut self) -> Option<u32> {
        self.child.take().map(|c| c.id())
    }

    /// Whether it is still running.
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Sends SIGTERM and waits for it to exit; returns its exit code.
    pub fn terminate(mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        for _ in 0..200 {
            if let Ok(Some(status)) = child.try_wait() {
                return status.code();
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let _ = child.kill();
        child.wait().ok().and_then(|s| s.code())
    }

    /// Kills it at once (a crash).
    pub fn kill(mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The whole simulated cluster network.
#[derive(Debug)]
pub struct Topology {
    /// Prefix of every namespace and link name.
    pub prefix: String,
    /// The namespace holding the node bridge.
    pub fabric: String,
    /// The nodes.
    pub nodes: Vec<Node>,
    /// The pods.
    pub pods: Vec<PodNet>,
    /// The run directory.
    pub dir: PathBuf,
    /// Remove everything on drop (tests); the lab keeps its topology after `up` returns.
    pub cleanup_on_drop: bool,
}

/// The CNI plugins to chain after `bridge` for every pod.
#[derive(Clone, Debug, Default)]
pub struct Chain {
    /// Extra plugin entries (e.g. ambit-cni) with the path of their binary.
    pub plugins: Vec<(PathBuf, Value)>,
}

impl Topology {
    /// Checks the host has what the topology needs.
    pub fn preflight() -> Result<(), NetlabError> {
        if !nix::unistd::geteuid().is_root() {
            return Err(NetlabError::Missing(
                "network namespaces need root: run as root (sudo)".into(),
            ));
        }
        if Command::new("ip").arg("-V").output().is_err() {
            return Err(NetlabError::Missing(
                "the `ip` command is missing: apt-get install iproute2".into(),
            ));
        }
        if !Path::new(CNI_BIN_DIR).join("bridge").exists() {
            return Err(NetlabError::Missing(format!(
                "the reference CNI plugins are missing from {CNI_BIN_DIR}: apt-get install containernetworking-plugins"
            )));
        }
        Ok(())
    }

    /// Creates the fabric and `nodes` nodes under `dir`.
    pub fn create(prefix: &str, dir: &Path, nodes: usize) -> Result<Self, NetlabError> {
        Self::preflight()?;
        delete_namespaces(prefix);
        std::fs::create_dir_all(dir).map_err(|source| NetlabError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let fabric = format!("{prefix}fabric");
        let mut topology = Topology {
            prefix: prefix.to_string(),
            fabric: fabric.clone(),
            nodes: Vec::new(),
            pods: Vec::new(),
            dir: dir.to_path_buf(),
            cleanup_on_drop: true,
        };
        netns_add(&fabric)?;
        ip(&["-n", &fabric, "link", "add", "br-fabric", "type", "bridge"])?;
        ip(&["-n", &fabric, "link", "set", "br-fabric", "up"])?;
        for i in 0..nodes {
            let name = format!("node-{}", i + 1);
            let netns = format!("{prefix}{name}");
            let node = Node {
                ip: Ipv4Addr::new(10, 240, 0, 10 + i as u8),
                pod_subnet: (i + 1) as u8,
                dir: dir.join(&name),
                name,
                netns: netns.clone(),
            };
            std::fs::create_dir_all(&node.dir).map_err(|source| NetlabError::Io {
                path: node.dir.clone(),
                source,
            })?;
            netns_add(&netns)?;
            let host_end = format!("f{i}");
            ip(&[
                "-n", &netns, "link", "add", "eth0", "type", "veth", "peer", "name", &host_end,
                "netns", &fabric,
            ])?;
            ip(&[
                "-n",
                &fabric,
                "link",
                "set",
                &host_end,
                "master",
                "br-fabric",
            ])?;
            ip(&["-n", &fabric, "link", "set", &host_end, "up"])?;
            ip(&[
                "-n",
                &netns,
                "addr",
                "add",
                &format!("{}/24", node.ip),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", &netns, "link", "set", "eth0", "up"])?;
            sysctl(&netns, "net/ipv4/ip_forward", "1")?;
            topology.nodes.push(node);
        }
        // Every node routes every other node's pod CIDR to that node.
        for a in &topology.nodes {
            for b in &topology.nodes {
                if a.name != b.name {
                    ip(&[
                        "-n",
                        &a.netns,
                        "route",
                        "add",
                        &b.pod_cidr(),
                        "via",
                        &b.ip.to_string(),
                    ])?;
                }
            }
        }
        Ok(topology)
    }

    fn bridge_conf(&self, node: &Node) -> Value {
        json!({
            "cniVersion": "1.0.0",
            "name": "ambit-lab",
            "type": "bridge",
            "bridge": "cni0",
            "isGateway": true,
            "ipMasq": false,
            "ipam": {
                "type": "host-local",
                "dataDir": node.dir.join("ipam"),
                "ranges": [[{"subnet": node.pod_cidr()}]],
                "routes": [{"dst": "0.0.0.0/0"}]
            }
        })
    }

    /// Runs a CNI plugin for a pod inside the node's namespace, as a runtime would.
    fn cni(
        &self,
        plugin: &Path,
        command: &str,
        pod: &PodNet,
        conf: &Value,
    ) -> Result<String, NetlabError> {
        let node = &self.nodes[pod.node];
        let mut child = Command::new("ip")
            .args(["netns", "exec", &node.netns])
            .arg(plugin)
            .env_clear()
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", pod.container_id())
            .env("CNI_NETNS", pod.netns_path())
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", CNI_BIN_DIR)
            .env(
                "CNI_ARGS",
                format!(
                    "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_UID={}",
                    pod.namespace, pod.name, pod.uid
                ),
            )
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| NetlabError::Command {
                command: format!("{}", plugin.display()),
                detail: e.to_string(),
            })?;
        use std::io::Write;
        if let Some(mut stdin) = child.stdin.take() {
            let _ = stdin.write_all(conf.to_string().as_bytes());
        }
        let out = child.wait_with_output().map_err(|e| NetlabError::Command {
            command: format!("{}", plugin.display()),
            detail: e.to_string(),
        })?;
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        if !out.status.success() {
            return Err(NetlabError::Cni {
                plugin: plugin.display().to_string(),
                command: command.into(),
                pod: format!("{}/{}", pod.namespace, pod.name),
                detail: format!(
                    "{}{}",
                    stdout.trim(),
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            });
        }
        Ok(stdout)
    }

    /// Creates a pod on node `node`: its namespace, then the CNI chain (`bridge` + `host-local`,
    /// then `chain`) exactly as a runtime calls it. Returns the pod.
    pub fn add_pod(
        &mut self,
        node: usize,
        namespace: &str,
        name: &str,
        uid: &str,
        chain: &Chain,
    ) -> Result<PodNet, NetlabError> {
        let netns = format!("{}p-{namespace}-{name}", self.prefix);
        netns_add(&netns)?;
        let mut pod = PodNet {
            namespace: namespace.into(),
            name: name.into(),
            uid: uid.into(),
            node,
            netns,
            ip: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        };
        let node_ref = self.nodes[node].clone();
        let bridge = Path::new(CNI_BIN_DIR).join("bridge");
        let result = self.cni(&bridge, "ADD", &pod, &self.bridge_conf(&node_ref))?;
        let prev: Value = serde_json::from_str(&result).map_err(|e| NetlabError::Cni {
            plugin: "bridge".into(),
            command: "ADD".into(),
            pod: format!("{namespace}/{name}"),
            detail: format!("unreadable result: {e}"),
        })?;
        pod.ip = prev["ips"][0]["address"]
            .as_str()
            .and_then(|a| a.split('/').next())
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| NetlabError::Cni {
                plugin: "bridge".into(),
                command: "ADD".into(),
                pod: format!("{namespace}/{name}"),
                detail: format!("no IP in {result}"),
            })?;
        for (binary, entry) in &chain.plugins {
            let mut conf = entry.clone();
            conf["cniVersion"] = json!("1.0.0");
            conf["name"] = json!("ambit-lab");
            conf["prevResult"] = prev.clone();
            self.cni(binary, "ADD", &pod, &conf)?;
        }
        self.pods.push(pod.clone());
        Ok(pod)
    }

    /// Deletes a pod: the chain's DEL in reverse order, then its namespace.
    pub fn delete_pod(
        &mut self,
        namespace: &str,
        name: &str,
        chain: &Chain,
    ) -> Result<(), NetlabError> {
        let Some(index) = self
            .pods
            .iter()
            .position(|p| p.namespace == namespace && p.name == name)
        else {
            return Ok(());
        };
        let pod = self.pods.remove(index);
        let node = self.nodes[pod.node].clone();
        for (binary, entry) in chain.plugins.iter().rev() {
            let mut conf = entry.clone();
            conf["cniVersion"] = json!("1.0.0");
            conf["name"] = json!("ambit-lab");
            let _ = self.cni(binary, "DEL", &pod, &conf);
        }
        let _ = self.cni(
            &Path::new(CNI_BIN_DIR).join("bridge"),
            "DEL",
            &pod,
            &self.bridge_conf(&node),
        );
        let _ = ip(&["netns", "del", &pod.netns]);
        Ok(())
    }

    /// The pod `namespace/name`.
    pub fn pod(&self, namespace: &str, name: &str) -> Option<&PodNet> {
        self.pods
            .iter()
            .find(|p| p.namespace == namespace && p.name == name)
    }

    /// Starts `program` inside `netns` (with `env`), output to `log`.
    pub fn spawn(
        &self,
        name: &str,
        netns: &str,
        program: &Path,
        args: &[&str],
        env: &[(&str, String)],
        log: &Path,
    ) -> Result<Process, NetlabError> {
        let file = std::fs::File::create(log).map_err(|source| NetlabError::Io {
            path: log.to_path_buf(),
            source,
        })?;
        let err = file.try_clone().map_err(|source| NetlabError::Io {
            path: log.to_path_buf(),
            source,
        })?;
        let mut command = Command::new("ip");
        use std::os::unix::process::CommandExt;
        command
            .args(["netns", "exec", netns])
            .arg(program)
            .args(args)
            // Its own process group: a Ctrl-C in the terminal that started the lab does not
            // reach the lab's components.
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err);
        for (k, v) in env {
            command.env(k, v);
        }
        let child = command.spawn().map_err(|e| NetlabError::Command {
            command: format!("{}", program.display()),
            detail: e.to_string(),
        })?;
        Ok(Process {
            name: name.to_string(),
            child: Some(child),
        })
    }

    /// Runs a command in `netns` to completion; returns (exit code, stdout, stderr).
    pub fn exec(&self, netns: &str, program: &Path, args: &[&str]) -> (i32, String, String) {
        match Command::new("ip")
            .args(["netns", "exec", netns])
            .arg(program)
            .args(args)
            .output()
        {
            Ok(out) => (
                out.status.code().unwrap_or(-1),
                String::from_utf8_lossy(&out.stdout).to_string(),
                String::from_utf8_lossy(&out.stderr).to_string(),
            ),
            Err(e) => (-1, String::new(), e.to_string()),
        }
    }

    /// Removes every namespace of this topology and its directory.
    pub fn destroy(&mut self) {
        delete_namespaces(&self.prefix);
        let _ = std::fs::remove_dir_all(&self.dir);
        self.pods.clear();
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        if self.cleanup_on_drop {
            self.destroy();
        }
    }
}

fn netns_add(name: &str) -> Result<(), NetlabError> {
    let _ = ip(&["netns", "del", name]);
    ip(&["netns", "add", name])?;
    ip(&["-n", name, "link", "set", "lo", "up"])?;
    Ok(())
}

/// Writes a sysctl inside `netns`.
pub fn sysctl(netns: &str, key: &str, value: &str) -> Result<(), NetlabError> {
    run(Command::new("ip").args([
        "netns",
        "exec",
        netns,
        "sh",
        "-c",
        &format!("echo {value} > /proc/sys/{key}"),
    ]))
    .map(drop)
}
