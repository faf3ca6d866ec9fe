//! The policy model with Istio's semantics, how one policy matches a connection or a request, and
//! the conversion from the two wire forms into it.
//!
//! Policies arrive as `istio.security.Authorization` (ztunnel, L4) or `ambit.waypoint.v1.Policy`
//! (waypoints, L7) resources and are validated into [`Policy`] values once, when they are
//! received, so the per-connection and per-request checks do no parsing.
//!
//! A policy matches when any of its rules matches; a rule when all of its clauses match (a rule
//! with no clauses matches); a clause when any of its matches matches; a match when every field
//! it sets matches (values within a field are alternatives, and a `not_` field fails when any of
//! its values matches). A policy with no rules never matches. A waypoint rule's `from`, `to` and
//! each `when` condition become one clause each, so "from AND to AND when, values ORed" is the
//! same structure.

use std::fmt;
use std::net::IpAddr;

use ambit_identity::Identity;
use ambit_proto::security as pb;
use ambit_proto::waypoint as wp;
use ipnet::IpNet;
use thiserror::Error;

use crate::context::{Facts, RequestContext, Subject};

/// A policy that could not be accepted; the message names the policy and the field.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("authorization policy {policy}: {field}: {reason}")]
pub struct PolicyError {
    /// `namespace/name` of the policy.
    pub policy: String,
    /// Path of the offending field, e.g. `rules[0].clauses[1].matches[0].source_ips[2]`.
    pub field: String,
    /// What is wrong with it.
    pub reason: String,
}

/// Where a policy applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scope {
    /// Every workload in the mesh (policies in the root namespace without a selector).
    Global,
    /// Every workload in the policy's namespace.
    Namespace,
    /// Only workloads that list the policy in their `authorization_policies`.
    WorkloadSelector,
    /// The Gateways, Services or GatewayClasses in [`Policy::targets`] (waypoint policies).
    Targets,
}

/// What a matching policy does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Allow the connection or request.
    Allow,
    /// Deny the connection or request.
    Deny,
    /// Report the match; never changes the verdict.
    Audit,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Allow => "ALLOW",
            Action::Deny => "DENY",
            Action::Audit => "AUDIT",
        })
    }
}

/// What a waypoint policy is attached to.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Target {
    /// A Gateway (the waypoint itself), `namespace/name`.
    Gateway(String),
    /// A Service, by its address resource name `namespace/hostname`.
    Service(String),
    /// A GatewayClass by name (`istio-waypoint`): every waypoint of that class.
    GatewayClass(String),
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Gateway(g) => write!(f, "Gateway {g}"),
            Target::Service(s) => write!(f, "Service {s}"),
            Target::GatewayClass(c) => write!(f, "GatewayClass {c}"),
        }
    }
}

/// A string condition, in Istio's forms: `exact`, `prefix*`, `*suffix` and `*` (presence).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StringMatch {
    /// Equal to.
    Exact(String),
    /// Starts with.
    Prefix(String),
    /// Ends with.
    Suffix(String),
    /// Any non-empty value (used for "any authenticated peer"); for a header, the header is
    /// present.
    Presence,
}

impl StringMatch {
    /// True when `value` satisfies the condition (case-sensitive).
    pub fn matches(&self, value: &str) -> bool {
        match self {
            StringMatch::Exact(s) => value == s,
            StringMatch::Prefix(s) => value.starts_with(s.as_str()),
            StringMatch::Suffix(s) => value.ends_with(s.as_str()),
            StringMatch::Presence => !value.is_empty(),
        }
    }

    /// [`matches`](Self::matches) ignoring ASCII case (host names).
    pub fn matches_ignore_ascii_case(&self, value: &str) -> bool {
        let v = value.as_bytes();
        match self {
            StringMatch::Exact(e) => v.eq_ignore_ascii_case(e.as_bytes()),
            StringMatch::Prefix(p) => {
                v.len() >= p.len() && v[..p.len()].eq_ignore_ascii_case(p.as_bytes())
            }
            StringMatch::Suffix(x) => {
                v.len() >= x.len() && v[v.len() - x.len()..].eq_ignore_ascii_case(x.as_bytes())
            }
            StringMatch::Presence => !v.is_empty(),
        }
    }
}

/// A `when` condition on a request header: `request.headers[<name>]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeaderMatch {
    /// Lower-cased header name.
    pub name: String,
    /// The header's value matches any of these (when non-empty).
    pub values: Vec<StringMatch>,
    /// The header's value matches none of these.
    pub not_values: Vec<StringMatch>,
}

