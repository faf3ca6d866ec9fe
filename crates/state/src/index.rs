//! The workload state index: every workload and service a proxy knows, validated once on
//! arrival and indexed for the lookups the data path makes per connection.
//!
//! Memory is a budget (at most 600 bytes per workload): strings that repeat across workloads
//! (namespaces, service accounts, nodes, trust domains, canonical names, service keys) are
//! interned as shared `Arc<str>`, per-workload lists are boxed slices, and the "local pods" index
//! holds only the local node's pods, so a node's state grows with what it runs rather than with
//! the cluster.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use ambit_identity::Identity;
use ambit_proto::workload as pb;
use rand::Rng as _;
use thiserror::Error;

/// A resource that could not be accepted; the message names the resource and the field.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("{kind} {name}: {field}: {reason}")]
pub struct StateError {
    /// `workload` or `service`.
    pub kind: &'static str,
    /// The resource's name (workload uid or `namespace/hostname`).
    pub name: String,
    /// The offending field.
    pub field: String,
    /// What is wrong with it.
    pub reason: String,
}

/// How other proxies (ztunnels, waypoints) reach a workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// Plain TCP to the workload's own port (not captured).
    Tcp,
    /// HBONE to the workload's :15008.
    Hbone,
}

/// Where a waypoint is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GatewayDestination {
    /// A service by namespace and hostname (istiod's preferred form).
    Hostname {
        /// Service namespace.
        namespace: Arc<str>,
        /// Service hostname.
        hostname: Arc<str>,
    },
    /// A workload address.
    Address {
        /// Network of the address.
        network: Arc<str>,
        /// The address.
        ip: IpAddr,
    },
}

/// A waypoint binding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GatewayAddress {
    /// Where the waypoint is.
    pub destination: GatewayDestination,
    /// Its HBONE port (15008).
    pub hbone_port: u16,
}

/// Region, zone and subzone.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Locality {
    /// Region.
    pub region: Arc<str>,
    /// Zone within the region.
    pub zone: Arc<str>,
    /// Subzone within the zone.
    pub subzone: Arc<str>,
}

/// (service port, target port) pairs.
pub type PortMap = Box<[(u16, u16)]>;

/// The application protocol a service port declares (Kubernetes `appProtocol`, or the port
/// name's prefix, as the control plane resolved it).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum AppProtocol {
    /// Not declared: a waypoint sniffs the protocol.
    #[default]
    Unknown,
    /// HTTP/1.1.
    Http11,
    /// HTTP/2 (cleartext when not TLS).
    Http2,
    /// gRPC (HTTP/2).
    Grpc,
    /// Opaque TCP: never sniffed (server-first protocols break otherwise).
    Tcp,
    /// TLS passed through.
    Tls,
}

impl AppProtocol {
    /// The protocol for a wire value. Values this build does not know (a newer control plane)
    /// read as [`AppProtocol::Unknown`] rather than refusing the whole service: the port still
    /// works, its traffic is sniffed.
    pub fn from_wire(value: i32) -> Self {
        match pb::AppProtocol::try_from(value) {
            Ok(pb::AppProtocol::Http11) => AppProtocol::Http11,
            Ok(pb::AppProtocol::Http2) => AppProtocol::Http2,
            Ok(pb::AppProtocol::Grpc) => AppProtocol::Grpc,
            Ok(pb::AppProtocol::Tcp) => AppProtocol::Tcp,
            Ok(pb::AppProtocol::Tls) => AppProtocol::Tls,
            Ok(pb::AppProtocol::Unknown) | Err(_) => AppProtocol::Unknown,
        }
    }
}

/// One port of a service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServicePort {
    /// The port clients dial on the service's VIPs.
    pub service_port: u16,
    /// The port on the endpoint; 0 means a named port, resolved per endpoint from its
    /// [`Workload::services`].
    pub target_port: u16,
    /// What the port speaks, when declared.
    pub app_protocol: AppProtocol,
}

