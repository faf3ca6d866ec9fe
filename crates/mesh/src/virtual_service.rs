//! `networking.istio.io/v1` VirtualService (also read as `v1beta1` and `v1alpha3`): Istio's
//! routing rules for a host, applied in ambient by the waypoint bound to the host's Service. The
//! typed object, its validation (what can be checked without the rest of the cluster), and its
//! translation into one [`Route`](wp::Route) of kind `VIRTUAL_SERVICE`.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use ambit_proto::waypoint as wp;
use serde::{Deserialize, Serialize};

use crate::destination_rule::{PortSelector, parse_istio_duration};
use crate::gateway_api::route_regex;
use crate::l7::{Context, created, proto_duration, warn};
use crate::objects::{ObjectMeta, Service};
use crate::parse::{is_dns_label, is_dns_subdomain};
use crate::validate::{Invalid, require_namespace};
use crate::warning::{Warning, WarningKind};

/// The pseudo-gateway naming sidecars and waypoints in `gateways`.
pub const MESH_GATEWAY: &str = "mesh";

/// The retries Istio applies to a VirtualService route that does not set `retries`.
pub const DEFAULT_RETRY_ATTEMPTS: u32 = 2;

/// A VirtualService.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct VirtualService {
    /// Metadata.
    pub metadata: ObjectMeta,
    /// Spec.
    #[serde(default)]
    pub spec: VirtualServiceSpec,
}

/// `VirtualService.spec`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VirtualServiceSpec {
    /// The hosts the rules apply to: Service short names (relative to the VirtualService's
    /// namespace), `name.namespace`, or FQDNs.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Gateways (`mesh` for sidecars and waypoints; absent means `mesh`).
    #[serde(default)]
    pub gateways: Vec<String>,
    /// HTTP rules, first match wins.
    #[serde(default)]
    pub http: Vec<HttpRule>,
    /// TCP rules.
    #[serde(default)]
    pub tcp: Vec<TcpRule>,
    /// TLS rules (not supported by Ambit's waypoint).
    #[serde(default)]
    pub tls: Vec<serde_json::Value>,
    /// Namespaces that see it.
    #[serde(default)]
    pub export_to: Vec<String>,
}

/// An Istio `StringMatch`: exactly one of `exact`, `prefix`, `regex` (an empty one, allowed in
/// `headers` and `withoutHeaders`, means the header is present).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct StringMatch {
    /// The whole value.
    #[serde(default)]
    pub exact: Option<String>,
    /// A plain string prefix.
    #[serde(default)]
    pub prefix: Option<String>,
    /// An RE2 regular expression matching the whole value.
    #[serde(default)]
    pub regex: Option<String>,
}

/// One `http[]` rule.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HttpRule {
    /// Name (for logs and metrics).
    #[serde(default)]
    pub name: Option<String>,
    /// Conditions, ORed; absent matches every request.
    #[serde(default, rename = "match")]
    pub matches: Vec<HttpMatch>,
    /// Weighted destinations.
    #[serde(default)]
    pub route: Vec<RouteDestination>,
    /// Answer with a redirect instead of forwarding.
    #[serde(default)]
    pub redirect: Option<Redirect>,
    /// Answer directly (not supported).
    #[serde(default)]
    pub direct_response: Option<serde_json::Value>,
    /// Delegate to another VirtualService (not supported).
    #[serde(default)]
    pub delegate: Option<serde_json::Value>,
    /// Rewrite before forwarding.
    #[serde(default)]
    pub rewrite: Option<Rewrite>,
    /// The whole request, retries included (a duration).
    #[serde(default)]
    pub timeout: Option<String>,
    /// Retry policy (absent: Istio's default of 2 retries).
    #[serde(default)]
    pub retries: Option<Retries>,
    /// Fault injection.
    #[serde(default)]
    pub fault: Option<Fault>,
    /// Mirror requests to this destination.
    #[serde(default)]
    pub mirror: Option<Destination>,
    /// Fraction mirrored (absent: all).
    #[serde(default)]
    pub mirror_percentage: Option<Percent>,
    /// Deprecated integer form of `mirrorPercentage`.
    #[serde(default)]
    pub mirror_percent: Option<u32>,
    /// Several mirrors, each with its own percentage.
    #[serde(default)]
    pub mirrors: Vec<MirrorPolicy>,
    /// CORS answers.
    #[serde(default)]
    pub cors_policy: Option<CorsPolicy>,
    /// Header changes for every destination.
    #[serde(default)]
    pub headers: Option<Headers>,
}

/// One `http[].match[]` entry: every present field must match.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HttpMatch {
    /// Name (for logs).
    #[serde(default)]
    pub name: Option<String>,
    /// The path.
    #[serde(default)]
    pub uri: Option<StringMatch>,
    /// The scheme (not supported).
    #[serde(default)]
    pub scheme: Option<StringMatch>,
    /// The method (exact only).
    #[serde(default)]
    pub method: Option<StringMatch>,
    /// The authority (not supported).
    #[serde(default)]
    pub authority: Option<StringMatch>,
    /// Headers, by name.
    #[serde(default)]
    pub headers: BTreeMap<String, StringMatch>,
    /// The Service port the request is addressed to.
    #[serde(default)]
    pub port: Option<u32>,
    /// Labels of the client (not supported in ambient).
    #[serde(default)]
    pub source_labels: BTreeMap<String, String>,
    /// Gateways this match applies to (absent: the VirtualService's).
    #[serde(default)]
    pub gateways: Vec<String>,
    /// Query parameters, by name.
    #[serde(default)]
    pub query_params: BTreeMap<String, StringMatch>,
    /// Case-insensitive `uri` (not supported).
    #[serde(default)]
    pub ignore_uri_case: Option<bool>,
    /// Headers the request must not match.
    #[serde(default)]
    pub without_headers: BTreeMap<String, StringMatch>,
    /// The client's namespace (not supported in ambient).
    #[serde(default)]
    pub source_namespace: Option<String>,
}

/// A destination: a Service host, a subset of a DestinationRule, a port.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct Destination {
    /// The Service (short name relative to the VirtualService's namespace, `name.namespace`, or
    /// FQDN).
    #[serde(default)]
    pub host: String,
    /// A subset named in a DestinationRule for the host.
    #[serde(default)]
    pub subset: Option<String>,
    /// The Service port (required when the Service has more than one).
    #[serde(default)]
    pub port: Option<PortSelector>,
}

