//! Translation warnings: an object the translation honours only in part, or not at all, the field
//! at fault, why, and which kind of problem it is. The kind is decided where the problem is found,
//! so that consumers (`ambitctl analyze`'s codes, route status) never read it back from the
//! wording.

use std::fmt;

/// One object honoured only in part (or not at all), and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Warning {
    /// The object: `Kind namespace/name` (`Namespace name` for a namespace).
    pub object: String,
    /// The field at fault (`spec.rules[0].to[0].operation.ports`, `istio.io/use-waypoint` for
    /// that label); empty when the object as a whole is.
    pub field: String,
    /// Why, and what the mesh does instead.
    pub reason: String,
    /// Which problem it is.
    pub kind: WarningKind,
}

impl Warning {
    /// A warning about `field` of `object`.
    pub fn new(
        kind: WarningKind,
        object: impl Into<String>,
        field: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        Self {
            object: object.into(),
            field: field.into(),
            reason: reason.into(),
            kind,
        }
    }

    /// Whether the warning is about the object `Kind namespace/name` (or `Namespace name`).
    pub fn is_about(&self, object: &str) -> bool {
        self.object == object
    }
}

/// `object: field: reason`, or `object: reason` when no field is named.
impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}: {}", self.object, self.reason)
        } else {
            write!(f, "{}: {}: {}", self.object, self.field, self.reason)
        }
    }
}

/// Which problem a warning reports. Each has one `ambitctl analyze` code
/// (`docs/reference/analyze.md`); [`WarningKind::Other`] is for what no more specific kind
/// covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum WarningKind {
    /// Honoured only in part for a reason no other kind covers.
    Other,
    /// `istio.io/use-waypoint` names a Gateway that does not exist.
    WaypointNotFound,
    /// `istio.io/use-waypoint` names a Gateway that is not of class `istio-waypoint`.
    WaypointWrongClass,
    /// `istio.io/use-waypoint` names a waypoint that does not take this traffic
    /// (`istio.io/waypoint-for`).
    WaypointWrongTraffic,
    /// `istio.io/use-waypoint` names a waypoint Gateway with no `status.addresses` yet.
    WaypointNotReady,
    /// `istio.io/use-waypoint` names a waypoint in another namespace whose HBONE listener does not
    /// let the object's namespace bind to it (`allowedRoutes.namespaces`).
    WaypointAttachmentDenied,
    /// A policy bound by selector (or namespace-wide) uses L7 fields ztunnel cannot see.
    L7PolicyOnZtunnel,
    /// A policy bound by targetRefs reaches no usable waypoint: nothing enforces it.
    PolicyTargetNoWaypoint,
    /// A policy uses something Ambit cannot enforce; it is skipped.
    PolicyNotEnforced,
    /// A policy's targetRefs entry is of a kind waypoints do not enforce; that target is ignored.
    PolicyTargetIgnored,
    /// A route's parentRefs entry names a Service that does not exist.
    RouteParentNotFound,
    /// A route's parentRefs entry names a port its Service does not have.
    RouteParentPortNotFound,
    /// A route (or VirtualService) is for a Service without a waypoint.
    RouteHasNoEffect,
    /// A route is for a Service in another namespace, outside that Service's waypoint's.
    RouteNotAllowed,
    /// A route sends to (or a VirtualService names as host) something that is not a Service.
    BackendNotFound,
    /// A route sends to a port the Service does not have (or to a Service without ports).
    BackendPortNotFound,
    /// A VirtualService destination leaves the port out while the Service has several.
    DestinationPortRequired,
    /// A VirtualService destination names a subset no DestinationRule declares.
    SubsetNotFound,
    /// A route sends to a backend it may not use (another namespace, or not a core Service).
    BackendNotPermitted,
    /// The whole route is refused.
    RouteNotServed,
    /// A route uses an ExtensionRef filter.
    UnsupportedFilter,
    /// The rules of one VirtualService are limited to different ports.
    RulePortsDiffer,
    /// A DestinationRule's host is not a Service.
    DestinationRuleHostNotFound,
    /// Two DestinationRules name the same Service.
    DuplicateDestinationRule,
    /// A DestinationRule is for a Service without a waypoint.
    DestinationRuleHasNoEffect,
    /// A DestinationRule field is valid but not applied.
    DestinationRuleFieldIgnored,
    /// A pod's PeerAuthentication mode is DISABLE, treated as PERMISSIVE.
    MtlsDisableIgnored,
}
