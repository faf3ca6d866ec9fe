//! ztunnel's settings, read from environment variables with the upstream names. Every bad value is
//! reported at once, naming the variable and the value.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use ambit_core::config::{ConfigError, EnvReader, EnvSource};
use ambit_core::logging::LogFormat;
use ambit_xds::{ControlPlane, ControlPlaneEnv};

use crate::proxy::ProxyConfig;

/// Where configuration comes from.
#[derive(Clone, Debug)]
pub enum ConfigSource {
    /// Delta xDS from the control plane.
    Xds(ControlPlane),
    /// A local YAML file (`LOCAL_XDS_PATH`).
    File(PathBuf),
}

/// Everything ztunnel needs to start.
#[derive(Clone, Debug)]
pub struct Config {
    /// This node's name (workloads on it are "local").
    pub node_name: String,
    /// ztunnel's own pod name and namespace (xDS node id).
    pub pod_name: String,
    /// ztunnel's own pod namespace.
    pub pod_namespace: String,
    /// ztunnel's own IP (xDS node id).
    pub instance_ip: IpAddr,
    /// Mesh trust domain for pod identities.
    pub trust_domain: String,
    /// Cluster id (`clusterid` header, metrics).
    pub cluster_id: String,
    /// Configuration source.
    pub source: ConfigSource,
    /// The CA (None in local-file mode without `CA_ADDRESS`: certificates then come from
    /// `LOCAL_CA_DIR`).
    pub ca: Option<ControlPlane>,
    /// A local CA directory (ca-cert.pem, ca-key.pem) to sign certificates in-process (lab
    /// without istiod, tests).
    pub local_ca_dir: Option<PathBuf>,
    /// Requested certificate lifetime.
    pub secret_ttl: Duration,
    /// ZDS socket path; None disables in-pod mode.
    pub zds_path: Option<PathBuf>,
    /// Prometheus endpoint.
    pub stats_addr: SocketAddr,
    /// Admin endpoint (localhost only by default).
    pub admin_addr: SocketAddr,
    /// Readiness endpoint.
    pub readiness_addr: SocketAddr,
    /// How long connections may finish after SIGTERM or a pod's removal.
    pub drain_deadline: Duration,
    /// Log output format.
    pub log_format: LogFormat,
    /// Default log filter.
    pub log_level: String,
    /// Proxy settings.
    pub proxy: ProxyConfig,
    /// Threads of the async runtime that runs the proxies (`ZTUNNEL_WORKER_THREADS`).
    pub worker_threads: usize,
    /// The settings as read, for `/config_dump` (secrets masked).
    pub effective: Vec<(String, String)>,
}

/// Runtime threads unless `ZTUNNEL_WORKER_THREADS` says otherwise, for the CPUs this process may
/// use: see [`worker_threads_for`].
pub fn default_worker_threads() -> usize {
    worker_threads_for(std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get))
}

/// One thread on a node of one or two CPUs; otherwise a quarter of the CPUs, rounded up, and at
/// least two (upstream's rule). On two CPUs a second thread mostly hands connections between
/// threads: with the workloads on the same two CPUs, one thread made 2-3 context switches per new
/// connection instead of 6 and used a quarter less CPU per connection, at equal or higher rates on
/// every load of the mesh_peers benchmark (docs/benchmarks.md).
pub fn worker_threads_for(cpus: usize) -> usize {
    if cpus <= 2 {
        1
    } else {
        cpus.div_ceil(4).max(2)
    }
}
/// More threads than this is a typo, not a setting.
const MAX_WORKER_THREADS: usize = 1024;

