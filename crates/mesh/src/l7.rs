//! Cluster objects to waypoint resources: HTTPRoutes and GRPCRoutes whose parent is a Service
//! (GAMMA) and VirtualServices whose hosts are Services become [`Route`](wp::Route)s,
//! DestinationRules of those Services become [`DestinationPolicy`](wp::DestinationPolicy)s,
//! AuthorizationPolicies that waypoints enforce become [`Policy`](wp::Policy)s, and every usable
//! waypoint gets the [`WaypointScope`] of names it is served. Pure, like the rest of the translation: a route or policy that cannot be honoured is
//! left out (or the part of it that cannot) with a warning naming the object and field, and the
//! others translate.

use std::collections::{BTreeMap, BTreeSet};

use ambit_proto::security as sec;
use ambit_proto::waypoint as wp;

use crate::gateway_api::{
    BackendRef, FilterType, GATEWAY_GROUP, GATEWAY_NAME_LABEL, GrpcRoute, HttpBackendRef,
    HttpHeaderMatch, HttpRoute, HttpRouteFilter, MatchType, ParentReference, PathModifier,
    PathModifierType, WAYPOINT_CLASS, parse_gateway_duration, route_regex,
};
use crate::objects::{AuthorizationPolicy, ObjectMeta, Service};
use crate::status::Fact;
use crate::translate::{Cluster, MeshSettings, Resources, hostname, selects, string_matches};
use crate::warning::{Warning, WarningKind};
use crate::waypoints::{self, Waypoints};

/// What one waypoint (a Gateway, keyed `<namespace>/<name>`) is served: the resource names of
/// its routes and policies.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WaypointScope {
    /// [`Route`](wp::Route) names (`<kind>/<namespace>/<name>`) whose parent Service is bound to
    /// the waypoint.
    pub routes: BTreeSet<String>,
    /// [`Policy`](wp::Policy) names (`<namespace>/<name>`) targeting the Gateway, its
    /// GatewayClass, or a Service bound to it.
    pub policies: BTreeSet<String>,
    /// [`DestinationPolicy`](wp::DestinationPolicy) names (`<namespace>/<name>`) whose host
    /// Service is bound to the waypoint.
    pub destination_policies: BTreeSet<String>,
}

/// A field of the object being translated and why it cannot be honoured.
type Refused = (String, String);

/// The `when` keys a waypoint evaluates (see the proto's `Condition`).
const WHEN_KEYS: [&str; 5] = [
    "source.ip",
    "source.namespace",
    "source.principal",
    "destination.port",
    "request.method",
];

/// Everything the translation reads, indexed once.
pub(crate) struct Context<'a> {
    pub(crate) cluster: &'a Cluster,
    pub(crate) settings: &'a MeshSettings,
    /// Service `(namespace, name)` → the waypoint (`ns/name`) serving its traffic.
    pub(crate) bound: BTreeMap<(String, String), String>,
}

impl Context<'_> {
    pub(crate) fn service(&self, namespace: &str, name: &str) -> Option<&Service> {
        self.cluster
            .services
            .get(&(namespace.to_string(), name.to_string()))
    }

    /// The Service an Istio host names, relative to `namespace`: `name`, `name.ns`,
    /// `name.ns.svc` or `name.ns.svc.<domain suffix>`.
    pub(crate) fn host_service(&self, host: &str, namespace: &str) -> Option<&Service> {
        host_service(self.cluster, self.settings, host, namespace)
    }

    pub(crate) fn address_name(&self, service: &Service) -> String {
        format!(
            "{}/{}",
            service.metadata.namespace,
            hostname(service, self.settings)
        )
    }
}

/// The Service an Istio host (a VirtualService host or destination, a DestinationRule host) names,
/// relative to `namespace`: `name`, `name.ns`, `name.ns.svc` or `name.ns.svc.<domain suffix>`.
pub fn host_service<'a>(
    cluster: &'a Cluster,
    settings: &MeshSettings,
    host: &str,
    namespace: &str,
) -> Option<&'a Service> {
    let service = |ns: &str, name: &str| cluster.services.get(&(ns.to_string(), name.to_string()));
    let parts: Vec<&str> = host.split('.').collect();
    let suffix = format!("svc.{}", settings.domain_suffix);
    match parts.as_slice() {
        [name] => service(namespace, name),
        [name, ns] => service(ns, name),
        [name, ns, "svc"] => service(ns, name),
        [name, ns, rest @ ..] if rest.join(".") == suffix => service(ns, name),
        _ => None,
    }
}

