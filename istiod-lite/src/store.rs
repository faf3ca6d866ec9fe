//! The translated resources every proxy is served from, with a content version per resource
//! (a hash of its encoding, so versions survive restarts and unchanged resources are never
//! re-sent to a client that reports holding them), and, per generation and type, every resource
//! encoded and compressed once for all the clients that subscribe holding nothing (a cluster's
//! ztunnels all starting at once would otherwise each cost one encoding and one gzip of the
//! whole set).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::io::Write as _;
use std::sync::{Arc, OnceLock, RwLock};

use ambit_mesh::l7::WaypointScope;
use ambit_mesh::translate::{Cluster, Resources};
use ambit_proto::discovery::{DeltaDiscoveryResponse, Resource};
use ambit_proto::{
    ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL, DESTINATION_POLICY_TYPE_URL, L7_POLICY_TYPE_URL,
    ROUTE_TYPE_URL,
};
use bytes::Bytes;
use prost::Message;
use tokio::sync::{OnceCell, watch};

/// Why a type's resources could not be encoded for sending.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The snapshot has no such resource type.
    #[error("no resource type {type_url} in the store")]
    UnknownType {
        /// The type URL asked for.
        type_url: String,
    },
    /// Compressing the encoded set failed.
    #[error("compressing the {type_url} resources of generation {generation}: {source}")]
    Compress {
        /// The type URL.
        type_url: &'static str,
        /// The store generation.
        generation: u64,
        /// The compressor's error.
        source: std::io::Error,
    },
    /// The blocking task encoding the set did not finish (panicked or cancelled at shutdown).
    #[error(
        "encoding the {type_url} resources of generation {generation} did not finish: {source}"
    )]
    Task {
        /// The type URL.
        type_url: &'static str,
        /// The store generation.
        generation: u64,
        /// Why the task ended.
        source: tokio::task::JoinError,
    },
}

/// Every resource of one type as the `resources` field of a `DeltaDiscoveryResponse`, encoded
/// once per generation and shared by every stream that sends the whole set: a response is the
/// stream's own fields (type URL, nonce) encoded in front of these bytes, since protobuf merges
/// the fields of concatenated encodings.
#[derive(Debug)]
pub struct EncodedSet {
    /// How many resources.
    pub resources: usize,
    /// The encoding.
    pub plain: Bytes,
    /// `plain` compressed as a raw deflate stream ending with its final block, to be put
    /// after a client's own non-final blocks inside one gzip member.
    pub deflated: Bytes,
    /// CRC-32 of `plain` (combined into the gzip trailer with the CRC of what precedes it).
    pub crc: flate2::Crc,
}

impl EncodedSet {
    /// Encodes and compresses `entries` (CPU-bound: tens of milliseconds per 10,000 workloads).
    pub fn encode(entries: &BTreeMap<String, Entry>) -> std::io::Result<Self> {
        let message = DeltaDiscoveryResponse {
            resources: entries
                .iter()
                .map(|(name, entry)| Resource {
                    name: name.clone(),
                    version: entry.version.clone(),
                    resource: Some(entry.any.clone()),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        let plain = message.encode_to_vec();
        drop(message);
        let mut crc = flate2::Crc::new();
        crc.update(&plain);
        // The level tonic uses for gzip; paid once per generation instead of once per client.
        let mut deflate = flate2::write::DeflateEncoder::new(
            Vec::with_capacity(plain.len() / 4),
            flate2::Compression::new(6),
        );
        deflate.write_all(&plain)?;
        let deflated = deflate.finish()?;
        Ok(Self {
            resources: entries.len(),
            plain: plain.into(),
            deflated: deflated.into(),
            crc,
        })
    }
}

/// One type's [`EncodedSet`] for a generation, built on first use.
type SetCell = Arc<OnceCell<Arc<EncodedSet>>>;

/// One resource ready to send.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    /// Content version.
    pub version: String,
    /// The resource packed as `Any`.
    pub any: prost_types::Any,
}

/// A consistent view: resources by type URL, then name; plus the objects they came from.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// type URL → name → entry (shared: a stream remembers what its client holds by keeping
    /// the map it was last brought up to).
    pub types: BTreeMap<&'static str, Arc<BTreeMap<String, Entry>>>,
    /// The cluster objects (the CA authorizes against pods' nodes).
    pub cluster: Arc<Cluster>,
    /// Bumped on every change.
    pub generation: u64,
    /// Names added, changed or removed since the previous generation, by type URL: a stream
    /// that saw the previous generation only needs to look at these.
    pub changed: BTreeMap<&'static str, Vec<String>>,
    /// What each usable waypoint (`<namespace>/<name>` of its Gateway) is served of
    /// [`ROUTE_TYPE_URL`], [`L7_POLICY_TYPE_URL`] and [`DESTINATION_POLICY_TYPE_URL`].
    pub waypoint_scopes: Arc<BTreeMap<String, WaypointScope>>,
    /// node → (namespace, service account) of the pods on it; built on first use by the CA.
    node_accounts: OnceLock<HashMap<String, HashSet<(String, String)>>>,
    /// type URL → the whole set encoded, built on first use (carried over to the next
    /// generation when the type did not change).
    encoded: BTreeMap<&'static str, SetCell>,
}

/// The resource types only waypoints are served, each only the names of its own scope.
pub const WAYPOINT_TYPES: [&str; 3] = [
    ROUTE_TYPE_URL,
    L7_POLICY_TYPE_URL,
    DESTINATION_POLICY_TYPE_URL,
];

impl Snapshot {
    /// The names of `type_url` the waypoint `gateway` (`<namespace>/<name>`) may see: `None` for
    /// types every client sees, an empty set for a waypoint type and a client that is not a
    /// waypoint (or a waypoint without a scope).
    pub fn visible(&self, type_url: &str, gateway: Option<&str>) -> Option<&BTreeSet<String>> {
        static NOTHING: BTreeSet<String> = BTreeSet::new();
        if !WAYPOINT_TYPES.contains(&type_url) {
            return None;
        }
        let scope = gateway.and_then(|g| self.waypoint_scopes.get(g));
        Some(match scope {
            Some(scope) if type_url == ROUTE_TYPE_URL => &scope.routes,
            Some(scope) if type_url == DESTINATION_POLICY_TYPE_URL => &scope.destination_policies,
            Some(scope) => &scope.policies,
            None => &NOTHING,
        })
    }

