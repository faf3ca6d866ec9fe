//! Config sources. The directory source reads the same objects Kubernetes would hold (multi-
//! document YAML files), re-reads them when they change, translates, and updates the store. The
//! Kubernetes source watches the API server (every kind in [`watched_kinds`]) and keeps a [`Cluster`]
//! current from the watch events, translating at most once per debounce interval. Either way an
//! invalid object is logged with its source, object and field, counted, and skipped (Kubernetes:
//! its last good version is kept).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use ambit_core::metrics::Registry;
use ambit_core::readiness::BlockReady;
use ambit_kube::watch::{CONTROL_PLANE_KINDS, KindSpec, Update, Watch};
use ambit_mesh::translate::{Cluster, MeshSettings, translate};
use ambit_mesh::{ObjectError, ObjectKey};
use futures::StreamExt;

use crate::store::Store;

pub use ambit_kube::watch::{GRPC_ROUTE, VIRTUAL_SERVICE};

/// Every kind the Kubernetes source watches: the shared control-plane kinds (GRPCRoute and
/// VirtualService among them).
pub fn watched_kinds() -> Vec<KindSpec> {
    CONTROL_PLANE_KINDS.to_vec()
}

/// Counter of objects refused by validation, labelled by `kind`.
const REJECTED: &str = "ambit_config_rejected_objects_total";
/// Gauge of objects held from the config source.
const OBJECTS: &str = "ambit_config_objects";
/// Gauge of warnings of the last translation (objects honoured partly or not at all).
const WARNINGS: &str = "ambit_config_warnings";

fn describe_metrics(metrics: &Registry) {
    metrics.describe_counter(
        REJECTED,
        "Objects refused because they failed validation, by kind",
    );
    metrics.describe_gauge(OBJECTS, "Objects read from the config source");
    metrics.describe_gauge(
        WARNINGS,
        "Warnings of the last translation: objects (or parts of them, such as a route's parent or backend) that are not honoured; each is logged naming the object and field",
    );
}

/// The kind an error is about (`Pod` from `Pod demo/web`), or `unknown` when the object could
/// not even be identified.
fn error_kind(error: &ObjectError) -> &str {
    match error.object.split_once(' ') {
        Some((kind, _)) if !kind.is_empty() && kind != "object" => kind,
        _ => "unknown",
    }
}

/// The object an error is about, when the error names one (`Kind namespace/name` or
/// `Kind name`, as [`ObjectKey`]'s display writes it).
fn error_key(error: &ObjectError) -> Option<ObjectKey> {
    let (kind, rest) = error.object.split_once(' ')?;
    let (namespace, name) = rest.split_once('/').unwrap_or(("", rest));
    if kind.is_empty() || name.is_empty() || name.contains(' ') {
        return None;
    }
    Some(ObjectKey {
        kind: kind.to_string(),
        namespace: namespace.to_string(),
        name: name.to_string(),
    })
}

/// Logs and counts rejected objects (one increment per error, labelled by its kind).
fn report_rejected<'a>(metrics: &Registry, errors: impl IntoIterator<Item = &'a ObjectError>) {
    for error in errors {
        tracing::warn!(%error, "object rejected");
        metrics
            .counter(REJECTED, &[("kind", error_kind(error).to_string())])
            .increment(1);
    }
}

/// Translates `cluster`, replaces the store's resources with the result (logging partly
/// enforced objects and the outcome) and sets the objects gauge. Shared by both sources.
fn publish(
    cluster: Cluster,
    objects: usize,
    settings: &MeshSettings,
    store: &Store,
    metrics: &Registry,
) {
    metrics.gauge(OBJECTS, &()).set(objects as f64);
    let resources = translate(&cluster, settings);
    for warning in &resources.warnings {
        tracing::warn!(%warning, kind = ?warning.kind, "object only partly enforced");
    }
    metrics
        .gauge(WARNINGS, &())
        .set(resources.warnings.len() as f64);
    let changed = store.replace(cluster, &resources);
    tracing::info!(
        objects,
        addresses = resources.addresses.len(),
        policies = resources.authorizations.len(),
        routes = resources.routes.len(),
        waypoint_policies = resources.l7_policies.len(),
        destination_policies = resources.destination_policies.len(),
        changed,
        "configuration translated"
    );
}