/// One match: every field it sets must hold.
///
/// The L4 fields come from the connection (the source identity only from a verified peer);
/// `hosts`, `methods`, `paths` and `headers` (and their `not_` forms) need an HTTP request: see
/// the crate documentation for what they do on plain TCP.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Match {
    /// Source namespace (from the verified identity).
    pub namespaces: Vec<StringMatch>,
    /// Source namespace must not match any of these.
    pub not_namespaces: Vec<StringMatch>,
    /// Source principal, `td/ns/x/sa/y` without the `spiffe://` scheme.
    pub principals: Vec<StringMatch>,
    /// Source principal must not match any of these.
    pub not_principals: Vec<StringMatch>,
    /// Source (namespace, service account) pairs.
    pub service_accounts: Vec<(String, String)>,
    /// Source must not be any of these (namespace, service account) pairs.
    pub not_service_accounts: Vec<(String, String)>,
    /// Source address within any of these networks.
    pub source_ips: Vec<IpNet>,
    /// Source address within none of these networks.
    pub not_source_ips: Vec<IpNet>,
    /// Destination address within any of these networks.
    pub destination_ips: Vec<IpNet>,
    /// Destination address within none of these networks.
    pub not_destination_ips: Vec<IpNet>,
    /// Destination port is one of these.
    pub destination_ports: Vec<u16>,
    /// Destination port is none of these.
    pub not_destination_ports: Vec<u16>,
    /// Request host (authority without port, compared ignoring case) matches one of these.
    pub hosts: Vec<StringMatch>,
    /// Request host matches none of these.
    pub not_hosts: Vec<StringMatch>,
    /// Request method matches one of these.
    pub methods: Vec<StringMatch>,
    /// Request method matches none of these.
    pub not_methods: Vec<StringMatch>,
    /// Request path (without query) matches one of these.
    pub paths: Vec<StringMatch>,
    /// Request path matches none of these.
    pub not_paths: Vec<StringMatch>,
    /// Every header condition holds.
    pub headers: Vec<HeaderMatch>,
}

impl Match {
    /// True when the match sets a field only an HTTP request has.
    pub fn needs_request(&self) -> bool {
        !(self.hosts.is_empty()
            && self.not_hosts.is_empty()
            && self.methods.is_empty()
            && self.not_methods.is_empty()
            && self.paths.is_empty()
            && self.not_paths.is_empty()
            && self.headers.is_empty())
    }

    /// Whether the match holds. `without_request` is the value of a request field when there is
    /// no request (plain TCP): false for ALLOW and AUDIT, true for DENY.
    fn holds(&self, facts: &Facts<'_>, without_request: bool) -> bool {
        let conn = facts.conn;
        let identity = conn.src_identity();
        let principal = facts.principal.as_deref();
        let namespace = identity.map(Identity::namespace);
        let is_sa = |pairs: &[(String, String)]| {
            identity.is_some_and(|id| {
                pairs
                    .iter()
                    .any(|(ns, sa)| ns == id.namespace() && sa == id.service_account())
            })
        };
        let in_any = |nets: &[IpNet], ip: IpAddr| nets.iter().any(|n| n.contains(&ip));
        let src_ip = conn.src_ip();
        let dst_ip = conn.dst().ip();
        let port = conn.dst().port();

        let l4 = (self.namespaces.is_empty() || any_string(&self.namespaces, namespace))
            && !any_string(&self.not_namespaces, namespace)
            && (self.principals.is_empty() || any_string(&self.principals, principal))
            && !any_string(&self.not_principals, principal)
            && (self.service_accounts.is_empty() || is_sa(&self.service_accounts))
            && !is_sa(&self.not_service_accounts)
            && (self.source_ips.is_empty() || in_any(&self.source_ips, src_ip))
            && !in_any(&self.not_source_ips, src_ip)
            && (self.destination_ips.is_empty() || in_any(&self.destination_ips, dst_ip))
            && !in_any(&self.not_destination_ips, dst_ip)
            && (self.destination_ports.is_empty() || self.destination_ports.contains(&port))
            && !self.not_destination_ports.contains(&port);
        if !l4 {
            return false;
        }
        if !self.needs_request() {
            return true;
        }
        let Some(request) = facts.request else {
            return without_request;
        };
        self.request_holds(request)
    }

