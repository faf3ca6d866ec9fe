//! `networking.istio.io/v1` DestinationRule: how a waypoint talks to a destination host (load
//! balancing, connection pool, outlier detection, TLS, subsets). ztunnel does not read it.

use std::collections::BTreeMap;
use std::time::Duration;

use ambit_proto::waypoint as wp;
use serde::{Deserialize, Serialize};

use crate::objects::{LabelSelector, ObjectMeta};
use crate::warning::{Warning, WarningKind};

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
    /// Locality weighting and failover.
    #[serde(default)]
    pub locality_lb_setting: Option<LocalityLbSetting>,
    /// Slow start window (duration).
    #[serde(default)]
    pub warmup_duration_secs: Option<String>,
}

/// `localityLbSetting`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct LocalityLbSetting {
    /// Traffic shares from one locality to others.
    #[serde(default)]
    pub distribute: Vec<LocalityDistribute>,
    /// Where traffic goes when a region has no healthy endpoint.
    #[serde(default)]
    pub failover: Vec<LocalityFailover>,
    /// Labels ordering failover priority.
    #[serde(default)]
    pub failover_priority: Vec<String>,
    /// On or off (absent: on).
    #[serde(default)]
    pub enabled: Option<bool>,
}

/// One `distribute` entry: from a locality (`region/zone/subzone`, `*` wildcards), percentages to
/// others (summing to 100).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct LocalityDistribute {
    /// The client locality.
    #[serde(default)]
    pub from: String,
    /// Destination locality → percent.
    #[serde(default)]
    pub to: BTreeMap<String, u32>,
}

/// One `failover` entry: from a region to another.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct LocalityFailover {
    /// The client region.
    #[serde(default)]
    pub from: String,
    /// The region to fail over to.
    #[serde(default)]
    pub to: String,
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

// ---------------------------------------------------------------------------------------------
// Translation into the waypoint's DestinationPolicy
// ---------------------------------------------------------------------------------------------

/// Defaults Istio applies to an `outlierDetection` block, written out so that the waypoint reads
/// every value from the wire: 5 consecutive 5xx, a 10 s interval, 30 s base ejection, at most 10%
/// ejected.
const OUTLIER_DEFAULT_5XX: u32 = 5;
const OUTLIER_DEFAULT_INTERVAL: Duration = Duration::from_secs(10);
const OUTLIER_DEFAULT_EJECTION: Duration = Duration::from_secs(30);
const OUTLIER_DEFAULT_MAX_EJECTION_PERCENT: u32 = 10;

/// Collects the warnings of one DestinationRule: fields that are valid but not applied.
struct Notes<'a> {
    named: &'a str,
    warnings: &'a mut Vec<Warning>,
}

impl Notes<'_> {
    fn ignored(&mut self, field: &str, why: &str) {
        self.warnings.push(Warning::new(
            WarningKind::DestinationRuleFieldIgnored,
            self.named,
            field,
            format!("{why}; ignored, the rest of the DestinationRule applies"),
        ));
    }
}

fn proto(d: Option<&str>) -> Option<prost_types::Duration> {
    d.and_then(parse_istio_duration)
        .and_then(crate::l7::proto_duration)
}

fn count(n: Option<i64>) -> u32 {
    n.map_or(0, |n| u32::try_from(n.max(0)).unwrap_or(u32::MAX))
}

/// The `failoverPriority` labels a waypoint can compare endpoints by: the topology the workload
/// API carries for every pod (region, zone, subzone, node, cluster, network).
pub const FAILOVER_PRIORITY_LABELS: [&str; 6] = [
    "topology.kubernetes.io/region",
    "topology.kubernetes.io/zone",
    "topology.istio.io/subzone",
    "kubernetes.io/hostname",
    "topology.istio.io/cluster",
    "topology.istio.io/network",
];

