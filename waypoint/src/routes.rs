//! The route table: every HTTPRoute and GRPCRoute the control plane sent, compiled once into a
//! per-Service list of matches in Gateway API precedence order, so that choosing a rule for a
//! request is one ordered scan that stops at the first match.
//!
//! Precedence (Gateway API, across all routes attached to the same Service):
//! 1. an Exact path match, then a PathPrefix match with more characters, then (our choice for
//!    the implementation-specific case) RegularExpression paths;
//! 2. a method match;
//! 3. more header matches;
//! 4. more query-parameter matches;
//! 5. the older route (`creationTimestamp`), then `namespace/name` alphabetically;
//! 6. within a route, the first rule, then the first match.
//!
//! GRPCRoute matches rank by the characters of the service, then of the method, then header
//! count, with the same tie-breaks. VirtualService rules are not ranked: they are tried in the
//! order written (first match wins, as Istio documents), oldest VirtualService first, before any
//! GRPCRoute or HTTPRoute of the same Service. A gRPC request (`content-type: application/grpc*`) is matched
//! against the Service's GRPCRoutes first, then its HTTPRoutes; other requests only against
//! HTTPRoutes. Route `hostnames` are not used: with a Service parent the Service is already
//! chosen by the address the client dialed (as the GAMMA spec asks).

use std::cmp::Ordering;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use ambit_proto::waypoint as pb;
use http::HeaderMap;
use regex::Regex;

/// A request as the route table sees it.
#[derive(Debug, Clone, Copy)]
pub struct RequestView<'a> {
    /// The method (`GET`, ...).
    pub method: &'a str,
    /// The path without the query.
    pub path: &'a str,
    /// The query string without `?`, if any.
    pub query: Option<&'a str>,
    /// The request headers.
    pub headers: &'a HeaderMap,
    /// True for gRPC (`content-type: application/grpc*`).
    pub grpc: bool,
}

/// How a compiled path is matched.
#[derive(Debug, Clone)]
pub enum PathMatcher {
    /// The whole path equals the value.
    Exact(String),
    /// Segment-aware prefix, stored without a trailing `/` (empty means every path).
    Prefix(String),
    /// The whole path matches the expression.
    Regex(Regex),
    /// A plain string prefix (VirtualService `uri.prefix`: `/api` matches `/apis`).
    StringPrefix(String),
}

impl PathMatcher {
    fn matches(&self, path: &str) -> bool {
        match self {
            PathMatcher::Exact(value) => path == value,
            PathMatcher::Prefix(prefix) => {
                prefix.is_empty()
                    || (path.starts_with(prefix.as_str())
                        && matches!(path.as_bytes().get(prefix.len()), None | Some(b'/')))
            }
            PathMatcher::Regex(re) => re.is_match(path),
            PathMatcher::StringPrefix(prefix) => path.starts_with(prefix.as_str()),
        }
    }

    /// Precedence of the path part: (kind, characters), higher first.
    fn rank(&self) -> (u8, usize) {
        match self {
            PathMatcher::Exact(v) => (3, v.len()),
            PathMatcher::Prefix(v) => (2, v.len()),
            PathMatcher::StringPrefix(v) => (2, v.len()),
            PathMatcher::Regex(_) => (1, 0),
        }
    }
}

/// An exact or regular-expression value match.
#[derive(Debug, Clone)]
enum ValueMatcher {
    Exact(String),
    Prefix(String),
    Regex(Regex),
}

impl ValueMatcher {
    fn matches(&self, value: &str) -> bool {
        match self {
            ValueMatcher::Exact(v) => v == value,
            ValueMatcher::Prefix(v) => value.starts_with(v.as_str()),
            ValueMatcher::Regex(re) => re.is_match(value),
        }
    }
}

#[derive(Debug, Clone)]
struct NamedMatcher {
    name: String,
    value: ValueMatcher,
}

#[derive(Debug, Clone)]
enum GrpcMatcher {
    Any,
    Exact {
        service: String,
        method: String,
    },
    Regex {
        service: Option<Regex>,
        method: Option<Regex>,
        service_len: usize,
        method_len: usize,
    },
}

