//! Validation of the Gateway API, DestinationRule, EndpointSlice and Node objects. Each check
//! returns the field at fault (dotted path with indexes) and what is wrong with it.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::destination_rule::{
    ClientTlsSettings, ConnectionPoolSettings, DestinationRule, LoadBalancerSettings,
    OutlierDetection, TrafficPolicy, parse_istio_duration,
};
use crate::gateway_api::{
    BackendRef, FilterType, Gateway, GatewayClass, GrpcRoute, HttpBackendRef, HttpHeaderMatch,
    HttpRoute, HttpRouteFilter, MatchType, ParentReference, PathModifier, PathModifierType,
    RouteNamespaces, WAYPOINT_FOR, parse_gateway_duration, route_regex,
};
use crate::objects::{EndpointSlice, Node, ObjectMeta};
use crate::parse::{is_dns_label, is_dns_subdomain};

/// A field and the reason it is refused.
pub(crate) type Invalid = (String, String);

fn fail<T>(field: impl Into<String>, reason: impl Into<String>) -> Result<T, Invalid> {
    Err((field.into(), reason.into()))
}

pub(crate) fn require_namespace(meta: &ObjectMeta) -> Result<(), Invalid> {
    if meta.namespace.is_empty() {
        return fail("metadata.namespace", "required");
    }
    if !is_dns_label(&meta.namespace) {
        return fail(
            "metadata.namespace",
            format!("{:?} is not a valid namespace name", meta.namespace),
        );
    }
    Ok(())
}

/// `allowedRoutes.namespaces`: `from` one of the Gateway API's values, and with `Selector` a valid
/// label selector.
fn route_namespaces(at: &str, namespaces: &RouteNamespaces) -> Result<(), Invalid> {
    match namespaces.from.as_str() {
        "" | "Same" | "All" => Ok(()),
        "Selector" => {
            let Some(selector) = &namespaces.selector else {
                return fail(format!("{at}.selector"), "required when from is Selector");
            };
            for (i, r) in selector.match_expressions.iter().enumerate() {
                let at = format!("{at}.selector.matchExpressions[{i}]");
                if r.key.is_empty() {
                    return fail(format!("{at}.key"), "required");
                }
                match (r.operator.as_str(), r.values.is_empty()) {
                    ("In" | "NotIn", false) | ("Exists" | "DoesNotExist", true) => {}
                    ("In" | "NotIn", true) => {
                        return fail(
                            format!("{at}.values"),
                            format!("required with operator {}", r.operator),
                        );
                    }
                    ("Exists" | "DoesNotExist", false) => {
                        return fail(
                            format!("{at}.values"),
                            format!("must be empty with operator {}", r.operator),
                        );
                    }
                    (other, _) => {
                        return fail(
                            format!("{at}.operator"),
                            format!("{other:?} is not In, NotIn, Exists or DoesNotExist"),
                        );
                    }
                }
            }
            Ok(())
        }
        other => fail(
            format!("{at}.from"),
            format!("{other:?} is not Same, All or Selector"),
        ),
    }
}

fn port(field: impl Into<String>, port: u32) -> Result<(), Invalid> {
    if (1..=65535).contains(&port) {
        Ok(())
    } else {
        fail(field, format!("{port} is not a port number (1-65535)"))
    }
}

/// A Gateway API hostname: a DNS subdomain, optionally with a leading `*.`; never an IP.
fn hostname(field: impl Into<String>, value: &str) -> Result<(), Invalid> {
    let name = value.strip_prefix("*.").unwrap_or(value);
    if value.parse::<IpAddr>().is_ok() || name.is_empty() || !is_dns_subdomain(name) {
        return fail(field, format!("{value:?} is not a valid hostname"));
    }
    Ok(())
}

fn waypoint_for(meta: &ObjectMeta) -> Result<(), Invalid> {
    if let Some(value) = meta.labels.get(WAYPOINT_FOR)
        && !matches!(value.as_str(), "service" | "workload" | "all" | "none")
    {
        return fail(
            format!("metadata.labels[{WAYPOINT_FOR}]"),
            format!("{value:?} is not service, workload, all or none"),
        );
    }
    Ok(())
}