/// One pod (or VM) as a proxy sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    /// Primary key.
    pub uid: Arc<str>,
    /// Pod name.
    pub name: Arc<str>,
    /// Namespace.
    pub namespace: Arc<str>,
    /// Service account (default `default`).
    pub service_account: Arc<str>,
    /// Trust domain (default `cluster.local`).
    pub trust_domain: Arc<str>,
    /// Node name.
    pub node: Arc<str>,
    /// Network (empty = default).
    pub network: Arc<str>,
    /// Cluster id.
    pub cluster_id: Arc<str>,
    /// Pod IPs.
    pub addresses: Box<[IpAddr]>,
    /// How to reach it.
    pub protocol: Protocol,
    /// Workload-addressed traffic goes through this waypoint.
    pub waypoint: Option<Box<GatewayAddress>>,
    /// `service.istio.io/canonical-name`.
    pub canonical_name: Arc<str>,
    /// `service.istio.io/canonical-revision`.
    pub canonical_revision: Arc<str>,
    /// Owning workload (e.g. the Deployment).
    pub workload_name: Arc<str>,
    /// Services this workload backs: service key → (service port, target port) pairs.
    pub services: Box<[(Arc<str>, PortMap)]>,
    /// Selector-scoped authorization policies (`namespace/name`).
    pub authorization_policies: Box<[Arc<str>]>,
    /// Ready to receive traffic.
    pub healthy: bool,
    /// Where it runs.
    pub locality: Option<Box<Locality>>,
}

impl Workload {
    /// The workload's SPIFFE identity.
    pub fn identity(&self) -> Identity {
        Identity::new(&self.trust_domain, &self.namespace, &self.service_account)
            .expect("validated when the workload was accepted")
    }

    /// The target port for `service_port` of service `key` on this workload, if it backs it.
    pub fn named_target_port(&self, key: &str, service_port: u16) -> Option<u16> {
        self.services
            .iter()
            .find(|(k, _)| &**k == key)
            .and_then(|(_, ports)| {
                ports
                    .iter()
                    .find(|(s, _)| *s == service_port)
                    .map(|(_, t)| *t)
            })
    }
}

/// Routing preference scopes, in the order a service lists them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PreferenceScope {
    /// Same region.
    Region,
    /// Same zone (and region).
    Zone,
    /// Same subzone (and zone and region).
    Subzone,
    /// Same node.
    Node,
    /// Same cluster.
    Cluster,
    /// Same network.
    Network,
}

/// How strictly a service's routing preferences apply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoadBalancingMode {
    /// Only endpoints matching every preference.
    Strict,
    /// The best-matching endpoints, falling back to worse ones.
    Failover,
    /// Connections go to the original destination (no endpoint picking).
    Passthrough,
}

/// A service's load-balancing settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadBalancing {
    /// Preferences, most important first.
    pub preferences: Box<[PreferenceScope]>,
    /// How they apply.
    pub mode: LoadBalancingMode,
    /// Also pick unhealthy endpoints.
    pub allow_unhealthy: bool,
}

/// A service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    /// Name.
    pub name: Arc<str>,
    /// Namespace.
    pub namespace: Arc<str>,
    /// FQDN.
    pub hostname: Arc<str>,
    /// `namespace/hostname`: the resource name and the key workloads use.
    pub key: Arc<str>,
    /// VIPs with their networks.
    pub vips: Box<[(Arc<str>, IpAddr)]>,
    /// The ports, in the order the service lists them.
    pub ports: Box<[ServicePort]>,
    /// Extra identities accepted for endpoints.
    pub subject_alt_names: Box<[Arc<str>]>,
    /// Service-addressed traffic goes through this waypoint.
    pub waypoint: Option<Box<GatewayAddress>>,
    /// Load-balancing preferences.
    pub load_balancing: Option<LoadBalancing>,
}