/// One `route[]` entry.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct RouteDestination {
    /// Where to.
    #[serde(default)]
    pub destination: Destination,
    /// Relative weight (absent: 100 for a single destination, else 0).
    #[serde(default)]
    pub weight: Option<i64>,
    /// Header changes for requests sent to this destination.
    #[serde(default)]
    pub headers: Option<Headers>,
}

/// `redirect`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Redirect {
    /// Replaces the whole path.
    #[serde(default)]
    pub uri: Option<String>,
    /// Replaces the authority.
    #[serde(default)]
    pub authority: Option<String>,
    /// Replaces the port.
    #[serde(default)]
    pub port: Option<u32>,
    /// `FROM_PROTOCOL_DEFAULT` or `FROM_REQUEST_PORT` (not supported).
    #[serde(default)]
    pub derive_port: Option<String>,
    /// Replaces the scheme.
    #[serde(default)]
    pub scheme: Option<String>,
    /// The status code (default 301).
    #[serde(default)]
    pub redirect_code: Option<u32>,
}

/// `rewrite`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Rewrite {
    /// The path, or the matched prefix when the match was a `prefix`.
    #[serde(default)]
    pub uri: Option<String>,
    /// The authority (`Host`).
    #[serde(default)]
    pub authority: Option<String>,
    /// Regex rewrite (not supported).
    #[serde(default)]
    pub uri_regex_rewrite: Option<serde_json::Value>,
}

/// `retries`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Retries {
    /// Retries after the first try (0 disables retries).
    #[serde(default)]
    pub attempts: Option<i64>,
    /// Each try's limit (a duration).
    #[serde(default)]
    pub per_try_timeout: Option<String>,
    /// Comma-separated Envoy retry policy names and HTTP status codes.
    #[serde(default)]
    pub retry_on: Option<String>,
    /// Retry in other localities (not supported).
    #[serde(default)]
    pub retry_remote_localities: Option<bool>,
}

/// A percentage (0-100, fractional).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct Percent {
    /// The percentage.
    #[serde(default)]
    pub value: f64,
}

/// `fault`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct Fault {
    /// Delay some requests.
    #[serde(default)]
    pub delay: Option<Delay>,
    /// Abort some requests.
    #[serde(default)]
    pub abort: Option<Abort>,
}

/// `fault.delay`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Delay {
    /// The delay (a duration).
    #[serde(default)]
    pub fixed_delay: Option<String>,
    /// Fraction delayed (absent: all).
    #[serde(default)]
    pub percentage: Option<Percent>,
    /// Deprecated integer percentage.
    #[serde(default)]
    pub percent: Option<i64>,
    /// Exponential delay (not supported).
    #[serde(default)]
    pub exponential_delay: Option<String>,
}

/// `fault.abort`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Abort {
    /// Answer with this HTTP status.
    #[serde(default)]
    pub http_status: Option<i64>,
    /// Answer with this gRPC status (a name such as `UNAVAILABLE`, or its number).
    #[serde(default)]
    pub grpc_status: Option<serde_json::Value>,
    /// Reset with this HTTP/2 error (not supported).
    #[serde(default)]
    pub http2_error: Option<String>,
    /// Fraction aborted (absent: all).
    #[serde(default)]
    pub percentage: Option<Percent>,
}

/// One `mirrors[]` entry.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct MirrorPolicy {
    /// Where copies go.
    #[serde(default)]
    pub destination: Destination,
    /// Fraction mirrored (absent: all).
    #[serde(default)]
    pub percentage: Option<Percent>,
}

/// `corsPolicy`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct CorsPolicy {
    /// Allowed origins.
    #[serde(default)]
    pub allow_origins: Vec<StringMatch>,
    /// Deprecated: allowed origins, exact.
    #[serde(default)]
    pub allow_origin: Vec<String>,
    /// `Access-Control-Allow-Methods`.
    #[serde(default)]
    pub allow_methods: Vec<String>,
    /// `Access-Control-Allow-Headers`.
    #[serde(default)]
    pub allow_headers: Vec<String>,
    /// `Access-Control-Expose-Headers`.
    #[serde(default)]
    pub expose_headers: Vec<String>,
    /// `Access-Control-Max-Age` (a duration).
    #[serde(default)]
    pub max_age: Option<String>,
    /// `Access-Control-Allow-Credentials`.
    #[serde(default)]
    pub allow_credentials: Option<bool>,
}

/// `headers`: request and response changes.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct Headers {
    /// Changes to the request.
    #[serde(default)]
    pub request: Option<HeaderOperations>,
    /// Changes to the response.
    #[serde(default)]
    pub response: Option<HeaderOperations>,
}

/// Set, add and remove.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct HeaderOperations {
    /// Replace (or add).
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    /// Append.
    #[serde(default)]
    pub add: BTreeMap<String, String>,
    /// Remove.
    #[serde(default)]
    pub remove: Vec<String>,
}

/// One `tcp[]` rule.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct TcpRule {
    /// Conditions, ORed; absent matches every connection.
    #[serde(default, rename = "match")]
    pub matches: Vec<L4Match>,
    /// Weighted destinations.
    #[serde(default)]
    pub route: Vec<RouteDestination>,
}

/// One `tcp[].match[]` entry.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct L4Match {
    /// Destination subnets (not supported).
    #[serde(default)]
    pub destination_subnets: Vec<String>,
    /// The Service port the connection is addressed to.
    #[serde(default)]
    pub port: Option<u32>,
    /// Client labels (not supported in ambient).
    #[serde(default)]
    pub source_labels: BTreeMap<String, String>,
    /// Gateways this match applies to.
    #[serde(default)]
    pub gateways: Vec<String>,
    /// The client's namespace (not supported in ambient).
    #[serde(default)]
    pub source_namespace: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------------------------

/// The Envoy retry policies a waypoint honours in `retryOn`.
pub const RETRY_ON: [&str; 12] = [
    "5xx",
    "gateway-error",
    "reset",
    "connect-failure",
    "retriable-4xx",
    "refused-stream",
    "retriable-status-codes",
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
];

