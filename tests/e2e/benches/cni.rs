//! CNI plugin ADD latency for ambient and non-ambient pods, and the time from ADD to ztunnel's
//! listeners accepting inside the pod. One simulated node with the real cni-agent and ztunnel;
//! pod interfaces come from the reference bridge plugin (not timed); `ambit-cni` is invoked as a
//! runtime does and timed from spawn to exit.
//!
//! `cargo build --release --workspace --bins && sudo cargo bench -p ambit-e2e --bench cni` runs
//! 200 pods of each kind; without `--bench` it runs 10 as a smoke test.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ambit_e2e::{Cluster, binary};
use ambit_netlab::Chain;
use serde_json::json;

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 * p) as usize).min(sorted.len() - 1);
    sorted[i].as_secs_f64() * 1e3
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let per_kind = if full { 200 } else { 10 };
    let mut cluster = Cluster::start("acb-", 1, &[]).expect("cluster");
    cluster.write_objects(&["demo"], &[]);
    std::fs::write(&cluster.ztunnel_config, "").expect("ztunnel config");
    cluster.wait_ready();
    let node = cluster.topology.nodes[0].clone();
    let plugin = binary("ambit-cni");
    let mut results = Vec::new();
    for (namespace, ambient) in [("legacy", false), ("demo", true)] {
        let mut add = Vec::new();
        let mut listening = Vec::new();
        for i in 0..per_kind {
            let name = format!("p{i}");
            let pod = cluster
                .topology
                .add_pod(
                    0,
                    namespace,
                    &name,
                    &format!("uid-{namespace}-{i}"),
                    &Chain::default(),
                )
                .expect("pod interface");
            let conf = json!({
                "cniVersion": "1.0.0", "name": "ambit-lab", "type": "ambit-cni",
                "agentSocket": node.dir.join("agent.sock"),
                "prevResult": {"cniVersion": "1.0.0", "ips": [{"address": format!("{}/24", pod.ip)}]},
            });
            let invoke = |command: &str| {
                let mut child = Command::new(&plugin)
                    .env_clear()
                    .env("CNI_COMMAND", command)
                    .env("CNI_CONTAINERID", pod.container_id())
                    .env("CNI_NETNS", pod.netns_path())
                    .env("CNI_IFNAME", "eth0")
                    .env("CNI_PATH", "/usr/lib/cni")
                    .env("CNI_ARGS", format!("K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name};K8S_POD_UID=uid-{namespace}-{i}"))
                    .stdin(Stdio::piped())
                    .stdout(Stdio::null())
                    .spawn()
                    .expect("plugin");
                child
                    .stdin
                    .take()
                    .unwrap()
                    .write_all(conf.to_string().as_bytes())
                    .unwrap();
                child.wait().unwrap()
            };
            let start = Instant::now();
            let status = invoke("ADD");
            let took = start.elapsed();
            assert!(status.success(), "ADD failed for {namespace}/{name}");
            add.push(took);
            if ambient {
                let fd: std::os::fd::OwnedFd =
                    std::fs::File::open(pod.netns_path()).unwrap().into();
                loop {
                    let socket =
                        ambit_redirect::in_netns(std::os::fd::AsFd::as_fd(&fd), &pod.netns, || {
                            let s = std::net::TcpStream::connect_timeout(
                                &"127.0.0.1:15008".parse().unwrap(),
                                Duration::from_millis(100),
                            );
                            Ok(s.is_ok())
                        })
                        .unwrap();
                    if socket || start.elapsed() > Duration::from_secs(10) {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                listening.push(start.elapsed());
            }
            // Free the address for the next pod (not timed).
            assert!(invoke("DEL").success());
            cluster
                .topology
                .delete_pod(namespace, &name, &Chain::default())
                .expect("pod removed");
        }
        add.sort();
        listening.sort();
        results.push((ambient, add, listening));
    }
    println!(
        "| pods | ADD p50 | ADD p99 | ADD to listeners up p50 | p99 |\n|---|---:|---:|---:|---:|"
    );
    for (ambient, add, listening) in &results {
        let (l50, l99) = if listening.is_empty() {
            ("-".to_string(), "-".to_string())
        } else {
            (
                format!("{:.1} ms", percentile(listening, 0.5)),
                format!("{:.1} ms", percentile(listening, 0.99)),
            )
        };
        println!(
            "| {} {} | {:.1} ms | {:.1} ms | {l50} | {l99} |",
            add.len(),
            if *ambient { "ambient" } else { "non-ambient" },
            percentile(add, 0.5),
            percentile(add, 0.99)
        );
    }
}