impl Service {
    /// The port clients dial as `service_port`, if the service has it.
    pub fn port(&self, service_port: u16) -> Option<&ServicePort> {
        self.ports.iter().find(|p| p.service_port == service_port)
    }
}

/// What an address resolves to.
#[derive(Clone, Debug)]
pub enum Address {
    /// A service VIP.
    Service(Arc<Service>),
    /// A workload IP.
    Workload(Arc<Workload>),
}

/// Shares repeated strings.
#[derive(Default)]
struct Interner(HashSet<Arc<str>>);

impl Interner {
    fn get(&mut self, s: &str) -> Arc<str> {
        if let Some(existing) = self.0.get(s) {
            return existing.clone();
        }
        let new: Arc<str> = Arc::from(s);
        self.0.insert(new.clone());
        new
    }

    /// Drops strings nothing else holds any more.
    fn collect_garbage(&mut self) {
        self.0.retain(|s| Arc::strong_count(s) > 1);
    }
}

/// Addresses keyed by (network, IP) without allocating on the per-connection lookup: the default
/// network (the common case) has a map keyed by IP alone.
struct NetworkMap<T> {
    default: HashMap<IpAddr, T>,
    other: HashMap<(Arc<str>, IpAddr), T>,
}

impl<T> Default for NetworkMap<T> {
    fn default() -> Self {
        NetworkMap {
            default: HashMap::new(),
            other: HashMap::new(),
        }
    }
}

impl<T> NetworkMap<T> {
    fn get(&self, network: &str, ip: IpAddr) -> Option<&T> {
        if network.is_empty() {
            self.default.get(&ip)
        } else {
            self.other.get(&(Arc::from(network), ip))
        }
    }

    fn insert(&mut self, network: &Arc<str>, ip: IpAddr, value: T) {
        if network.is_empty() {
            self.default.insert(ip, value);
        } else {
            self.other.insert((network.clone(), ip), value);
        }
    }

    /// Removes the entry if `owned` says it belongs to the one being removed.
    fn remove_if(&mut self, network: &Arc<str>, ip: IpAddr, owned: impl Fn(&T) -> bool) {
        if network.is_empty() {
            if self.default.get(&ip).is_some_and(&owned) {
                self.default.remove(&ip);
            }
        } else {
            let key = (network.clone(), ip);
            if self.other.get(&key).is_some_and(&owned) {
                self.other.remove(&key);
            }
        }
    }
}

/// Every workload and service a proxy knows, indexed for its per-connection lookups. Fed by
/// xDS (or ztunnel's local file) through [`crate::Addresses`].
pub struct StateIndex {
    local_node: Arc<str>,
    strings: Interner,
    removals_since_gc: usize,
    workloads: HashMap<Arc<str>, Arc<Workload>>,
    by_ip: NetworkMap<Arc<Workload>>,
    local: HashMap<(Arc<str>, Arc<str>), Arc<Workload>>,
    services: HashMap<Arc<str>, Arc<Service>>,
    by_vip: NetworkMap<Arc<Service>>,
    endpoints: HashMap<Arc<str>, Vec<Arc<Workload>>>,
}

impl fmt::Debug for StateIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StateIndex")
            .field("local_node", &self.local_node)
            .field("workloads", &self.workloads.len())
            .field("services", &self.services.len())
            .finish_non_exhaustive()
    }
}

fn ip_from_bytes(bytes: &[u8]) -> Option<IpAddr> {
    match bytes.len() {
        4 => Some(IpAddr::from(<[u8; 4]>::try_from(bytes).ok()?)),
        16 => Some(IpAddr::from(<[u8; 16]>::try_from(bytes).ok()?)),
        _ => None,
    }
}

fn port(value: u32) -> Option<u16> {
    u16::try_from(value).ok()
}

