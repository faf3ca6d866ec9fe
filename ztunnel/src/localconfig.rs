//! Local-file configuration (`LOCAL_XDS_PATH`): workloads, services and policies in one YAML file,
//! for tests, the lab and running ztunnel without a control plane. The file is re-read when it
//! changes; a file that does not parse leaves the last good state serving, and a resource that
//! fails validation is rejected by name while the rest apply, exactly as with xDS.
//!
//! ```yaml
//! workloads:
//! - name: echo-1
//!   namespace: demo
//!   serviceAccount: echo
//!   addresses: [10.1.0.5]
//!   node: node-1
//!   protocol: HBONE            # or TCP (not captured)
//!   services:
//!     demo/echo.demo.svc.cluster.local: {80: 8080}
//! services:
//! - name: echo
//!   namespace: demo
//!   vips: [10.96.0.10]         # or network/ip
//!   ports: {80: 8080}
//! policies:
//! - name: allow-client
//!   namespace: demo
//!   scope: Namespace           # Global | Namespace | WorkloadSelector
//!   action: Allow              # Allow | Deny
//!   rules:                     # rules -> clauses -> matches (any rule, all clauses, any match)
//!   - - - principals: [cluster.local/ns/demo/sa/client]
//! ```

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ambit_core::drain::DrainWatcher;
use ambit_core::readiness::BlockReady;
use ambit_proto::security as sec;
use ambit_proto::workload as pb;
use ambit_xds::Rejection;
use ipnet::IpNet;
use serde::Deserialize;
use thiserror::Error;

use crate::mesh::MeshState;