    /// Every resource of `type_url` encoded and compressed, built once per generation on a
    /// blocking thread by the first caller while the others wait for it.
    pub async fn encoded(self: &Arc<Self>, type_url: &str) -> Result<Arc<EncodedSet>, StoreError> {
        let (type_url, cell) =
            self.encoded
                .get_key_value(type_url)
                .ok_or_else(|| StoreError::UnknownType {
                    type_url: type_url.to_string(),
                })?;
        let type_url: &'static str = type_url;
        let generation = self.generation;
        let cell = cell.clone();
        cell.get_or_try_init(|| async {
            let snapshot = self.clone();
            let built = tokio::task::spawn_blocking(move || {
                let empty = BTreeMap::new();
                let entries = snapshot.types.get(type_url).map_or(&empty, |t| &**t);
                EncodedSet::encode(entries)
            })
            .await
            .map_err(|source| StoreError::Task {
                type_url,
                generation,
                source,
            })?;
            built.map(Arc::new).map_err(|source| StoreError::Compress {
                type_url,
                generation,
                source,
            })
        })
        .await
        .cloned()
    }

    /// Whether a pod of `namespace`'s service account `service_account` is scheduled on `node`
    /// (an index built once per snapshot, so the CA does not scan every pod per request).
    pub fn has_pod_on_node(&self, node: &str, namespace: &str, service_account: &str) -> bool {
        let index = self.node_accounts.get_or_init(|| {
            let mut index: HashMap<String, HashSet<(String, String)>> = HashMap::new();
            for pod in self.cluster.pods.values() {
                if pod.spec.node_name.is_empty() {
                    continue;
                }
                index
                    .entry(pod.spec.node_name.clone())
                    .or_default()
                    .insert((
                        pod.metadata.namespace.clone(),
                        pod.service_account().to_string(),
                    ));
            }
            index
        });
        index.get(node).is_some_and(|accounts| {
            accounts.contains(&(namespace.to_string(), service_account.to_string()))
        })
    }
}

fn changed_names(old: &BTreeMap<String, Entry>, new: &BTreeMap<String, Entry>) -> Vec<String> {
    let mut names: Vec<String> = new
        .iter()
        .filter(|(name, entry)| old.get(*name).map(|e| &e.version) != Some(&entry.version))
        .map(|(name, _)| name.clone())
        .collect();
    names.extend(old.keys().filter(|name| !new.contains_key(*name)).cloned());
    names
}

/// The first 64 bits of the encoding's SHA-256, in hex. A fixed algorithm (unlike std's
/// `DefaultHasher`, which may change between Rust releases), so a client reconnecting to an
/// upgraded istiod-lite is still sent nothing it holds.
fn version_of(bytes: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest.as_ref()[..8]);
    format!("{:016x}", u64::from_be_bytes(first))
}

fn entries<M: prost::Name>(resources: &BTreeMap<String, M>) -> BTreeMap<String, Entry> {
    resources
        .iter()
        .map(|(name, message)| {
            let any = ambit_proto::pack_any(message);
            (
                name.clone(),
                Entry {
                    version: version_of(&any.value),
                    any,
                },
            )
        })
        .collect()
}

/// The store. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    current: Arc<RwLock<Arc<Snapshot>>>,
    changes: watch::Sender<u64>,
}