    fn request_holds(&self, r: &RequestContext<'_>) -> bool {
        let host = |ms: &[StringMatch]| ms.iter().any(|m| m.matches_ignore_ascii_case(r.host()));
        let method = |ms: &[StringMatch]| ms.iter().any(|m| m.matches(r.method()));
        let path = |ms: &[StringMatch]| ms.iter().any(|m| m.matches(r.path()));
        (self.hosts.is_empty() || host(&self.hosts))
            && !host(&self.not_hosts)
            && (self.methods.is_empty() || method(&self.methods))
            && !method(&self.not_methods)
            && (self.paths.is_empty() || path(&self.paths))
            && !path(&self.not_paths)
            && self.headers.iter().all(|h| h.holds(r))
    }
}

impl HeaderMatch {
    fn holds(&self, r: &RequestContext<'_>) -> bool {
        let value = r.header(&self.name);
        let any = |ms: &[StringMatch]| {
            value.as_deref().is_some_and(|v| {
                ms.iter().any(|m| match m {
                    // A header that is present, even empty, satisfies `*`.
                    StringMatch::Presence => true,
                    other => other.matches(v),
                })
            })
        };
        (self.values.is_empty() || any(&self.values)) && !any(&self.not_values)
    }
}

/// Positive conditions need a value to hold; `not_` conditions fail only when a value matches.
fn any_string(conditions: &[StringMatch], value: Option<&str>) -> bool {
    value.is_some_and(|v| conditions.iter().any(|c| c.matches(v)))
}

/// Alternatives: the clause holds when any of its matches holds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Clause {
    /// ORed.
    pub matches: Vec<Match>,
}

/// One rule: every clause must hold (a rule with no clauses matches everything).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rule {
    /// ANDed.
    pub clauses: Vec<Clause>,
}

/// A validated authorization policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Policy name.
    pub name: String,
    /// Policy namespace (the root namespace for mesh-wide policies).
    pub namespace: String,
    /// Where it applies.
    pub scope: Scope,
    /// With [`Scope::Targets`]: what it is attached to; empty otherwise.
    pub targets: Vec<Target>,
    /// What it does when it matches.
    pub action: Action,
    /// Evaluated and reported, never enforced.
    pub dry_run: bool,
    /// ORed; no rules never matches.
    pub rules: Vec<Rule>,
}

impl AsRef<Policy> for Policy {
    fn as_ref(&self) -> &Policy {
        self
    }
}