/// gRPC status names, by code.
const GRPC_STATUS: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

fn fail<T>(field: impl Into<String>, reason: impl Into<String>) -> Result<T, Invalid> {
    Err((field.into(), reason.into()))
}

fn unsupported<T>(field: impl Into<String>, what: &str) -> Result<T, Invalid> {
    fail(
        field,
        format!("{what} is not supported by Ambit's waypoint"),
    )
}

fn duration(field: &str, value: &Option<String>) -> Result<Option<Duration>, Invalid> {
    match value {
        None => Ok(None),
        Some(text) => match parse_istio_duration(text) {
            Some(d) => Ok(Some(d)),
            None => fail(
                field,
                format!("{text:?} is not a duration (such as 10s, 1.5s or 100ms)"),
            ),
        },
    }
}

fn port(field: &str, port: u32) -> Result<(), Invalid> {
    if (1..=65535).contains(&port) {
        Ok(())
    } else {
        fail(field, format!("{port} is not a port number (1-65535)"))
    }
}

fn percent(field: &str, value: &Option<Percent>) -> Result<(), Invalid> {
    match value {
        Some(p) if !(0.0..=100.0).contains(&p.value) => fail(
            format!("{field}.value"),
            format!("{} is not a percentage (0-100)", p.value),
        ),
        _ => Ok(()),
    }
}

/// A StringMatch: one kind (none only where `empty_ok`: header presence), a regex that compiles.
fn string_match(field: &str, m: &StringMatch, empty_ok: bool) -> Result<(), Invalid> {
    let kinds = usize::from(m.exact.is_some())
        + usize::from(m.prefix.is_some())
        + usize::from(m.regex.is_some());
    if kinds > 1 {
        return fail(field, "only one of exact, prefix and regex");
    }
    if kinds == 0 && !empty_ok {
        return fail(field, "one of exact, prefix or regex is required");
    }
    if let Some(pattern) = &m.regex
        && let Err(e) = route_regex(pattern)
    {
        return fail(
            format!("{field}.regex"),
            format!("{pattern:?} is not a regular expression (RE2 syntax): {e}"),
        );
    }
    Ok(())
}

fn header_name(field: &str, name: &str) -> Result<(), Invalid> {
    let valid = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
    if valid {
        Ok(())
    } else {
        fail(field, format!("{name:?} is not a header name"))
    }
}

/// A host of `hosts` or `destination.host`: a DNS name, possibly a `*.` wildcard or `*`.
fn host(field: &str, value: &str) -> Result<(), Invalid> {
    let name = value.strip_prefix("*.").unwrap_or(value);
    if value == "*" || (!name.is_empty() && is_dns_subdomain(name)) {
        Ok(())
    } else {
        fail(field, format!("{value:?} is not a valid host name"))
    }
}

fn destination(at: &str, d: &Destination) -> Result<(), Invalid> {
    if d.host.is_empty() {
        return fail(format!("{at}.host"), "required");
    }
    host(&format!("{at}.host"), &d.host)?;
    if let Some(subset) = &d.subset
        && !is_dns_label(subset)
    {
        return fail(
            format!("{at}.subset"),
            format!("{subset:?} is not a valid subset name"),
        );
    }
    if let Some(p) = &d.port {
        port(&format!("{at}.port.number"), p.number)?;
    }
    Ok(())
}

fn route_destinations(at: &str, route: &[RouteDestination]) -> Result<(), Invalid> {
    for (k, entry) in route.iter().enumerate() {
        let at = format!("{at}[{k}]");
        destination(&format!("{at}.destination"), &entry.destination)?;
        if let Some(w) = entry.weight
            && !(0..=i64::from(u32::MAX)).contains(&w)
        {
            return fail(
                format!("{at}.weight"),
                format!("{w} is negative or too large"),
            );
        }
        if let Some(h) = &entry.headers {
            headers(&format!("{at}.headers"), h)?;
        }
    }
    if route.len() > 1 && route.iter().all(|r| r.weight.unwrap_or(0) == 0) {
        return fail(
            at,
            "with more than one destination, at least one needs a weight above 0",
        );
    }
    Ok(())
}

fn headers(at: &str, h: &Headers) -> Result<(), Invalid> {
    for (part, ops) in [("request", &h.request), ("response", &h.response)] {
        let Some(ops) = ops else { continue };
        for (list, names) in [("set", &ops.set), ("add", &ops.add)] {
            for name in names.keys() {
                header_name(&format!("{at}.{part}.{list}[{name}]"), name)?;
            }
        }
        for (i, name) in ops.remove.iter().enumerate() {
            header_name(&format!("{at}.{part}.remove[{i}]"), name)?;
        }
    }
    Ok(())
}

fn http_match(at: &str, m: &HttpMatch) -> Result<(), Invalid> {
    if let Some(uri) = &m.uri {
        string_match(&format!("{at}.uri"), uri, false)?;
    }
    if m.scheme.is_some() {
        return unsupported(format!("{at}.scheme"), "matching on the scheme");
    }
    if m.authority.is_some() {
        return unsupported(
            format!("{at}.authority"),
            "matching on the authority (the waypoint routes by Service)",
        );
    }
    if let Some(method) = &m.method {
        string_match(&format!("{at}.method"), method, false)?;
        if method.exact.is_none() {
            return unsupported(format!("{at}.method"), "a method match other than exact");
        }
    }
    for (list, entries) in [
        ("headers", &m.headers),
        ("withoutHeaders", &m.without_headers),
    ] {
        for (name, entry) in entries {
            let field = format!("{at}.{list}[{name}]");
            header_name(&field, name)?;
            string_match(&field, entry, true)?;
        }
    }
    for (name, entry) in &m.query_params {
        let field = format!("{at}.queryParams[{name}]");
        if name.is_empty() {
            return fail(field, "the parameter name is empty");
        }
        string_match(&field, entry, true)?;
    }
    if let Some(p) = m.port {
        port(&format!("{at}.port"), p)?;
    }
    if !m.source_labels.is_empty() {
        return unsupported(
            format!("{at}.sourceLabels"),
            "matching on client labels (not available to a waypoint)",
        );
    }
    if m.source_namespace.is_some() {
        return unsupported(
            format!("{at}.sourceNamespace"),
            "matching on the client namespace",
        );
    }
    if m.ignore_uri_case == Some(true) {
        return unsupported(format!("{at}.ignoreUriCase"), "a case-insensitive uri");
    }
    Ok(())
}