/// Reads `dir` now and whenever its contents change (checked every `every`).
pub async fn watch_directory(
    dir: PathBuf,
    settings: MeshSettings,
    store: Store,
    metrics: Registry,
    every: Duration,
    ready: Option<BlockReady>,
) {
    describe_metrics(&metrics);
    let mut ready = ready;
    let mut last_errors: Vec<String> = Vec::new();
    let mut last_digest: Option<u64> = None;
    loop {
        let digest = directory_digest(&dir);
        if last_digest.as_ref() != Some(&digest) {
            last_digest = Some(digest);
            match ambit_mesh::read_dir(&dir) {
                Ok((objects, errors)) => {
                    let messages: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
                    if messages != last_errors {
                        report_rejected(&metrics, &errors);
                        last_errors = messages;
                    }
                    let count = objects.len();
                    publish(
                        Cluster::from_objects(objects),
                        count,
                        &settings,
                        &store,
                        &metrics,
                    );
                    if let Some(guard) = ready.take() {
                        guard.ready();
                    }
                }
                Err(e) => {
                    tracing::error!(dir = %dir.display(), error = %e, "cannot read the config directory")
                }
            }
        }
        tokio::time::sleep(every).await;
    }
}

/// A hash of every file's name and contents.
fn directory_digest(dir: &std::path::Path) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .collect();
    paths.sort();
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    for path in paths {
        path.hash(&mut hasher);
        std::fs::read(&path).unwrap_or_default().hash(&mut hasher);
    }
    hasher.finish()
}

/// The cluster as the watch events describe it, independent of which kinds [`Cluster`] holds:
/// objects go through [`Cluster::insert`] and [`Cluster::remove`], and the keys held of each
/// kind are tracked here so that a [`Update::Reset`] can remove what is gone.
#[derive(Debug, Default)]
struct KubeView {
    cluster: Cluster,
    /// kind → keys of the objects held (every accepted object, also of kinds `Cluster` ignores).
    keys: BTreeMap<String, BTreeSet<ObjectKey>>,
    /// Objects currently refused → the error reported (counted again only when it changes).
    rejected: BTreeMap<String, String>,
    /// Kinds whose first complete list arrived.
    synced: BTreeSet<String>,
}

impl KubeView {
    fn objects(&self) -> usize {
        self.keys.values().map(BTreeSet::len).sum()
    }

    /// Records a refusal; true if it is new (or says something new) and must be reported.
    fn note_rejected(&mut self, error: &ObjectError) -> bool {
        let message = error.to_string();
        self.rejected.insert(error.object.clone(), message.clone()) != Some(message)
    }

    /// Applies one update; true if the cluster (or what is held) may have changed.
    fn apply(&mut self, update: Update, metrics: &Registry) -> bool {
        match update {
            Update::Reset {
                kind,
                objects,
                rejected,
            } => {
                self.synced.insert(kind.to_string());
                // A refused object keeps its last good version, as with `Rejected`.
                let keep: BTreeSet<ObjectKey> = rejected.iter().filter_map(error_key).collect();
                let listed: BTreeSet<ObjectKey> = objects.iter().map(|o| o.key()).collect();
                let held = self.keys.remove(kind).unwrap_or_default();
                let mut now = BTreeSet::new();
                for key in held {
                    if listed.contains(&key) || keep.contains(&key) {
                        now.insert(key);
                    } else {
                        tracing::debug!(object = %key, "gone after a relist");
                        self.cluster.remove(&key);
                    }
                }
                for object in objects {
                    now.insert(object.key());
                    self.cluster.insert(object);
                }
                self.keys.insert(kind.to_string(), now);
                // Refusals of this kind that are not in the list any more are resolved.
                let still: BTreeSet<&str> = rejected.iter().map(|e| e.object.as_str()).collect();
                self.rejected.retain(|object, _| {
                    error_key_of(object).is_none_or(|k| k.kind != kind)
                        || still.contains(object.as_str())
                });
                let fresh: Vec<&ObjectError> =
                    rejected.iter().filter(|e| self.note_rejected(e)).collect();
                report_rejected(metrics, fresh);
                true
            }
            Update::Applied(object) => {
                let key = object.key();
                self.rejected.remove(&key.to_string());
                self.keys.entry(key.kind.clone()).or_default().insert(key);
                self.cluster.insert(*object);
                true
            }
            Update::Deleted(key) => {
                self.rejected.remove(&key.to_string());
                let held = self
                    .keys
                    .get_mut(&key.kind)
                    .is_some_and(|keys| keys.remove(&key));
                self.cluster.remove(&key);
                held
            }
            Update::Rejected(error) => {
                if self.note_rejected(&error) {
                    report_rejected(metrics, [&error]);
                }
                false
            }
        }
    }
}

