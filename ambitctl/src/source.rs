//! Where `analyze` and `explain` read cluster objects from: files, the running lab, or a cluster.

use std::path::PathBuf;

use ambit_mesh::{Object, ObjectError};
use anyhow::{Context, bail};

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
        Origin::Cluster => bail!("reading objects from a cluster is not built yet"),
    }
}