/// One compiled `matches[]` entry.
#[derive(Debug, Clone)]
struct CompiledMatch {
    path: PathMatcher,
    method: Option<String>,
    headers: Vec<NamedMatcher>,
    without_headers: Vec<NamedMatcher>,
    query: Vec<NamedMatcher>,
    grpc: Option<GrpcMatcher>,
}

impl CompiledMatch {
    fn matches(&self, request: &RequestView<'_>) -> bool {
        if let Some(grpc) = &self.grpc {
            if !request.grpc || !grpc_matches(grpc, request.path) {
                return false;
            }
        } else if !self.path.matches(request.path) {
            return false;
        }
        if let Some(method) = &self.method
            && method != request.method
        {
            return false;
        }
        let header_matches = |h: &NamedMatcher| {
            request
                .headers
                .get_all(h.name.as_str())
                .iter()
                .any(|v| v.to_str().is_ok_and(|v| h.value.matches(v)))
        };
        self.headers.iter().all(header_matches)
            && !self.without_headers.iter().any(header_matches)
            && self
                .query
                .iter()
                .all(|q| query_value(request.query, &q.name).is_some_and(|v| q.value.matches(&v)))
    }

    fn http_rank(&self) -> (u8, usize, bool, usize, usize) {
        let (kind, chars) = self.path.rank();
        (
            kind,
            chars,
            self.method.is_some(),
            self.headers.len(),
            self.query.len(),
        )
    }

    fn grpc_rank(&self) -> (usize, usize, usize) {
        let (service, method) = match &self.grpc {
            Some(GrpcMatcher::Exact { service, method }) => (service.len(), method.len()),
            Some(GrpcMatcher::Regex {
                service_len,
                method_len,
                ..
            }) => (*service_len, *method_len),
            Some(GrpcMatcher::Any) | None => (0, 0),
        };
        (service, method, self.headers.len())
    }
}

fn grpc_matches(matcher: &GrpcMatcher, path: &str) -> bool {
    let Some((service, method)) = path.strip_prefix('/').and_then(|p| p.split_once('/')) else {
        return false;
    };
    match matcher {
        GrpcMatcher::Any => true,
        GrpcMatcher::Exact {
            service: s,
            method: m,
        } => (s.is_empty() || s == service) && (m.is_empty() || m == method),
        GrpcMatcher::Regex {
            service: s,
            method: m,
            ..
        } => {
            s.as_ref().is_none_or(|re| re.is_match(service))
                && m.as_ref().is_none_or(|re| re.is_match(method))
        }
    }
}

/// The first value of query parameter `name` (percent-decoding `+` and `%XX`).
fn query_value(query: Option<&str>, name: &str) -> Option<String> {
    query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(k) == name).then(|| percent_decode(v))
    })
}

