//! Policies as JSON in the shape upstream ztunnel's `/config_dump` uses: `name`, `namespace`,
//! `scope`, `action`, `rules` (rules → clauses → matches) and `dryRun`, with each match's
//! non-empty fields in camelCase and string conditions as `{"Exact": ...}`, `{"Prefix": ...}`,
//! `{"Suffix": ...}` or `{"Presence": []}`. The request fields only a waypoint evaluates
//! (`hosts`, `methods`, `paths`, `headers` and their `not` forms) and waypoint `targets` are
//! Ambit's own keys.

use serde_json::{Map, Value, json};

use crate::policy::{Action, Match, Policy, Scope, StringMatch};

fn string_match(m: &StringMatch) -> Value {
    match m {
        StringMatch::Exact(s) => json!({"Exact": s}),
        StringMatch::Prefix(s) => json!({"Prefix": s}),
        StringMatch::Suffix(s) => json!({"Suffix": s}),
        StringMatch::Presence => json!({"Presence": []}),
    }
}

fn put(out: &mut Map<String, Value>, key: &str, values: Vec<Value>) {
    if !values.is_empty() {
        out.insert(key.to_string(), Value::Array(values));
    }
}

fn strings(ms: &[StringMatch]) -> Vec<Value> {
    ms.iter().map(string_match).collect()
}

fn accounts(pairs: &[(String, String)]) -> Vec<Value> {
    pairs
        .iter()
        .map(|(ns, sa)| json!({"namespace": ns, "serviceAccount": sa}))
        .collect()
}

fn display<T: ToString>(items: &[T]) -> Vec<Value> {
    items.iter().map(|i| Value::String(i.to_string())).collect()
}

fn ports(ps: &[u16]) -> Vec<Value> {
    ps.iter().map(|p| Value::from(*p)).collect()
}

fn match_json(m: &Match) -> Value {
    let mut out = Map::new();
    put(&mut out, "namespaces", strings(&m.namespaces));
    put(&mut out, "notNamespaces", strings(&m.not_namespaces));
    put(&mut out, "serviceAccounts", accounts(&m.service_accounts));
    put(
        &mut out,
        "notServiceAccounts",
        accounts(&m.not_service_accounts),
    );
    put(&mut out, "principals", strings(&m.principals));
    put(&mut out, "notPrincipals", strings(&m.not_principals));
    put(&mut out, "sourceIps", display(&m.source_ips));
    put(&mut out, "notSourceIps", display(&m.not_source_ips));
    put(&mut out, "destinationIps", display(&m.destination_ips));
    put(
        &mut out,
        "notDestinationIps",
        display(&m.not_destination_ips),
    );
    put(&mut out, "destinationPorts", ports(&m.destination_ports));
    put(
        &mut out,
        "notDestinationPorts",
        ports(&m.not_destination_ports),
    );
    put(&mut out, "hosts", strings(&m.hosts));
    put(&mut out, "notHosts", strings(&m.not_hosts));
    put(&mut out, "methods", strings(&m.methods));
    put(&mut out, "notMethods", strings(&m.not_methods));
    put(&mut out, "paths", strings(&m.paths));
    put(&mut out, "notPaths", strings(&m.not_paths));
    let headers: Vec<Value> = m
        .headers
        .iter()
        .map(|h| {
            json!({
                "name": h.name,
                "values": strings(&h.values),
                "notValues": strings(&h.not_values),
            })
        })
        .collect();
    put(&mut out, "headers", headers);
    Value::Object(out)
}

/// `Global`, `Namespace`, `WorkloadSelector` (upstream's names) or `Targets` (waypoint policies).
pub fn scope(s: Scope) -> &'static str {
    match s {
        Scope::Global => "Global",
        Scope::Namespace => "Namespace",
        Scope::WorkloadSelector => "WorkloadSelector",
        Scope::Targets => "Targets",
    }
}

/// `Allow`, `Deny` (upstream's names) or `Audit`.
pub fn action(a: Action) -> &'static str {
    match a {
        Action::Allow => "Allow",
        Action::Deny => "Deny",
        Action::Audit => "Audit",
    }
}

/// Policies in the dump's order (by `namespace/name`), each as [`policy`] shows it.
pub fn policies<'a>(policies: impl IntoIterator<Item = &'a Policy>) -> Vec<Value> {
    let mut policies: Vec<&Policy> = policies.into_iter().collect();
    policies.sort_by_key(|p| p.key());
    policies.into_iter().map(policy).collect()
}

/// One policy.
pub fn policy(p: &Policy) -> Value {
    let rules: Vec<Value> = p
        .rules
        .iter()
        .map(|rule| {
            Value::Array(
                rule.clauses
                    .iter()
                    .map(|clause| Value::Array(clause.matches.iter().map(match_json).collect()))
                    .collect(),
            )
        })
        .collect();
    let mut out = json!({
        "name": p.name,
        "namespace": p.namespace,
        "scope": scope(p.scope),
        "action": action(p.action),
        "rules": rules,
        "dryRun": p.dry_run,
    });
    if !p.targets.is_empty() {
        out["targets"] = Value::Array(display(&p.targets));
    }
    out
}
