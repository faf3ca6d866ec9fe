//! The lab: simulated nodes and pods in network namespaces on this host, running the real
//! istiod-lite (reading the lab's config directory), one cni-agent and one ztunnel per node, the
//! CNI chain for every pod as a runtime would call it, and the echo workload in every pod.
//!
//! Everything lives under one directory (`/run/ambit-lab`) and in namespaces named `ambit-lab-*`
//! (both overridable with `AMBIT_LAB_DIR` and `AMBIT_LAB_PREFIX`, so a test lab never touches
//! yours), so `down` can remove it
//! all even after a crash.

pub(crate) mod dashboard;
mod demo;
mod env;
mod http;
mod prometheus;
mod tracing;
mod waypoints;

use std::collections::BTreeMap;
use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use ambit_mesh::enrollment::enrollment;
use ambit_mesh::{Namespace, Object, ObjectKey, Pod};
use ambit_netlab::{Chain, Node, PodNet, Process, Topology};
use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use serde_json::json;

/// Where the lab keeps its files.
fn lab_dir() -> String {
    std::env::var("AMBIT_LAB_DIR").unwrap_or_else(|_| "/run/ambit-lab".into())
}

/// The prefix of every namespace the lab creates.
fn prefix() -> String {
    std::env::var("AMBIT_LAB_PREFIX").unwrap_or_else(|_| "ambit-lab-".into())
}
const FABRIC_IP: Ipv4Addr = Ipv4Addr::new(10, 240, 0, 1);
const BINARIES: [&str; 6] = [
    "istiod-lite",
    "ztunnel",
    "cni-agent",
    "ambit-cni",
    "ambit-echo",
    "waypoint",
];

#[derive(Debug, Default, Serialize, Deserialize)]
struct LabState {
    nodes: Vec<NodeState>,
    pods: Vec<PodState>,
    services: Vec<ServiceState>,
    /// component name → pid.
    pids: BTreeMap<String, u32>,
    binaries: BTreeMap<String, PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct NodeState {
    name: String,
    netns: String,
    ip: Ipv4Addr,
    pod_subnet: u8,
    dir: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct PodState {
    namespace: String,
    name: String,
    uid: String,
    node: usize,
    netns: String,
    ip: IpAddr,
    service_account: String,
    ambient: bool,
    /// The Gateway whose waypoint this pod runs (made by the waypoint controller).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    gateway: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ServiceState {
    namespace: String,
    name: String,
    vip: String,
    ports: Vec<u16>,
}

fn dir() -> PathBuf {
    PathBuf::from(lab_dir())
}

fn state_path() -> PathBuf {
    dir().join("lab.json")
}

fn load_state() -> anyhow::Result<LabState> {
    let text = std::fs::read_to_string(state_path())
        .context("no lab is running here (start one with `ambitctl lab up --demo`)")?;
    serde_json::from_str(&text).context("the lab's state file is corrupt; run `ambitctl lab down`")
}

fn save_state(state: &LabState) -> anyhow::Result<()> {
    std::fs::write(state_path(), serde_json::to_vec_pretty(state)?)?;
    Ok(())
}

/// Finds a component binary: `$AMBIT_BIN_DIR`, next to ambitctl, `target/{release,debug}`, PATH.
fn find_binary(name: &str) -> anyhow::Result<PathBuf> {
    let mut places: Vec<PathBuf> = Vec::new();
    if let Ok(dir) = std::env::var("AMBIT_BIN_DIR") {
        places.push(PathBuf::from(dir));
    }
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    {
        places.push(dir);
    }
    places.push(PathBuf::from("target/release"));
    places.push(PathBuf::from("target/debug"));
    if let Ok(path) = std::env::var("PATH") {
        places.extend(std::env::split_paths(&path));
    }
    for place in &places {
        let candidate = place.join(name);
        if candidate.is_file() {
            return Ok(candidate.canonicalize().unwrap_or(candidate));
        }
    }
    bail!(
        "{name} not found (looked in $AMBIT_BIN_DIR, next to ambitctl, target/release, target/debug and PATH); build it with `cargo build --release --workspace --bins`"
    )
}

fn topology(state: &LabState) -> Topology {
    Topology {
        prefix: prefix(),
        fabric: format!("{}fabric", prefix()),
        nodes: state
            .nodes
            .iter()
            .map(|n| Node {
                name: n.name.clone(),
                netns: n.netns.clone(),
                ip: n.ip,
                pod_subnet: n.pod_subnet,
                dir: n.dir.clone(),
            })
            .collect(),
        pods: state
            .pods
            .iter()
            .map(|p| PodNet {
                namespace: p.namespace.clone(),
                name: p.name.clone(),
                uid: p.uid.clone(),
                node: p.node,
                netns: p.netns.clone(),
                ip: p.ip,
            })
            .collect(),
        dir: dir(),
        cleanup_on_drop: false,
    }
}

fn chain(state: &LabState, node: usize) -> Chain {
    let dir = &state.nodes[node].dir;
    Chain {
        plugins: vec![(
            state.binaries["ambit-cni"].clone(),
            json!({
                "type": "ambit-cni",
                "agentSocket": dir.join("agent.sock"),
                "enrollmentFile": dir.join("state/enrollment.json"),
                "pendingDir": dir.join("state/pending"),
            }),
        )],
    }
}

fn progress(message: &str) {
    eprintln!("• {message}");
}

/// Progress through many items of one step, on stderr: each item while there are few, otherwise
/// a count every two seconds and at the end, so a 200-pod lab shows it is moving.
struct Steps {
    what: &'static str,
    total: usize,
    done: usize,
    start: Instant,
    last: Instant,
}

impl Steps {
    const EACH_UP_TO: usize = 20;

    fn new(what: &'static str, total: usize) -> Self {
        if total > Self::EACH_UP_TO {
            progress(&format!("{what}: 0/{total}"));
        }
        Steps {
            what,
            total,
            done: 0,
            start: Instant::now(),
            last: Instant::now(),
        }
    }

    /// One item done (`detail` is shown when there are few items).
    fn item(&mut self, detail: impl FnOnce() -> String) {
        self.done += 1;
        if self.total <= Self::EACH_UP_TO {
            progress(&detail());
        } else if self.done == self.total || self.last.elapsed() >= Duration::from_secs(2) {
            self.last = Instant::now();
            progress(&format!(
                "{}: {}/{} ({:.1} s)",
                self.what,
                self.done,
                self.total,
                self.start.elapsed().as_secs_f64()
            ));
        }
    }
}

/// Waits until `count()` reaches `total`, showing the count every two seconds while it takes.
fn wait_count(
    what: &str,
    limit: Duration,
    total: usize,
    mut count: impl FnMut() -> usize,
) -> anyhow::Result<()> {
    let mut last = Instant::now();
    let mut seen = 0;
    wait(what, limit, || {
        seen = count();
        if seen < total && last.elapsed() >= Duration::from_secs(2) {
            last = Instant::now();
            progress(&format!("{what}: {seen}/{total}"));
        }
        seen >= total
    })
    .with_context(|| format!("{seen} of {total} done"))
}

fn wait(what: &str, limit: Duration, mut check: impl FnMut() -> bool) -> anyhow::Result<()> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if check() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!(
        "timed out after {limit:?} waiting for {what}; logs are in {}",
        lab_dir()
    )
}

fn object_file(key: &ObjectKey) -> String {
    format!(
        "{}-{}-{}.yaml",
        key.kind.to_lowercase(),
        if key.namespace.is_empty() {
            "_"
        } else {
            &key.namespace
        },
        key.name
    )
}

/// Reads objects from a file or directory; any invalid object aborts with every message.
fn read_objects(path: &Path) -> anyhow::Result<Vec<Object>> {
    let (objects, errors) = if path.is_dir() {
        ambit_mesh::read_dir(path).with_context(|| format!("reading {}", path.display()))?
    } else {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        ambit_mesh::parse_documents(&text, &name)
    };
    if !errors.is_empty() {
        let mut message = String::from("invalid objects, nothing was changed:");
        for e in errors {
            message.push_str(&format!("\n  {e}"));
        }
        bail!(message);
    }
    let mut objects = objects;
    env::attach(&mut objects, &env::read_documents(path));
    Ok(objects)
}

/// The objects currently in the lab's config directory.
pub(crate) fn current_objects() -> anyhow::Result<Vec<Object>> {
    Ok(ambit_mesh::read_dir(&dir().join("config"))?.0)
}

fn write_object(object: &Object) -> anyhow::Result<()> {
    let key = object.key();
    let value = object.to_value();
    let path = dir().join("config").join(object_file(&key));
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_yaml_ng::to_string(&value)?)?;
    std::fs::rename(tmp, path)?;
    Ok(())
}

