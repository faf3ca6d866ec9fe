//! The shared handle on the index: `istio.workload.Address` resources applied resource by
//! resource, read by every connection, with a generation that tells watchers something changed.
//!
//! A resource that fails validation is rejected with a reason naming it and its previous good
//! version keeps serving, while its valid neighbours in the same update still apply (as upstream
//! ztunnel does before it NACKs).

use std::collections::BTreeSet;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use ambit_proto::workload as pb;
use ambit_xds::Rejection;
use thiserror::Error;
use tokio::sync::watch;

use crate::index::{StateError, StateIndex};

/// Why one `Address` resource was refused.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum AddressError {
    /// The resource name is not the workload's uid.
    #[error("resource name does not match the workload uid {uid:?}")]
    WorkloadName {
        /// The uid the workload carries.
        uid: String,
    },
    /// The resource name is not the service's `namespace/hostname`.
    #[error("resource name does not match the service's namespace/hostname {key:?}")]
    ServiceName {
        /// The key the service's fields make.
        key: String,
    },
    /// The `Address` oneof is empty.
    #[error("Address holds neither a workload nor a service")]
    Empty,
    /// A field failed validation.
    #[error(transparent)]
    Invalid(#[from] StateError),
}

/// Workloads and services shared by a proxy's tasks. Cheap to clone: clones share one index.
#[derive(Clone)]
pub struct Addresses {
    inner: Arc<Inner>,
}

struct Inner {
    index: RwLock<StateIndex>,
    /// Bumped on every change, so watchers can react.
    generation: watch::Sender<u64>,
}

impl std::fmt::Debug for Addresses {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (workloads, services) = self.index().len();
        f.debug_struct("Addresses")
            .field("workloads", &workloads)
            .field("services", &services)
            .finish()
    }
}

impl Addresses {
    /// An empty index for a proxy on `local_node`.
    pub fn new(local_node: &str) -> Self {
        Self {
            inner: Arc::new(Inner {
                index: RwLock::new(StateIndex::new(local_node)),
                generation: watch::channel(0).0,
            }),
        }
    }

    /// Read access to workloads and services. Hold the guard briefly (never across an await).
    pub fn index(&self) -> RwLockReadGuard<'_, StateIndex> {
        // A panic while holding the lock leaves the index consistent (every mutation is a
        // single insert/remove), so a poisoned lock is still safe to read.
        self.inner
            .index
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn index_mut(&self) -> RwLockWriteGuard<'_, StateIndex> {
        self.inner
            .index
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A receiver that changes whenever the index does.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.generation.subscribe()
    }

    /// Applies `Address` upserts (by resource name) and removals (a workload uid or a service's
    /// `namespace/hostname`). Returns what was refused; the rest applied.
    pub fn apply(&self, upserts: &[(String, pb::Address)], removals: &[String]) -> Vec<Rejection> {
        let mut rejected = Vec::new();
        {
            let mut index = self.index_mut();
            for name in removals {
                index.remove(name);
            }
            for (name, address) in upserts {
                if let Err(e) = insert_address(&mut index, name, address) {
                    rejected.push(Rejection {
                        name: name.clone(),
                        reason: e.to_string(),
                    });
                }
            }
        }
        self.inner.generation.send_modify(|g| *g += 1);
        rejected
    }

    /// Replaces everything with a complete set: what is not in `addresses` is removed, refused
    /// resources keep their previous version.
    pub fn replace_all(&self, addresses: &[(String, pb::Address)]) -> Vec<Rejection> {
        let keep: BTreeSet<&str> = addresses.iter().map(|(n, _)| n.as_str()).collect();
        let stale: Vec<String> = {
            let index = self.index();
            index
                .workloads()
                .map(|w| w.uid.to_string())
                .chain(index.services().map(|s| s.key.to_string()))
                .filter(|n| !keep.contains(n.as_str()))
                .collect()
        };
        self.apply(addresses, &stale)
    }
}

/// Validates one `Address` resource named `name` and inserts (or replaces) it.
pub fn insert_address(
    index: &mut StateIndex,
    name: &str,
    address: &pb::Address,
) -> Result<(), AddressError> {
    match &address.r#type {
        Some(pb::address::Type::Workload(w)) => {
            if w.uid != name {
                return Err(AddressError::WorkloadName { uid: w.uid.clone() });
            }
            index.insert_workload(w)?;
        }
        Some(pb::address::Type::Service(s)) => {
            let key = format!("{}/{}", s.namespace, s.hostname);
            if key != name {
                return Err(AddressError::ServiceName { key });
            }
            index.insert_service(s)?;
        }
        None => return Err(AddressError::Empty),
    }
    Ok(())
}
