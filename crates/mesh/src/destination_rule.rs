//! `networking.istio.io/v1` DestinationRule: how a waypoint talks to a destination host (load
//! balancing, connection pool, outlier detection, TLS, subsets). ztunnel does not read it.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::objects::{LabelSelector, ObjectMeta};

/// A DestinationRule.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct DestinationRule {
    /// Metadata.
    pub metadata: ObjectMeta,
    /// Spec.
    #[serde(default)]
    pub spec: DestinationRuleSpec,
}

/// `DestinationRule.spec`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DestinationRuleSpec {
    /// The service host (short name, FQDN or `*.suffix`); required.
    #[serde(default)]
    pub host: String,
    /// Policy for all ports and subsets.
    #[serde(default)]
    pub traffic_policy: Option<TrafficPolicy>,
    /// Named subsets of the endpoints, by labels.
    #[serde(default)]
    pub subsets: Vec<Subset>,
    /// Namespaces that see it (`.`, `*` or names; absent: all).
    #[serde(default)]
    pub export_to: Vec<String>,
    /// Workloads it applies to (sidecar use; absent: all).
    #[serde(default)]
    pub workload_selector: Option<LabelSelector>,
}

/// A traffic policy.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TrafficPolicy {
    /// Load balancing.
    #[serde(default)]
    pub load_balancer: Option<LoadBalancerSettings>,
    /// Connection limits.
    #[serde(default)]
    pub connection_pool: Option<ConnectionPoolSettings>,
    /// Ejection of failing endpoints.
    #[serde(default)]
    pub outlier_detection: Option<OutlierDetection>,
    /// TLS towards the destination.
    #[serde(default)]
    pub tls: Option<ClientTlsSettings>,
    /// Overrides per destination port.
    #[serde(default)]
    pub port_level_settings: Vec<PortTrafficPolicy>,
}

/// A per-port override.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PortTrafficPolicy {
    /// The port.
    #[serde(default)]
    pub port: Option<PortSelector>,
    /// Load balancing.
    #[serde(default)]
    pub load_balancer: Option<LoadBalancerSettings>,
    /// Connection limits.
    #[serde(default)]
    pub connection_pool: Option<ConnectionPoolSettings>,
    /// Ejection of failing endpoints.
    #[serde(default)]
    pub outlier_detection: Option<OutlierDetection>,
    /// TLS towards the destination.
    #[serde(default)]
    pub tls: Option<ClientTlsSettings>,
}

/// A port by number.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct PortSelector {
    /// Port number.
    #[serde(default)]
    pub number: u32,
}

/// `loadBalancer`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LoadBalancerSettings {
    /// `UNSPECIFIED`, `RANDOM`, `PASSTHROUGH`, `ROUND_ROBIN`, `LEAST_REQUEST`, `LEAST_CONN`.
    #[serde(default)]
    pub simple: Option<String>,
    /// Session affinity by hash.
    #[serde(default)]
    pub consistent_hash: Option<ConsistentHash>,
    /// Locality weighting and failover, kept as given.
    #[serde(default)]
    pub locality_lb_setting: Option<serde_json::Value>,
    /// Slow start window (duration).
    #[serde(default)]
    pub warmup_duration_secs: Option<String>,
}

/// `consistentHash`: exactly one key source.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ConsistentHash {
    /// Hash on this header.
    #[serde(default)]
    pub http_header_name: Option<String>,
    /// Hash on this cookie.
    #[serde(default)]
    pub http_cookie: Option<HttpCookie>,
    /// Hash on the source IP.
    #[serde(default, rename = "useSourceIp")]
    pub use_source_ip: Option<bool>,
    /// Hash on this query parameter.
    #[serde(default)]
    pub http_query_parameter_name: Option<String>,
    /// Ring size.
    #[serde(default)]
    pub minimum_ring_size: Option<u64>,
}

/// A hash cookie.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct HttpCookie {
    /// Name.
    #[serde(default)]
    pub name: String,
    /// Path.
    #[serde(default)]
    pub path: Option<String>,
    /// Lifetime (duration); generates the cookie when set.
    #[serde(default)]
    pub ttl: Option<String>,
}

/// `connectionPool`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct ConnectionPoolSettings {
    /// TCP limits.
    #[serde(default)]
    pub tcp: Option<TcpSettings>,
    /// HTTP limits.
    #[serde(default)]
    pub http: Option<HttpSettings>,
}

/// `connectionPool.tcp`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct TcpSettings {
    /// Maximum connections to the destination.
    #[serde(default)]
    pub max_connections: Option<i64>,
    /// Connect timeout (duration).
    #[serde(default)]
    pub connect_timeout: Option<String>,
    /// Maximum connection lifetime (duration).
    #[serde(default)]
    pub max_connection_duration: Option<String>,
    /// Idle timeout (duration).
    #[serde(default)]
    pub idle_timeout: Option<String>,
    /// Keepalive.
    #[serde(default)]
    pub tcp_keepalive: Option<TcpKeepalive>,
}

