//! The walk: build what the control plane serves, then follow one flow through the decisions the
//! proxies make, calling their code for each.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use ambit_authz::{ConnectionContext, Decision, Policy, PolicyStore, Subject};
use ambit_identity::Identity;
use ambit_mesh::Pod;
use ambit_mesh::enrollment::enrollment;
use ambit_mesh::gateway_api::GATEWAY_NAME_LABEL;
use ambit_mesh::translate::{
    Cluster, MeshSettings, Resources, STRICT_POLICY, USE_WAYPOINT, translate,
};
use ambit_mesh::waypoints::{self, Waypoints};
use ambit_state::route::{Route, RouteError, describe_waypoint, is_waypoint_itself, route};
use ambit_state::{
    Address, AppProtocol, GatewayAddress, GatewayDestination, Protocol, Service, StateIndex,
    Workload,
};
use waypoint::filters::{Applied, apply_request, request_host};
use waypoint::proxy::{PortProtocol, is_grpc, policy_targets, port_protocol};
use waypoint::routes::{Decision as RouteDecision, RequestView, RouteTable};
use waypoint::traffic::{ChooseError, Destinations};

use crate::report::{
    Backend, Destination, Endpoint, Explanation, FlowSummary, Header, Hop, HopKind, LabelRef,
    Outcome, PathKind, PolicyRef, PolicyVerdict, RouteStep, ServiceInfo, Source, Verdict,
    WaypointStep,
};
use crate::{ExplainError, Flow};

/// The network every translated address is on.
const NETWORK: &str = "";
/// The HBONE port ztunnels and waypoints listen on.
const HBONE_PORT: u16 = 15008;

/// Explains `flow` over the objects of `cluster`, translated with `settings` as istiod-lite
/// translates them.
pub fn explain(
    cluster: &Cluster,
    settings: &MeshSettings,
    flow: &Flow,
) -> Result<Explanation, ExplainError> {
    let (namespace, name) = flow
        .from
        .split_once('/')
        .filter(|(ns, pod)| !ns.is_empty() && !pod.is_empty() && !pod.contains('/'))
        .ok_or_else(|| ExplainError::From(flow.from.clone()))?;
    let pod = cluster
        .pods
        .get(&(namespace.to_string(), name.to_string()))
        .ok_or_else(|| ExplainError::UnknownPod {
            namespace: namespace.to_string(),
            name: name.to_string(),
        })?;
    let (host, port) = split_host_port(&flow.to)?;
    let (ip, resolved) = resolve_host(cluster, settings, &host, namespace)?;
    let mesh = Mesh::build(cluster, settings, &pod.spec.node_name);
    let walk = Walk {
        mesh: &mesh,
        flow,
        pod,
        host,
        dst: SocketAddr::new(ip, port),
    };
    walk.run(resolved)
}

/// `host:port`, `ip:port` or `[v6]:port`.
fn split_host_port(to: &str) -> Result<(String, u16), ExplainError> {
    let bad = |reason: &str| ExplainError::To {
        to: to.to_string(),
        reason: reason.to_string(),
    };
    let (host, port) = if let Some(rest) = to.strip_prefix('[') {
        rest.split_once("]:")
            .ok_or_else(|| bad("expected [<IPv6>]:<port>"))?
    } else {
        to.rsplit_once(':')
            .ok_or_else(|| bad("expected <host>:<port> or <ip>:<port>"))?
    };
    if host.is_empty() {
        return Err(bad("the host is empty"));
    }
    let port = port
        .parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| bad("the port is not a number in 1-65535"))?;
    Ok((host.to_string(), port))
}

/// The IP a pod in `namespace` connects to for `host`, and how it was found: an IP as is, a
/// name as Kubernetes DNS answers it (search path `<ns>.svc.<domain>`, `svc.<domain>`).
fn resolve_host(
    cluster: &Cluster,
    settings: &MeshSettings,
    host: &str,
    namespace: &str,
) -> Result<(IpAddr, String), ExplainError> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok((ip, "an IP address".to_string()));
    }
    let trimmed = host.trim_end_matches('.').to_ascii_lowercase();
    let parts: Vec<&str> = trimmed.split('.').collect();
    let suffix = format!("svc.{}", settings.domain_suffix);
    let (service_ns, name, how) = match parts.as_slice() {
        [name] => (
            namespace,
            *name,
            "the Service's short name, in the source's namespace",
        ),
        [name, ns] => (*ns, *name, "<service>.<namespace>"),
        [name, ns, "svc"] => (*ns, *name, "<service>.<namespace>.svc"),
        [name, ns, rest @ ..] if rest.join(".") == suffix => (*ns, *name, "the Service's FQDN"),
        _ => {
            return Err(ExplainError::UnknownHost {
                host: host.to_string(),
                namespace: namespace.to_string(),
                name: trimmed.clone(),
            });
        }
    };
    let unknown = || ExplainError::UnknownHost {
        host: host.to_string(),
        namespace: service_ns.to_string(),
        name: name.to_string(),
    };
    let service = cluster
        .services
        .get(&(service_ns.to_string(), name.to_string()))
        .ok_or_else(unknown)?;
    let vip = std::iter::once(&service.spec.cluster_ip)
        .chain(&service.spec.cluster_ips)
        .find_map(|ip| ip.parse::<IpAddr>().ok())
        .ok_or_else(|| ExplainError::Headless {
            host: host.to_string(),
            namespace: service_ns.to_string(),
            name: name.to_string(),
        })?;
    Ok((
        vip,
        format!("{how}: Service {service_ns}/{name}, VIP {vip}"),
    ))
}

/// What the control plane serves, indexed as the proxies index it.
struct Mesh<'a> {
    cluster: &'a Cluster,
    settings: &'a MeshSettings,
    resources: Resources,
    index: StateIndex,
    /// L4 policies, as ztunnel holds them.
    l4: PolicyStore,
    /// Resources a proxy would refuse.
    refused: Vec<String>,
    waypoints: Waypoints,
}

