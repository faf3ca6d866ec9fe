//! The metrics every Istio component exports about itself: `istio_build{component, tag}` and the
//! standard Prometheus process metrics (`process_cpu_seconds_total`,
//! `process_resident_memory_bytes`, `process_virtual_memory_bytes`, `process_open_fds`,
//! `process_max_fds`, `process_start_time_seconds`), read from procfs at each scrape.
//!
//! Istio's ztunnel dashboard draws its "Versions" and "Resource Usage" panels from these, and
//! Prometheus client libraries in other languages export the same names, so any process
//! dashboard works unchanged.

use std::fmt::Write as _;
use std::path::Path;

use crate::metrics::Registry;

/// Clock ticks per second in `/proc/<pid>/stat` (`USER_HZ`, fixed at 100 on Linux whatever the
/// kernel's internal tick rate).
const USER_HZ: f64 = 100.0;

/// One reading of a process's resource use.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProcessStats {
    /// User plus system CPU time, in seconds.
    pub cpu_seconds: f64,
    /// Resident set size, in bytes.
    pub resident_bytes: u64,
    /// Virtual memory size, in bytes.
    pub virtual_bytes: u64,
    /// Open file descriptors.
    pub open_fds: u64,
    /// The soft limit on open file descriptors (`None`: unlimited).
    pub max_fds: Option<u64>,
    /// When the process started, in seconds since the Unix epoch.
    pub start_time_seconds: f64,
}

impl ProcessStats {
    /// Reads this process's figures from `/proc/self`.
    pub fn read_self() -> Option<Self> {
        Self::read(Path::new("/proc"), "self")
    }

    /// Reads process `pid`'s figures from the procfs mounted at `proc`.
    pub fn read(proc: &Path, pid: &str) -> Option<Self> {
        let dir = proc.join(pid);
        let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
        let boot_time = std::fs::read_to_string(proc.join("stat"))
            .ok()
            .and_then(|s| parse_boot_time(&s))?;
        let mut stats = parse_stat(&stat, boot_time)?;
        stats.resident_bytes = std::fs::read_to_string(dir.join("status"))
            .ok()
            .and_then(|s| parse_resident(&s))
            .unwrap_or(0);
        stats.open_fds = std::fs::read_dir(dir.join("fd"))
            .map(|d| d.count() as u64)
            .unwrap_or(0);
        stats.max_fds = std::fs::read_to_string(dir.join("limits"))
            .ok()
            .and_then(|l| parse_max_fds(&l));
        Some(stats)
    }

    /// The Prometheus text exposition of these figures.
    pub fn render(&self, out: &mut String) {
        let mut metric = |name: &str, kind: &str, help: &str, value: String| {
            let _ = write!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
            );
        };
        metric(
            "process_cpu_seconds_total",
            "counter",
            "CPU time (user and system) this process has used, in seconds.",
            self.cpu_seconds.to_string(),
        );
        metric(
            "process_resident_memory_bytes",
            "gauge",
            "Resident set size of this process, in bytes.",
            self.resident_bytes.to_string(),
        );
        metric(
            "process_virtual_memory_bytes",
            "gauge",
            "Virtual memory size of this process, in bytes.",
            self.virtual_bytes.to_string(),
        );
        metric(
            "process_open_fds",
            "gauge",
            "File descriptors this process has open.",
            self.open_fds.to_string(),
        );
        metric(
            "process_max_fds",
            "gauge",
            "The soft limit on this process's open file descriptors.",
            self.max_fds
                .map_or_else(|| "+Inf".to_string(), |m| m.to_string()),
        );
        metric(
            "process_start_time_seconds",
            "gauge",
            "When this process started, in seconds since the Unix epoch.",
            self.start_time_seconds.to_string(),
        );
    }
}

