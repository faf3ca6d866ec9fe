//! The translation's warnings as findings: each warning's kind, decided by the translation where it
//! found the problem, has one code; nothing the translation reports is lost
//! ([`WarningKind::Other`] becomes [`codes::NOT_HONOURED`]).

use ambit_mesh::translate::USE_WAYPOINT;
use ambit_mesh::{Warning, WarningKind};

use crate::Finding;
use crate::codes::{self, Code};

/// One finding per translation warning.
pub(crate) fn classify(warnings: &[Warning]) -> Vec<Finding> {
    warnings.iter().map(finding).collect()
}

fn finding(warning: &Warning) -> Finding {
    let field = if warning.field == USE_WAYPOINT {
        format!("metadata.labels[\"{USE_WAYPOINT}\"]")
    } else {
        warning.field.clone()
    };
    code_of(warning.kind).finding(warning.object.clone(), field, warning.reason.clone())
}

fn code_of(kind: WarningKind) -> &'static Code {
    use WarningKind as K;
    match kind {
        K::Other => &codes::NOT_HONOURED,
        K::WaypointNotFound => &codes::WAYPOINT_NOT_FOUND,
        K::WaypointWrongClass => &codes::WAYPOINT_WRONG_CLASS,
        K::WaypointWrongTraffic => &codes::WAYPOINT_WRONG_TRAFFIC,
        K::WaypointNotReady => &codes::WAYPOINT_NOT_READY,
        K::WaypointAttachmentDenied => &codes::WAYPOINT_ATTACHMENT_DENIED,
        K::L7PolicyOnZtunnel => &codes::L7_POLICY_ON_ZTUNNEL,
        K::PolicyTargetNoWaypoint => &codes::POLICY_TARGET_NO_WAYPOINT,
        K::PolicyNotEnforced => &codes::POLICY_NOT_ENFORCED,
        K::PolicyTargetIgnored => &codes::POLICY_TARGET_IGNORED,
        K::RouteParentNotFound => &codes::ROUTE_PARENT_NOT_FOUND,
        K::RouteParentPortNotFound => &codes::ROUTE_PARENT_PORT_NOT_FOUND,
        K::RouteHasNoEffect => &codes::ROUTE_HAS_NO_EFFECT,
        K::RouteNotAllowed => &codes::ROUTE_NOT_ALLOWED,
        K::BackendNotFound => &codes::BACKEND_NOT_FOUND,
        K::BackendPortNotFound => &codes::BACKEND_PORT_NOT_FOUND,
        K::DestinationPortRequired => &codes::DESTINATION_PORT_REQUIRED,
        K::SubsetNotFound => &codes::SUBSET_NOT_FOUND,
        K::BackendNotPermitted => &codes::BACKEND_NOT_PERMITTED,
        K::RouteNotServed => &codes::ROUTE_NOT_SERVED,
        K::UnsupportedFilter => &codes::UNSUPPORTED_FILTER,
        K::RulePortsDiffer => &codes::RULE_PORTS_DIFFER,
        K::DestinationRuleHostNotFound => &codes::DESTINATION_RULE_HOST_NOT_FOUND,
        K::DuplicateDestinationRule => &codes::DUPLICATE_DESTINATION_RULE,
        K::DestinationRuleHasNoEffect => &codes::DESTINATION_RULE_HAS_NO_EFFECT,
        K::DestinationRuleFieldIgnored => &codes::DESTINATION_RULE_FIELD_IGNORED,
        K::MtlsDisableIgnored => &codes::MTLS_DISABLE_IGNORED,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_warning_keeps_its_object_field_and_reason_under_its_kinds_code() {
        let f = finding(&Warning::new(
            WarningKind::SubsetNotFound,
            "VirtualService demo/reviews",
            "spec.http[0].route[0].destination.subset",
            "no DestinationRule for Service demo/reviews declares a subset \"v3\"; the VirtualService is not served",
        ));
        assert_eq!(f.code, "AMB0308");
        assert_eq!(f.object, "VirtualService demo/reviews");
        assert_eq!(f.field, "spec.http[0].route[0].destination.subset");
        assert!(f.message.starts_with("no DestinationRule"), "{}", f.message);

        let f = finding(&Warning::new(
            WarningKind::WaypointNotFound,
            "Service demo/web",
            USE_WAYPOINT,
            "Gateway demo/missing does not exist; no waypoint",
        ));
        assert_eq!(f.code, "AMB0101");
        assert_eq!(f.field, "metadata.labels[\"istio.io/use-waypoint\"]");

        let f = finding(&Warning::new(
            WarningKind::Other,
            "Widget x/y",
            "",
            "something new",
        ));
        assert_eq!(f.code, "AMB0002");
        assert_eq!(
            (f.field.as_str(), f.message.as_str()),
            ("", "something new")
        );
    }
}