impl StateIndex {
    /// An empty index for a proxy on `local_node` (whose pods [`StateIndex::local_workload`]
    /// finds).
    pub fn new(local_node: &str) -> Self {
        StateIndex {
            local_node: Arc::from(local_node),
            strings: Interner::default(),
            removals_since_gc: 0,
            workloads: HashMap::new(),
            by_ip: NetworkMap::default(),
            local: HashMap::new(),
            services: HashMap::new(),
            by_vip: NetworkMap::default(),
            endpoints: HashMap::new(),
        }
    }

    fn gateway(
        &mut self,
        g: &pb::GatewayAddress,
        field: &str,
        err: &dyn Fn(String, String) -> StateError,
    ) -> Result<Box<GatewayAddress>, StateError> {
        let destination = match &g.destination {
            Some(pb::gateway_address::Destination::Hostname(h)) => GatewayDestination::Hostname {
                namespace: self.strings.get(&h.namespace),
                hostname: self.strings.get(&h.hostname),
            },
            Some(pb::gateway_address::Destination::Address(a)) => GatewayDestination::Address {
                network: self.strings.get(&a.network),
                ip: ip_from_bytes(&a.address).ok_or_else(|| {
                    err(
                        format!("{field}.address"),
                        format!("address has {} bytes, expected 4 or 16", a.address.len()),
                    )
                })?,
            },
            None => {
                return Err(err(
                    field.into(),
                    "sets neither hostname nor address".into(),
                ));
            }
        };
        let hbone_port = match g.hbone_mtls_port {
            0 => 15008,
            p => port(p).ok_or_else(|| {
                err(
                    format!("{field}.hbone_mtls_port"),
                    format!("port {p} is outside 1-65535"),
                )
            })?,
        };
        Ok(Box::new(GatewayAddress {
            destination,
            hbone_port,
        }))
    }

    fn convert_workload(&mut self, w: &pb::Workload) -> Result<Workload, StateError> {
        let err = |field: String, reason: String| StateError {
            kind: "workload",
            name: w.uid.clone(),
            field,
            reason,
        };
        if w.uid.is_empty() {
            return Err(err("uid".into(), "must not be empty".into()));
        }
        let addresses = w
            .addresses
            .iter()
            .enumerate()
            .map(|(i, a)| {
                ip_from_bytes(a).ok_or_else(|| {
                    err(
                        format!("addresses[{i}]"),
                        format!("has {} bytes, expected 4 or 16", a.len()),
                    )
                })
            })
            .collect::<Result<Box<[IpAddr]>, _>>()?;
        let protocol = match pb::TunnelProtocol::try_from(w.tunnel_protocol) {
            Ok(pb::TunnelProtocol::None) => Protocol::Tcp,
            Ok(pb::TunnelProtocol::Hbone) => Protocol::Hbone,
            Ok(pb::TunnelProtocol::LegacyIstioMtls) => {
                return Err(err(
                    "tunnel_protocol".into(),
                    "LEGACY_ISTIO_MTLS is not supported".into(),
                ));
            }
            Err(_) => {
                return Err(err(
                    "tunnel_protocol".into(),
                    format!("unknown value {}", w.tunnel_protocol),
                ));
            }
        };
        let trust_domain = if w.trust_domain.is_empty() {
            "cluster.local"
        } else {
            &w.trust_domain
        };
        let service_account = if w.service_account.is_empty() {
            "default"
        } else {
            &w.service_account
        };
        Identity::new(trust_domain, &w.namespace, service_account).map_err(|e| {
            err(
                "namespace/service_account/trust_domain".into(),
                format!("do not form a SPIFFE identity: {e}"),
            )
        })?;
        let waypoint = w
            .waypoint
            .as_ref()
            .map(|g| self.gateway(g, "waypoint", &err))
            .transpose()?;
        let mut keys: Vec<&String> = w.services.keys().collect();
        keys.sort();
        let mut services = Vec::with_capacity(keys.len());
        for key in keys {
            let ports = w.services[key]
                .ports
                .iter()
                .enumerate()
                .map(|(i, p)| match (port(p.service_port), port(p.target_port)) {
                    (Some(s), Some(t)) if s != 0 => Ok((s, t)),
                    _ => Err(err(
                        format!("services[{key}].ports[{i}]"),
                        format!(
                            "ports {} -> {} are outside 1-65535",
                            p.service_port, p.target_port
                        ),
                    )),
                })
                .collect::<Result<PortMap, _>>()?;
            if !key.contains('/') {
                return Err(err(
                    format!("services[{key}]"),
                    "key must be namespace/hostname".into(),
                ));
            }
            services.push((self.strings.get(key), ports));
        }
        let locality = w.locality.as_ref().map(|l| {
            Box::new(Locality {
                region: self.strings.get(&l.region),
                zone: self.strings.get(&l.zone),
                subzone: self.strings.get(&l.subzone),
            })
        });
        Ok(Workload {
            uid: Arc::from(w.uid.as_str()),
            name: Arc::from(w.name.as_str()),
            namespace: self.strings.get(&w.namespace),
            service_account: self.strings.get(service_account),
            trust_domain: self.strings.get(trust_domain),
            node: self.strings.get(&w.node),
            network: self.strings.get(&w.network),
            cluster_id: self.strings.get(&w.cluster_id),
            addresses,
            protocol,
            waypoint,
            canonical_name: self.strings.get(&w.canonical_name),
            canonical_revision: self.strings.get(&w.canonical_revision),
            workload_name: self.strings.get(&w.workload_name),
            services: services.into_boxed_slice(),
            authorization_policies: w
                .authorization_policies
                .iter()
                .map(|p| self.strings.get(p))
                .collect(),
            healthy: w.status == pb::WorkloadStatus::Healthy as i32,
            locality,
        })
    }