fn load_balancer(at: &str, lb: &LoadBalancerSettings, notes: &mut Notes<'_>) -> wp::LoadBalancer {
    use wp::load_balancer::Simple;
    let simple = match lb.simple.as_deref() {
        Some("ROUND_ROBIN") => Simple::RoundRobin,
        // LEAST_CONN is Istio's deprecated name for LEAST_REQUEST.
        Some("LEAST_REQUEST" | "LEAST_CONN") => Simple::LeastRequest,
        Some("RANDOM") => Simple::Random,
        Some("PASSTHROUGH") => Simple::Passthrough,
        _ => Simple::Unspecified,
    };
    let consistent_hash = lb.consistent_hash.as_ref().map(|hash| {
        use wp::consistent_hash::Key;
        if hash.minimum_ring_size.is_some() {
            notes.ignored(
                &format!("{at}.consistentHash.minimumRingSize"),
                "the waypoint sizes its hash ring itself",
            );
        }
        let key = if let Some(header) = &hash.http_header_name {
            Some(Key::Header(header.to_ascii_lowercase()))
        } else if let Some(cookie) = &hash.http_cookie {
            Some(Key::Cookie(cookie.name.clone()))
        } else if hash.use_source_ip == Some(true) {
            Some(Key::SourceIp(true))
        } else {
            hash.http_query_parameter_name
                .clone()
                .map(Key::QueryParameter)
        };
        wp::ConsistentHash {
            key,
            cookie_ttl: hash
                .http_cookie
                .as_ref()
                .and_then(|c| proto(c.ttl.as_deref())),
            cookie_path: hash
                .http_cookie
                .as_ref()
                .and_then(|c| c.path.clone())
                .unwrap_or_default(),
        }
    });
    let locality = lb.locality_lb_setting.as_ref().map(|l| wp::LocalityLb {
        failover: l
            .failover
            .iter()
            .map(|f| wp::locality_lb::Failover {
                from: f.from.clone(),
                to: f.to.clone(),
            })
            .collect(),
        distribute: l
            .distribute
            .iter()
            .map(|d| wp::locality_lb::Distribute {
                from: d.from.clone(),
                to: d.to.clone().into_iter().collect(),
            })
            .collect(),
        failover_priority: l.failover_priority.clone(),
        enabled: l.enabled.unwrap_or(true),
    });
    if let Some(l) = &lb.locality_lb_setting {
        for (i, label) in l.failover_priority.iter().enumerate() {
            if !FAILOVER_PRIORITY_LABELS.contains(&label.as_str()) {
                notes.ignored(
                    &format!("{at}.localityLbSetting.failoverPriority[{i}]"),
                    &format!(
                        "{label} is not a topology label the waypoint knows endpoints by ({}); this label and the ones after it",
                        FAILOVER_PRIORITY_LABELS.join(", ")
                    ),
                );
                break;
            }
        }
    }
    if lb.warmup_duration_secs.is_some() {
        notes.ignored(
            &format!("{at}.warmupDurationSecs"),
            "slow start is not supported by Ambit's waypoint",
        );
    }
    wp::LoadBalancer {
        simple: simple as i32,
        consistent_hash,
        locality,
    }
}

fn connection_pool(
    at: &str,
    pool: &ConnectionPoolSettings,
    notes: &mut Notes<'_>,
) -> wp::ConnectionPool {
    let mut out = wp::ConnectionPool::default();
    if let Some(tcp) = &pool.tcp {
        out.max_connections = count(tcp.max_connections);
        out.connect_timeout = proto(tcp.connect_timeout.as_deref());
        for (field, set) in [
            (
                "maxConnectionDuration",
                tcp.max_connection_duration.is_some(),
            ),
            ("idleTimeout", tcp.idle_timeout.is_some()),
            ("tcpKeepalive", tcp.tcp_keepalive.is_some()),
        ] {
            if set {
                notes.ignored(
                    &format!("{at}.tcp.{field}"),
                    "not supported by Ambit's waypoint",
                );
            }
        }
    }
    if let Some(http) = &pool.http {
        out.http1_max_pending_requests = count(http.http1_max_pending_requests);
        out.http2_max_requests = count(http.http2_max_requests);
        out.max_requests_per_connection = count(http.max_requests_per_connection);
        out.max_retries = count(http.max_retries);
        out.idle_timeout = proto(http.idle_timeout.as_deref());
        out.h2_upgrade = http.h2_upgrade_policy.as_deref() == Some("UPGRADE");
        for (field, set) in [
            ("useClientProtocol", http.use_client_protocol.is_some()),
            (
                "maxConcurrentStreams",
                http.max_concurrent_streams.is_some(),
            ),
        ] {
            if set {
                notes.ignored(
                    &format!("{at}.http.{field}"),
                    "not supported by Ambit's waypoint",
                );
            }
        }
    }
    out
}

