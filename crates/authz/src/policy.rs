//! L4 authorization with Istio's semantics.
//!
//! Policies arrive as `istio.security.Authorization` resources and are validated into [`Policy`]
//! values once, when they are received, so the per-connection check does no parsing. A
//! connection is checked at its destination against every applicable policy:
//!
//! 1. any matching DENY policy denies;
//! 2. with no ALLOW policy the connection is allowed;
//! 3. a matching ALLOW policy allows;
//! 4. otherwise it is denied.
//!
//! A policy matches when any of its rules matches; a rule when all of its clauses match (a rule
//! with no clauses matches); a clause when any of its matches matches; a match when every field
//! it sets matches (values within a field are alternatives, and a `not_` field fails when any of
//! its values matches). A policy with no rules never matches. Dry-run policies are evaluated and
//! reported but never change the verdict.
//!
//! The source identity comes only from a [`VerifiedPeer`], so a caller cannot be authorized on a
//! name it merely claimed.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use ambit_identity::Identity;
use ambit_identity::tls::VerifiedPeer;
use ambit_proto::security as pb;
use ipnet::IpNet;
use thiserror::Error;

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
}

/// What a matching policy does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Allow the connection.
    Allow,
    /// Deny the connection.
    Deny,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Allow => "ALLOW",
            Action::Deny => "DENY",
        })
    }
}

/// A string condition on a principal or namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StringMatch {
    /// Equal to.
    Exact(String),
    /// Starts with.
    Prefix(String),
    /// Ends with.
    Suffix(String),
    /// Any non-empty value (used for "any authenticated peer").
    Presence,
}

impl StringMatch {
    fn matches(&self, value: &str) -> bool {
        match self {
            StringMatch::Exact(s) => value == s,
            StringMatch::Prefix(s) => value.starts_with(s.as_str()),
            StringMatch::Suffix(s) => value.ends_with(s.as_str()),
            StringMatch::Presence => !value.is_empty(),
        }
    }
}

/// One match: every field it sets must hold.
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
    /// What it does when it matches.
    pub action: Action,
    /// Evaluated and reported, never enforced.
    pub dry_run: bool,
    /// Rules → clauses → matches.
    pub rules: Vec<Vec<Vec<Match>>>,
}

impl Policy {
    /// `namespace/name`, the resource name policies are keyed by.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Validates a received resource.
    pub fn from_proto(resource: &pb::Authorization) -> Result<Policy, PolicyError> {
        let key = format!("{}/{}", resource.namespace, resource.name);
        let err = |field: String, reason: String| PolicyError {
            policy: key.clone(),
            field,
            reason,
        };
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
                clauses.push(matches);
            }
            rules.push(clauses);
        }
        Ok(Policy {
            name: resource.name.clone(),
            namespace: resource.namespace.clone(),
            scope,
            action,
            dry_run: resource.dry_run,
            rules,
        })
    }

    /// True when any rule matches the connection.
    pub fn matches(&self, conn: &ConnectionContext) -> bool {
        self.rules.iter().any(|clauses| {
            clauses
                .iter()
                .all(|matches| matches.iter().any(|m| match_holds(m, conn)))
        })
    }
}

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
            let ip = match a.address.len() {
                4 => {
                    IpAddr::from(<[u8; 4]>::try_from(a.address.as_slice()).expect("length checked"))
                }
                16 => IpAddr::from(
                    <[u8; 16]>::try_from(a.address.as_slice()).expect("length checked"),
                ),
                n => return Err((at(), format!("address has {n} bytes, expected 4 or 16"))),
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
    })
}

/// What is known about a connection at the destination.
#[derive(Clone, Debug)]
pub struct ConnectionContext {
    /// The client's address as the destination sees it.
    pub src_ip: IpAddr,
    /// The client's identity, present only when mTLS proved it.
    pub src_identity: Option<Identity>,
    /// The destination workload's address and port.
    pub dst: SocketAddr,
}