    /// Validates and inserts (or replaces) a workload.
    pub fn insert_workload(
        &mut self,
        resource: &pb::Workload,
    ) -> Result<Arc<Workload>, StateError> {
        let workload = Arc::new(self.convert_workload(resource)?);
        self.remove_workload(&workload.uid);
        for ip in workload.addresses.iter() {
            self.by_ip.insert(&workload.network, *ip, workload.clone());
        }
        if workload.node == self.local_node {
            self.local.insert(
                (workload.namespace.clone(), workload.name.clone()),
                workload.clone(),
            );
        }
        for (key, _) in workload.services.iter() {
            self.endpoints
                .entry(key.clone())
                .or_default()
                .push(workload.clone());
        }
        self.workloads
            .insert(workload.uid.clone(), workload.clone());
        Ok(workload)
    }

    /// Removes a workload by uid; returns it if it existed.
    pub fn remove_workload(&mut self, uid: &str) -> Option<Arc<Workload>> {
        let old = self.workloads.remove(uid)?;
        for ip in old.addresses.iter() {
            self.by_ip
                .remove_if(&old.network, *ip, |w| w.uid == old.uid);
        }
        let local_key = (old.namespace.clone(), old.name.clone());
        if self.local.get(&local_key).is_some_and(|w| w.uid == old.uid) {
            self.local.remove(&local_key);
        }
        for (key, _) in old.services.iter() {
            if let Some(list) = self.endpoints.get_mut(key) {
                list.retain(|w| w.uid != old.uid);
                if list.is_empty() {
                    self.endpoints.remove(key);
                }
            }
        }
        self.note_removal();
        Some(old)
    }

    fn note_removal(&mut self) {
        self.removals_since_gc += 1;
        if self.removals_since_gc > 1024 {
            self.strings.collect_garbage();
            self.removals_since_gc = 0;
        }
    }

