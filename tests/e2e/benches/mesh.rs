//! The mesh against direct traffic between the same nodes, in one run: two simulated nodes, a
//! client pod on node 1 and a server pod on node 2 in an ambient namespace, and the same pair in
//! a namespace outside the mesh. Prints a Markdown table of each figure with its ratio.
//!
//! `cargo build --release --workspace --bins && sudo cargo bench -p ambit-e2e --bench mesh` runs
//! the full durations; without `--bench` (under `cargo test --all-targets`) it runs a short smoke.

use std::time::Duration;

use ambit_e2e::{Cluster, PodSpec, binary};
use serde_json::Value;

const MESH_CLIENT: PodSpec = PodSpec {
    namespace: "demo",
    name: "client",
    service_account: "client",
    node: 0,
    app: "client",
};
const MESH_SERVER: PodSpec = PodSpec {
    namespace: "demo",
    name: "server",
    service_account: "server",
    node: 1,
    app: "server",
};
const DIRECT_CLIENT: PodSpec = PodSpec {
    namespace: "legacy",
    name: "client",
    service_account: "default",
    node: 0,
    app: "client",
};
const DIRECT_SERVER: PodSpec = PodSpec {
    namespace: "legacy",
    name: "server",
    service_account: "default",
    node: 1,
    app: "server",
};

fn load(
    cluster: &Cluster,
    from: &PodSpec,
    addr: &str,
    mode: &str,
    seconds: u64,
    connections: usize,
) -> Value {
    let (code, out, err) = cluster.echo(
        from.namespace,
        from.name,
        &[
            "load",
            addr,
            "--mode",
            mode,
            "--seconds",
            &seconds.to_string(),
            "--connections",
            &connections.to_string(),
        ],
    );
    assert_eq!(code, 0, "load {mode} to {addr} failed: {err}");
    serde_json::from_str(out.trim()).expect("load prints JSON")
}

fn peak_rss_kib(pid: Option<u32>) -> u64 {
    let status = pid
        .and_then(|p| std::fs::read_to_string(format!("/proc/{p}/status")).ok())
        .unwrap_or_default();
    // `ip netns exec` execs the program, so the pid is the component itself.
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let seconds = if full { 10 } else { 1 };
    let _ = binary("ztunnel");
    let mut cluster = Cluster::start("abm-", 2, &[]).expect("cluster");
    let pods = [MESH_CLIENT, MESH_SERVER, DIRECT_CLIENT, DIRECT_SERVER];
    cluster.write_objects(&["demo"], &pods);
    let mut ips = Vec::new();
    for pod in &pods {
        ips.push(cluster.add_pod(pod).expect("pod"));
    }
    let mut config = String::from("workloads:\n");
    for (pod, ip) in pods.iter().zip(&ips) {
        let protocol = if pod.namespace == "demo" {
            "HBONE"
        } else {
            "TCP"
        };
        config.push_str(&format!("- name: {}\n  namespace: {}\n  serviceAccount: {}\n  addresses: [{ip}]\n  node: node-{}\n  protocol: {protocol}\n", pod.name, pod.namespace, pod.service_account, pod.node + 1));
    }
    std::fs::write(&cluster.ztunnel_config, config).expect("ztunnel config");
    cluster.wait_ready();
    std::thread::sleep(Duration::from_secs(1));

    let (mesh, direct) = (ips[1], ips[3]);
    let mut rows = Vec::new();
    let mut row = |name: String, m: f64, d: f64, unit: &str| {
        rows.push(format!(
            "| {name} | {m:.1} {unit} | {d:.1} {unit} | {:.2} |",
            if d > 0.0 { m / d } else { 0.0 }
        ));
    };
    let t_mesh = load(
        &cluster,
        &MESH_CLIENT,
        &format!("{mesh}:9001"),
        "throughput",
        seconds,
        1,
    );
    let t_direct = load(
        &cluster,
        &DIRECT_CLIENT,
        &format!("{direct}:9001"),
        "throughput",
        seconds,
        1,
    );
    row(
        format!("single-stream throughput ({seconds} s)"),
        t_mesh["mb_per_s"].as_f64().unwrap(),
        t_direct["mb_per_s"].as_f64().unwrap(),
        "MB/s",
    );
    for connections in [1usize, 16] {
        let m = load(
            &cluster,
            &MESH_CLIENT,
            &format!("{mesh}:9000"),
            "rr",
            seconds,
            connections,
        );
        let d = load(
            &cluster,
            &DIRECT_CLIENT,
            &format!("{direct}:9000"),
            "rr",
            seconds,
            connections,
        );
        row(
            format!("64 B request/response rate, {connections} connection(s)"),
            m["per_second"].as_f64().unwrap(),
            d["per_second"].as_f64().unwrap(),
            "req/s",
        );
        row(
            format!("64 B round trip p50, {connections} connection(s)"),
            m["p50_us"].as_f64().unwrap(),
            d["p50_us"].as_f64().unwrap(),
            "µs",
        );
        row(
            format!("64 B round trip p99, {connections} connection(s)"),
            m["p99_us"].as_f64().unwrap(),
            d["p99_us"].as_f64().unwrap(),
            "µs",
        );
    }
    let c_mesh = load(
        &cluster,
        &MESH_CLIENT,
        &format!("{mesh}:9000"),
        "connect",
        seconds,
        8,
    );
    let c_direct = load(
        &cluster,
        &DIRECT_CLIENT,
        &format!("{direct}:9000"),
        "connect",
        seconds,
        8,
    );
    row(
        "new connections per second (8 at a time)".into(),
        c_mesh["per_second"].as_f64().unwrap(),
        c_direct["per_second"].as_f64().unwrap(),
        "conn/s",
    );

    println!("| benchmark | mesh | direct | mesh / direct |\n|---|---:|---:|---:|");
    for r in &rows {
        println!("{r}");
    }
    for (i, z) in cluster.ztunnels.iter().enumerate() {
        let pid = z.as_ref().and_then(|p| p.pid());
        println!(
            "\npeak RSS ztunnel node-{}: {} KiB",
            i + 1,
            peak_rss_kib(pid)
        );
    }
    for (i, a) in cluster.agents.iter().enumerate() {
        let pid = a.as_ref().and_then(|p| p.pid());
        println!(
            "peak RSS cni-agent node-{}: {} KiB",
            i + 1,
            peak_rss_kib(pid)
        );
    }
}