pub(crate) fn gateway(gateway: &Gateway) -> Result<(), Invalid> {
    require_namespace(&gateway.metadata)?;
    waypoint_for(&gateway.metadata)?;
    if gateway.spec.gateway_class_name.is_empty() {
        return fail("spec.gatewayClassName", "required");
    }
    let mut names = BTreeSet::new();
    for (i, listener) in gateway.spec.listeners.iter().enumerate() {
        let at = format!("spec.listeners[{i}]");
        if listener.name.is_empty() {
            return fail(format!("{at}.name"), "required");
        }
        if !names.insert(listener.name.as_str()) {
            return fail(
                format!("{at}.name"),
                format!("{:?} is used by another listener", listener.name),
            );
        }
        port(format!("{at}.port"), listener.port)?;
        if listener.protocol.is_empty() {
            return fail(format!("{at}.protocol"), "required");
        }
        if let Some(host) = &listener.hostname {
            hostname(format!("{at}.hostname"), host)?;
        }
        if let Some(namespaces) = listener
            .allowed_routes
            .as_ref()
            .and_then(|a| a.namespaces.as_ref())
        {
            route_namespaces(&format!("{at}.allowedRoutes.namespaces"), namespaces)?;
        }
    }
    for (i, address) in gateway.status.addresses.iter().enumerate() {
        let at = format!("status.addresses[{i}]");
        match address.kind.as_deref() {
            None | Some("IPAddress") => {
                if address.value.parse::<IpAddr>().is_err() {
                    return fail(
                        format!("{at}.value"),
                        format!("{:?} is not an IP address", address.value),
                    );
                }
            }
            Some("Hostname") => hostname(format!("{at}.value"), &address.value)?,
            Some(other) => {
                return fail(
                    format!("{at}.type"),
                    format!("{other:?} is not Hostname or IPAddress"),
                );
            }
        }
    }
    Ok(())
}

pub(crate) fn gateway_class(class: &GatewayClass) -> Result<(), Invalid> {
    waypoint_for(&class.metadata)?;
    if class.spec.controller_name.is_empty() {
        return fail("spec.controllerName", "required");
    }
    Ok(())
}

fn gateway_duration(
    field: &str,
    value: &Option<String>,
) -> Result<Option<std::time::Duration>, Invalid> {
    match value {
        None => Ok(None),
        Some(text) => match parse_gateway_duration(text) {
            Some(d) => Ok(Some(d)),
            None => fail(
                field,
                format!("{text:?} is not a duration (such as 10s, 1m30s or 500ms)"),
            ),
        },
    }
}

fn backend(at: &str, backend: &BackendRef) -> Result<(), Invalid> {
    if backend.name.is_empty() {
        return fail(format!("{at}.name"), "required");
    }
    if let Some(ns) = &backend.namespace
        && !is_dns_label(ns)
    {
        return fail(
            format!("{at}.namespace"),
            format!("{ns:?} is not a valid namespace name"),
        );
    }
    match backend.port {
        None if backend.is_service() => {
            fail(format!("{at}.port"), "required for a Service backend")
        }
        None => Ok(()),
        Some(p) => port(format!("{at}.port"), p),
    }
}

fn path_modifier(at: &str, modifier: &PathModifier) -> Result<(), Invalid> {
    match modifier.kind {
        PathModifierType::ReplaceFullPath if modifier.replace_full_path.is_none() => fail(
            format!("{at}.replaceFullPath"),
            "required for type ReplaceFullPath",
        ),
        PathModifierType::ReplacePrefixMatch if modifier.replace_prefix_match.is_none() => fail(
            format!("{at}.replacePrefixMatch"),
            "required for type ReplacePrefixMatch",
        ),
        PathModifierType::Unknown => fail(
            format!("{at}.type"),
            "must be ReplaceFullPath or ReplacePrefixMatch",
        ),
        _ => Ok(()),
    }
}