impl<'a> Mesh<'a> {
    fn build(cluster: &'a Cluster, settings: &'a MeshSettings, node: &str) -> Self {
        let resources = translate(cluster, settings);
        let mut refused = Vec::new();
        let mut index = StateIndex::new(node);
        for (name, address) in &resources.addresses {
            if let Err(e) = ambit_state::insert_address(&mut index, name, address) {
                refused.push(format!("address {name}: {e}"));
            }
        }
        let mut l4 = PolicyStore::new();
        for (name, resource) in &resources.authorizations {
            match Policy::from_proto(resource) {
                Ok(policy) => l4.insert(policy),
                Err(e) => refused.push(format!("authorization {name}: {e}")),
            }
        }
        Mesh {
            cluster,
            settings,
            resources,
            index,
            l4,
            refused,
            waypoints: Waypoints::index(cluster),
        }
    }

    /// The routes, policies and destination rules the waypoint of Gateway `key` is served, as
    /// it compiles them.
    fn waypoint_config(&self, key: &str) -> (WaypointConfig, Vec<String>) {
        let mut problems = Vec::new();
        let scope = self.resources.waypoint_scopes.get(key);
        let routes = scope
            .into_iter()
            .flat_map(|s| &s.routes)
            .filter_map(|name| self.resources.routes.get(name));
        let (routes, errors) = RouteTable::build(routes);
        for e in errors {
            problems.push(format!(
                "{}: {} (the waypoint refuses this route)",
                e.route, e.reason
            ));
        }
        let mut policies = PolicyStore::new();
        for name in scope.into_iter().flat_map(|s| &s.policies) {
            if let Some(resource) = self.resources.l7_policies.get(name) {
                match Policy::from_waypoint(resource) {
                    Ok(policy) => policies.insert(policy),
                    Err(e) => problems.push(format!("{name}: {e} (the waypoint refuses it)")),
                }
            }
        }
        let destinations = Destinations::build(
            scope
                .into_iter()
                .flat_map(|s| &s.destination_policies)
                .filter_map(|name| self.resources.destination_policies.get(name)),
        );
        (
            WaypointConfig {
                routes,
                policies,
                destinations,
            },
            problems,
        )
    }

    fn pod(&self, namespace: &str, name: &str) -> Option<&'a Pod> {
        self.cluster
            .pods
            .get(&(namespace.to_string(), name.to_string()))
    }

    /// The Gateway (`namespace`, `name`) whose status addresses are `waypoint`.
    fn gateway_of(&self, waypoint: &GatewayAddress) -> Option<(String, String)> {
        self.cluster
            .gateways
            .iter()
            .find(|((ns, _), gateway)| {
                gateway
                    .status
                    .addresses
                    .iter()
                    .any(|a| match &waypoint.destination {
                        GatewayDestination::Hostname {
                            namespace,
                            hostname,
                        } => **namespace == **ns && a.value == **hostname,
                        GatewayDestination::Address { ip, .. } => {
                            a.value.parse::<IpAddr>().ok() == Some(*ip)
                        }
                    })
            })
            .map(|(key, _)| key.clone())
    }

    /// How `istio.io/use-waypoint` reads for an object (`named`, with `labels`, in `namespace`)
    /// for service or workload traffic, in the translation's own terms.
    fn binding(
        &self,
        named: &str,
        labels: &BTreeMap<String, String>,
        namespace: &str,
        for_workload: bool,
    ) -> BindingInfo {
        let traffic = if for_workload { "workload" } else { "service" };
        let mut info = BindingInfo::default();
        if labels.contains_key(GATEWAY_NAME_LABEL) {
            info.text = format!("{named} belongs to a waypoint; it is never bound to one");
            return info;
        }
        let namespace_labels = self
            .cluster
            .namespaces
            .get(namespace)
            .map(|n| &n.metadata.labels);
        let Some(binding) = waypoints::binding(labels, namespace, self.cluster) else {
            let own = labels.get(USE_WAYPOINT);
            let from_namespace = namespace_labels.and_then(|l| l.get(USE_WAYPOINT));
            info.text = match (own, from_namespace) {
                (Some(value), _) => {
                    info.label = Some(label(named, value));
                    format!("{USE_WAYPOINT}={value:?} on {named} opts out of any waypoint")
                }
                (None, Some(value)) => {
                    info.label = Some(label(&format!("Namespace {namespace}"), value));
                    format!(
                        "{USE_WAYPOINT}={value:?} on Namespace {namespace} opts out of any waypoint"
                    )
                }
                (None, None) => {
                    format!("neither {named} nor Namespace {namespace} has {USE_WAYPOINT}")
                }
            };
            return info;
        };
        let (on, value) = if binding.from_namespace {
            (
                format!("Namespace {namespace}"),
                namespace_labels.and_then(|l| l.get(USE_WAYPOINT)),
            )
        } else {
            (named.to_string(), labels.get(USE_WAYPOINT))
        };
        let value = value.cloned().unwrap_or_default();
        info.label = Some(label(&on, &value));
        let gateway = format!("{}/{}", binding.namespace, binding.name);
        info.gateway = Some(gateway.clone());
        info.text = match self.waypoints.resolve(&binding) {
            Ok(w) => {
                info.waypoint_for = Some(w.waypoint_for.clone());
                info.takes = if for_workload {
                    w.for_workloads
                } else {
                    w.for_services
                };
                let takes = if info.takes { "takes" } else { "does not take" };
                format!(
                    "{USE_WAYPOINT}={value} on {on} names Gateway {gateway}, which {takes} {traffic} traffic (istio.io/waypoint-for: {})",
                    w.waypoint_for
                )
            }
            Err(why) => {
                format!(
                    "{USE_WAYPOINT}={value} on {on} names Gateway {gateway}, which is not a usable waypoint: {why}"
                )
            }
        };
        info
    }
}

fn label(object: &str, value: &str) -> LabelRef {
    LabelRef {
        object: object.to_string(),
        key: USE_WAYPOINT.to_string(),
        value: value.to_string(),
    }
}

/// What one `istio.io/use-waypoint` binding says.
#[derive(Default)]
struct BindingInfo {
    label: Option<LabelRef>,
    gateway: Option<String>,
    waypoint_for: Option<String>,
    /// The waypoint takes this kind of traffic.
    takes: bool,
    text: String,
}

/// One waypoint's compiled configuration.
struct WaypointConfig {
    routes: RouteTable,
    policies: PolicyStore,
    destinations: Destinations,
}

/// One flow being walked.
struct Walk<'m, 'a> {
    mesh: &'m Mesh<'a>,
    flow: &'m Flow,
    pod: &'a Pod,
    host: String,
    dst: SocketAddr,
}

/// The HTTP request, when the flow is one.
struct Request {
    parts: http::request::Parts,
}