impl Policy {
    /// `namespace/name`, the resource name policies are keyed by.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The index of the first rule that matches, if any.
    pub fn matching_rule<'a>(&self, subject: impl Into<Subject<'a>>) -> Option<usize> {
        self.matching_rule_in(&subject.into().facts())
    }

    /// True when any rule matches.
    pub fn matches<'a>(&self, subject: impl Into<Subject<'a>>) -> bool {
        self.matching_rule(subject).is_some()
    }

    pub(crate) fn matching_rule_in(&self, facts: &Facts<'_>) -> Option<usize> {
        // Istio: on plain TCP a DENY rule ignores its HTTP-only fields (deny is the safe side),
        // an ALLOW or AUDIT rule with such fields does not match.
        let without_request = self.action == Action::Deny;
        self.rules.iter().position(|rule| {
            rule.clauses.iter().all(|clause| {
                clause
                    .matches
                    .iter()
                    .any(|m| m.holds(facts, without_request))
            })
        })
    }

    /// Validates an L4 policy received by ztunnel (`istio.security.Authorization`).
    pub fn from_proto(resource: &pb::Authorization) -> Result<Policy, PolicyError> {
        let err = error_for(&resource.namespace, &resource.name);
        if resource.name.is_empty() {
            return Err(err("name".into(), "must not be empty".into()));
        }
        let scope = match pb::Scope::try_from(resource.scope) {
            Ok(pb::Scope::Global) => Scope::Global,
            Ok(pb::Scope::Namespace) => Scope::Namespace,
            Ok(pb::Scope::WorkloadSelector) => Scope::WorkloadSelector,
            Err(_) => {
                return Err(err(
                    "scope".into(),
                    format!("unknown scope value {}", resource.scope),
                ));
            }
        };
        let action = match pb::Action::try_from(resource.action) {
            Ok(pb::Action::Allow) => Action::Allow,
            Ok(pb::Action::Deny) => Action::Deny,
            Err(_) => {
                return Err(err(
                    "action".into(),
                    format!("unknown action value {}", resource.action),
                ));
            }
        };
        let mut rules = Vec::with_capacity(resource.rules.len());
        for (r, rule) in resource.rules.iter().enumerate() {
            let mut clauses = Vec::with_capacity(rule.clauses.len());
            for (c, clause) in rule.clauses.iter().enumerate() {
                let mut matches = Vec::with_capacity(clause.matches.len());
                for (m, proto_match) in clause.matches.iter().enumerate() {
                    let path = format!("rules[{r}].clauses[{c}].matches[{m}]");
                    matches.push(
                        convert_match(proto_match, &path)
                            .map_err(|(field, reason)| err(field, reason))?,
                    );
                }
                clauses.push(Clause { matches });
            }
            rules.push(Rule { clauses });
        }
        Ok(Policy {
            name: resource.name.clone(),
            namespace: resource.namespace.clone(),
            scope,
            targets: Vec::new(),
            action,
            dry_run: resource.dry_run,
            rules,
        })
    }

    /// Validates an L7 policy received by a waypoint (`ambit.waypoint.v1.Policy`). Each rule's
    /// `from` list becomes one clause, its `to` list another, and each `when` condition one more.
    pub fn from_waypoint(resource: &wp::Policy) -> Result<Policy, PolicyError> {
        let err = error_for(&resource.namespace, &resource.name);
        if resource.name.is_empty() {
            return Err(err("name".into(), "must not be empty".into()));
        }
        let action = match wp::Action::try_from(resource.action) {
            Ok(wp::Action::Allow) => Action::Allow,
            Ok(wp::Action::Deny) => Action::Deny,
            Ok(wp::Action::Audit) => Action::Audit,
            Err(_) => {
                return Err(err(
                    "action".into(),
                    format!("unknown action value {}", resource.action),
                ));
            }
        };
        if resource.targets.is_empty() {
            return Err(err(
                "targets".into(),
                "must name at least one Gateway, Service or GatewayClass".into(),
            ));
        }
        let mut targets = Vec::with_capacity(resource.targets.len());
        for (i, t) in resource.targets.iter().enumerate() {
            use wp::policy_target::Kind;
            let (target, value) = match &t.kind {
                Some(Kind::Gateway(g)) => (Target::Gateway(g.clone()), g),
                Some(Kind::Service(s)) => (Target::Service(s.clone()), s),
                Some(Kind::GatewayClass(c)) => (Target::GatewayClass(c.clone()), c),
                None => {
                    return Err(err(
                        format!("targets[{i}]"),
                        "sets none of gateway, service, gateway_class".into(),
                    ));
                }
            };
            if value.is_empty() {
                return Err(err(format!("targets[{i}]"), "names nothing".into()));
            }
            targets.push(target);
        }
        let mut rules = Vec::with_capacity(resource.rules.len());
        for (r, rule) in resource.rules.iter().enumerate() {
            let at = |field: &str, i: usize| format!("rules[{r}].{field}[{i}]");
            let convert = |result: Result<Match, FieldError>| {
                result.map_err(|(field, reason)| err(field, reason))
            };
            let mut clauses = Vec::new();
            if !rule.from.is_empty() {
                let matches = rule
                    .from
                    .iter()
                    .enumerate()
                    .map(|(i, s)| convert(convert_source(s, &at("from", i))))
                    .collect::<Result<_, _>>()?;
                clauses.push(Clause { matches });
            }
            if !rule.to.is_empty() {
                let matches = rule
                    .to
                    .iter()
                    .enumerate()
                    .map(|(i, o)| convert(convert_operation(o, &at("to", i))))
                    .collect::<Result<_, _>>()?;
                clauses.push(Clause { matches });
            }
            for (i, condition) in rule.when.iter().enumerate() {
                let m = convert(convert_condition(condition, &at("when", i)))?;
                clauses.push(Clause { matches: vec![m] });
            }
            rules.push(Rule { clauses });
        }
        Ok(Policy {
            name: resource.name.clone(),
            namespace: resource.namespace.clone(),
            scope: Scope::Targets,
            targets,
            action,
            dry_run: resource.dry_run,
            rules,
        })
    }
}

fn error_for<'a>(namespace: &'a str, name: &'a str) -> impl Fn(String, String) -> PolicyError + 'a {
    move |field, reason| PolicyError {
        policy: format!("{namespace}/{name}"),
        field,
        reason,
    }
}

