//! The policies held, indexed by where they apply, and the verdict over a set of policies.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use crate::context::Subject;
use crate::policy::{Action, Policy, Scope, Target};

/// One policy that matched, and which of its rules did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyMatch {
    /// `namespace/name` of the policy.
    pub policy: String,
    /// Its action.
    pub action: Action,
    /// Index of the first matching rule.
    pub rule: usize,
}

/// The verdict on one connection or request, with enough detail for an access log, a metric or
/// an explain command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// Whether the traffic may proceed.
    pub allowed: bool,
    /// The policy and rule that decided: the matching DENY or ALLOW. `None` when no ALLOW policy
    /// applied (allowed) or none of them matched (denied).
    pub decided_by: Option<PolicyMatch>,
    /// A sentence saying why.
    pub reason: String,
    /// Enforced AUDIT policies that matched (they never change the verdict).
    pub audited: Vec<PolicyMatch>,
    /// Dry-run policies that matched, of any action: what they would have done.
    pub dry_run: Vec<PolicyMatch>,
}

impl Decision {
    /// `namespace/name` of the deciding policy, if one decided.
    pub fn policy(&self) -> Option<&str> {
        self.decided_by.as_ref().map(|m| m.policy.as_str())
    }
}

/// Decides over `policies`, in the order given:
///
/// 1. any matching DENY policy denies;
/// 2. with no ALLOW policy the traffic is allowed;
/// 3. a matching ALLOW policy allows;
/// 4. otherwise it is denied.
///
/// AUDIT policies and dry-run policies are evaluated and reported in the [`Decision`], never
/// enforced.
pub fn evaluate<'s, I>(policies: I, subject: impl Into<Subject<'s>>) -> Decision
where
    I: IntoIterator,
    I::Item: AsRef<Policy>,
{
    let facts = subject.into().facts();
    let mut deny: Option<PolicyMatch> = None;
    let mut allow: Option<PolicyMatch> = None;
    let mut allow_keys: Vec<String> = Vec::new();
    let mut audited = Vec::new();
    let mut dry_run = Vec::new();
    let found = |p: &Policy, rule: usize| PolicyMatch {
        policy: p.key(),
        action: p.action,
        rule,
    };
    for policy in policies {
        let p = policy.as_ref();
        if p.dry_run {
            if let Some(rule) = p.matching_rule_in(&facts) {
                dry_run.push(found(p, rule));
            }
            continue;
        }
        match p.action {
            Action::Audit => {
                if let Some(rule) = p.matching_rule_in(&facts) {
                    audited.push(found(p, rule));
                }
            }
            Action::Deny if deny.is_none() => {
                deny = p.matching_rule_in(&facts).map(|rule| found(p, rule));
            }
            Action::Deny => {}
            Action::Allow => {
                allow_keys.push(p.key());
                if allow.is_none() && deny.is_none() {
                    allow = p.matching_rule_in(&facts).map(|rule| found(p, rule));
                }
            }
        }
    }
    let (allowed, reason, decided_by) = if let Some(deny) = deny {
        (
            false,
            format!("denied by DENY policy {}", deny.policy),
            Some(deny),
        )
    } else if allow_keys.is_empty() {
        (true, "allowed: no ALLOW policy applies".to_string(), None)
    } else if let Some(allow) = allow {
        (
            true,
            format!("allowed by ALLOW policy {}", allow.policy),
            Some(allow),
        )
    } else {
        (
            false,
            format!(
                "denied: no ALLOW policy matched (applicable: {})",
                allow_keys.join(", ")
            ),
            None,
        )
    };
    Decision {
        allowed,
        decided_by,
        reason,
        audited,
        dry_run,
    }
}

/// All policies, indexed by where they apply.
#[derive(Clone, Debug, Default)]
pub struct PolicyStore {
    by_key: BTreeMap<String, Arc<Policy>>,
    /// Namespace-scoped policy keys per namespace.
    by_namespace: BTreeMap<String, BTreeSet<String>>,
    /// Mesh-wide policy keys.
    global: BTreeSet<String>,
    /// Waypoint policy keys per target.
    by_target: BTreeMap<Target, BTreeSet<String>>,
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
            Scope::Targets => {
                for target in &policy.targets {
                    self.by_target
                        .entry(target.clone())
                        .or_default()
                        .insert(key.clone());
                }
            }
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
            Scope::Targets => {
                for target in &old.targets {
                    if let Some(set) = self.by_target.get_mut(target) {
                        set.remove(key);
                        if set.is_empty() {
                            self.by_target.remove(target);
                        }
                    }
                }
            }
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
    /// `selected` (the workload's `authorization_policies`), sorted by key. Unknown selected keys
    /// are skipped.
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
        self.lookup(keys)
    }

    /// The waypoint policies attached to any of `targets` (the waypoint's Gateway, its
    /// GatewayClass, the Service addressed), sorted by key.
    pub fn applicable_to_targets(&self, targets: &[Target]) -> Vec<&Arc<Policy>> {
        let keys: BTreeSet<&str> = targets
            .iter()
            .filter_map(|t| self.by_target.get(t))
            .flatten()
            .map(String::as_str)
            .collect();
        self.lookup(keys)
    }

    fn lookup<'a>(&'a self, keys: BTreeSet<&str>) -> Vec<&'a Arc<Policy>> {
        keys.into_iter()
            .filter_map(|k| self.by_key.get(k))
            .collect()
    }

    /// Decides traffic to a workload in `namespace` with selector policies `selected` (ztunnel).
    pub fn authorize<'s>(
        &self,
        namespace: &str,
        selected: &[String],
        subject: impl Into<Subject<'s>>,
    ) -> Decision {
        evaluate(self.applicable(namespace, selected), subject)
    }

    /// Decides traffic through a waypoint under the policies attached to `targets`.
    pub fn authorize_targets<'s>(
        &self,
        targets: &[Target],
        subject: impl Into<Subject<'s>>,
    ) -> Decision {
        evaluate(self.applicable_to_targets(targets), subject)
    }
}