/// Where the flow ends, before policy: the endpoints (workload, port) it can reach.
type Targets = Vec<(Arc<Workload>, u16)>;

/// What the policy checks at destination ztunnels found.
#[derive(Default)]
struct Reached {
    hops: Vec<Hop>,
    allowed: Vec<String>,
    /// (hop, decision) of each refusal.
    denied: Vec<(String, Decision)>,
}

impl Walk<'_, '_> {
    fn run(&self, resolved: String) -> Result<Explanation, ExplainError> {
        let mesh = self.mesh;
        let meta = &self.pod.metadata;
        let enrolled = enrollment(self.pod, mesh.cluster.namespaces.get(&meta.namespace));
        let captured = enrolled.is_ambient();
        let src_ip: Option<IpAddr> = self.pod.ips().iter().find_map(|ip| ip.parse().ok());
        let source_workload = src_ip
            .and_then(|ip| mesh.index.workload_by_ip(NETWORK, ip))
            .filter(|w| *w.namespace == *meta.namespace && *w.name == *meta.name)
            .cloned();
        let identity = source_workload.as_ref().map(|w| w.identity()).or_else(|| {
            Identity::new(
                &mesh.settings.trust_domain,
                &meta.namespace,
                self.pod.service_account(),
            )
            .ok()
        });
        let mut warnings = Vec::new();
        if src_ip.is_none() {
            warnings.push(format!(
                "Pod {}/{}: status.podIP: the pod has no IP; policies that match source IPs are evaluated for 0.0.0.0",
                meta.namespace, meta.name
            ));
        }
        let src_ip = src_ip.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        let source = Source {
            pod: format!("{}/{}", meta.namespace, meta.name),
            node: self.pod.spec.node_name.clone(),
            ip: Some(src_ip.to_string()).filter(|_| !src_ip.is_unspecified()),
            identity: identity
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default(),
            captured,
            enrollment: enrolled.reason().to_string(),
        };

        let request = self.request()?;
        let found = mesh.index.find_address(NETWORK, self.dst.ip());
        let destination = self.destination(resolved, found.as_ref(), source_workload.as_deref());

        let mut out = Outcomes::default();
        let waypoint = if captured {
            let decision = route(
                &mesh.index,
                NETWORK,
                HBONE_PORT,
                source_workload.as_deref(),
                self.dst,
            );
            let step = self.waypoint_step(&decision, found.as_ref(), source_workload.as_deref());
            match decision {
                Ok(Route::Hbone {
                    waypoint: true,
                    workload,
                    authority,
                    ..
                }) => {
                    let via = Via {
                        gateway: step.gateway.clone().unwrap_or_default(),
                        workload,
                        authority,
                    };
                    self.through_waypoint(
                        &via,
                        request.as_ref(),
                        src_ip,
                        identity.as_ref(),
                        source_workload.as_deref(),
                        &mut out,
                        &mut warnings,
                    );
                }
                Ok(Route::Direct {
                    workload: None,
                    service,
                    ..
                }) => {
                    let why = match service {
                        Some(s) => format!(
                            "Service {} balances in PASSTHROUGH mode: ztunnel connects to {} as dialed",
                            s.key, self.dst
                        ),
                        None => format!(
                            "{} is not a mesh address: ztunnel passes the connection through as plain TCP, no mesh policy applies",
                            self.dst
                        ),
                    };
                    out.verdict = Some(verdict(
                        Outcome::Allowed,
                        PathKind::Passthrough,
                        format!("allowed: {why}"),
                    ));
                }
                Ok(Route::Hbone {
                    workload, service, ..
                })
                | Ok(Route::Direct {
                    workload: Some(workload),
                    service,
                    ..
                }) => {
                    let targets = match &service {
                        Some(s) => mesh.index.candidates(
                            s,
                            self.dst.port(),
                            source_workload.as_deref(),
                            &|_| true,
                        ),
                        None => vec![(workload, self.dst.port())],
                    };
                    let reached = self.destination_checks(&targets, identity.as_ref(), src_ip);
                    let path = if targets.iter().any(|(w, _)| w.protocol == Protocol::Hbone) {
                        PathKind::Hbone
                    } else {
                        PathKind::PlaintextToOutsideMesh
                    };
                    out.verdict = Some(self.reached_verdict(&reached, path, false, None));
                    out.hops.extend(reached.hops);
                }
                Err(e) => {
                    let (outcome, path) = match &e {
                        RouteError::NoEndpoint { .. } => {
                            (Outcome::NoHealthyEndpoint, PathKind::Hbone)
                        }
                        RouteError::UnknownPort { .. } => (Outcome::UnknownPort, PathKind::Hbone),
                        RouteError::NoWaypoint { .. } => {
                            (Outcome::NoWaypoint, PathKind::HboneViaWaypoint)
                        }
                        RouteError::Loop(_) => (Outcome::UnknownPort, PathKind::Hbone),
                    };
                    out.verdict = Some(verdict(
                        outcome,
                        path,
                        format!("refused by the source's ztunnel: {e}"),
                    ));
                }
            }
            step
        } else {
            self.uncaptured(found.as_ref(), src_ip, &mut out);
            WaypointStep {
                in_path: false,
                reason: "the source is not captured: its connections leave without ztunnel, so no waypoint sees them".to_string(),
                gateway: None,
                label: None,
                waypoint_for: None,
                addressed_as: None,
                pod: None,
                ip: None,
                identity: None,
            }
        };

        let verdict = out.verdict.unwrap_or_else(|| {
            verdict(
                Outcome::NoHealthyEndpoint,
                PathKind::Hbone,
                "nothing can take the flow".to_string(),
            )
        });
        // The request matters when the user described one or a waypoint served HTTP.
        let http =
            self.flow.has_request() || out.route.as_ref().is_some_and(|r| r.protocol == "http");
        let request = request.filter(|_| http);
        let explained = Explanation {
            flow: FlowSummary {
                from: self.flow.from.clone(),
                to: self.flow.to.clone(),
                method: request.as_ref().map(|r| r.parts.method.to_string()),
                path: request.as_ref().map(|r| {
                    r.parts
                        .uri
                        .path_and_query()
                        .map_or("/", |p| p.as_str())
                        .to_string()
                }),
                headers: self
                    .flow
                    .headers
                    .iter()
                    .map(|(name, value)| Header {
                        name: name.clone(),
                        value: value.clone(),
                    })
                    .collect(),
            },
            source,
            destination,
            waypoint,
            route: out.route,
            hops: out.hops,
            verdict,
            warnings: Vec::new(),
        };
        let warnings = self.relevant_warnings(&explained, warnings);
        Ok(Explanation {
            warnings,
            ..explained
        })
    }

