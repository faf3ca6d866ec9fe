//! The waypoint's settings, read from environment variables (the names ztunnel and Istio's
//! waypoint pods use where they mean the same thing). Every bad value is reported at once,
//! naming the variable and the value.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use ambit_core::config::{ConfigError, EnvReader, EnvSource};
use ambit_core::logging::LogFormat;
use ambit_xds::{ControlPlane, TokenSource};

/// Everything the waypoint needs to start.
#[derive(Clone, Debug)]
pub struct Config {
    /// The Gateway this waypoint is (`GATEWAY_NAME`, default the pod name).
    pub gateway_name: String,
    /// Its namespace (`GATEWAY_NAMESPACE`, default `POD_NAMESPACE`).
    pub gateway_namespace: String,
    /// The GatewayClass (`GATEWAY_CLASS`, default `istio-waypoint`).
    pub gateway_class: String,
    /// The waypoint pod's name.
    pub pod_name: String,
    /// The waypoint pod's namespace.
    pub pod_namespace: String,
    /// Its service account (its SPIFFE identity's `sa`).
    pub service_account: String,
    /// Its IP.
    pub instance_ip: IpAddr,
    /// The node it runs on.
    pub node_name: String,
    /// Trust domain.
    pub trust_domain: String,
    /// Cluster id.
    pub cluster_id: String,
    /// Network (empty: default).
    pub network: String,
    /// The control plane (xDS).
    pub xds: ControlPlane,
    /// The CA.
    pub ca: ControlPlane,
    /// Requested certificate lifetime.
    pub secret_ttl: Duration,
    /// HBONE listener (15008).
    pub hbone_addr: SocketAddr,
    /// Prometheus endpoint (15020).
    pub stats_addr: SocketAddr,
    /// Readiness endpoint (15021).
    pub readiness_addr: SocketAddr,
    /// Admin endpoint (localhost:15000).
    pub admin_addr: SocketAddr,
    /// How long requests may finish after SIGTERM.
    pub drain_deadline: Duration,
    /// How long an undeclared port waits for the client's first bytes.
    pub sniff_timeout: Duration,
    /// Connect timeout to backends.
    pub connect_timeout: Duration,
    /// Data-path threads (`WAYPOINT_WORKER_THREADS`).
    pub worker_threads: usize,
    /// Log output format.
    pub log_format: LogFormat,
    /// Default log filter.
    pub log_level: String,
    /// The settings as read, for `/config_dump` (secrets masked).
    pub effective: Vec<(String, String)>,
}

const DEFAULT_TOKEN_FILE: &str = "./var/run/secrets/tokens/istio-token";
const MAX_WORKER_THREADS: usize = 1024;

