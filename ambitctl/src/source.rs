//! Where `analyze` and `explain` read cluster objects from: files, the running lab, or a cluster.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use ambit_kube::client::ConnectOptions;
use ambit_kube::watch::{CONTROL_PLANE_KINDS, Update, Watch};
use ambit_mesh::{Object, ObjectError};
use anyhow::{Context, bail};
use futures::StreamExt;

/// The objects to look at.
pub(crate) enum Origin {
    /// YAML files or directories (offline).
    Files(Vec<PathBuf>),
    /// The running lab's config directory (what its istiod-lite serves).
    Lab,
    /// A Kubernetes cluster (KUBECONFIG or ~/.kube/config).
    Cluster,
}

/// What was read: the objects that parsed and every object that did not.
pub(crate) struct Loaded {
    pub(crate) objects: Vec<Object>,
    pub(crate) errors: Vec<ObjectError>,
}

/// Reads the objects of `origin`; an object that fails to parse is an error in the result, not a
/// failure of the whole read.
pub(crate) fn load(origin: &Origin) -> anyhow::Result<Loaded> {
    match origin {
        Origin::Files(paths) => {
            let mut loaded = Loaded {
                objects: Vec::new(),
                errors: Vec::new(),
            };
            for path in paths {
                let (objects, errors) = if path.is_dir() {
                    ambit_mesh::read_dir(path)
                        .with_context(|| format!("reading {}", path.display()))?
                } else {
                    let text = std::fs::read_to_string(path)
                        .with_context(|| format!("reading {}", path.display()))?;
                    ambit_mesh::parse_documents(&text, &path.display().to_string())
                };
                loaded.objects.extend(objects);
                loaded.errors.extend(errors);
            }
            Ok(loaded)
        }
        Origin::Lab => Ok(Loaded {
            objects: crate::lab::current_objects()
                .context("reading the lab's objects (is the lab up? `ambitctl lab up`)")?,
            errors: Vec::new(),
        }),
        Origin::Cluster => list_cluster(),
    }
}

/// How long a cluster read waits for the API server to list every kind.
const LIST_TIMEOUT: Duration = Duration::from_secs(30);

/// One list of every kind Ambit reads ([`CONTROL_PLANE_KINDS`], what istiod-lite watches), through
/// the same watchers and conversion istiod-lite uses ([`ambit_kube::watch`]): each kind's first
/// complete list is taken, later changes are not. A kind the API server does not serve (its CRD
/// is not installed) counts as empty. Credentials: the in-cluster service account when
/// `KUBERNETES_SERVICE_HOST` is set, else `KUBECONFIG` or `~/.kube/config`.
fn list_cluster() -> anyhow::Result<Loaded> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime for the Kubernetes client")?;
    runtime.block_on(async {
        let client = ambit_kube::client::connect(&ConnectOptions::default()).await?;
        let mut pending: BTreeSet<&str> = CONTROL_PLANE_KINDS.iter().map(|k| k.kind).collect();
        let watches = CONTROL_PLANE_KINDS
            .iter()
            .copied()
            .map(Watch::all)
            .collect();
        let mut updates = std::pin::pin!(ambit_kube::watch::watch(client, watches));
        let deadline = tokio::time::sleep(LIST_TIMEOUT);
        let mut deadline = std::pin::pin!(deadline);
        let mut loaded = Loaded {
            objects: Vec::new(),
            errors: Vec::new(),
        };
        while !pending.is_empty() {
            tokio::select! {
                update = updates.next() => match update {
                    Some(Update::Reset { kind, objects, rejected }) => {
                        if pending.remove(kind) {
                            loaded.objects.extend(objects);
                            loaded.errors.extend(rejected);
                        }
                    }
                    // Changes after a kind's list: this is one snapshot.
                    Some(_) => {}
                    None => bail!("the Kubernetes watch ended before every kind was listed"),
                },
                () = &mut deadline => bail!(
                    "the API server did not list {} within {LIST_TIMEOUT:?} (is it reachable with \
                     these credentials? KUBECONFIG or ~/.kube/config)",
                    pending.into_iter().collect::<Vec<_>>().join(", ")
                ),
            }
        }
        Ok(loaded)
    })
}
