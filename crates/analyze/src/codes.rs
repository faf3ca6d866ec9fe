//! Every finding's code: stable, documented in `docs/reference/analyze.md`, never reused. A code
//! that is retired stays in [`CODES`]' history (the docs say so) and its number is not given to
//! another problem.

use crate::{Finding, Severity};

/// One kind of problem.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Code {
    /// `AMB0xxx`.
    pub code: &'static str,
    /// CamelCase name, for people and JSON.
    pub name: &'static str,
    /// How bad it is.
    pub severity: Severity,
    /// The `istioctl analyze` code for the same problem, when Istio has one.
    pub istio: Option<&'static str>,
    /// What the problem is, in one sentence (the docs' first line).
    pub summary: &'static str,
    /// How to fix it, in one line.
    pub fix: &'static str,
}

impl Code {
    /// A finding of this kind on `object` (`Kind namespace/name`) at `field`.
    pub fn finding(
        &self,
        object: impl Into<String>,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> Finding {
        Finding {
            code: self.code,
            name: self.name,
            severity: self.severity,
            object: object.into(),
            field: field.into(),
            message: message.into(),
            fix: self.fix,
            istio_code: self.istio,
        }
    }
}

macro_rules! codes {
    ($($id:ident = $code:literal $name:literal $severity:ident $istio:expr,
       summary: $summary:literal, fix: $fix:literal;)*) => {
        $(
            #[doc = $summary]
            pub const $id: Code = Code {
                code: $code,
                name: $name,
                severity: Severity::$severity,
                istio: $istio,
                summary: $summary,
                fix: $fix,
            };
        )*
        /// Every code, in code order.
        pub const CODES: &[Code] = &[$($id),*];
    };
}

codes! {
    SCHEMA = "AMB0001" "SchemaError" Error Some("IST0106"),
        summary: "The object could not be read (not YAML, a missing or malformed field, a value out of range): the mesh ignores it.",
        fix: "correct the field named; Ambit reads the object only once it is valid";
    NOT_HONOURED = "AMB0002" "NotHonoured" Warning None,
        summary: "The translation honours the object only in part, for a reason no more specific code covers.",
        fix: "read the message: change or remove the field it names";

    WAYPOINT_NOT_FOUND = "AMB0101" "WaypointNotFound" Error None,
        summary: "An `istio.io/use-waypoint` label (on a Namespace, Service or Pod) names a Gateway that does not exist: its traffic gets no waypoint, so no L7 policy or route applies.",
        fix: "create the waypoint Gateway (class istio-waypoint) or correct the label and istio.io/use-waypoint-namespace";
    WAYPOINT_WRONG_CLASS = "AMB0102" "WaypointWrongClass" Error None,
        summary: "An `istio.io/use-waypoint` label names a Gateway that is not of class `istio-waypoint`: it cannot act as a waypoint.",
        fix: "name a Gateway of class istio-waypoint in the label";
    WAYPOINT_WRONG_TRAFFIC = "AMB0103" "WaypointWrongTrafficType" Error None,
        summary: "An `istio.io/use-waypoint` label names a waypoint whose `istio.io/waypoint-for` does not take this traffic (a Service bound to a `workload` waypoint, a Pod to a `service` one).",
        fix: "set istio.io/waypoint-for on the Gateway to all (or the traffic type needed), or bind a waypoint that takes it";
    WAYPOINT_NOT_READY = "AMB0104" "WaypointNotReady" Warning None,
        summary: "An `istio.io/use-waypoint` label names a waypoint Gateway that has no `status.addresses` yet: the waypoint controller has not deployed it (only reported for a running cluster or the lab).",
        fix: "check the Gateway's status and istiod-lite's waypoint controller log";
    WAYPOINT_ATTACHMENT_DENIED = "AMB0105" "WaypointAttachmentDenied" Error None,
        summary: "An `istio.io/use-waypoint` label (with `istio.io/use-waypoint-namespace`) names a waypoint in another namespace whose HBONE listener does not let this namespace bind to it (`allowedRoutes.namespaces` is `Same`, the default, or a selector that does not match): its traffic gets no waypoint. Istio reports `AttachmentDenied`.",
        fix: "set allowedRoutes.namespaces.from to All (or Selector matching this namespace) on the waypoint's port 15008 HBONE listener, or use a waypoint in the object's own namespace";

    L7_POLICY_ON_ZTUNNEL = "AMB0201" "L7PolicyOnZtunnel" Error None,
        summary: "An AuthorizationPolicy bound by `selector` (or namespace-wide) uses L7 fields (methods, paths, hosts, request principals, L7 `when` keys): ztunnel cannot see them, drops an ALLOW rule (it allows nothing) and enforces a DENY rule on its L4 parts only (it denies more).",
        fix: "bind the policy to the waypoint with targetRefs (kind Service or Gateway) instead of selector, or remove the L7 fields";
    POLICY_TARGET_NO_WAYPOINT = "AMB0202" "PolicyTargetHasNoWaypoint" Error None,
        summary: "An AuthorizationPolicy bound by `targetRefs` targets only Services or Gateways that no usable waypoint serves: nothing enforces it.",
        fix: "bind the target Service to a waypoint (istio.io/use-waypoint) or target the waypoint Gateway";
    SELECTOR_MATCHES_NOTHING = "AMB0203" "SelectorMatchesNothing" Warning Some("IST0127"),
        summary: "A policy's `selector` matches no pod in its scope (its namespace, or every namespace from the root namespace): it applies to nothing.",
        fix: "correct spec.selector.matchLabels to the labels of the pods meant, or remove the policy";
    TARGET_REF_NOT_FOUND = "AMB0204" "TargetRefNotFound" Error Some("IST0101"),
        summary: "A policy's `targetRefs` entry names a Service or Gateway that does not exist in the policy's namespace.",
        fix: "correct spec.targetRefs to an existing Service or waypoint Gateway in the policy's namespace";
    POLICY_NOT_ENFORCED = "AMB0205" "PolicyNotEnforced" Error None,
        summary: "A policy uses something Ambit cannot enforce (action CUSTOM, JWT request principals at a waypoint, a `when` key the waypoint does not evaluate): it is skipped.",
        fix: "remove or replace the field named; see the AuthorizationPolicy reference for what Ambit enforces";
    POLICY_TARGET_IGNORED = "AMB0206" "PolicyTargetIgnored" Warning None,
        summary: "A `targetRefs` entry is of a kind waypoints do not enforce, or a GatewayClass targeted outside the root namespace: that target is ignored.",
        fix: "target a Service, a Gateway, or (from the root namespace) the istio-waypoint GatewayClass";

    ROUTE_PARENT_NOT_FOUND = "AMB0301" "RouteParentNotFound" Error Some("IST0101"),
        summary: "An HTTPRoute or GRPCRoute `parentRefs` entry names a Service that does not exist: that parent is ignored.",
        fix: "correct the parentRef's name and namespace";
    ROUTE_PARENT_PORT_NOT_FOUND = "AMB0302" "RouteParentPortNotFound" Error None,
        summary: "A route's `parentRefs` entry names a port the Service does not have: that parent is ignored.",
        fix: "use one of the Service's ports in parentRefs[].port, or leave the port out";
    ROUTE_HAS_NO_EFFECT = "AMB0303" "RouteHasNoEffect" Warning None,
        summary: "A route (HTTPRoute, GRPCRoute or VirtualService) is for a Service that has no waypoint: in ambient mode only a waypoint applies routes, so it does nothing.",
        fix: "bind the Service to a waypoint with the label istio.io/use-waypoint";
    ROUTE_NOT_ALLOWED = "AMB0304" "RouteNotAllowed" Error None,
        summary: "A route is for a Service in another namespace, and it is not in that Service's waypoint's namespace (ambient has no consumer routes): it is ignored there.",
        fix: "move the route to the Service's namespace (or its waypoint's)";
    BACKEND_NOT_FOUND = "AMB0305" "BackendNotFound" Error Some("IST0101"),
        summary: "A route sends to (or a VirtualService names as host) something that is not a Service: requests routed there fail (500), or the VirtualService is not served.",
        fix: "correct the backendRef or destination host to an existing Service";
    BACKEND_PORT_NOT_FOUND = "AMB0306" "BackendPortNotFound" Error None,
        summary: "A route sends to a port the Service does not have: requests routed there fail, or the VirtualService is not served.",
        fix: "use one of the Service's ports";
    DESTINATION_PORT_REQUIRED = "AMB0307" "DestinationPortRequired" Error Some("IST0112"),
        summary: "A VirtualService destination leaves the port out while the Service has several: the VirtualService is not served.",
        fix: "set destination.port.number";
    SUBSET_NOT_FOUND = "AMB0308" "SubsetNotFound" Error Some("IST0101"),
        summary: "A VirtualService destination names a subset that no DestinationRule for its host declares: the VirtualService is not served.",
        fix: "declare the subset in the host's DestinationRule, or route to a subset it declares";
    BACKEND_NOT_PERMITTED = "AMB0309" "BackendNotPermitted" Error None,
        summary: "A route sends to a backend it may not use: another namespace (Ambit reads no ReferenceGrant) or a kind other than a core Service. Requests routed there get 500.",
        fix: "send to a Service in the route's own namespace";
    ROUTE_NOT_SERVED = "AMB0310" "RouteNotServed" Error None,
        summary: "The whole route is refused (no parent can take it, or a part the waypoint cannot honour): it is not served.",
        fix: "read the message: correct the field it names";
    UNSUPPORTED_FILTER = "AMB0311" "UnsupportedFilter" Error None,
        summary: "A route uses an `ExtensionRef` filter, which Ambit's waypoint cannot apply and may not skip: requests matching the rule get 500.",
        fix: "remove the ExtensionRef filter";
    RULE_PORTS_DIFFER = "AMB0312" "RulePortsDiffer" Warning None,
        summary: "The rules of one VirtualService are limited (`match[].port`) to different ports: the waypoint applies each on the union of the ports.",
        fix: "split the rules into one VirtualService per port";
    UNREACHABLE_RULE = "AMB0320" "UnreachableRule" Warning Some("IST0130"),
        summary: "A rule can never match: an earlier rule of the same route has no match (VirtualService) or the same matches, and takes its requests first.",
        fix: "move the rule before the one that shadows it, narrow that one, or remove the rule";
    INEFFECTIVE_MATCH = "AMB0321" "IneffectiveMatch" Info Some("IST0131"),
        summary: "One match of a rule repeats a match of an earlier rule of the same route: it never applies (the rule's other matches still do).",
        fix: "remove the duplicate match";
    CONFLICTING_VIRTUAL_SERVICES = "AMB0322" "ConflictingVirtualServiceHosts" Error Some("IST0109"),
        summary: "Two VirtualServices route the same Service: the waypoint tries the older one's rules first, so which rules apply depends on creation order.",
        fix: "merge the VirtualServices into one";

    DESTINATION_RULE_HOST_NOT_FOUND = "AMB0401" "DestinationRuleHostNotFound" Warning Some("IST0174"),
        summary: "A DestinationRule's host is not a Service: it applies to nothing.",
        fix: "correct spec.host (short name in the rule's namespace, name.namespace, or the FQDN)";
    SUBSET_SELECTS_NO_PODS = "AMB0402" "SubsetSelectsNoPods" Error Some("IST0173"),
        summary: "A DestinationRule subset's labels select none of the host Service's pods: requests routed to it fail with 503 (no healthy upstream).",
        fix: "correct the subset's labels to the pods' (for example version), or deploy the pods it is for";
    DUPLICATE_DESTINATION_RULE = "AMB0403" "DuplicateDestinationRule" Warning None,
        summary: "Two DestinationRules name the same Service: both are served and the waypoint does not merge them.",
        fix: "merge them into one DestinationRule";
    DESTINATION_RULE_HAS_NO_EFFECT = "AMB0404" "DestinationRuleHasNoEffect" Warning None,
        summary: "A DestinationRule is for a Service without a waypoint: in ambient mode only a waypoint applies it.",
        fix: "bind the Service to a waypoint with the label istio.io/use-waypoint";
    DESTINATION_RULE_FIELD_IGNORED = "AMB0405" "DestinationRuleFieldIgnored" Info None,
        summary: "A DestinationRule field is valid but not applied by Ambit's waypoint; the rest of the rule applies.",
        fix: "remove the field, or accept that it has no effect";

    STRICT_WITH_PLAINTEXT_CALLERS = "AMB0501" "StrictWithPlaintextCallers" Warning None,
        summary: "PeerAuthentication makes pods STRICT while pods that are not in the mesh call them (see the rule below): their plaintext connections are refused.",
        fix: "enroll the callers (istio.io/dataplane-mode=ambient on them or their namespace), or use PERMISSIVE until they are";
    MTLS_DISABLE_IGNORED = "AMB0502" "MtlsDisableIgnored" Warning None,
        summary: "A pod's PeerAuthentication mode is DISABLE, which ambient treats as PERMISSIVE.",
        fix: "use PERMISSIVE (or take the pod out of the mesh with istio.io/dataplane-mode=none)";

    NAMESPACE_NOT_ENROLLED = "AMB0601" "NamespaceNotEnrolled" Info Some("IST0102"),
        summary: "A namespace with pods is neither in the ambient mesh (`istio.io/dataplane-mode=ambient`) nor explicitly excluded (`istio.io/dataplane-mode=none`).",
        fix: "label the namespace istio.io/dataplane-mode=ambient to enroll it, or =none to say it stays out";

    PORT_PROTOCOL_UNKNOWN = "AMB0701" "PortProtocolUnknown" Info Some("IST0118"),
        summary: "A port of a Service bound to a waypoint declares no protocol (no `appProtocol`, no `http-`/`grpc-`/`tcp-`... name prefix): the waypoint has to sniff it.",
        fix: "set appProtocol (http, http2, grpc, tcp, ...) or name the port with a protocol prefix";
}

/// The code named `code` (`AMB0101`), if there is one.
pub fn lookup(code: &str) -> Option<&'static Code> {
    CODES.iter().find(|c| c.code == code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_sorted_and_well_formed() {
        for pair in CODES.windows(2) {
            assert!(
                pair[0].code < pair[1].code,
                "{} then {}",
                pair[0].code,
                pair[1].code
            );
        }
        let mut names: Vec<&str> = CODES.iter().map(|c| c.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), CODES.len(), "names are unique");
        for c in CODES {
            assert!(
                c.code.len() == 7 && c.code.starts_with("AMB0"),
                "{}",
                c.code
            );
            assert!(
                c.code[3..].bytes().all(|b| b.is_ascii_digit()),
                "{}",
                c.code
            );
            if let Some(istio) = c.istio {
                assert!(istio.starts_with("IST0") && istio.len() == 7, "{istio}");
            }
        }
        assert_eq!(lookup("AMB0101"), Some(&WAYPOINT_NOT_FOUND));
        assert_eq!(lookup("AMB9999"), None);
    }
}
