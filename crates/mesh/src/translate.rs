//! Cluster objects to workload-API resources: the layer that decides what every ztunnel sees.
//! Pure: objects in, resources out, with warnings naming the objects that could not be fully
//! honoured. No Kubernetes client, no gRPC.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use ambit_proto::security as sec;
use ambit_proto::waypoint as wp;
use ambit_proto::workload as pb;

use crate::destination_rule::DestinationRule;
use crate::enrollment::enrollment;
use crate::gateway_api::{
    GATEWAY_NAME_LABEL, Gateway, GatewayClass, GrpcRoute, HttpRoute, WAYPOINT_FOR,
};
use crate::l7::WaypointScope;
use crate::objects::{
    AuthorizationPolicy, EndpointSlice, LabelSelector, Namespace, Node, Object, PeerAuthentication,
    Pod, REGION_LABEL, SUBZONE_LABEL, Service, ZONE_LABEL,
};
use crate::virtual_service::VirtualService;
use crate::warning::{Warning, WarningKind};
use crate::waypoints::{self, Waypoints};

/// Mesh-wide settings.
#[derive(Clone, Debug)]
pub struct MeshSettings {
    /// SPIFFE trust domain.
    pub trust_domain: String,
    /// Cluster id (workload uids, metrics).
    pub cluster_id: String,
    /// Service DNS suffix.
    pub domain_suffix: String,
    /// Namespace whose unselected policies apply mesh-wide.
    pub root_namespace: String,
}

impl Default for MeshSettings {
    fn default() -> Self {
        Self {
            trust_domain: "cluster.local".into(),
            cluster_id: "Kubernetes".into(),
            domain_suffix: "cluster.local".into(),
            root_namespace: "istio-system".into(),
        }
    }
}

/// The label binding a pod, service or namespace to a waypoint.
pub const USE_WAYPOINT: &str = "istio.io/use-waypoint";
/// The label naming the namespace of the waypoint `istio.io/use-waypoint` names.
pub const USE_WAYPOINT_NAMESPACE: &str = "istio.io/use-waypoint-namespace";
/// The Service/Namespace label sending ingress traffic through the waypoint too.
pub const INGRESS_USE_WAYPOINT: &str = "istio.io/ingress-use-waypoint";
/// The trust domain ztunnel assumes when a workload's is empty.
const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
/// Name of the synthesized policy enforcing STRICT PeerAuthentication.
pub const STRICT_POLICY: &str = "istio_converted_static_strict";

/// What the translation produced.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Resources {
    /// `Address` resources by name (workload uid, or `namespace/hostname`).
    pub addresses: BTreeMap<String, pb::Address>,
    /// Authorization resources by `namespace/name`.
    pub authorizations: BTreeMap<String, sec::Authorization>,
    /// Policies for waypoints (targetRefs), by `namespace/name`, passed on untouched.
    pub waypoint_policies: Vec<String>,
    /// Waypoint routes (HTTPRoutes and GRPCRoutes with a Service parent) by resource name
    /// (`<kind>/<namespace>/<name>`).
    pub routes: BTreeMap<String, wp::Route>,
    /// Policies waypoints enforce, by resource name (`<namespace>/<name>`).
    pub l7_policies: BTreeMap<String, wp::Policy>,
    /// DestinationRules of Services, as waypoints apply them, by resource name
    /// (`<namespace>/<name>`).
    pub destination_policies: BTreeMap<String, wp::DestinationPolicy>,
    /// What each usable waypoint (`<namespace>/<name>` of its Gateway) is served.
    pub waypoint_scopes: BTreeMap<String, WaypointScope>,
    /// What each AuthorizationPolicy's status conditions say (`namespace/name`).
    pub policy_status: BTreeMap<String, crate::status::PolicyFacts>,
    /// Objects honoured only partly, or not at all, and why.
    pub warnings: Vec<Warning>,
}

impl Resources {
    /// The warnings as a person reads them (`object: field: reason`), in order.
    pub fn warning_texts(&self) -> Vec<String> {
        self.warnings.iter().map(Warning::to_string).collect()
    }
}

/// Objects by kind, as the translation reads them.
#[derive(Clone, Debug, Default)]
pub struct Cluster {
    /// Namespaces by name.
    pub namespaces: BTreeMap<String, Namespace>,
    /// Pods by (namespace, name).
    pub pods: BTreeMap<(String, String), Pod>,
    /// Services by (namespace, name).
    pub services: BTreeMap<(String, String), Service>,
    /// Policies by (namespace, name).
    pub policies: BTreeMap<(String, String), AuthorizationPolicy>,
    /// PeerAuthentications by (namespace, name).
    pub peer_authentications: BTreeMap<(String, String), PeerAuthentication>,
    /// Gateways (waypoints among them) by (namespace, name).
    pub gateways: BTreeMap<(String, String), Gateway>,
    /// GatewayClasses by name.
    pub gateway_classes: BTreeMap<String, GatewayClass>,
    /// HTTPRoutes by (namespace, name), for waypoints.
    pub http_routes: BTreeMap<(String, String), HttpRoute>,
    /// GRPCRoutes by (namespace, name), for waypoints.
    pub grpc_routes: BTreeMap<(String, String), GrpcRoute>,
    /// DestinationRules by (namespace, name), for waypoints.
    pub destination_rules: BTreeMap<(String, String), DestinationRule>,
    /// VirtualServices by (namespace, name), for waypoints.
    pub virtual_services: BTreeMap<(String, String), VirtualService>,
    /// EndpointSlices by (namespace, name).
    pub endpoint_slices: BTreeMap<(String, String), EndpointSlice>,
    /// Nodes by name.
    pub nodes: BTreeMap<String, Node>,
}

