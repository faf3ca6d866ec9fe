//! Gateway API objects (`gateway.networking.k8s.io/v1`): Gateway, GatewayClass, HTTPRoute and
//! GRPCRoute, with the Kubernetes field names. A waypoint is a Gateway of class `istio-waypoint`;
//! HTTPRoutes and GRPCRoutes whose parent is a Service are what a waypoint routes by.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::objects::ObjectMeta;

/// The Gateway API group.
pub const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";
/// The GatewayClass of waypoints.
pub const WAYPOINT_CLASS: &str = "istio-waypoint";
/// Label/annotation deciding which traffic a waypoint takes (`service`, `workload`, `all`, `none`).
pub const WAYPOINT_FOR: &str = "istio.io/waypoint-for";
/// Label the waypoint's own pods carry, naming their Gateway.
pub const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";

/// A Gateway.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct Gateway {
    /// Metadata (labels may carry `istio.io/waypoint-for`).
    pub metadata: ObjectMeta,
    /// Spec.
    #[serde(default)]
    pub spec: GatewaySpec,
    /// Status (addresses once the controller has provisioned it).
    #[serde(default)]
    pub status: GatewayStatus,
}

/// `Gateway.spec`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct GatewaySpec {
    /// The GatewayClass (`istio-waypoint` for waypoints).
    #[serde(default)]
    pub gateway_class_name: String,
    /// Listeners.
    #[serde(default)]
    pub listeners: Vec<Listener>,
    /// Labels and annotations for the generated resources.
    #[serde(default)]
    pub infrastructure: Option<GatewayInfrastructure>,
}

/// One listener.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Listener {
    /// Listener name (unique in the Gateway).
    #[serde(default)]
    pub name: String,
    /// Port (1-65535).
    #[serde(default)]
    pub port: u32,
    /// `HTTP`, `HTTPS`, `TCP`, `TLS`, `UDP`, `HBONE`, ...
    #[serde(default)]
    pub protocol: String,
    /// Hostname this listener serves (absent: all).
    #[serde(default)]
    pub hostname: Option<String>,
    /// Which routes may attach.
    #[serde(default)]
    pub allowed_routes: Option<AllowedRoutes>,
}

/// `listeners[].allowedRoutes`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct AllowedRoutes {
    /// Namespaces routes may come from.
    #[serde(default)]
    pub namespaces: Option<RouteNamespaces>,
    /// Route kinds that may attach.
    #[serde(default)]
    pub kinds: Vec<RouteGroupKind>,
}

/// `allowedRoutes.namespaces`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RouteNamespaces {
    /// `Same` (default), `All` or `Selector`.
    #[serde(default)]
    pub from: String,
    /// Namespace selector when `from: Selector`.
    #[serde(default)]
    pub selector: Option<NamespaceSelector>,
}

/// A Kubernetes label selector (`metav1.LabelSelector`): `matchLabels` and `matchExpressions`,
/// all of which must hold. An empty selector matches everything.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct NamespaceSelector {
    /// Labels that must all be present with these values.
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
    /// Requirements that must all hold.
    #[serde(default)]
    pub match_expressions: Vec<LabelSelectorRequirement>,
}

/// One `matchExpressions` entry.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct LabelSelectorRequirement {
    /// The label key.
    #[serde(default)]
    pub key: String,
    /// `In`, `NotIn`, `Exists` or `DoesNotExist`.
    #[serde(default)]
    pub operator: String,
    /// Values for `In` and `NotIn` (none for the others).
    #[serde(default)]
    pub values: Vec<String>,
}

impl NamespaceSelector {
    /// Whether `labels` satisfy every label and requirement (Kubernetes' semantics: `NotIn` and
    /// `DoesNotExist` hold when the key is absent). An operator the validation refuses matches
    /// nothing.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        crate::translate::selects(&self.match_labels, labels)
            && self.match_expressions.iter().all(|r| {
                let value = labels.get(&r.key);
                match r.operator.as_str() {
                    "In" => value.is_some_and(|v| r.values.contains(v)),
                    "NotIn" => value.is_none_or(|v| !r.values.contains(v)),
                    "Exists" => value.is_some(),
                    "DoesNotExist" => value.is_none(),
                    _ => false,
                }
            })
    }
}