    /// The request the flow describes (defaults `GET /`), as the waypoint would receive it.
    fn request(&self) -> Result<Option<Request>, ExplainError> {
        let method = self.flow.method.as_deref().unwrap_or("GET");
        let path = self.flow.path.as_deref().unwrap_or("/");
        if !path.starts_with('/') {
            return Err(ExplainError::Request(format!(
                "the path {path:?} must start with /"
            )));
        }
        let mut builder = http::Request::builder()
            .method(method.to_ascii_uppercase().as_str())
            .uri(path);
        let mut has_host = false;
        for (name, value) in &self.flow.headers {
            has_host |= name.eq_ignore_ascii_case("host");
            builder = builder.header(name.as_str(), value.as_str());
        }
        if !has_host {
            let host = match (self.host.parse::<IpAddr>(), self.dst.port()) {
                (Ok(IpAddr::V6(v6)), 80) => format!("[{v6}]"),
                (Ok(IpAddr::V6(v6)), port) => format!("[{v6}]:{port}"),
                (_, 80) => self.host.clone(),
                (_, port) => format!("{}:{port}", self.host),
            };
            builder = builder.header(http::header::HOST, host);
        }
        let request = builder
            .body(())
            .map_err(|e| ExplainError::Request(e.to_string()))?;
        Ok(Some(Request {
            parts: request.into_parts().0,
        }))
    }

    fn destination(
        &self,
        resolved: String,
        found: Option<&Address>,
        source: Option<&Workload>,
    ) -> Destination {
        let port = self.dst.port();
        let mut destination = Destination {
            host: self.host.clone(),
            port,
            ip: self.dst.ip().to_string(),
            resolved,
            addressed: "unknown".to_string(),
            service: None,
            workload: None,
            endpoints: Vec::new(),
        };
        match found {
            Some(Address::Service(s)) => {
                destination.addressed = "service".to_string();
                let service_port = s.port(port);
                destination.service = Some(ServiceInfo {
                    service: format!("{}/{}", s.namespace, s.name),
                    hostname: s.hostname.to_string(),
                    vip: self.dst.ip().to_string(),
                    port: service_port.map(|p| p.service_port),
                    target_port: service_port.map(|p| p.target_port).filter(|t| *t != 0),
                    app_protocol: app_protocol(service_port.map(|p| p.app_protocol)),
                    waypoint: s.waypoint.as_deref().map(describe_waypoint),
                });
                destination.endpoints = self.service_endpoints(s, port, source);
            }
            Some(Address::Workload(w)) => {
                destination.addressed = "workload".to_string();
                destination.workload = Some(endpoint(w, Some(port), true));
            }
            None => {}
        }
        destination
    }

    /// Every endpoint of `service`, marked eligible when endpoint choice can pick it for `port`.
    fn service_endpoints(
        &self,
        service: &Service,
        port: u16,
        source: Option<&Workload>,
    ) -> Vec<Endpoint> {
        let index = &self.mesh.index;
        let eligible = index.candidates(service, port, source, &|_| true);
        let declared = service
            .port(port)
            .map(|p| p.target_port)
            .filter(|t| *t != 0);
        let mut out: Vec<Endpoint> = index
            .workloads()
            .filter(|w| w.services.iter().any(|(key, _)| *key == service.key))
            .map(|w| {
                let chosen = eligible.iter().find(|(e, _)| e.uid == w.uid);
                let port = chosen
                    .map(|(_, p)| *p)
                    .or(declared)
                    .or_else(|| w.named_target_port(&service.key, port));
                endpoint(w, port, chosen.is_some())
            })
            .collect();
        out.sort_by(|a, b| a.pod.cmp(&b.pod));
        out
    }

    /// Step 3, from ztunnel's decision.
    fn waypoint_step(
        &self,
        decision: &Result<Route, RouteError>,
        found: Option<&Address>,
        source: Option<&Workload>,
    ) -> WaypointStep {
        let mesh = self.mesh;
        let mut step = WaypointStep {
            in_path: false,
            reason: String::new(),
            gateway: None,
            label: None,
            waypoint_for: None,
            addressed_as: None,
            pod: None,
            ip: None,
            identity: None,
        };
        let binding = match found {
            Some(Address::Service(s)) => {
                let labels = mesh
                    .cluster
                    .services
                    .get(&(s.namespace.to_string(), s.name.to_string()))
                    .map(|o| o.metadata.labels.clone())
                    .unwrap_or_default();
                Some(mesh.binding(
                    &format!("Service {}/{}", s.namespace, s.name),
                    &labels,
                    &s.namespace,
                    false,
                ))
            }
            Some(Address::Workload(w)) => {
                let labels = mesh
                    .pod(&w.namespace, &w.name)
                    .map(|p| p.metadata.labels.clone())
                    .unwrap_or_default();
                Some(mesh.binding(
                    &format!("Pod {}/{}", w.namespace, w.name),
                    &labels,
                    &w.namespace,
                    true,
                ))
            }
            None => None,
        };
        if let Some(b) = &binding {
            step.label = b.label.clone();
            step.gateway = b.gateway.clone();
            step.waypoint_for = b.waypoint_for.clone();
        }
        let binding_text = binding.as_ref().map(|b| b.text.clone()).unwrap_or_default();
        match decision {
            Ok(Route::Hbone {
                waypoint: true,
                workload,
                service,
                ..
            }) => {
                step.in_path = true;
                step.addressed_as = Some(
                    if service.is_some() {
                        "service"
                    } else {
                        "workload"
                    }
                    .to_string(),
                );
                let bound = match (found, service) {
                    (_, Some(s)) => s.waypoint.as_deref(),
                    (Some(Address::Workload(w)), None) => w.waypoint.as_deref(),
                    _ => None,
                };
                if let Some((ns, name)) = bound.and_then(|g| mesh.gateway_of(g)) {
                    step.gateway = Some(format!("{ns}/{name}"));
                }
                step.pod = Some(format!("{}/{}", workload.namespace, workload.name));
                step.ip = workload.addresses.first().map(ToString::to_string);
                step.identity = Some(workload.identity().to_string());
                let addressed = if service.is_some() {
                    "service-addressed"
                } else {
                    "addressed to the pod's IP"
                };
                step.reason = format!("{binding_text}; the flow is {addressed}");
            }
            Err(RouteError::NoWaypoint { .. }) => {
                step.in_path = true;
                step.reason = format!(
                    "{binding_text}; but the waypoint has no healthy pod, so the source's ztunnel refuses the connection"
                );
            }
            _ => {
                step.reason = match found {
                    Some(Address::Service(s)) => match (s.waypoint.as_deref(), source) {
                        (Some(w), Some(src)) if is_waypoint_itself(&mesh.index, NETWORK, Some(src), w) => {
                            "the source is the Service's waypoint itself: its traffic goes straight to the endpoints".to_string()
                        }
                        _ => format!("{binding_text}; no waypoint for this Service"),
                    },
                    Some(Address::Workload(w)) => {
                        let mut text = format!("{binding_text}; no waypoint for pod-addressed traffic to it");
                        let service_waypoints: BTreeSet<String> = w
                            .services
                            .iter()
                            .filter_map(|(key, _)| mesh.index.service(key))
                            .filter(|s| s.waypoint.is_some())
                            .map(|s| format!("Service {}/{}", s.namespace, s.name))
                            .collect();
                        if !service_waypoints.is_empty() {
                            text.push_str(&format!(
                                " (the waypoint of {} takes only traffic addressed to the Service)",
                                service_waypoints.into_iter().collect::<Vec<_>>().join(", ")
                            ));
                        }
                        if w.waypoint.as_deref().zip(source).is_some_and(|(g, src)| {
                            is_waypoint_itself(&mesh.index, NETWORK, Some(src), g)
                        }) {
                            text = "the source is the pod's waypoint itself: its traffic goes straight to the pod".to_string();
                        }
                        text
                    }
                    None => format!(
                        "{} is not a Service VIP or a pod IP the mesh knows",
                        self.dst.ip()
                    ),
                };
            }
        }
        step
    }