/// Why the file could not be used at all.
#[derive(Debug, Error)]
pub enum LocalConfigError {
    /// The file could not be read.
    #[error("cannot read local config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The YAML does not match the expected shape.
    #[error("local config {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Location and reason, from the parser.
        message: String,
    },
    /// A value is well-formed YAML but not usable.
    #[error("local config {path}: {object}: {field}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Which object (`workload demo/echo-1`).
        object: String,
        /// Which field.
        field: String,
        /// Why.
        reason: String,
    },
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct LocalConfig {
    #[serde(default)]
    workloads: Vec<LocalWorkload>,
    #[serde(default)]
    services: Vec<LocalService>,
    #[serde(default)]
    policies: Vec<LocalPolicy>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct LocalWorkload {
    uid: Option<String>,
    name: String,
    namespace: String,
    #[serde(default = "default_sa")]
    service_account: String,
    #[serde(default)]
    trust_domain: String,
    #[serde(default)]
    addresses: Vec<String>,
    #[serde(default)]
    node: String,
    #[serde(default)]
    network: String,
    #[serde(default)]
    cluster_id: String,
    #[serde(default = "default_protocol")]
    protocol: String,
    #[serde(default)]
    canonical_name: String,
    #[serde(default)]
    canonical_revision: String,
    #[serde(default)]
    workload_name: String,
    #[serde(default)]
    services: BTreeMap<String, BTreeMap<u16, u16>>,
    #[serde(default)]
    authorization_policies: Vec<String>,
    waypoint: Option<LocalWaypoint>,
    #[serde(default = "default_true")]
    healthy: bool,
    locality: Option<LocalLocality>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct LocalLocality {
    #[serde(default)]
    region: String,
    #[serde(default)]
    zone: String,
    #[serde(default)]
    subzone: String,
}

/// A waypoint by service (`namespace/hostname`) or by address.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct LocalWaypoint {
    service: Option<String>,
    address: Option<String>,
    #[serde(default = "default_hbone_port")]
    port: u16,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct LocalService {
    name: String,
    namespace: String,
    hostname: Option<String>,
    #[serde(default)]
    vips: Vec<String>,
    #[serde(default)]
    ports: BTreeMap<u16, u16>,
    #[serde(default)]
    subject_alt_names: Vec<String>,
    waypoint: Option<LocalWaypoint>,
    load_balancing: Option<LocalLoadBalancing>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct LocalLoadBalancing {
    #[serde(default)]
    mode: String,
    #[serde(default)]
    routing_preference: Vec<String>,
    #[serde(default)]
    allow_unhealthy: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct LocalPolicy {
    name: String,
    namespace: String,
    #[serde(default = "default_scope")]
    scope: String,
    #[serde(default = "default_action")]
    action: String,
    #[serde(default)]
    dry_run: bool,
    #[serde(default)]
    rules: Vec<Vec<Vec<LocalMatch>>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct LocalMatch {
    #[serde(default)]
    namespaces: Vec<String>,
    #[serde(default)]
    not_namespaces: Vec<String>,
    #[serde(default)]
    principals: Vec<String>,
    #[serde(default)]
    not_principals: Vec<String>,
    #[serde(default)]
    source_ips: Vec<String>,
    #[serde(default)]
    not_source_ips: Vec<String>,
    #[serde(default)]
    destination_ips: Vec<String>,
    #[serde(default)]
    not_destination_ips: Vec<String>,
    #[serde(default)]
    destination_ports: Vec<u32>,
    #[serde(default)]
    not_destination_ports: Vec<u32>,
}

fn default_sa() -> String {
    "default".to_string()
}
fn default_protocol() -> String {
    "HBONE".to_string()
}
fn default_true() -> bool {
    true
}
fn default_hbone_port() -> u16 {
    15008
}
fn default_scope() -> String {
    "Namespace".to_string()
}
fn default_action() -> String {
    "Allow".to_string()
}

/// The resources one file describes, ready for [`MeshState::replace_all`].
#[derive(Debug, Default)]
pub struct LocalResources {
    /// `Address` resources by xDS name.
    pub addresses: Vec<(String, pb::Address)>,
    /// Policies by `namespace/name`.
    pub policies: Vec<(String, sec::Authorization)>,
}

struct Converter<'a> {
    path: &'a Path,
    cluster_id: &'a str,
}

impl Converter<'_> {
    fn invalid(&self, object: String, field: &str, reason: impl Into<String>) -> LocalConfigError {
        LocalConfigError::Invalid {
            path: self.path.to_path_buf(),
            object,
            field: field.to_string(),
            reason: reason.into(),
        }
    }

    fn ip(&self, object: &str, field: &str, text: &str) -> Result<Vec<u8>, LocalConfigError> {
        let ip: IpAddr = text.parse().map_err(|_| {
            self.invalid(
                object.to_string(),
                field,
                format!("{text:?} is not an IP address"),
            )
        })?;
        Ok(ip_bytes(ip))
    }

    fn waypoint(
        &self,
        object: &str,
        waypoint: &LocalWaypoint,
    ) -> Result<pb::GatewayAddress, LocalConfigError> {
        let destination = match (&waypoint.service, &waypoint.address) {
            (Some(service), None) => {
                let (namespace, hostname) = service.split_once('/').ok_or_else(|| {
                    self.invalid(
                        object.to_string(),
                        "waypoint.service",
                        format!("{service:?} is not namespace/hostname"),
                    )
                })?;
                pb::gateway_address::Destination::Hostname(pb::NamespacedHostname {
                    namespace: namespace.to_string(),
                    hostname: hostname.to_string(),
                })
            }
            (None, Some(address)) => pb::gateway_address::Destination::Address(
                self.network_address(object, "waypoint.address", address)?,
            ),
            _ => {
                return Err(self.invalid(
                    object.to_string(),
                    "waypoint",
                    "set exactly one of service or address",
                ));
            }
        };
        Ok(pb::GatewayAddress {
            destination: Some(destination),
            hbone_mtls_port: u32::from(waypoint.port),
        })
    }

    /// `ip` or `network/ip`.
    fn network_address(
        &self,
        object: &str,
        field: &str,
        text: &str,
    ) -> Result<pb::NetworkAddress, LocalConfigError> {
        let (network, ip) = match text.rsplit_once('/') {
            Some((network, ip)) => (network, ip),
            None => ("", text),
        };
        Ok(pb::NetworkAddress {
            network: network.to_string(),
            address: self.ip(object, field, ip)?,
            length: None,
        })
    }

    fn workload(&self, w: &LocalWorkload) -> Result<pb::Workload, LocalConfigError> {
        let object = format!("workload {}/{}", w.namespace, w.name);
        let tunnel_protocol = match w.protocol.to_ascii_uppercase().as_str() {
            "HBONE" => pb::TunnelProtocol::Hbone,
            "TCP" | "NONE" => pb::TunnelProtocol::None,
            _ => {
                return Err(self.invalid(
                    object,
                    "protocol",
                    format!("{:?} is not HBONE or TCP", w.protocol),
                ));
            }
        };
        let addresses = w
            .addresses
            .iter()
            .map(|a| self.ip(&object, "addresses", a))
            .collect::<Result<Vec<_>, _>>()?;
        let waypoint = w
            .waypoint
            .as_ref()
            .map(|wp| self.waypoint(&object, wp))
            .transpose()?;
        let cluster_id = if w.cluster_id.is_empty() {
            self.cluster_id.to_string()
        } else {
            w.cluster_id.clone()
        };
        Ok(pb::Workload {
            uid: w
                .uid
                .clone()
                .unwrap_or_else(|| format!("{cluster_id}//Pod/{}/{}", w.namespace, w.name)),
            name: w.name.clone(),
            namespace: w.namespace.clone(),
            addresses,
            network: w.network.clone(),
            tunnel_protocol: tunnel_protocol as i32,
            trust_domain: w.trust_domain.clone(),
            service_account: w.service_account.clone(),
            waypoint,
            node: w.node.clone(),
            canonical_name: if w.canonical_name.is_empty() {
                w.name.clone()
            } else {
                w.canonical_name.clone()
            },
            canonical_revision: if w.canonical_revision.is_empty() {
                "latest".to_string()
            } else {
                w.canonical_revision.clone()
            },
            workload_name: if w.workload_name.is_empty() {
                w.name.clone()
            } else {
                w.workload_name.clone()
            },
            services: w
                .services
                .iter()
                .map(|(key, ports)| {
                    (
                        key.clone(),
                        pb::PortList {
                            ports: ports
                                .iter()
                                .map(|(s, t)| pb::Port {
                                    service_port: u32::from(*s),
                                    target_port: u32::from(*t),
                                    app_protocol: 0,
                                })
                                .collect(),
                        },
                    )
                })
                .collect(),
            authorization_policies: w.authorization_policies.clone(),
            status: if w.healthy {
                pb::WorkloadStatus::Healthy
            } else {
                pb::WorkloadStatus::Unhealthy
            } as i32,
            cluster_id,
            locality: w.locality.as_ref().map(|l| pb::Locality {
                region: l.region.clone(),
                zone: l.zone.clone(),
                subzone: l.subzone.clone(),
            }),
            ..Default::default()
        })
    }

    fn service(&self, s: &LocalService) -> Result<pb::Service, LocalConfigError> {
        let object = format!("service {}/{}", s.namespace, s.name);
        let addresses = s
            .vips
            .iter()
            .map(|v| self.network_address(&object, "vips", v))
            .collect::<Result<Vec<_>, _>>()?;
        let waypoint = s
            .waypoint
            .as_ref()
            .map(|wp| self.waypoint(&object, wp))
            .transpose()?;
        let load_balancing = s
            .load_balancing
            .as_ref()
            .map(|lb| self.load_balancing(&object, lb))
            .transpose()?;
        Ok(pb::Service {
            name: s.name.clone(),
            namespace: s.namespace.clone(),
            hostname: s
                .hostname
                .clone()
                .unwrap_or_else(|| format!("{}.{}.svc.cluster.local", s.name, s.namespace)),
            addresses,
            ports: s
                .ports
                .iter()
                .map(|(p, t)| pb::Port {
                    service_port: u32::from(*p),
                    target_port: u32::from(*t),
                    app_protocol: 0,
                })
                .collect(),
            subject_alt_names: s.subject_alt_names.clone(),
            waypoint,
            load_balancing,
            ..Default::default()
        })
    }

    fn load_balancing(
        &self,
        object: &str,
        lb: &LocalLoadBalancing,
    ) -> Result<pb::LoadBalancing, LocalConfigError> {
        use pb::load_balancing::{HealthPolicy, Mode, Scope};
        let mode = match lb.mode.to_ascii_uppercase().as_str() {
            "" => Mode::UnspecifiedMode,
            "STRICT" => Mode::Strict,
            "FAILOVER" => Mode::Failover,
            "PASSTHROUGH" => Mode::Passthrough,
            _ => {
                return Err(self.invalid(
                    object.to_string(),
                    "loadBalancing.mode",
                    format!("{:?} is not Strict, Failover or Passthrough", lb.mode),
                ));
            }
        };
        let routing_preference = lb
            .routing_preference
            .iter()
            .map(|p| {
                Ok(match p.to_ascii_uppercase().as_str() {
                    "REGION" => Scope::Region,
                    "ZONE" => Scope::Zone,
                    "SUBZONE" => Scope::Subzone,
                    "NODE" => Scope::Node,
                    "CLUSTER" => Scope::Cluster,
                    "NETWORK" => Scope::Network,
                    _ => {
                        return Err(self.invalid(
                            object.to_string(),
                            "loadBalancing.routingPreference",
                            format!("{p:?} is not Region, Zone, Subzone, Node, Cluster or Network"),
                        ));
                    }
                } as i32)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(pb::LoadBalancing {
            routing_preference,
            mode: mode as i32,
            health_policy: if lb.allow_unhealthy {
                HealthPolicy::AllowAll
            } else {
                HealthPolicy::OnlyHealthy
            } as i32,
        })
    }

    fn policy(&self, p: &LocalPolicy) -> Result<sec::Authorization, LocalConfigError> {
        let object = format!("policy {}/{}", p.namespace, p.name);
        let scope = match p.scope.to_ascii_uppercase().as_str() {
            "GLOBAL" => sec::Scope::Global,
            "NAMESPACE" => sec::Scope::Namespace,
            "WORKLOADSELECTOR" | "WORKLOAD_SELECTOR" => sec::Scope::WorkloadSelector,
            _ => {
                return Err(self.invalid(
                    object,
                    "scope",
                    format!("{:?} is not Global, Namespace or WorkloadSelector", p.scope),
                ));
            }
        };
        let action = match p.action.to_ascii_uppercase().as_str() {
            "ALLOW" => sec::Action::Allow,
            "DENY" => sec::Action::Deny,
            _ => {
                return Err(self.invalid(
                    object,
                    "action",
                    format!("{:?} is not Allow or Deny", p.action),
                ));
            }
        };
        let mut rules = Vec::with_capacity(p.rules.len());
        for (r, clauses) in p.rules.iter().enumerate() {
            let mut out = Vec::with_capacity(clauses.len());
            for (c, matches) in clauses.iter().enumerate() {
                let matches = matches
                    .iter()
                    .enumerate()
                    .map(|(m, lm)| self.policy_match(&object, &format!("rules[{r}][{c}][{m}]"), lm))
                    .collect::<Result<Vec<_>, _>>()?;
                out.push(sec::Clause { matches });
            }
            rules.push(sec::Rule { clauses: out });
        }
        Ok(sec::Authorization {
            name: p.name.clone(),
            namespace: p.namespace.clone(),
            scope: scope as i32,
            action: action as i32,
            rules,
            dry_run: p.dry_run,
            ..Default::default()
        })
    }

    fn policy_match(
        &self,
        object: &str,
        at: &str,
        m: &LocalMatch,
    ) -> Result<sec::Match, LocalConfigError> {
        let cidrs =
            |field: &str, values: &[String]| -> Result<Vec<sec::Address>, LocalConfigError> {
                values
                    .iter()
                    .map(|v| {
                        let net: IpNet = v
                            .parse()
                            .or_else(|_| v.parse::<IpAddr>().map(IpNet::from))
                            .map_err(|_| {
                                self.invalid(
                                    object.to_string(),
                                    &format!("{at}.{field}"),
                                    format!("{v:?} is not an IP or CIDR"),
                                )
                            })?;
                        Ok(sec::Address {
                            address: ip_bytes(net.addr()),
                            length: u32::from(net.prefix_len()),
                        })
                    })
                    .collect()
            };
        Ok(sec::Match {
            namespaces: strings(&m.namespaces),
            not_namespaces: strings(&m.not_namespaces),
            principals: strings(&m.principals),
            not_principals: strings(&m.not_principals),
            source_ips: cidrs("sourceIps", &m.source_ips)?,
            not_source_ips: cidrs("notSourceIps", &m.not_source_ips)?,
            destination_ips: cidrs("destinationIps", &m.destination_ips)?,
            not_destination_ips: cidrs("notDestinationIps", &m.not_destination_ips)?,
            destination_ports: m.destination_ports.clone(),
            not_destination_ports: m.not_destination_ports.clone(),
            ..Default::default()
        })
    }
}

/// Istio string match syntax: `*` any non-empty, `x*` prefix, `*x` suffix, else exact.
fn strings(values: &[String]) -> Vec<sec::StringMatch> {
    use sec::string_match::MatchType;
    values
        .iter()
        .map(|v| {
            let match_type = if v == "*" {
                MatchType::Presence(())
            } else if let Some(prefix) = v.strip_suffix('*') {
                MatchType::Prefix(prefix.to_string())
            } else if let Some(suffix) = v.strip_prefix('*') {
                MatchType::Suffix(suffix.to_string())
            } else {
                MatchType::Exact(v.clone())
            };
            sec::StringMatch {
                match_type: Some(match_type),
            }
        })
        .collect()
}

fn ip_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

/// Parses a local config document into resources.
pub fn parse(
    path: &Path,
    text: &str,
    cluster_id: &str,
) -> Result<LocalResources, LocalConfigError> {
    let config: LocalConfig = if text.trim().is_empty() {
        LocalConfig::default()
    } else {
        serde_yaml_ng::from_str(text).map_err(|e| LocalConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?
    };
    let converter = Converter { path, cluster_id };
    let mut resources = LocalResources::default();
    for w in &config.workloads {
        let workload = converter.workload(w)?;
        resources.addresses.push((
            workload.uid.clone(),
            pb::Address {
                r#type: Some(pb::address::Type::Workload(workload)),
            },
        ));
    }
    for s in &config.services {
        let service = converter.service(s)?;
        resources.addresses.push((
            service.resource_name(),
            pb::Address {
                r#type: Some(pb::address::Type::Service(service)),
            },
        ));
    }
    for p in &config.policies {
        let policy = converter.policy(p)?;
        resources.policies.push((policy.resource_name(), policy));
    }
    Ok(resources)
}

/// Loads `path` into `state`, returning the resources the state refused.
pub fn load(
    path: &Path,
    state: &MeshState,
    cluster_id: &str,
) -> Result<Vec<Rejection>, LocalConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| LocalConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let resources = parse(path, &text, cluster_id)?;
    Ok(state.replace_all(&resources.addresses, &resources.policies))
}

/// Loads the file now, then re-reads it whenever its contents change (checked every `every`),
/// until `drain`. `ready` is released after the first successful load.
pub async fn watch(
    path: PathBuf,
    state: MeshState,
    cluster_id: String,
    every: Duration,
    ready: Option<BlockReady>,
    drain: DrainWatcher,
) {
    let mut ready = ready;
    let mut last: Option<Vec<u8>> = None;
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = drain.signaled() => return,
        }
        let Ok(bytes) = std::fs::read(&path) else {
            if last.is_none() {
                tracing::warn!(path = %path.display(), "local config not readable yet");
            }
            continue;
        };
        if last.as_ref() == Some(&bytes) {
            continue;
        }
        last = Some(bytes);
        match load(&path, &state, &cluster_id) {
            Ok(rejected) => {
                for r in &rejected {
                    tracing::warn!(path = %path.display(), resource = %r.name, reason = %r.reason, "local config resource rejected; keeping its previous version");
                }
                let (workloads, services) = state.index().len();
                tracing::info!(path = %path.display(), workloads, services, policies = state.policies().len(), "local config loaded");
                if let Some(ready) = ready.take() {
                    ready.ready();
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "local config not applied; the last good configuration keeps serving")
            }
        }
    }
}
