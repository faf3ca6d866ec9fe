//! The checks the translation cannot make on its own, over the same objects and with the mesh's
//! own reading of hosts ([`ambit_mesh::l7::host_service`]), selectors
//! ([`ambit_mesh::translate::selects`]), enrollment ([`ambit_mesh::enrollment`]), STRICT mTLS
//! ([`ambit_mesh::translate::strict_pods`]), waypoint bindings
//! ([`ambit_mesh::status::service_bindings`]) and port protocols
//! ([`ambit_mesh::translate::app_protocol`]).

use std::collections::{BTreeMap, BTreeSet};

use ambit_mesh::enrollment::{DATAPLANE_MODE, Enrollment};
use ambit_mesh::gateway_api::GATEWAY_GROUP;
use ambit_mesh::l7::host_service;
use ambit_mesh::objects::{LabelSelector, Service};
use ambit_mesh::translate::{
    Cluster, MeshSettings, Resources, app_protocol, hostname, selects, strict_pods,
};
use ambit_mesh::virtual_service::MESH_GATEWAY;
use ambit_proto::workload::AppProtocol;
use serde_json::Value;

use crate::Finding;
use crate::codes;
use crate::workloads::{Workload, with_templates};

/// What every check reads.
#[derive(Debug)]
pub struct Context<'a> {
    /// The objects, as the translation reads them.
    pub cluster: &'a Cluster,
    /// Mesh settings.
    pub settings: &'a MeshSettings,
    /// What the translation made of `cluster`.
    pub resources: &'a Resources,
    /// Pods and pod templates.
    pub workloads: &'a [Workload],
}

/// Namespaces whose pods are the platform's, not the mesh's users': never reported as not
/// enrolled.
const SYSTEM_NAMESPACES: [&str; 3] = ["kube-system", "kube-public", "kube-node-lease"];

/// Every check but [`target_refs`].
pub fn run(context: &Context<'_>, findings: &mut Vec<Finding>) {
    selectors(context, findings);
    shadowed_rules(context, findings);
    virtual_service_hosts(context, findings);
    subsets(context, findings);
    strict_callers(context, findings);
    namespaces(context, findings);
    port_protocols(context, findings);
}