/// Reads the configuration. `headers` are the process's `XDS_HEADER_*`/`CA_HEADER_*` variables.
pub fn from_env(
    source: &dyn EnvSource,
    vars: &BTreeMap<String, String>,
) -> Result<Config, ConfigError> {
    let mut env = EnvReader::new(source);
    let node_name = env.required_string("NODE_NAME").unwrap_or_default();
    let pod_name = env.string("POD_NAME", "ztunnel");
    let pod_namespace = env.string("POD_NAMESPACE", "istio-system");
    let instance_ip = env.parse("INSTANCE_IP", IpAddr::V4(Ipv4Addr::new(1, 1, 1, 1)));
    let trust_domain = env.string("TRUST_DOMAIN", "cluster.local");
    let control = ControlPlaneEnv::read(&mut env, vars);
    let cluster_id = control.cluster_id.clone();
    let connect_timeout = control.connect_timeout;
    let xds = control.xds;
    let local_path = env.optional_string("LOCAL_XDS_PATH").map(PathBuf::from);
    let local_ca_dir = env.optional_string("LOCAL_CA_DIR").map(PathBuf::from);
    let ca = match (control.ca_address_given, &local_path, &local_ca_dir) {
        (false, _, Some(_)) | (false, Some(_), None) => None,
        _ => Some(control.ca),
    };
    if ca.is_none() && local_ca_dir.is_none() {
        env.invalid(
            "CA_ADDRESS",
            "",
            "a CA address, or LOCAL_CA_DIR, when LOCAL_XDS_PATH is set",
        );
    }
    let source = match local_path {
        Some(path) => ConfigSource::File(path),
        None => ConfigSource::Xds(xds),
    };
    let inpod = env.bool("INPOD_ENABLED", true);
    let zds_path =
        inpod.then(|| PathBuf::from(env.string("INPOD_UDS", "/var/run/ztunnel/ztunnel.sock")));
    let secret_ttl = env.duration("SECRET_TTL", Duration::from_secs(24 * 3600));
    let stats_addr = env.socket_addr("STATS_ADDR", "[::]:15020".parse().expect("literal"));
    let admin_addr = env.socket_addr("ADMIN_ADDR", "127.0.0.1:15000".parse().expect("literal"));
    let readiness_addr = env.socket_addr("READINESS_ADDR", "[::]:15021".parse().expect("literal"));
    let drain_deadline = env.duration("DRAIN_DEADLINE", Duration::from_secs(5));
    let log_format = env.parse("LOG_FORMAT", LogFormat::Text);
    let log_level = env.string("RUST_LOG", "info");
    let network = env.string("NETWORK", "");
    let preserve_source = env.bool("ENABLE_ORIG_SRC", true);
    let worker_threads = env.parse("ZTUNNEL_WORKER_THREADS", default_worker_threads());
    if worker_threads == 0 || worker_threads > MAX_WORKER_THREADS {
        env.invalid(
            "ZTUNNEL_WORKER_THREADS",
            &worker_threads.to_string(),
            format!("a number of threads from 1 to {MAX_WORKER_THREADS}"),
        );
    }
    let effective = env.finish()?;
    Ok(Config {
        node_name,
        pod_name,
        pod_namespace,
        instance_ip,
        trust_domain,
        cluster_id: cluster_id.clone(),
        source,
        ca,
        local_ca_dir,
        secret_ttl,
        zds_path,
        stats_addr,
        admin_addr,
        readiness_addr,
        drain_deadline,
        log_format,
        log_level,
        proxy: ProxyConfig {
            network,
            cluster_id,
            connect_timeout,
            preserve_source,
            ..ProxyConfig::default()
        },
        worker_threads,
        effective,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let mut env: BTreeMap<String, String> = [
            ("NODE_NAME", "node-1"),
            ("LOCAL_XDS_PATH", "/dev/null"),
            ("LOCAL_CA_DIR", "/nonexistent"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        env.extend(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        from_env(&env, &BTreeMap::new())
    }

    #[test]
    fn worker_threads_default_and_override() {
        let config = read(&[]).unwrap();
        assert_eq!(config.worker_threads, default_worker_threads());
        assert!(config.worker_threads >= 1);
        assert_eq!(
            read(&[("ZTUNNEL_WORKER_THREADS", "1")])
                .unwrap()
                .worker_threads,
            1
        );
    }

    #[test]
    fn one_thread_up_to_two_cpus_then_a_quarter_of_them_at_least_two() {
        let by_cpus: Vec<usize> = [1, 2, 3, 4, 8, 9, 16, 64]
            .into_iter()
            .map(worker_threads_for)
            .collect();
        assert_eq!(by_cpus, [1, 1, 2, 2, 2, 3, 4, 16]);
    }

    #[test]
    fn bad_worker_threads_name_the_variable() {
        for bad in ["0", "two", "-1", "5000"] {
            let error = read(&[("ZTUNNEL_WORKER_THREADS", bad)])
                .unwrap_err()
                .to_string();
            assert!(
                error.contains("ZTUNNEL_WORKER_THREADS") && error.contains(bad),
                "{bad}: {error}"
            );
        }
    }
}