/// `btime` (boot time, seconds since the epoch) from `/proc/stat`.
fn parse_boot_time(proc_stat: &str) -> Option<f64> {
    proc_stat
        .lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

/// CPU time, virtual memory and start time from `/proc/<pid>/stat` (see proc(5)). The command name
/// (field 2) may hold spaces and parentheses, so fields are counted after its last `)`.
fn parse_stat(stat: &str, boot_time: f64) -> Option<ProcessStats> {
    let after = &stat[stat.rfind(')')? + 1..];
    // Field 3 (state) is the first after the name.
    let fields: Vec<&str> = after.split_whitespace().collect();
    let field = |n: usize| -> Option<u64> { fields.get(n - 3)?.parse().ok() };
    let utime = field(14)?;
    let stime = field(15)?;
    let start_ticks = field(22)?;
    let virtual_bytes = field(23)?;
    Some(ProcessStats {
        cpu_seconds: (utime + stime) as f64 / USER_HZ,
        resident_bytes: 0,
        virtual_bytes,
        open_fds: 0,
        max_fds: None,
        start_time_seconds: boot_time + start_ticks as f64 / USER_HZ,
    })
}

/// `VmRSS` from `/proc/<pid>/status`, in bytes (the stat file counts pages, whose size
/// varies by platform; status says kB).
fn parse_resident(status: &str) -> Option<u64> {
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// The soft limit of "Max open files" in `/proc/<pid>/limits`.
fn parse_max_fds(limits: &str) -> Option<u64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let soft = line
        .trim_start_matches("Max open files")
        .split_whitespace()
        .next()?;
    soft.parse().ok()
}

/// Exports `istio_build{component, tag} 1` and this process's metrics from `registry`, read at
/// each render. `component` is the name Istio uses (`ztunnel`; `proxy` for a waypoint; `pilot`
/// for the control plane), `tag` the version.
pub fn register(registry: &Registry, component: &str, tag: &str) {
    registry.describe_gauge(
        "istio_build",
        "The component's build: always 1, labelled with the component and its version tag",
    );
    registry
        .gauge(
            "istio_build",
            &[
                ("component", component.to_string()),
                ("tag", tag.to_string()),
            ],
        )
        .set(1.0);
    registry.add_collector(|out: &mut String| {
        if let Some(stats) = ProcessStats::read_self() {
            stats.render(out);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAT: &str = "4242 (ztun (nel) x) S 1 4242 4242 0 -1 4194560 5000 0 0 0 250 75 0 0 20 0 9 0 123456 987654321 2560 18446744073709551615 1 1 0 0 0 0 0 4096 17610 0 0 0 17 1 0 0 0 0 0";

    #[test]
    fn stat_fields_are_counted_after_the_command_name() {
        let stats = parse_stat(STAT, 1_700_000_000.0).unwrap();
        assert_eq!(stats.cpu_seconds, 3.25);
        assert_eq!(stats.virtual_bytes, 987_654_321);
        assert_eq!(
            parse_resident("Name:\tztunnel\nVmRSS:\t   10240 kB\n"),
            Some(10 * 1024 * 1024)
        );
        assert_eq!(stats.start_time_seconds, 1_700_000_000.0 + 1234.56);
    }

    #[test]
    fn limits_give_the_soft_fd_limit() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \nMax cpu time              unlimited            unlimited            seconds   \nMax open files            1024                 524288               files     \n";
        assert_eq!(parse_max_fds(limits), Some(1024));
        assert_eq!(
            parse_boot_time("cpu  1 2 3\nbtime 1700000000\n"),
            Some(1.7e9)
        );
    }

    #[test]
    fn this_process_is_read_and_rendered_with_istio_build() {
        let registry = Registry::new();
        register(&registry, "ztunnel", "0.1.0");
        let text = registry.render();
        assert!(
            text.contains("istio_build{component=\"ztunnel\",tag=\"0.1.0\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE process_cpu_seconds_total counter"),
            "{text}"
        );
        for name in [
            "process_resident_memory_bytes",
            "process_open_fds",
            "process_max_fds",
            "process_start_time_seconds",
        ] {
            let value: f64 = text
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{name} ")))
                .unwrap_or_else(|| panic!("{name} missing: {text}"))
                .parse()
                .unwrap();
            assert!(value > 0.0, "{name} = {value}");
        }
    }
}