/// Adds the waypoint resources of `cluster` to `out`: routes, policies, scopes and warnings.
pub(crate) fn translate(
    cluster: &Cluster,
    settings: &MeshSettings,
    waypoints: &Waypoints,
    out: &mut Resources,
) {
    let mut bound = BTreeMap::new();
    for (key, service) in &cluster.services {
        if let Some(waypoint) = service_waypoint(service, cluster, waypoints) {
            bound.insert(key.clone(), waypoint);
        }
    }
    let context = Context {
        cluster,
        settings,
        bound,
    };
    let mut scopes: BTreeMap<String, WaypointScope> = waypoints
        .usable_keys()
        .map(|key| (key, WaypointScope::default()))
        .collect();

    let mut routes = Vec::new();
    for route in cluster.http_routes.values() {
        routes.extend(http_route(route, &context, &mut out.warnings));
    }
    for route in cluster.grpc_routes.values() {
        routes.extend(grpc_route(route, &context, &mut out.warnings));
    }
    let subsets = destination_policies(&context, out, &mut scopes);
    for vs in cluster.virtual_services.values() {
        routes.extend(crate::virtual_service::translate(
            vs,
            &context,
            &crate::virtual_service::Subsets(&subsets),
            &mut out.warnings,
        ));
    }
    for (route, served_by) in routes {
        let name = route.resource_name();
        for waypoint in served_by {
            if let Some(scope) = scopes.get_mut(&waypoint) {
                scope.routes.insert(name.clone());
            }
        }
        out.routes.insert(name, route);
    }

    // Services bound to each waypoint, by Address name, for policies targeting Services.
    let mut bound_services: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    for ((ns, name), waypoint) in &context.bound {
        if let Some(service) = context.service(ns, name) {
            bound_services
                .entry(context.address_name(service))
                .or_default()
                .push(waypoint);
        }
    }
    for policy in cluster.policies.values() {
        let before = out.warnings.len();
        let Some(resource) = waypoint_policy(policy, &context, waypoints, &mut out.warnings) else {
            if !policy.spec.target_refs.is_empty() {
                let why = out.warnings[before..]
                    .iter()
                    .map(Warning::to_string)
                    .collect::<Vec<_>>()
                    .join("; ");
                out.policy_status
                    .entry(format!(
                        "{}/{}",
                        policy.metadata.namespace, policy.metadata.name
                    ))
                    .or_default()
                    .waypoint = Some(Fact::no(WAYPOINT_INVALID, why));
            }
            continue;
        };
        let name = resource.resource_name();
        let mut served = false;
        let mut bound_targets: Vec<String> = Vec::new();
        let mut unbound_targets: Vec<(String, &'static str)> = Vec::new();
        for target in &resource.targets {
            use wp::policy_target::Kind;
            let waypoints: Vec<String> = match &target.kind {
                Some(Kind::Gateway(gateway)) => vec![gateway.clone()],
                Some(Kind::Service(service)) => bound_services
                    .get(service)
                    .map(|w| w.iter().map(|s| s.to_string()).collect())
                    .unwrap_or_default(),
                // Every usable waypoint is of class istio-waypoint.
                Some(Kind::GatewayClass(class)) if class == WAYPOINT_CLASS => {
                    scopes.keys().cloned().collect()
                }
                _ => Vec::new(),
            };
            let mut bound_here = Vec::new();
            for waypoint in waypoints {
                if let Some(scope) = scopes.get_mut(&waypoint) {
                    scope.policies.insert(name.clone());
                    served = true;
                    bound_here.push(waypoint);
                }
            }
            let (label, missing) = target_label(&target.kind, cluster);
            if bound_here.is_empty() {
                let reason = if missing {
                    WAYPOINT_TARGET_NOT_FOUND
                } else if matches!(target.kind, Some(Kind::Service(_))) {
                    WAYPOINT_ANCESTOR_NOT_BOUND
                } else {
                    WAYPOINT_INVALID
                };
                unbound_targets.push((label, reason));
            } else {
                bound_targets.push(format!("{label} (waypoint {})", bound_here.join(", ")));
            }
        }
        // targetRefs the translation could not use at all (warned about above).
        let ignored = policy
            .spec
            .target_refs
            .len()
            .saturating_sub(resource.targets.len());
        for _ in 0..ignored {
            unbound_targets.push(("an unsupported targetRef".into(), WAYPOINT_INVALID));
        }
        if !policy.spec.target_refs.is_empty() {
            let fact = waypoint_fact(&bound_targets, &unbound_targets);
            out.policy_status
                .entry(format!(
                    "{}/{}",
                    policy.metadata.namespace, policy.metadata.name
                ))
                .or_default()
                .waypoint = Some(fact);
        }
        let other_gateway = policy.spec.target_refs.iter().any(|t| {
            t.kind == "Gateway"
                && cluster
                    .gateways
                    .get(&(policy.metadata.namespace.clone(), t.name.clone()))
                    .is_some_and(|g| g.spec.gateway_class_name != WAYPOINT_CLASS)
        });
        if !served && !other_gateway {
            warn(
                &mut out.warnings,
                WarningKind::PolicyTargetNoWaypoint,
                &policy_name(&policy.metadata),
                "spec.targetRefs",
                "no target has a usable waypoint; the policy is not enforced",
            );
        }
        out.l7_policies.insert(name, resource);
    }
    out.waypoint_scopes = scopes;
}

/// `WaypointAccepted` reasons (Istio's).
const WAYPOINT_ACCEPTED: &str = "Accepted";
const WAYPOINT_PARTIALLY_INVALID: &str = "PartiallyInvalid";
const WAYPOINT_INVALID: &str = "Invalid";
const WAYPOINT_ANCESTOR_NOT_BOUND: &str = "AncestorNotBound";
const WAYPOINT_TARGET_NOT_FOUND: &str = "TargetNotFound";

/// A policy target as a person names it, and whether the object it names is missing.
fn target_label(kind: &Option<wp::policy_target::Kind>, cluster: &Cluster) -> (String, bool) {
    use wp::policy_target::Kind;
    match kind {
        Some(Kind::Gateway(key)) => {
            let (ns, name) = key.split_once('/').unwrap_or(("", key));
            let missing = !cluster
                .gateways
                .contains_key(&(ns.to_string(), name.to_string()));
            (format!("Gateway {key}"), missing)
        }
        Some(Kind::Service(address)) => {
            // `namespace/name.namespace.svc.<suffix>`
            let (ns, host) = address.split_once('/').unwrap_or(("", address));
            let name = host.split('.').next().unwrap_or(host);
            let missing = !cluster
                .services
                .contains_key(&(ns.to_string(), name.to_string()));
            (format!("Service {ns}/{name}"), missing)
        }
        Some(Kind::GatewayClass(class)) => (format!("GatewayClass {class}"), false),
        None => ("a target".into(), false),
    }
}

/// `WaypointAccepted` from the targets that reached a waypoint and those that did not (with the
/// reason of each): bound when any did, as Istio folds several targets into one condition.
fn waypoint_fact(bound: &[String], unbound: &[(String, &'static str)]) -> Fact {
    let invalid = unbound
        .iter()
        .map(|(label, _)| label.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    match (bound.is_empty(), unbound) {
        (false, []) => Fact::yes(WAYPOINT_ACCEPTED, format!("bound to {}", bound.join(", "))),
        (false, _) => Fact::yes(
            WAYPOINT_PARTIALLY_INVALID,
            format!(
                "bound to {}; invalid targetRefs (no usable waypoint): {invalid}",
                bound.join(", ")
            ),
        ),
        (true, [(label, reason)]) => Fact::no(
            reason,
            match *reason {
                WAYPOINT_TARGET_NOT_FOUND => format!("{label} does not exist"),
                WAYPOINT_ANCESTOR_NOT_BOUND => format!(
                    "{label} is not bound to a usable waypoint (label it istio.io/use-waypoint)"
                ),
                _ => format!("{label} has no usable waypoint"),
            },
        ),
        (true, _) => Fact::no(
            WAYPOINT_INVALID,
            format!("invalid targetRefs (no usable waypoint): {invalid}"),
        ),
    }
}

pub(crate) fn warn(
    warnings: &mut Vec<Warning>,
    kind: WarningKind,
    named: &str,
    field: &str,
    reason: &str,
) {
    warnings.push(Warning::new(kind, named, field, reason));
}

/// Translates every DestinationRule whose host is a Service into a DestinationPolicy (added to
/// `out` and to the scope of the Service's waypoint); returns the subset names declared for each
/// Service (by Address name), which VirtualServices are checked against.
fn destination_policies(
    context: &Context<'_>,
    out: &mut Resources,
    scopes: &mut BTreeMap<String, WaypointScope>,
) -> BTreeMap<String, BTreeSet<String>> {
    use crate::destination_rule::{EndpointLabels, destination_policy};
    // Endpoints of each Service (by Address name): the workloads listing it, with pod labels.
    let mut endpoints: BTreeMap<&str, Vec<EndpointLabels<'_>>> = BTreeMap::new();
    for address in out.addresses.values() {
        let Some(ambit_proto::workload::address::Type::Workload(workload)) = &address.r#type else {
            continue;
        };
        let labels = context
            .cluster
            .pods
            .get(&(workload.namespace.clone(), workload.name.clone()))
            .filter(|_| workload.uid.contains("//Pod/"))
            .map(|pod| &pod.metadata.labels);
        for service in workload.services.keys() {
            endpoints
                .entry(service.as_str())
                .or_default()
                .push(EndpointLabels {
                    uid: &workload.uid,
                    labels,
                });
        }
    }
    let mut subsets: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut policies = Vec::new();
    let mut by_service: BTreeMap<String, String> = BTreeMap::new();
    for rule in context.cluster.destination_rules.values() {
        let meta = &rule.metadata;
        let named = format!("DestinationRule {}/{}", meta.namespace, meta.name);
        let Some(service) = context.host_service(&rule.spec.host, &meta.namespace) else {
            warn(
                &mut out.warnings,
                WarningKind::DestinationRuleHostNotFound,
                &named,
                "spec.host",
                &format!(
                    "{:?} is not a Service; the DestinationRule is not served to waypoints",
                    rule.spec.host
                ),
            );
            continue;
        };
        let address = context.address_name(service);
        let key = (
            service.metadata.namespace.clone(),
            service.metadata.name.clone(),
        );
        let waypoint = context.bound.get(&key);
        if waypoint.is_none() {
            warn(
                &mut out.warnings,
                WarningKind::DestinationRuleHasNoEffect,
                &named,
                "spec.host",
                &format!(
                    "Service {}/{} has no waypoint: the DestinationRule has no effect on it",
                    key.0, key.1
                ),
            );
        }
        let name = format!("{}/{}", meta.namespace, meta.name);
        if let Some(other) = by_service.insert(address.clone(), name.clone()) {
            warn(
                &mut out.warnings,
                WarningKind::DuplicateDestinationRule,
                &named,
                "spec.host",
                &format!(
                    "DestinationRule {other} names the same Service; both are served and the waypoint does not merge them"
                ),
            );
        }
        subsets
            .entry(address.clone())
            .or_default()
            .extend(rule.spec.subsets.iter().map(|s| s.name.clone()));
        let resource = destination_policy(
            rule,
            address.clone(),
            endpoints.get(address.as_str()).map_or(&[], Vec::as_slice),
            &mut out.warnings,
        );
        policies.push((name, resource, waypoint.cloned()));
    }
    for (name, resource, waypoint) in policies {
        if let Some(scope) = waypoint.and_then(|w| scopes.get_mut(&w)) {
            scope.destination_policies.insert(name.clone());
        }
        out.destination_policies.insert(name, resource);
    }
    subsets
}

/// The waypoint (`ns/name`) taking a Service's traffic: its own `istio.io/use-waypoint`, else
/// its namespace's, naming a usable Gateway that takes service traffic.
fn service_waypoint(service: &Service, cluster: &Cluster, waypoints: &Waypoints) -> Option<String> {
    let meta = &service.metadata;
    if meta.labels.contains_key(GATEWAY_NAME_LABEL) {
        return None;
    }
    let binding = waypoints::binding(&meta.labels, &meta.namespace, cluster)?;
    let waypoint = waypoints.resolve(&binding).ok()?;
    waypoint
        .for_services
        .then(|| format!("{}/{}", binding.namespace, binding.name))
}

// ---------------------------------------------------------------------------------------------
// Routes
// ---------------------------------------------------------------------------------------------

/// The Service parents of a route that can take it, and the waypoints serving them; `None` when
/// the route has no Service parent at all (a route for a Gateway: not a waypoint's).
fn parents(
    kind: &str,
    meta: &ObjectMeta,
    refs: &[ParentReference],
    context: &Context<'_>,
    warnings: &mut Vec<Warning>,
) -> Option<(Vec<wp::ParentRef>, BTreeSet<String>)> {
    let named = format!("{kind} {}/{}", meta.namespace, meta.name);
    let mut out = Vec::new();
    let mut served_by = BTreeSet::new();
    let mut any_service = false;
    for (i, parent) in refs.iter().enumerate() {
        if !parent.is_service() {
            continue;
        }
        any_service = true;
        let at = format!("spec.parentRefs[{i}]");
        let ns = parent.namespace.as_deref().unwrap_or(&meta.namespace);
        let Some(service) = context.service(ns, &parent.name) else {
            warn(
                warnings,
                WarningKind::RouteParentNotFound,
                &named,
                &at,
                &format!(
                    "Service {ns}/{} does not exist; the parent is ignored",
                    parent.name
                ),
            );
            continue;
        };
        let waypoint = context.bound.get(&(ns.to_string(), parent.name.clone()));
        let waypoint_ns = waypoint.and_then(|w| w.split_once('/')).map(|(n, _)| n);
        if ns != meta.namespace && waypoint_ns != Some(meta.namespace.as_str()) {
            warn(
                warnings,
                WarningKind::RouteNotAllowed,
                &named,
                &format!("{at}.namespace"),
                &format!(
                    "Service {ns}/{} is in another namespace and the route is not in its waypoint's namespace (ambient has no consumer routes); the parent is ignored",
                    parent.name
                ),
            );
            continue;
        }
        if let Some(port) = parent.port
            && !service.spec.ports.iter().any(|p| u32::from(p.port) == port)
        {
            warn(
                warnings,
                WarningKind::RouteParentPortNotFound,
                &named,
                &format!("{at}.port"),
                &format!(
                    "Service {ns}/{} has no port {port}; the parent is ignored",
                    parent.name
                ),
            );
            continue;
        }
        match waypoint {
            Some(w) => {
                served_by.insert(w.clone());
            }
            None => warn(
                warnings,
                WarningKind::RouteHasNoEffect,
                &named,
                &at,
                &format!(
                    "Service {ns}/{} has no waypoint: the route has no effect on it",
                    parent.name
                ),
            ),
        }
        out.push(wp::ParentRef {
            service: context.address_name(service),
            port: parent.port.unwrap_or(0),
        });
    }
    if !any_service {
        return None;
    }
    if out.is_empty() {
        warn(
            warnings,
            WarningKind::RouteNotServed,
            &named,
            "spec.parentRefs",
            "no Service parent can take the route; it is not served",
        );
        return None;
    }
    Some((out, served_by))
}

/// `metadata.creationTimestamp` as Unix seconds (0 when absent or unreadable).
pub(crate) fn created(meta: &ObjectMeta) -> i64 {
    meta.creation_timestamp
        .as_deref()
        .and_then(|t| humantime::parse_rfc3339_weak(t).ok())
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .and_then(|d| i64::try_from(d.as_secs()).ok())
        .unwrap_or(0)
}

fn route_refused(kind: &str, meta: &ObjectMeta, (field, reason): Refused) -> Warning {
    Warning::new(
        WarningKind::RouteNotServed,
        format!("{kind} {}/{}", meta.namespace, meta.name),
        field,
        format!("{reason}{ROUTE_NOT_SERVED}"),
    )
}

/// How the reason of a warning about a whole route left out ends (route status reads these).
pub(crate) const ROUTE_NOT_SERVED: &str = "; the route is not served";

fn http_route(
    route: &HttpRoute,
    context: &Context<'_>,
    warnings: &mut Vec<Warning>,
) -> Option<(wp::Route, BTreeSet<String>)> {
    let meta = &route.metadata;
    let (parents, served_by) = parents(
        "HTTPRoute",
        meta,
        &route.spec.parent_refs,
        context,
        warnings,
    )?;
    let named = format!("HTTPRoute {}/{}", meta.namespace, meta.name);
    let mut rules = Vec::new();
    for (r, rule) in route.spec.rules.iter().enumerate() {
        let at = format!("spec.rules[{r}]");
        let translated = (|| {
            let mut matches = Vec::new();
            for (m, matched) in rule.matches.iter().enumerate() {
                let at = format!("{at}.matches[{m}]");
                let path = match &matched.path {
                    None => None,
                    Some(path) => Some(wp::PathMatch {
                        r#type: match path.kind {
                            MatchType::Exact => wp::MatchType::Exact,
                            MatchType::PathPrefix => wp::MatchType::Prefix,
                            MatchType::RegularExpression => {
                                compiles(&format!("{at}.path.value"), &path.value)?;
                                wp::MatchType::Regex
                            }
                            MatchType::Unknown => {
                                return Err((
                                    format!("{at}.path.type"),
                                    "must be Exact, PathPrefix or RegularExpression".to_string(),
                                ));
                            }
                        } as i32,
                        value: path.value.clone(),
                    }),
                };
                matches.push(wp::RouteMatch {
                    path,
                    headers: string_match_list(&at, "headers", &matched.headers, true)?,
                    query_params: string_match_list(
                        &at,
                        "queryParams",
                        &matched.query_params,
                        false,
                    )?,
                    method: matched.method.clone().unwrap_or_default(),
                    grpc: None,
                    without_headers: Vec::new(),
                });
            }
            Ok(matches)
        })();
        let matches = match translated {
            Ok(m) => m,
            Err(refused) => {
                warnings.push(route_refused("HTTPRoute", meta, refused));
                return None;
            }
        };
        let mut rule_out = rule_body(
            &named,
            &at,
            &meta.namespace,
            &rule.filters,
            &rule.backend_refs,
            context,
            warnings,
        );
        rule_out.name = rule.name.clone().unwrap_or_default();
        rule_out.matches = matches;
        rule_out.timeouts = rule.timeouts.as_ref().map(|t| wp::Timeouts {
            request: t.request.as_deref().and_then(duration),
            backend_request: t.backend_request.as_deref().and_then(duration),
        });
        rule_out.retry = rule.retry.as_ref().map(http_route_retry);
        rules.push(rule_out);
    }
    Some((
        wp::Route {
            namespace: meta.namespace.clone(),
            name: meta.name.clone(),
            kind: wp::RouteKind::Http as i32,
            parents,
            rules,
            creation_timestamp: created(meta),
            hostnames: route.spec.hostnames.clone(),
        },
        served_by,
    ))
}

fn grpc_route(
    route: &GrpcRoute,
    context: &Context<'_>,
    warnings: &mut Vec<Warning>,
) -> Option<(wp::Route, BTreeSet<String>)> {
    let meta = &route.metadata;
    let (parents, served_by) = parents(
        "GRPCRoute",
        meta,
        &route.spec.parent_refs,
        context,
        warnings,
    )?;
    let named = format!("GRPCRoute {}/{}", meta.namespace, meta.name);
    let mut rules = Vec::new();
    for (r, rule) in route.spec.rules.iter().enumerate() {
        let at = format!("spec.rules[{r}]");
        let translated = (|| {
            let mut matches = Vec::new();
            for (m, matched) in rule.matches.iter().enumerate() {
                let at = format!("{at}.matches[{m}]");
                let grpc = match &matched.method {
                    None => None,
                    Some(method) => {
                        let service = method.service.clone().unwrap_or_default();
                        let name = method.method.clone().unwrap_or_default();
                        let kind = match method.kind {
                            MatchType::Exact => wp::MatchType::Exact,
                            MatchType::RegularExpression => {
                                if !service.is_empty() {
                                    compiles(&format!("{at}.method.service"), &service)?;
                                }
                                if !name.is_empty() {
                                    compiles(&format!("{at}.method.method"), &name)?;
                                }
                                wp::MatchType::Regex
                            }
                            _ => {
                                return Err((
                                    format!("{at}.method.type"),
                                    "must be Exact or RegularExpression".to_string(),
                                ));
                            }
                        };
                        Some(wp::GrpcMethodMatch {
                            r#type: kind as i32,
                            service,
                            method: name,
                        })
                    }
                };
                matches.push(wp::RouteMatch {
                    headers: string_match_list(&at, "headers", &matched.headers, true)?,
                    grpc,
                    ..Default::default()
                });
            }
            Ok(matches)
        })();
        let matches = match translated {
            Ok(m) => m,
            Err(refused) => {
                warnings.push(route_refused("GRPCRoute", meta, refused));
                return None;
            }
        };
        let mut rule_out = rule_body(
            &named,
            &at,
            &meta.namespace,
            &rule.filters,
            &rule.backend_refs,
            context,
            warnings,
        );
        rule_out.name = rule.name.clone().unwrap_or_default();
        rule_out.matches = matches;
        rules.push(rule_out);
    }
    Some((
        wp::Route {
            namespace: meta.namespace.clone(),
            name: meta.name.clone(),
            kind: wp::RouteKind::Grpc as i32,
            parents,
            rules,
            creation_timestamp: created(meta),
            hostnames: route.spec.hostnames.clone(),
        },
        served_by,
    ))
}

/// The Envoy policies retried, besides `codes`, when an HTTPRoute names status codes (as Istio
/// translates Gateway API retries): connection failures and refused or reset streams.
const HTTP_ROUTE_RETRY_ON: [&str; 5] = [
    "connect-failure",
    "refused-stream",
    "unavailable",
    "cancelled",
    "retriable-status-codes",
];

/// The attempts of an HTTPRoute `retry` without `attempts` (Istio's default).
const HTTP_ROUTE_RETRY_ATTEMPTS: u32 = 2;

/// HTTPRoute `retry` → Retry: `attempts` (retries after the first try; default 2), `codes`,
/// `backoff`. Without codes, the waypoint's default conditions apply.
fn http_route_retry(retry: &crate::gateway_api::HttpRouteRetry) -> wp::Retry {
    wp::Retry {
        attempts: retry.attempts.unwrap_or(HTTP_ROUTE_RETRY_ATTEMPTS),
        per_try_timeout: None,
        codes: retry.codes.clone(),
        retry_on: if retry.codes.is_empty() {
            Vec::new()
        } else {
            HTTP_ROUTE_RETRY_ON.iter().map(|s| s.to_string()).collect()
        },
        backoff: retry.backoff.as_deref().and_then(duration),
    }
}

fn compiles(field: &str, pattern: &str) -> Result<(), Refused> {
    route_regex(pattern).map(|_| ()).map_err(|e| {
        (
            field.to_string(),
            format!("{pattern:?} is not a regular expression (RE2 syntax): {e}"),
        )
    })
}

/// Header (names lower-cased) or query parameter (names exact) matches.
fn string_match_list(
    at: &str,
    list: &str,
    entries: &[HttpHeaderMatch],
    lower_case: bool,
) -> Result<Vec<wp::StringMatch>, Refused> {
    let mut out = Vec::with_capacity(entries.len());
    for (i, entry) in entries.iter().enumerate() {
        let kind = match entry.kind {
            MatchType::Exact => wp::MatchType::Exact,
            MatchType::RegularExpression => {
                compiles(&format!("{at}.{list}[{i}].value"), &entry.value)?;
                wp::MatchType::Regex
            }
            _ => {
                return Err((
                    format!("{at}.{list}[{i}].type"),
                    "must be Exact or RegularExpression".to_string(),
                ));
            }
        };
        out.push(wp::StringMatch {
            name: if lower_case {
                entry.name.to_ascii_lowercase()
            } else {
                entry.name.clone()
            },
            r#type: kind as i32,
            value: entry.value.clone(),
        });
    }
    Ok(out)
}

fn duration(text: &str) -> Option<prost_types::Duration> {
    proto_duration(parse_gateway_duration(text)?)
}

/// A duration as protobuf writes it.
pub(crate) fn proto_duration(d: std::time::Duration) -> Option<prost_types::Duration> {
    Some(prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).ok()?,
        nanos: i32::try_from(d.subsec_nanos()).ok()?,
    })
}

