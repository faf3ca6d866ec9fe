//! Config sources. The directory source reads the same objects Kubernetes would hold (multi-
//! document YAML files), re-reads them when they change, translates, and updates the store. An
//! invalid object is logged with its file, document, name and field, counted, and skipped.

use std::path::PathBuf;
use std::time::Duration;

use ambit_core::metrics::Registry;
use ambit_core::readiness::BlockReady;
use ambit_mesh::translate::{Cluster, MeshSettings, translate};

use crate::store::Store;

/// Reads `dir` now and whenever its contents change (checked every `every`).
pub async fn watch_directory(
    dir: PathBuf,
    settings: MeshSettings,
    store: Store,
    metrics: Registry,
    every: Duration,
    ready: Option<BlockReady>,
) {
    metrics.describe_counter(
        "ambit_config_rejected_objects_total",
        "Objects refused because they failed validation",
    );
    metrics.describe_gauge(
        "ambit_config_objects",
        "Objects read from the config source",
    );
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
                        for message in &messages {
                            tracing::warn!(error = %message, "object rejected");
                        }
                        metrics
                            .counter("ambit_config_rejected_objects_total", &())
                            .increment(messages.len() as u64);
                        last_errors = messages;
                    }
                    metrics
                        .gauge("ambit_config_objects", &())
                        .set(objects.len() as f64);
                    let cluster = Cluster::from_objects(objects);
                    let resources = translate(&cluster, &settings);
                    for warning in &resources.warnings {
                        tracing::warn!(%warning, "object only partly enforced");
                    }
                    let changed = store.replace(cluster, &resources);
                    tracing::info!(
                        addresses = resources.addresses.len(),
                        policies = resources.authorizations.len(),
                        changed,
                        "configuration translated"
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
