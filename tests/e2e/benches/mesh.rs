//! The mesh against direct traffic between the same nodes, in one run: two simulated nodes, a
//! client pod on node 1 and a server pod on node 2 in an ambient namespace, and the same pair in
//! a namespace outside the mesh. Prints a Markdown table of each figure with its ratio.
//!
//! `cargo build --release --workspace --bins && sudo cargo bench -p ambit-e2e --bench mesh` runs
//! the full durations; without `--bench` (under `cargo test --all-targets`) it runs a short smoke.
//!
//! Besides the rates it prints what the two ztunnels spent on each mesh load: CPU time (user +
//! system, from `/proc/<pid>/stat`) per MB or per request, and context switches per request.
//! On a shared, noisy machine these move far less than the rates do, so A/B comparisons of the
//! data path should read them first.
//!
//! Environment for A/B runs: `MESH_BENCH_SECONDS` (load duration), `MESH_BENCH_ONLY` (a comma
//! list of `throughput`, `rr1`, `rr16`, `connect`), `MESH_BENCH_ZTUNNEL_ENV` (`NAME=value` pairs
//! separated by commas, passed to both ztunnels).

use std::time::Duration;

use ambit_e2e::bench::{DIRECT_CLIENT, MESH_CLIENT, add_benchmark_pods, ztunnels_usage};
use ambit_e2e::{Cluster, PodSpec, binary};
use serde_json::Value;

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
    let seconds = std::env::var("MESH_BENCH_SECONDS")
        .ok()
        .map(|s| {
            s.parse::<u64>()
                .expect("MESH_BENCH_SECONDS is a number of seconds")
        })
        .unwrap_or(if full { 10 } else { 1 });
    let only = std::env::var("MESH_BENCH_ONLY").unwrap_or_default();
    let wanted = |phase: &str| only.is_empty() || only.split(',').any(|p| p.trim() == phase);
    let ztunnel_env: Vec<(&'static str, String)> = std::env::var("MESH_BENCH_ZTUNNEL_ENV")
        .unwrap_or_default()
        .split(',')
        .filter(|pair| !pair.trim().is_empty())
        .map(|pair| {
            let (name, value) = pair
                .split_once('=')
                .unwrap_or_else(|| panic!("MESH_BENCH_ZTUNNEL_ENV: {pair:?} is not NAME=value"));
            // Leaked on purpose: a handful of short strings for the process's lifetime.
            let name: &'static str = Box::leak(name.trim().to_string().into_boxed_str());
            (name, value.trim().to_string())
        })
        .collect();
    let _ = binary("ztunnel");
    let mut cluster = Cluster::start("abm-", 2, &ztunnel_env).expect("cluster");
    let ips = add_benchmark_pods(&mut cluster);
    cluster.wait_ready();
    std::thread::sleep(Duration::from_secs(1));

    let (mesh, direct) = (ips[1], ips[3]);
    let mut rows = Vec::new();
    let mut costs = Vec::new();
    let mut row = |name: String, m: f64, d: f64, unit: &str| {
        rows.push(format!(
            "| {name} | {m:.1} {unit} | {d:.1} {unit} | {:.2} |",
            if d > 0.0 { m / d } else { 0.0 }
        ));
    };
    // Runs one load through the mesh, noting what both ztunnels spent on it.
    let mut mesh_load = |what: &str, addr: String, mode: &str, connections: usize| {
        let before = ztunnels_usage(&cluster);
        let result = load(&cluster, &MESH_CLIENT, &addr, mode, seconds, connections);
        let after = ztunnels_usage(&cluster);
        let cpu = after.cpu.saturating_sub(before.cpu);
        let switches = after.switches.saturating_sub(before.switches);
        let (per, unit, count) = match mode {
            "throughput" => (
                cpu.as_secs_f64() * 1e6 / (result["bytes"].as_f64().unwrap() / 1e6),
                "µs CPU/MB",
                result["bytes"].as_f64().unwrap() / 1e6,
            ),
            "rr" => (
                cpu.as_secs_f64() * 1e6 / result["requests"].as_f64().unwrap(),
                "µs CPU/request",
                result["requests"].as_f64().unwrap(),
            ),
            _ => (
                cpu.as_secs_f64() * 1e6 / result["connections"].as_f64().unwrap(),
                "µs CPU/connection",
                result["connections"].as_f64().unwrap(),
            ),
        };
        costs.push(format!(
            "| {what} | {:.0} ms | {per:.1} {unit} | {:.2} |",
            cpu.as_secs_f64() * 1e3,
            switches as f64 / count.max(1.0)
        ));
        result
    };
    if wanted("throughput") {
        let t_mesh = mesh_load(
            "single-stream throughput (per MB)",
            format!("{mesh}:9001"),
            "throughput",
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
    }
    for connections in [1usize, 16] {
        if !wanted(&format!("rr{connections}")) {
            continue;
        }
        let m = mesh_load(
            &format!("64 B request/response, {connections} connection(s) (per request)"),
            format!("{mesh}:9000"),
            "rr",
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
    if wanted("connect") {
        let c_mesh = mesh_load(
            "new connections, 8 at a time (per connection)",
            format!("{mesh}:9000"),
            "connect",
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
    }

    println!("| benchmark | mesh | direct | mesh / direct |\n|---|---:|---:|---:|");
    for r in &rows {
        println!("{r}");
    }
    println!(
        "\nBoth ztunnels together, per mesh load:\n\n| load | CPU | CPU cost | context switches per unit |\n|---|---:|---:|---:|"
    );
    for c in &costs {
        println!("{c}");
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
