//! The lab's Prometheus: the Debian `prometheus` binary, run in the fabric namespace (which
//! reaches istiod-lite, every node and every pod), listening on `127.0.0.1:9090` there, keeping
//! its data under the lab directory, and scraping every component every two seconds with the
//! labels Kubernetes' pod relabelling adds in a cluster (`app`, `pod`, `namespace`, `node`, and
//! each pod label with its name made Prometheus-safe), so Istio's dashboards' queries
//! (`pod=~"ztunnel-.*"`, `app="ztunnel"`) select the lab's series as they select a cluster's.
//!
//! Targets are a `file_sd` file Prometheus re-reads, rewritten when pods come and go.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ambit_netlab::{Process, Topology};
use serde_json::json;

use super::{FABRIC_IP, LabState, dir, http, waypoints};

/// Where Prometheus listens, inside the fabric namespace.
pub(crate) const LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9090);
/// How often every target is scraped.
pub(crate) const SCRAPE_INTERVAL: &str = "2s";
/// The key of Prometheus's pid in the lab's state.
pub(super) const KEY: &str = "prometheus";
/// Where Debian installs it; `PATH` is searched too.
const DEBIAN_BINARY: &str = "/usr/bin/prometheus";

/// One scrape target with its Kubernetes-style labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Target {
    /// `host:port` scraped at `/metrics`.
    pub(super) address: SocketAddr,
    /// Labels as `kubernetes-pods` relabelling would set them.
    pub(super) labels: BTreeMap<String, String>,
}