impl Cluster {
    /// Collects `objects` (later ones replace earlier ones with the same key).
    pub fn from_objects(objects: impl IntoIterator<Item = Object>) -> Self {
        let mut cluster = Cluster::default();
        for object in objects {
            cluster.insert(object);
        }
        cluster
    }

    /// Adds or replaces one object. Kinds the translation does not read are ignored.
    pub fn insert(&mut self, object: Object) {
        match object {
            Object::Namespace(n) => {
                self.namespaces.insert(n.metadata.name.clone(), n);
            }
            Object::Pod(p) => {
                self.pods.insert(key(&p.metadata), p);
            }
            Object::Service(s) => {
                self.services.insert(key(&s.metadata), s);
            }
            Object::AuthorizationPolicy(p) => {
                self.policies.insert(key(&p.metadata), p);
            }
            Object::PeerAuthentication(p) => {
                self.peer_authentications.insert(key(&p.metadata), p);
            }
            Object::Gateway(g) => {
                self.gateways.insert(key(&g.metadata), g);
            }
            Object::GatewayClass(c) => {
                self.gateway_classes.insert(c.metadata.name.clone(), c);
            }
            Object::HttpRoute(r) => {
                self.http_routes.insert(key(&r.metadata), r);
            }
            Object::GrpcRoute(r) => {
                self.grpc_routes.insert(key(&r.metadata), r);
            }
            Object::DestinationRule(d) => {
                self.destination_rules.insert(key(&d.metadata), d);
            }
            Object::VirtualService(v) => {
                self.virtual_services.insert(key(&v.metadata), v);
            }
            Object::EndpointSlice(e) => {
                self.endpoint_slices.insert(key(&e.metadata), e);
            }
            Object::Node(n) => {
                self.nodes.insert(n.metadata.name.clone(), n);
            }
            Object::Other { .. } => {}
        }
    }

    /// Removes the object with this key; true if there was one.
    pub fn remove(&mut self, object: &crate::objects::ObjectKey) -> bool {
        let k = (object.namespace.clone(), object.name.clone());
        match object.kind.as_str() {
            "Namespace" => self.namespaces.remove(&object.name).is_some(),
            "Pod" => self.pods.remove(&k).is_some(),
            "Service" => self.services.remove(&k).is_some(),
            "AuthorizationPolicy" => self.policies.remove(&k).is_some(),
            "PeerAuthentication" => self.peer_authentications.remove(&k).is_some(),
            "Gateway" => self.gateways.remove(&k).is_some(),
            "GatewayClass" => self.gateway_classes.remove(&object.name).is_some(),
            "HTTPRoute" => self.http_routes.remove(&k).is_some(),
            "GRPCRoute" => self.grpc_routes.remove(&k).is_some(),
            "DestinationRule" => self.destination_rules.remove(&k).is_some(),
            "VirtualService" => self.virtual_services.remove(&k).is_some(),
            "EndpointSlice" => self.endpoint_slices.remove(&k).is_some(),
            "Node" => self.nodes.remove(&object.name).is_some(),
            _ => false,
        }
    }
}

fn key(meta: &crate::objects::ObjectMeta) -> (String, String) {
    (meta.namespace.clone(), meta.name.clone())
}

/// True when every label of `selector` is in `labels` with the same value (an empty selector
/// selects everything): how Service selectors and `matchLabels` choose pods.
pub fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

fn selector_matches(selector: &Option<LabelSelector>, labels: &BTreeMap<String, String>) -> bool {
    selector
        .as_ref()
        .is_none_or(|s| selects(&s.match_labels, labels))
}

fn ip_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

fn label<'a>(labels: &'a BTreeMap<String, String>, keys: &[&str]) -> Option<&'a str> {
    keys.iter()
        .find_map(|k| labels.get(*k).map(String::as_str))
        .filter(|v| !v.is_empty())
}

/// A Service's host name, `<name>.<namespace>.svc.<domain suffix>`.
pub fn hostname(service: &Service, settings: &MeshSettings) -> String {
    format!(
        "{}.{}.svc.{}",
        service.metadata.name, service.metadata.namespace, settings.domain_suffix
    )
}