    fn convert_service(&mut self, s: &pb::Service) -> Result<Service, StateError> {
        let key = format!("{}/{}", s.namespace, s.hostname);
        let err = |field: String, reason: String| StateError {
            kind: "service",
            name: key.clone(),
            field,
            reason,
        };
        if s.hostname.is_empty() {
            return Err(err("hostname".into(), "must not be empty".into()));
        }
        let vips = s
            .addresses
            .iter()
            .enumerate()
            .map(|(i, a)| {
                let ip = ip_from_bytes(&a.address).ok_or_else(|| {
                    err(
                        format!("addresses[{i}]"),
                        format!("has {} bytes, expected 4 or 16", a.address.len()),
                    )
                })?;
                Ok((self.strings.get(&a.network), ip))
            })
            .collect::<Result<Box<[_]>, StateError>>()?;
        let ports = s
            .ports
            .iter()
            .enumerate()
            .map(|(i, p)| match (port(p.service_port), port(p.target_port)) {
                (Some(service_port), Some(target_port)) if service_port != 0 => Ok(ServicePort {
                    service_port,
                    target_port,
                    app_protocol: AppProtocol::from_wire(p.app_protocol),
                }),
                _ => Err(err(
                    format!("ports[{i}]"),
                    format!(
                        "ports {} -> {} are outside 1-65535",
                        p.service_port, p.target_port
                    ),
                )),
            })
            .collect::<Result<Box<[_]>, _>>()?;
        let waypoint = s
            .waypoint
            .as_ref()
            .map(|g| self.gateway(g, "waypoint", &err))
            .transpose()?;
        let load_balancing = s
            .load_balancing
            .as_ref()
            .map(|lb| {
                use pb::load_balancing::{HealthPolicy, Mode, Scope};
                let preferences = lb
                    .routing_preference
                    .iter()
                    .enumerate()
                    .map(|(i, p)| match Scope::try_from(*p) {
                        Ok(Scope::Region) => Ok(PreferenceScope::Region),
                        Ok(Scope::Zone) => Ok(PreferenceScope::Zone),
                        Ok(Scope::Subzone) => Ok(PreferenceScope::Subzone),
                        Ok(Scope::Node) => Ok(PreferenceScope::Node),
                        Ok(Scope::Cluster) => Ok(PreferenceScope::Cluster),
                        Ok(Scope::Network) => Ok(PreferenceScope::Network),
                        _ => Err(err(
                            format!("load_balancing.routing_preference[{i}]"),
                            format!("unknown scope {p}"),
                        )),
                    })
                    .collect::<Result<Box<[_]>, _>>()?;
                let mode = match Mode::try_from(lb.mode) {
                    Ok(Mode::Strict) => LoadBalancingMode::Strict,
                    Ok(Mode::Failover) | Ok(Mode::UnspecifiedMode) => LoadBalancingMode::Failover,
                    Ok(Mode::Passthrough) => LoadBalancingMode::Passthrough,
                    Err(_) => {
                        return Err(err(
                            "load_balancing.mode".into(),
                            format!("unknown mode {}", lb.mode),
                        ));
                    }
                };
                Ok(LoadBalancing {
                    preferences,
                    mode,
                    allow_unhealthy: lb.health_policy == HealthPolicy::AllowAll as i32,
                })
            })
            .transpose()?;
        Ok(Service {
            name: self.strings.get(&s.name),
            namespace: self.strings.get(&s.namespace),
            hostname: self.strings.get(&s.hostname),
            key: self.strings.get(&key),
            vips,
            ports,
            subject_alt_names: s
                .subject_alt_names
                .iter()
                .map(|n| self.strings.get(n))
                .collect(),
            waypoint,
            load_balancing,
        })
    }

    /// Validates and inserts (or replaces) a service.
    pub fn insert_service(&mut self, resource: &pb::Service) -> Result<Arc<Service>, StateError> {
        let service = Arc::new(self.convert_service(resource)?);
        self.remove_service(&service.key);
        for (network, ip) in service.vips.iter() {
            self.by_vip.insert(network, *ip, service.clone());
        }
        self.services.insert(service.key.clone(), service.clone());
        Ok(service)
    }