/// Reads the configuration; `vars` are the process's variables (for `XDS_HEADER_*`/`CA_HEADER_*`).
pub fn from_env(
    source: &dyn EnvSource,
    vars: &BTreeMap<String, String>,
) -> Result<Config, ConfigError> {
    let mut env = EnvReader::new(source);
    let pod_name = env.string("POD_NAME", "waypoint");
    let pod_namespace = env.string("POD_NAMESPACE", "default");
    let gateway_name = env
        .optional_string("GATEWAY_NAME")
        .unwrap_or_else(|| pod_name.clone());
    let gateway_namespace = env
        .optional_string("GATEWAY_NAMESPACE")
        .unwrap_or_else(|| pod_namespace.clone());
    let gateway_class = env.string("GATEWAY_CLASS", "istio-waypoint");
    let service_account = env
        .optional_string("SERVICE_ACCOUNT")
        .unwrap_or_else(|| gateway_name.clone());
    let instance_ip = env.parse("INSTANCE_IP", IpAddr::V4(Ipv4Addr::LOCALHOST));
    let node_name = env.string("NODE_NAME", "");
    let trust_domain = env.string("TRUST_DOMAIN", "cluster.local");
    let cluster_id = env
        .optional_string("ISTIO_META_CLUSTER_ID")
        .or_else(|| env.optional_string("CLUSTER_ID"))
        .unwrap_or_else(|| "Kubernetes".to_string());
    let network = env.string("NETWORK", "");
    let in_cluster = env.optional_string("KUBERNETES_SERVICE_HOST").is_some();
    let default_xds = if in_cluster {
        "https://istiod.istio-system.svc:15012"
    } else {
        "https://localhost:15012"
    };
    let token_setting = env.secret_string("AUTH_TOKEN");
    let token = TokenSource::from_setting(token_setting.as_deref(), DEFAULT_TOKEN_FILE);
    let connect_timeout = env.duration("CONNECT_TIMEOUT", Duration::from_secs(10));
    let headers = |prefix: &str| -> Vec<(String, String)> {
        vars.iter()
            .filter_map(|(k, v)| Some((k.strip_prefix(prefix)?.to_string(), v.clone())))
            .collect()
    };
    let xds_address = env.string("XDS_ADDRESS", default_xds);
    let xds_root = env
        .optional_string("XDS_ROOT_CA")
        .map(PathBuf::from)
        .or_else(|| default_root("./var/run/secrets/istio/root-cert.pem"));
    let xds = ControlPlane {
        address: xds_address.clone(),
        root_ca: xds_root.clone(),
        server_name: env.optional_string("ALT_XDS_HOSTNAME"),
        token: token.clone(),
        cluster_id: cluster_id.clone(),
        headers: headers("XDS_HEADER_"),
        connect_timeout,
    };
    let ca = ControlPlane {
        address: env.optional_string("CA_ADDRESS").unwrap_or(xds_address),
        root_ca: env
            .optional_string("CA_ROOT_CA")
            .map(PathBuf::from)
            .or(xds_root),
        server_name: env.optional_string("ALT_CA_HOSTNAME"),
        token,
        cluster_id: cluster_id.clone(),
        headers: headers("CA_HEADER_"),
        connect_timeout,
    };
    let literal = |s: &str| s.parse::<SocketAddr>().ok();
    let hbone_addr = env.socket_addr("HBONE_ADDR", literal("[::]:15008").unwrap_or(unspecified()));
    let stats_addr = env.socket_addr("STATS_ADDR", literal("[::]:15020").unwrap_or(unspecified()));
    let readiness_addr = env.socket_addr(
        "READINESS_ADDR",
        literal("[::]:15021").unwrap_or(unspecified()),
    );
    let admin_addr = env.socket_addr(
        "ADMIN_ADDR",
        literal("127.0.0.1:15000").unwrap_or(unspecified()),
    );
    let secret_ttl = env.duration("SECRET_TTL", Duration::from_secs(24 * 3600));
    let drain_deadline = env.duration("DRAIN_DEADLINE", Duration::from_secs(5));
    let sniff_timeout = env.duration("PROTOCOL_SNIFFING_TIMEOUT", crate::sniff::SNIFF_TIMEOUT);
    let worker_threads = env.parse("WAYPOINT_WORKER_THREADS", 2usize);
    if worker_threads == 0 || worker_threads > MAX_WORKER_THREADS {
        env.invalid(
            "WAYPOINT_WORKER_THREADS",
            &worker_threads.to_string(),
            format!("a number of threads from 1 to {MAX_WORKER_THREADS}"),
        );
    }
    let log_format = env.parse("LOG_FORMAT", LogFormat::Text);
    // Like Istio's waypoints (no access log by default), successful requests are not logged
    // unless asked for (`RUST_LOG=info`); failed ones are.
    let log_level = env.string("RUST_LOG", "info,access=warn");
    let effective = env.finish()?;
    Ok(Config {
        gateway_name,
        gateway_namespace,
        gateway_class,
        pod_name,
        pod_namespace,
        service_account,
        instance_ip,
        node_name,
        trust_domain,
        cluster_id,
        network,
        xds,
        ca,
        secret_ttl,
        hbone_addr,
        stats_addr,
        readiness_addr,
        admin_addr,
        drain_deadline,
        sniff_timeout,
        connect_timeout,
        worker_threads,
        log_format,
        log_level,
        effective,
    })
}

fn unspecified() -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0)
}

fn default_root(path: &str) -> Option<PathBuf> {
    let path = PathBuf::from(path);
    path.is_file().then_some(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let env: BTreeMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        from_env(&env, &BTreeMap::new())
    }

    #[test]
    fn defaults_follow_the_pod() {
        let config = read(&[("POD_NAME", "waypoint-abc"), ("POD_NAMESPACE", "demo")]).unwrap();
        assert_eq!(config.gateway_name, "waypoint-abc");
        assert_eq!(config.gateway_namespace, "demo");
        assert_eq!(config.gateway_class, "istio-waypoint");
        assert_eq!(config.hbone_addr.port(), 15008);
        assert_eq!(config.stats_addr.port(), 15020);
        assert_eq!(config.readiness_addr.port(), 15021);
        assert!(config.admin_addr.ip().is_loopback());
    }

    #[test]
    fn every_bad_value_is_named() {
        let error = read(&[
            ("INSTANCE_IP", "not-an-ip"),
            ("WAYPOINT_WORKER_THREADS", "0"),
            ("HBONE_ADDR", "nowhere"),
        ])
        .unwrap_err()
        .to_string();
        for name in ["INSTANCE_IP", "WAYPOINT_WORKER_THREADS", "HBONE_ADDR"] {
            assert!(error.contains(name), "{name} missing from: {error}");
        }
    }
}