/// A pod label's name as Prometheus's `labelmap` writes it (`istio.io/rev` → `istio_io_rev`).
fn label_name(name: &str) -> String {
    name.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

fn target(
    address: SocketAddr,
    app: &str,
    pod: &str,
    namespace: &str,
    node: Option<&str>,
    pod_labels: &[(&str, &str)],
) -> Target {
    let mut labels: BTreeMap<String, String> = pod_labels
        .iter()
        .map(|(k, v)| (label_name(k), v.to_string()))
        .collect();
    labels.insert("app".into(), app.into());
    labels.insert("pod".into(), pod.into());
    labels.insert("namespace".into(), namespace.into());
    if let Some(node) = node {
        labels.insert("node".into(), node.into());
    }
    Target { address, labels }
}

/// Every component the lab runs that serves metrics: istiod-lite (`app="istiod"`, pod
/// `istiod-lite`, no node: it runs in the fabric), one ztunnel per node (pod `ztunnel-<node>`,
/// namespace `istio-system`) and each waypoint (`app="waypoint"`, its pod and namespace, and its
/// Gateway in `gateway_networking_k8s_io_gateway_name` as Istio's waypoint pods label it).
/// cni-agent serves no metrics.
pub(super) fn targets(state: &LabState) -> Vec<Target> {
    let mut out = vec![target(
        SocketAddr::new(IpAddr::V4(FABRIC_IP), 15014),
        "istiod",
        "istiod-lite",
        "istio-system",
        None,
        &[("istio", "pilot")],
    )];
    for node in &state.nodes {
        out.push(target(
            SocketAddr::new(IpAddr::V4(node.ip), 15020),
            "ztunnel",
            &format!("ztunnel-{}", node.name),
            "istio-system",
            Some(&node.name),
            &[],
        ));
    }
    for pod in &state.pods {
        let Some(gateway) = &pod.gateway else {
            continue;
        };
        out.push(target(
            SocketAddr::new(pod.ip, waypoints::STATS_PORT),
            "waypoint",
            &pod.name,
            &pod.namespace,
            Some(&state.nodes[pod.node].name),
            &[
                ("gateway.networking.k8s.io/gateway-name", gateway),
                ("istio.io/dataplane-mode", "none"),
            ],
        ));
    }
    out
}

/// The `file_sd` document for `targets`.
pub(super) fn targets_file(targets: &[Target]) -> serde_json::Value {
    serde_json::Value::Array(
        targets
            .iter()
            .map(|t| json!({"targets": [t.address.to_string()], "labels": t.labels}))
            .collect(),
    )
}

/// Prometheus's configuration: one job reading `targets_path`.
pub(super) fn config(targets_path: &Path) -> String {
    format!(
        "# Written by `ambitctl lab up`; targets are in {targets}.\n\
         global:\n  scrape_interval: {SCRAPE_INTERVAL}\n  evaluation_interval: {SCRAPE_INTERVAL}\n\
         scrape_configs:\n\
         - job_name: kubernetes-pods\n  metrics_path: /metrics\n  file_sd_configs:\n  - files: ['{targets}']\n    refresh_interval: 5s\n",
        targets = targets_path.display()
    )
}

fn home() -> PathBuf {
    dir().join("prometheus")
}

/// The Prometheus binary, if installed.
pub(super) fn binary() -> Option<PathBuf> {
    let mut places = vec![PathBuf::from(DEBIAN_BINARY)];
    if let Ok(path) = std::env::var("PATH") {
        places.extend(std::env::split_paths(&path).map(|p| p.join("prometheus")));
    }
    places.into_iter().find(|p| p.is_file())
}

/// Rewrites the targets file from the lab's state (Prometheus picks it up within seconds).
/// Nothing to do when the lab runs no Prometheus.
pub(super) fn write_targets(state: &LabState) -> anyhow::Result<()> {
    let home = home();
    if !home.exists() {
        return Ok(());
    }
    let path = home.join("targets.json");
    let tmp = path.with_extension("tmp");
    std::fs::write(
        &tmp,
        serde_json::to_vec_pretty(&targets_file(&targets(state)))?,
    )?;
    std::fs::rename(tmp, path)?;
    Ok(())
}

/// Whether Prometheus answers `GET /-/ready` with 200 (asked from the fabric).
pub(super) fn ready(fabric: &str) -> bool {
    http::get(fabric, LISTEN, "/-/ready").is_some_and(|(s, _)| s == 200)
}

/// Starts Prometheus in the fabric namespace when it is installed and waits for it to be ready.
/// Prometheus is an aid, not part of the mesh: when it is not installed or fails to start, a line
/// on stderr says so and the lab runs without it.
pub(super) fn start(topology: &Topology, state: &LabState) -> Option<Process> {
    let Some(binary) = binary() else {
        super::progress(
            "Prometheus is not installed (apt-get install prometheus): the lab runs without it, and `ambitctl lab dashboard` has nothing to show",
        );
        return None;
    };
    super::progress(&format!(
        "starting Prometheus on {LISTEN} in netns {}",
        topology.fabric
    ));
    match spawn(topology, state, &binary) {
        Ok(process) => Some(process),
        Err(e) => {
            super::progress(&format!(
                "Prometheus did not start, the lab runs without it: {e:#}"
            ));
            None
        }
    }
}

fn spawn(topology: &Topology, state: &LabState, binary: &Path) -> anyhow::Result<Process> {
    let home = home();
    std::fs::create_dir_all(home.join("data"))?;
    let targets = home.join("targets.json");
    let config_path = home.join("prometheus.yml");
    std::fs::write(&config_path, config(&targets))?;
    write_targets(state)?;
    let args = [
        format!("--config.file={}", config_path.display()),
        format!("--storage.tsdb.path={}", home.join("data").display()),
        "--storage.tsdb.retention.time=1d".to_string(),
        format!("--web.listen-address={LISTEN}"),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let process = topology.spawn(
        KEY,
        &topology.fabric,
        binary,
        &args,
        &[],
        &home.join("prometheus.log"),
    )?;
    let fabric = topology.fabric.clone();
    if super::wait("Prometheus to be ready", Duration::from_secs(30), || {
        ready(&fabric)
    })
    .is_err()
    {
        super::progress(&format!(
            "Prometheus is not ready after 30 s; the mesh runs on (its log: {})",
            home.join("prometheus.log").display()
        ));
    }
    Ok(process)
}

/// The `prometheus` entry of `lab status --json`.
pub(super) fn status(running: bool, fabric: &str) -> serde_json::Value {
    json!({
        "installed": binary().is_some(),
        "running": running,
        "ready": running && ready(fabric),
        "address": LISTEN.to_string(),
        "netns": fabric,
        "targets": home().join("targets.json"),
    })
}

/// The `prometheus` row of `lab status`.
pub(super) fn status_line(running: bool, fabric: &str) -> String {
    let state = if running {
        if ready(fabric) {
            "running"
        } else {
            "NOT READY"
        }
    } else if binary().is_some() {
        "NOT RUNNING"
    } else {
        "not installed (apt-get install prometheus)"
    };
    format!("prometheus   {LISTEN} in netns {fabric}  {state}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lab::{NodeState, PodState};

    fn state() -> LabState {
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
            pods: vec![
                PodState {
                    namespace: "demo".into(),
                    name: "client".into(),
                    uid: "u1".into(),
                    node: 0,
                    netns: "p1".into(),
                    ip: IpAddr::V4(Ipv4Addr::new(10, 1, 1, 5)),
                    service_account: "default".into(),
                    ambient: true,
                    gateway: None,
                },
                PodState {
                    namespace: "demo".into(),
                    name: "waypoint-waypoint".into(),
                    uid: "u2".into(),
                    node: 1,
                    netns: "p2".into(),
                    ip: IpAddr::V4(Ipv4Addr::new(10, 1, 2, 7)),
                    service_account: "waypoint".into(),
                    ambient: false,
                    gateway: Some("waypoint".into()),
                },
            ],
            ..LabState::default()
        }
    }

    /// Labels as Istio's dashboards select them: ztunnel pods named `ztunnel-<node>` in
    /// istio-system with `app="ztunnel"`, the waypoint by its pod and Gateway, istiod-lite as
    /// `app="istiod"`; workload pods are not scraped (their traffic is counted by ztunnel).
    #[test]
    fn every_component_is_a_target_with_kubernetes_labels() {
        let file = targets_file(&targets(&state()));
        assert_eq!(
            file,
            json!([
                {"targets": ["10.240.0.1:15014"], "labels": {
                    "app": "istiod", "istio": "pilot", "namespace": "istio-system", "pod": "istiod-lite"}},
                {"targets": ["10.240.0.11:15020"], "labels": {
                    "app": "ztunnel", "namespace": "istio-system", "node": "node-1", "pod": "ztunnel-node-1"}},
                {"targets": ["10.240.0.12:15020"], "labels": {
                    "app": "ztunnel", "namespace": "istio-system", "node": "node-2", "pod": "ztunnel-node-2"}},
                {"targets": ["10.1.2.7:15020"], "labels": {
                    "app": "waypoint", "gateway_networking_k8s_io_gateway_name": "waypoint",
                    "istio_io_dataplane_mode": "none",
                    "namespace": "demo", "node": "node-2", "pod": "waypoint-waypoint"}},
            ])
        );
    }

    #[test]
    fn the_config_scrapes_the_targets_file_every_two_seconds() {
        let text = config(Path::new("/run/ambit-lab/prometheus/targets.json"));
        let yaml: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).unwrap();
        assert_eq!(yaml["global"]["scrape_interval"], "2s");
        let job = &yaml["scrape_configs"][0];
        assert_eq!(job["job_name"], "kubernetes-pods");
        assert_eq!(job["metrics_path"], "/metrics");
        assert_eq!(
            job["file_sd_configs"][0]["files"][0],
            "/run/ambit-lab/prometheus/targets.json"
        );
    }

    #[test]
    fn pod_label_names_are_made_prometheus_safe() {
        assert_eq!(label_name("istio.io/rev"), "istio_io_rev");
        assert_eq!(
            label_name("service.istio.io/canonical-name"),
            "service_istio_io_canonical_name"
        );
    }
}
