//! What a control plane reports back on the objects it read: per route parent, whether the route
//! is `Accepted` and its references resolved (`ResolvedRefs`), and per Service bound to a
//! waypoint, whether that binding holds (`istio.io/WaypointBound`). Pure, like the translation it
//! mirrors: the same rules as [`crate::l7`] and [`crate::waypoints`], as facts instead of
//! warnings, so that a controller can write them as status conditions.

use std::collections::BTreeMap;

use crate::gateway_api::{BackendRef, GATEWAY_NAME_LABEL, HttpBackendRef, ParentReference};
use crate::objects::{ObjectMeta, Service};
use crate::translate::{Cluster, Resources};
use crate::warning::WarningKind;
use crate::waypoints::{self, Waypoints};

/// One condition as a controller writes it: `True` or `False`, a CamelCase reason and a message
/// for the operator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fact {
    /// The condition holds.
    pub status: bool,
    /// Why, as a Gateway API (or Istio) reason.
    pub reason: String,
    /// Why, for a person.
    pub message: String,
}

impl Fact {
    pub(crate) fn yes(reason: &str, message: impl Into<String>) -> Self {
        Fact {
            status: true,
            reason: reason.to_string(),
            message: message.into(),
        }
    }

    pub(crate) fn no(reason: &str, message: impl Into<String>) -> Self {
        Fact {
            status: false,
            reason: reason.to_string(),
            message: message.into(),
        }
    }
}

/// What an AuthorizationPolicy's status says about who enforces it: `ZtunnelAccepted` for a
/// policy ztunnel enforces (no `targetRefs`), `WaypointAccepted` for one bound to waypoints by
/// `targetRefs`. Filled in by [`crate::translate::translate`] as it decides, so the status says
/// exactly what the proxies were given.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyFacts {
    /// `ZtunnelAccepted`: `Accepted`, or `UnsupportedValue` when only part of the policy (its L4
    /// part) is enforced, or the policy not at all.
    pub ztunnel: Option<Fact>,
    /// `WaypointAccepted`: `Accepted`, `PartiallyInvalid` (some targets have no usable
    /// waypoint), `AncestorNotBound`, `TargetNotFound` or `Invalid`.
    pub waypoint: Option<Fact>,
}

/// The status of a route towards one of its Service parents.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParentFacts {
    /// The parent reference as written in `spec.parentRefs` (Gateway parents are not listed).
    pub parent: ParentReference,
    /// Whether the parent takes the route.
    pub accepted: Fact,
    /// Whether every backend of the route resolves.
    pub resolved_refs: Fact,
}

/// A route, as `(kind, namespace, name)`: kind `HTTPRoute` or `GRPCRoute`.
pub type RouteKey = (String, String, String);

/// Per route with at least one Service parent, the facts of each Service parent, in
/// `spec.parentRefs` order. `resources` is what [`crate::translate::translate`] made of `cluster`
/// (a route refused as a whole there is not accepted by any parent here).
pub fn route_parents(
    cluster: &Cluster,
    resources: &Resources,
) -> BTreeMap<RouteKey, Vec<ParentFacts>> {
    let waypoints = Waypoints::index(cluster);
    let mut out = BTreeMap::new();
    let routes = cluster
        .http_routes
        .values()
        .map(|r| {
            (
                "HTTPRoute",
                &r.metadata,
                &r.spec.parent_refs,
                backends(r.spec.rules.iter().map(|rule| &rule.backend_refs)),
            )
        })
        .chain(cluster.grpc_routes.values().map(|r| {
            (
                "GRPCRoute",
                &r.metadata,
                &r.spec.parent_refs,
                backends(r.spec.rules.iter().map(|rule| &rule.backend_refs)),
            )
        }));
    for (kind, meta, parents, backend_refs) in routes {
        if !parents.iter().any(ParentReference::is_service) {
            continue;
        }
        let resolved = resolved_refs(cluster, &meta.namespace, &backend_refs);
        let refused = refusal(kind, meta, resources);
        let facts = parents
            .iter()
            .filter(|p| p.is_service())
            .map(|parent| ParentFacts {
                parent: parent.clone(),
                accepted: match &refused {
                    Some(why) => Fact::no("UnsupportedValue", why.clone()),
                    None => accepted(cluster, &waypoints, meta, parent),
                },
                resolved_refs: resolved.clone(),
            })
            .collect();
        out.insert(
            (kind.to_string(), meta.namespace.clone(), meta.name.clone()),
            facts,
        );
    }
    out
}