fn labels_text(labels: &BTreeMap<String, String>) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// `a, b, c and 2 more`.
fn some_of(names: &[String]) -> String {
    const SHOWN: usize = 3;
    let mut text = names
        .iter()
        .take(SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > SHOWN {
        text.push_str(&format!(" and {} more", names.len() - SHOWN));
    }
    text
}

// ---------------------------------------------------------------------------------------------
// Policies
// ---------------------------------------------------------------------------------------------

/// AMB0204: `targetRefs` naming a Service or Gateway that does not exist. Returns the policies
/// (`AuthorizationPolicy ns/name`) whose every target is missing.
pub fn target_refs(context: &Context<'_>, findings: &mut Vec<Finding>) -> BTreeSet<String> {
    let mut all_missing = BTreeSet::new();
    for policy in context.cluster.policies.values() {
        let meta = &policy.metadata;
        let object = format!("AuthorizationPolicy {}/{}", meta.namespace, meta.name);
        let mut missing = 0;
        for (i, target) in policy.spec.target_refs.iter().enumerate() {
            let key = (meta.namespace.clone(), target.name.clone());
            let exists = match (target.group.as_str(), target.kind.as_str()) {
                ("", "Service") => context.cluster.services.contains_key(&key),
                (GATEWAY_GROUP, "Gateway") => context.cluster.gateways.contains_key(&key),
                // Other kinds are the translation's to report (AMB0206).
                _ => continue,
            };
            if !exists {
                missing += 1;
                findings.push(codes::TARGET_REF_NOT_FOUND.finding(
                    &object,
                    format!("spec.targetRefs[{i}]"),
                    format!(
                        "{} {}/{} does not exist; nothing in it is enforced through this target",
                        target.kind, meta.namespace, target.name
                    ),
                ));
            }
        }
        if missing > 0 && missing == policy.spec.target_refs.len() {
            all_missing.insert(object);
        }
    }
    all_missing
}

/// AMB0203: a policy selector that matches no pod in its scope.
fn selectors(context: &Context<'_>, findings: &mut Vec<Finding>) {
    let root = &context.settings.root_namespace;
    let mut check = |kind: &str, meta: &ambit_mesh::ObjectMeta, selector: &LabelSelector| {
        if selector.match_labels.is_empty() {
            return;
        }
        let everywhere = meta.namespace == *root;
        let matched = context.workloads.iter().any(|w| {
            (everywhere || w.namespace == meta.namespace)
                && selects(&selector.match_labels, w.labels())
        });
        if !matched {
            let scope = if everywhere {
                "any namespace".to_string()
            } else {
                format!("namespace {}", meta.namespace)
            };
            findings.push(codes::SELECTOR_MATCHES_NOTHING.finding(
                format!("{kind} {}/{}", meta.namespace, meta.name),
                "spec.selector.matchLabels",
                format!(
                    "{} selects no pod in {scope}; the {kind} applies to nothing",
                    labels_text(&selector.match_labels)
                ),
            ));
        }
    };
    for policy in context.cluster.policies.values() {
        if let Some(selector) = &policy.spec.selector
            && policy.spec.target_refs.is_empty()
        {
            check("AuthorizationPolicy", &policy.metadata, selector);
        }
    }
    for pa in context.cluster.peer_authentications.values() {
        if let Some(selector) = &pa.spec.selector {
            check("PeerAuthentication", &pa.metadata, selector);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Routes
// ---------------------------------------------------------------------------------------------

/// A match as data, for comparing two matches (a match's `name` does not change what it
/// matches).
fn match_value(m: &impl serde::Serialize) -> Value {
    let mut value = serde_json::to_value(m).unwrap_or(Value::Null);
    if let Value::Object(map) = &mut value {
        map.remove("name");
        map.retain(|_, v| !v.is_null() && *v != Value::Object(Default::default()));
        map.retain(|_, v| *v != Value::Array(Vec::new()));
    }
    value
}

/// The rules of one route, as their matches and the field naming each match list.
struct Rules<'a> {
    object: String,
    /// Per rule: its field (`spec.http[1]`), the match list's field name, and its matches.
    rules: Vec<(String, &'a str, Vec<Value>)>,
    /// An empty match list takes every request, so no later rule is ever reached (a
    /// VirtualService: rules are tried in order). Gateway API routes sort rules by precedence
    /// instead, and their empty match list is a match like any other.
    ordered: bool,
}

/// AMB0320/AMB0321: rules that can never match, and matches that never apply.
fn shadowed_rules(context: &Context<'_>, findings: &mut Vec<Finding>) {
    let mut routes = Vec::new();
    for vs in context.cluster.virtual_services.values() {
        let spec = &vs.spec;
        if !(spec.gateways.is_empty() || spec.gateways.iter().any(|g| g == MESH_GATEWAY)) {
            continue;
        }
        routes.push(Rules {
            object: format!(
                "VirtualService {}/{}",
                vs.metadata.namespace, vs.metadata.name
            ),
            rules: spec
                .http
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    (
                        format!("spec.http[{i}]"),
                        "match",
                        r.matches.iter().map(match_value).collect(),
                    )
                })
                .collect(),
            ordered: true,
        });
    }
    for route in context.cluster.http_routes.values() {
        if !route.spec.parent_refs.iter().any(|p| p.is_service()) {
            continue;
        }
        routes.push(Rules {
            object: format!(
                "HTTPRoute {}/{}",
                route.metadata.namespace, route.metadata.name
            ),
            rules: route
                .spec
                .rules
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    (
                        format!("spec.rules[{i}]"),
                        "matches",
                        r.effective_matches().iter().map(match_value).collect(),
                    )
                })
                .collect(),
            ordered: false,
        });
    }
    for route in context.cluster.grpc_routes.values() {
        if !route.spec.parent_refs.iter().any(|p| p.is_service()) {
            continue;
        }
        routes.push(Rules {
            object: format!(
                "GRPCRoute {}/{}",
                route.metadata.namespace, route.metadata.name
            ),
            rules: route
                .spec
                .rules
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    let matches = if r.matches.is_empty() {
                        // Every gRPC request.
                        vec![Value::Object(Default::default())]
                    } else {
                        r.matches.iter().map(match_value).collect()
                    };
                    (format!("spec.rules[{i}]"), "matches", matches)
                })
                .collect(),
            ordered: false,
        });
    }
    for route in routes {
        shadowed_in(&route, findings);
    }
}