fn filter(at: &str, filter: &HttpRouteFilter) -> Result<(), Invalid> {
    let present = match filter.kind {
        FilterType::RequestHeaderModifier => filter.request_header_modifier.is_some().then_some(()),
        FilterType::ResponseHeaderModifier => {
            filter.response_header_modifier.is_some().then_some(())
        }
        FilterType::RequestRedirect => filter.request_redirect.is_some().then_some(()),
        FilterType::UrlRewrite => filter.url_rewrite.is_some().then_some(()),
        FilterType::RequestMirror => filter.request_mirror.is_some().then_some(()),
        FilterType::ExtensionRef => filter.extension_ref.is_some().then_some(()),
        FilterType::Unknown => {
            return fail(
                format!("{at}.type"),
                "must be RequestHeaderModifier, ResponseHeaderModifier, RequestRedirect, URLRewrite, RequestMirror or ExtensionRef",
            );
        }
    };
    if present.is_none() {
        let (field, kind) = match filter.kind {
            FilterType::RequestHeaderModifier => ("requestHeaderModifier", "RequestHeaderModifier"),
            FilterType::ResponseHeaderModifier => {
                ("responseHeaderModifier", "ResponseHeaderModifier")
            }
            FilterType::RequestRedirect => ("requestRedirect", "RequestRedirect"),
            FilterType::UrlRewrite => ("urlRewrite", "URLRewrite"),
            FilterType::RequestMirror => ("requestMirror", "RequestMirror"),
            _ => ("extensionRef", "ExtensionRef"),
        };
        return fail(format!("{at}.{field}"), format!("required for type {kind}"));
    }
    for (field, modifier) in [
        ("requestHeaderModifier", &filter.request_header_modifier),
        ("responseHeaderModifier", &filter.response_header_modifier),
    ] {
        let Some(modifier) = modifier else { continue };
        for (list, headers) in [("set", &modifier.set), ("add", &modifier.add)] {
            if let Some(h) = headers.iter().position(|h| h.name.is_empty()) {
                return fail(format!("{at}.{field}.{list}[{h}].name"), "required");
            }
        }
    }
    if let Some(redirect) = &filter.request_redirect {
        let at = format!("{at}.requestRedirect");
        if let Some(scheme) = &redirect.scheme
            && !matches!(scheme.as_str(), "http" | "https")
        {
            return fail(
                format!("{at}.scheme"),
                format!("{scheme:?} is not http or https"),
            );
        }
        if let Some(host) = &redirect.hostname {
            hostname(format!("{at}.hostname"), host)?;
        }
        if let Some(p) = redirect.port {
            port(format!("{at}.port"), p)?;
        }
        if let Some(code) = redirect.status_code
            && !matches!(code, 301 | 302 | 303 | 307 | 308)
        {
            return fail(
                format!("{at}.statusCode"),
                format!("{code} is not 301, 302, 303, 307 or 308"),
            );
        }
        if let Some(path) = &redirect.path {
            path_modifier(&format!("{at}.path"), path)?;
        }
    }
    if let Some(rewrite) = &filter.url_rewrite {
        let at = format!("{at}.urlRewrite");
        if let Some(host) = &rewrite.hostname {
            hostname(format!("{at}.hostname"), host)?;
        }
        if let Some(path) = &rewrite.path {
            path_modifier(&format!("{at}.path"), path)?;
        }
    }
    if let Some(mirror) = &filter.request_mirror {
        let at = format!("{at}.requestMirror");
        backend(&format!("{at}.backendRef"), &mirror.backend_ref)?;
        if let Some(percent) = mirror.percent
            && percent > 100
        {
            return fail(format!("{at}.percent"), format!("{percent} is not 0-100"));
        }
        if let Some(fraction) = &mirror.fraction {
            let denominator = fraction.denominator.unwrap_or(100);
            if denominator == 0 || fraction.numerator > denominator {
                return fail(
                    format!("{at}.fraction"),
                    format!(
                        "{}/{denominator} is not a fraction between 0 and 1",
                        fraction.numerator
                    ),
                );
            }
        }
    }
    Ok(())
}

const METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

/// A `RegularExpression` match's pattern must compile as the waypoint compiles it.
fn regex(field: String, pattern: &str) -> Result<(), Invalid> {
    match route_regex(pattern) {
        Ok(_) => Ok(()),
        Err(e) => fail(
            field,
            format!("{pattern:?} is not a regular expression (RE2 syntax): {e}"),
        ),
    }
}

/// What HTTPRoute and GRPCRoute share: namespace, creation time, parents and hostnames.
fn route_common(
    meta: &ObjectMeta,
    parent_refs: &[ParentReference],
    hostnames: &[String],
) -> Result<(), Invalid> {
    require_namespace(meta)?;
    if let Some(created) = &meta.creation_timestamp
        && humantime::parse_rfc3339_weak(created).is_err()
    {
        return fail(
            "metadata.creationTimestamp",
            format!("{created:?} is not an RFC 3339 time"),
        );
    }
    for (i, parent) in parent_refs.iter().enumerate() {
        let at = format!("spec.parentRefs[{i}]");
        if parent.name.is_empty() {
            return fail(format!("{at}.name"), "required");
        }
        if let Some(ns) = &parent.namespace
            && !is_dns_label(ns)
        {
            return fail(
                format!("{at}.namespace"),
                format!("{ns:?} is not a valid namespace name"),
            );
        }
        if let Some(p) = parent.port {
            port(format!("{at}.port"), p)?;
        }
    }
    for (i, host) in hostnames.iter().enumerate() {
        hostname(format!("spec.hostnames[{i}]"), host)?;
    }
    Ok(())
}

/// A header or query parameter match list: type, name, and a regex that compiles.
fn header_matches(at: &str, list: &str, entries: &[HttpHeaderMatch]) -> Result<(), Invalid> {
    for (h, entry) in entries.iter().enumerate() {
        match entry.kind {
            MatchType::Exact => {}
            MatchType::RegularExpression => {
                regex(format!("{at}.{list}[{h}].value"), &entry.value)?;
            }
            _ => {
                return fail(
                    format!("{at}.{list}[{h}].type"),
                    "must be Exact or RegularExpression",
                );
            }
        }
        if entry.name.is_empty() {
            return fail(format!("{at}.{list}[{h}].name"), "required");
        }
    }
    Ok(())
}

/// Backends of a rule: reference, weight, per-backend filters (checked by `filter`).
fn backend_refs(
    at: &str,
    refs: &[HttpBackendRef],
    filter: impl Fn(&str, &HttpRouteFilter) -> Result<(), Invalid>,
) -> Result<(), Invalid> {
    for (b, backend_ref) in refs.iter().enumerate() {
        let at = format!("{at}.backendRefs[{b}]");
        backend(&at, &backend_ref.backend)?;
        if let Some(weight) = backend_ref.weight
            && weight > 1_000_000
        {
            return fail(format!("{at}.weight"), format!("{weight} is not 0-1000000"));
        }
        for (f, entry) in backend_ref.filters.iter().enumerate() {
            filter(&format!("{at}.filters[{f}]"), entry)?;
        }
    }
    Ok(())
}