    /// Steps 4 and 5 for a flow the source's ztunnel sends to a waypoint.
    #[allow(clippy::too_many_arguments)]
    fn through_waypoint(
        &self,
        via: &Via,
        request: Option<&Request>,
        src_ip: IpAddr,
        identity: Option<&Identity>,
        source: Option<&Workload>,
        out: &mut Outcomes,
        warnings: &mut Vec<String>,
    ) {
        let mesh = self.mesh;
        let at = format!("waypoint {}", via.gateway);
        let (config, problems) = mesh.waypoint_config(&via.gateway);
        warnings.extend(problems);
        let path = PathKind::HboneViaWaypoint;
        let waypoint_ip = via
            .workload
            .addresses
            .first()
            .copied()
            .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        let waypoint_identity = via.workload.identity();

        // What the waypoint makes of the CONNECT authority (its `resolve`).
        let target = match mesh.index.find_address(NETWORK, via.authority.ip()) {
            Some(Address::Service(s)) => match port_protocol(&s, via.authority.port()) {
                Some(protocol) => WaypointTarget::Service(s, protocol),
                None => {
                    out.verdict = Some(Verdict {
                        hop: Some(at),
                        ..verdict(
                            Outcome::UnknownPort,
                            path,
                            format!(
                                "refused by the waypoint: Service {} does not expose port {} (the CONNECT is answered 400)",
                                s.key,
                                via.authority.port()
                            ),
                        )
                    });
                    return;
                }
            },
            Some(Address::Workload(w)) => WaypointTarget::Workload(w),
            None => {
                out.verdict = Some(Verdict {
                    hop: Some(at),
                    ..verdict(
                        Outcome::UnknownPort,
                        path,
                        format!(
                            "refused by the waypoint: {} is not an address it knows",
                            via.authority
                        ),
                    )
                });
                return;
            }
        };
        let declared = match &target {
            WaypointTarget::Service(_, protocol) => *protocol,
            WaypointTarget::Workload(_) => PortProtocol::Unknown,
        };
        // An undeclared port is sniffed: HTTP when the flow describes a request.
        let http = match declared {
            PortProtocol::Http1 | PortProtocol::Http2 => true,
            PortProtocol::Tcp => false,
            PortProtocol::Unknown => self.flow.has_request(),
        };
        let mut request = if http {
            request.map(|r| r.parts.clone())
        } else {
            None
        };

        // Authorization at the waypoint: the source's identity, the authority as destination.
        let (ns, name) = via.gateway.split_once('/').unwrap_or(("", &via.gateway));
        let class = mesh
            .cluster
            .gateways
            .get(&(ns.to_string(), name.to_string()))
            .map(|g| g.spec.gateway_class_name.as_str());
        let targets = policy_targets(
            &via.gateway,
            class,
            match &target {
                WaypointTarget::Service(s, _) => Some(s.key.as_ref()),
                WaypointTarget::Workload(_) => None,
            },
        );
        let ctx =
            ConnectionContext::danger_assumed_identity(src_ip, identity.cloned(), via.authority);
        let host = request.as_ref().and_then(request_host).unwrap_or_default();
        let path_and_query = request
            .as_ref()
            .map(|p| {
                p.uri
                    .path_and_query()
                    .map_or("/", |pq| pq.as_str())
                    .to_string()
            })
            .unwrap_or_default();
        let (decision, policies) = {
            let applicable = config.policies.applicable_to_targets(&targets);
            match &request {
                Some(parts) => {
                    let rctx = ctx.with_request(
                        parts.method.as_str(),
                        &path_and_query,
                        &host,
                        &parts.headers,
                    );
                    let decision = config.policies.authorize_targets(&targets, &rctx);
                    let verdicts = policy_verdicts(&applicable, Subject::Request(&rctx), &decision);
                    (decision, verdicts)
                }
                None => {
                    let decision = config.policies.authorize_targets(&targets, &ctx);
                    let verdicts =
                        policy_verdicts(&applicable, Subject::Connection(&ctx), &decision);
                    (decision, verdicts)
                }
            }
        };
        out.hops.push(hop(
            HopKind::Waypoint,
            at.clone(),
            None,
            identity,
            src_ip,
            via.authority,
            request.is_some(),
            policies,
            &decision,
        ));
        if !decision.allowed {
            out.verdict = Some(Verdict {
                hop: Some(at.clone()),
                policy: decision.policy().map(str::to_string),
                status: request.as_ref().map(|_| 403),
                ..verdict(
                    Outcome::Denied,
                    path,
                    format!("{} at {at}", decision.reason),
                )
            });
            return;
        }

        // Routing.
        let mut step = RouteStep {
            protocol: if request.is_some() { "http" } else { "tcp" }.to_string(),
            decision: "service-default".to_string(),
            route: None,
            rule: None,
            rule_name: None,
            filters: Vec::new(),
            redirect: None,
            backends: Vec::new(),
        };
        // The backends the rule (or, without one, the Service) names; resolved to endpoints below.
        let mut wanted: Vec<Backend> = Vec::new();
        match &target {
            WaypointTarget::Workload(w) => {
                step.decision = "pod-addressed".to_string();
                let endpoints = vec![endpoint(w, Some(via.authority.port()), true)];
                step.backends.push(Backend {
                    service: format!("{}/{}", w.namespace, w.name),
                    port: via.authority.port(),
                    weight: 1,
                    subset: None,
                    problem: None,
                    endpoints,
                });
            }
            WaypointTarget::Service(s, _) => {
                let port = via.authority.port();
                let rule = match request.as_mut() {
                    Some(parts) => {
                        let (req_path, query) = (
                            parts.uri.path().to_string(),
                            parts.uri.query().map(str::to_string),
                        );
                        let view = RequestView {
                            method: parts.method.as_str(),
                            path: &req_path,
                            query: query.as_deref(),
                            headers: &parts.headers,
                            grpc: is_grpc(&parts.headers),
                        };
                        match config.routes.decide(&s.key, port, &view) {
                            RouteDecision::NoRoutes => None,
                            RouteDecision::NoMatch => {
                                step.decision = "no-match".to_string();
                                out.verdict = Some(Verdict {
                                    hop: Some(at.clone()),
                                    status: Some(404),
                                    ..verdict(
                                        Outcome::NoRoute,
                                        path,
                                        format!(
                                            "no route: routes attach to {} port {port} but none matches {} {req_path} (the waypoint answers 404)",
                                            s.hostname, parts.method
                                        ),
                                    )
                                });
                                out.route = Some(step);
                                return;
                            }
                            RouteDecision::Matched(matched) => {
                                let mut applied = Applied::default();
                                apply_request(
                                    &matched.rule.filters,
                                    parts,
                                    matched.matched_prefix.as_deref(),
                                    &mut applied,
                                );
                                if let Some(redirect) = applied.redirect {
                                    step.redirect = Some(format!(
                                        "{} {}",
                                        redirect.status().as_u16(),
                                        redirect
                                            .headers()
                                            .get(http::header::LOCATION)
                                            .and_then(|v| v.to_str().ok())
                                            .unwrap_or("")
                                    ));
                                }
                                Some(matched.rule)
                            }
                        }
                    }
                    None => config.routes.tcp_rule(&s.key, port),
                };
                match rule {
                    Some(rule) => {
                        step.decision = "matched".to_string();
                        step.route = Some(rule.route.clone());
                        step.rule = Some(rule.index);
                        step.rule_name = Some(rule.name.clone()).filter(|n| !n.is_empty());
                        step.filters = rule.filters.iter().filter_map(filter_kind).collect();
                        if rule.fault.is_some() {
                            step.filters.push("fault".to_string());
                        }
                        if rule.cors.is_some() {
                            step.filters.push("cors".to_string());
                        }
                        for b in &rule.backends {
                            wanted.push(Backend {
                                service: b.service.clone(),
                                port: b.port,
                                weight: b.weight,
                                subset: b.subset.clone(),
                                problem: b
                                    .invalid
                                    .as_ref()
                                    .map(|why| format!("invalid backend: {why}")),
                                endpoints: Vec::new(),
                            });
                        }
                    }
                    None => wanted.push(Backend {
                        service: s.key.to_string(),
                        port,
                        weight: 1,
                        subset: None,
                        problem: None,
                        endpoints: Vec::new(),
                    }),
                }
            }
        }
        if let Some(redirect) = step.redirect.clone() {
            let status = redirect
                .split_whitespace()
                .next()
                .and_then(|s| s.parse().ok());
            out.verdict = Some(Verdict {
                hop: Some(at.clone()),
                status,
                ..verdict(
                    Outcome::Redirected,
                    path,
                    format!("redirected by the waypoint: {redirect}"),
                )
            });
            out.route = Some(step);
            return;
        }
        for mut backend in wanted {
            if backend.problem.is_none() {
                let (service, port, subset) = (&backend.service, backend.port, &backend.subset);
                match self.backend_targets(&config, service, port, subset.as_deref(), source) {
                    Ok(targets) if targets.is_empty() => {
                        backend.problem = Some(format!(
                            "no healthy endpoint of {service} serves port {port}{}",
                            subset
                                .as_deref()
                                .map(|s| format!(" in subset {s}"))
                                .unwrap_or_default()
                        ));
                    }
                    Ok(targets) => {
                        backend.endpoints = targets
                            .iter()
                            .map(|(w, p)| endpoint(w, Some(*p), true))
                            .collect();
                    }
                    Err(why) => backend.problem = Some(why),
                }
            }
            step.backends.push(backend);
        }

        // The destination ztunnels see the waypoint's identity.
        let mut all: Targets = Vec::new();
        for b in step
            .backends
            .iter()
            .filter(|b| b.weight > 0 && b.problem.is_none())
        {
            for e in &b.endpoints {
                let found =
                    e.ip.parse::<IpAddr>()
                        .ok()
                        .and_then(|ip| mesh.index.workload_by_ip(NETWORK, ip));
                if let (Some(w), Some(port)) = (found, e.port)
                    && !all.iter().any(|(x, p)| x.uid == w.uid && *p == port)
                {
                    all.push((w.clone(), port));
                }
            }
        }
        let usable_weight: u32 = step
            .backends
            .iter()
            .filter(|b| b.problem.is_none())
            .map(|b| b.weight)
            .sum();
        let reached = self.destination_checks(&all, Some(&waypoint_identity), waypoint_ip);
        let problems: Vec<String> = step
            .backends
            .iter()
            .filter(|b| b.weight > 0)
            .filter_map(|b| b.problem.clone())
            .collect();
        out.verdict = Some(if usable_weight == 0 || all.is_empty() {
            let invalid = step.backends.iter().all(|b| {
                b.problem
                    .as_deref()
                    .is_some_and(|p| !p.starts_with("no healthy endpoint"))
            }) || step.backends.iter().all(|b| b.weight == 0);
            let (outcome, status) = if invalid && !step.backends.is_empty() {
                (Outcome::InvalidBackend, 500)
            } else {
                (Outcome::NoHealthyEndpoint, 503)
            };
            let why = if problems.is_empty() {
                "no backend with a weight above 0".to_string()
            } else {
                problems.join("; ")
            };
            Verdict {
                hop: Some(at.clone()),
                status: request.as_ref().map(|_| status),
                ..verdict(
                    outcome,
                    path,
                    format!("the waypoint cannot forward it: {why}"),
                )
            }
        } else {
            let mut v = self.reached_verdict(&reached, path, request.is_some(), Some(&step));
            if !problems.is_empty() && v.allowed {
                v.summary.push_str(&format!(
                    "; some requests fail at the waypoint: {}",
                    problems.join("; ")
                ));
            }
            v
        });
        out.hops.extend(reached.hops);
        out.route = Some(step);
    }