/// `tcp.tcpKeepalive`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct TcpKeepalive {
    /// Probes before the connection is dead.
    #[serde(default)]
    pub probes: Option<u32>,
    /// Idle time before probing (duration).
    #[serde(default)]
    pub time: Option<String>,
    /// Probe interval (duration).
    #[serde(default)]
    pub interval: Option<String>,
}

/// `connectionPool.http`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct HttpSettings {
    /// Queued requests waiting for a connection.
    #[serde(default)]
    pub http1_max_pending_requests: Option<i64>,
    /// Concurrent requests.
    #[serde(default)]
    pub http2_max_requests: Option<i64>,
    /// Requests per connection (1 disables keepalive).
    #[serde(default)]
    pub max_requests_per_connection: Option<i64>,
    /// Concurrent retries.
    #[serde(default)]
    pub max_retries: Option<i64>,
    /// Idle timeout (duration).
    #[serde(default)]
    pub idle_timeout: Option<String>,
    /// `DEFAULT`, `DO_NOT_UPGRADE` or `UPGRADE`.
    #[serde(default)]
    pub h2_upgrade_policy: Option<String>,
    /// Keep the client's protocol.
    #[serde(default)]
    pub use_client_protocol: Option<bool>,
    /// Concurrent HTTP/2 streams per connection.
    #[serde(default)]
    pub max_concurrent_streams: Option<i64>,
}

/// `outlierDetection`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct OutlierDetection {
    /// 5xx answers in a row before ejection.
    #[serde(default, rename = "consecutive5xxErrors")]
    pub consecutive_5xx_errors: Option<u32>,
    /// 502/503/504 in a row before ejection.
    #[serde(default)]
    pub consecutive_gateway_errors: Option<u32>,
    /// Locally originated failures in a row before ejection.
    #[serde(default)]
    pub consecutive_local_origin_failures: Option<u32>,
    /// Treat local-origin failures separately.
    #[serde(default)]
    pub split_external_local_origin_errors: Option<bool>,
    /// Sweep interval (duration).
    #[serde(default)]
    pub interval: Option<String>,
    /// Minimum ejection time (duration).
    #[serde(default)]
    pub base_ejection_time: Option<String>,
    /// Cap on ejected endpoints, percent.
    #[serde(default)]
    pub max_ejection_percent: Option<i32>,
    /// Disable ejection below this healthy percentage.
    #[serde(default)]
    pub min_health_percent: Option<i32>,
}

/// `tls` towards the destination.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ClientTlsSettings {
    /// `DISABLE`, `SIMPLE`, `MUTUAL` or `ISTIO_MUTUAL`.
    #[serde(default)]
    pub mode: String,
    /// Client certificate file (MUTUAL).
    #[serde(default)]
    pub client_certificate: Option<String>,
    /// Client key file (MUTUAL).
    #[serde(default)]
    pub private_key: Option<String>,
    /// CA file.
    #[serde(default)]
    pub ca_certificates: Option<String>,
    /// Secret holding the credentials.
    #[serde(default)]
    pub credential_name: Option<String>,
    /// Accepted server SANs.
    #[serde(default)]
    pub subject_alt_names: Vec<String>,
    /// SNI to send.
    #[serde(default)]
    pub sni: Option<String>,
    /// Skip server verification.
    #[serde(default)]
    pub insecure_skip_verify: Option<bool>,
}

/// A named subset.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Subset {
    /// Name (used by routes).
    #[serde(default)]
    pub name: String,
    /// Endpoint labels selecting the subset.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Policy overriding the rule's for this subset.
    #[serde(default)]
    pub traffic_policy: Option<TrafficPolicy>,
}

/// Parses an Istio duration as Go writes them: one or more `<decimal><unit>` parts with units
/// `ns`, `us`, `µs`, `ms`, `s`, `m`, `h` (e.g. `30ms`, `1.5s`, `1h30m`).
pub fn parse_istio_duration(text: &str) -> Option<Duration> {
    let mut rest = text;
    let mut total = 0f64;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let number: f64 = rest[..number_len].parse().ok()?;
        rest = &rest[number_len..];
        let units: [(&str, f64); 7] = [
            ("ns", 1e-9),
            ("us", 1e-6),
            ("µs", 1e-6),
            ("ms", 1e-3),
            ("s", 1.0),
            ("m", 60.0),
            ("h", 3600.0),
        ];
        let (unit, scale) = units.iter().find(|(u, _)| rest.starts_with(u))?;
        rest = &rest[unit.len()..];
        total += number * scale;
    }
    (total.is_finite() && total < 1e12).then(|| Duration::from_secs_f64(total))
}