/// A rule's filters and backends. An `ExtensionRef` filter cannot be applied, and the Gateway
/// API forbids skipping it: the rule (or the backend carrying it) then answers 500.
fn rule_body(
    named: &str,
    at: &str,
    route_ns: &str,
    filters: &[HttpRouteFilter],
    backend_refs: &[HttpBackendRef],
    context: &Context<'_>,
    warnings: &mut Vec<Warning>,
) -> wp::Rule {
    let (filters, broken) = filter_list(named, at, route_ns, filters, context, warnings);
    let mut backends = Vec::with_capacity(backend_refs.len());
    for (b, backend_ref) in backend_refs.iter().enumerate() {
        let at = format!("{at}.backendRefs[{b}]");
        let mut backend = resolve_backend(
            named,
            &at,
            route_ns,
            &backend_ref.backend,
            context,
            warnings,
        );
        backend.weight = backend_ref.weight();
        let (filters, backend_broken) = filter_list(
            named,
            &at,
            route_ns,
            &backend_ref.filters,
            context,
            warnings,
        );
        backend.filters = filters;
        if let Some(why) = backend_broken
            && backend.invalid.is_empty()
        {
            backend.service.clear();
            backend.invalid = why;
        }
        backends.push(backend);
    }
    if let Some(why) = broken {
        backends = vec![wp::Backend {
            weight: 1,
            invalid: why,
            ..Default::default()
        }];
    }
    wp::Rule {
        filters,
        backends,
        ..Default::default()
    }
}