fn backends<'a>(rules: impl Iterator<Item = &'a Vec<HttpBackendRef>>) -> Vec<&'a BackendRef> {
    rules.flatten().map(|b| &b.backend).collect()
}

/// Why the translation left the whole route out (a match it cannot honour), if it did.
fn refusal(kind: &str, meta: &ObjectMeta, resources: &Resources) -> Option<String> {
    let named = format!("{kind} {}/{}", meta.namespace, meta.name);
    let served = resources
        .routes
        .contains_key(&format!("{kind}/{}/{}", meta.namespace, meta.name));
    if served {
        return None;
    }
    // The whole-route refusals (a part the waypoint cannot honour); parent problems are reported
    // per parent instead.
    resources
        .warnings
        .iter()
        .find(|w| w.is_about(&named) && w.reason.ends_with(crate::l7::ROUTE_NOT_SERVED))
        .map(|w| format!("{}: {}", w.field, w.reason))
}

/// A Service parent's `Accepted`, by the rules of the translation's route parents.
fn accepted(
    cluster: &Cluster,
    waypoints: &Waypoints,
    meta: &ObjectMeta,
    parent: &ParentReference,
) -> Fact {
    let ns = parent.namespace.as_deref().unwrap_or(&meta.namespace);
    let Some(service) = cluster.services.get(&(ns.to_string(), parent.name.clone())) else {
        return Fact::no(
            "NoMatchingParent",
            format!("Service {ns}/{} does not exist", parent.name),
        );
    };
    let waypoint = service_waypoint(service, cluster, waypoints);
    let waypoint_ns = waypoint
        .as_ref()
        .ok()
        .and_then(|w| w.split_once('/'))
        .map(|(n, _)| n);
    if ns != meta.namespace && waypoint_ns != Some(meta.namespace.as_str()) {
        return Fact::no(
            "NotAllowedByListeners",
            format!(
                "Service {ns}/{} is in another namespace and the route is not in its waypoint's namespace (ambient has no consumer routes)",
                parent.name
            ),
        );
    }
    if let Some(port) = parent.port
        && !service.spec.ports.iter().any(|p| u32::from(p.port) == port)
    {
        return Fact::no(
            "NoMatchingParent",
            format!("Service {ns}/{} has no port {port}", parent.name),
        );
    }
    match waypoint {
        Ok(w) => Fact::yes(
            "Accepted",
            format!("Route was valid, bound to waypoint {w}"),
        ),
        Err(binding) => Fact::no(
            "NoMatchingParent",
            format!(
                "Service {ns}/{} has no usable waypoint ({}): the route has no effect on it",
                parent.name, binding.message
            ),
        ),
    }
}

/// `ResolvedRefs` of a route: the first backend that cannot be used, or all resolved.
fn resolved_refs(cluster: &Cluster, route_ns: &str, backends: &[&BackendRef]) -> Fact {
    for backend in backends {
        let ns = backend.namespace.as_deref().unwrap_or(route_ns);
        if !backend.is_service() {
            let group = backend.group.as_deref().unwrap_or("");
            let kind = backend.kind.as_deref().unwrap_or("Service");
            return Fact::no(
                "InvalidKind",
                format!("backend kind {group}/{kind} is not supported (only core Services)"),
            );
        }
        if ns != route_ns {
            return Fact::no(
                "RefNotPermitted",
                format!(
                    "backend Service {ns}/{} is in another namespace, which needs a ReferenceGrant (not read by Ambit)",
                    backend.name
                ),
            );
        }
        let port = backend.port.unwrap_or(0);
        match cluster
            .services
            .get(&(ns.to_string(), backend.name.clone()))
        {
            None => {
                return Fact::no(
                    "BackendNotFound",
                    format!("backend Service {ns}/{} does not exist", backend.name),
                );
            }
            Some(service) if !service.spec.ports.iter().any(|p| u32::from(p.port) == port) => {
                return Fact::no(
                    "BackendNotFound",
                    format!("backend Service {ns}/{} has no port {port}", backend.name),
                );
            }
            Some(_) => {}
        }
    }
    Fact::yes("ResolvedRefs", "All references resolved")
}