    /// The endpoints a waypoint chooses among for a backend (the waypoint's own candidate set:
    /// the subset's members, then health, preferences and port).
    fn backend_targets(
        &self,
        config: &WaypointConfig,
        service: &str,
        port: u16,
        subset: Option<&str>,
        source: Option<&Workload>,
    ) -> Result<Targets, String> {
        let index = &self.mesh.index;
        let found = index
            .service(service)
            .ok_or_else(|| format!("backend Service {service} is unknown to the waypoint (500)"))?;
        let members = subset
            .map(|s| config.destinations.subset(service, s))
            .transpose()
            .map_err(|e| match e {
                ChooseError::UnknownSubset { service, subset } => format!(
                    "subset {subset} of {service} is not defined by a DestinationRule (500)"
                ),
                ChooseError::NoEndpoint => format!("no endpoint of {service}"),
            })?;
        let keep = |w: &Workload| members.is_none_or(|m| m.contains(&*w.uid));
        Ok(index.candidates(found, port, source, &keep))
    }

    /// The flow of a source that is not captured: plain TCP straight to the destination.
    fn uncaptured(&self, found: Option<&Address>, src_ip: IpAddr, out: &mut Outcomes) {
        let path = PathKind::PlaintextDirect;
        let targets: Targets = match found {
            Some(Address::Service(s)) => {
                if s.port(self.dst.port()).is_none() {
                    out.verdict = Some(verdict(
                        Outcome::UnknownPort,
                        path,
                        format!(
                            "not captured: Service {} does not expose port {}",
                            s.key,
                            self.dst.port()
                        ),
                    ));
                    return;
                }
                self.mesh
                    .index
                    .candidates(s, self.dst.port(), None, &|_| true)
            }
            Some(Address::Workload(w)) => vec![(w.clone(), self.dst.port())],
            None => {
                out.verdict = Some(verdict(
                    Outcome::Allowed,
                    path,
                    format!(
                        "not captured: plain TCP to {}, which is not a mesh address; no mesh policy applies",
                        self.dst
                    ),
                ));
                return;
            }
        };
        let reached = self.destination_checks(&targets, None, src_ip);
        let mut v = self.reached_verdict(&reached, path, false, None);
        v.summary = format!("not captured (plaintext direct): {}", v.summary);
        out.verdict = Some(v);
        out.hops.extend(reached.hops);
    }