fn shadowed_in(route: &Rules<'_>, findings: &mut Vec<Finding>) {
    let mut catch_all: Option<&str> = None;
    // Every earlier match, with the field naming it.
    let mut seen: Vec<(&Value, String)> = Vec::new();
    for (at, list, matches) in &route.rules {
        if let Some(first) = catch_all {
            findings.push(codes::UNREACHABLE_RULE.finding(
                &route.object,
                at.clone(),
                format!(
                    "{first} has no match, so it takes every request first; this rule is never used (only the last rule may have no match)"
                ),
            ));
            continue;
        }
        if matches.is_empty() {
            if route.ordered {
                catch_all = Some(at);
            }
            continue;
        }
        let earlier: Vec<Option<&String>> = matches
            .iter()
            .map(|m| seen.iter().find(|(s, _)| *s == m).map(|(_, field)| field))
            .collect();
        if earlier.iter().all(Option::is_some) {
            let fields: BTreeSet<&str> = earlier.iter().flatten().map(|f| f.as_str()).collect();
            findings.push(codes::UNREACHABLE_RULE.finding(
                &route.object,
                format!("{at}.{list}"),
                format!(
                    "every match repeats an earlier one ({}), which takes the requests first; this rule is never used",
                    fields.into_iter().collect::<Vec<_>>().join(", ")
                ),
            ));
        } else {
            for (j, field) in earlier.iter().enumerate() {
                if let Some(field) = field {
                    findings.push(codes::INEFFECTIVE_MATCH.finding(
                        &route.object,
                        format!("{at}.{list}[{j}]"),
                        format!("repeats {field}, which takes the requests first; this match is never used"),
                    ));
                }
            }
        }
        for (j, m) in matches.iter().enumerate() {
            seen.push((m, format!("{at}.{list}[{j}]")));
        }
    }
}