impl ConnectionContext {
    /// A connection that arrived over HBONE from a verified peer.
    pub fn verified(src_ip: IpAddr, peer: &VerifiedPeer, dst: SocketAddr) -> Self {
        ConnectionContext {
            src_ip,
            src_identity: Some(peer.identity().clone()),
            dst,
        }
    }

    /// A plaintext connection: no identity.
    pub fn plaintext(src_ip: IpAddr, dst: SocketAddr) -> Self {
        ConnectionContext {
            src_ip,
            src_identity: None,
            dst,
        }
    }
}

/// Positive conditions need a value to hold; `not_` conditions fail only when a value matches.
fn any_string(conditions: &[StringMatch], value: Option<&str>) -> bool {
    value.is_some_and(|v| conditions.iter().any(|c| c.matches(v)))
}

fn match_holds(m: &Match, conn: &ConnectionContext) -> bool {
    let identity = conn.src_identity.as_ref();
    let principal = identity.map(Identity::principal);
    let namespace = identity.map(Identity::namespace);
    let is_sa = |pairs: &[(String, String)]| {
        identity.is_some_and(|id| {
            pairs
                .iter()
                .any(|(ns, sa)| ns == id.namespace() && sa == id.service_account())
        })
    };
    let in_any = |nets: &[IpNet], ip: IpAddr| nets.iter().any(|n| n.contains(&ip));
    let dst_ip = conn.dst.ip();
    let port = conn.dst.port();

    (m.namespaces.is_empty() || any_string(&m.namespaces, namespace))
        && !any_string(&m.not_namespaces, namespace)
        && (m.principals.is_empty() || any_string(&m.principals, principal.as_deref()))
        && !any_string(&m.not_principals, principal.as_deref())
        && (m.service_accounts.is_empty() || is_sa(&m.service_accounts))
        && !is_sa(&m.not_service_accounts)
        && (m.source_ips.is_empty() || in_any(&m.source_ips, conn.src_ip))
        && !in_any(&m.not_source_ips, conn.src_ip)
        && (m.destination_ips.is_empty() || in_any(&m.destination_ips, dst_ip))
        && !in_any(&m.not_destination_ips, dst_ip)
        && (m.destination_ports.is_empty() || m.destination_ports.contains(&port))
        && !m.not_destination_ports.contains(&port)
}

/// The verdict on one connection, with enough detail for an access log or an explain command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// Whether the connection may proceed.
    pub allowed: bool,
    /// The policy that decided (`namespace/name`), if one did.
    pub policy: Option<String>,
    /// A sentence saying why.
    pub reason: String,
    /// What dry-run policies would have done: (`namespace/name`, action) for each that matched.
    pub dry_run_matches: Vec<(String, Action)>,
}

/// All policies, indexed by where they apply.
#[derive(Clone, Debug, Default)]
pub struct PolicyStore {
    by_key: BTreeMap<String, Arc<Policy>>,
    /// Namespace-scoped policy keys per namespace.
    by_namespace: BTreeMap<String, BTreeSet<String>>,
    /// Mesh-wide policy keys.
    global: BTreeSet<String>,
}