/// Indexes computed once per translation, so that no per-pod work scans another kind.
struct Context<'a> {
    cluster: &'a Cluster,
    settings: &'a MeshSettings,
    strict: BTreeMap<(String, String), String>,
    bindings: BTreeMap<(String, String), Vec<String>>,
    waypoints: Waypoints,
    /// Services a pod backs through EndpointSlices of selector-less services.
    slice_services: HashMap<(String, String), Vec<(String, pb::PortList)>>,
}

/// Translates everything.
pub fn translate(cluster: &Cluster, settings: &MeshSettings) -> Resources {
    let mut out = Resources::default();
    let strict = strict_pods(cluster, &settings.root_namespace, &mut out.warnings);
    let bindings = selector_policy_bindings(cluster, settings);
    let waypoints = Waypoints::index(cluster);
    namespace_binding_warnings(cluster, &waypoints, &mut out.warnings);
    let (slice_services, slice_workloads) = slice_endpoints(cluster, settings);
    let context = Context {
        cluster,
        settings,
        strict,
        bindings,
        waypoints,
        slice_services,
    };
    for pod in cluster.pods.values() {
        if let Some(workload) = workload(pod, &context, &mut out.warnings) {
            out.addresses.insert(
                workload.uid.clone(),
                pb::Address {
                    r#type: Some(pb::address::Type::Workload(workload)),
                },
            );
        }
    }
    for workload in slice_workloads {
        out.addresses.insert(
            workload.uid.clone(),
            pb::Address {
                r#type: Some(pb::address::Type::Workload(workload)),
            },
        );
    }
    for service in cluster.services.values() {
        let resource = service_resource(service, &context, &mut out.warnings);
        out.addresses.insert(
            resource.resource_name(),
            pb::Address {
                r#type: Some(pb::address::Type::Service(resource)),
            },
        );
    }
    for policy in cluster.policies.values() {
        let translated = authorization(policy, settings, &mut out.warnings);
        if policy.spec.target_refs.is_empty() {
            let fact = ztunnel_fact(policy, &translated);
            out.policy_status
                .entry(format!(
                    "{}/{}",
                    policy.metadata.namespace, policy.metadata.name
                ))
                .or_default()
                .ztunnel = Some(fact);
        }
        match translated {
            Translated::Resource(resource, _) => {
                out.authorizations
                    .insert(resource.resource_name(), resource);
            }
            Translated::Waypoint => {
                out.waypoint_policies.push(format!(
                    "{}/{}",
                    policy.metadata.namespace, policy.metadata.name
                ));
            }
            Translated::Skipped => {}
        }
    }
    for ns in context.strict.values().collect::<BTreeSet<_>>() {
        let resource = strict_policy(ns);
        out.authorizations
            .insert(resource.resource_name(), resource);
    }
    crate::l7::translate(cluster, settings, &context.waypoints, &mut out);
    out
}

/// One warning per namespace whose `istio.io/use-waypoint` names no usable waypoint.
fn namespace_binding_warnings(
    cluster: &Cluster,
    waypoints: &Waypoints,
    warnings: &mut Vec<Warning>,
) {
    for (name, namespace) in &cluster.namespaces {
        let Some(binding) = waypoints::binding(&namespace.metadata.labels, name, cluster) else {
            continue;
        };
        if let Err(why) = waypoints.resolve(&binding) {
            warnings.push(Warning::new(
                why.kind,
                format!("Namespace {name}"),
                USE_WAYPOINT,
                format!("{why}; its pods and services get no waypoint from it"),
            ));
        }
    }
}

/// The waypoint of a workload or service: the label on the object (warned about when it cannot be
/// honoured) or on its namespace (already warned about once per namespace).
fn resolve_waypoint(
    labels: &BTreeMap<String, String>,
    namespace: &str,
    named: &dyn Fn() -> String,
    for_workload: bool,
    context: &Context<'_>,
    warnings: &mut Vec<Warning>,
) -> Option<pb::GatewayAddress> {
    if labels.contains_key(GATEWAY_NAME_LABEL) {
        // The waypoint's own pods and service never go through a waypoint.
        return None;
    }
    let binding = waypoints::binding(labels, namespace, context.cluster)?;
    match context.waypoints.resolve(&binding) {
        Ok(w) if (for_workload && w.for_workloads) || (!for_workload && w.for_services) => {
            Some(w.address.clone())
        }
        Ok(w) => {
            if !binding.from_namespace {
                let traffic = if for_workload { "workload" } else { "service" };
                warnings.push(Warning::new(
                    WarningKind::WaypointWrongTraffic,
                    named(),
                    USE_WAYPOINT,
                    format!(
                        "Gateway {}/{} does not take {traffic} traffic ({WAYPOINT_FOR}: {}); no waypoint",
                        binding.namespace, binding.name, w.waypoint_for
                    ),
                ));
            }
            None
        }
        Err(why) => {
            if !binding.from_namespace {
                warnings.push(Warning::new(
                    why.kind,
                    named(),
                    USE_WAYPOINT,
                    format!("{why}; no waypoint"),
                ));
            }
            None
        }
    }
}