impl Default for Store {
    fn default() -> Self {
        Self::new()
    }
}

impl Store {
    /// An empty store (every type present, no resources).
    pub fn new() -> Self {
        let mut snapshot = Snapshot::default();
        for type_url in [
            ADDRESS_TYPE_URL,
            AUTHORIZATION_TYPE_URL,
            ROUTE_TYPE_URL,
            L7_POLICY_TYPE_URL,
            DESTINATION_POLICY_TYPE_URL,
        ] {
            snapshot.types.insert(type_url, Arc::default());
            snapshot.encoded.insert(type_url, SetCell::default());
        }
        Self {
            current: Arc::new(RwLock::new(Arc::new(snapshot))),
            changes: watch::channel(0).0,
        }
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Replaces everything; returns whether any resource changed. Notifies subscribers.
    pub fn replace(&self, cluster: Cluster, resources: &Resources) -> bool {
        let mut types: BTreeMap<&'static str, Arc<BTreeMap<String, Entry>>> = BTreeMap::new();
        types.insert(ADDRESS_TYPE_URL, Arc::new(entries(&resources.addresses)));
        types.insert(
            AUTHORIZATION_TYPE_URL,
            Arc::new(entries(&resources.authorizations)),
        );
        types.insert(ROUTE_TYPE_URL, Arc::new(entries(&resources.routes)));
        types.insert(
            L7_POLICY_TYPE_URL,
            Arc::new(entries(&resources.l7_policies)),
        );
        types.insert(
            DESTINATION_POLICY_TYPE_URL,
            Arc::new(entries(&resources.destination_policies)),
        );
        let changed = {
            let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
            let empty = BTreeMap::new();
            let delta: BTreeMap<&'static str, Vec<String>> = types
                .iter()
                .map(|(t, new)| {
                    (
                        *t,
                        changed_names(current.types.get(t).map_or(&empty, |m| &**m), new),
                    )
                })
                .collect();
            // A waypoint losing or gaining a route is a change even when no resource changed.
            let scopes_changed = *current.waypoint_scopes != resources.waypoint_scopes;
            let changed = scopes_changed || delta.values().any(|names| !names.is_empty());
            // A type that did not change keeps its encoded set (and the work already done).
            let encoded = types
                .keys()
                .map(|t| {
                    let unchanged = delta.get(t).is_none_or(Vec::is_empty);
                    let cell = match current.encoded.get(t) {
                        Some(cell) if unchanged => cell.clone(),
                        _ => SetCell::default(),
                    };
                    (*t, cell)
                })
                .collect();
            *current = Arc::new(Snapshot {
                types,
                waypoint_scopes: if scopes_changed {
                    Arc::new(resources.waypoint_scopes.clone())
                } else {
                    current.waypoint_scopes.clone()
                },
                cluster: Arc::new(cluster),
                generation: current.generation + u64::from(changed),
                changed: if changed {
                    delta
                } else {
                    current.changed.clone()
                },
                node_accounts: OnceLock::new(),
                encoded,
            });
            changed
        };
        if changed {
            self.changes.send_modify(|g| *g += 1);
        }
        changed
    }

    /// Changes whenever resources do.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Encoded size of every resource of `type_url` (for metrics and benchmarks).
    pub fn bytes(&self, type_url: &str) -> usize {
        self.snapshot()
            .types
            .get(type_url)
            .map(|t| t.values().map(|e| e.any.encoded_len()).sum())
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_a_fixed_function_of_the_encoding() {
        // Pinned: a change here would make every reconnecting client receive everything again
        // after an upgrade.
        assert_eq!(version_of(b""), "e3b0c44298fc1c14");
        assert_eq!(version_of(b"abc"), "ba7816bf8f01cfea");
    }

    #[test]
    fn pods_are_indexed_by_node_namespace_and_service_account() {
        let (objects, errors) = ambit_mesh::parse_documents(
            r#"
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: demo}
spec: {nodeName: node-1, serviceAccountName: web}
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: demo}
spec: {nodeName: node-2}
---
apiVersion: v1
kind: Pod
metadata: {name: pending, namespace: demo}
spec: {serviceAccountName: queued}
"#,
            "pods.yaml",
        );
        assert!(errors.is_empty(), "{errors:?}");
        let store = Store::new();
        let cluster = Cluster::from_objects(objects);
        store.replace(cluster, &Resources::default());
        let snapshot = store.snapshot();
        assert!(snapshot.has_pod_on_node("node-1", "demo", "web"));
        assert!(!snapshot.has_pod_on_node("node-2", "demo", "web"));
        assert!(snapshot.has_pod_on_node("node-2", "demo", "default"));
        assert!(!snapshot.has_pod_on_node("node-1", "other", "web"));
        assert!(
            !snapshot.has_pod_on_node("", "demo", "queued"),
            "unscheduled"
        );
    }
}