    /// L4 authorization at each target's ztunnel, as ztunnel's inbound path does it: over HBONE
    /// with `peer`'s identity, or on the plaintext listener without one.
    fn destination_checks(
        &self,
        targets: &[(Arc<Workload>, u16)],
        peer: Option<&Identity>,
        src_ip: IpAddr,
    ) -> Reached {
        let mesh = self.mesh;
        let mut reached = Reached::default();
        for (w, port) in targets {
            let pod = format!("{}/{}", w.namespace, w.name);
            if w.protocol != Protocol::Hbone {
                // Outside the mesh: no ztunnel checks anything there.
                reached.allowed.push(pod);
                continue;
            }
            let Some(ip) = w.addresses.first().copied() else {
                continue;
            };
            let dst = SocketAddr::new(ip, *port);
            let ctx = match peer {
                Some(identity) => {
                    ConnectionContext::danger_assumed_identity(src_ip, Some(identity.clone()), dst)
                }
                None => ConnectionContext::plaintext(src_ip, dst),
            };
            let selected: Vec<String> = w
                .authorization_policies
                .iter()
                .map(ToString::to_string)
                .collect();
            let decision = mesh.l4.authorize(&w.namespace, &selected, &ctx);
            let applicable = mesh.l4.applicable(&w.namespace, &selected);
            let policies = policy_verdicts(&applicable, Subject::Connection(&ctx), &decision);
            let at = format!("ztunnel on {} for {pod}", w.node);
            reached.hops.push(hop(
                HopKind::Destination,
                at.clone(),
                Some(pod.clone()),
                peer,
                src_ip,
                dst,
                false,
                policies,
                &decision,
            ));
            if decision.allowed {
                reached.allowed.push(pod);
            } else {
                reached.denied.push((at, decision));
            }
        }
        reached
    }