/// A route kind.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct RouteGroupKind {
    /// Group (default `gateway.networking.k8s.io`).
    #[serde(default)]
    pub group: Option<String>,
    /// Kind (`HTTPRoute`, ...).
    #[serde(default)]
    pub kind: String,
}

/// `spec.infrastructure`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct GatewayInfrastructure {
    /// Labels for generated resources.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Annotations for generated resources.
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    /// Implementation-specific parameters.
    #[serde(default)]
    pub parameters_ref: Option<LocalObjectReference>,
}

/// A reference to an object in the same namespace.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct LocalObjectReference {
    /// Group.
    #[serde(default)]
    pub group: String,
    /// Kind.
    #[serde(default)]
    pub kind: String,
    /// Name.
    #[serde(default)]
    pub name: String,
}

/// `Gateway.status`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct GatewayStatus {
    /// Where the Gateway can be reached; a waypoint is usable only once this is set.
    #[serde(default)]
    pub addresses: Vec<GatewayStatusAddress>,
}

/// One `status.addresses` entry.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct GatewayStatusAddress {
    /// `IPAddress` (default) or `Hostname`.
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    /// The address.
    #[serde(default)]
    pub value: String,
}

impl GatewayStatusAddress {
    /// True for a `Hostname` address.
    pub fn is_hostname(&self) -> bool {
        self.kind.as_deref() == Some("Hostname")
    }
}

/// A GatewayClass (cluster-scoped).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct GatewayClass {
    /// Metadata (labels may carry `istio.io/waypoint-for`).
    pub metadata: ObjectMeta,
    /// Spec.
    #[serde(default)]
    pub spec: GatewayClassSpec,
}

/// `GatewayClass.spec`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct GatewayClassSpec {
    /// The controller implementing the class (`istio.io/...`).
    #[serde(default)]
    pub controller_name: String,
    /// Free text.
    #[serde(default)]
    pub description: Option<String>,
}

/// An HTTPRoute.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct HttpRoute {
    /// Metadata.
    pub metadata: ObjectMeta,
    /// Spec.
    #[serde(default)]
    pub spec: HttpRouteSpec,
}

/// `HTTPRoute.spec`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteSpec {
    /// What the route attaches to: Gateways, or Services for mesh (waypoint) routing.
    #[serde(default)]
    pub parent_refs: Vec<ParentReference>,
    /// Host names matched against the `Host` header (absent: all).
    #[serde(default)]
    pub hostnames: Vec<String>,
    /// Rules, tried by Gateway API precedence.
    #[serde(default)]
    pub rules: Vec<HttpRouteRule>,
}

/// A parent reference.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ParentReference {
    /// Group (absent: `gateway.networking.k8s.io`; `""` for a Service).
    #[serde(default)]
    pub group: Option<String>,
    /// Kind (absent: `Gateway`).
    #[serde(default)]
    pub kind: Option<String>,
    /// Namespace (absent: the route's).
    #[serde(default)]
    pub namespace: Option<String>,
    /// Name.
    #[serde(default)]
    pub name: String,
    /// Listener name of a Gateway parent.
    #[serde(default)]
    pub section_name: Option<String>,
    /// Port of the parent (a Service port for mesh routes).
    #[serde(default)]
    pub port: Option<u32>,
}

impl ParentReference {
    /// The group with its default applied.
    pub fn group(&self) -> &str {
        self.group.as_deref().unwrap_or(GATEWAY_GROUP)
    }

    /// The kind with its default applied.
    pub fn kind(&self) -> &str {
        self.kind.as_deref().unwrap_or("Gateway")
    }

    /// True when the parent is a core Service (mesh routing through a waypoint).
    pub fn is_service(&self) -> bool {
        self.group().is_empty() && self.kind() == "Service"
    }
}