/// Translated filters, and why requests must get 500 when one cannot be applied.
fn filter_list(
    named: &str,
    at: &str,
    route_ns: &str,
    filters: &[HttpRouteFilter],
    context: &Context<'_>,
    warnings: &mut Vec<Warning>,
) -> (Vec<wp::Filter>, Option<String>) {
    use wp::filter::Kind;
    let mut out = Vec::with_capacity(filters.len());
    let mut broken = None;
    for (f, filter) in filters.iter().enumerate() {
        let at = format!("{at}.filters[{f}]");
        let kind = match filter.kind {
            FilterType::RequestHeaderModifier => filter
                .request_header_modifier
                .as_ref()
                .map(|m| Kind::RequestHeaderModifier(header_modifier(m))),
            FilterType::ResponseHeaderModifier => filter
                .response_header_modifier
                .as_ref()
                .map(|m| Kind::ResponseHeaderModifier(header_modifier(m))),
            FilterType::RequestRedirect => filter.request_redirect.as_ref().map(|r| {
                Kind::RequestRedirect(wp::RequestRedirect {
                    scheme: r.scheme.clone().unwrap_or_default(),
                    hostname: r.hostname.clone().unwrap_or_default(),
                    port: r.port.unwrap_or(0),
                    path: r.path.as_ref().and_then(path_modifier),
                    status_code: r.status_code.unwrap_or(302),
                })
            }),
            FilterType::UrlRewrite => filter.url_rewrite.as_ref().map(|r| {
                Kind::UrlRewrite(wp::UrlRewrite {
                    hostname: r.hostname.clone().unwrap_or_default(),
                    path: r.path.as_ref().and_then(path_modifier),
                })
            }),
            FilterType::RequestMirror => filter.request_mirror.as_ref().map(|m| {
                let backend = resolve_backend(
                    named,
                    &format!("{at}.requestMirror.backendRef"),
                    route_ns,
                    &m.backend_ref,
                    context,
                    warnings,
                );
                let (numerator, denominator) = match (&m.fraction, m.percent) {
                    (Some(f), _) => (f.numerator, f.denominator.unwrap_or(100)),
                    (None, Some(p)) => (p, 100),
                    (None, None) => (0, 0),
                };
                Kind::RequestMirror(wp::RequestMirror {
                    backend: Some(backend),
                    numerator,
                    denominator,
                })
            }),
            FilterType::ExtensionRef | FilterType::Unknown => {
                warn(
                    warnings,
                    WarningKind::UnsupportedFilter,
                    named,
                    &at,
                    "ExtensionRef filters are not supported; requests it applies to get 500",
                );
                broken.get_or_insert(format!("{at}: ExtensionRef filters are not supported"));
                None
            }
        };
        if let Some(kind) = kind {
            out.push(wp::Filter { kind: Some(kind) });
        }
    }
    (out, broken)
}