pub(crate) fn http_route(route: &HttpRoute) -> Result<(), Invalid> {
    route_common(
        &route.metadata,
        &route.spec.parent_refs,
        &route.spec.hostnames,
    )?;
    for (r, rule) in route.spec.rules.iter().enumerate() {
        let at = format!("spec.rules[{r}]");
        for (m, matched) in rule.matches.iter().enumerate() {
            let at = format!("{at}.matches[{m}]");
            if let Some(path) = &matched.path {
                match path.kind {
                    MatchType::Unknown => {
                        return fail(
                            format!("{at}.path.type"),
                            "must be Exact, PathPrefix or RegularExpression",
                        );
                    }
                    MatchType::Exact | MatchType::PathPrefix if !path.value.starts_with('/') => {
                        return fail(
                            format!("{at}.path.value"),
                            format!("{:?} does not start with '/'", path.value),
                        );
                    }
                    MatchType::RegularExpression => {
                        regex(format!("{at}.path.value"), &path.value)?;
                    }
                    _ => {}
                }
            }
            header_matches(&at, "headers", &matched.headers)?;
            header_matches(&at, "queryParams", &matched.query_params)?;
            if let Some(method) = &matched.method
                && !METHODS.contains(&method.as_str())
            {
                return fail(
                    format!("{at}.method"),
                    format!("{method:?} is not an HTTP method ({})", METHODS.join(", ")),
                );
            }
        }
        for (f, entry) in rule.filters.iter().enumerate() {
            filter(&format!("{at}.filters[{f}]"), entry)?;
        }
        backend_refs(&at, &rule.backend_refs, filter)?;
        if let Some(timeouts) = &rule.timeouts {
            let request = gateway_duration(&format!("{at}.timeouts.request"), &timeouts.request)?;
            let backend_request = gateway_duration(
                &format!("{at}.timeouts.backendRequest"),
                &timeouts.backend_request,
            )?;
            if let (Some(request), Some(backend_request)) = (request, backend_request)
                && !request.is_zero()
                && (backend_request.is_zero() || backend_request > request)
            {
                return fail(
                    format!("{at}.timeouts.backendRequest"),
                    format!(
                        "{:?} is longer than timeouts.request ({:?})",
                        timeouts.backend_request.as_deref().unwrap_or_default(),
                        timeouts.request.as_deref().unwrap_or_default()
                    ),
                );
            }
        }
        if let Some(retry) = &rule.retry {
            if let Some(code) = retry.codes.iter().find(|c| !(400..=599).contains(*c)) {
                return fail(
                    format!("{at}.retry.codes"),
                    format!("{code} is not an HTTP error status (400-599)"),
                );
            }
            gateway_duration(&format!("{at}.retry.backoff"), &retry.backoff)?;
        }
    }
    Ok(())
}

/// The filter types a GRPCRoute may use.
fn grpc_filter(at: &str, entry: &HttpRouteFilter) -> Result<(), Invalid> {
    if matches!(
        entry.kind,
        FilterType::RequestRedirect | FilterType::UrlRewrite | FilterType::Unknown
    ) {
        return fail(
            format!("{at}.type"),
            "must be RequestHeaderModifier, ResponseHeaderModifier, RequestMirror or ExtensionRef",
        );
    }
    filter(at, entry)
}

/// A gRPC service name as GRPCRoute's Exact match allows it (`pkg.sub.Service`).
fn is_grpc_service(name: &str) -> bool {
    let name = name.strip_prefix('.').unwrap_or(name);
    !name.is_empty() && name.split('.').all(is_grpc_identifier)
}

fn is_grpc_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

pub(crate) fn grpc_route(route: &GrpcRoute) -> Result<(), Invalid> {
    route_common(
        &route.metadata,
        &route.spec.parent_refs,
        &route.spec.hostnames,
    )?;
    for (r, rule) in route.spec.rules.iter().enumerate() {
        let at = format!("spec.rules[{r}]");
        for (m, matched) in rule.matches.iter().enumerate() {
            let at = format!("{at}.matches[{m}]");
            if let Some(method) = &matched.method {
                let at = format!("{at}.method");
                let service = method.service.as_deref().unwrap_or("");
                let name = method.method.as_deref().unwrap_or("");
                if service.is_empty() && name.is_empty() {
                    return fail(
                        format!("{at}.service"),
                        "service or method is required (a match of any method leaves method out)",
                    );
                }
                match method.kind {
                    MatchType::Exact => {
                        if !service.is_empty() && !is_grpc_service(service) {
                            return fail(
                                format!("{at}.service"),
                                format!(
                                    "{service:?} is not a gRPC service name (such as pkg.Service)"
                                ),
                            );
                        }
                        if !name.is_empty() && !is_grpc_identifier(name) {
                            return fail(
                                format!("{at}.method"),
                                format!("{name:?} is not a gRPC method name"),
                            );
                        }
                    }
                    MatchType::RegularExpression => {
                        if !service.is_empty() {
                            regex(format!("{at}.service"), service)?;
                        }
                        if !name.is_empty() {
                            regex(format!("{at}.method"), name)?;
                        }
                    }
                    _ => {
                        return fail(format!("{at}.type"), "must be Exact or RegularExpression");
                    }
                }
            }
            header_matches(&at, "headers", &matched.headers)?;
        }
        for (f, entry) in rule.filters.iter().enumerate() {
            grpc_filter(&format!("{at}.filters[{f}]"), entry)?;
        }
        backend_refs(&at, &rule.backend_refs, grpc_filter)?;
    }
    Ok(())
}