fn percent_decode(text: &str) -> String {
    fn hex(b: u8) -> Option<u8> {
        (b as char).to_digit(16).and_then(|d| u8::try_from(d).ok())
    }
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(hi), Some(lo)) => {
                    out.push(hi * 16 + lo);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A backend of a rule.
#[derive(Debug, Clone)]
pub struct Backend {
    /// `<namespace>/<hostname>` of the Service, empty when invalid.
    pub service: String,
    /// The Service port.
    pub port: u16,
    /// Weight (0: never chosen).
    pub weight: u32,
    /// Filters applied when this backend is chosen.
    pub filters: Vec<pb::Filter>,
    /// Why the backendRef is unusable (requests landing here get 500).
    pub invalid: Option<String>,
    /// The DestinationRule subset (VirtualService `destination.subset`).
    pub subset: Option<String>,
}

/// One rule of one route, compiled.
#[derive(Debug)]
pub struct Rule {
    /// `HTTPRoute/<ns>/<name>` or `GRPCRoute/<ns>/<name>`.
    pub route: String,
    /// Index of the rule in the route.
    pub index: usize,
    /// `rules[].name`, if any.
    pub name: String,
    /// The rule's filters, in order.
    pub filters: Vec<pb::Filter>,
    /// The backends.
    pub backends: Vec<Backend>,
    /// `timeouts.request`.
    pub request_timeout: Option<Duration>,
    /// `timeouts.backendRequest`.
    pub backend_timeout: Option<Duration>,
    /// Retries, when the rule asks for them.
    pub retry: Option<crate::retry::RetryPolicy>,
    /// Fault injection (VirtualService `fault`).
    pub fault: Option<pb::Fault>,
    /// VirtualService `corsPolicy`.
    pub cors: Option<pb::CorsPolicy>,
}

impl Rule {
    /// Chooses a backend by weight with `roll` in `[0, total weight)`; `None` when every weight
    /// is 0 (or there are no backends).
    pub fn choose(&self, roll: impl FnOnce(u32) -> u32) -> Option<&Backend> {
        let total: u32 = self.backends.iter().map(|b| b.weight).sum();
        if total == 0 {
            return None;
        }
        let mut point = roll(total);
        for backend in &self.backends {
            if point < backend.weight {
                return Some(backend);
            }
            point -= backend.weight;
        }
        None
    }

    /// The total weight of the rule's backends.
    pub fn total_weight(&self) -> u32 {
        self.backends.iter().map(|b| b.weight).sum()
    }
}

/// A rule chosen for a request, with the path prefix that matched (for ReplacePrefixMatch).
#[derive(Debug, Clone)]
pub struct Matched {
    /// The rule.
    pub rule: Arc<Rule>,
    /// The matched path prefix when the match was a PathPrefix (without trailing `/`).
    pub matched_prefix: Option<String>,
}

#[derive(Debug)]
struct Entry {
    /// Service port the route is limited to (0: all).
    port: u16,
    matcher: CompiledMatch,
    rule: Arc<Rule>,
    creation: i64,
    route_name: String,
    rule_index: usize,
    match_index: usize,
}

#[derive(Debug, Default)]
struct ServiceRoutes {
    /// VirtualService rules, in the order written.
    ordered: Vec<Entry>,
    /// VirtualService `tcp` rules: (port or 0, creation, rule), oldest first.
    tcp: Vec<(u16, i64, Arc<Rule>)>,
    http: Vec<Entry>,
    grpc: Vec<Entry>,
}

/// What the route table says about a request.
#[derive(Debug)]
pub enum Decision {
    /// No route attaches to this Service port: the request goes to the Service itself.
    NoRoutes,
    /// Routes attach, but none matches (404).
    NoMatch,
    /// A rule matched.
    Matched(Matched),
}

/// A route that could not be compiled (the control plane validates, so this means a disagreement
/// between versions), with the reason; the rest of the routes still serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteError {
    /// The resource name.
    pub route: String,
    /// What is wrong, naming the field.
    pub reason: String,
}

/// Every route, indexed by the Service it attaches to.
#[derive(Debug, Default)]
pub struct RouteTable {
    services: HashMap<String, ServiceRoutes>,
}