/// Assigns what the API server and scheduler would: VIPs for services, nodes for pods, uids.
/// The annotation marking pods the lab created for a Deployment.
const OWNER: &str = "lab.ambit.io/owner";

/// Pods for each `apps/v1` Deployment (`spec.replicas` copies of `spec.template`, named
/// `<deployment>-<index>`), as the controllers would create them. `spec.replicas` is honoured as
/// given; whether the pods fit is checked once they are scheduled ([`check_capacity`]).
fn expand_deployments(objects: &mut Vec<Object>) -> anyhow::Result<()> {
    let mut pods = Vec::new();
    for object in objects.iter() {
        let Object::Other { key, value, .. } = object else {
            continue;
        };
        if key.kind != "Deployment" {
            continue;
        }
        let replicas = match &value["spec"]["replicas"] {
            serde_json::Value::Null => 1,
            v => v.as_u64().with_context(|| {
                format!(
                    "Deployment {}/{}: spec.replicas must be a whole number of pods, not {v}",
                    key.namespace, key.name
                )
            })?,
        };
        let template = &value["spec"]["template"];
        for i in 0..replicas {
            let mut pod = serde_json::json!({
                "metadata": template["metadata"].clone(),
                "spec": template["spec"].clone(),
            });
            pod["metadata"]["name"] = json!(format!("{}-{i}", key.name));
            pod["metadata"]["namespace"] = json!(key.namespace);
            pod["metadata"]["annotations"][OWNER] = json!(format!("Deployment/{}", key.name));
            let mut pod = serde_json::from_value::<Pod>(pod).with_context(|| {
                format!(
                    "Deployment {}/{}: spec.template is not a valid pod template",
                    key.namespace, key.name
                )
            })?;
            env::put(&mut pod, &env::of_spec(&template["spec"]));
            pods.push(Object::Pod(pod));
        }
    }
    objects.extend(pods);
    Ok(())
}

/// How many pods fit on one lab node: host-local hands out .2 to .254 of the node's /24.
const PODS_PER_NODE: usize = 253;

/// Refuses a set of new pods that would not fit on their nodes, naming what asked for them
/// (the Deployment's `spec.replicas`, or the pod) and the limit, before anything is created.
fn check_capacity(objects: &[Object], state: &LabState, nodes: usize) -> anyhow::Result<()> {
    let mut per_node = vec![0usize; nodes];
    for pod in &state.pods {
        if let Some(count) = per_node.get_mut(pod.node) {
            *count += 1;
        }
    }
    let existing = state.pods.len();
    let mut new = 0usize;
    let mut asked_by: BTreeMap<String, usize> = BTreeMap::new();
    for object in objects {
        let Object::Pod(p) = object else { continue };
        if state
            .pods
            .iter()
            .any(|s| s.namespace == p.metadata.namespace && s.name == p.metadata.name)
        {
            continue;
        }
        new += 1;
        let owner = match p.metadata.annotations.get(OWNER) {
            Some(owner) => format!(
                "{} {}/{}: spec.replicas",
                owner.split('/').next().unwrap_or("Deployment"),
                p.metadata.namespace,
                owner.split('/').nth(1).unwrap_or_default()
            ),
            None => format!("Pod {}/{}", p.metadata.namespace, p.metadata.name),
        };
        *asked_by.entry(owner).or_default() += 1;
        if let Some(n) = p
            .spec
            .node_name
            .strip_prefix("node-")
            .and_then(|n| n.parse::<usize>().ok())
            .and_then(|n| n.checked_sub(1))
            && let Some(count) = per_node.get_mut(n)
        {
            *count += 1;
        }
    }
    if let Some((node, count)) = per_node
        .iter()
        .enumerate()
        .find(|(_, count)| **count > PODS_PER_NODE)
    {
        let largest = asked_by
            .iter()
            .max_by_key(|(_, n)| **n)
            .map(|(who, n)| format!("{who} asks for {n} pods; "))
            .unwrap_or_default();
        bail!(
            "{largest}{new} new pods and {existing} running would put {count} pods on node-{}, \
             but a lab node holds at most {PODS_PER_NODE} ({} on {nodes} nodes); nothing was \
             created. Use fewer replicas, or more nodes (`ambitctl lab up --nodes N`, up to 8)",
            node + 1,
            PODS_PER_NODE * nodes
        );
    }
    Ok(())
}

/// Also plays the waypoint controller (see [`waypoints`]); a Service applied again keeps its VIP.
fn complete(objects: &mut Vec<Object>, state: &LabState, nodes: usize) -> anyhow::Result<()> {
    expand_deployments(objects)?;
    waypoints::expand(objects, nodes, OWNER)?;
    let mut used: std::collections::BTreeSet<String> =
        state.services.iter().map(|s| s.vip.clone()).collect();
    let mut next_node = state.pods.len();
    for object in objects.iter_mut() {
        match object {
            Object::Service(s) if s.spec.cluster_ip.is_empty() => {
                if let Some(known) = state
                    .services
                    .iter()
                    .find(|k| k.namespace == s.metadata.namespace && k.name == s.metadata.name)
                {
                    s.spec.cluster_ip = known.vip.clone();
                    continue;
                }
                let Some(vip) = (10..=0xfffe_u32)
                    .map(|i| format!("10.96.{}.{}", i >> 8, i & 0xff))
                    .find(|v| !used.contains(v) && !v.ends_with(".0") && !v.ends_with(".255"))
                else {
                    bail!(
                        "Service {}/{}: no free address left in the lab's service range 10.96.0.0/16",
                        s.metadata.namespace,
                        s.metadata.name
                    );
                };
                used.insert(vip.clone());
                s.spec.cluster_ip = vip;
            }
            Object::Pod(p) => {
                if p.spec.node_name.is_empty() {
                    p.spec.node_name = format!("node-{}", next_node % nodes + 1);
                    next_node += 1;
                }
                if p.metadata.uid.is_empty() {
                    p.metadata.uid = format!("lab-{}-{}", p.metadata.namespace, p.metadata.name);
                }
            }
            _ => {}
        }
    }
    check_capacity(objects, state, nodes)
}