fn retries(at: &str, r: &Retries) -> Result<(), Invalid> {
    if let Some(n) = r.attempts
        && !(0..=i64::from(u32::MAX)).contains(&n)
    {
        return fail(
            format!("{at}.attempts"),
            format!("{n} is negative or too large"),
        );
    }
    if let Some(d) = duration(&format!("{at}.perTryTimeout"), &r.per_try_timeout)?
        && d < Duration::from_millis(1)
    {
        return fail(format!("{at}.perTryTimeout"), "must be at least 1ms");
    }
    if let Some(list) = &r.retry_on {
        for entry in list.split(',').map(str::trim) {
            let valid = RETRY_ON.contains(&entry)
                || entry
                    .parse::<u32>()
                    .is_ok_and(|code| (100..=599).contains(&code));
            if !valid {
                return fail(
                    format!("{at}.retryOn"),
                    format!(
                        "{entry:?} is not an HTTP status code or a retry policy the waypoint honours ({})",
                        RETRY_ON.join(", ")
                    ),
                );
            }
        }
    }
    if r.retry_remote_localities.is_some() {
        return unsupported(
            format!("{at}.retryRemoteLocalities"),
            "retryRemoteLocalities",
        );
    }
    Ok(())
}

/// The gRPC code of `value`: a status name such as `UNAVAILABLE` or a number 0-16.
fn grpc_code(value: &serde_json::Value) -> Option<u32> {
    match value {
        serde_json::Value::String(name) => name
            .parse::<u32>()
            .ok()
            .or_else(|| GRPC_STATUS.iter().position(|s| s == name).map(|i| i as u32))
            .filter(|c| *c < GRPC_STATUS.len() as u32),
        serde_json::Value::Number(n) => n
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .filter(|c| *c < GRPC_STATUS.len() as u32),
        _ => None,
    }
}

fn fault(at: &str, f: &Fault) -> Result<(), Invalid> {
    if f.delay.is_none() && f.abort.is_none() {
        return fail(at, "delay or abort is required");
    }
    if let Some(d) = &f.delay {
        let at = format!("{at}.delay");
        if d.exponential_delay.is_some() {
            return unsupported(format!("{at}.exponentialDelay"), "an exponential delay");
        }
        if d.fixed_delay.is_none() {
            return fail(format!("{at}.fixedDelay"), "required");
        }
        duration(&format!("{at}.fixedDelay"), &d.fixed_delay)?;
        percent(&format!("{at}.percentage"), &d.percentage)?;
        if let Some(p) = d.percent
            && !(0..=100).contains(&p)
        {
            return fail(format!("{at}.percent"), format!("{p} is not 0-100"));
        }
    }
    if let Some(a) = &f.abort {
        let at = format!("{at}.abort");
        if a.http2_error.is_some() {
            return unsupported(format!("{at}.http2Error"), "an HTTP/2 error abort");
        }
        match (&a.http_status, &a.grpc_status) {
            (Some(_), Some(_)) => return fail(at, "only one of httpStatus and grpcStatus"),
            (None, None) => return fail(at, "httpStatus or grpcStatus is required"),
            (Some(status), None) if !(200..=599).contains(status) => {
                return fail(
                    format!("{at}.httpStatus"),
                    format!("{status} is not an HTTP status (200-599)"),
                );
            }
            (None, Some(status)) if grpc_code(status).is_none() => {
                return fail(
                    format!("{at}.grpcStatus"),
                    format!("{status} is not a gRPC status (such as UNAVAILABLE, or 0-16)"),
                );
            }
            _ => {}
        }
        percent(&format!("{at}.percentage"), &a.percentage)?;
    }
    Ok(())
}

fn gateways(field: &str, list: &[String]) -> Result<(), Invalid> {
    for (i, g) in list.iter().enumerate() {
        let name = g.split_once('/').map_or(g.as_str(), |(_, n)| n);
        if g != MESH_GATEWAY && !is_dns_subdomain(name) {
            return fail(
                format!("{field}[{i}]"),
                format!("{g:?} is not mesh or a [namespace/]gateway name"),
            );
        }
    }
    Ok(())
}

