//! The waypoint's settings, read from environment variables (the names ztunnel and Istio's
//! waypoint pods use where they mean the same thing). Every bad value is reported at once,
//! naming the variable and the value.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use ambit_core::config::{ConfigError, EnvReader, EnvSource};
use ambit_core::logging::LogFormat;
use ambit_xds::{ControlPlane, ControlPlaneEnv};

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
    /// Trace export and sampling ([`crate::tracing`]): `OTEL_EXPORTER_OTLP_ENDPOINT` (base URL,
    /// `/v1/traces` added) or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (full URL; unset: no
    /// tracing), `TRACE_SAMPLING` (percent of new traces, default 1), `OTEL_SERVICE_NAME`
    /// (default `<canonical service>.<namespace>`), with the span attributes Istio's proxies set.
    pub tracing: crate::tracing::TracingSettings,
    /// The settings as read, for `/config_dump` (secrets masked).
    pub effective: Vec<(String, String)>,
}

/// Istio's default trace sampling (`meshConfig.defaultConfig.tracing.sampling`), percent.
pub const DEFAULT_TRACE_SAMPLING: f64 = 1.0;

/// The node id the waypoint introduces itself with (xDS), also its spans' `node_id`.
pub fn node_id(instance_ip: IpAddr, pod_name: &str, pod_namespace: &str) -> String {
    format!("waypoint~{instance_ip}~{pod_name}.{pod_namespace}~{pod_namespace}.svc.cluster.local")
}

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
    let network = env.string("NETWORK", "");
    let control = ControlPlaneEnv::read(&mut env, vars);
    let (cluster_id, connect_timeout) = (control.cluster_id, control.connect_timeout);
    let (xds, ca) = (control.xds, control.ca);
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
    let base = env.optional_string("OTEL_EXPORTER_OTLP_ENDPOINT");
    let traces = env.optional_string("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT");
    let endpoint = match crate::tracing::endpoint(base.as_deref(), traces.as_deref()) {
        Ok(endpoint) => endpoint,
        Err(crate::tracing::TracingError::Endpoint {
            variable,
            endpoint,
            reason,
        }) => {
            env.invalid(&variable, &endpoint, reason);
            None
        }
    };
    let sampling = env.parse("TRACE_SAMPLING", DEFAULT_TRACE_SAMPLING);
    if !(0.0..=100.0).contains(&sampling) {
        env.invalid(
            "TRACE_SAMPLING",
            &sampling.to_string(),
            "a percentage from 0 to 100",
        );
    }
    let canonical_service = env.string("CANONICAL_SERVICE", &gateway_name);
    let canonical_revision = env.string("CANONICAL_REVISION", "latest");
    let mesh_id = env.string("MESH_ID", &trust_domain);
    let service_name = env.string(
        "OTEL_SERVICE_NAME",
        &format!("{canonical_service}.{pod_namespace}"),
    );
    let tracing = crate::tracing::TracingSettings {
        endpoint,
        sampling,
        service_name,
        span_attributes: vec![
            ("component".into(), "proxy".into()),
            (
                "node_id".into(),
                node_id(instance_ip, &pod_name, &pod_namespace),
            ),
            ("istio.canonical_service".into(), canonical_service),
            ("istio.canonical_revision".into(), canonical_revision),
            ("istio.mesh_id".into(), mesh_id),
            ("istio.namespace".into(), pod_namespace.clone()),
            ("istio.cluster_id".into(), control_cluster_id(&cluster_id)),
        ],
    };
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
        tracing,
        effective,
    })
}

fn control_cluster_id(cluster_id: &str) -> String {
    if cluster_id.is_empty() {
        "Kubernetes".to_string()
    } else {
        cluster_id.to_string()
    }
}

fn unspecified() -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0)
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
    fn tracing_from_the_otel_variables() {
        let config = read(&[
            ("POD_NAME", "waypoint-abc"),
            ("POD_NAMESPACE", "demo"),
            ("GATEWAY_NAME", "waypoint"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector.obs:4318"),
            ("TRACE_SAMPLING", "25"),
        ])
        .unwrap();
        let t = &config.tracing;
        assert_eq!(
            t.endpoint.as_ref().map(|u| u.to_string()).as_deref(),
            Some("http://collector.obs:4318/v1/traces")
        );
        assert_eq!(t.sampling, 25.0);
        assert_eq!(t.service_name, "waypoint.demo");
        let attr = |k: &str| {
            t.span_attributes
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.clone())
        };
        assert_eq!(attr("istio.canonical_service").as_deref(), Some("waypoint"));
        assert_eq!(attr("istio.namespace").as_deref(), Some("demo"));
        assert_eq!(attr("istio.mesh_id").as_deref(), Some("cluster.local"));
        assert_eq!(attr("component").as_deref(), Some("proxy"));
        // Off unless an endpoint is named; sampling defaults to Istio's 1%.
        let off = read(&[]).unwrap();
        assert_eq!(off.tracing.endpoint, None);
        assert_eq!(off.tracing.sampling, DEFAULT_TRACE_SAMPLING);
    }

    #[test]
    fn every_bad_value_is_named() {
        let error = read(&[
            ("INSTANCE_IP", "not-an-ip"),
            ("WAYPOINT_WORKER_THREADS", "0"),
            ("HBONE_ADDR", "nowhere"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "https://collector:4318"),
            ("TRACE_SAMPLING", "150"),
        ])
        .unwrap_err()
        .to_string();
        for name in [
            "INSTANCE_IP",
            "WAYPOINT_WORKER_THREADS",
            "HBONE_ADDR",
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "TRACE_SAMPLING",
        ] {
            assert!(error.contains(name), "{name} missing from: {error}");
        }
    }
}