    /// Removes a service by `namespace/hostname`; returns it if it existed.
    pub fn remove_service(&mut self, key: &str) -> Option<Arc<Service>> {
        let old = self.services.remove(key)?;
        for (network, ip) in old.vips.iter() {
            self.by_vip.remove_if(network, *ip, |s| s.key == old.key);
        }
        self.note_removal();
        Some(old)
    }

    /// Removes a resource by xDS name: a workload uid, else a `namespace/hostname` service.
    pub fn remove(&mut self, name: &str) -> bool {
        self.remove_workload(name).is_some() || self.remove_service(name).is_some()
    }

    /// A workload by uid.
    pub fn workload(&self, uid: &str) -> Option<&Arc<Workload>> {
        self.workloads.get(uid)
    }

    /// A service by `namespace/hostname`.
    pub fn service(&self, key: &str) -> Option<&Arc<Service>> {
        self.services.get(key)
    }

    /// A pod on this node by namespace and name (ZDS tells ztunnel pods by name).
    pub fn local_workload(&self, namespace: &str, name: &str) -> Option<&Arc<Workload>> {
        self.local.get(&(Arc::from(namespace), Arc::from(name)))
    }

    /// What `ip` on `network` is: a service VIP wins over a workload address.
    pub fn find_address(&self, network: &str, ip: IpAddr) -> Option<Address> {
        if let Some(s) = self.by_vip.get(network, ip) {
            return Some(Address::Service(s.clone()));
        }
        self.by_ip
            .get(network, ip)
            .map(|w| Address::Workload(w.clone()))
    }

    /// The workload that owns `ip` on `network`.
    pub fn workload_by_ip(&self, network: &str, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.by_ip.get(network, ip)
    }

    /// Number of workloads and services held.
    pub fn len(&self) -> (usize, usize) {
        (self.workloads.len(), self.services.len())
    }

    /// Every workload (for config dumps).
    pub fn workloads(&self) -> impl Iterator<Item = &Arc<Workload>> {
        self.workloads.values()
    }

    /// Every service (for config dumps).
    pub fn services(&self) -> impl Iterator<Item = &Arc<Service>> {
        self.services.values()
    }

    /// A healthy endpoint of `service`, ignoring ports and preferences (waypoints are reached on
    /// their HBONE port whatever the service lists).
    pub fn any_endpoint(&self, service: &Service) -> Option<Arc<Workload>> {
        self.endpoints
            .get(&service.key)?
            .iter()
            .find(|w| w.healthy)
            .cloned()
    }

    /// Picks an endpoint of `service` for a connection to `service_port` from `source`, honoring
    /// health, the service's routing preferences and the port mapping; a random choice among the
    /// best candidates. Returns the workload and the target port.
    ///
    /// Runs on every outbound connection to a service, so it allocates nothing: one pass finds
    /// the best preference rank present, one counts the endpoints that have it, one walks to the
    /// randomly chosen one.
    pub fn pick_endpoint(
        &self,
        service: &Service,
        service_port: u16,
        source: Option<&Workload>,
    ) -> Option<(Arc<Workload>, u16)> {
        let (endpoints, best) = self.best_endpoints(service, service_port, source, &|_| true)?;
        let count = endpoints.iter().filter(|w| best(w).is_some()).count();
        if count == 0 {
            return None;
        }
        let chosen = endpoints
            .iter()
            .filter(|w| best(w).is_some())
            .nth(rand::rng().random_range(0..count))?;
        Some((chosen.clone(), best(chosen)?))
    }