impl PolicyStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds or replaces a policy.
    pub fn insert(&mut self, policy: Policy) {
        let key = policy.key();
        self.remove(&key);
        match policy.scope {
            Scope::Global => {
                self.global.insert(key.clone());
            }
            Scope::Namespace => {
                self.by_namespace
                    .entry(policy.namespace.clone())
                    .or_default()
                    .insert(key.clone());
            }
            Scope::WorkloadSelector => {}
        }
        self.by_key.insert(key, Arc::new(policy));
    }

    /// Removes a policy by `namespace/name`; returns whether it existed.
    pub fn remove(&mut self, key: &str) -> bool {
        let Some(old) = self.by_key.remove(key) else {
            return false;
        };
        match old.scope {
            Scope::Global => {
                self.global.remove(key);
            }
            Scope::Namespace => {
                if let Some(set) = self.by_namespace.get_mut(&old.namespace) {
                    set.remove(key);
                    if set.is_empty() {
                        self.by_namespace.remove(&old.namespace);
                    }
                }
            }
            Scope::WorkloadSelector => {}
        }
        true
    }

    /// A policy by `namespace/name`.
    pub fn get(&self, key: &str) -> Option<&Arc<Policy>> {
        self.by_key.get(key)
    }

    /// Number of policies held.
    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    /// True when no policy is held.
    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    /// Every policy, sorted by key (for config dumps).
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Policy>> {
        self.by_key.values()
    }

    /// The policies that apply to a workload in `namespace` whose selector-scoped policies are
    /// `selected` (the workload's `authorization_policies`). Unknown selected keys are skipped.
    pub fn applicable<'a>(
        &'a self,
        namespace: &str,
        selected: &'a [String],
    ) -> Vec<&'a Arc<Policy>> {
        let mut keys: BTreeSet<&str> = self.global.iter().map(String::as_str).collect();
        if let Some(set) = self.by_namespace.get(namespace) {
            keys.extend(set.iter().map(String::as_str));
        }
        keys.extend(selected.iter().map(String::as_str));
        keys.into_iter()
            .filter_map(|k| self.by_key.get(k))
            .collect()
    }

    /// Decides a connection to a workload in `namespace` with selector policies `selected`.
    pub fn authorize(
        &self,
        namespace: &str,
        selected: &[String],
        conn: &ConnectionContext,
    ) -> Decision {
        let policies = self.applicable(namespace, selected);
        let dry_run_matches = policies
            .iter()
            .filter(|p| p.dry_run && p.matches(conn))
            .map(|p| (p.key(), p.action))
            .collect();
        let enforced = || policies.iter().filter(|p| !p.dry_run);
        if let Some(deny) = enforced().find(|p| p.action == Action::Deny && p.matches(conn)) {
            return Decision {
                allowed: false,
                policy: Some(deny.key()),
                reason: format!("denied by DENY policy {}", deny.key()),
                dry_run_matches,
            };
        }
        let mut allows = enforced().filter(|p| p.action == Action::Allow).peekable();
        if allows.peek().is_none() {
            return Decision {
                allowed: true,
                policy: None,
                reason: "allowed: no ALLOW policy applies to this workload".into(),
                dry_run_matches,
            };
        }
        let allow_keys: Vec<String> = allows.clone().map(|p| p.key()).collect();
        if let Some(allow) = allows.find(|p| p.matches(conn)) {
            return Decision {
                allowed: true,
                policy: Some(allow.key()),
                reason: format!("allowed by ALLOW policy {}", allow.key()),
                dry_run_matches,
            };
        }
        Decision {
            allowed: false,
            policy: None,
            reason: format!(
                "denied: no ALLOW policy matched (applicable: {})",
                allow_keys.join(", ")
            ),
            dry_run_matches,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exact(s: &str) -> pb::StringMatch {
        pb::StringMatch {
            match_type: Some(pb::string_match::MatchType::Exact(s.into())),
        }
    }

    fn presence() -> pb::StringMatch {
        pb::StringMatch {
            match_type: Some(pb::string_match::MatchType::Presence(())),
        }
    }

    fn cidr(ip: &str, len: u32) -> pb::Address {
        let ip: IpAddr = ip.parse().unwrap();
        let address = match ip {
            IpAddr::V4(v4) => v4.octets().to_vec(),
            IpAddr::V6(v6) => v6.octets().to_vec(),
        };
        pb::Address {
            address,
            length: len,
        }
    }

    fn policy(
        ns: &str,
        name: &str,
        scope: pb::Scope,
        action: pb::Action,
        matches: Vec<pb::Match>,
    ) -> Policy {
        Policy::from_proto(&pb::Authorization {
            name: name.into(),
            namespace: ns.into(),
            scope: scope as i32,
            action: action as i32,
            rules: vec![pb::Rule {
                clauses: vec![pb::Clause { matches }],
            }],
            dry_run: false,
            ..Default::default()
        })
        .unwrap()
    }

    fn from(identity: Option<&str>, src: &str, dst: &str) -> ConnectionContext {
        ConnectionContext {
            src_ip: src.parse().unwrap(),
            src_identity: identity.map(|i| i.parse().unwrap()),
            dst: dst.parse().unwrap(),
        }
    }

    const CLIENT: &str = "spiffe://cluster.local/ns/demo/sa/client";
    const OTHER: &str = "spiffe://cluster.local/ns/legacy/sa/default";

    #[test]
    fn no_policies_allow_everything() {
        let store = PolicyStore::new();
        let d = store.authorize("demo", &[], &from(None, "10.0.0.1", "10.0.1.1:8080"));
        assert!(d.allowed);
        assert_eq!(
            d.reason,
            "allowed: no ALLOW policy applies to this workload"
        );
    }

    #[test]
    fn allow_by_principal_denies_everyone_else() {
        let mut store = PolicyStore::new();
        store.insert(policy(
            "demo",
            "allow-client",
            pb::Scope::Namespace,
            pb::Action::Allow,
            vec![pb::Match {
                principals: vec![exact("cluster.local/ns/demo/sa/client")],
                ..Default::default()
            }],
        ));
        let ok = store.authorize(
            "demo",
            &[],
            &from(Some(CLIENT), "10.0.0.1", "10.0.1.1:8080"),
        );
        assert!(ok.allowed);
        assert_eq!(ok.policy.as_deref(), Some("demo/allow-client"));
        let other = store.authorize("demo", &[], &from(Some(OTHER), "10.0.0.2", "10.0.1.1:8080"));
        assert!(!other.allowed);
        assert_eq!(
            other.reason,
            "denied: no ALLOW policy matched (applicable: demo/allow-client)"
        );
        let plaintext = store.authorize("demo", &[], &from(None, "10.0.0.2", "10.0.1.1:8080"));
        assert!(!plaintext.allowed, "no identity cannot match a principal");
        // Other namespaces are unaffected by a namespace-scoped policy.
        assert!(
            store
                .authorize("legacy", &[], &from(None, "10.0.0.2", "10.0.2.1:80"))
                .allowed
        );
    }

    #[test]
    fn deny_wins_over_allow() {
        let mut store = PolicyStore::new();
        store.insert(policy(
            "demo",
            "allow-all-authenticated",
            pb::Scope::Namespace,
            pb::Action::Allow,
            vec![pb::Match {
                principals: vec![presence()],
                ..Default::default()
            }],
        ));
        store.insert(policy(
            "demo",
            "deny-port-9090",
            pb::Scope::Namespace,
            pb::Action::Deny,
            vec![pb::Match {
                destination_ports: vec![9090],
                ..Default::default()
            }],
        ));
        assert!(
            store
                .authorize(
                    "demo",
                    &[],
                    &from(Some(CLIENT), "10.0.0.1", "10.0.1.1:8080")
                )
                .allowed
        );
        let d = store.authorize(
            "demo",
            &[],
            &from(Some(CLIENT), "10.0.0.1", "10.0.1.1:9090"),
        );
        assert!(!d.allowed);
        assert_eq!(d.reason, "denied by DENY policy demo/deny-port-9090");
    }

    #[test]
    fn strict_peer_authentication_shape_denies_plaintext_only() {
        // PeerAuthentication STRICT becomes DENY with not_principals: [presence].
        let mut store = PolicyStore::new();
        store.insert(policy(
            "istio-system",
            "istio_converted_static_strict",
            pb::Scope::Global,
            pb::Action::Deny,
            vec![pb::Match {
                not_principals: vec![presence()],
                ..Default::default()
            }],
        ));
        assert!(
            !store
                .authorize("demo", &[], &from(None, "10.0.0.9", "10.0.1.1:8080"))
                .allowed
        );
        assert!(
            store
                .authorize("demo", &[], &from(Some(OTHER), "10.0.0.9", "10.0.1.1:8080"))
                .allowed
        );
    }

    #[test]
    fn namespaces_service_accounts_and_not_forms() {
        let m = pb::Match {
            namespaces: vec![exact("demo")],
            not_service_accounts: vec![pb::ServiceAccountMatch {
                namespace: "demo".into(),
                service_account: "banned".into(),
            }],
            ..Default::default()
        };
        let mut store = PolicyStore::new();
        store.insert(policy(
            "demo",
            "same-ns",
            pb::Scope::Namespace,
            pb::Action::Allow,
            vec![m],
        ));
        assert!(
            store
                .authorize("demo", &[], &from(Some(CLIENT), "10.0.0.1", "10.0.1.1:80"))
                .allowed
        );
        assert!(
            !store
                .authorize("demo", &[], &from(Some(OTHER), "10.0.0.1", "10.0.1.1:80"))
                .allowed
        );
        let banned = from(
            Some("spiffe://cluster.local/ns/demo/sa/banned"),
            "10.0.0.1",
            "10.0.1.1:80",
        );
        assert!(!store.authorize("demo", &[], &banned).allowed);

        let sa_only = pb::Match {
            service_accounts: vec![pb::ServiceAccountMatch {
                namespace: "legacy".into(),
                service_account: "default".into(),
            }],
            not_namespaces: vec![exact("demo")],
            ..Default::default()
        };
        let mut store = PolicyStore::new();
        store.insert(policy(
            "demo",
            "legacy-default",
            pb::Scope::Namespace,
            pb::Action::Allow,
            vec![sa_only],
        ));
        assert!(
            store
                .authorize("demo", &[], &from(Some(OTHER), "10.0.0.1", "10.0.1.1:80"))
                .allowed
        );
        assert!(
            !store
                .authorize("demo", &[], &from(Some(CLIENT), "10.0.0.1", "10.0.1.1:80"))
                .allowed
        );
    }

    #[test]
    fn ip_blocks_and_ports() {
        let m = pb::Match {
            source_ips: vec![cidr("10.0.0.0", 24)],
            not_source_ips: vec![cidr("10.0.0.66", 32)],
            destination_ips: vec![cidr("10.0.1.1", 32)],
            not_destination_ports: vec![22],
            ..Default::default()
        };
        let mut store = PolicyStore::new();
        store.insert(policy(
            "demo",
            "lan",
            pb::Scope::Namespace,
            pb::Action::Allow,
            vec![m],
        ));
        assert!(
            store
                .authorize("demo", &[], &from(None, "10.0.0.5", "10.0.1.1:80"))
                .allowed
        );
        assert!(
            !store
                .authorize("demo", &[], &from(None, "10.0.0.66", "10.0.1.1:80"))
                .allowed,
            "excluded source"
        );
        assert!(
            !store
                .authorize("demo", &[], &from(None, "10.9.0.5", "10.0.1.1:80"))
                .allowed,
            "outside the block"
        );
        assert!(
            !store
                .authorize("demo", &[], &from(None, "10.0.0.5", "10.0.1.2:80"))
                .allowed,
            "other destination"
        );
        assert!(
            !store
                .authorize("demo", &[], &from(None, "10.0.0.5", "10.0.1.1:22"))
                .allowed,
            "excluded port"
        );
    }

    #[test]
    fn clause_and_rule_structure() {
        // Two clauses: both must hold. Inside a clause, either match may hold.
        let auth = pb::Authorization {
            name: "two-clauses".into(),
            namespace: "demo".into(),
            scope: pb::Scope::Namespace as i32,
            action: pb::Action::Allow as i32,
            rules: vec![pb::Rule {
                clauses: vec![
                    pb::Clause {
                        matches: vec![
                            pb::Match {
                                namespaces: vec![exact("demo")],
                                ..Default::default()
                            },
                            pb::Match {
                                namespaces: vec![exact("legacy")],
                                ..Default::default()
                            },
                        ],
                    },
                    pb::Clause {
                        matches: vec![pb::Match {
                            destination_ports: vec![80],
                            ..Default::default()
                        }],
                    },
                ],
            }],
            ..Default::default()
        };
        let mut store = PolicyStore::new();
        store.insert(Policy::from_proto(&auth).unwrap());
        assert!(
            store
                .authorize("demo", &[], &from(Some(OTHER), "10.0.0.1", "10.0.1.1:80"))
                .allowed
        );
        assert!(
            !store
                .authorize("demo", &[], &from(Some(OTHER), "10.0.0.1", "10.0.1.1:81"))
                .allowed
        );

        // A policy with no rules never matches: an ALLOW without rules denies everything.
        let mut store = PolicyStore::new();
        store.insert(
            Policy::from_proto(&pb::Authorization {
                name: "allow-nothing".into(),
                namespace: "demo".into(),
                scope: pb::Scope::Namespace as i32,
                action: pb::Action::Allow as i32,
                ..Default::default()
            })
            .unwrap(),
        );
        assert!(
            !store
                .authorize("demo", &[], &from(Some(CLIENT), "10.0.0.1", "10.0.1.1:80"))
                .allowed
        );

        // A rule with no clauses matches everything.
        let mut store = PolicyStore::new();
        store.insert(
            Policy::from_proto(&pb::Authorization {
                name: "deny-all".into(),
                namespace: "demo".into(),
                scope: pb::Scope::Namespace as i32,
                action: pb::Action::Deny as i32,
                rules: vec![pb::Rule { clauses: vec![] }],
                ..Default::default()
            })
            .unwrap(),
        );
        assert!(
            !store
                .authorize("demo", &[], &from(Some(CLIENT), "10.0.0.1", "10.0.1.1:80"))
                .allowed
        );
    }

    #[test]
    fn scopes_global_namespace_and_selector() {
        let mut store = PolicyStore::new();
        let only_client = || {
            vec![pb::Match {
                principals: vec![exact("cluster.local/ns/demo/sa/client")],
                ..Default::default()
            }]
        };
        store.insert(policy(
            "demo",
            "selected",
            pb::Scope::WorkloadSelector,
            pb::Action::Allow,
            only_client(),
        ));
        // Not selected by this workload: does not apply.
        assert!(
            store
                .authorize("demo", &[], &from(Some(OTHER), "10.0.0.1", "10.0.1.1:80"))
                .allowed
        );
        // Selected: applies.
        let selected = vec!["demo/selected".to_string()];
        assert!(
            !store
                .authorize(
                    "demo",
                    &selected,
                    &from(Some(OTHER), "10.0.0.1", "10.0.1.1:80")
                )
                .allowed
        );
        // Unknown selected keys are skipped.
        assert!(
            store
                .authorize(
                    "demo",
                    &["demo/missing".to_string()],
                    &from(Some(OTHER), "10.0.0.1", "10.0.1.1:80")
                )
                .allowed
        );
        // Global applies everywhere.
        store.insert(policy(
            "istio-system",
            "mesh-deny-legacy",
            pb::Scope::Global,
            pb::Action::Deny,
            vec![pb::Match {
                namespaces: vec![exact("legacy")],
                ..Default::default()
            }],
        ));
        assert!(
            !store
                .authorize(
                    "anywhere",
                    &[],
                    &from(Some(OTHER), "10.0.0.1", "10.0.9.1:80")
                )
                .allowed
        );
        assert!(store.remove("istio-system/mesh-deny-legacy"));
        assert!(
            store
                .authorize(
                    "anywhere",
                    &[],
                    &from(Some(OTHER), "10.0.0.1", "10.0.9.1:80")
                )
                .allowed
        );
        assert!(!store.remove("istio-system/mesh-deny-legacy"));
    }

    #[test]
    fn dry_run_is_reported_not_enforced() {
        let mut p = policy(
            "demo",
            "would-deny",
            pb::Scope::Namespace,
            pb::Action::Deny,
            vec![pb::Match::default()],
        );
        p.dry_run = true;
        let mut store = PolicyStore::new();
        store.insert(p);
        let d = store.authorize("demo", &[], &from(Some(CLIENT), "10.0.0.1", "10.0.1.1:80"));
        assert!(d.allowed);
        assert_eq!(
            d.dry_run_matches,
            vec![("demo/would-deny".to_string(), Action::Deny)]
        );
    }

    #[test]
    fn replacing_a_policy_moves_its_scope() {
        let mut store = PolicyStore::new();
        let deny_all = || vec![pb::Match::default()];
        store.insert(policy(
            "demo",
            "p",
            pb::Scope::Namespace,
            pb::Action::Deny,
            deny_all(),
        ));
        assert!(
            !store
                .authorize("demo", &[], &from(None, "10.0.0.1", "10.0.1.1:80"))
                .allowed
        );
        store.insert(policy(
            "demo",
            "p",
            pb::Scope::WorkloadSelector,
            pb::Action::Deny,
            deny_all(),
        ));
        assert_eq!(store.len(), 1);
        assert!(
            store
                .authorize("demo", &[], &from(None, "10.0.0.1", "10.0.1.1:80"))
                .allowed
        );
    }

    #[test]
    fn invalid_resources_name_policy_and_field() {
        let bad_ip = pb::Authorization {
            name: "bad".into(),
            namespace: "demo".into(),
            rules: vec![pb::Rule {
                clauses: vec![pb::Clause {
                    matches: vec![pb::Match {
                        source_ips: vec![
                            cidr("10.0.0.0", 8),
                            pb::Address {
                                address: vec![1, 2, 3],
                                length: 8,
                            },
                        ],
                        ..Default::default()
                    }],
                }],
            }],
            ..Default::default()
        };
        assert_eq!(
            Policy::from_proto(&bad_ip).unwrap_err().to_string(),
            "authorization policy demo/bad: rules[0].clauses[0].matches[0].source_ips[1]: address has 3 bytes, expected 4 or 16"
        );
        let bad_port = pb::Authorization {
            name: "port".into(),
            namespace: "demo".into(),
            rules: vec![pb::Rule {
                clauses: vec![pb::Clause {
                    matches: vec![pb::Match {
                        destination_ports: vec![70000],
                        ..Default::default()
                    }],
                }],
            }],
            ..Default::default()
        };
        assert_eq!(
            Policy::from_proto(&bad_port).unwrap_err().to_string(),
            "authorization policy demo/port: rules[0].clauses[0].matches[0].destination_ports[0]: port 70000 is outside 1-65535"
        );
        let bad_action = pb::Authorization {
            name: "act".into(),
            namespace: "demo".into(),
            action: 7,
            ..Default::default()
        };
        assert_eq!(
            Policy::from_proto(&bad_action).unwrap_err().to_string(),
            "authorization policy demo/act: action: unknown action value 7"
        );
        let bad_len = pb::Authorization {
            name: "len".into(),
            namespace: "demo".into(),
            rules: vec![pb::Rule {
                clauses: vec![pb::Clause {
                    matches: vec![pb::Match {
                        not_destination_ips: vec![cidr("10.0.0.0", 33)],
                        ..Default::default()
                    }],
                }],
            }],
            ..Default::default()
        };
        assert_eq!(
            Policy::from_proto(&bad_len).unwrap_err().to_string(),
            "authorization policy demo/len: rules[0].clauses[0].matches[0].not_destination_ips[0]: prefix length 33 is longer than 32"
        );
    }
}