/// Workload locality from the node's topology labels.
fn node_locality(cluster: &Cluster, node: &str) -> Option<pb::Locality> {
    let labels = &cluster.nodes.get(node)?.metadata.labels;
    let get = |k: &str| labels.get(k).cloned().unwrap_or_default();
    let locality = pb::Locality {
        region: get(REGION_LABEL),
        zone: get(ZONE_LABEL),
        subzone: get(SUBZONE_LABEL),
    };
    (locality != pb::Locality::default()).then_some(locality)
}

/// EndpointSlices of services without a selector: the services each known pod backs (by pod key),
/// and workloads for addresses that are not known pods.
#[allow(clippy::type_complexity)]
fn slice_endpoints(
    cluster: &Cluster,
    settings: &MeshSettings,
) -> (
    HashMap<(String, String), Vec<(String, pb::PortList)>>,
    Vec<pb::Workload>,
) {
    let mut pod_services: HashMap<(String, String), Vec<(String, pb::PortList)>> = HashMap::new();
    let mut workloads = Vec::new();
    for ((ns, slice_name), slice) in &cluster.endpoint_slices {
        let Some(service_name) = slice.service_name() else {
            continue;
        };
        let Some(service) = cluster
            .services
            .get(&(ns.clone(), service_name.to_string()))
        else {
            continue;
        };
        if !service.spec.selector.is_empty() {
            // Selected pods come from the selector, as upstream does.
            continue;
        }
        let service_key = format!("{ns}/{}", hostname(service, settings));
        let ports = pb::PortList {
            ports: service
                .spec
                .ports
                .iter()
                .filter_map(|sp| {
                    let endpoint_port = slice.ports.iter().find(|p| p.name == sp.name)?;
                    Some(pb::Port {
                        service_port: u32::from(sp.port),
                        target_port: endpoint_port.port.unwrap_or(u32::from(sp.port)),
                        app_protocol: 0,
                    })
                })
                .collect(),
        };
        for endpoint in &slice.endpoints {
            if let Some(target) = endpoint.target_ref.as_ref().filter(|t| t.kind == "Pod") {
                let pod_ns = if target.namespace.is_empty() {
                    ns
                } else {
                    &target.namespace
                };
                let pod_key = (pod_ns.clone(), target.name.clone());
                if cluster.pods.contains_key(&pod_key) {
                    pod_services
                        .entry(pod_key)
                        .or_default()
                        .push((service_key.clone(), ports.clone()));
                    continue;
                }
            }
            let node = endpoint.node_name.clone().unwrap_or_default();
            let locality = node_locality(cluster, &node).or_else(|| {
                endpoint.zone.as_ref().map(|zone| pb::Locality {
                    zone: zone.clone(),
                    ..Default::default()
                })
            });
            for address in &endpoint.addresses {
                let (addresses, host) = match address.parse::<IpAddr>() {
                    Ok(ip) => (vec![ip_bytes(ip)], String::new()),
                    Err(_) => (Vec::new(), address.clone()),
                };
                workloads.push(pb::Workload {
                    uid: format!(
                        "{}/discovery.k8s.io/EndpointSlice/{ns}/{slice_name}/{address}",
                        settings.cluster_id
                    ),
                    name: slice_name.clone(),
                    namespace: ns.clone(),
                    addresses,
                    hostname: host,
                    tunnel_protocol: pb::TunnelProtocol::None as i32,
                    node: node.clone(),
                    canonical_name: service_name.to_string(),
                    services: [(service_key.clone(), ports.clone())].into_iter().collect(),
                    status: if endpoint.conditions.ready == Some(false) {
                        pb::WorkloadStatus::Unhealthy
                    } else {
                        pb::WorkloadStatus::Healthy
                    } as i32,
                    cluster_id: settings.cluster_id.clone(),
                    locality: locality.clone(),
                    ..Default::default()
                });
            }
        }
    }
    (pod_services, workloads)
}