/// (field path, reason).
type FieldError = (String, String);

fn convert_strings(
    values: &[pb::StringMatch],
    path: &str,
    field: &str,
) -> Result<Vec<StringMatch>, FieldError> {
    values
        .iter()
        .enumerate()
        .map(|(i, v)| match &v.match_type {
            Some(pb::string_match::MatchType::Exact(s)) => Ok(StringMatch::Exact(s.clone())),
            Some(pb::string_match::MatchType::Prefix(s)) => Ok(StringMatch::Prefix(s.clone())),
            Some(pb::string_match::MatchType::Suffix(s)) => Ok(StringMatch::Suffix(s.clone())),
            Some(pb::string_match::MatchType::Presence(())) => Ok(StringMatch::Presence),
            None => Err((
                format!("{path}.{field}[{i}]"),
                "string match sets none of exact, prefix, suffix, presence".into(),
            )),
        })
        .collect()
}

fn convert_networks(
    values: &[pb::Address],
    path: &str,
    field: &str,
) -> Result<Vec<IpNet>, FieldError> {
    values
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let at = || format!("{path}.{field}[{i}]");
            let ip = if let Ok(v4) = <[u8; 4]>::try_from(a.address.as_slice()) {
                IpAddr::from(v4)
            } else if let Ok(v6) = <[u8; 16]>::try_from(a.address.as_slice()) {
                IpAddr::from(v6)
            } else {
                return Err((
                    at(),
                    format!("address has {} bytes, expected 4 or 16", a.address.len()),
                ));
            };
            let max = if ip.is_ipv4() { 32 } else { 128 };
            let prefix = u8::try_from(a.length)
                .ok()
                .filter(|l| u32::from(*l) <= max)
                .ok_or_else(|| {
                    (
                        at(),
                        format!("prefix length {} is longer than {max}", a.length),
                    )
                })?;
            IpNet::new(ip, prefix)
                .map(|n| n.trunc())
                .map_err(|e| (at(), e.to_string()))
        })
        .collect()
}

fn convert_ports(values: &[u32], path: &str, field: &str) -> Result<Vec<u16>, FieldError> {
    values
        .iter()
        .enumerate()
        .map(|(i, p)| {
            u16::try_from(*p).ok().filter(|p| *p != 0).ok_or_else(|| {
                (
                    format!("{path}.{field}[{i}]"),
                    format!("port {p} is outside 1-65535"),
                )
            })
        })
        .collect()
}

fn convert_service_accounts(values: &[pb::ServiceAccountMatch]) -> Vec<(String, String)> {
    values
        .iter()
        .map(|s| (s.namespace.clone(), s.service_account.clone()))
        .collect()
}

fn convert_match(m: &pb::Match, path: &str) -> Result<Match, FieldError> {
    Ok(Match {
        namespaces: convert_strings(&m.namespaces, path, "namespaces")?,
        not_namespaces: convert_strings(&m.not_namespaces, path, "not_namespaces")?,
        principals: convert_strings(&m.principals, path, "principals")?,
        not_principals: convert_strings(&m.not_principals, path, "not_principals")?,
        service_accounts: convert_service_accounts(&m.service_accounts),
        not_service_accounts: convert_service_accounts(&m.not_service_accounts),
        source_ips: convert_networks(&m.source_ips, path, "source_ips")?,
        not_source_ips: convert_networks(&m.not_source_ips, path, "not_source_ips")?,
        destination_ips: convert_networks(&m.destination_ips, path, "destination_ips")?,
        not_destination_ips: convert_networks(&m.not_destination_ips, path, "not_destination_ips")?,
        destination_ports: convert_ports(&m.destination_ports, path, "destination_ports")?,
        not_destination_ports: convert_ports(
            &m.not_destination_ports,
            path,
            "not_destination_ports",
        )?,
        ..Match::default()
    })
}

fn convert_source(s: &wp::Source, path: &str) -> Result<Match, FieldError> {
    Ok(Match {
        principals: convert_strings(&s.principals, path, "principals")?,
        not_principals: convert_strings(&s.not_principals, path, "not_principals")?,
        namespaces: convert_strings(&s.namespaces, path, "namespaces")?,
        not_namespaces: convert_strings(&s.not_namespaces, path, "not_namespaces")?,
        source_ips: convert_networks(&s.ip_blocks, path, "ip_blocks")?,
        not_source_ips: convert_networks(&s.not_ip_blocks, path, "not_ip_blocks")?,
        ..Match::default()
    })
}