fn istio_duration(field: String, value: &Option<String>) -> Result<(), Invalid> {
    match value {
        Some(text) if parse_istio_duration(text).is_none() => fail(
            field,
            format!("{text:?} is not a duration (such as 30ms, 1.5s or 1h30m)"),
        ),
        _ => Ok(()),
    }
}

fn load_balancer(at: &str, lb: &LoadBalancerSettings) -> Result<(), Invalid> {
    if let Some(simple) = &lb.simple
        && !matches!(
            simple.as_str(),
            "UNSPECIFIED"
                | "RANDOM"
                | "PASSTHROUGH"
                | "ROUND_ROBIN"
                | "LEAST_REQUEST"
                | "LEAST_CONN"
        )
    {
        return fail(
            format!("{at}.simple"),
            format!(
                "{simple:?} is not UNSPECIFIED, RANDOM, PASSTHROUGH, ROUND_ROBIN, LEAST_REQUEST or LEAST_CONN"
            ),
        );
    }
    if let Some(hash) = &lb.consistent_hash {
        let keys = usize::from(hash.http_header_name.is_some())
            + usize::from(hash.http_cookie.is_some())
            + usize::from(hash.use_source_ip == Some(true))
            + usize::from(hash.http_query_parameter_name.is_some());
        if keys > 1 {
            return fail(
                format!("{at}.consistentHash"),
                "only one of httpHeaderName, httpCookie, useSourceIp, httpQueryParameterName",
            );
        }
        if lb.simple.is_some() {
            return fail(
                format!("{at}.consistentHash"),
                "cannot be combined with simple",
            );
        }
        if let Some(cookie) = &hash.http_cookie {
            if cookie.name.is_empty() {
                return fail(format!("{at}.consistentHash.httpCookie.name"), "required");
            }
            istio_duration(format!("{at}.consistentHash.httpCookie.ttl"), &cookie.ttl)?;
        }
    }
    if let Some(locality) = &lb.locality_lb_setting {
        let at = format!("{at}.localityLbSetting");
        if !locality.distribute.is_empty() && !locality.failover.is_empty() {
            return fail(
                format!("{at}.failover"),
                "cannot be combined with distribute",
            );
        }
        for (i, entry) in locality.distribute.iter().enumerate() {
            if entry.from.is_empty() {
                return fail(format!("{at}.distribute[{i}].from"), "required");
            }
            let total: u64 = entry.to.values().map(|w| u64::from(*w)).sum();
            if total != 100 {
                return fail(
                    format!("{at}.distribute[{i}].to"),
                    format!("the percentages add up to {total}, not 100"),
                );
            }
        }
        for (i, entry) in locality.failover.iter().enumerate() {
            if entry.from.is_empty() {
                return fail(format!("{at}.failover[{i}].from"), "required");
            }
            if entry.to.is_empty() {
                return fail(format!("{at}.failover[{i}].to"), "required");
            }
            if entry.from == entry.to {
                return fail(
                    format!("{at}.failover[{i}].to"),
                    format!("{:?} is the region it fails over from", entry.to),
                );
            }
        }
    }
    istio_duration(format!("{at}.warmupDurationSecs"), &lb.warmup_duration_secs)
}