/// One rule.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteRule {
    /// Optional rule name.
    #[serde(default)]
    pub name: Option<String>,
    /// Matches (any; absent: path prefix `/`).
    #[serde(default)]
    pub matches: Vec<HttpRouteMatch>,
    /// Filters applied to matching requests.
    #[serde(default)]
    pub filters: Vec<HttpRouteFilter>,
    /// Backends, picked by weight.
    #[serde(default)]
    pub backend_refs: Vec<HttpBackendRef>,
    /// Timeouts.
    #[serde(default)]
    pub timeouts: Option<HttpRouteTimeouts>,
    /// Retry policy.
    #[serde(default)]
    pub retry: Option<HttpRouteRetry>,
}

impl HttpRouteRule {
    /// The matches with the Gateway API default (one path prefix `/`) when none are given.
    pub fn effective_matches(&self) -> Vec<HttpRouteMatch> {
        if self.matches.is_empty() {
            vec![HttpRouteMatch {
                path: Some(HttpPathMatch::default()),
                ..HttpRouteMatch::default()
            }]
        } else {
            self.matches.clone()
        }
    }
}

impl HttpRouteMatch {
    /// The path match with the Gateway API default (prefix `/`) when absent.
    pub fn path(&self) -> HttpPathMatch {
        self.path.clone().unwrap_or_default()
    }
}

/// One match: all of its parts must hold.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteMatch {
    /// Path match (absent: prefix `/`).
    #[serde(default)]
    pub path: Option<HttpPathMatch>,
    /// Header matches.
    #[serde(default)]
    pub headers: Vec<HttpHeaderMatch>,
    /// Query parameter matches.
    #[serde(default)]
    pub query_params: Vec<HttpHeaderMatch>,
    /// HTTP method.
    #[serde(default)]
    pub method: Option<String>,
}

/// How a path, header or query value is compared.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub enum MatchType {
    /// Equal.
    #[default]
    Exact,
    /// Path prefix on `/`-separated segments (paths only).
    PathPrefix,
    /// A regular expression.
    RegularExpression,
    /// Any other value (refused by validation).
    #[serde(other)]
    Unknown,
}

/// A path match.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct HttpPathMatch {
    /// `Exact`, `PathPrefix` (default) or `RegularExpression`.
    #[serde(default = "path_prefix", rename = "type")]
    pub kind: MatchType,
    /// The path (default `/`).
    #[serde(default = "slash")]
    pub value: String,
}

impl Default for HttpPathMatch {
    fn default() -> Self {
        Self {
            kind: MatchType::PathPrefix,
            value: "/".into(),
        }
    }
}

fn unknown_filter() -> FilterType {
    FilterType::Unknown
}

fn unknown_modifier() -> PathModifierType {
    PathModifierType::Unknown
}

fn path_prefix() -> MatchType {
    MatchType::PathPrefix
}

fn slash() -> String {
    "/".into()
}

/// A header or query parameter match.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct HttpHeaderMatch {
    /// `Exact` (default) or `RegularExpression`.
    #[serde(default, rename = "type")]
    pub kind: MatchType,
    /// Header (case-insensitive) or parameter name.
    #[serde(default)]
    pub name: String,
    /// Value.
    #[serde(default)]
    pub value: String,
}

/// Which filter this is.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub enum FilterType {
    /// Set/add/remove request headers.
    #[default]
    RequestHeaderModifier,
    /// Set/add/remove response headers.
    ResponseHeaderModifier,
    /// Answer with a redirect.
    RequestRedirect,
    /// Rewrite host and/or path.
    #[serde(rename = "URLRewrite")]
    UrlRewrite,
    /// Copy the request to another backend.
    RequestMirror,
    /// Implementation-specific.
    ExtensionRef,
    /// Any other value (refused by validation).
    #[serde(other)]
    Unknown,
}

/// A filter: `type` plus the matching configuration field.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteFilter {
    /// Which filter.
    #[serde(default = "unknown_filter", rename = "type")]
    pub kind: FilterType,
    /// For `RequestHeaderModifier`.
    #[serde(default)]
    pub request_header_modifier: Option<HeaderModifier>,
    /// For `ResponseHeaderModifier`.
    #[serde(default)]
    pub response_header_modifier: Option<HeaderModifier>,
    /// For `RequestRedirect`.
    #[serde(default)]
    pub request_redirect: Option<RequestRedirect>,
    /// For `URLRewrite`.
    #[serde(default, rename = "urlRewrite")]
    pub url_rewrite: Option<UrlRewrite>,
    /// For `RequestMirror`.
    #[serde(default)]
    pub request_mirror: Option<RequestMirror>,
    /// For `ExtensionRef`.
    #[serde(default)]
    pub extension_ref: Option<LocalObjectReference>,
}