fn outlier_detection(
    at: &str,
    od: &OutlierDetection,
    notes: &mut Notes<'_>,
) -> wp::OutlierDetection {
    for (field, set) in [
        (
            "consecutiveLocalOriginFailures",
            od.consecutive_local_origin_failures.is_some(),
        ),
        (
            "splitExternalLocalOriginErrors",
            od.split_external_local_origin_errors.is_some(),
        ),
    ] {
        if set {
            notes.ignored(
                &format!("{at}.{field}"),
                "not supported by Ambit's waypoint (connection failures count as gateway errors)",
            );
        }
    }
    let or = |text: &Option<String>, default: Duration| {
        text.as_deref()
            .and_then(parse_istio_duration)
            .unwrap_or(default)
    };
    let percent = |p: Option<i32>, default: u32| p.map_or(default, |p| p.clamp(0, 100) as u32);
    wp::OutlierDetection {
        consecutive_5xx_errors: od.consecutive_5xx_errors.unwrap_or(OUTLIER_DEFAULT_5XX),
        consecutive_gateway_errors: od.consecutive_gateway_errors.unwrap_or(0),
        interval: crate::l7::proto_duration(or(&od.interval, OUTLIER_DEFAULT_INTERVAL)),
        base_ejection_time: crate::l7::proto_duration(or(
            &od.base_ejection_time,
            OUTLIER_DEFAULT_EJECTION,
        )),
        max_ejection_percent: percent(
            od.max_ejection_percent,
            OUTLIER_DEFAULT_MAX_EJECTION_PERCENT,
        ),
        min_health_percent: percent(od.min_health_percent, 0),
        enabled: true,
    }
}

fn tls_note(at: &str, tls: &Option<ClientTlsSettings>, notes: &mut Notes<'_>) {
    if let Some(tls) = tls
        && !matches!(tls.mode.as_str(), "" | "DISABLE" | "ISTIO_MUTUAL")
    {
        notes.ignored(
            &format!("{at}.tls.mode"),
            &format!(
                "{} is not supported (the waypoint reaches mesh workloads over HBONE, which is mutual TLS)",
                tls.mode
            ),
        );
    }
}

fn policy(
    at: &str,
    lb: &Option<LoadBalancerSettings>,
    pool: &Option<ConnectionPoolSettings>,
    od: &Option<OutlierDetection>,
    tls: &Option<ClientTlsSettings>,
    notes: &mut Notes<'_>,
) -> wp::TrafficPolicy {
    tls_note(at, tls, notes);
    wp::TrafficPolicy {
        load_balancer: lb
            .as_ref()
            .map(|lb| load_balancer(&format!("{at}.loadBalancer"), lb, notes)),
        connection_pool: pool
            .as_ref()
            .map(|p| connection_pool(&format!("{at}.connectionPool"), p, notes)),
        outlier_detection: od
            .as_ref()
            .map(|od| outlier_detection(&format!("{at}.outlierDetection"), od, notes)),
    }
}

fn traffic_policy(at: &str, tp: &TrafficPolicy, notes: &mut Notes<'_>) -> wp::TrafficPolicy {
    policy(
        at,
        &tp.load_balancer,
        &tp.connection_pool,
        &tp.outlier_detection,
        &tp.tls,
        notes,
    )
}

/// One endpoint of the host Service: its workload uid and (for pods) its labels.
pub(crate) struct EndpointLabels<'a> {
    /// Workload uid.
    pub(crate) uid: &'a str,
    /// Pod labels (empty for endpoints that are not pods).
    pub(crate) labels: Option<&'a BTreeMap<String, String>>,
}