fn connection_pool(at: &str, pool: &ConnectionPoolSettings) -> Result<(), Invalid> {
    if let Some(tcp) = &pool.tcp {
        let at = format!("{at}.tcp");
        istio_duration(format!("{at}.connectTimeout"), &tcp.connect_timeout)?;
        istio_duration(
            format!("{at}.maxConnectionDuration"),
            &tcp.max_connection_duration,
        )?;
        istio_duration(format!("{at}.idleTimeout"), &tcp.idle_timeout)?;
        if let Some(keepalive) = &tcp.tcp_keepalive {
            istio_duration(format!("{at}.tcpKeepalive.time"), &keepalive.time)?;
            istio_duration(format!("{at}.tcpKeepalive.interval"), &keepalive.interval)?;
        }
        if let Some(n) = tcp.max_connections.filter(|n| *n < 0) {
            return fail(format!("{at}.maxConnections"), format!("{n} is negative"));
        }
    }
    if let Some(http) = &pool.http {
        let at = format!("{at}.http");
        istio_duration(format!("{at}.idleTimeout"), &http.idle_timeout)?;
        if let Some(policy) = &http.h2_upgrade_policy
            && !matches!(policy.as_str(), "DEFAULT" | "DO_NOT_UPGRADE" | "UPGRADE")
        {
            return fail(
                format!("{at}.h2UpgradePolicy"),
                format!("{policy:?} is not DEFAULT, DO_NOT_UPGRADE or UPGRADE"),
            );
        }
        for (field, value) in [
            ("http1MaxPendingRequests", http.http1_max_pending_requests),
            ("http2MaxRequests", http.http2_max_requests),
            ("maxRequestsPerConnection", http.max_requests_per_connection),
            ("maxRetries", http.max_retries),
            ("maxConcurrentStreams", http.max_concurrent_streams),
        ] {
            if let Some(n) = value.filter(|n| *n < 0) {
                return fail(format!("{at}.{field}"), format!("{n} is negative"));
            }
        }
    }
    Ok(())
}

fn outlier_detection(at: &str, od: &OutlierDetection) -> Result<(), Invalid> {
    istio_duration(format!("{at}.interval"), &od.interval)?;
    istio_duration(format!("{at}.baseEjectionTime"), &od.base_ejection_time)?;
    for (field, value) in [
        ("maxEjectionPercent", od.max_ejection_percent),
        ("minHealthPercent", od.min_health_percent),
    ] {
        if let Some(p) = value.filter(|p| !(0..=100).contains(p)) {
            return fail(format!("{at}.{field}"), format!("{p} is not 0-100"));
        }
    }
    Ok(())
}

fn tls(at: &str, tls: &ClientTlsSettings) -> Result<(), Invalid> {
    if !matches!(
        tls.mode.as_str(),
        "" | "DISABLE" | "SIMPLE" | "MUTUAL" | "ISTIO_MUTUAL"
    ) {
        return fail(
            format!("{at}.mode"),
            format!(
                "{:?} is not DISABLE, SIMPLE, MUTUAL or ISTIO_MUTUAL",
                tls.mode
            ),
        );
    }
    Ok(())
}

fn traffic_policy(at: &str, policy: &TrafficPolicy) -> Result<(), Invalid> {
    if let Some(lb) = &policy.load_balancer {
        load_balancer(&format!("{at}.loadBalancer"), lb)?;
    }
    if let Some(pool) = &policy.connection_pool {
        connection_pool(&format!("{at}.connectionPool"), pool)?;
    }
    if let Some(od) = &policy.outlier_detection {
        outlier_detection(&format!("{at}.outlierDetection"), od)?;
    }
    if let Some(t) = &policy.tls {
        tls(&format!("{at}.tls"), t)?;
    }
    let mut ports = BTreeSet::new();
    for (i, settings) in policy.port_level_settings.iter().enumerate() {
        let at = format!("{at}.portLevelSettings[{i}]");
        let Some(selector) = &settings.port else {
            return fail(format!("{at}.port"), "required");
        };
        port(format!("{at}.port.number"), selector.number)?;
        if !ports.insert(selector.number) {
            return fail(
                format!("{at}.port.number"),
                format!("{} is set more than once", selector.number),
            );
        }
        if let Some(lb) = &settings.load_balancer {
            load_balancer(&format!("{at}.loadBalancer"), lb)?;
        }
        if let Some(pool) = &settings.connection_pool {
            connection_pool(&format!("{at}.connectionPool"), pool)?;
        }
        if let Some(od) = &settings.outlier_detection {
            outlier_detection(&format!("{at}.outlierDetection"), od)?;
        }
        if let Some(t) = &settings.tls {
            tls(&format!("{at}.tls"), t)?;
        }
    }
    Ok(())
}