fn http_rule(at: &str, rule: &HttpRule) -> Result<(), Invalid> {
    if rule.direct_response.is_some() {
        return unsupported(format!("{at}.directResponse"), "directResponse");
    }
    if rule.delegate.is_some() {
        return unsupported(format!("{at}.delegate"), "delegate");
    }
    match (&rule.redirect, rule.route.is_empty()) {
        (Some(_), false) => return fail(format!("{at}.redirect"), "cannot be combined with route"),
        (None, true) => return fail(format!("{at}.route"), "route or redirect is required"),
        _ => {}
    }
    for (j, m) in rule.matches.iter().enumerate() {
        http_match(&format!("{at}.match[{j}]"), m)?;
        gateways(&format!("{at}.match[{j}].gateways"), &m.gateways)?;
    }
    route_destinations(&format!("{at}.route"), &rule.route)?;
    if let Some(r) = &rule.redirect {
        let at = format!("{at}.redirect");
        if let Some(scheme) = &r.scheme
            && !matches!(scheme.as_str(), "http" | "https")
        {
            return fail(
                format!("{at}.scheme"),
                format!("{scheme:?} is not http or https"),
            );
        }
        if let Some(authority) = &r.authority
            && !is_dns_subdomain(authority)
        {
            return fail(
                format!("{at}.authority"),
                format!("{authority:?} is not a host name"),
            );
        }
        if let Some(p) = r.port {
            port(&format!("{at}.port"), p)?;
        }
        if r.derive_port.is_some() {
            return unsupported(format!("{at}.derivePort"), "derivePort");
        }
        if let Some(code) = r.redirect_code
            && !matches!(code, 301 | 302 | 303 | 307 | 308)
        {
            return fail(
                format!("{at}.redirectCode"),
                format!("{code} is not 301, 302, 303, 307 or 308"),
            );
        }
        if let Some(uri) = &r.uri
            && !uri.starts_with('/')
        {
            return fail(
                format!("{at}.uri"),
                format!("{uri:?} does not start with '/'"),
            );
        }
    }
    if let Some(r) = &rule.rewrite {
        let at = format!("{at}.rewrite");
        if r.uri_regex_rewrite.is_some() {
            return unsupported(format!("{at}.uriRegexRewrite"), "uriRegexRewrite");
        }
        if let Some(authority) = &r.authority
            && authority.is_empty()
        {
            return fail(format!("{at}.authority"), "empty");
        }
    }
    duration(&format!("{at}.timeout"), &rule.timeout)?;
    if let Some(r) = &rule.retries {
        retries(&format!("{at}.retries"), r)?;
    }
    if let Some(f) = &rule.fault {
        fault(&format!("{at}.fault"), f)?;
    }
    if let Some(m) = &rule.mirror {
        destination(&format!("{at}.mirror"), m)?;
    }
    percent(&format!("{at}.mirrorPercentage"), &rule.mirror_percentage)?;
    if let Some(p) = rule.mirror_percent
        && p > 100
    {
        return fail(format!("{at}.mirrorPercent"), format!("{p} is not 0-100"));
    }
    for (m, mirror) in rule.mirrors.iter().enumerate() {
        destination(
            &format!("{at}.mirrors[{m}].destination"),
            &mirror.destination,
        )?;
        percent(&format!("{at}.mirrors[{m}].percentage"), &mirror.percentage)?;
    }
    if let Some(cors) = &rule.cors_policy {
        let at = format!("{at}.corsPolicy");
        for (o, origin) in cors.allow_origins.iter().enumerate() {
            string_match(&format!("{at}.allowOrigins[{o}]"), origin, false)?;
        }
        duration(&format!("{at}.maxAge"), &cors.max_age)?;
    }
    if let Some(h) = &rule.headers {
        headers(&format!("{at}.headers"), h)?;
    }
    Ok(())
}