fn header_modifier(m: &crate::gateway_api::HeaderModifier) -> wp::HeaderModifier {
    let headers = |list: &[crate::gateway_api::HttpHeader]| {
        list.iter()
            .map(|h| wp::Header {
                name: h.name.to_ascii_lowercase(),
                value: h.value.clone(),
            })
            .collect()
    };
    wp::HeaderModifier {
        set: headers(&m.set),
        add: headers(&m.add),
        remove: m.remove.iter().map(|n| n.to_ascii_lowercase()).collect(),
    }
}

fn path_modifier(m: &PathModifier) -> Option<wp::PathModifier> {
    let (kind, value) = match m.kind {
        PathModifierType::ReplaceFullPath => {
            (wp::PathModifierType::Full, m.replace_full_path.clone()?)
        }
        PathModifierType::ReplacePrefixMatch => (
            wp::PathModifierType::PrefixMatch,
            m.replace_prefix_match.clone()?,
        ),
        PathModifierType::Unknown => return None,
    };
    Some(wp::PathModifier {
        r#type: kind as i32,
        value,
    })
}

/// A backendRef resolved to a Service port, or marked invalid (with a warning) so that requests
/// landing on it get 500, as the Gateway API asks.
fn resolve_backend(
    named: &str,
    at: &str,
    route_ns: &str,
    backend: &BackendRef,
    context: &Context<'_>,
    warnings: &mut Vec<Warning>,
) -> wp::Backend {
    let ns = backend.namespace.as_deref().unwrap_or(route_ns);
    let port = backend.port.unwrap_or(0);
    let invalid = if !backend.is_service() {
        let group = backend.group.as_deref().unwrap_or("");
        let kind = backend.kind.as_deref().unwrap_or("Service");
        Err((
            WarningKind::BackendNotPermitted,
            format!("backend kind {group}/{kind} is not supported (only core Services)"),
        ))
    } else if ns != route_ns {
        Err((
            WarningKind::BackendNotPermitted,
            format!(
                "Service {ns}/{} is in another namespace, which needs a ReferenceGrant (not read by Ambit)",
                backend.name
            ),
        ))
    } else {
        match context.service(ns, &backend.name) {
            None => Err((
                WarningKind::BackendNotFound,
                format!("Service {ns}/{} does not exist", backend.name),
            )),
            Some(service) if !service.spec.ports.iter().any(|p| u32::from(p.port) == port) => {
                Err((
                    WarningKind::BackendPortNotFound,
                    format!("Service {ns}/{} has no port {port}", backend.name),
                ))
            }
            Some(service) => Ok(context.address_name(service)),
        }
    };
    match invalid {
        Ok(service) => wp::Backend {
            service,
            port,
            weight: 1,
            ..Default::default()
        },
        Err((kind, why)) => {
            warn(
                warnings,
                kind,
                named,
                at,
                &format!("{why}; requests routed to it get 500"),
            );
            wp::Backend {
                port,
                weight: 1,
                invalid: why,
                ..Default::default()
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Policies
// ---------------------------------------------------------------------------------------------

fn policy_name(meta: &ObjectMeta) -> String {
    format!("AuthorizationPolicy {}/{}", meta.namespace, meta.name)
}

/// The waypoint resource of a policy bound by `targetRefs` or whose selector matches a
/// waypoint's pods; `None` for other policies and for refused ones (with a warning).
fn waypoint_policy(
    policy: &AuthorizationPolicy,
    context: &Context<'_>,
    waypoints: &Waypoints,
    warnings: &mut Vec<Warning>,
) -> Option<wp::Policy> {
    use wp::policy_target::Kind;
    let meta = &policy.metadata;
    let named = policy_name(meta);
    let mut targets = Vec::new();
    for (i, target) in policy.spec.target_refs.iter().enumerate() {
        let at = format!("spec.targetRefs[{i}]");
        let kind = match (target.group.as_str(), target.kind.as_str()) {
            (GATEWAY_GROUP, "Gateway") => {
                Kind::Gateway(format!("{}/{}", meta.namespace, target.name))
            }
            ("", "Service") => Kind::Service(format!(
                "{}/{}.{}.svc.{}",
                meta.namespace, target.name, meta.namespace, context.settings.domain_suffix
            )),
            (GATEWAY_GROUP, "GatewayClass") => {
                if meta.namespace != context.settings.root_namespace {
                    warn(
                        warnings,
                        WarningKind::PolicyTargetIgnored,
                        &named,
                        &at,
                        &format!(
                            "a GatewayClass can be targeted only from the root namespace {}; the target is ignored",
                            context.settings.root_namespace
                        ),
                    );
                    continue;
                }
                Kind::GatewayClass(target.name.clone())
            }
            (group, kind) => {
                warn(
                    warnings,
                    WarningKind::PolicyTargetIgnored,
                    &named,
                    &format!("{at}.kind"),
                    &format!(
                        "{group}/{kind} is not a target waypoints enforce (gateway.networking.k8s.io/Gateway, /Service or gateway.networking.k8s.io/GatewayClass); the target is ignored"
                    ),
                );
                continue;
            }
        };
        targets.push(wp::PolicyTarget { kind: Some(kind) });
    }
    if policy.spec.target_refs.is_empty() {
        let selector = policy
            .spec
            .selector
            .as_ref()
            .filter(|s| !s.match_labels.is_empty())?;
        for key in waypoints.usable_keys() {
            let Some((ns, name)) = key.split_once('/') else {
                continue;
            };
            if ns != meta.namespace && meta.namespace != context.settings.root_namespace {
                continue;
            }
            let own: BTreeMap<String, String> =
                [(GATEWAY_NAME_LABEL.to_string(), name.to_string())].into();
            let pods = context
                .cluster
                .pods
                .range((ns.to_string(), String::new())..)
                .take_while(|((pod_ns, _), _)| pod_ns == ns)
                .map(|(_, pod)| &pod.metadata.labels)
                .filter(|labels| labels.get(GATEWAY_NAME_LABEL).map(String::as_str) == Some(name));
            if selects(&selector.match_labels, &own)
                || pods
                    .into_iter()
                    .any(|labels| selects(&selector.match_labels, labels))
            {
                targets.push(wp::PolicyTarget {
                    kind: Some(Kind::Gateway(key.clone())),
                });
            }
        }
        if targets.is_empty() {
            return None;
        }
    }
    let refused = |(field, reason): Refused, warnings: &mut Vec<Warning>| {
        warn(
            warnings,
            WarningKind::PolicyNotEnforced,
            &named,
            &field,
            &format!("{reason}; the policy is not served to waypoints"),
        );
    };
    let action = match policy.spec.action.as_str() {
        "" | "ALLOW" => wp::Action::Allow,
        "DENY" => wp::Action::Deny,
        "AUDIT" => wp::Action::Audit,
        other => {
            refused(
                (
                    "spec.action".into(),
                    format!("{other} (external authorization) is not supported"),
                ),
                warnings,
            );
            return None;
        }
    };
    let rules = match policy_rules(policy) {
        Ok(rules) => rules,
        Err(e) => {
            refused(e, warnings);
            return None;
        }
    };
    Some(wp::Policy {
        namespace: meta.namespace.clone(),
        name: meta.name.clone(),
        action: action as i32,
        dry_run: meta
            .annotations
            .get("istio.io/dry-run")
            .is_some_and(|v| v == "true"),
        targets,
        rules,
    })
}

/// Principals as the waypoint compares them: without `spiffe://`.
fn principals(values: &[String]) -> Vec<sec::StringMatch> {
    let stripped: Vec<String> = values
        .iter()
        .map(|v| v.strip_prefix("spiffe://").unwrap_or(v).to_string())
        .collect();
    string_matches(&stripped)
}

fn cidrs(field: &str, values: &[String]) -> Result<Vec<sec::Address>, Refused> {
    values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let net: ipnet::IpNet = v
                .parse()
                .or_else(|_| v.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                .map_err(|_| {
                    (
                        format!("{field}[{i}]"),
                        format!("{v:?} is not an IP address or CIDR"),
                    )
                })?;
            Ok(sec::Address {
                address: match net.addr() {
                    std::net::IpAddr::V4(a) => a.octets().to_vec(),
                    std::net::IpAddr::V6(a) => a.octets().to_vec(),
                },
                length: u32::from(net.prefix_len()),
            })
        })
        .collect()
}

fn port_list(field: &str, values: &[String]) -> Result<Vec<u32>, Refused> {
    values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            v.parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .map(u32::from)
                .ok_or_else(|| {
                    (
                        format!("{field}[{i}]"),
                        format!("{v:?} is not a port number"),
                    )
                })
        })
        .collect()
}

fn policy_rules(policy: &AuthorizationPolicy) -> Result<Vec<wp::PolicyRule>, Refused> {
    let mut out = Vec::new();
    for (r, rule) in policy.spec.rules.iter().flatten().enumerate() {
        let at = format!("spec.rules[{r}]");
        let mut from = Vec::with_capacity(rule.from.len());
        for (f, entry) in rule.from.iter().enumerate() {
            let s = &entry.source;
            let at = format!("{at}.from[{f}].source");
            for (field, values) in [
                ("requestPrincipals", &s.request_principals),
                ("notRequestPrincipals", &s.not_request_principals),
            ] {
                if !values.is_empty() {
                    return Err((
                        format!("{at}.{field}"),
                        "JWT request principals are not supported (no RequestAuthentication)"
                            .into(),
                    ));
                }
            }
            let mut ip_blocks = cidrs(&format!("{at}.ipBlocks"), &s.ip_blocks)?;
            ip_blocks.extend(cidrs(&format!("{at}.remoteIpBlocks"), &s.remote_ip_blocks)?);
            let mut not_ip_blocks = cidrs(&format!("{at}.notIpBlocks"), &s.not_ip_blocks)?;
            not_ip_blocks.extend(cidrs(
                &format!("{at}.notRemoteIpBlocks"),
                &s.not_remote_ip_blocks,
            )?);
            from.push(wp::Source {
                principals: principals(&s.principals),
                not_principals: principals(&s.not_principals),
                namespaces: string_matches(&s.namespaces),
                not_namespaces: string_matches(&s.not_namespaces),
                ip_blocks,
                not_ip_blocks,
            });
        }
        let mut to = Vec::with_capacity(rule.to.len());
        for (t, entry) in rule.to.iter().enumerate() {
            let o = &entry.operation;
            let at = format!("{at}.to[{t}].operation");
            to.push(wp::Operation {
                hosts: string_matches(&o.hosts),
                not_hosts: string_matches(&o.not_hosts),
                ports: port_list(&format!("{at}.ports"), &o.ports)?,
                not_ports: port_list(&format!("{at}.notPorts"), &o.not_ports)?,
                methods: string_matches(&o.methods),
                not_methods: string_matches(&o.not_methods),
                paths: string_matches(&o.paths),
                not_paths: string_matches(&o.not_paths),
            });
        }
        let mut when = Vec::with_capacity(rule.when.len());
        for (w, condition) in rule.when.iter().enumerate() {
            let at = format!("{at}.when[{w}]");
            when.push(condition_of(&at, condition)?);
        }
        out.push(wp::PolicyRule { from, to, when });
    }
    Ok(out)
}

/// A `when` condition with a key the waypoint evaluates; values checked where the key has a type.
fn condition_of(
    at: &str,
    condition: &crate::objects::WhenCondition,
) -> Result<wp::Condition, Refused> {
    let key = condition.key.as_str();
    let header = key
        .strip_prefix("request.headers[")
        .and_then(|rest| rest.strip_suffix(']'))
        .filter(|name| !name.is_empty());
    let key = match header {
        Some(name) => format!("request.headers[{}]", name.to_ascii_lowercase()),
        None if WHEN_KEYS.contains(&key) => key.to_string(),
        None => {
            return Err((
                format!("{at}.key"),
                format!(
                    "{key:?} is not a key waypoints evaluate (request.headers[<name>], {})",
                    WHEN_KEYS.join(", ")
                ),
            ));
        }
    };
    for (field, values) in [
        ("values", &condition.values),
        ("notValues", &condition.not_values),
    ] {
        match key.as_str() {
            "source.ip" => {
                cidrs(&format!("{at}.{field}"), values)?;
            }
            "destination.port" => {
                port_list(&format!("{at}.{field}"), values)?;
            }
            _ => {}
        }
    }
    let (values, not_values) = if key == "source.principal" {
        (
            principals(&condition.values),
            principals(&condition.not_values),
        )
    } else {
        (
            string_matches(&condition.values),
            string_matches(&condition.not_values),
        )
    };
    Ok(wp::Condition {
        key,
        values,
        not_values,
    })
}