/// Pods whose effective PeerAuthentication mode is STRICT (workload > namespace > mesh), mapped
/// to their namespace; `root` is the mesh's root namespace. A pod whose mode is DISABLE gets a
/// warning (ambient treats it as PERMISSIVE). Public so that `ambitctl analyze` reads STRICT as
/// the translation does.
pub fn strict_pods(
    cluster: &Cluster,
    root: &str,
    warnings: &mut Vec<Warning>,
) -> BTreeMap<(String, String), String> {
    fn mode_of(pa: &PeerAuthentication) -> Option<&str> {
        pa.spec
            .mtls
            .as_ref()
            .map(|m| m.mode.as_str())
            .filter(|m| !m.is_empty() && *m != "UNSET")
    }
    let mesh = cluster
        .peer_authentications
        .values()
        .find(|pa| pa.metadata.namespace == root && pa.spec.selector.is_none())
        .and_then(mode_of);
    // Index by namespace once: no per-pod scan over every PeerAuthentication.
    let mut by_namespace: HashMap<&str, Vec<&PeerAuthentication>> = HashMap::new();
    for pa in cluster.peer_authentications.values() {
        by_namespace
            .entry(pa.metadata.namespace.as_str())
            .or_default()
            .push(pa);
    }
    let mut out = BTreeMap::new();
    for ((ns, name), pod) in &cluster.pods {
        let in_namespace = by_namespace.get(ns.as_str()).map_or(&[][..], Vec::as_slice);
        let namespace_mode = in_namespace
            .iter()
            .find(|pa| pa.spec.selector.is_none())
            .and_then(|pa| mode_of(pa));
        let workload_mode = in_namespace
            .iter()
            .filter(|pa| pa.spec.selector.is_some())
            .find(|pa| selector_matches(&pa.spec.selector, &pod.metadata.labels))
            .and_then(|pa| mode_of(pa));
        let mode = workload_mode
            .or(namespace_mode)
            .or(mesh)
            .unwrap_or("PERMISSIVE");
        if mode == "DISABLE" {
            warnings.push(Warning::new(
                WarningKind::MtlsDisableIgnored,
                format!("Pod {ns}/{name}"),
                "",
                "PeerAuthentication mode DISABLE is treated as PERMISSIVE in ambient mode",
            ));
        }
        if mode == "STRICT" {
            out.insert((ns.clone(), name.clone()), ns.clone());
        }
    }
    out
}

fn strict_policy(namespace: &str) -> sec::Authorization {
    sec::Authorization {
        name: STRICT_POLICY.into(),
        namespace: namespace.into(),
        scope: sec::Scope::WorkloadSelector as i32,
        action: sec::Action::Deny as i32,
        rules: vec![sec::Rule {
            clauses: vec![sec::Clause {
                matches: vec![sec::Match {
                    not_principals: vec![sec::StringMatch {
                        match_type: Some(sec::string_match::MatchType::Presence(())),
                    }],
                    ..Default::default()
                }],
            }],
        }],
        ..Default::default()
    }
}

/// Selector-scoped policies each pod is bound to (`ns/name`).
fn selector_policy_bindings(
    cluster: &Cluster,
    settings: &MeshSettings,
) -> BTreeMap<(String, String), Vec<String>> {
    let mut out: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    for policy in cluster.policies.values() {
        let Some(selector) = &policy.spec.selector else {
            continue;
        };
        if !policy.spec.target_refs.is_empty() {
            continue;
        }
        for ((ns, name), pod) in &cluster.pods {
            let in_scope = policy.metadata.namespace == *ns
                || policy.metadata.namespace == settings.root_namespace;
            if in_scope && selects(&selector.match_labels, &pod.metadata.labels) {
                out.entry((ns.clone(), name.clone()))
                    .or_default()
                    .push(format!(
                        "{}/{}",
                        policy.metadata.namespace, policy.metadata.name
                    ));
            }
        }
    }
    out
}

fn workload(pod: &Pod, context: &Context<'_>, warnings: &mut Vec<Warning>) -> Option<pb::Workload> {
    let cluster = context.cluster;
    let settings = context.settings;
    let addresses: Vec<Vec<u8>> = pod
        .ips()
        .iter()
        .filter_map(|ip| ip.parse::<IpAddr>().ok())
        .map(ip_bytes)
        .collect();
    if addresses.is_empty() || pod.spec.host_network {
        return None;
    }
    let meta = &pod.metadata;
    let ns = &meta.namespace;
    let captured = enrollment(pod, cluster.namespaces.get(ns)).is_ambient();
    let labels = &meta.labels;
    let workload_name = label(labels, &["app.kubernetes.io/name", "app"]).unwrap_or(&meta.name);
    let canonical_name = label(
        labels,
        &[
            "service.istio.io/canonical-name",
            "app.kubernetes.io/name",
            "app",
        ],
    )
    .unwrap_or(workload_name);
    let canonical_revision = label(
        labels,
        &[
            "service.istio.io/canonical-revision",
            "app.kubernetes.io/version",
            "version",
        ],
    )
    .unwrap_or("latest");
    let healthy = pod
        .status
        .conditions
        .iter()
        .find(|c| c.kind == "Ready")
        .is_none_or(|c| c.status == "True")
        && pod.status.phase != "Failed"
        && pod.status.phase != "Succeeded";
    let mut services = HashMap::new();
    // Only the pod's own namespace can select it: range over that part of the sorted map.
    let in_namespace = cluster
        .services
        .range((ns.clone(), String::new())..)
        .take_while(|((service_ns, _), _)| service_ns == ns)
        .map(|(_, service)| service);
    for service in in_namespace {
        if service.spec.selector.is_empty() || !selects(&service.spec.selector, labels) {
            continue;
        }
        let ports = service
            .spec
            .ports
            .iter()
            .map(|p| pb::Port {
                service_port: u32::from(p.port),
                target_port: u32::from(target_port(p, pod)),
                app_protocol: 0,
            })
            .collect();
        services.insert(
            format!("{ns}/{}", hostname(service, settings)),
            pb::PortList { ports },
        );
    }
    let pod_key = (ns.clone(), meta.name.clone());
    if let Some(from_slices) = context.slice_services.get(&pod_key) {
        services.extend(from_slices.iter().cloned());
    }
    let mut authorization_policies = context.bindings.get(&pod_key).cloned().unwrap_or_default();
    if context.strict.contains_key(&pod_key) {
        authorization_policies.push(format!("{ns}/{STRICT_POLICY}"));
    }
    let waypoint = if captured {
        resolve_waypoint(
            labels,
            ns,
            &|| format!("Pod {ns}/{}", meta.name),
            true,
            context,
            warnings,
        )
    } else {
        None
    };
    Some(pb::Workload {
        uid: format!("{}//Pod/{ns}/{}", settings.cluster_id, meta.name),
        name: meta.name.clone(),
        namespace: ns.clone(),
        addresses,
        tunnel_protocol: if captured {
            pb::TunnelProtocol::Hbone
        } else {
            pb::TunnelProtocol::None
        } as i32,
        // Empty means `cluster.local` and `default` to ztunnel: leave the defaults off the wire.
        trust_domain: if settings.trust_domain == DEFAULT_TRUST_DOMAIN {
            String::new()
        } else {
            settings.trust_domain.clone()
        },
        service_account: match pod.service_account() {
            "default" => String::new(),
            other => other.to_string(),
        },
        waypoint,
        node: pod.spec.node_name.clone(),
        canonical_name: canonical_name.to_string(),
        canonical_revision: canonical_revision.to_string(),
        workload_type: pb::WorkloadType::Pod as i32,
        workload_name: workload_name.to_string(),
        services,
        authorization_policies,
        status: if healthy {
            pb::WorkloadStatus::Healthy
        } else {
            pb::WorkloadStatus::Unhealthy
        } as i32,
        cluster_id: settings.cluster_id.clone(),
        locality: node_locality(cluster, &pod.spec.node_name),
        ..Default::default()
    })
}