    /// The verdict once destination checks are known. `http`: the waypoint answers a refused
    /// upstream with 503.
    fn reached_verdict(
        &self,
        reached: &Reached,
        path: PathKind,
        http: bool,
        route: Option<&RouteStep>,
    ) -> Verdict {
        let via = route
            .and_then(|r| r.route.as_ref().map(|name| (name, r.rule.unwrap_or(0))))
            .map(|(name, rule)| format!(" ({name} rule {rule})"))
            .unwrap_or_default();
        if reached.allowed.is_empty() && reached.denied.is_empty() {
            return Verdict {
                status: http.then_some(503),
                ..verdict(
                    Outcome::NoHealthyEndpoint,
                    path,
                    "no healthy endpoint can take it".to_string(),
                )
            };
        }
        let mut backends = reached.allowed.clone();
        backends.sort();
        backends.dedup();
        if let Some((at, decision)) = reached.denied.first() {
            let strict = decision
                .policy()
                .is_some_and(|p| p.ends_with(&format!("/{STRICT_POLICY}")));
            let how = if strict {
                format!(
                    "refused by STRICT PeerAuthentication (synthesized policy {}) at {at}: the caller has no mesh identity",
                    decision.policy().unwrap_or_default()
                )
            } else {
                format!("{} at {at}", decision.reason)
            };
            if reached.allowed.is_empty() {
                let outcome = if strict {
                    Outcome::RefusedStrict
                } else {
                    Outcome::Denied
                };
                return Verdict {
                    hop: Some(at.clone()),
                    policy: decision.policy().map(str::to_string),
                    status: http.then_some(503),
                    ..verdict(outcome, path, how)
                };
            }
            return Verdict {
                hop: Some(at.clone()),
                policy: decision.policy().map(str::to_string),
                backends: backends.clone(),
                allowed: true,
                ..verdict(
                    Outcome::PartlyDenied,
                    path,
                    format!(
                        "partly denied: {}{via} admit it; {how}",
                        backends.join(", ")
                    ),
                )
            };
        }
        Verdict {
            backends: backends.clone(),
            ..verdict(
                Outcome::Allowed,
                path,
                format!("allowed{via}: answered by {}", backends.join(" or ")),
            )
        }
    }

    /// Translation warnings that name an object on the flow's path.
    fn relevant_warnings(&self, explained: &Explanation, mut own: Vec<String>) -> Vec<String> {
        let mut needles: BTreeSet<String> = BTreeSet::new();
        needles.insert(format!("Pod {}", explained.source.pod));
        if let Some(s) = &explained.destination.service {
            needles.insert(format!("Service {}", s.service));
        }
        if let Some(w) = &explained.destination.workload {
            needles.insert(format!("Pod {}", w.pod));
        }
        for e in &explained.destination.endpoints {
            needles.insert(format!("Pod {}", e.pod));
        }
        if let Some(g) = &explained.waypoint.gateway {
            needles.insert(format!("Gateway {g}"));
        }
        if let Some(r) = explained.route.as_ref().and_then(|r| r.route.as_ref()) {
            needles.insert(r.replacen('/', " ", 1));
        }
        for hop in &explained.hops {
            for p in &hop.policies {
                needles.insert(format!("AuthorizationPolicy {}", p.policy));
            }
        }
        let namespace = explained.source.pod.split('/').next().unwrap_or_default();
        needles.insert(format!("Namespace {namespace}"));
        own.extend(
            self.mesh
                .resources
                .warnings
                .iter()
                .filter(|w| needles.iter().any(|n| w.is_about(n)))
                .map(ToString::to_string),
        );
        own.extend(self.mesh.refused.iter().cloned());
        own
    }
}

/// The waypoint in the path, from ztunnel's route.
struct Via {
    gateway: String,
    workload: Arc<Workload>,
    authority: SocketAddr,
}

/// What the waypoint resolves the CONNECT authority to.
enum WaypointTarget {
    Service(Arc<Service>, PortProtocol),
    Workload(Arc<Workload>),
}

/// Steps 4 to 6 as they are found.
#[derive(Default)]
struct Outcomes {
    route: Option<RouteStep>,
    hops: Vec<Hop>,
    verdict: Option<Verdict>,
}

fn verdict(outcome: Outcome, path: PathKind, summary: String) -> Verdict {
    Verdict {
        outcome,
        allowed: matches!(outcome, Outcome::Allowed | Outcome::PartlyDenied),
        path,
        status: None,
        hop: None,
        policy: None,
        backends: Vec::new(),
        summary,
    }
}

fn endpoint(w: &Workload, port: Option<u16>, eligible: bool) -> Endpoint {
    Endpoint {
        pod: format!("{}/{}", w.namespace, w.name),
        node: w.node.to_string(),
        ip: w
            .addresses
            .first()
            .map(ToString::to_string)
            .unwrap_or_default(),
        port,
        healthy: w.healthy,
        captured: w.protocol == Protocol::Hbone,
        identity: w.identity().to_string(),
        eligible,
    }
}

fn app_protocol(protocol: Option<AppProtocol>) -> String {
    match protocol {
        None => "none",
        Some(AppProtocol::Unknown) => "unknown",
        Some(AppProtocol::Http11) => "http",
        Some(AppProtocol::Http2) => "http2",
        Some(AppProtocol::Grpc) => "grpc",
        Some(AppProtocol::Tcp) => "tcp",
        Some(AppProtocol::Tls) => "tls",
    }
    .to_string()
}

fn filter_kind(filter: &ambit_proto::waypoint::Filter) -> Option<String> {
    use ambit_proto::waypoint::filter::Kind;
    Some(
        match filter.kind.as_ref()? {
            Kind::RequestHeaderModifier(_) => "requestHeaderModifier",
            Kind::ResponseHeaderModifier(_) => "responseHeaderModifier",
            Kind::RequestRedirect(_) => "requestRedirect",
            Kind::UrlRewrite(_) => "urlRewrite",
            Kind::RequestMirror(_) => "requestMirror",
        }
        .to_string(),
    )
}

/// Each applicable policy evaluated alone by the engine, marked with whether it decided.
fn policy_verdicts(
    policies: &[&Arc<Policy>],
    subject: Subject<'_>,
    decision: &Decision,
) -> Vec<PolicyVerdict> {
    policies
        .iter()
        .map(|p| {
            let key = p.key();
            let rule = p.matching_rule(subject);
            PolicyVerdict {
                decides: decision.policy() == Some(key.as_str()),
                policy: key,
                action: p.action.to_string(),
                dry_run: p.dry_run,
                matched: rule.is_some(),
                rule,
            }
        })
        .collect()
}

#[allow(clippy::too_many_arguments)]
fn hop(
    kind: HopKind,
    at: String,
    endpoint: Option<String>,
    peer: Option<&Identity>,
    src_ip: IpAddr,
    dst: SocketAddr,
    l7: bool,
    policies: Vec<PolicyVerdict>,
    decision: &Decision,
) -> Hop {
    Hop {
        kind,
        at,
        endpoint,
        peer: peer.map(ToString::to_string),
        source_ip: src_ip.to_string(),
        destination: dst.to_string(),
        l7,
        policies,
        allowed: decision.allowed,
        reason: decision.reason.clone(),
        decided_by: decision.decided_by.as_ref().map(|m| PolicyRef {
            policy: m.policy.clone(),
            action: m.action.to_string(),
            rule: m.rule,
        }),
    }
}