fn start_istiod(topology: &Topology, state: &LabState) -> anyhow::Result<Process> {
    let d = dir();
    let args: Vec<String> = vec![
        "--config-dir".into(),
        d.join("config").display().to_string(),
        "--ca-dir".into(),
        d.join("ca").display().to_string(),
        "--tokens".into(),
        d.join("tokens.json").display().to_string(),
        "--listen".into(),
        format!("{FABRIC_IP}:15012"),
        "--monitoring".into(),
        format!("{FABRIC_IP}:15014"),
        "--ip".into(),
        FABRIC_IP.to_string(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Ok(topology.spawn(
        "istiod-lite",
        &topology.fabric,
        &state.binaries["istiod-lite"],
        &args,
        &[],
        &d.join("istiod-lite.log"),
    )?)
}

fn start_agent(topology: &Topology, state: &LabState, i: usize) -> anyhow::Result<Process> {
    let node = &state.nodes[i];
    let d = node.dir.display().to_string();
    let config = dir().join("config").display().to_string();
    let args = [
        "run",
        "--node",
        node.name.as_str(),
        "--plugin-socket",
        &format!("{d}/agent.sock"),
        "--zds-socket",
        &format!("{d}/zds.sock"),
        "--state-dir",
        &format!("{d}/state"),
        "--config-dir",
        &config,
    ];
    Ok(topology.spawn(
        "cni-agent",
        &node.netns,
        &state.binaries["cni-agent"],
        &args,
        &[],
        &node.dir.join("cni-agent.log"),
    )?)
}

fn start_ztunnel(
    topology: &Topology,
    state: &LabState,
    i: usize,
    token: &str,
) -> anyhow::Result<Process> {
    let node = &state.nodes[i];
    let env = [
        ("NODE_NAME", node.name.clone()),
        ("XDS_ADDRESS", format!("https://{FABRIC_IP}:15012")),
        (
            "XDS_ROOT_CA",
            dir().join("ca/root-cert.pem").display().to_string(),
        ),
        ("AUTH_TOKEN", token.to_string()),
        ("INPOD_UDS", node.dir.join("zds.sock").display().to_string()),
        ("STATS_ADDR", format!("{}:15020", node.ip)),
        ("READINESS_ADDR", format!("{}:15021", node.ip)),
        ("ADMIN_ADDR", "127.0.0.1:15000".into()),
        ("INSTANCE_IP", node.ip.to_string()),
        ("POD_NAME", format!("ztunnel-{}", node.name)),
    ];
    Ok(topology.spawn(
        "ztunnel",
        &node.netns,
        &state.binaries["ztunnel"],
        &[],
        &env,
        &node.dir.join("ztunnel.log"),
    )?)
}

/// Writes `/etc/netns/<pod netns>/hosts` so service names resolve inside pods.
fn write_hosts(state: &LabState) -> anyhow::Result<()> {
    for pod in &state.pods {
        let mut hosts = String::from("127.0.0.1 localhost\n::1 localhost\n");
        hosts.push_str(&format!("{} {}\n", pod.ip, pod.name));
        for s in &state.services {
            let mut names = format!(
                "{}.{}.svc.cluster.local {}.{}.svc {}.{}",
                s.name, s.namespace, s.name, s.namespace, s.name, s.namespace
            );
            if s.namespace == pod.namespace {
                names.push_str(&format!(" {}", s.name));
            }
            hosts.push_str(&format!("{} {names}\n", s.vip));
        }
        let dir = PathBuf::from("/etc/netns").join(&pod.netns);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("hosts"), hosts)?;
    }
    Ok(())
}

/// Creates a pod the way kubelet would: record it, CNI chain, report its IP, start the workload
/// (the `waypoint` binary in a waypoint pod, the echo workload with the containers' environment
/// in any other).
fn create_pod(
    topology: &mut Topology,
    state: &mut LabState,
    mut pod: Pod,
    namespaces: &BTreeMap<String, Namespace>,
) -> anyhow::Result<()> {
    let node = pod
        .spec
        .node_name
        .strip_prefix("node-")
        .and_then(|n| n.parse::<usize>().ok())
        .filter(|n| *n >= 1 && *n <= state.nodes.len())
        .map(|n| n - 1)
        .with_context(|| {
            format!(
                "Pod {}/{}: spec.nodeName {:?} is not a lab node (node-1..node-{})",
                pod.metadata.namespace,
                pod.metadata.name,
                pod.spec.node_name,
                state.nodes.len()
            )
        })?;
    let container_env = env::take(&mut pod);
    write_object(&Object::Pod(pod.clone()))?;
    let net = topology
        .add_pod(
            node,
            &pod.metadata.namespace,
            &pod.metadata.name,
            &pod.metadata.uid,
            &chain(state, node),
        )
        .with_context(|| {
            format!(
                "creating pod {}/{}",
                pod.metadata.namespace, pod.metadata.name
            )
        })?;
    pod.status.pod_ip = net.ip.to_string();
    pod.status.phase = "Running".into();
    pod.status.conditions = vec![ambit_mesh::objects::Condition {
        kind: "Ready".into(),
        status: "True".into(),
    }];
    write_object(&Object::Pod(pod.clone()))?;
    let record = PodState {
        namespace: pod.metadata.namespace.clone(),
        name: pod.metadata.name.clone(),
        uid: pod.metadata.uid.clone(),
        node,
        netns: net.netns.clone(),
        ip: net.ip,
        service_account: pod.service_account().to_string(),
        ambient: enrollment(&pod, namespaces.get(&pod.metadata.namespace)).is_ambient(),
        gateway: waypoints::gateway_of(&pod, OWNER),
    };
    let workload = if record.gateway.is_some() {
        start_waypoint(topology, state, &record)?
    } else {
        let version = pod
            .metadata
            .labels
            .get("version")
            .cloned()
            .unwrap_or_else(|| "v1".into());
        let mut env: Vec<(&str, String)> = vec![
            ("POD_NAME", pod.metadata.name.clone()),
            ("POD_NAMESPACE", pod.metadata.namespace.clone()),
            ("NODE_NAME", state.nodes[node].name.clone()),
            ("VERSION", version),
        ];
        // The pod spec's own variables come last, so they win.
        env.extend(container_env.iter().map(|(k, v)| (k.as_str(), v.clone())));
        topology.spawn(
            "workload",
            &net.netns,
            &state.binaries["ambit-echo"],
            &["serve"],
            &env,
            &pod_log(&record),
        )?
    };
    if let Some(pid) = workload.detach() {
        state.pids.insert(pod_key(&record), pid);
    }
    state.pods.push(record);
    Ok(())
}

/// The pid key of a pod's process.
fn pod_key(pod: &PodState) -> String {
    format!("pod/{}/{}", pod.namespace, pod.name)
}

fn pod_log(pod: &PodState) -> PathBuf {
    dir().join(format!("pod-{}-{}.log", pod.namespace, pod.name))
}

/// Starts the `waypoint` binary in a waypoint pod, with a token the tokens file maps to the
/// Gateway's service account on the pod's node (the waypoint asks the CA for its own
/// certificate, without impersonation).
fn start_waypoint(
    topology: &Topology,
    state: &LabState,
    pod: &PodState,
) -> anyhow::Result<Process> {
    let gateway = pod
        .gateway
        .as_deref()
        .with_context(|| format!("pod {}/{} runs no waypoint", pod.namespace, pod.name))?;
    let node = &state.nodes[pod.node].name;
    let token = account_token(node, &format!("{}/{gateway}", pod.namespace))?;
    let root_ca = dir().join("ca/root-cert.pem");
    let control = waypoints::ControlPlane {
        xds_address: format!("https://{FABRIC_IP}:15012"),
        root_ca: &root_ca,
        token,
    };
    let env = waypoints::environment(&pod.namespace, gateway, pod.ip, node, &control);
    let binary = state
        .binaries
        .get("waypoint")
        .cloned()
        .map_or_else(|| find_binary("waypoint"), Ok)?;
    Ok(topology.spawn("waypoint", &pod.netns, &binary, &[], &env, &pod_log(pod))?)
}

/// Whether the waypoint in `pod` answers `GET /healthz/ready` with 200 (asked from its node).
fn waypoint_ready(state: &LabState, pod: &PodState) -> bool {
    http::get(
        &state.nodes[pod.node].netns,
        SocketAddr::new(pod.ip, waypoints::READINESS_PORT),
        "/healthz/ready",
    )
    .is_some_and(|(s, _)| s == 200)
}

/// Waits until every waypoint of the lab is ready.
fn wait_waypoints(state: &LabState) -> anyhow::Result<()> {
    let pods: Vec<&PodState> = state.pods.iter().filter(|p| p.gateway.is_some()).collect();
    if pods.is_empty() {
        return Ok(());
    }
    progress("waiting for every waypoint to be ready");
    wait("waypoints to be ready", Duration::from_secs(60), || {
        pods.iter().all(|p| waypoint_ready(state, p))
    })
    .map_err(|e| {
        // A failed `up` removes the lab directory: keep the end of each waiting log.
        let mut message = e.to_string();
        for pod in pods.iter().filter(|p| !waypoint_ready(state, p)) {
            let log = std::fs::read_to_string(pod_log(pod)).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(8).collect();
            message.push_str(&format!(
                "\nlast lines of waypoint {}/{} ({}):",
                pod.namespace,
                pod.gateway.as_deref().unwrap_or(""),
                pod_log(pod).display()
            ));
            for line in tail.into_iter().rev() {
                message.push_str(&format!("\n  {line}"));
            }
        }
        anyhow::anyhow!(message)
    })
}

/// The token of service account `account` (`namespace/name`) on `node` in the lab's tokens
/// file, adding one if there is none yet.
fn account_token(node: &str, account: &str) -> anyhow::Result<String> {
    let path = dir().join("tokens.json");
    let mut tokens: serde_json::Value = serde_json::from_slice(&std::fs::read(&path)?)
        .with_context(|| format!("reading {}", path.display()))?;
    let list = tokens["tokens"]
        .as_array_mut()
        .with_context(|| format!("{}: tokens is not a list", path.display()))?;
    if let Some(existing) = list
        .iter()
        .find(|t| t["node"] == node && t["serviceAccount"] == account)
        .and_then(|t| t["token"].as_str())
    {
        return Ok(existing.to_string());
    }
    let fresh = token();
    list.push(json!({"token": fresh, "node": node, "serviceAccount": account}));
    write_tokens(&path, &tokens)?;
    Ok(fresh)
}

/// Removes every token of service account `account` (`namespace/name`).
fn remove_account_tokens(account: &str) -> anyhow::Result<()> {
    let path = dir().join("tokens.json");
    let mut tokens: serde_json::Value = serde_json::from_slice(&std::fs::read(&path)?)?;
    if let Some(list) = tokens["tokens"].as_array_mut() {
        list.retain(|t| t["serviceAccount"] != account);
    }
    write_tokens(&path, &tokens)
}

/// Replaces the tokens file at once (istiod-lite re-reads it on every call).
fn write_tokens(path: &Path, tokens: &serde_json::Value) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(tokens)?)?;
    std::fs::rename(tmp, path)?;
    Ok(())
}