/// The pod port a service port maps to: a number, a container port name, or the service port.
fn target_port(port: &crate::objects::ServicePort, pod: &Pod) -> u16 {
    match &port.target_port {
        Some(serde_json::Value::Number(n)) => {
            n.as_u64().and_then(|n| u16::try_from(n).ok()).unwrap_or(0)
        }
        Some(serde_json::Value::String(name)) => {
            if let Ok(number) = name.parse::<u16>() {
                return number;
            }
            pod.spec
                .containers
                .iter()
                .flat_map(|c| &c.ports)
                .find(|p| p.name == *name)
                .map(|p| p.container_port)
                .unwrap_or(0)
        }
        _ => port.port,
    }
}

fn service_resource(
    service: &Service,
    context: &Context<'_>,
    warnings: &mut Vec<Warning>,
) -> pb::Service {
    let settings = context.settings;
    let meta = &service.metadata;
    let vips: BTreeSet<&String> = std::iter::once(&service.spec.cluster_ip)
        .chain(&service.spec.cluster_ips)
        .filter(|ip| !ip.is_empty() && *ip != "None")
        .collect();
    let addresses = vips
        .into_iter()
        .filter_map(|ip| ip.parse::<IpAddr>().ok())
        .map(|ip| pb::NetworkAddress {
            network: String::new(),
            address: ip_bytes(ip),
            length: None,
        })
        .collect();
    let prefer_close = service.spec.traffic_distribution == "PreferClose"
        || meta
            .annotations
            .get("networking.istio.io/traffic-distribution")
            .is_some_and(|v| v == "PreferClose");
    let ingress_use_waypoint = match meta.labels.get(INGRESS_USE_WAYPOINT) {
        Some(value) => value == "true",
        None => context
            .cluster
            .namespaces
            .get(&meta.namespace)
            .and_then(|n| n.metadata.labels.get(INGRESS_USE_WAYPOINT))
            .is_some_and(|v| v == "true"),
    };
    use pb::load_balancing::{Mode, Scope};
    pb::Service {
        name: meta.name.clone(),
        namespace: meta.namespace.clone(),
        hostname: hostname(service, settings),
        addresses,
        ports: service
            .spec
            .ports
            .iter()
            .map(|p| pb::Port {
                service_port: u32::from(p.port),
                target_port: match &p.target_port {
                    Some(serde_json::Value::Number(n)) => n.as_u64().unwrap_or(0) as u32,
                    Some(serde_json::Value::String(s)) => s.parse::<u32>().unwrap_or(0),
                    _ => u32::from(p.port),
                },
                app_protocol: app_protocol(p) as i32,
            })
            .collect(),
        waypoint: resolve_waypoint(
            &meta.labels,
            &meta.namespace,
            &|| format!("Service {}/{}", meta.namespace, meta.name),
            false,
            context,
            warnings,
        ),
        load_balancing: prefer_close.then(|| pb::LoadBalancing {
            routing_preference: vec![
                Scope::Network as i32,
                Scope::Region as i32,
                Scope::Zone as i32,
                Scope::Subzone as i32,
            ],
            mode: Mode::Failover as i32,
            health_policy: 0,
        }),
        ingress_use_waypoint,
        ..Default::default()
    }
}

