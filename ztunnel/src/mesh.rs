//! The one place configuration lands: the workload/service index (ambit-state's [`Addresses`])
//! and the authorization policies, fed by either the delta xDS client or the local config file,
//! read by every proxy.
//!
//! Updates are applied resource by resource: a resource that fails validation is rejected with a
//! reason naming it and the previous good version keeps serving, while its valid neighbours in the
//! same update still apply (as upstream ztunnel does before it NACKs).

use std::collections::BTreeSet;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use ambit_authz::{Policy, PolicyStore};
use ambit_proto::security as sec;
use ambit_proto::workload as pb;
use ambit_state::{Addresses, StateIndex};
use ambit_xds::Rejection;
use tokio::sync::watch;

/// Shared configuration state. Cheap to clone.
#[derive(Clone)]
pub struct MeshState {
    addresses: Addresses,
    inner: Arc<Inner>,
}

struct Inner {
    policies: RwLock<PolicyStore>,
    /// Bumped on every change of either half, so watchers (in-pod manager, admin) can react.
    generation: watch::Sender<u64>,
}

impl std::fmt::Debug for MeshState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (workloads, services) = self.index().len();
        f.debug_struct("MeshState")
            .field("workloads", &workloads)
            .field("services", &services)
            .field("policies", &self.policies().len())
            .finish()
    }
}

impl MeshState {
    /// Empty state for a ztunnel on `local_node`.
    pub fn new(local_node: &str) -> Self {
        Self {
            addresses: Addresses::new(local_node),
            inner: Arc::new(Inner {
                policies: RwLock::new(PolicyStore::new()),
                generation: watch::channel(0).0,
            }),
        }
    }

    /// The workload/service half, as the shared crate sees it. Change it through
    /// [`MeshState::apply_addresses`] so that [`MeshState::subscribe`] watchers see it.
    pub fn addresses(&self) -> &Addresses {
        &self.addresses
    }

    /// Read access to workloads and services. Hold the guard briefly (never across an await).
    pub fn index(&self) -> RwLockReadGuard<'_, StateIndex> {
        self.addresses.index()
    }

    /// Read access to the authorization policies. Hold the guard briefly.
    pub fn policies(&self) -> RwLockReadGuard<'_, PolicyStore> {
        // A panic while holding the lock leaves the store consistent (every mutation is a single
        // insert/remove), so a poisoned lock is still safe to read.
        self.inner
            .policies
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn policies_mut(&self) -> RwLockWriteGuard<'_, PolicyStore> {
        self.inner
            .policies
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A receiver that changes whenever the state does.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.generation.subscribe()
    }

    fn bump(&self) {
        self.inner.generation.send_modify(|g| *g += 1);
    }

    /// Applies `Address` upserts (by resource name) and removals. Returns what was refused.
    pub fn apply_addresses(
        &self,
        upserts: &[(String, pb::Address)],
        removals: &[String],
    ) -> Vec<Rejection> {
        let rejected = self.addresses.apply(upserts, removals);
        self.bump();
        rejected
    }

    /// Applies `Authorization` upserts (by resource name) and removals. Returns what was refused.
    pub fn apply_policies(
        &self,
        upserts: &[(String, sec::Authorization)],
        removals: &[String],
    ) -> Vec<Rejection> {
        let mut rejected = Vec::new();
        {
            let mut policies = self.policies_mut();
            for name in removals {
                policies.remove(name);
            }
            for (name, resource) in upserts {
                match Policy::from_proto(resource) {
                    Ok(policy) if policy.key() == *name => policies.insert(policy),
                    Ok(policy) => rejected.push(Rejection {
                        name: name.clone(),
                        reason: format!(
                            "resource name does not match the policy's namespace/name {:?}",
                            policy.key()
                        ),
                    }),
                    Err(e) => rejected.push(Rejection {
                        name: name.clone(),
                        reason: e.to_string(),
                    }),
                }
            }
        }
        self.bump();
        rejected
    }

    /// Replaces everything with a complete set (local file mode): resources not in the new set
    /// are removed, refused ones keep their previous version.
    pub fn replace_all(
        &self,
        addresses: &[(String, pb::Address)],
        policies: &[(String, sec::Authorization)],
    ) -> Vec<Rejection> {
        let keep_policies: BTreeSet<&str> = policies.iter().map(|(n, _)| n.as_str()).collect();
        let stale_policies: Vec<String> = self
            .policies()
            .iter()
            .map(|p| p.key())
            .filter(|n| !keep_policies.contains(n.as_str()))
            .collect();
        let mut rejected = self.addresses.replace_all(addresses);
        self.bump();
        rejected.extend(self.apply_policies(policies, &stale_policies));
        rejected
    }
}