/// Header edits.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct HeaderModifier {
    /// Replace (or add) these headers.
    #[serde(default)]
    pub set: Vec<HttpHeader>,
    /// Append these headers.
    #[serde(default)]
    pub add: Vec<HttpHeader>,
    /// Remove these header names.
    #[serde(default)]
    pub remove: Vec<String>,
}

/// A header name and value.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct HttpHeader {
    /// Name.
    #[serde(default)]
    pub name: String,
    /// Value.
    #[serde(default)]
    pub value: String,
}

/// A redirect answer.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RequestRedirect {
    /// `http` or `https` (absent: the request's).
    #[serde(default)]
    pub scheme: Option<String>,
    /// Host (absent: the request's).
    #[serde(default)]
    pub hostname: Option<String>,
    /// Path change.
    #[serde(default)]
    pub path: Option<PathModifier>,
    /// Port.
    #[serde(default)]
    pub port: Option<u32>,
    /// 301 or 302 (default).
    #[serde(default)]
    pub status_code: Option<u32>,
}

/// A rewrite before forwarding.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct UrlRewrite {
    /// New host.
    #[serde(default)]
    pub hostname: Option<String>,
    /// Path change.
    #[serde(default)]
    pub path: Option<PathModifier>,
}

/// How a path is replaced.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub enum PathModifierType {
    /// Replace the whole path.
    #[default]
    ReplaceFullPath,
    /// Replace the matched prefix.
    ReplacePrefixMatch,
    /// Any other value (refused by validation).
    #[serde(other)]
    Unknown,
}

/// A path change.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PathModifier {
    /// Which replacement.
    #[serde(default = "unknown_modifier", rename = "type")]
    pub kind: PathModifierType,
    /// For `ReplaceFullPath`.
    #[serde(default)]
    pub replace_full_path: Option<String>,
    /// For `ReplacePrefixMatch`.
    #[serde(default)]
    pub replace_prefix_match: Option<String>,
}

/// A mirror target.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RequestMirror {
    /// Where copies go.
    #[serde(default)]
    pub backend_ref: BackendRef,
    /// Percentage of requests mirrored (0-100).
    #[serde(default)]
    pub percent: Option<u32>,
    /// Or a fraction of requests.
    #[serde(default)]
    pub fraction: Option<Fraction>,
}

/// `numerator / denominator` (denominator default 100).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct Fraction {
    /// Numerator.
    #[serde(default)]
    pub numerator: u32,
    /// Denominator.
    #[serde(default)]
    pub denominator: Option<u32>,
}

/// A backend object (a Service unless group/kind say otherwise).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct BackendRef {
    /// Group (absent: core).
    #[serde(default)]
    pub group: Option<String>,
    /// Kind (absent: `Service`).
    #[serde(default)]
    pub kind: Option<String>,
    /// Name.
    #[serde(default)]
    pub name: String,
    /// Namespace (absent: the route's).
    #[serde(default)]
    pub namespace: Option<String>,
    /// Port (required for a Service).
    #[serde(default)]
    pub port: Option<u32>,
}

impl BackendRef {
    /// True when this names a core Service.
    pub fn is_service(&self) -> bool {
        self.group.as_deref().unwrap_or("").is_empty()
            && self.kind.as_deref().unwrap_or("Service") == "Service"
    }
}

/// A weighted backend of a rule.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct HttpBackendRef {
    /// The backend.
    #[serde(flatten)]
    pub backend: BackendRef,
    /// Relative weight (default 1, 0-1000000).
    #[serde(default)]
    pub weight: Option<u32>,
    /// Filters for this backend only.
    #[serde(default)]
    pub filters: Vec<HttpRouteFilter>,
}

