//! The workload state at cluster scale: resident memory and lookup time with 10,000 and 100,000
//! workloads (one service per ten workloads). Lookups are what every connection does: resolve the
//! destination address, then pick an endpoint. Prints a Markdown table.
//!
//! `cargo bench -p ambit-state --bench state` runs both sizes; without `--bench` it runs 2,000.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Instant;

use ambit_proto::workload as pb;
use ambit_state::{Address, StateIndex};

fn ip(i: usize) -> Vec<u8> {
    vec![
        10,
        (100 + i / 65536) as u8,
        ((i / 256) % 256) as u8,
        (i % 256) as u8,
    ]
}

fn vip(s: usize) -> [u8; 4] {
    [
        10,
        96 + (s / 65536) as u8,
        ((s / 256) % 256) as u8,
        (s % 256) as u8,
    ]
}

fn build(n: usize) -> StateIndex {
    let mut state = StateIndex::new("node-1");
    for s in 0..n / 10 {
        let ns = format!("ns-{}", s % 50);
        state
            .insert_service(&pb::Service {
                name: format!("svc-{s}"),
                namespace: ns.clone(),
                hostname: format!("svc-{s}.{ns}.svc.cluster.local"),
                addresses: vec![pb::NetworkAddress {
                    network: String::new(),
                    address: vip(s).to_vec(),
                    length: None,
                }],
                ports: vec![pb::Port {
                    service_port: 80,
                    target_port: 8080,
                    app_protocol: 0,
                }],
                ..Default::default()
            })
            .expect("valid service");
    }
    for i in 0..n {
        let s = i / 10;
        let ns = format!("ns-{}", s % 50);
        let key = format!("{ns}/svc-{s}.{ns}.svc.cluster.local");
        state
            .insert_workload(&pb::Workload {
                uid: format!("Kubernetes//Pod/{ns}/svc{s}-7d9f8c6b5-{i:05x}"),
                name: format!("svc{s}-7d9f8c6b5-{i:05x}"),
                namespace: ns.clone(),
                addresses: vec![ip(i)],
                tunnel_protocol: pb::TunnelProtocol::Hbone as i32,
                service_account: "default".into(),
                node: format!("node-{}", i % 100),
                canonical_name: format!("svc{s}"),
                canonical_revision: "v1".into(),
                workload_name: format!("svc{s}"),
                cluster_id: "Kubernetes".into(),
                services: [(
                    key,
                    pb::PortList {
                        ports: vec![pb::Port {
                            service_port: 80,
                            target_port: 8080,
                            app_protocol: 0,
                        }],
                    },
                )]
                .into_iter()
                .collect(),
                ..Default::default()
            })
            .expect("valid workload");
    }
    state
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let sizes: &[usize] = if full { &[10_000, 100_000] } else { &[2_000] };
    println!(
        "| workloads | RSS growth | per workload | address lookup | lookup + endpoint pick |\n|---|---:|---:|---:|---:|"
    );
    for &n in sizes {
        let before = rss_kib();
        let state = build(n);
        let grown = rss_kib().saturating_sub(before);
        let lookups = 1_000_000usize;
        let start = Instant::now();
        for k in 0..lookups {
            let i = (k * 7919) % n;
            let a = IpAddr::V4(Ipv4Addr::new(
                10,
                (100 + i / 65536) as u8,
                ((i / 256) % 256) as u8,
                (i % 256) as u8,
            ));
            black_box(state.find_address("", a));
        }
        let address_ns = start.elapsed().as_nanos() as f64 / lookups as f64;
        let source = state.workloads().next().cloned();
        let start = Instant::now();
        for k in 0..lookups {
            let s = (k * 104_729) % (n / 10);
            let [a, b, c, d] = vip(s);
            if let Some(Address::Service(service)) =
                state.find_address("", IpAddr::V4(Ipv4Addr::new(a, b, c, d)))
            {
                black_box(state.pick_endpoint(&service, 80, source.as_deref()));
            }
        }
        let pick_ns = start.elapsed().as_nanos() as f64 / lookups as f64;
        println!(
            "| {n} | {:.1} MiB | {} B | {address_ns:.0} ns | {pick_ns:.0} ns |",
            grown as f64 / 1024.0,
            grown * 1024 / n as u64
        );
        drop(state);
    }
}