/// The reason `istio.io/WaypointBound` is `True` (Istio's).
pub const WAYPOINT_ACCEPTED: &str = "WaypointAccepted";
/// The reason it is `False` because the named Gateway cannot serve as a waypoint yet: it does not
/// exist, is of another class, or has no `status.addresses` (Istio's `WaypointIsNotReady`).
pub const WAYPOINT_NOT_READY: &str = "WaypointIsNotReady";
/// The reason it is `False` because the waypoint does not take service traffic
/// (`istio.io/waypoint-for`; Istio's).
pub const UNSUPPORTED_TRAFFIC_TYPE: &str = "UnsupportedTrafficType";
/// The reason it is `False` because the waypoint, in another namespace, does not let the
/// Service's namespace bind to it (`allowedRoutes.namespaces` of its HBONE listener; Istio's).
pub const ATTACHMENT_DENIED: &str = "AttachmentDenied";

/// A binding that does not hold.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Unbound {
    reason: &'static str,
    message: String,
}

/// The waypoint (`ns/name`) a Service's binding resolves to, or why it does not.
fn service_waypoint(
    service: &Service,
    cluster: &Cluster,
    waypoints: &Waypoints,
) -> Result<String, Unbound> {
    let meta = &service.metadata;
    let Some(binding) = waypoints::binding(&meta.labels, &meta.namespace, cluster) else {
        return Err(Unbound {
            reason: WAYPOINT_NOT_READY,
            message: "it is not bound to one".to_string(),
        });
    };
    let name = format!("{}/{}", binding.namespace, binding.name);
    match waypoints.resolve(&binding) {
        Err(why) => Err(Unbound {
            reason: if why.kind == WarningKind::WaypointAttachmentDenied {
                ATTACHMENT_DENIED
            } else {
                WAYPOINT_NOT_READY
            },
            message: why.message,
        }),
        Ok(w) if !w.for_services => Err(Unbound {
            reason: UNSUPPORTED_TRAFFIC_TYPE,
            message: format!(
                "waypoint {name} takes {} traffic only (istio.io/waypoint-for), not service traffic",
                w.waypoint_for
            ),
        }),
        Ok(_) => Ok(name),
    }
}

/// `istio.io/WaypointBound` for every Service that names a waypoint (itself or through its
/// namespace's `istio.io/use-waypoint`), by `(namespace, name)`. Services without a binding (or
/// bound to `none`) and a waypoint's own Services are left out.
pub fn service_bindings(cluster: &Cluster) -> BTreeMap<(String, String), Fact> {
    let waypoints = Waypoints::index(cluster);
    let mut out = BTreeMap::new();
    for (key, service) in &cluster.services {
        let meta = &service.metadata;
        if meta.labels.contains_key(GATEWAY_NAME_LABEL)
            || waypoints::binding(&meta.labels, &meta.namespace, cluster).is_none()
        {
            continue;
        }
        let fact = match service_waypoint(service, cluster, &waypoints) {
            Ok(name) => Fact::yes(
                WAYPOINT_ACCEPTED,
                format!("Successfully attached to waypoint {name}"),
            ),
            Err(unbound) => Fact::no(unbound.reason, unbound.message),
        };
        out.insert(key.clone(), fact);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse_documents;
    use crate::translate::{MeshSettings, translate};

    fn cluster(yaml: &str) -> Cluster {
        let (objects, errors) = parse_documents(yaml, "test.yaml");
        assert!(errors.is_empty(), "{errors:?}");
        Cluster::from_objects(objects)
    }

    const WORLD: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: demo}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: wp, namespace: demo}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
status:
  addresses: [{type: Hostname, value: wp.demo.svc.cluster.local}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: pending, namespace: demo}
