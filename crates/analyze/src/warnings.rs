//! The translation's warnings as findings. Each warning names its object first
//! (`Kind namespace/name: `), then usually the field (`field: reason`); the reason's wording says
//! which problem it is. A warning no rule here recognises still becomes a finding
//! ([`codes::NOT_HONOURED`]), so that nothing the translation reports is lost; the corpus tests
//! pin the classification of each warning the mesh writes.

use ambit_mesh::translate::USE_WAYPOINT;

use crate::Finding;
use crate::codes::{self, Code};

/// One finding per translation warning.
pub(crate) fn classify(warnings: &[String]) -> Vec<Finding> {
    warnings.iter().map(|w| finding(w)).collect()
}

fn finding(warning: &str) -> Finding {
    let (object, rest) = warning.split_once(": ").unwrap_or(("", warning));
    let kind = object.split(' ').next().unwrap_or("");
    let (field, reason) = split_field(rest);
    let code = code_of(kind, &field, reason);
    let field = if field == USE_WAYPOINT {
        format!("metadata.labels[\"{USE_WAYPOINT}\"]")
    } else {
        field
    };
    code.finding(object, field, reason)
}

/// `field: reason`, or a reason alone (then the field is read from its first words where the
/// translation writes it so: `rules[0] uses ...`, `action X is ...`).
fn split_field(rest: &str) -> (String, &str) {
    if let Some((field, reason)) = rest.split_once(": ")
        && !field.is_empty()
        && !field.contains(char::is_whitespace)
    {
        return (field.to_string(), reason);
    }
    let first = rest.split(' ').next().unwrap_or("");
    if first.starts_with("rules[") {
        return (format!("spec.{first}"), rest);
    }
    if first == "action" {
        return ("spec.action".to_string(), rest);
    }
    (String::new(), rest)
}

fn code_of(kind: &str, field: &str, reason: &str) -> &'static Code {
    let has = |s: &str| reason.contains(s);
    if has("uses L7 fields") {
        return &codes::L7_POLICY_ON_ZTUNNEL;
    }
    if has("is not enforced by ztunnel") || has("the policy is not served to waypoints") {
        return &codes::POLICY_NOT_ENFORCED;
    }
    if has("the policy is not enforced") {
        return &codes::POLICY_TARGET_NO_WAYPOINT;
    }
    if has("the target is ignored") {
        return &codes::POLICY_TARGET_IGNORED;
    }
    if field == USE_WAYPOINT {
        return if has("does not exist") {
            &codes::WAYPOINT_NOT_FOUND
        } else if has(" is of class ") {
            &codes::WAYPOINT_WRONG_CLASS
        } else if has("does not take") {
            &codes::WAYPOINT_WRONG_TRAFFIC
        } else if has("has no status.addresses") {
            &codes::WAYPOINT_NOT_READY
        } else {
            &codes::NOT_HONOURED
        };
    }
    if has("PeerAuthentication mode DISABLE") {
        return &codes::MTLS_DISABLE_IGNORED;
    }
    if kind == "DestinationRule" {
        return if has("the DestinationRule is not served") && has("is not a Service") {
            &codes::DESTINATION_RULE_HOST_NOT_FOUND
        } else if has("the DestinationRule has no effect") {
            &codes::DESTINATION_RULE_HAS_NO_EFFECT
        } else if has("names the same Service") {
            &codes::DUPLICATE_DESTINATION_RULE
        } else if has("ignored, the rest of the DestinationRule applies") {
            &codes::DESTINATION_RULE_FIELD_IGNORED
        } else {
            &codes::NOT_HONOURED
        };
    }
    if matches!(kind, "HTTPRoute" | "GRPCRoute" | "VirtualService") {
        return route_code(field, reason);
    }
    &codes::NOT_HONOURED
}

fn route_code(field: &str, reason: &str) -> &'static Code {
    let has = |s: &str| reason.contains(s);
    if has("has no waypoint:") && has("has no effect") {
        &codes::ROUTE_HAS_NO_EFFECT
    } else if has("in another namespace and the") && has("waypoint's namespace") {
        &codes::ROUTE_NOT_ALLOWED
    } else if field.starts_with("spec.parentRefs[") && has("does not exist") {
        &codes::ROUTE_PARENT_NOT_FOUND
    } else if field.starts_with("spec.parentRefs[") && has("has no port") {
        &codes::ROUTE_PARENT_PORT_NOT_FOUND
    } else if field.ends_with(".subset") && has("declares a subset") {
        &codes::SUBSET_NOT_FOUND
    } else if has("ExtensionRef filters are not supported") {
        &codes::UNSUPPORTED_FILTER
    } else if has("needs a ReferenceGrant") || has("is not supported (only core Services)") {
        &codes::BACKEND_NOT_PERMITTED
    } else if has("required:") && has("has more than one port") {
        &codes::DESTINATION_PORT_REQUIRED
    } else if has("has no port") || has("has no ports") {
        &codes::BACKEND_PORT_NOT_FOUND
    } else if has("does not exist") || has("is not a Service") {
        &codes::BACKEND_NOT_FOUND
    } else if has("limited to different ports") {
        &codes::RULE_PORTS_DIFFER
    } else if has("is not served") {
        &codes::ROUTE_NOT_SERVED
    } else {
        &codes::NOT_HONOURED
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warnings_split_into_object_field_and_reason() {
        let f = finding(
            "VirtualService demo/reviews: spec.http[0].route[0].destination.subset: no DestinationRule for Service demo/reviews declares a subset \"v3\"; the VirtualService is not served",
        );
        assert_eq!(f.code, "AMB0308");
        assert_eq!(f.object, "VirtualService demo/reviews");
        assert_eq!(f.field, "spec.http[0].route[0].destination.subset");
        assert!(f.message.starts_with("no DestinationRule"), "{}", f.message);

        let f = finding(
            "AuthorizationPolicy demo/p: rules[1] uses L7 fields (paths) that need a waypoint; the rule is dropped so it allows nothing at L4",
        );
        assert_eq!((f.code, f.field.as_str()), ("AMB0201", "spec.rules[1]"));

        let f = finding(
            "Service demo/web: istio.io/use-waypoint: Gateway demo/missing does not exist; no waypoint",
        );
        assert_eq!(f.code, "AMB0101");
        assert_eq!(f.field, "metadata.labels[\"istio.io/use-waypoint\"]");

        let f = finding(
            "Pod demo/a: PeerAuthentication mode DISABLE is treated as PERMISSIVE in ambient mode",
        );
        assert_eq!((f.code, f.field.as_str()), ("AMB0502", ""));

        let f = finding("Widget x/y: something new");
        assert_eq!(f.code, "AMB0002");
        assert_eq!(f.message, "something new");
    }
}