fn services_of(objects: &[Object]) -> Vec<ServiceState> {
    objects
        .iter()
        .filter_map(|o| match o {
            Object::Service(s) => Some(ServiceState {
                namespace: s.metadata.namespace.clone(),
                name: s.metadata.name.clone(),
                vip: s.spec.cluster_ip.clone(),
                ports: s.spec.ports.iter().map(|p| p.port).collect(),
            }),
            _ => None,
        })
        .collect()
}

fn namespaces_of(objects: &[Object]) -> BTreeMap<String, Namespace> {
    objects
        .iter()
        .filter_map(|o| match o {
            Object::Namespace(n) => Some((n.metadata.name.clone(), n.clone())),
            _ => None,
        })
        .collect()
}

fn ztunnel_ready(state: &LabState, i: usize) -> bool {
    let node = &state.nodes[i];
    http::get(
        &node.netns,
        SocketAddr::new(IpAddr::V4(node.ip), 15021),
        "/healthz/ready",
    )
    .map(|(s, _)| s == 200)
    .unwrap_or(false)
}

/// Whether node `i`'s ztunnel has every lab pod in its configuration.
fn config_propagated(state: &LabState, i: usize) -> bool {
    let node = &state.nodes[i];
    let Some((200, body)) = http::get(
        &node.netns,
        SocketAddr::from(([127, 0, 0, 1], 15000)),
        "/config_dump",
    ) else {
        return false;
    };
    let dump: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    let known: Vec<(String, String)> = dump["workloads"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|w| {
            (
                w["namespace"].as_str().unwrap_or("").to_string(),
                w["name"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    state
        .pods
        .iter()
        .all(|p| known.contains(&(p.namespace.clone(), p.name.clone())))
}

fn captured(state: &LabState, pod: &PodState) -> bool {
    let file = state.nodes[pod.node].dir.join("state/pods.json");
    let Ok(text) = std::fs::read_to_string(file) else {
        return false;
    };
    let records: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap_or_default();
    records.iter().any(|r| {
        r["namespace"] == pod.namespace.as_str()
            && r["name"] == pod.name.as_str()
            && r["captured"] == true
    })
}

fn demo_objects() -> Vec<Object> {
    let mut objects = ambit_mesh::parse_documents(demo::OBJECTS, "demo").0;
    env::attach(&mut objects, &env::text_documents(demo::OBJECTS));
    objects
}

/// `ambitctl lab up`.
pub(crate) fn up(nodes: usize, config: Option<PathBuf>, demo_flag: bool) -> anyhow::Result<i32> {
    if !(1..=8).contains(&nodes) {
        bail!("--nodes must be between 1 and 8");
    }
    Topology::preflight()?;
    if state_path().exists() {
        bail!(
            "a lab is already running (see `ambitctl lab status`); remove it with `ambitctl lab down` first"
        );
    }
    let mut binaries = BTreeMap::new();
    for name in BINARIES {
        binaries.insert(name.to_string(), find_binary(name)?);
    }
    let mut objects = match (&config, demo_flag) {
        (Some(dir), _) => read_objects(dir)?,
        (None, true) => demo_objects(),
        (None, false) => Vec::new(),
    };
    if demo_flag && config.is_some() {
        objects.extend(demo_objects());
    }
    // What the API server, the scheduler and the controllers would add; refused before anything
    // is created.
    complete(&mut objects, &LabState::default(), nodes)?;
    cleanup_leftovers();
    progress(&format!("creating {nodes} nodes"));
    let mut topology = Topology::create(&prefix(), &dir(), nodes)?;
    let mut state = LabState {
        nodes: topology
            .nodes
            .iter()
            .map(|n| NodeState {
                name: n.name.clone(),
                netns: n.netns.clone(),
                ip: n.ip,
                pod_subnet: n.pod_subnet,
                dir: n.dir.clone(),
            })
            .collect(),
        binaries,
        ..LabState::default()
    };
    ambit_netlab::ip(&[
        "-n",
        &topology.fabric,
        "addr",
        "add",
        &format!("{FABRIC_IP}/24"),
        "dev",
        "br-fabric",
    ])?;
    // Pods that are not captured (waypoints) reach istiod-lite from their own address: the
    // fabric routes each node's pod CIDR back through that node.
    for node in &topology.nodes {
        ambit_netlab::ip(&[
            "-n",
            &topology.fabric,
            "route",
            "add",
            &node.pod_cidr(),
            "via",
            &node.ip.to_string(),
        ])?;
    }
    for sub in ["config", "ca"] {
        std::fs::create_dir_all(dir().join(sub))?;
    }
    let tokens: Vec<(String, String)> = state
        .nodes
        .iter()
        .map(|n| (n.name.clone(), token()))
        .collect();
    std::fs::write(
        dir().join("tokens.json"),
        serde_json::to_vec_pretty(
            &json!({"tokens": tokens.iter().map(|(node, t)| json!({"token": t, "node": node})).collect::<Vec<_>>()}),
        )?,
    )?;

    let (pods, others): (Vec<Object>, Vec<Object>) = objects
        .into_iter()
        .partition(|o| matches!(o, Object::Pod(_)));
    for object in &others {
        write_object(object)?;
    }
    state.services = services_of(&others);
    let namespaces = namespaces_of(&others);

    let mut processes: Vec<(String, Process)> = Vec::new();
    progress("starting istiod-lite");
    processes.push(("istiod-lite".into(), start_istiod(&topology, &state)?));
    let fabric = topology.fabric.clone();
    wait("istiod-lite to be ready", Duration::from_secs(30), || {
        http::get(
            &fabric,
            SocketAddr::new(IpAddr::V4(FABRIC_IP), 15014),
            "/ready",
        )
        .map(|(s, _)| s == 200)
        .unwrap_or(false)
    })?;
    for (i, (_, token)) in tokens.iter().enumerate() {
        progress(&format!(
            "starting cni-agent and ztunnel on {}",
            state.nodes[i].name
        ));
        processes.push((
            format!("cni-agent/{}", state.nodes[i].name),
            start_agent(&topology, &state, i)?,
        ));
        let socket = state.nodes[i].dir.join("agent.sock");
        wait("cni-agent to listen", Duration::from_secs(20), || {
            socket.exists()
        })?;
        processes.push((
            format!("ztunnel/{}", state.nodes[i].name),
            start_ztunnel(&topology, &state, i, token)?,
        ));
    }
    // The trace collector first: waypoints learn its address when their pods are made.
    processes.extend(tracing::start(&topology).map(|p| (tracing::KEY.into(), p)));
    // Pods' processes are detached as they start; a failed `up` stops them (the namespaces and
    // the other components go when `topology` and `processes` are dropped).
    let started = (|| -> anyhow::Result<()> {
        let mut steps = Steps::new("creating pods", pods.len());
        for object in pods {
            if let Object::Pod(pod) = object {
                let detail = format!(
                    "creating pod {}/{} on {}",
                    pod.metadata.namespace, pod.metadata.name, pod.spec.node_name
                );
                create_pod(&mut topology, &mut state, pod, &namespaces)?;
                steps.item(|| detail);
            }
        }
        write_hosts(&state)?;
        progress("waiting for every ztunnel to be ready and every ambient pod to be captured");
        wait("ztunnels to be ready", Duration::from_secs(60), || {
            (0..state.nodes.len()).all(|i| ztunnel_ready(&state, i))
        })?;
        let ambient: Vec<&PodState> = state.pods.iter().filter(|p| p.ambient).collect();
        wait_count(
            "ambient pods captured",
            Duration::from_secs(60 + ambient.len() as u64 / 4),
            ambient.len(),
            || ambient.iter().filter(|p| captured(&state, p)).count(),
        )?;
        wait(
            "configuration to reach every ztunnel",
            Duration::from_secs(60),
            || (0..state.nodes.len()).all(|i| config_propagated(&state, i)),
        )?;
        wait_waypoints(&state)?;
        Ok(())
    })();
    if let Err(e) = started {
        stop(&state.pids.values().copied().collect::<Vec<_>>());
        return Err(e);
    }
    processes.extend(prometheus::start(&topology, &state).map(|p| (prometheus::KEY.into(), p)));
    for (name, process) in processes {
        if let Some(pid) = process.detach() {
            state.pids.insert(name, pid);
        }
    }
    save_state(&state)?;
    topology.cleanup_on_drop = false;
    print_status(&state, false);
    if demo_flag {
        let echo_ip = state
            .pods
            .iter()
            .find(|p| p.namespace == "demo" && p.name == "echo-1")
            .map(|p| p.ip.to_string())
            .unwrap_or_default();
        let program = std::env::args().next().unwrap_or_else(|| "ambitctl".into());
        println!(
            "{}",
            demo::hints(
                &echo_ip,
                &state.nodes[0].ip.to_string(),
                &program,
                &state.nodes[0].netns,
                std::env::var_os("SUDO_USER").is_some(),
            )
        );
    }
    Ok(0)
}

fn token() -> String {
    let mut bytes = [0u8; 16];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = f.read_exact(&mut bytes);
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Removes namespaces, files and processes left by an earlier lab.
fn cleanup_leftovers() -> (usize, usize) {
    let mut killed = 0;
    if let Ok(state) = load_state() {
        killed += stop(&state.pids.values().copied().collect::<Vec<_>>());
    }
    let mut stragglers = Vec::new();
    for ns in ambit_netlab::namespaces_with_prefix(&prefix()) {
        if let Ok(out) = ambit_netlab::ip(&["netns", "pids", &ns]) {
            stragglers.extend(out.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
        }
    }
    killed += stop(&stragglers);
    let removed = ambit_netlab::delete_namespaces(&prefix());
    if let Ok(entries) = std::fs::read_dir("/etc/netns") {
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with(&prefix()) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    let _ = std::fs::remove_dir_all(dir());
    (killed, removed)
}

fn kill(pid: u32) -> bool {
    stop(&[pid]) == 1
}

/// Whether a process is gone: no such pid, or a zombie (exited, waiting to be reaped: the lab's
/// processes are detached, and the reaper may be slow or absent in a container).
fn gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name in parentheses, which may itself contain spaces.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_none_or(|state| state == "Z" || state == "X"),
        Err(_) => true,
    }
}

/// Stops processes as a kubelet would: SIGTERM to all at once, up to a second for them to exit,
/// then SIGKILL for the rest. Returns how many were running.
fn stop(pids: &[u32]) -> usize {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let signalled: Vec<u32> = pids
        .iter()
        .copied()
        .filter(|pid| !gone(*pid) && kill(Pid::from_raw(*pid as i32), Signal::SIGTERM).is_ok())
        .collect();
    for _ in 0..50 {
        if signalled.iter().all(|pid| gone(*pid)) {
            return signalled.len();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    for pid in &signalled {
        if !gone(*pid) {
            let _ = kill(Pid::from_raw(*pid as i32), Signal::SIGKILL);
        }
    }
    signalled.len()
}

fn node_token(node: &str) -> anyhow::Result<String> {
    let tokens: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir().join("tokens.json"))?)?;
    tokens["tokens"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|t| t["node"] == node)
        .and_then(|t| t["token"].as_str().map(str::to_string))
        .with_context(|| format!("no token for {node} in the lab's tokens file"))
}

/// `ambitctl lab restart <component> [--node N] [--name ns/gateway]`: stop it gracefully and
/// start it again.
pub(crate) fn restart(
    component: &str,
    node: Option<&str>,
    name: Option<&str>,
) -> anyhow::Result<i32> {
    let mut state = load_state()?;
    let topology = topology(&state);
    let node_index = |name: Option<&str>| -> anyhow::Result<usize> {
        let name = name.context("name the node with --node")?;
        state
            .nodes
            .iter()
            .position(|n| n.name == name)
            .with_context(|| format!("no node {name} in the lab"))
    };
    let (key, process) = match component {
        "istiod-lite" => {
            if let Some(pid) = state.pids.get("istiod-lite") {
                kill(*pid);
            }
            let process = start_istiod(&topology, &state)?;
            let fabric = topology.fabric.clone();
            wait("istiod-lite to be ready", Duration::from_secs(30), || {
                http::get(
                    &fabric,
                    SocketAddr::new(IpAddr::V4(FABRIC_IP), 15014),
                    "/ready",
                )
                .map(|(s, _)| s == 200)
                .unwrap_or(false)
            })?;
            ("istiod-lite".to_string(), process)
        }
        "ztunnel" => {
            let i = node_index(node)?;
            let key = format!("ztunnel/{}", state.nodes[i].name);
            if let Some(pid) = state.pids.get(&key) {
                kill(*pid);
            }
            let process = start_ztunnel(&topology, &state, i, &node_token(&state.nodes[i].name)?)?;
            wait("ztunnel to be ready", Duration::from_secs(60), || {
                ztunnel_ready(&state, i)
            })?;
            (key, process)
        }
        "cni-agent" => {
            let i = node_index(node)?;
            let key = format!("cni-agent/{}", state.nodes[i].name);
            if let Some(pid) = state.pids.get(&key) {
                kill(*pid);
            }
            let _ = std::fs::remove_file(state.nodes[i].dir.join("agent.sock"));
            let process = start_agent(&topology, &state, i)?;
            let socket = state.nodes[i].dir.join("agent.sock");
            wait("cni-agent to listen", Duration::from_secs(20), || {
                socket.exists()
            })?;
            (key, process)
        }
        "waypoint" => {
            let name =
                name.context("name the waypoint's Gateway with --name <namespace>/<name>")?;
            let (namespace, gateway) = name
                .split_once('/')
                .context("name the waypoint's Gateway as <namespace>/<name>")?;
            let pod = state
                .pods
                .iter()
                .find(|p| p.namespace == namespace && p.gateway.as_deref() == Some(gateway))
                .cloned()
                .with_context(|| {
                    format!("no waypoint for Gateway {namespace}/{gateway} in the lab (see `ambitctl lab status`)")
                })?;
            let key = pod_key(&pod);
            if let Some(pid) = state.pids.get(&key) {
                kill(*pid);
            }
            let process = start_waypoint(&topology, &state, &pod)?;
            wait("the waypoint to be ready", Duration::from_secs(60), || {
                waypoint_ready(&state, &pod)
            })?;
            (key, process)
        }
        other => bail!(
            "unknown component {other:?}: expected istiod-lite, ztunnel, cni-agent or waypoint"
        ),
    };
    if let Some(pid) = process.detach() {
        state.pids.insert(key.clone(), pid);
    }
    save_state(&state)?;
    if component == "waypoint" {
        println!("waypoint {} restarted ({key})", name.unwrap_or_default());
    } else {
        println!("{key} restarted");
    }
    Ok(0)
}

/// `ambitctl lab down`.
pub(crate) fn down() -> anyhow::Result<i32> {
    let (killed, removed) = cleanup_leftovers();
    println!(
        "lab removed: {killed} processes stopped, {removed} network namespaces deleted, {} removed",
        lab_dir()
    );
    Ok(0)
}

fn print_status(state: &LabState, json_output: bool) {
    let alive = |name: &str| {
        state
            .pids
            .get(name)
            .is_some_and(|p| Path::new(&format!("/proc/{p}")).exists())
    };
    if json_output {
        let value = json!({
            "nodes": state.nodes.iter().enumerate().map(|(i, n)| json!({
                "name": n.name, "netns": n.netns, "ip": n.ip,
                "metrics": format!("http://{}:15020/metrics", n.ip),
                "admin": format!("127.0.0.1:15000 in netns {}", n.netns),
                "ztunnel": {"running": alive(&format!("ztunnel/{}", n.name)), "ready": ztunnel_ready(state, i)},
                "cniAgent": {"running": alive(&format!("cni-agent/{}", n.name))},
            })).collect::<Vec<_>>(),
            "pods": state.pods.iter().map(|p| json!({
                "pod": format!("{}/{}", p.namespace, p.name), "node": state.nodes[p.node].name, "ip": p.ip,
                "netns": p.netns, "ambient": p.ambient, "captured": captured(state, p),
                "identity": format!("spiffe://cluster.local/ns/{}/sa/{}", p.namespace, p.service_account),
            })).collect::<Vec<_>>(),
            "services": state.services.iter().map(|s| json!({"service": format!("{}/{}", s.namespace, s.name), "vip": s.vip, "ports": s.ports})).collect::<Vec<_>>(),
            "waypoints": waypoint_rows(state, alive, |p| waypoint_ready(state, p)),
            "istiodLite": {"running": alive("istiod-lite"), "address": format!("{FABRIC_IP}:15012")},
            "prometheus": prometheus::status(alive(prometheus::KEY), &format!("{}fabric", prefix())),
            "tracing": tracing::status(alive(tracing::KEY), &format!("{}fabric", prefix())),
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&value).unwrap_or_default()
        );
        return;
    }
    println!(
        "\nistiod-lite  {FABRIC_IP}:15012  {}",
        if alive("istiod-lite") {
            "running"
        } else {
            "NOT RUNNING"
        }
    );
    println!(
        "{}",
        prometheus::status_line(alive(prometheus::KEY), &format!("{}fabric", prefix()))
    );
    println!(
        "{}",
        tracing::status_line(alive(tracing::KEY), &format!("{}fabric", prefix()))
    );
    println!(
        "\nNODE     NETNS            IP           ZTUNNEL  METRICS                          ADMIN (in node netns)"
    );
    for (i, n) in state.nodes.iter().enumerate() {
        println!(
            "{:<8} {:<16} {:<12} {:<8} http://{}:15020/metrics   127.0.0.1:15000",
            n.name,
            n.netns,
            n.ip,
            if ztunnel_ready(state, i) {
                "ready"
            } else {
                "NOT READY"
            },
            n.ip
        );
    }
    println!("\nPOD                        NODE     IP            CAPTURED          IDENTITY");
    for p in &state.pods {
        let captured = if !p.ambient {
            "no (not ambient)".to_string()
        } else if captured(state, p) {
            "yes".into()
        } else {
            "PENDING".into()
        };
        println!(
            "{:<26} {:<8} {:<13} {:<17} spiffe://cluster.local/ns/{}/sa/{}",
            format!("{}/{}", p.namespace, p.name),
            state.nodes[p.node].name,
            p.ip,
            captured,
            p.namespace,
            p.service_account
        );
    }
    let waypoints = waypoint_rows(state, alive, |p| waypoint_ready(state, p));
    if !waypoints.is_empty() {
        println!("\nWAYPOINT             NODE     IP            READY      METRICS");
        for w in &waypoints {
            let ready = if w["ready"] == true {
                "ready"
            } else if w["running"] == true {
                "NOT READY"
            } else {
                "NOT RUNNING"
            };
            println!(
                "{:<20} {:<8} {:<13} {:<10} {}",
                format!(
                    "{}/{}",
                    w["namespace"].as_str().unwrap_or(""),
                    w["name"].as_str().unwrap_or("")
                ),
                w["node"].as_str().unwrap_or(""),
                w["ip"].as_str().unwrap_or(""),
                ready,
                w["metrics"].as_str().unwrap_or("")
            );
        }
    }
    if !state.services.is_empty() {
        println!("\nSERVICE              VIP          PORTS");
        for s in &state.services {
            println!(
                "{:<20} {:<12} {:?}",
                format!("{}/{}", s.namespace, s.name),
                s.vip,
                s.ports
            );
        }
    }
}

/// One entry per waypoint: its Gateway's namespace and name, pod, node, IP, metrics URL, whether
/// its process runs and whether it is ready.
fn waypoint_rows(
    state: &LabState,
    alive: impl Fn(&str) -> bool,
    ready: impl Fn(&PodState) -> bool,
) -> Vec<serde_json::Value> {
    state
        .pods
        .iter()
        .filter_map(|p| {
            let gateway = p.gateway.as_ref()?;
            Some(json!({
                "namespace": p.namespace,
                "name": gateway,
                "pod": p.name,
                "node": state.nodes[p.node].name,
                "ip": p.ip.to_string(),
                "metrics": format!("http://{}:{}/metrics", p.ip, waypoints::STATS_PORT),
                "running": alive(&pod_key(p)),
                "ready": ready(p),
            }))
        })
        .collect()
}

/// `ambitctl lab status`.
pub(crate) fn status(json_output: bool) -> anyhow::Result<i32> {
    let state = load_state()?;
    print_status(&state, json_output);
    Ok(0)
}

/// Every lab node's name and network namespace (its ztunnel's admin port is on that
/// namespace's loopback), for `ambitctl ztunnel-config`.
pub(crate) fn nodes() -> anyhow::Result<Vec<(String, String)>> {
    let state = load_state()?;
    Ok(state
        .nodes
        .iter()
        .map(|n| (n.name.clone(), n.netns.clone()))
        .collect())
}

/// GETs `path` from `addr` with a socket made in network namespace `netns`: (status, body).
pub(crate) fn get_in_netns(netns: &str, addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    http::get(netns, addr, path)
}

/// `ambitctl lab exec ns/pod -- cmd...`.
pub(crate) fn exec(pod: &str, command: &[String]) -> anyhow::Result<i32> {
    let state = load_state()?;
    let (ns, name) = pod
        .split_once('/')
        .context("name the pod as <namespace>/<name>")?;
    let pod = state
        .pods
        .iter()
        .find(|p| p.namespace == ns && p.name == name)
        .with_context(|| format!("no pod {ns}/{name} in the lab (see `ambitctl lab status`)"))?;
    let status = Command::new("ip")
        .args(["netns", "exec", &pod.netns])
        .args(command)
        .status()
        .with_context(|| format!("running {:?}", command.join(" ")))?;
    Ok(status.code().unwrap_or(1))
}

/// `ambitctl lab apply -f`.
pub(crate) fn apply(path: &Path) -> anyhow::Result<i32> {
    let mut state = load_state()?;
    let mut objects = read_objects(path)?;
    let nodes = state.nodes.len();
    complete(&mut objects, &state, nodes)?;
    let current = current_objects()?;
    let mut all = current.clone();
    for object in &objects {
        if !matches!(object, Object::Pod(_)) {
            write_object(object)?;
            println!("{} configured", object.key());
        }
    }
    all = {
        let mut merged: BTreeMap<ObjectKey, Object> = all.drain(..).map(|o| (o.key(), o)).collect();
        for o in &objects {
            merged.insert(o.key(), o.clone());
        }
        merged.into_values().collect()
    };
    state.services = services_of(&all);
    let namespaces = namespaces_of(&all);
    let mut topology = topology(&state);
    let new_pods = objects
        .iter()
        .filter(|o| match o {
            Object::Pod(p) => !state
                .pods
                .iter()
                .any(|s| s.namespace == p.metadata.namespace && s.name == p.metadata.name),
            _ => false,
        })
        .count();
    let mut steps = Steps::new("creating pods", new_pods);
    for object in objects {
        if let Object::Pod(pod) = object {
            let exists = state
                .pods
                .iter()
                .any(|p| p.namespace == pod.metadata.namespace && p.name == pod.metadata.name);
            let key = Object::Pod(pod.clone()).key();
            if exists {
                update_pod(&current, pod)?;
                continue;
            }
            create_pod(&mut topology, &mut state, pod, &namespaces)?;
            println!("{key} created");
            if new_pods > Steps::EACH_UP_TO {
                steps.item(String::new);
            }
        }
    }
    for pod in state.pods.iter_mut() {
        let ambient = all.iter().find_map(|o| match o {
            Object::Pod(p)
                if p.metadata.namespace == pod.namespace && p.metadata.name == pod.name =>
            {
                Some(enrollment(p, namespaces.get(&pod.namespace)).is_ambient())
            }
            _ => None,
        });
        if let Some(ambient) = ambient {
            pod.ambient = ambient;
        }
    }
    write_hosts(&state)?;
    save_state(&state)?;
    prometheus::write_targets(&state)?;
    wait(
        "configuration to reach every ztunnel",
        Duration::from_secs(60),
        || (0..state.nodes.len()).all(|i| config_propagated(&state, i)),
    )?;
    wait_waypoints(&state)?;
    Ok(0)
}

/// Applies a running pod's new labels and annotations (e.g. `istio.io/use-waypoint` or
/// `istio.io/dataplane-mode`), keeping its status; the rest of a pod's spec is immutable, as in
/// Kubernetes.
fn update_pod(current: &[Object], mut pod: Pod) -> anyhow::Result<()> {
    let key = Object::Pod(pod.clone()).key();
    // Like the rest of the spec, a running pod's container env stays as it started.
    env::take(&mut pod);
    let Some(Object::Pod(stored)) = current.iter().find(|o| o.key() == key) else {
        println!("{key} unchanged (not in the lab's config directory)");
        return Ok(());
    };
    let updated = relabelled(stored, &pod);
    if updated == *stored {
        println!("{key} unchanged");
    } else {
        write_object(&Object::Pod(updated))?;
        println!(
            "{key} configured (labels and annotations; the spec is replaced by deleting and applying the pod)"
        );
    }
    Ok(())
}

/// `stored` with the labels and annotations of `applied`.
fn relabelled(stored: &Pod, applied: &Pod) -> Pod {
    let mut updated = stored.clone();
    updated.metadata.labels = applied.metadata.labels.clone();
    updated.metadata.annotations = applied.metadata.annotations.clone();
    updated
}

/// `ambitctl lab delete -f`.
pub(crate) fn delete(path: &Path) -> anyhow::Result<i32> {
    let mut state = load_state()?;
    let mut objects = read_objects(path)?;
    // Deleting a Deployment deletes the pods the lab made for it; deleting a waypoint Gateway
    // deletes its pod and Service.
    let owns = |metadata: &ambit_mesh::ObjectMeta| {
        metadata.annotations.get(OWNER).is_some_and(|owner| {
            objects.iter().any(|d| {
                let k = d.key();
                (k.kind == "Deployment" || k.kind == "Gateway")
                    && k.namespace == metadata.namespace
                    && *owner == format!("{}/{}", k.kind, k.name)
            })
        })
    };
    let owned: Vec<Object> = current_objects()?
        .into_iter()
        .filter(|o| match o {
            Object::Pod(p) => owns(&p.metadata),
            Object::Service(s) => owns(&s.metadata),
            _ => false,
        })
        .collect();
    objects.extend(owned);
    let mut topology = topology(&state);
    for object in objects {
        let key = object.key();
        let file = dir().join("config").join(object_file(&key));
        let index = state
            .pods
            .iter()
            .position(|p| p.namespace == key.namespace && p.name == key.name);
        if key.kind == "Pod"
            && let Some(index) = index
        {
            let pod = state.pods.remove(index);
            if let Some(pid) = state.pids.remove(&pod_key(&pod)) {
                kill(pid);
            }
            if let Some(gateway) = &pod.gateway {
                remove_account_tokens(&format!("{}/{gateway}", pod.namespace))?;
            }
            topology.delete_pod(&pod.namespace, &pod.name, &chain(&state, pod.node))?;
            let _ = std::fs::remove_dir_all(PathBuf::from("/etc/netns").join(&pod.netns));
        }
        match std::fs::remove_file(&file) {
            Ok(()) => println!("{key} deleted"),
            Err(_) => println!("{key} not found"),
        }
    }
    state.services = services_of(&current_objects()?);
    write_hosts(&state)?;
    save_state(&state)?;
    prometheus::write_targets(&state)?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ambit_mesh::translate::{Cluster, MeshSettings, translate};

    fn lab_state(pods: Vec<PodState>) -> LabState {
        LabState {
            nodes: (1..=2)
                .map(|i| NodeState {
                    name: format!("node-{i}"),
                    netns: format!("lab-node-{i}"),
                    ip: Ipv4Addr::new(10, 240, 0, 10 + i),
                    pod_subnet: i,
                    dir: PathBuf::from("/tmp"),
                })
                .collect(),
            pods,
            ..LabState::default()
        }
    }

    fn pod_state(namespace: &str, name: &str, node: usize, gateway: Option<&str>) -> PodState {
        PodState {
            namespace: namespace.into(),
            name: name.into(),
            uid: format!("lab-{namespace}-{name}"),
            node,
            netns: format!("lab-pod-{name}"),
            ip: IpAddr::V4(Ipv4Addr::new(10, 1, node as u8, 5)),
            service_account: gateway.unwrap_or("default").into(),
            ambient: false,
            gateway: gateway.map(str::to_string),
        }
    }

    /// The demo as the lab completes it (VIPs, nodes, the waypoint's pod, Service and address)
    /// and as istiod-lite translates it: echo is bound to the waypoint, which gets the route and
    /// the L7 policy, and nothing is refused.
    #[test]
    fn the_completed_demo_binds_echo_to_a_usable_waypoint() {
        let mut objects = demo_objects();
        complete(&mut objects, &LabState::default(), 2).unwrap();
        let mut ip = 10;
        for object in objects.iter_mut() {
            if let Object::Pod(p) = object {
                ip += 1;
                p.status.pod_ip = format!("10.1.0.{ip}");
                p.status.phase = "Running".into();
            }
        }
        let waypoint_pod = objects
            .iter()
            .find_map(|o| match o {
                Object::Pod(p) if p.metadata.name == "waypoint-waypoint" => Some(p.clone()),
                _ => None,
            })
            .expect("the controller made the waypoint pod");
        assert_eq!(
            waypoints::gateway_of(&waypoint_pod, OWNER).as_deref(),
            Some("waypoint")
        );
        let resources = translate(
            &Cluster::from_objects(objects.clone()),
            &MeshSettings::default(),
        );
        assert!(resources.warnings.is_empty(), "{:?}", resources.warnings);
        let scope = resources
            .waypoint_scopes
            .get("demo/waypoint")
            .expect("the waypoint is usable");
        assert!(scope.routes.contains("HTTPRoute/demo/echo"), "{scope:?}");
        assert!(scope.policies.contains("demo/echo-no-admin"), "{scope:?}");
        let vips: std::collections::BTreeSet<String> =
            services_of(&objects).into_iter().map(|s| s.vip).collect();
        assert_eq!(vips.len(), 4, "echo, echo-v1, echo-v2, waypoint: {vips:?}");
    }

    fn deployment(replicas: &str) -> Object {
        let text = format!(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: web, namespace: demo}}\nspec:\n  replicas: {replicas}\n  selector: {{matchLabels: {{app: web}}}}\n  template:\n    metadata: {{labels: {{app: web}}}}\n    spec: {{serviceAccountName: web}}\n"
        );
        let (mut objects, errors) = ambit_mesh::parse_documents(&text, "web.yaml");
        assert!(errors.is_empty(), "{errors:?}");
        objects.remove(0)
    }

    /// `spec.replicas` is honoured as given (the lab once cut it to 20 without a word), spread
    /// over the nodes.
    #[test]
    fn a_deployment_gets_every_replica_it_asks_for() {
        let mut objects = vec![deployment("230")];
        complete(&mut objects, &lab_state(vec![]), 4).unwrap();
        let pods: Vec<&Pod> = objects
            .iter()
            .filter_map(|o| match o {
                Object::Pod(p) => Some(p),
                _ => None,
            })
            .collect();
        assert_eq!(pods.len(), 230);
        assert_eq!(pods[229].metadata.name, "web-229");
        let on_node_4 = pods.iter().filter(|p| p.spec.node_name == "node-4").count();
        assert!((57..=58).contains(&on_node_4), "{on_node_4}");
    }

    /// More pods than the nodes hold, or a replicas value that is not a count, is refused
    /// before anything is made, naming the object, the field and the limit.
    #[test]
    fn replicas_beyond_the_labs_capacity_or_not_a_count_are_refused_by_name() {
        let mut objects = vec![deployment("600")];
        let e = complete(&mut objects, &lab_state(vec![]), 2)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("Deployment demo/web: spec.replicas asks for 600 pods")
                && e.contains("at most 253")
                && e.contains("506 on 2 nodes"),
            "{e}"
        );
        let mut objects = vec![deployment("three")];
        let e = complete(&mut objects, &lab_state(vec![]), 2)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("Deployment demo/web: spec.replicas must be a whole number"),
            "{e}"
        );
    }

    /// Every Service gets its own VIP, well past the first /24 of the service range.
    #[test]
    fn hundreds_of_services_get_distinct_vips() {
        let mut objects: Vec<Object> = (0..600)
            .map(|i| {
                let text = format!(
                    "apiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: demo}}\nspec: {{ports: [{{port: 80}}]}}\n"
                );
                ambit_mesh::parse_documents(&text, "s.yaml").0.remove(0)
            })
            .collect();
        complete(&mut objects, &lab_state(vec![]), 2).unwrap();
        let vips: std::collections::BTreeSet<String> =
            services_of(&objects).into_iter().map(|s| s.vip).collect();
        assert_eq!(vips.len(), 600);
        assert!(
            vips.iter()
                .all(|v| v.starts_with("10.96.") && !v.ends_with(".0") && !v.ends_with(".255"))
        );
    }

    #[test]
    fn a_service_applied_again_keeps_its_vip() {
        let mut state = lab_state(vec![]);
        state.services = vec![ServiceState {
            namespace: "demo".into(),
            name: "echo".into(),
            vip: "10.96.0.42".into(),
            ports: vec![80],
        }];
        let (mut objects, _) = ambit_mesh::parse_documents(
            "apiVersion: v1\nkind: Service\nmetadata: {name: echo, namespace: demo, labels: {istio.io/use-waypoint: waypoint}}\nspec: {ports: [{port: 80}]}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: other, namespace: demo}\nspec: {ports: [{port: 80}]}\n",
            "t",
        );
        complete(&mut objects, &state, 2).unwrap();
        assert_eq!(
            services_of(&objects)
                .iter()
                .map(|s| (s.name.as_str(), s.vip.as_str()))
                .collect::<Vec<_>>(),
            vec![("echo", "10.96.0.42"), ("other", "10.96.0.10")]
        );
    }

    #[test]
    fn a_bad_waypoint_node_is_refused_before_anything_changes() {
        let (mut objects, _) = ambit_mesh::parse_documents(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: wp, namespace: demo, annotations: {ambit.dev/lab-node: node-7}}\nspec: {gatewayClassName: istio-waypoint}\n",
            "t",
        );
        let e = complete(&mut objects, &lab_state(vec![]), 2).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Gateway demo/wp: metadata.annotations[ambit.dev/lab-node]: \"node-7\" is not a lab node (node-1..node-2)"
        );
    }

    #[test]
    fn relabelling_a_pod_keeps_its_status_and_spec() {
        let (objects, _) = ambit_mesh::parse_documents(
            "apiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: demo, labels: {app: a}}\nspec: {nodeName: node-1}\nstatus: {podIP: 10.1.0.9, phase: Running}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: demo, labels: {app: a, istio.io/use-waypoint: waypoint}}\n",
            "t",
        );
        let (Object::Pod(stored), Object::Pod(applied)) = (&objects[0], &objects[1]) else {
            panic!()
        };
        let updated = relabelled(stored, applied);
        assert_eq!(updated.metadata.labels["istio.io/use-waypoint"], "waypoint");
        assert_eq!(updated.status.pod_ip, "10.1.0.9");
        assert_eq!(updated.spec.node_name, "node-1");
    }

    #[test]
    fn status_lists_waypoints_with_metrics_and_readiness() {
        let state = lab_state(vec![
            pod_state("demo", "client", 0, None),
            pod_state("demo", "waypoint-waypoint", 1, Some("waypoint")),
        ]);
        let rows = waypoint_rows(&state, |key| key == "pod/demo/waypoint-waypoint", |_| true);
        assert_eq!(
            rows,
            vec![json!({
                "namespace": "demo",
                "name": "waypoint",
                "pod": "waypoint-waypoint",
                "node": "node-2",
                "ip": "10.1.1.5",
                "metrics": "http://10.1.1.5:15020/metrics",
                "running": true,
                "ready": true,
            })]
        );
        let rows = waypoint_rows(&state, |_| false, |_| false);
        assert_eq!(
            (rows[0]["running"].clone(), rows[0]["ready"].clone()),
            (json!(false), json!(false))
        );
    }
}