spec: {gatewayClassName: istio-waypoint}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: workloads, namespace: demo, labels: {istio.io/waypoint-for: workload}}
spec: {gatewayClassName: istio-waypoint}
status:
  addresses: [{type: Hostname, value: workloads.demo.svc.cluster.local}]
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: demo, labels: {istio.io/use-waypoint: wp}}
spec: {ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: plain, namespace: demo}
spec: {ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: waiting, namespace: demo, labels: {istio.io/use-waypoint: pending}}
spec: {ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: ghost, namespace: demo, labels: {istio.io/use-waypoint: nowhere}}
spec: {ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: pods-only, namespace: demo, labels: {istio.io/use-waypoint: workloads}}
spec: {ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: wp, namespace: demo, labels: {gateway.networking.k8s.io/gateway-name: wp, istio.io/use-waypoint: wp}}
spec: {ports: [{name: mesh, port: 15008}]}
"#;

    #[test]
    fn bound_services_say_to_which_waypoint_or_why_not() {
        let bindings = service_bindings(&cluster(WORLD));
        let get = |name: &str| {
            bindings
                .get(&("demo".to_string(), name.to_string()))
                .cloned()
        };
        let echo = get("echo").unwrap();
        assert!(echo.status);
        assert_eq!(echo.reason, WAYPOINT_ACCEPTED);
        assert!(echo.message.contains("demo/wp"), "{}", echo.message);
        let waiting = get("waiting").unwrap();
        assert!(!waiting.status);
        assert_eq!(waiting.reason, WAYPOINT_NOT_READY);
        assert!(
            waiting.message.contains("no status.addresses"),
            "{}",
            waiting.message
        );
        let ghost = get("ghost").unwrap();
        assert_eq!(ghost.reason, WAYPOINT_NOT_READY);
        assert!(
            ghost.message.contains("does not exist"),
            "{}",
            ghost.message
        );
        let pods_only = get("pods-only").unwrap();
        assert_eq!(pods_only.reason, UNSUPPORTED_TRAFFIC_TYPE);
        assert!(
            pods_only.message.contains("workload"),
            "{}",
            pods_only.message
        );
        assert_eq!(get("plain"), None, "not bound: no condition");
        assert_eq!(get("wp"), None, "a waypoint's own Service");
    }

    /// Each AuthorizationPolicy says who enforces it: ztunnel (fully, partly with what was left
    /// out, or not at all) or waypoints (bound, partly, or why not), as Istio's conditions do.
    #[test]
    fn policies_say_who_enforces_them_and_what_was_left_out() {
        let policies = r#"
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: l4, namespace: demo}
spec: {rules: [{from: [{source: {namespaces: [demo]}}]}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: l7-allow, namespace: demo}
spec: {rules: [{to: [{operation: {methods: [GET], paths: ["/x"]}}]}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: l7-deny, namespace: demo}
spec: {action: DENY, rules: [{to: [{operation: {methods: [POST]}}]}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: custom, namespace: demo}
spec: {action: CUSTOM, provider: {name: ext}, rules: [{}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: on-echo, namespace: demo}
spec:
  targetRefs: [{kind: Service, group: "", name: echo}]
  rules: [{to: [{operation: {methods: [GET]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: half, namespace: demo}
spec:
  targetRefs: [{kind: Service, group: "", name: echo}, {kind: Service, group: "", name: plain}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: unbound, namespace: demo}
spec:
  targetRefs: [{kind: Service, group: "", name: plain}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: missing, namespace: demo}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: nope}]
"#;
        let cluster = cluster(&format!("{WORLD}{policies}"));
        let resources = translate(&cluster, &MeshSettings::default());
        let facts = |name: &str| {
            resources
                .policy_status
                .get(&format!("demo/{name}"))
                .cloned()
                .unwrap_or_default()
        };
        let l4 = facts("l4");
        assert_eq!(
            l4.ztunnel,
            Some(Fact::yes("Accepted", "attached to ztunnel"))
        );
        assert_eq!(l4.waypoint, None);
        let allow = facts("l7-allow").ztunnel.unwrap();
        assert!(allow.status);
        assert_eq!(allow.reason, "UnsupportedValue");
        assert!(
            allow.message.contains("found: methods, paths")
                && allow.message.contains("allows less"),
            "{}",
            allow.message
        );
        let deny = facts("l7-deny").ztunnel.unwrap();
        assert!(deny.message.contains("denies more"), "{}", deny.message);
        let custom = facts("custom").ztunnel.unwrap();
        assert!(!custom.status, "{custom:?}");
        assert!(custom.message.contains("CUSTOM"), "{}", custom.message);

        let on_echo = facts("on-echo");
        assert_eq!(
            on_echo.ztunnel, None,
            "targetRefs policies are not ztunnel's"
        );
        let on_echo = on_echo.waypoint.unwrap();
        assert_eq!(
            (on_echo.status, on_echo.reason.as_str()),
            (true, "Accepted")
        );
        assert!(on_echo.message.contains("demo/wp"), "{}", on_echo.message);
        let half = facts("half").waypoint.unwrap();
        assert_eq!(
            (half.status, half.reason.as_str()),
            (true, "PartiallyInvalid")
        );
        assert!(
            half.message.contains("Service demo/plain"),
            "{}",
            half.message
        );
        let unbound = facts("unbound").waypoint.unwrap();
        assert_eq!(
            (unbound.status, unbound.reason.as_str()),
            (false, "AncestorNotBound")
        );
        let missing = facts("missing").waypoint.unwrap();
        assert_eq!(
            (missing.status, missing.reason.as_str()),
            (false, "TargetNotFound")
        );
        assert!(missing.message.contains("demo/nope"), "{}", missing.message);
    }

    #[test]
    fn route_parents_are_accepted_or_refused_with_the_translations_reason() {
        let yaml = format!(
            "{WORLD}{}",
            r#"
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: canary, namespace: demo}
spec:
  parentRefs:
  - {group: "", kind: Service, name: echo, port: 80}
  - {group: "", kind: Service, name: plain}
  - {group: "", kind: Service, name: missing}
  - {group: "", kind: Service, name: echo, port: 81}
  - {name: some-gateway}
  rules:
  - backendRefs: [{name: echo, port: 80}, {name: gone, port: 80}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: fine, namespace: demo}
spec:
  parentRefs: [{group: "", kind: Service, name: echo}]
  rules: [{backendRefs: [{name: echo, port: 80}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: gateway-only, namespace: demo}
spec:
  parentRefs: [{name: some-gateway}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: other-ns, namespace: elsewhere}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, namespace: demo}]
  rules: [{backendRefs: [{kind: Pod, name: x, port: 1}]}]
"#
        );
        let cluster = cluster(&yaml);
        let settings = MeshSettings::default();
        let resources = translate(&cluster, &settings);
        let parents = route_parents(&cluster, &resources);
        let key =
            |kind: &str, ns: &str, name: &str| (kind.to_string(), ns.to_string(), name.to_string());
        assert!(!parents.contains_key(&key("HTTPRoute", "demo", "gateway-only")));

        let canary = &parents[&key("HTTPRoute", "demo", "canary")];
        let accepted: Vec<(bool, &str)> = canary
            .iter()
            .map(|p| (p.accepted.status, p.accepted.reason.as_str()))
            .collect();
        assert_eq!(
            accepted,
            [
                (true, "Accepted"),
                (false, "NoMatchingParent"),
                (false, "NoMatchingParent"),
                (false, "NoMatchingParent"),
            ]
        );
        assert!(canary[1].accepted.message.contains("no usable waypoint"));
        assert!(canary[2].accepted.message.contains("does not exist"));
        assert!(canary[3].accepted.message.contains("no port 81"));
        assert_eq!(canary[0].parent.port, Some(80));
        for parent in canary {
            assert!(!parent.resolved_refs.status);
            assert_eq!(parent.resolved_refs.reason, "BackendNotFound");
            assert!(
                parent.resolved_refs.message.contains("demo/gone"),
                "{}",
                parent.resolved_refs.message
            );
        }

        let fine = &parents[&key("HTTPRoute", "demo", "fine")];
        assert!(fine[0].accepted.status && fine[0].resolved_refs.status);

        let other = &parents[&key("GRPCRoute", "elsewhere", "other-ns")];
        assert_eq!(other[0].accepted.reason, "NotAllowedByListeners");
        assert_eq!(other[0].resolved_refs.reason, "InvalidKind");
    }

    #[test]
    fn a_route_the_translation_refuses_is_not_accepted_anywhere() {
        // Validation refuses such a route when it is read; the translation refuses it again
        // (defensively) when it gets one anyway.
        let mut cluster = cluster(WORLD);
        let route: crate::gateway_api::HttpRoute = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "bad-regex", "namespace": "demo"},
            "spec": {
                "parentRefs": [{"group": "", "kind": "Service", "name": "echo"}],
                "rules": [{
                    "matches": [{"headers": [{"name": "x", "type": "RegularExpression", "value": "("}]}],
                    "backendRefs": [{"name": "echo", "port": 80}],
                }],
            },
        }))
        .unwrap();
        cluster
            .http_routes
            .insert(("demo".into(), "bad-regex".into()), route);
        let settings = MeshSettings::default();
        let resources = translate(&cluster, &settings);
        let parents = route_parents(&cluster, &resources);
        let bad = &parents[&(
            "HTTPRoute".to_string(),
            "demo".to_string(),
            "bad-regex".to_string(),
        )];
        assert!(!bad[0].accepted.status);
        assert_eq!(bad[0].accepted.reason, "UnsupportedValue");
        assert!(
            bad[0].accepted.message.contains("headers[0].value"),
            "{}",
            bad[0].accepted.message
        );
    }
}