/// The protocol of a Service port, as Istio selects it: `appProtocol` first (`kubernetes.io/h2c`
/// and the Istio protocol names), else the port name's prefix before the first `-` (`http-web`),
/// both case-insensitive. Anything else, and UDP/SCTP ports, is `UNKNOWN`: the waypoint sniffs.
pub fn app_protocol(port: &crate::objects::ServicePort) -> pb::AppProtocol {
    if matches!(port.protocol.as_str(), "UDP" | "SCTP") {
        return pb::AppProtocol::Unknown;
    }
    let from_app = match port.app_protocol.to_ascii_lowercase().as_str() {
        "kubernetes.io/h2c" => Some(pb::AppProtocol::Http2),
        "kubernetes.io/ws" => Some(pb::AppProtocol::Http11),
        "kubernetes.io/wss" => Some(pb::AppProtocol::Tls),
        other => protocol_name(other),
    };
    let prefix = port.name.split('-').next().unwrap_or("");
    from_app
        .or_else(|| protocol_name(&prefix.to_ascii_lowercase()))
        .unwrap_or(pb::AppProtocol::Unknown)
}

/// One of Istio's protocol names (lower-case) as the workload API's protocol.
fn protocol_name(name: &str) -> Option<pb::AppProtocol> {
    Some(match name {
        "http" | "http_proxy" | "grpc-web" => pb::AppProtocol::Http11,
        "http2" => pb::AppProtocol::Http2,
        "grpc" => pb::AppProtocol::Grpc,
        "tcp" | "mongo" | "mysql" | "redis" => pb::AppProtocol::Tcp,
        "tls" | "https" => pb::AppProtocol::Tls,
        _ => return None,
    })
}