/// Checks a VirtualService on its own (hosts, subsets and ports are resolved by the
/// translation, which refuses the object when they name nothing).
pub(crate) fn validate(vs: &VirtualService) -> Result<(), Invalid> {
    require_namespace(&vs.metadata)?;
    let spec = &vs.spec;
    if spec.hosts.is_empty() {
        return fail("spec.hosts", "at least one host is required");
    }
    for (i, h) in spec.hosts.iter().enumerate() {
        host(&format!("spec.hosts[{i}]"), h)?;
    }
    gateways("spec.gateways", &spec.gateways)?;
    if !spec.tls.is_empty() {
        return unsupported("spec.tls", "TLS routes");
    }
    if spec.http.is_empty() && spec.tcp.is_empty() {
        return fail("spec.http", "http or tcp rules are required");
    }
    for (i, rule) in spec.http.iter().enumerate() {
        http_rule(&format!("spec.http[{i}]"), rule)?;
    }
    for (i, rule) in spec.tcp.iter().enumerate() {
        let at = format!("spec.tcp[{i}]");
        for (j, m) in rule.matches.iter().enumerate() {
            let at = format!("{at}.match[{j}]");
            if let Some(p) = m.port {
                port(&format!("{at}.port"), p)?;
            }
            if !m.destination_subnets.is_empty() {
                return unsupported(format!("{at}.destinationSubnets"), "destinationSubnets");
            }
            if !m.source_labels.is_empty() {
                return unsupported(format!("{at}.sourceLabels"), "matching on client labels");
            }
            if m.source_namespace.is_some() {
                return unsupported(
                    format!("{at}.sourceNamespace"),
                    "matching on the client namespace",
                );
            }
            gateways(&format!("{at}.gateways"), &m.gateways)?;
        }
        if rule.route.is_empty() {
            return fail(format!("{at}.route"), "required");
        }
        route_destinations(&format!("{at}.route"), &rule.route)?;
    }
    for (i, entry) in spec.export_to.iter().enumerate() {
        if !(entry == "." || entry == "*" || is_dns_label(entry)) {
            return fail(
                format!("spec.exportTo[{i}]"),
                format!("{entry:?} is not '.', '*' or a namespace name"),
            );
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Translation
// ---------------------------------------------------------------------------------------------

/// Which problem, the field, and why the VirtualService cannot be served.
type Refused = (WarningKind, String, String);

/// Whether a `gateways` list (of the spec or of a match) includes sidecars and waypoints.
fn for_mesh(gateways: &[String]) -> bool {
    gateways.is_empty() || gateways.iter().any(|g| g == MESH_GATEWAY)
}

fn string_value(name: String, m: &StringMatch) -> wp::StringMatch {
    let (kind, value) = match (&m.exact, &m.prefix, &m.regex) {
        (Some(v), _, _) => (wp::MatchType::Exact, v.clone()),
        (_, Some(v), _) => (wp::MatchType::PrefixString, v.clone()),
        (_, _, Some(v)) => (wp::MatchType::Regex, v.clone()),
        // Presence: any value, the header must be there.
        _ => (wp::MatchType::Regex, ".*".to_string()),
    };
    wp::StringMatch {
        name,
        r#type: kind as i32,
        value,
    }
}

fn route_match(m: &HttpMatch) -> wp::RouteMatch {
    let path = m.uri.as_ref().map(|uri| {
        let s = string_value(String::new(), uri);
        wp::PathMatch {
            r#type: s.r#type,
            value: s.value,
        }
    });
    let headers = |map: &BTreeMap<String, StringMatch>| {
        map.iter()
            .map(|(name, m)| string_value(name.to_ascii_lowercase(), m))
            .collect()
    };
    wp::RouteMatch {
        path,
        headers: headers(&m.headers),
        query_params: m
            .query_params
            .iter()
            .map(|(name, m)| string_value(name.clone(), m))
            .collect(),
        method: m
            .method
            .as_ref()
            .and_then(|s| s.exact.clone())
            .unwrap_or_default(),
        grpc: None,
        without_headers: headers(&m.without_headers),
    }
}

fn header_ops(ops: &HeaderOperations) -> wp::HeaderModifier {
    let list = |map: &BTreeMap<String, String>| {
        map.iter()
            .map(|(name, value)| wp::Header {
                name: name.to_ascii_lowercase(),
                value: value.clone(),
            })
            .collect()
    };
    wp::HeaderModifier {
        set: list(&ops.set),
        add: list(&ops.add),
        remove: ops.remove.iter().map(|n| n.to_ascii_lowercase()).collect(),
    }
}

fn header_filters(headers: &Option<Headers>) -> Vec<wp::Filter> {
    use wp::filter::Kind;
    let mut out = Vec::new();
    if let Some(h) = headers {
        if let Some(ops) = &h.request {
            out.push(wp::Filter {
                kind: Some(Kind::RequestHeaderModifier(header_ops(ops))),
            });
        }
        if let Some(ops) = &h.response {
            out.push(wp::Filter {
                kind: Some(Kind::ResponseHeaderModifier(header_ops(ops))),
            });
        }
    }
    out
}

/// A percentage as a fraction of a million (absent: `None`, meaning all).
fn per_million(p: &Option<Percent>) -> Option<u32> {
    p.as_ref()
        .map(|p| (p.value.clamp(0.0, 100.0) * 10_000.0).round() as u32)
}

fn duration_of(text: &Option<String>) -> Option<prost_types::Duration> {
    text.as_deref()
        .and_then(parse_istio_duration)
        .and_then(proto_duration)
}

/// What one VirtualService resolves against: subsets declared for each Service (by Address name).
pub(crate) struct Subsets<'a>(pub(crate) &'a BTreeMap<String, BTreeSet<String>>);

/// Resolves a destination to a backend; refused when the host is not a Service, the port is not
/// one of its ports (or missing while it has several), or the subset is not declared.
fn backend(
    at: &str,
    namespace: &str,
    d: &Destination,
    context: &Context<'_>,
    subsets: &Subsets<'_>,
) -> Result<wp::Backend, Refused> {
    let Some(service) = context.host_service(&d.host, namespace) else {
        return Err((
            WarningKind::BackendNotFound,
            format!("{at}.host"),
            format!(
                "{:?} is not a Service (a short name in {namespace}, name.namespace, or name.namespace.svc.{})",
                d.host, context.settings.domain_suffix
            ),
        ));
    };
    let named = format!(
        "Service {}/{}",
        service.metadata.namespace, service.metadata.name
    );
    let port = match &d.port {
        Some(p) => {
            if !service
                .spec
                .ports
                .iter()
                .any(|sp| u32::from(sp.port) == p.number)
            {
                return Err((
                    WarningKind::BackendPortNotFound,
                    format!("{at}.port.number"),
                    format!("{named} has no port {}", p.number),
                ));
            }
            p.number
        }
        None => match service.spec.ports.as_slice() {
            [only] => u32::from(only.port),
            [] => {
                return Err((
                    WarningKind::BackendPortNotFound,
                    format!("{at}.host"),
                    format!("{named} has no ports"),
                ));
            }
            _ => {
                return Err((
                    WarningKind::DestinationPortRequired,
                    format!("{at}.port"),
                    format!("required: {named} has more than one port"),
                ));
            }
        },
    };
    let address = context.address_name(service);
    let subset = d.subset.clone().unwrap_or_default();
    if !subset.is_empty() && !subsets.0.get(&address).is_some_and(|s| s.contains(&subset)) {
        return Err((
            WarningKind::SubsetNotFound,
            format!("{at}.subset"),
            format!("no DestinationRule for {named} declares a subset {subset:?}"),
        ));
    }
    Ok(wp::Backend {
        service: address,
        port,
        weight: 1,
        subset,
        ..Default::default()
    })
}

fn backends(
    at: &str,
    namespace: &str,
    route: &[RouteDestination],
    context: &Context<'_>,
    subsets: &Subsets<'_>,
) -> Result<Vec<wp::Backend>, Refused> {
    let single = route.len() == 1;
    route
        .iter()
        .enumerate()
        .map(|(k, entry)| {
            let at = format!("{at}[{k}]");
            let mut b = backend(
                &format!("{at}.destination"),
                namespace,
                &entry.destination,
                context,
                subsets,
            )?;
            b.weight = match entry.weight {
                None if single => 100,
                w => u32::try_from(w.unwrap_or(0)).unwrap_or(0),
            };
            b.filters = header_filters(&entry.headers);
            Ok(b)
        })
        .collect()
}

fn mirror(
    at: &str,
    namespace: &str,
    d: &Destination,
    percentage: Option<u32>,
    context: &Context<'_>,
    subsets: &Subsets<'_>,
) -> Result<wp::Filter, Refused> {
    let b = backend(at, namespace, d, context, subsets)?;
    let (numerator, denominator) = match percentage {
        Some(n) => (n, 1_000_000),
        None => (0, 0),
    };
    Ok(wp::Filter {
        kind: Some(wp::filter::Kind::RequestMirror(wp::RequestMirror {
            backend: Some(b),
            numerator,
            denominator,
        })),
    })
}

fn retry(r: &Option<Retries>) -> wp::Retry {
    let Some(r) = r else {
        return wp::Retry {
            attempts: DEFAULT_RETRY_ATTEMPTS,
            ..Default::default()
        };
    };
    let mut codes = Vec::new();
    let mut retry_on: Vec<String> = Vec::new();
    for entry in r.retry_on.iter().flat_map(|s| s.split(',')).map(str::trim) {
        match entry.parse::<u32>() {
            Ok(code) => codes.push(code),
            Err(_) if !entry.is_empty() && !retry_on.iter().any(|e| e == entry) => {
                retry_on.push(entry.to_string());
            }
            Err(_) => {}
        }
    }
    if !codes.is_empty() && !retry_on.iter().any(|e| e == "retriable-status-codes") {
        retry_on.push("retriable-status-codes".to_string());
    }
    wp::Retry {
        attempts: r.attempts.and_then(|n| u32::try_from(n).ok()).unwrap_or(0),
        per_try_timeout: duration_of(&r.per_try_timeout),
        codes,
        retry_on,
        backoff: None,
    }
}

fn fault_of(f: &Fault) -> wp::Fault {
    let mut out = wp::Fault::default();
    if let Some(d) = &f.delay {
        out.delay = duration_of(&d.fixed_delay);
        out.delay_percent = match (&d.percentage, d.percent) {
            (Some(p), _) => p.value,
            (None, Some(p)) => p as f64,
            (None, None) => 100.0,
        };
    }
    if let Some(a) = &f.abort {
        out.abort_percent = a.percentage.as_ref().map_or(100.0, |p| p.value);
        match (&a.http_status, &a.grpc_status) {
            (Some(status), _) => out.abort_http_status = u32::try_from(*status).unwrap_or(500),
            (None, Some(status)) => {
                out.abort_grpc = true;
                out.abort_grpc_status = grpc_code(status).unwrap_or(2);
            }
            (None, None) => {}
        }
    }
    out
}

fn cors_of(c: &CorsPolicy) -> wp::CorsPolicy {
    let mut allow_origins: Vec<wp::StringMatch> = c
        .allow_origins
        .iter()
        .map(|m| string_value(String::new(), m))
        .collect();
    allow_origins.extend(c.allow_origin.iter().map(|o| wp::StringMatch {
        name: String::new(),
        r#type: wp::MatchType::Exact as i32,
        value: o.clone(),
    }));
    wp::CorsPolicy {
        allow_origins,
        allow_methods: c.allow_methods.clone(),
        allow_headers: c.allow_headers.clone(),
        expose_headers: c.expose_headers.clone(),
        max_age: duration_of(&c.max_age),
        allow_credentials: c.allow_credentials.unwrap_or(false),
    }
}

/// One `http[]` rule; `None` when every match of it is for other gateways.
fn http_rule_of(
    at: &str,
    namespace: &str,
    rule: &HttpRule,
    context: &Context<'_>,
    subsets: &Subsets<'_>,
) -> Result<Option<wp::Rule>, Refused> {
    use wp::filter::Kind;
    let kept: Vec<&HttpMatch> = rule
        .matches
        .iter()
        .filter(|m| for_mesh(&m.gateways))
        .collect();
    if !rule.matches.is_empty() && kept.is_empty() {
        return Ok(None);
    }
    // A rule without a match still gets one (matching everything), so that a rule without
    // matches in a VIRTUAL_SERVICE route always means a `tcp` rule.
    let matches = if kept.is_empty() {
        vec![wp::RouteMatch::default()]
    } else {
        kept.iter().map(|m| route_match(m)).collect()
    };
    let mut filters = header_filters(&rule.headers);
    if let Some(r) = &rule.rewrite {
        let prefix = kept
            .iter()
            .any(|m| m.uri.as_ref().is_some_and(|u| u.prefix.is_some()));
        filters.push(wp::Filter {
            kind: Some(Kind::UrlRewrite(wp::UrlRewrite {
                hostname: r.authority.clone().unwrap_or_default(),
                path: r.uri.as_ref().map(|uri| wp::PathModifier {
                    r#type: if prefix {
                        wp::PathModifierType::PrefixMatch
                    } else {
                        wp::PathModifierType::Full
                    } as i32,
                    value: uri.clone(),
                }),
            })),
        });
    }
    if let Some(r) = &rule.redirect {
        filters.push(wp::Filter {
            kind: Some(Kind::RequestRedirect(wp::RequestRedirect {
                scheme: r.scheme.clone().unwrap_or_default(),
                hostname: r.authority.clone().unwrap_or_default(),
                port: r.port.unwrap_or(0),
                path: r.uri.as_ref().map(|uri| wp::PathModifier {
                    r#type: wp::PathModifierType::Full as i32,
                    value: uri.clone(),
                }),
                status_code: r.redirect_code.unwrap_or(301),
            })),
        });
    }
    if let Some(m) = &rule.mirror {
        let percentage = per_million(&rule.mirror_percentage)
            .or(rule.mirror_percent.map(|p| p.min(100) * 10_000));
        filters.push(mirror(
            &format!("{at}.mirror"),
            namespace,
            m,
            percentage,
            context,
            subsets,
        )?);
    }
    for (i, m) in rule.mirrors.iter().enumerate() {
        filters.push(mirror(
            &format!("{at}.mirrors[{i}].destination"),
            namespace,
            &m.destination,
            per_million(&m.percentage),
            context,
            subsets,
        )?);
    }
    Ok(Some(wp::Rule {
        name: rule.name.clone().unwrap_or_default(),
        matches,
        filters,
        backends: backends(
            &format!("{at}.route"),
            namespace,
            &rule.route,
            context,
            subsets,
        )?,
        timeouts: rule.timeout.as_ref().map(|_| wp::Timeouts {
            request: duration_of(&rule.timeout),
            backend_request: None,
        }),
        retry: Some(retry(&rule.retries)),
        fault: rule.fault.as_ref().map(fault_of),
        cors: rule.cors_policy.as_ref().map(cors_of),
    }))
}

/// The ports a rule is limited to (by `match[].port`), as the first field naming one; empty when
/// it applies to every port.
fn rule_ports(ports: impl Iterator<Item = Option<u32>>) -> BTreeSet<u32> {
    let mut out = BTreeSet::new();
    for p in ports {
        match p {
            Some(p) => {
                out.insert(p);
            }
            None => return BTreeSet::new(),
        }
    }
    out
}

/// Translates a VirtualService into its waypoint Route and the waypoints serving it; `None` when
/// it is not a waypoint's (only other gateways) or refused (with a warning naming the field).
pub(crate) fn translate(
    vs: &VirtualService,
    context: &Context<'_>,
    subsets: &Subsets<'_>,
    warnings: &mut Vec<Warning>,
) -> Option<(wp::Route, BTreeSet<String>)> {
    let meta = &vs.metadata;
    let named = format!("VirtualService {}/{}", meta.namespace, meta.name);
    if !for_mesh(&vs.spec.gateways) {
        return None;
    }
    let result = (|| -> Result<(wp::Route, BTreeSet<String>), Refused> {
        // Hosts: each must be a Service.
        let mut hosts: Vec<&Service> = Vec::new();
        let mut served_by = BTreeSet::new();
        for (i, h) in vs.spec.hosts.iter().enumerate() {
            let at = format!("spec.hosts[{i}]");
            let Some(service) = context.host_service(h, &meta.namespace) else {
                return Err((
                    WarningKind::BackendNotFound,
                    at,
                    format!(
                        "{h:?} is not a Service (a short name in {}, name.namespace, or name.namespace.svc.{})",
                        meta.namespace, context.settings.domain_suffix
                    ),
                ));
            };
            let ns = &service.metadata.namespace;
            let name = &service.metadata.name;
            let waypoint = context.bound.get(&(ns.clone(), name.clone()));
            let waypoint_ns = waypoint.and_then(|w| w.split_once('/')).map(|(n, _)| n);
            if *ns != meta.namespace && waypoint_ns != Some(meta.namespace.as_str()) {
                warn(
                    warnings,
                    WarningKind::RouteNotAllowed,
                    &named,
                    &at,
                    &format!(
                        "Service {ns}/{name} is in another namespace and the VirtualService is not in its waypoint's namespace; the host is ignored"
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
                        "Service {ns}/{name} has no waypoint: the VirtualService has no effect on it"
                    ),
                ),
            }
            if !hosts.iter().any(|s| s.metadata == service.metadata) {
                hosts.push(service);
            }
        }
        if hosts.is_empty() {
            return Err((
                WarningKind::RouteNotServed,
                "spec.hosts".into(),
                "no host is a Service the VirtualService can apply to".into(),
            ));
        }
        // Ports named by matches must be ports of a host.
        let mut rule_port_sets = Vec::new();
        for (i, rule) in vs.spec.http.iter().enumerate() {
            let kept: Vec<(usize, &HttpMatch)> = rule
                .matches
                .iter()
                .enumerate()
                .filter(|(_, m)| for_mesh(&m.gateways))
                .collect();
            if !rule.matches.is_empty() && kept.is_empty() {
                continue;
            }
            for (j, m) in &kept {
                check_port(&format!("spec.http[{i}].match[{j}].port"), m.port, &hosts)?;
            }
            let set = rule_ports(kept.iter().map(|(_, m)| m.port));
            let field = kept
                .iter()
                .find(|(_, m)| m.port.is_some())
                .map(|(j, _)| format!("spec.http[{i}].match[{j}].port"));
            rule_port_sets.push((set, field));
        }
        for (i, rule) in vs.spec.tcp.iter().enumerate() {
            let kept: Vec<(usize, &L4Match)> = rule
                .matches
                .iter()
                .enumerate()
                .filter(|(_, m)| for_mesh(&m.gateways))
                .collect();
            if !rule.matches.is_empty() && kept.is_empty() {
                continue;
            }
            for (j, m) in &kept {
                check_port(&format!("spec.tcp[{i}].match[{j}].port"), m.port, &hosts)?;
            }
            let set = rule_ports(kept.iter().map(|(_, m)| m.port));
            let field = kept
                .iter()
                .find(|(_, m)| m.port.is_some())
                .map(|(j, _)| format!("spec.tcp[{i}].match[{j}].port"));
            rule_port_sets.push((set, field));
        }
        let every_port = rule_port_sets.iter().any(|(set, _)| set.is_empty());
        let all_ports: BTreeSet<u32> = if every_port {
            BTreeSet::new()
        } else {
            rule_port_sets
                .iter()
                .flat_map(|(s, _)| s.iter().copied())
                .collect()
        };
        for (set, field) in &rule_port_sets {
            if let Some(field) = field
                && *set != all_ports
            {
                let on = if every_port {
                    "every port".to_string()
                } else {
                    format!(
                        "ports {}",
                        all_ports
                            .iter()
                            .map(u32::to_string)
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                };
                warn(
                    warnings,
                    WarningKind::RulePortsDiffer,
                    &named,
                    field,
                    &format!(
                        "the rules of one VirtualService are limited to different ports; the waypoint applies this rule on {on}"
                    ),
                );
            }
        }
        let mut parents = Vec::new();
        for service in &hosts {
            let address = context.address_name(service);
            if every_port {
                parents.push(wp::ParentRef {
                    service: address,
                    port: 0,
                });
                continue;
            }
            for p in &all_ports {
                if service.spec.ports.iter().any(|sp| u32::from(sp.port) == *p) {
                    parents.push(wp::ParentRef {
                        service: address.clone(),
                        port: *p,
                    });
                }
            }
        }
        let mut rules = Vec::new();
        for (i, rule) in vs.spec.http.iter().enumerate() {
            if let Some(r) = http_rule_of(
                &format!("spec.http[{i}]"),
                &meta.namespace,
                rule,
                context,
                subsets,
            )? {
                rules.push(r);
            }
        }
        for (i, rule) in vs.spec.tcp.iter().enumerate() {
            if !rule.matches.is_empty() && !rule.matches.iter().any(|m| for_mesh(&m.gateways)) {
                continue;
            }
            rules.push(wp::Rule {
                backends: backends(
                    &format!("spec.tcp[{i}].route"),
                    &meta.namespace,
                    &rule.route,
                    context,
                    subsets,
                )?,
                ..Default::default()
            });
        }
        Ok((
            wp::Route {
                namespace: meta.namespace.clone(),
                name: meta.name.clone(),
                kind: wp::RouteKind::VirtualService as i32,
                parents,
                rules,
                creation_timestamp: created(meta),
                hostnames: Vec::new(),
            },
            served_by,
        ))
    })();
    match result {
        Ok(out) => Some(out),
        Err((kind, field, reason)) => {
            warn(
                warnings,
                kind,
                &named,
                &field,
                &format!("{reason}; the VirtualService is not served"),
            );
            None
        }
    }
}

fn check_port(field: &str, port: Option<u32>, hosts: &[&Service]) -> Result<(), Refused> {
    let Some(port) = port else { return Ok(()) };
    if hosts
        .iter()
        .any(|s| s.spec.ports.iter().any(|sp| u32::from(sp.port) == port))
    {
        return Ok(());
    }
    let names: Vec<String> = hosts
        .iter()
        .map(|s| format!("{}/{}", s.metadata.namespace, s.metadata.name))
        .collect();
    Err((
        WarningKind::RouteNotServed,
        field.to_string(),
        format!("no host Service ({}) has port {port}", names.join(", ")),
    ))
}