impl RouteTable {
    /// Compiles `routes`; the ones that do not compile are skipped and reported.
    pub fn build<'a>(routes: impl IntoIterator<Item = &'a pb::Route>) -> (Self, Vec<RouteError>) {
        let mut table = RouteTable::default();
        let mut errors = Vec::new();
        for route in routes {
            if let Err(reason) = table.add(route) {
                errors.push(RouteError {
                    route: route.resource_name(),
                    reason,
                });
            }
        }
        for routes in table.services.values_mut() {
            routes.ordered.sort_by(|a, b| compare(a, b, |_| ()));
            routes
                .http
                .sort_by(|a, b| compare(a, b, |e| e.matcher.http_rank()));
            routes
                .grpc
                .sort_by(|a, b| compare(a, b, |e| e.matcher.grpc_rank()));
        }
        (table, errors)
    }

    fn add(&mut self, route: &pb::Route) -> Result<(), String> {
        let name = route.resource_name();
        let kind = route.kind();
        let grpc = kind == pb::RouteKind::Grpc;
        let mut entries = Vec::new();
        let mut tcp_rules = Vec::new();
        for (rule_index, rule) in route.rules.iter().enumerate() {
            let compiled = Arc::new(compile_rule(&name, rule_index, rule)?);
            if kind == pb::RouteKind::VirtualService && rule.matches.is_empty() {
                // A VirtualService `tcp` rule: for TCP ports only, never for HTTP requests.
                tcp_rules.push(compiled);
                continue;
            }
            let matches = if rule.matches.is_empty() {
                vec![pb::RouteMatch::default()]
            } else {
                rule.matches.clone()
            };
            for (match_index, m) in matches.iter().enumerate() {
                let at = format!("spec.rules[{rule_index}].matches[{match_index}]");
                entries.push((
                    compile_match(m, grpc, &at)?,
                    compiled.clone(),
                    rule_index,
                    match_index,
                ));
            }
        }
        for parent in &route.parents {
            let port = u16::try_from(parent.port)
                .map_err(|_| format!("parentRefs port {} is out of range", parent.port))?;
            let routes = self.services.entry(parent.service.clone()).or_default();
            for rule in &tcp_rules {
                routes
                    .tcp
                    .push((port, route.creation_timestamp, rule.clone()));
            }
            let list = match kind {
                pb::RouteKind::Grpc => &mut routes.grpc,
                pb::RouteKind::Http => &mut routes.http,
                pb::RouteKind::VirtualService => &mut routes.ordered,
            };
            for (matcher, rule, rule_index, match_index) in &entries {
                list.push(Entry {
                    port,
                    matcher: matcher.clone(),
                    rule: rule.clone(),
                    creation: route.creation_timestamp,
                    route_name: format!("{}/{}", route.namespace, route.name),
                    rule_index: *rule_index,
                    match_index: *match_index,
                });
            }
        }
        Ok(())
    }

    /// The VirtualService `tcp` rule for a TCP connection to `service` on `port`, if any (the
    /// oldest VirtualService's first).
    pub fn tcp_rule(&self, service: &str, port: u16) -> Option<Arc<Rule>> {
        self.services
            .get(service)?
            .tcp
            .iter()
            .filter(|(p, _, _)| *p == 0 || *p == port)
            .min_by_key(|(_, created, rule)| (*created, rule.route.clone(), rule.index))
            .map(|(_, _, rule)| rule.clone())
    }

    /// True when any route attaches to `service` (on any port).
    pub fn has_routes(&self, service: &str) -> bool {
        self.services.contains_key(service)
    }

    /// Chooses the rule for `request` to `service` (`<ns>/<hostname>`) on `port`.
    pub fn decide(&self, service: &str, port: u16, request: &RequestView<'_>) -> Decision {
        let Some(routes) = self.services.get(service) else {
            return Decision::NoRoutes;
        };
        let applies = |e: &&Entry| e.port == 0 || e.port == port;
        let ordered = routes.ordered.iter().filter(applies);
        let grpc_entries = routes.grpc.iter().filter(applies);
        let http_entries = routes.http.iter().filter(applies);
        let mut any = false;
        let candidates: Box<dyn Iterator<Item = &Entry>> = if request.grpc {
            Box::new(ordered.chain(grpc_entries).chain(http_entries))
        } else {
            Box::new(ordered.chain(http_entries))
        };
        for entry in candidates {
            any = true;
            if entry.matcher.matches(request) {
                let matched_prefix = match &entry.matcher.path {
                    PathMatcher::Prefix(p) | PathMatcher::StringPrefix(p)
                        if entry.matcher.grpc.is_none() =>
                    {
                        Some(p.clone())
                    }
                    _ => None,
                };
                return Decision::Matched(Matched {
                    rule: entry.rule.clone(),
                    matched_prefix,
                });
            }
        }
        // Routes for other ports only (or GRPCRoutes only, for a plain HTTP request) do not
        // attach to this port: the Service's default applies.
        if any {
            Decision::NoMatch
        } else {
            Decision::NoRoutes
        }
    }
}

/// Orders entries by precedence: higher rank first, then older, then name, rule, match.
fn compare<R: Ord>(a: &Entry, b: &Entry, rank: impl Fn(&Entry) -> R) -> Ordering {
    rank(b)
        .cmp(&rank(a))
        .then(a.creation.cmp(&b.creation))
        .then_with(|| a.route_name.cmp(&b.route_name))
        .then(a.rule_index.cmp(&b.rule_index))
        .then(a.match_index.cmp(&b.match_index))
}