enum Translated {
    /// The resource ztunnel gets, and the HTTP fields it leaves out (their rules dropped from an
    /// ALLOW, enforced on their L4 parts in a DENY).
    Resource(sec::Authorization, BTreeSet<&'static str>),
    Waypoint,
    Skipped,
}

pub(crate) fn string_matches(values: &[String]) -> Vec<sec::StringMatch> {
    use sec::string_match::MatchType;
    values
        .iter()
        .map(|v| sec::StringMatch {
            match_type: Some(if v == "*" {
                MatchType::Presence(())
            } else if let Some(p) = v.strip_suffix('*') {
                MatchType::Prefix(p.to_string())
            } else if let Some(s) = v.strip_prefix('*') {
                MatchType::Suffix(s.to_string())
            } else {
                MatchType::Exact(v.clone())
            }),
        })
        .collect()
}

fn cidrs(values: &[String]) -> Vec<sec::Address> {
    values
        .iter()
        .filter_map(|v| {
            let net: ipnet::IpNet = v
                .parse()
                .or_else(|_| v.parse::<IpAddr>().map(ipnet::IpNet::from))
                .ok()?;
            Some(sec::Address {
                address: ip_bytes(net.addr()),
                length: u32::from(net.prefix_len()),
            })
        })
        .collect()
}

fn ports(values: &[String]) -> Vec<u32> {
    values.iter().filter_map(|p| p.parse().ok()).collect()
}

/// L4 conditions ztunnel can evaluate; anything else is L7.
fn when_match(condition: &crate::objects::WhenCondition) -> Option<sec::Match> {
    let mut m = sec::Match::default();
    match condition.key.as_str() {
        "source.ip" | "remote.ip" => {
            m.source_ips = cidrs(&condition.values);
            m.not_source_ips = cidrs(&condition.not_values);
        }
        "source.namespace" => {
            m.namespaces = string_matches(&condition.values);
            m.not_namespaces = string_matches(&condition.not_values);
        }
        "source.principal" => {
            m.principals = string_matches(&condition.values);
            m.not_principals = string_matches(&condition.not_values);
        }
        "destination.ip" => {
            m.destination_ips = cidrs(&condition.values);
            m.not_destination_ips = cidrs(&condition.not_values);
        }
        "destination.port" => {
            m.destination_ports = ports(&condition.values);
            m.not_destination_ports = ports(&condition.not_values);
        }
        _ => return None,
    }
    Some(m)
}

/// The `ZtunnelAccepted` condition of a policy ztunnel enforces: what [`authorization`] kept of
/// it, said the way Istio says it.
fn ztunnel_fact(policy: &AuthorizationPolicy, translated: &Translated) -> crate::status::Fact {
    use crate::status::Fact;
    let action = policy.spec.action.as_str();
    let fields = match translated {
        Translated::Resource(_, left_out) => left_out,
        Translated::Skipped | Translated::Waypoint => {
            return Fact::no(
                "UnsupportedValue",
                format!("ztunnel does not enforce action {action}; the policy is not enforced"),
            );
        }
    };
    if fields.is_empty() {
        return Fact::yes("Accepted", "attached to ztunnel");
    }
    let fields = fields.iter().copied().collect::<Vec<_>>().join(", ");
    let effect = if action == "DENY" {
        "In this DENY policy those rules are enforced on their L4 parts only, which denies more than requested."
    } else {
        "In this ALLOW policy the rules using them are left out, which allows less than requested."
    };
    Fact::yes(
        "UnsupportedValue",
        format!(
            "ztunnel does not enforce HTTP attributes (found: {fields}); in ambient mode they need a waypoint (bind the policy to one with targetRefs). {effect}"
        ),
    )
}

fn authorization(
    policy: &AuthorizationPolicy,
    settings: &MeshSettings,
    warnings: &mut Vec<Warning>,
) -> Translated {
    let meta = &policy.metadata;
    let named = format!("AuthorizationPolicy {}/{}", meta.namespace, meta.name);
    if !policy.spec.target_refs.is_empty() {
        return Translated::Waypoint;
    }
    let action = match policy.spec.action.as_str() {
        "" | "ALLOW" => sec::Action::Allow,
        "DENY" => sec::Action::Deny,
        other => {
            warnings.push(Warning::new(
                WarningKind::PolicyNotEnforced,
                &named,
                "spec.action",
                format!("{other} is not enforced by ztunnel; skipped"),
            ));
            return Translated::Skipped;
        }
    };
    let scope = if policy.spec.selector.is_some() {
        sec::Scope::WorkloadSelector
    } else if meta.namespace == settings.root_namespace {
        sec::Scope::Global
    } else {
        sec::Scope::Namespace
    };
    let mut rules = Vec::new();
    let mut left_out = BTreeSet::new();
    for (r, rule) in policy.spec.rules.iter().flatten().enumerate() {
        let mut l7 = Vec::new();
        let mut clauses = Vec::new();
        if !rule.from.is_empty() {
            let matches = rule
                .from
                .iter()
                .map(|f| {
                    let s = &f.source;
                    if !s.request_principals.is_empty() || !s.not_request_principals.is_empty() {
                        l7.push("requestPrincipals");
                    }
                    sec::Match {
                        principals: string_matches(&s.principals),
                        not_principals: string_matches(&s.not_principals),
                        namespaces: string_matches(&s.namespaces),
                        not_namespaces: string_matches(&s.not_namespaces),
                        source_ips: cidrs(
                            &[s.ip_blocks.clone(), s.remote_ip_blocks.clone()].concat(),
                        ),
                        not_source_ips: cidrs(
                            &[s.not_ip_blocks.clone(), s.not_remote_ip_blocks.clone()].concat(),
                        ),
                        ..Default::default()
                    }
                })
                .collect();
            clauses.push(sec::Clause { matches });
        }
        if !rule.to.is_empty() {
            let matches = rule
                .to
                .iter()
                .map(|t| {
                    let o = &t.operation;
                    for (field, values) in [
                        ("hosts", &o.hosts),
                        ("notHosts", &o.not_hosts),
                        ("methods", &o.methods),
                        ("notMethods", &o.not_methods),
                        ("paths", &o.paths),
                        ("notPaths", &o.not_paths),
                    ] {
                        if !values.is_empty() {
                            l7.push(field);
                        }
                    }
                    sec::Match {
                        destination_ports: ports(&o.ports),
                        not_destination_ports: ports(&o.not_ports),
                        ..Default::default()
                    }
                })
                .collect();
            clauses.push(sec::Clause { matches });
        }
        for condition in &rule.when {
            match when_match(condition) {
                Some(m) => clauses.push(sec::Clause { matches: vec![m] }),
                None => l7.push("when"),
            }
        }
        if !l7.is_empty() {
            left_out.extend(l7.iter().copied());
            if action == sec::Action::Allow {
                warnings.push(Warning::new(
                    WarningKind::L7PolicyOnZtunnel,
                    &named,
                    format!("spec.rules[{r}]"),
                    format!(
                        "uses L7 fields ({}) that need a waypoint; the rule is dropped so it allows nothing at L4",
                        l7.join(", ")
                    ),
                ));
                continue;
            }
            warnings.push(Warning::new(
                WarningKind::L7PolicyOnZtunnel,
                &named,
                format!("spec.rules[{r}]"),
                format!(
                    "uses L7 fields ({}) that need a waypoint; enforced on its L4 parts only, so it denies more",
                    l7.join(", ")
                ),
            ));
        }
        rules.push(sec::Rule { clauses });
    }
    Translated::Resource(
        sec::Authorization {
            name: meta.name.clone(),
            namespace: meta.namespace.clone(),
            scope: scope as i32,
            action: action as i32,
            rules,
            dry_run: meta
                .annotations
                .get("istio.io/dry-run")
                .is_some_and(|v| v == "true"),
            ..Default::default()
        },
        left_out,
    )
}