impl HttpBackendRef {
    /// The weight with its default applied.
    pub fn weight(&self) -> u32 {
        self.weight.unwrap_or(1)
    }
}

/// `rules[].timeouts` (Gateway API durations such as `10s`, `1m30s`, `500ms`).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteTimeouts {
    /// Whole request, client to response.
    #[serde(default)]
    pub request: Option<String>,
    /// One attempt to the backend.
    #[serde(default)]
    pub backend_request: Option<String>,
}

/// `rules[].retry`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteRetry {
    /// HTTP status codes that are retried.
    #[serde(default)]
    pub codes: Vec<u32>,
    /// Maximum attempts.
    #[serde(default)]
    pub attempts: Option<u32>,
    /// Backoff between attempts (a Gateway API duration).
    #[serde(default)]
    pub backoff: Option<String>,
}

/// Parses a Gateway API duration: one to four `<1-5 digits><h|m|s|ms>` parts, e.g. `1h30m`,
/// `500ms`, `0s`.
pub fn parse_gateway_duration(text: &str) -> Option<Duration> {
    let bytes = text.as_bytes();
    let mut i = 0;
    let mut parts = 0;
    let mut total = Duration::ZERO;
    while i < bytes.len() {
        let start = i;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            i += 1;
        }
        let digits = &text[start..i];
        if digits.is_empty() || digits.len() > 5 {
            return None;
        }
        let number: u64 = digits.parse().ok()?;
        let rest = &text[i..];
        let (unit, len) = if rest.starts_with("ms") {
            (Duration::from_millis(1), 2)
        } else if rest.starts_with('h') {
            (Duration::from_secs(3600), 1)
        } else if rest.starts_with('m') {
            (Duration::from_secs(60), 1)
        } else if rest.starts_with('s') {
            (Duration::from_secs(1), 1)
        } else {
            return None;
        };
        i += len;
        parts += 1;
        total += unit * u32::try_from(number).ok()?;
    }
    (1..=4).contains(&parts).then_some(total)
}

/// The largest compiled form of a route's regular expression (a bound on what one object can cost
/// the control plane and the waypoint).
const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// Compiles a route's `RegularExpression` match the way Ambit applies it: RE2 syntax (the `regex`
/// crate), matched against the whole value (path, header value, query value, gRPC service or
/// method), as Envoy does for Istio. istiod-lite validates with it; the waypoint matches with it.
pub fn route_regex(pattern: &str) -> Result<regex::Regex, regex::Error> {
    regex::RegexBuilder::new(&format!("^(?:{pattern})$"))
        .size_limit(REGEX_SIZE_LIMIT)
        .build()
}

/// A GRPCRoute.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct GrpcRoute {
    /// Metadata.
    pub metadata: ObjectMeta,
    /// Spec.
    #[serde(default)]
    pub spec: GrpcRouteSpec,
}

/// `GRPCRoute.spec`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct GrpcRouteSpec {
    /// What the route attaches to: Gateways, or Services for mesh (waypoint) routing.
    #[serde(default)]
    pub parent_refs: Vec<ParentReference>,
    /// Host names matched against `:authority` (absent: all).
    #[serde(default)]
    pub hostnames: Vec<String>,
    /// Rules, tried by Gateway API precedence.
    #[serde(default)]
    pub rules: Vec<GrpcRouteRule>,
}

/// One GRPCRoute rule.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct GrpcRouteRule {
    /// Optional rule name.
    #[serde(default)]
    pub name: Option<String>,
    /// Matches (any; absent: every gRPC request).
    #[serde(default)]
    pub matches: Vec<GrpcRouteMatch>,
    /// Filters: `RequestHeaderModifier`, `ResponseHeaderModifier`, `RequestMirror` or
    /// `ExtensionRef` (the GRPCRoute filter types share HTTPRoute's fields).
    #[serde(default)]
    pub filters: Vec<HttpRouteFilter>,
    /// Backends, picked by weight.
    #[serde(default)]
    pub backend_refs: Vec<HttpBackendRef>,
}