/// AMB0322: a Service routed by more than one VirtualService.
fn virtual_service_hosts(context: &Context<'_>, findings: &mut Vec<Finding>) {
    // Service (ns, name) → (VirtualService ns/name, host index).
    let mut claims: BTreeMap<(String, String), Vec<(String, usize)>> = BTreeMap::new();
    for vs in context.cluster.virtual_services.values() {
        let spec = &vs.spec;
        if !(spec.gateways.is_empty() || spec.gateways.iter().any(|g| g == MESH_GATEWAY)) {
            continue;
        }
        let name = format!("{}/{}", vs.metadata.namespace, vs.metadata.name);
        for (i, host) in spec.hosts.iter().enumerate() {
            if let Some(service) = host_service(
                context.cluster,
                context.settings,
                host,
                &vs.metadata.namespace,
            ) {
                let key = (
                    service.metadata.namespace.clone(),
                    service.metadata.name.clone(),
                );
                let list = claims.entry(key).or_default();
                if !list.iter().any(|(n, _)| *n == name) {
                    list.push((name.clone(), i));
                }
            }
        }
    }
    for ((ns, service), list) in claims {
        if list.len() < 2 {
            continue;
        }
        for (name, i) in &list {
            let others: Vec<String> = list
                .iter()
                .filter(|(n, _)| n != name)
                .map(|(n, _)| n.clone())
                .collect();
            findings.push(codes::CONFLICTING_VIRTUAL_SERVICES.finding(
                format!("VirtualService {name}"),
                format!("spec.hosts[{i}]"),
                format!(
                    "Service {ns}/{service} is also routed by VirtualService {}; the waypoint tries the older one's rules first",
                    others.join(", ")
                ),
            ));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// DestinationRules
// ---------------------------------------------------------------------------------------------

/// The pods (and templates) a Service selects; `None` for a Service without a selector (its
/// endpoints come from EndpointSlices).
fn selected<'w>(service: &Service, workloads: &'w [Workload]) -> Option<Vec<&'w Workload>> {
    if service.spec.selector.is_empty() {
        return None;
    }
    Some(
        workloads
            .iter()
            .filter(|w| {
                w.namespace == service.metadata.namespace
                    && selects(&service.spec.selector, w.labels())
            })
            .collect(),
    )
}

/// AMB0402: a subset whose labels select none of the host Service's pods. Services with no pods
/// at all (none given, or endpoints from EndpointSlices) are not checked.
fn subsets(context: &Context<'_>, findings: &mut Vec<Finding>) {
    for rule in context.cluster.destination_rules.values() {
        let meta = &rule.metadata;
        let Some(service) = host_service(
            context.cluster,
            context.settings,
            &rule.spec.host,
            &meta.namespace,
        ) else {
            continue;
        };
        let Some(pods) = selected(service, context.workloads).filter(|p| !p.is_empty()) else {
            continue;
        };
        for (i, subset) in rule.spec.subsets.iter().enumerate() {
            if pods.iter().any(|w| selects(&subset.labels, w.labels())) {
                continue;
            }
            findings.push(codes::SUBSET_SELECTS_NO_PODS.finding(
                format!("DestinationRule {}/{}", meta.namespace, meta.name),
                format!("spec.subsets[{i}].labels"),
                format!(
                    "subset {:?} ({}) selects none of the pods of Service {}/{} ({}); requests routed to it get 503",
                    subset.name,
                    labels_text(&subset.labels),
                    service.metadata.namespace,
                    service.metadata.name,
                    some_of(&pods.iter().map(|w| w.object.clone()).collect::<Vec<_>>()),
                ),
            ));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// mTLS
// ---------------------------------------------------------------------------------------------

/// AMB0501. STRICT pods are those the translation makes STRICT ([`strict_pods`]) and that are
/// captured. Their callers outside the mesh are the workloads that are not captured (neither
/// waypoints, sidecars nor host-network pods, which are not plaintext clients of the mesh) and
/// that either run in the same namespace as STRICT pods or name one of that namespace's Services
/// (`name.namespace`, with or without `.svc[.suffix]`) in their command, arguments or (templates)
/// environment. The finding is on the PeerAuthentication that decides the namespace's mode: its
/// namespace-wide one, else a workload one, else the mesh-wide one.
fn strict_callers(context: &Context<'_>, findings: &mut Vec<Finding>) {
    let cluster = context.cluster;
    let with = with_templates(cluster, context.workloads);
    let strict = strict_pods(&with, &context.settings.root_namespace, &mut Vec::new());
    let mut strict_namespaces: BTreeSet<&str> = BTreeSet::new();
    for w in context.workloads {
        let key_name = if w.object.starts_with("Pod ") {
            w.pod.metadata.name.clone()
        } else {
            format!(
                "{}/{}",
                w.object.split(' ').next().unwrap_or(""),
                w.pod.metadata.name
            )
        };
        let captured = w
            .enrollment(cluster.namespaces.get(&w.namespace))
            .is_ambient();
        if captured && strict.contains_key(&(w.namespace.clone(), key_name)) {
            strict_namespaces.insert(&w.namespace);
        }
    }
    for ns in strict_namespaces {
        let hosts: Vec<String> = cluster
            .services
            .values()
            .filter(|s| s.metadata.namespace == ns)
            .map(|s| format!("{}.{ns}", s.metadata.name))
            .collect();
        let names_a_service = |w: &Workload| {
            w.mentions.iter().any(|m| {
                hosts.iter().any(|h| {
                    m.match_indices(h.as_str()).any(|(at, _)| {
                        let before = m[..at].chars().next_back();
                        let after = m[at + h.len()..].chars().next();
                        !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
                            && !after.is_some_and(|c| c.is_ascii_alphanumeric() || c == '-')
                    })
                })
            })
        };
        let callers: Vec<String> = context
            .workloads
            .iter()
            .filter(|w| {
                let enrollment = w.enrollment(cluster.namespaces.get(&w.namespace));
                !enrollment.is_ambient()
                    && !w.is_waypoint()
                    && !matches!(enrollment, Enrollment::HostNetwork | Enrollment::Sidecar)
                    && (w.namespace == ns || names_a_service(w))
            })
            .map(|w| w.object.clone())
            .collect();
        if callers.is_empty() {
            continue;
        }
        let Some(pa) = deciding_peer_authentication(cluster, ns, &context.settings.root_namespace)
        else {
            continue;
        };
        findings.push(codes::STRICT_WITH_PLAINTEXT_CALLERS.finding(
            format!("PeerAuthentication {}/{}", pa.0, pa.1),
            "spec.mtls.mode",
            format!(
                "STRICT for the pods of namespace {ns}, but {} {} not in the mesh and call{} them in plaintext, which ztunnel refuses",
                some_of(&callers),
                if callers.len() == 1 { "is" } else { "are" },
                if callers.len() == 1 { "s" } else { "" },
            ),
        ));
    }
}

/// The STRICT PeerAuthentication deciding `namespace`'s mode: its namespace-wide one, else one
/// with a selector, else the mesh-wide one.
fn deciding_peer_authentication(
    cluster: &Cluster,
    namespace: &str,
    root: &str,
) -> Option<(String, String)> {
    let strict = |ns: &str, selector: bool| {
        cluster
            .peer_authentications
            .iter()
            .find(|((pa_ns, _), pa)| {
                pa_ns == ns
                    && pa.spec.selector.is_some() == selector
                    && pa.spec.mtls.as_ref().is_some_and(|m| m.mode == "STRICT")
            })
            .map(|(key, _)| key.clone())
    };
    strict(namespace, false)
        .or_else(|| strict(namespace, true))
        .or_else(|| strict(root, false))
}

// ---------------------------------------------------------------------------------------------
// Namespaces and Services
// ---------------------------------------------------------------------------------------------

/// AMB0601: a namespace with pods that is neither `ambient` nor `none`. Pods labelled for
/// themselves (either way) do not count; host-network pods, waypoints and the system and root
/// namespaces are left out.
fn namespaces(context: &Context<'_>, findings: &mut Vec<Finding>) {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for w in context.workloads {
        let enrollment = w.enrollment(context.cluster.namespaces.get(&w.namespace));
        if enrollment == Enrollment::NotLabelled && !w.is_waypoint() {
            *counts.entry(w.namespace.as_str()).or_default() += 1;
        }
    }
    for (ns, count) in counts {
        if SYSTEM_NAMESPACES.contains(&ns) || ns == context.settings.root_namespace {
            continue;
        }
        let label = context
            .cluster
            .namespaces
            .get(ns)
            .and_then(|n| n.metadata.labels.get(DATAPLANE_MODE));
        if label.is_some_and(|v| v == "none") {
            continue;
        }
        findings.push(codes::NAMESPACE_NOT_ENROLLED.finding(
            format!("Namespace {ns}"),
            format!("metadata.labels[\"{DATAPLANE_MODE}\"]"),
            format!(
                "{count} pod{} not in the ambient mesh, and the namespace is not excluded with {DATAPLANE_MODE}=none",
                if count == 1 { " is" } else { "s are" }
            ),
        ));
    }
}

/// AMB0701: ports without a protocol on Services a waypoint serves.
fn port_protocols(context: &Context<'_>, findings: &mut Vec<Finding>) {
    let bindings = ambit_mesh::status::service_bindings(context.cluster);
    for (key, fact) in bindings {
        if !fact.status {
            continue;
        }
        let Some(service) = context.cluster.services.get(&key) else {
            continue;
        };
        for (i, port) in service.spec.ports.iter().enumerate() {
            if app_protocol(port) != AppProtocol::Unknown
                || matches!(port.protocol.as_str(), "UDP" | "SCTP")
            {
                continue;
            }
            let named = if port.name.is_empty() {
                "no name".to_string()
            } else {
                format!("name {:?}", port.name)
            };
            findings.push(codes::PORT_PROTOCOL_UNKNOWN.finding(
                format!("Service {}/{}", key.0, key.1),
                format!("spec.ports[{i}]"),
                format!(
                    "port {} ({named}) declares no protocol (no appProtocol, no protocol prefix in the name) for {}: its waypoint sniffs it",
                    port.port,
                    hostname(service, context.settings)
                ),
            ));
        }
    }
}