fn compile_rule(route: &str, index: usize, rule: &pb::Rule) -> Result<Rule, String> {
    let backends = rule
        .backends
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let port = u16::try_from(b.port)
                .map_err(|_| format!("spec.rules[{index}].backendRefs[{i}].port out of range"))?;
            Ok(Backend {
                service: b.service.clone(),
                port,
                weight: b.weight,
                filters: b.filters.clone(),
                invalid: (!b.invalid.is_empty()).then(|| b.invalid.clone()),
                subset: (!b.subset.is_empty()).then(|| b.subset.clone()),
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    let timeouts = rule.timeouts.as_ref();
    let duration = |d: Option<&prost_types::Duration>| {
        d.and_then(|d| Duration::try_from(*d).ok())
            .filter(|d| !d.is_zero())
    };
    Ok(Rule {
        route: route.to_string(),
        index,
        name: rule.name.clone(),
        filters: rule.filters.clone(),
        backends,
        request_timeout: duration(timeouts.and_then(|t| t.request.as_ref())),
        backend_timeout: duration(timeouts.and_then(|t| t.backend_request.as_ref())),
        retry: rule
            .retry
            .as_ref()
            .filter(|r| r.attempts > 0)
            .map(crate::retry::RetryPolicy::from_proto),
        fault: rule.fault,
        cors: rule.cors.clone(),
    })
}

fn anchored(expr: &str, at: &str) -> Result<Regex, String> {
    Regex::new(&format!("^(?:{expr})$"))
        .map_err(|e| format!("{at}: invalid regular expression {expr:?}: {e}"))
}

fn value_matcher(m: &pb::StringMatch, at: &str) -> Result<ValueMatcher, String> {
    match m.r#type() {
        pb::MatchType::Exact => Ok(ValueMatcher::Exact(m.value.clone())),
        pb::MatchType::Regex => Ok(ValueMatcher::Regex(anchored(&m.value, at)?)),
        pb::MatchType::PrefixString => Ok(ValueMatcher::Prefix(m.value.clone())),
        pb::MatchType::Prefix => Err(format!("{at}: prefix is not a header/query match type")),
    }
}

fn compile_match(m: &pb::RouteMatch, grpc: bool, at: &str) -> Result<CompiledMatch, String> {
    let path = match &m.path {
        None => PathMatcher::Prefix(String::new()),
        Some(p) => match p.r#type() {
            pb::MatchType::Exact => PathMatcher::Exact(p.value.clone()),
            pb::MatchType::Prefix => PathMatcher::Prefix(p.value.trim_end_matches('/').to_string()),
            pb::MatchType::Regex => PathMatcher::Regex(anchored(&p.value, &format!("{at}.path"))?),
            pb::MatchType::PrefixString => PathMatcher::StringPrefix(p.value.clone()),
        },
    };
    let headers = m
        .headers
        .iter()
        .enumerate()
        .map(|(i, h)| {
            Ok(NamedMatcher {
                name: h.name.to_ascii_lowercase(),
                value: value_matcher(h, &format!("{at}.headers[{i}]"))?,
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    let without_headers = m
        .without_headers
        .iter()
        .enumerate()
        .map(|(i, h)| {
            Ok(NamedMatcher {
                name: h.name.to_ascii_lowercase(),
                value: value_matcher(h, &format!("{at}.withoutHeaders[{i}]"))?,
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    let query = m
        .query_params
        .iter()
        .enumerate()
        .map(|(i, q)| {
            Ok(NamedMatcher {
                name: q.name.clone(),
                value: value_matcher(q, &format!("{at}.queryParams[{i}]"))?,
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    let grpc = grpc.then(|| -> Result<GrpcMatcher, String> {
        let Some(g) = &m.grpc else {
            return Ok(GrpcMatcher::Any);
        };
        Ok(match g.r#type() {
            pb::MatchType::Regex => {
                let compile = |v: &str, field: &str| {
                    (!v.is_empty())
                        .then(|| anchored(v, &format!("{at}.method.{field}")))
                        .transpose()
                };
                GrpcMatcher::Regex {
                    service: compile(&g.service, "service")?,
                    method: compile(&g.method, "method")?,
                    service_len: g.service.len(),
                    method_len: g.method.len(),
                }
            }
            _ => GrpcMatcher::Exact {
                service: g.service.clone(),
                method: g.method.clone(),
            },
        })
    });
    Ok(CompiledMatch {
        path,
        method: (!m.method.is_empty()).then(|| m.method.to_ascii_uppercase()),
        headers,
        without_headers,
        query,
        grpc: grpc.transpose()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        map
    }

    fn view<'a>(method: &'a str, uri: &'a str, headers: &'a HeaderMap) -> RequestView<'a> {
        let (path, query) = match uri.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (uri, None),
        };
        RequestView {
            method,
            path,
            query,
            headers,
            grpc: headers
                .get("content-type")
                .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc")),
        }
    }

    fn backend(service: &str, weight: u32) -> pb::Backend {
        pb::Backend {
            service: service.into(),
            port: 80,
            weight,
            ..Default::default()
        }
    }

    fn path(kind: pb::MatchType, value: &str) -> Option<pb::PathMatch> {
        Some(pb::PathMatch {
            r#type: kind as i32,
            value: value.into(),
        })
    }

    fn route(name: &str, created: i64, rules: Vec<pb::Rule>) -> pb::Route {
        pb::Route {
            namespace: "ns".into(),
            name: name.into(),
            parents: vec![pb::ParentRef {
                service: "ns/echo.ns.svc.cluster.local".into(),
                port: 0,
            }],
            rules,
            creation_timestamp: created,
            ..Default::default()
        }
    }

    fn rule(matches: Vec<pb::RouteMatch>, to: &str) -> pb::Rule {
        pb::Rule {
            matches,
            backends: vec![backend(to, 1)],
            ..Default::default()
        }
    }

    const SVC: &str = "ns/echo.ns.svc.cluster.local";

    fn target(table: &RouteTable, method: &str, uri: &str, h: &[(&str, &str)]) -> String {
        let headers = headers(h);
        match table.decide(SVC, 80, &view(method, uri, &headers)) {
            Decision::Matched(m) => m.rule.backends[0].service.clone(),
            Decision::NoMatch => "404".into(),
            Decision::NoRoutes => "default".into(),
        }
    }

    #[test]
    fn prefix_is_segment_aware_and_exact_beats_prefix() {
        let routes = [route(
            "r",
            0,
            vec![
                rule(
                    vec![pb::RouteMatch {
                        path: path(pb::MatchType::Prefix, "/foo/"),
                        ..Default::default()
                    }],
                    "prefix",
                ),
                rule(
                    vec![pb::RouteMatch {
                        path: path(pb::MatchType::Exact, "/foo/exact"),
                        ..Default::default()
                    }],
                    "exact",
                ),
            ],
        )];
        let (table, errors) = RouteTable::build(&routes);
        assert!(errors.is_empty());
        assert_eq!(target(&table, "GET", "/foo", &[]), "prefix");
        assert_eq!(target(&table, "GET", "/foo/", &[]), "prefix");
        assert_eq!(target(&table, "GET", "/foo/bar?x=1", &[]), "prefix");
        assert_eq!(target(&table, "GET", "/foobar", &[]), "404");
        assert_eq!(target(&table, "GET", "/foo/exact", &[]), "exact");
        assert_eq!(target(&table, "GET", "/foo/exact/more", &[]), "prefix");
    }

    #[test]
    fn longer_prefix_then_method_then_headers_then_query() {
        let m = |p: &str, method: &str, headers: usize, query: usize| pb::RouteMatch {
            path: path(pb::MatchType::Prefix, p),
            method: method.into(),
            headers: (0..headers)
                .map(|i| pb::StringMatch {
                    name: format!("H{i}"),
                    r#type: pb::MatchType::Exact as i32,
                    value: "1".into(),
                })
                .collect(),
            query_params: (0..query)
                .map(|i| pb::StringMatch {
                    name: format!("q{i}"),
                    r#type: pb::MatchType::Exact as i32,
                    value: "1".into(),
                })
                .collect(),
            ..Default::default()
        };
        let routes = [route(
            "r",
            0,
            vec![
                rule(vec![m("/", "", 0, 0)], "root"),
                rule(vec![m("/a", "", 0, 1)], "a-query"),
                rule(vec![m("/a", "", 1, 0)], "a-header"),
                rule(vec![m("/a", "POST", 0, 0)], "a-post"),
                rule(vec![m("/a/b", "", 0, 0)], "ab"),
            ],
        )];
        let (table, _) = RouteTable::build(&routes);
        assert_eq!(target(&table, "GET", "/a/b", &[("h0", "1")]), "ab");
        assert_eq!(target(&table, "POST", "/a?q0=1", &[("h0", "1")]), "a-post");
        // Header names are case-insensitive.
        assert_eq!(target(&table, "GET", "/a?q0=1", &[("H0", "1")]), "a-header");
        assert_eq!(target(&table, "GET", "/a?q0=1", &[]), "a-query");
        assert_eq!(target(&table, "GET", "/a?q0=2", &[]), "root");
        assert_eq!(target(&table, "GET", "/elsewhere", &[]), "root");
    }

    #[test]
    fn ties_go_to_the_older_route_then_the_name_then_rule_order() {
        let any = || vec![pb::RouteMatch::default()];
        let routes = [
            route("b-newer", 20, vec![rule(any(), "b-newer")]),
            route("z-older", 10, vec![rule(any(), "z-older")]),
        ];
        let (table, _) = RouteTable::build(&routes);
        assert_eq!(target(&table, "GET", "/", &[]), "z-older");
        let routes = [
            route("b", 10, vec![rule(any(), "b")]),
            route("a", 10, vec![rule(any(), "a1"), rule(any(), "a2")]),
        ];
        let (table, _) = RouteTable::build(&routes);
        assert_eq!(target(&table, "GET", "/", &[]), "a1");
    }

    #[test]
    fn regex_matches_are_anchored_and_bad_ones_reported() {
        let routes = [
            route(
                "re",
                0,
                vec![rule(
                    vec![pb::RouteMatch {
                        path: path(pb::MatchType::Regex, "/v[0-9]+/items"),
                        headers: vec![pb::StringMatch {
                            name: "x-user".into(),
                            r#type: pb::MatchType::Regex as i32,
                            value: "qa-.*".into(),
                        }],
                        ..Default::default()
                    }],
                    "re",
                )],
            ),
            route(
                "bad",
                0,
                vec![rule(
                    vec![pb::RouteMatch {
                        path: path(pb::MatchType::Regex, "(unclosed"),
                        ..Default::default()
                    }],
                    "bad",
                )],
            ),
        ];
        let (table, errors) = RouteTable::build(&routes);
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].route, "HTTPRoute/ns/bad");
        assert!(errors[0].reason.contains("spec.rules[0].matches[0].path"));
        assert_eq!(
            target(&table, "GET", "/v2/items", &[("x-user", "qa-1")]),
            "re"
        );
        assert_eq!(
            target(&table, "GET", "/v2/items/x", &[("x-user", "qa-1")]),
            "404"
        );
        assert_eq!(
            target(&table, "GET", "/v2/items", &[("x-user", "x-qa-1")]),
            "404"
        );
    }

    #[test]
    fn parent_port_limits_the_route_and_other_ports_use_the_default() {
        let mut r = route("r", 0, vec![rule(vec![], "routed")]);
        r.parents[0].port = 80;
        let (table, _) = RouteTable::build([&r]);
        let h = HeaderMap::new();
        assert!(matches!(
            table.decide(SVC, 80, &view("GET", "/", &h)),
            Decision::Matched(_)
        ));
        assert!(matches!(
            table.decide(SVC, 9000, &view("GET", "/", &h)),
            Decision::NoRoutes
        ));
        assert!(matches!(
            table.decide("ns/other.ns.svc.cluster.local", 80, &view("GET", "/", &h)),
            Decision::NoRoutes
        ));
    }

    #[test]
    fn grpc_routes_match_service_and_method() {
        let mut r = route(
            "g",
            0,
            vec![
                rule(
                    vec![pb::RouteMatch {
                        grpc: Some(pb::GrpcMethodMatch {
                            r#type: pb::MatchType::Exact as i32,
                            service: "pkg.Echo".into(),
                            method: "Echo".into(),
                        }),
                        ..Default::default()
                    }],
                    "echo-method",
                ),
                rule(
                    vec![pb::RouteMatch {
                        grpc: Some(pb::GrpcMethodMatch {
                            r#type: pb::MatchType::Exact as i32,
                            service: "pkg.Echo".into(),
                            method: String::new(),
                        }),
                        ..Default::default()
                    }],
                    "echo-service",
                ),
            ],
        );
        r.kind = pb::RouteKind::Grpc as i32;
        let (table, errors) = RouteTable::build([&r]);
        assert!(errors.is_empty(), "{errors:?}");
        let grpc = [("content-type", "application/grpc")];
        assert_eq!(
            target(&table, "POST", "/pkg.Echo/Echo", &grpc),
            "echo-method"
        );
        assert_eq!(
            target(&table, "POST", "/pkg.Echo/Other", &grpc),
            "echo-service"
        );
        assert_eq!(target(&table, "POST", "/pkg.Other/Echo", &grpc), "404");
        // Plain HTTP to a Service with only GRPCRoutes: they do not attach.
        assert_eq!(target(&table, "GET", "/pkg.Echo/Echo", &[]), "default");
    }

    #[test]
    fn weights_choose_in_proportion_and_zero_total_is_none() {
        let r = route(
            "w",
            0,
            vec![pb::Rule {
                backends: vec![backend("a", 90), backend("b", 10), backend("c", 0)],
                ..Default::default()
            }],
        );
        let (table, _) = RouteTable::build([&r]);
        let h = HeaderMap::new();
        let Decision::Matched(m) = table.decide(SVC, 80, &view("GET", "/", &h)) else {
            panic!("no match");
        };
        assert_eq!(m.rule.choose(|_| 0).unwrap().service, "a");
        assert_eq!(m.rule.choose(|_| 89).unwrap().service, "a");
        assert_eq!(m.rule.choose(|_| 90).unwrap().service, "b");
        assert_eq!(m.rule.choose(|_| 99).unwrap().service, "b");
        let zero = Rule {
            route: String::new(),
            index: 0,
            name: String::new(),
            filters: vec![],
            backends: vec![Backend {
                service: "a".into(),
                port: 80,
                weight: 0,
                filters: vec![],
                invalid: None,
                subset: None,
            }],
            request_timeout: None,
            backend_timeout: None,
            retry: None,
            fault: None,
            cors: None,
        };
        assert!(zero.choose(|_| 0).is_none());
    }

    #[test]
    fn query_values_are_percent_decoded() {
        assert_eq!(
            query_value(Some("a=1&b=x%20y"), "b").as_deref(),
            Some("x y")
        );
        assert_eq!(query_value(Some("a=1&b=x+y"), "b").as_deref(), Some("x y"));
        assert_eq!(query_value(Some("flag"), "flag").as_deref(), Some(""));
        assert_eq!(query_value(Some("a=%zz"), "a").as_deref(), Some("%zz"));
        assert_eq!(query_value(None, "a"), None);
    }

    #[test]
    fn virtual_service_rules_apply_in_order_and_tcp_rules_only_to_tcp() {
        let vs = pb::Route {
            namespace: "ns".into(),
            name: "vs".into(),
            kind: pb::RouteKind::VirtualService as i32,
            parents: vec![pb::ParentRef {
                service: SVC.into(),
                port: 0,
            }],
            rules: vec![
                rule(
                    vec![pb::RouteMatch {
                        path: path(pb::MatchType::PrefixString, "/ap"),
                        ..Default::default()
                    }],
                    "first",
                ),
                rule(
                    vec![pb::RouteMatch {
                        path: path(pb::MatchType::Exact, "/api/exact"),
                        without_headers: vec![pb::StringMatch {
                            name: "x-skip".into(),
                            r#type: pb::MatchType::Exact as i32,
                            value: "1".into(),
                        }],
                        ..Default::default()
                    }],
                    "second",
                ),
                rule(vec![pb::RouteMatch::default()], "catch-all"),
                rule(vec![], "tcp"),
            ],
            ..Default::default()
        };
        let http = route(
            "http",
            0,
            vec![rule(
                vec![pb::RouteMatch {
                    path: path(pb::MatchType::Exact, "/api/exact"),
                    ..Default::default()
                }],
                "httproute",
            )],
        );
        let (table, errors) = RouteTable::build([&vs, &http]);
        assert!(errors.is_empty(), "{errors:?}");
        // First match wins in the VirtualService's order, and before any HTTPRoute; a plain
        // string prefix is not segment-aware.
        assert_eq!(target(&table, "GET", "/api/exact", &[]), "first");
        assert_eq!(target(&table, "GET", "/apis", &[]), "first");
        assert_eq!(target(&table, "GET", "/other", &[]), "catch-all");
        assert_eq!(
            table.tcp_rule(SVC, 9000).unwrap().backends[0].service,
            "tcp"
        );
        assert!(
            table
                .tcp_rule("ns/other.ns.svc.cluster.local", 9000)
                .is_none()
        );
    }
}