fn convert_operation(o: &wp::Operation, path: &str) -> Result<Match, FieldError> {
    Ok(Match {
        hosts: convert_strings(&o.hosts, path, "hosts")?,
        not_hosts: convert_strings(&o.not_hosts, path, "not_hosts")?,
        destination_ports: convert_ports(&o.ports, path, "ports")?,
        not_destination_ports: convert_ports(&o.not_ports, path, "not_ports")?,
        methods: convert_strings(&o.methods, path, "methods")?,
        not_methods: convert_strings(&o.not_methods, path, "not_methods")?,
        paths: convert_strings(&o.paths, path, "paths")?,
        not_paths: convert_strings(&o.not_paths, path, "not_paths")?,
        ..Match::default()
    })
}

/// The `when` keys a waypoint policy may use.
const CONDITION_KEYS: &str = "request.headers[<name>], source.ip, source.namespace, \
                              source.principal, destination.port, request.method";

fn convert_condition(c: &wp::Condition, path: &str) -> Result<Match, FieldError> {
    if c.values.is_empty() && c.not_values.is_empty() {
        return Err((
            format!("{path}.values"),
            format!(
                "condition on {:?} sets neither values nor not_values",
                c.key
            ),
        ));
    }
    let values = |field: &str| {
        let list = if field == "values" {
            &c.values
        } else {
            &c.not_values
        };
        convert_strings(list, path, field)
    };
    let mut m = Match::default();
    if let Some(name) = c
        .key
        .strip_prefix("request.headers[")
        .and_then(|rest| rest.strip_suffix(']'))
    {
        if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
            return Err((
                format!("{path}.key"),
                format!("{name:?} is not a valid header name"),
            ));
        }
        m.headers.push(HeaderMatch {
            name: name.to_ascii_lowercase(),
            values: values("values")?,
            not_values: values("not_values")?,
        });
        return Ok(m);
    }
    match c.key.as_str() {
        "source.ip" => {
            m.source_ips = condition_networks(&c.values, path, "values")?;
            m.not_source_ips = condition_networks(&c.not_values, path, "not_values")?;
        }
        "source.namespace" => {
            m.namespaces = values("values")?;
            m.not_namespaces = values("not_values")?;
        }
        "source.principal" => {
            m.principals = values("values")?;
            m.not_principals = values("not_values")?;
        }
        "destination.port" => {
            m.destination_ports = condition_ports(&c.values, path, "values")?;
            m.not_destination_ports = condition_ports(&c.not_values, path, "not_values")?;
        }
        "request.method" => {
            m.methods = values("values")?;
            m.not_methods = values("not_values")?;
        }
        other => {
            return Err((
                format!("{path}.key"),
                format!("unsupported condition key {other:?} (supported: {CONDITION_KEYS})"),
            ));
        }
    }
    Ok(m)
}

/// The exact strings of a condition whose values are not patterns (addresses, ports).
fn exact_values<'v>(
    values: &'v [pb::StringMatch],
    path: &str,
    field: &str,
    what: &str,
) -> Result<Vec<(String, &'v str)>, FieldError> {
    values
        .iter()
        .enumerate()
        .map(|(i, v)| match &v.match_type {
            Some(pb::string_match::MatchType::Exact(s)) => {
                Ok((format!("{path}.{field}[{i}]"), s.as_str()))
            }
            _ => Err((
                format!("{path}.{field}[{i}]"),
                format!("must be an exact {what}, not a prefix, suffix or presence match"),
            )),
        })
        .collect()
}

fn condition_networks(
    values: &[pb::StringMatch],
    path: &str,
    field: &str,
) -> Result<Vec<IpNet>, FieldError> {
    exact_values(values, path, field, "address or CIDR block")?
        .into_iter()
        .map(|(at, s)| {
            s.parse::<IpNet>()
                .map(|n| n.trunc())
                .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| (at, format!("{s:?} is not an IP address or CIDR block")))
        })
        .collect()
}

fn condition_ports(
    values: &[pb::StringMatch],
    path: &str,
    field: &str,
) -> Result<Vec<u16>, FieldError> {
    exact_values(values, path, field, "port number")?
        .into_iter()
        .map(|(at, s)| {
            s.parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| (at, format!("{s:?} is not a port in 1-65535")))
        })
        .collect()
}