/// The DestinationPolicy of `rule`, whose host is the Service with Address name `service`, and
/// whose subsets select among `endpoints` (that Service's). Fields that are valid but not applied
/// are warned about; the rest applies.
pub(crate) fn destination_policy(
    rule: &DestinationRule,
    service: String,
    endpoints: &[EndpointLabels<'_>],
    warnings: &mut Vec<Warning>,
) -> wp::DestinationPolicy {
    let meta = &rule.metadata;
    let named = format!("DestinationRule {}/{}", meta.namespace, meta.name);
    let mut notes = Notes {
        named: &named,
        warnings,
    };
    if rule.spec.workload_selector.is_some() {
        notes.ignored(
            "spec.workloadSelector",
            "waypoints apply a DestinationRule to every client of the Service",
        );
    }
    let (traffic_policy_out, port_level) = match &rule.spec.traffic_policy {
        None => (None, Vec::new()),
        Some(tp) => {
            let at = "spec.trafficPolicy";
            let top = traffic_policy(at, tp, &mut notes);
            let ports = tp
                .port_level_settings
                .iter()
                .enumerate()
                .map(|(i, p)| wp::PortTrafficPolicy {
                    port: p.port.as_ref().map_or(0, |s| s.number),
                    traffic_policy: Some(policy(
                        &format!("{at}.portLevelSettings[{i}]"),
                        &p.load_balancer,
                        &p.connection_pool,
                        &p.outlier_detection,
                        &p.tls,
                        &mut notes,
                    )),
                })
                .collect();
            (Some(top), ports)
        }
    };
    let subsets = rule
        .spec
        .subsets
        .iter()
        .enumerate()
        .map(|(i, subset)| {
            let at = format!("spec.subsets[{i}].trafficPolicy");
            let traffic_policy = subset.traffic_policy.as_ref().map(|tp| {
                if !tp.port_level_settings.is_empty() {
                    notes.ignored(
                        &format!("{at}.portLevelSettings"),
                        "per-port settings of a subset are not supported",
                    );
                }
                traffic_policy(&at, tp, &mut notes)
            });
            let workloads = endpoints
                .iter()
                .filter(|e| {
                    subset.labels.is_empty()
                        || e.labels.is_some_and(|labels| {
                            subset.labels.iter().all(|(k, v)| labels.get(k) == Some(v))
                        })
                })
                .map(|e| e.uid.to_string())
                .collect();
            wp::Subset {
                name: subset.name.clone(),
                workloads,
                traffic_policy,
            }
        })
        .collect();
    wp::DestinationPolicy {
        namespace: meta.namespace.clone(),
        name: meta.name.clone(),
        service,
        traffic_policy: traffic_policy_out,
        port_level,
        subsets,
    }
}

#[cfg(test)]
mod tests {
    use crate::parse_documents;
    use crate::translate::{Cluster, MeshSettings, translate};

    #[test]
    fn failover_priority_labels_the_waypoint_cannot_compare_are_reported() {
        let text = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: wp}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: wp, namespace: shop}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
status: {addresses: [{type: Hostname, value: wp.shop.svc.cluster.local}]}
---
apiVersion: v1
kind: Service
metadata: {name: cart, namespace: shop}
spec: {clusterIP: 10.96.1.2, selector: {app: cart}, ports: [{name: http, port: 80}]}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: cart, namespace: shop}
spec:
  host: cart
  trafficPolicy:
    outlierDetection: {consecutive5xxErrors: 3}
    loadBalancer:
      localityLbSetting:
        failoverPriority: [topology.kubernetes.io/region, example.com/rack, topology.kubernetes.io/zone]
"#;
        let (objects, errors) = parse_documents(text, "test.yaml");
        assert!(errors.is_empty(), "{errors:?}");
        let r = translate(&Cluster::from_objects(objects), &MeshSettings::default());
        assert_eq!(
            r.warnings.len(),
            1,
            "only the unknown label is reported: {:?}",
            r.warnings
        );
        let warning = &r.warnings[0];
        assert_eq!(
            warning.kind,
            crate::WarningKind::DestinationRuleFieldIgnored
        );
        let warning = warning.to_string();
        assert!(
            warning
                .contains("spec.trafficPolicy.loadBalancer.localityLbSetting.failoverPriority[1]")
                && warning.contains("example.com/rack"),
            "{warning}"
        );
        // The labels are still sent: the waypoint stops at the first it cannot compare.
        let lb = r.destination_policies["shop/cart"]
            .traffic_policy
            .as_ref()
            .and_then(|t| t.load_balancer.as_ref())
            .and_then(|l| l.locality.as_ref())
            .expect("locality");
        assert_eq!(lb.failover_priority.len(), 3);
    }
}