/// One GRPCRoute match: all of its parts must hold.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct GrpcRouteMatch {
    /// The gRPC method (absent: any).
    #[serde(default)]
    pub method: Option<GrpcMethodMatch>,
    /// Header matches.
    #[serde(default)]
    pub headers: Vec<HttpHeaderMatch>,
}

/// `matches[].method`: the service and method of the `/<service>/<method>` path.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct GrpcMethodMatch {
    /// `Exact` (default) or `RegularExpression`.
    #[serde(default, rename = "type")]
    pub kind: MatchType,
    /// The fully qualified service (`pkg.Service`); absent matches any.
    #[serde(default)]
    pub service: Option<String>,
    /// The method; absent matches any.
    #[serde(default)]
    pub method: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn requirement(key: &str, operator: &str, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator: operator.into(),
            values: values.iter().map(|v| v.to_string()).collect(),
        }
    }

    #[test]
    fn a_namespace_selector_holds_when_every_label_and_expression_does() {
        let labels: BTreeMap<String, String> = [("team", "pay"), ("env", "prod")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let selector = |match_labels: &[(&str, &str)],
                        expressions: Vec<LabelSelectorRequirement>| {
            NamespaceSelector {
                match_labels: match_labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                match_expressions: expressions,
            }
            .matches(&labels)
        };
        assert!(selector(&[], vec![]), "empty: everything");
        assert!(selector(&[("team", "pay")], vec![]));
        assert!(!selector(&[("team", "ops")], vec![]));
        assert!(selector(
            &[],
            vec![requirement("team", "In", &["ops", "pay"])]
        ));
        assert!(!selector(&[], vec![requirement("team", "NotIn", &["pay"])]));
        assert!(
            selector(&[], vec![requirement("tier", "NotIn", &["web"])]),
            "absent key"
        );
        assert!(selector(&[], vec![requirement("env", "Exists", &[])]));
        assert!(!selector(
            &[],
            vec![requirement("env", "DoesNotExist", &[])]
        ));
        assert!(selector(
            &[],
            vec![requirement("tier", "DoesNotExist", &[])]
        ));
        assert!(
            !selector(
                &[("team", "pay")],
                vec![requirement("env", "In", &["staging"])]
            ),
            "all must hold"
        );
        assert!(
            !selector(&[], vec![requirement("team", "Gt", &["1"])]),
            "unknown operator"
        );
    }

    /// GEP-2257's grammar, `^([0-9]{1,5}(h|m|s|ms)){1,4}$`, as a regular expression: the parser
    /// must accept exactly what it matches.
    fn gep_2257() -> &'static regex::Regex {
        static GRAMMAR: std::sync::OnceLock<regex::Regex> = std::sync::OnceLock::new();
        GRAMMAR.get_or_init(|| regex::Regex::new(r"^([0-9]{1,5}(h|m|s|ms)){1,4}$").unwrap())
    }

    proptest::proptest! {
        #[test]
        fn gateway_durations_are_read_exactly_as_gep_2257_writes_them(
            text in "([0-9]{0,6}(h|m|s|ms|us|x|)){0,5}",
        ) {
            proptest::prop_assert_eq!(
                parse_gateway_duration(&text).is_some(),
                gep_2257().is_match(&text),
                "{:?}",
                text
            );
        }

        #[test]
        fn gateway_durations_add_their_parts(
            parts in proptest::collection::vec((0u64..100_000, 0usize..4), 1..=4),
        ) {
            let units = [("h", 3_600_000u64), ("m", 60_000), ("s", 1_000), ("ms", 1)];
            let text: String = parts.iter().map(|(n, u)| format!("{n}{}", units[*u].0)).collect();
            let millis: u64 = parts.iter().map(|(n, u)| n * units[*u].1).sum();
            proptest::prop_assert_eq!(
                parse_gateway_duration(&text),
                Some(Duration::from_millis(millis))
            );
        }

        #[test]
        fn any_text_is_no_duration_or_a_finite_one(text in proptest::prelude::any::<String>()) {
            let _ = parse_gateway_duration(&text);
            if let Some(d) = crate::destination_rule::parse_istio_duration(&text) {
                proptest::prop_assert!(d.as_secs() < 1_000_000_000_000);
            }
        }
    }
}
