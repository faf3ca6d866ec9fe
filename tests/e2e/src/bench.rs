//! What the benchmarks share: the two-node topology's pods, reading a process's CPU, context
//! switches and memory from `/proc`, and wrk's durations.

use std::net::IpAddr;
use std::time::Duration;

use crate::{Cluster, PodSpec};

/// The captured client (node 1) and server (node 2) of the mesh path.
pub const MESH_CLIENT: PodSpec = PodSpec {
    namespace: "demo",
    name: "client",
    service_account: "client",
    node: 0,
    app: "client",
};
/// See [`MESH_CLIENT`].
pub const MESH_SERVER: PodSpec = PodSpec {
    namespace: "demo",
    name: "server",
    service_account: "server",
    node: 1,
    app: "server",
};
/// The uncaptured client (node 1) and server (node 2) of the direct path.
pub const DIRECT_CLIENT: PodSpec = PodSpec {
    namespace: "legacy",
    name: "client",
    service_account: "default",
    node: 0,
    app: "client",
};
/// See [`DIRECT_CLIENT`].
pub const DIRECT_SERVER: PodSpec = PodSpec {
    namespace: "legacy",
    name: "server",
    service_account: "default",
    node: 1,
    app: "server",
};

/// Adds the benchmark pods ([`MESH_CLIENT`], [`MESH_SERVER`] in the ambient namespace `demo`,
/// [`DIRECT_CLIENT`], [`DIRECT_SERVER`] outside it) and the ztunnels' workload file for them;
/// returns their addresses in that order.
pub fn add_benchmark_pods(cluster: &mut Cluster) -> Vec<IpAddr> {
    let pods = [MESH_CLIENT, MESH_SERVER, DIRECT_CLIENT, DIRECT_SERVER];
    cluster.write_objects(&["demo"], &pods);
    let ips: Vec<IpAddr> = pods
        .iter()
        .map(|pod| cluster.add_pod(pod).expect("pod"))
        .collect();
    let mut config = String::from("workloads:\n");
    for (pod, ip) in pods.iter().zip(&ips) {
        let protocol = if pod.namespace == "demo" {
            "HBONE"
        } else {
            "TCP"
        };
        config.push_str(&format!(
            "- name: {}\n  namespace: {}\n  serviceAccount: {}\n  addresses: [{ip}]\n  node: node-{}\n  protocol: {protocol}\n",
            pod.name,
            pod.namespace,
            pod.service_account,
            pod.node + 1
        ));
    }
    std::fs::write(&cluster.ztunnel_config, config).expect("ztunnel config");
    ips
}

/// CPU time (user + system) and context switches (all threads) of one process so far.
#[derive(Clone, Copy, Debug, Default)]
pub struct Usage {
    /// User + system time.
    pub cpu: Duration,
    /// Voluntary and involuntary context switches of all its threads.
    pub switches: u64,
}

impl std::ops::Add for Usage {
    type Output = Usage;

    fn add(self, other: Usage) -> Usage {
        Usage {
            cpu: self.cpu + other.cpu,
            switches: self.switches + other.switches,
        }
    }
}

/// Clock ticks from `/proc/<pid>/stat` fields, counted after the command name (11 = utime,
/// 12 = stime, 13 and 14 the same for waited-for children); `pid` may be `self`.
pub fn stat_ticks(pid: &str, fields: &[usize]) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
    let values: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = fields
        .iter()
        .filter_map(|i| values.get(*i)?.parse::<u64>().ok())
        .sum();
    // USER_HZ is 100 on every Linux configuration Rust's std supports here.
    Duration::from_millis(ticks * 10)
}

/// A process's usage so far (zero for no process).
pub fn usage(pid: Option<u32>) -> Usage {
    let Some(pid) = pid else {
        return Usage::default();
    };
    let cpu = stat_ticks(&pid.to_string(), &[11, 12]);
    let mut switches = 0;
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for task in tasks.flatten() {
            let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
            switches += status
                .lines()
                .filter(|l| l.contains("ctxt_switches:"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum::<u64>();
        }
    }
    Usage { cpu, switches }
}

/// A `/proc/<pid>/status` figure in KiB (`VmRSS`, `VmHWM`); 0 for no process.
pub fn status_kib(pid: Option<u32>, field: &str) -> u64 {
    let field = format!("{}:", field.trim_end_matches(':'));
    pid.and_then(|p| std::fs::read_to_string(format!("/proc/{p}/status")).ok())
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(&field))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// The cluster's ztunnel processes, by node (`None` for one not running).
pub fn ztunnel_pids(cluster: &Cluster) -> Vec<Option<u32>> {
    cluster
        .ztunnels
        .iter()
        .map(|z| z.as_ref().and_then(|p| p.pid()))
        .collect()
}

/// Summed usage of the cluster's ztunnels.
pub fn ztunnels_usage(cluster: &Cluster) -> Usage {
    ztunnel_pids(cluster)
        .into_iter()
        .map(usage)
        .fold(Usage::default(), |a, b| a + b)
}

/// Parses a wrk duration (`850.00us`, `1.23ms`, `2.00s`, `1.50m`) into microseconds.
pub fn wrk_micros(value: &str) -> Option<f64> {
    let (number, scale) = if let Some(n) = value.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = value.strip_suffix("ms") {
        (n, 1e3)
    } else if let Some(n) = value.strip_suffix('m') {
        (n, 60e6)
    } else if let Some(n) = value.strip_suffix('s') {
        (n, 1e6)
    } else {
        return None;
    };
    Some(number.parse::<f64>().ok()? * scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_durations_in_microseconds() {
        assert_eq!(wrk_micros("850.00us"), Some(850.0));
        assert_eq!(wrk_micros("1.23ms"), Some(1230.0));
        assert_eq!(wrk_micros("2.00s"), Some(2e6));
        assert_eq!(wrk_micros("1.50m"), Some(90e6));
        assert_eq!(wrk_micros("12"), None);
    }

    #[test]
    fn this_process_has_cpu_and_memory() {
        let me = Some(std::process::id());
        assert!(status_kib(me, "VmRSS") > 0);
        // With or without the colon; VmExe (the executable's size) does not move meanwhile.
        assert!(status_kib(me, "VmExe") > 0);
        assert_eq!(status_kib(me, "VmExe:"), status_kib(me, "VmExe"));
        assert_eq!(status_kib(None, "VmRSS"), 0);
        assert_eq!(usage(None).cpu, Duration::ZERO);
    }
}