    /// Every endpoint [`pick_endpoint`](Self::pick_endpoint) would choose among, restricted to
    /// those `keep` accepts (a subset, endpoints not ejected) before the routing preferences are
    /// ranked, so a preference falls back to worse-ranked endpoints when the best are filtered
    /// out. For a proxy that applies its own load balancing (the waypoint).
    pub fn candidates(
        &self,
        service: &Service,
        service_port: u16,
        source: Option<&Workload>,
        keep: &dyn Fn(&Workload) -> bool,
    ) -> Vec<(Arc<Workload>, u16)> {
        let Some((endpoints, best)) = self.best_endpoints(service, service_port, source, keep)
        else {
            return Vec::new();
        };
        endpoints
            .iter()
            .filter_map(|w| best(w).map(|port| (w.clone(), port)))
            .collect()
    }

    /// The service's endpoints and a function giving the target port of each one that is
    /// eligible (healthy or allowed, serving the port, kept) and of the best preference rank.
    // The closure type cannot be named (no `impl Trait` in type aliases on stable).
    #[allow(clippy::type_complexity)]
    fn best_endpoints<'a>(
        &'a self,
        service: &'a Service,
        service_port: u16,
        source: Option<&'a Workload>,
        keep: &'a dyn Fn(&Workload) -> bool,
    ) -> Option<(&'a [Arc<Workload>], impl Fn(&Workload) -> Option<u16> + 'a)> {
        let declared = service.port(service_port)?.target_port;
        let allow_unhealthy = service
            .load_balancing
            .as_ref()
            .is_some_and(|lb| lb.allow_unhealthy);
        let endpoints = self.endpoints.get(&service.key)?;
        // An endpoint that can take the connection, with the port it takes it on.
        let eligible = move |w: &Workload| -> Option<u16> {
            if !(w.healthy || allow_unhealthy) || !keep(w) {
                return None;
            }
            let target = if declared != 0 {
                Some(declared)
            } else {
                w.named_target_port(&service.key, service_port)
            };
            target.filter(|t| *t != 0)
        };
        // How many of the service's preferences (in order) the endpoint shares with the source.
        let preferences = match (&service.load_balancing, source) {
            (Some(lb), Some(src)) if !lb.preferences.is_empty() => Some((lb, src)),
            _ => None,
        };
        let rank = move |w: &Workload| match preferences {
            Some((lb, src)) => shared_scopes(&lb.preferences, src, w),
            None => 0,
        };
        let wanted = match preferences {
            Some((lb, _)) if lb.mode == LoadBalancingMode::Strict => lb.preferences.len(),
            Some(_) => endpoints
                .iter()
                .filter(|w| eligible(w).is_some())
                .map(|w| rank(w))
                .max()?,
            None => 0,
        };
        let best = move |w: &Workload| eligible(w).filter(|_| rank(w) == wanted);
        Some((&endpoints[..], best))
    }
}

/// How many of `scopes`, taken in order, `a` and `b` share: the rank a Service's routing
/// preferences give an endpoint relative to its client, and (with region, zone, subzone) the
/// locality priority a waypoint's DestinationRule `localityLbSetting` gives it.
pub fn shared_scopes(scopes: &[PreferenceScope], a: &Workload, b: &Workload) -> usize {
    scopes.iter().take_while(|p| same_scope(**p, a, b)).count()
}

fn same_scope(scope: PreferenceScope, a: &Workload, b: &Workload) -> bool {
    // A workload without a locality is in the empty region, zone and subzone.
    fn field(w: &Workload, f: fn(&Locality) -> &Arc<str>) -> &str {
        w.locality.as_deref().map_or("", |l| f(l))
    }
    let region = || field(a, |l| &l.region) == field(b, |l| &l.region);
    let zone = || field(a, |l| &l.zone) == field(b, |l| &l.zone);
    let subzone = || field(a, |l| &l.subzone) == field(b, |l| &l.subzone);
    match scope {
        PreferenceScope::Region => region(),
        PreferenceScope::Zone => region() && zone(),
        PreferenceScope::Subzone => region() && zone() && subzone(),
        PreferenceScope::Node => a.node == b.node,
        PreferenceScope::Cluster => a.cluster_id == b.cluster_id,
        PreferenceScope::Network => a.network == b.network,
    }
}