pub(crate) fn destination_rule(rule: &DestinationRule) -> Result<(), Invalid> {
    require_namespace(&rule.metadata)?;
    let host = &rule.spec.host;
    if host.is_empty() {
        return fail("spec.host", "required");
    }
    let name = host.strip_prefix("*.").unwrap_or(host);
    if host != "*" && !is_dns_subdomain(name) {
        return fail("spec.host", format!("{host:?} is not a valid host name"));
    }
    if let Some(policy) = &rule.spec.traffic_policy {
        traffic_policy("spec.trafficPolicy", policy)?;
    }
    let mut names = BTreeSet::new();
    for (i, subset) in rule.spec.subsets.iter().enumerate() {
        let at = format!("spec.subsets[{i}]");
        if subset.name.is_empty() {
            return fail(format!("{at}.name"), "required");
        }
        if !names.insert(subset.name.as_str()) {
            return fail(
                format!("{at}.name"),
                format!("{:?} is used by another subset", subset.name),
            );
        }
        if let Some(policy) = &subset.traffic_policy {
            traffic_policy(&format!("{at}.trafficPolicy"), policy)?;
        }
    }
    for (i, entry) in rule.spec.export_to.iter().enumerate() {
        if !(entry == "." || entry == "*" || is_dns_label(entry)) {
            return fail(
                format!("spec.exportTo[{i}]"),
                format!("{entry:?} is not '.', '*' or a namespace name"),
            );
        }
    }
    Ok(())
}

pub(crate) fn endpoint_slice(slice: &EndpointSlice) -> Result<(), Invalid> {
    require_namespace(&slice.metadata)?;
    let kind = slice.address_type.as_str();
    if kind.is_empty() {
        return fail("addressType", "required");
    }
    if !matches!(kind, "IPv4" | "IPv6" | "FQDN") {
        return fail("addressType", format!("{kind:?} is not IPv4, IPv6 or FQDN"));
    }
    for (e, endpoint) in slice.endpoints.iter().enumerate() {
        if endpoint.addresses.is_empty() {
            return fail(
                format!("endpoints[{e}].addresses"),
                "at least one address is required",
            );
        }
        for (a, address) in endpoint.addresses.iter().enumerate() {
            let ok = match kind {
                "IPv4" => address.parse::<Ipv4Addr>().is_ok(),
                "IPv6" => address.parse::<Ipv6Addr>().is_ok(),
                _ => is_dns_subdomain(address),
            };
            if !ok {
                return fail(
                    format!("endpoints[{e}].addresses[{a}]"),
                    format!("{address:?} is not an {kind} address"),
                );
            }
        }
    }
    for (p, entry) in slice.ports.iter().enumerate() {
        if let Some(number) = entry.port {
            port(format!("ports[{p}].port"), number)?;
        }
    }
    Ok(())
}

pub(crate) fn node(node: &Node) -> Result<(), Invalid> {
    for (i, address) in node.status.addresses.iter().enumerate() {
        if matches!(address.kind.as_str(), "InternalIP" | "ExternalIP")
            && address.address.parse::<IpAddr>().is_err()
        {
            return fail(
                format!("status.addresses[{i}].address"),
                format!("{:?} is not an IP address", address.address),
            );
        }
    }
    Ok(())
}