fn error_key_of(object: &str) -> Option<ObjectKey> {
    error_key(&ObjectError {
        source_name: String::new(),
        document: 0,
        object: object.to_string(),
        field: String::new(),
        reason: String::new(),
    })
}

/// Watches every kind istiod-lite reads ([`watched_kinds`]) through `client` and keeps `store`
/// translated from them.
///
/// Nothing is translated until every kind's first list arrived (a kind whose CRD is not installed
/// counts as an empty list); then once, `ready` is marked, and afterwards at most once per
/// `debounce`: a burst of changes is translated together once the interval since the first of
/// them has passed. A relist replaces the objects held of that kind. A changed object that fails
/// validation keeps its last good version; the error (naming object and field) is logged and
/// counted in `ambit_config_rejected_objects_total{kind}`.
///
/// Runs until the watch stream ends (it does not on its own).
pub async fn watch_kubernetes(
    client: kube::Client,
    settings: MeshSettings,
    store: Store,
    metrics: Registry,
    debounce: Duration,
    ready: Option<BlockReady>,
) {
    describe_metrics(&metrics);
    let watched = watched_kinds();
    let kinds: BTreeSet<&str> = watched.iter().map(|k| k.kind).collect();
    let updates = ambit_kube::watch::watch(client, watched.into_iter().map(Watch::all).collect());
    let mut updates = std::pin::pin!(updates);
    let mut ready = ready;
    let mut view = KubeView::default();
    let mut synced = false;
    // When the pending changes are translated (None: nothing pending).
    let mut due: Option<tokio::time::Instant> = None;
    loop {
        let flush = async {
            match due {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            update = updates.next() => {
                let Some(update) = update else {
                    tracing::error!("the Kubernetes watch ended; configuration no longer updated");
                    return;
                };
                if view.apply(update, &metrics) {
                    if !synced {
                        synced = kinds.iter().all(|k| view.synced.contains(*k));
                        if synced {
                            tracing::info!(
                                objects = view.objects(),
                                "every kind listed from the API server"
                            );
                            // The initial state at once: nothing was served before it.
                            due = Some(tokio::time::Instant::now());
                        }
                    } else if due.is_none() {
                        due = Some(tokio::time::Instant::now() + debounce);
                    }
                }
            }
            () = flush => {
                due = None;
                publish(view.cluster.clone(), view.objects(), &settings, &store, &metrics);
                if let Some(guard) = ready.take() {
                    guard.ready();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(object: &str) -> ObjectError {
        ObjectError {
            source_name: "Kubernetes".into(),
            document: 0,
            object: object.into(),
            field: "status.podIP".into(),
            reason: "bad".into(),
        }
    }

    #[test]
    fn errors_name_their_kind_and_object() {
        assert_eq!(error_kind(&error("Pod demo/web")), "Pod");
        assert_eq!(error_kind(&error("Namespace demo")), "Namespace");
        assert_eq!(error_kind(&error("?")), "unknown");
        assert_eq!(error_kind(&error("object without kind")), "unknown");
        assert_eq!(
            error_key(&error("Pod demo/web")),
            Some(ObjectKey {
                kind: "Pod".into(),
                namespace: "demo".into(),
                name: "web".into()
            })
        );
        assert_eq!(
            error_key(&error("Namespace demo")).map(|k| k.namespace),
            Some(String::new())
        );
        assert_eq!(error_key(&error("?")), None);
        assert_eq!(error_key(&error("object without kind")), None);
    }
}
