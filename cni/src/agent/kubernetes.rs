//! Kubernetes mode: the agent watches the pods on its node and every namespace through the API
//! server (the shared `ambit-kube` watcher), decides enrollment from their labels exactly as in
//! the lab, captures running pods the plugin never saw (found under `/proc`), releases pods
//! that opt out or disappear, and marks captured pods with the annotation
//! `ambient.istio.io/redirection=enabled` (a JSON merge patch; removed on release).
//!
//! Nothing is released before both initial lists arrived: an agent restarting while the API
//! server is unreachable keeps every pod captured.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ambit_mesh::enrollment::enrollment;
use ambit_mesh::{Object, Pod};
use futures::{FutureExt, Stream, StreamExt};

use super::discover::{self, FoundNetns};
use super::{Agent, PodRecord, lock};

/// The annotation the agent sets on pods it captured.
pub const REDIRECTION_ANNOTATION: &str = "ambient.istio.io/redirection";

/// How long a pod whose namespace was not found waits before the next `/proc` scan.
const DISCOVERY_BACKOFF: Duration = Duration::from_secs(5);
/// How long `start` waits for the initial lists before serving anyway.
const INITIAL_SYNC: Duration = Duration::from_secs(30);
/// Bound on each API call the agent makes itself.
const API_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the API server is.
#[derive(Clone, Debug, Default)]
pub struct KubernetesSource {
    /// A kubeconfig file (default: in-cluster service account, then `$KUBECONFIG`).
    pub kubeconfig: Option<PathBuf>,
    /// The API server's URL, overriding the kubeconfig's.
    pub url: Option<String>,
}

type Updates = Pin<Box<dyn Stream<Item = ambit_kube::watch::Update> + Send>>;

pub(super) struct KubeState {
    client: kube::Client,
    updates: tokio::sync::Mutex<Option<Updates>>,
    /// Initial lists seen: (pods, namespaces).
    synced: Mutex<(bool, bool)>,
    /// Annotation values we patched and have not yet seen come back in the watch.
    annotation_sent: Mutex<BTreeMap<(String, String), bool>>,
    /// Pods whose namespace was not found under /proc, and when to look again.
    discover_after: Mutex<BTreeMap<(String, String), Instant>>,
    /// Pods whose sandbox the plugin reported deleted: never looked for under /proc (their
    /// namespace is being torn down) until a new ADD or the pod object goes.
    sandbox_deleted: Mutex<BTreeSet<(String, String)>>,
}

impl KubeState {
    pub(super) async fn connect(source: &KubernetesSource, node: &str) -> anyhow::Result<Self> {
        let client = ambit_kube::client::connect(&ambit_kube::client::ConnectOptions {
            kubeconfig: source.kubeconfig.clone(),
            url: source.url.clone(),
        })
        .await
        .map_err(|e| anyhow::anyhow!("connecting to the Kubernetes API server: {e}"))?;
        let updates = ambit_kube::watch::watch(
            client.clone(),
            vec![
                ambit_kube::watch::Watch {
                    kind: ambit_kube::watch::POD,
                    field_selector: Some(format!("spec.nodeName={node}")),
                    label_selector: None,
                },
                ambit_kube::watch::Watch {
                    kind: ambit_kube::watch::NAMESPACE,
                    field_selector: None,
                    label_selector: None,
                },
            ],
        );
        Ok(Self {
            client,
            updates: tokio::sync::Mutex::new(Some(Box::pin(updates))),
            synced: Mutex::new((false, false)),
            annotation_sent: Mutex::new(BTreeMap::new()),
            discover_after: Mutex::new(BTreeMap::new()),
            sandbox_deleted: Mutex::new(BTreeSet::new()),
        })
    }

    fn synced(&self) -> bool {
        let synced = *lock(&self.synced);
        synced.0 && synced.1
    }
}

fn pod_key(pod: &Pod) -> (String, String) {
    (pod.metadata.namespace.clone(), pod.metadata.name.clone())
}

fn pod_ips(pod: &Pod) -> Vec<IpAddr> {
    let mut ips: Vec<IpAddr> = pod
        .status
        .pod_ips
        .iter()
        .filter_map(|p| p.ip.parse().ok())
        .collect();
    if let Ok(ip) = pod.status.pod_ip.parse()
        && !ips.contains(&ip)
    {
        ips.push(ip);
    }
    ips
}

fn fd_inode(fd: &OwnedFd) -> Option<u64> {
    nix::sys::stat::fstat(fd.as_fd()).ok().map(|st| st.st_ino)
}

impl Agent {
    fn kube(&self) -> Option<&KubeState> {
        self.inner.kube.as_ref()
    }

    /// Applies one watch update to the cluster view. Returns whether anything changed.
    fn on_update(&self, update: ambit_kube::watch::Update) {
        use ambit_kube::watch::Update;
        let Some(kube) = self.kube() else { return };
        let node = &self.inner.config.node_name;
        let mut view = self
            .inner
            .cluster
            .write()
            .unwrap_or_else(|e| e.into_inner());
        match update {
            Update::Reset {
                kind,
                objects,
                rejected,
            } => {
                for e in rejected {
                    tracing::warn!(error = %e, "object ignored");
                }
                if kind == ambit_kube::watch::POD.kind {
                    view.pods = objects
                        .into_iter()
                        .filter_map(|o| match o {
                            Object::Pod(pod) if &pod.spec.node_name == node => {
                                Some((pod_key(&pod), pod))
                            }
                            _ => None,
                        })
                        .collect();
                    lock(&kube.synced).0 = true;
                    tracing::info!(pods = view.pods.len(), "pods on this node listed");
                } else if kind == ambit_kube::watch::NAMESPACE.kind {
                    view.namespaces = objects
                        .into_iter()
                        .filter_map(|o| match o {
                            Object::Namespace(ns) => Some((ns.metadata.name.clone(), ns)),
                            _ => None,
                        })
                        .collect();
                    lock(&kube.synced).1 = true;
                    tracing::info!(namespaces = view.namespaces.len(), "namespaces listed");
                }
            }
            Update::Applied(object) => match *object {
                Object::Pod(pod) => {
                    let key = pod_key(&pod);
                    if &pod.spec.node_name == node {
                        view.pods.insert(key, pod);
                    } else {
                        view.pods.remove(&key);
                    }
                }
                Object::Namespace(ns) => {
                    view.namespaces.insert(ns.metadata.name.clone(), ns);
                }
                _ => {}
            },
            Update::Deleted(key) => {
                if key.kind == "Pod" {
                    view.pods.remove(&(key.namespace, key.name));
                } else if key.kind == "Namespace" {
                    view.namespaces.remove(&key.name);
                }
            }
            Update::Rejected(e) => tracing::warn!(error = %e, "object ignored"),
        }
    }

    /// Waits (bounded) for the initial pod and namespace lists, so restored captures are judged
    /// against real labels.
    pub(super) async fn initial_kube_sync(&self) {
        let Some(kube) = self.kube() else { return };
        let mut updates = kube.updates.lock().await;
        let Some(stream) = updates.as_mut() else {
            return;
        };
        let deadline = tokio::time::Instant::now() + INITIAL_SYNC;
        while !kube.synced() {
            match tokio::time::timeout_at(deadline, stream.next()).await {
                Ok(Some(update)) => self.on_update(update),
                Ok(None) => {
                    tracing::error!("the Kubernetes watch ended before the initial lists");
                    return;
                }
                Err(_) => {
                    tracing::warn!(
                        "no initial pod and namespace lists within {INITIAL_SYNC:?}; serving \
                         anyway, captures are kept until the lists arrive"
                    );
                    return;
                }
            }
        }
    }

    /// Follows the watch until it ends, reconciling after each batch of updates and every
    /// `reconcile_every` (retries of discovery and annotations).
    pub(super) async fn follow_kubernetes(&self) {
        let Some(kube) = self.kube() else { return };
        let mut updates = kube.updates.lock().await;
        let Some(stream) = updates.as_mut() else {
            return;
        };
        let mut tick = tokio::time::interval(self.inner.config.reconcile_every);
        loop {
            tokio::select! {
                update = stream.next() => {
                    let Some(update) = update else {
                        tracing::error!("the Kubernetes watch ended");
                        return;
                    };
                    self.on_update(update);
                    // Take whatever else is already there before acting.
                    for _ in 0..1000 {
                        match stream.next().now_or_never() {
                            Some(Some(update)) => self.on_update(update),
                            _ => break,
                        }
                    }
                    self.reconcile_kubernetes(true).await;
                }
                _ = tick.tick() => self.reconcile_kubernetes(false).await,
            }
        }
    }

    /// In Kubernetes mode, makes sure the view has the pod (and its namespace) a plugin ADD
    /// names, reading them from the API server when the watch has not delivered them yet.
    pub(super) async fn refresh_pod(&self, namespace: &str, name: &str) {
        let Some(kube) = self.kube() else { return };
        let (has_pod, has_ns) = {
            let view = self.inner.cluster.read().unwrap_or_else(|e| e.into_inner());
            (
                view.pods
                    .contains_key(&(namespace.to_string(), name.to_string())),
                view.namespaces.contains_key(namespace),
            )
        };
        if !has_pod {
            let api: kube::Api<k8s_openapi::api::core::v1::Pod> =
                kube::Api::namespaced(kube.client.clone(), namespace);
            match tokio::time::timeout(API_TIMEOUT, api.get(name)).await {
                Ok(Ok(pod)) => match serde_json::to_value(&pod)
                    .map_err(|e| e.to_string())
                    .and_then(|v| serde_json::from_value::<Pod>(v).map_err(|e| e.to_string()))
                {
                    Ok(pod) if pod.spec.node_name == self.inner.config.node_name => {
                        let mut view = self
                            .inner
                            .cluster
                            .write()
                            .unwrap_or_else(|e| e.into_inner());
                        view.pods.insert(pod_key(&pod), pod);
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(pod = %format!("{namespace}/{name}"), error = %e, "pod from the API server unreadable")
                    }
                },
                Ok(Err(e)) => {
                    tracing::warn!(pod = %format!("{namespace}/{name}"), error = %e, "reading the pod from the API server failed")
                }
                Err(_) => {
                    tracing::warn!(pod = %format!("{namespace}/{name}"), "reading the pod from the API server timed out")
                }
            }
        }
        if !has_ns {
            let api: kube::Api<k8s_openapi::api::core::v1::Namespace> =
                kube::Api::all(kube.client.clone());
            if let Ok(Ok(ns)) = tokio::time::timeout(API_TIMEOUT, api.get(namespace)).await
                && let Ok(ns) = serde_json::to_value(&ns)
                    .map_err(|e| e.to_string())
                    .and_then(|v| {
                        serde_json::from_value::<ambit_mesh::Namespace>(v)
                            .map_err(|e| e.to_string())
                    })
            {
                let mut view = self
                    .inner
                    .cluster
                    .write()
                    .unwrap_or_else(|e| e.into_inner());
                view.namespaces.insert(ns.metadata.name.clone(), ns);
            }
        }
    }

    /// The plugin's DEL for this pod (Kubernetes mode).
    pub(super) fn plugin_deleted(&self, namespace: &str, name: &str) {
        if let Some(kube) = self.kube() {
            lock(&kube.sandbox_deleted).insert((namespace.to_string(), name.to_string()));
        }
    }

    /// The plugin's ADD for this pod (Kubernetes mode).
    pub(super) fn plugin_added(&self, namespace: &str, name: &str) {
        if let Some(kube) = self.kube() {
            lock(&kube.sandbox_deleted).remove(&(namespace.to_string(), name.to_string()));
        }
    }

    /// Removes and returns a record made from `/proc` discovery for this pod, if any.
    pub(super) fn take_discovered(&self, namespace: &str, name: &str) -> Option<PodRecord> {
        let mut pods = lock(&self.inner.pods);
        let id = pods
            .values()
            .find(|r| r.netns_inode.is_some() && r.namespace == namespace && r.name == name)
            .map(|r| r.container_id.clone())?;
        lock(&self.inner.netns).remove(&id);
        pods.remove(&id)
    }

    /// Whether the record's namespace path still names its namespace.
    pub(super) fn netns_still_valid(&self, record: &PodRecord) -> bool {
        match record.netns_inode {
            Some(inode) => discover::netns_inode(Path::new(&record.netns)).ok() == Some(inode),
            None => Path::new(&record.netns).exists(),
        }
    }

    /// Node namespaces the /proc scan never considers (the agent's and the probe SNAT's).
    fn skip_inodes(&self) -> BTreeSet<u64> {
        let mut skip = BTreeSet::new();
        skip.extend(fd_inode(&self.inner.host.0));
        skip.extend(discover::netns_inode(Path::new("/proc/self/ns/net")).ok());
        skip
    }

    async fn find(&self, ips: Vec<IpAddr>) -> Option<FoundNetns> {
        let skip = self.skip_inodes();
        let found = tokio::task::spawn_blocking(move || {
            discover::find_netns(Path::new("/proc"), &ips, &skip)
        })
        .await;
        match found {
            Ok(Ok(found)) => found,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "scanning /proc for network namespaces failed");
                None
            }
            Err(e) => {
                tracing::warn!(error = %e, "netns discovery task failed");
                None
            }
        }
    }

    /// A discovered record whose process went away: look for its namespace again by IP.
    pub(super) async fn rediscover(&self, record: &PodRecord) -> Option<PodRecord> {
        record.netns_inode?;
        let ips: Vec<IpAddr> = record.ips.iter().filter_map(|i| i.parse().ok()).collect();
        let found = self.find(ips).await?;
        let mut updated = record.clone();
        updated.netns = found.path.display().to_string();
        updated.netns_inode = Some(found.inode);
        lock(&self.inner.netns).insert(updated.container_id.clone(), Arc::new(found.fd));
        lock(&self.inner.pods).insert(updated.container_id.clone(), updated.clone());
        Some(updated)
    }

    /// Brings every pod on the node to what its labels ask for: records of pods gone from the
    /// API are released and forgotten, running ambient pods without a record are found under
    /// /proc and captured, and annotations follow.
    ///
    /// `labels_changed` (after watch updates) also republishes the plugin's enrollment hint;
    /// otherwise state is written only when a pod's capture changed.
    pub(super) async fn reconcile_kubernetes(&self, labels_changed: bool) {
        let Some(kube) = self.kube() else { return };
        if !kube.synced() {
            return;
        }
        let _serial = self.inner.changes.lock().await;
        let before = self.pods();
        let view_pods: BTreeMap<(String, String), Pod> = {
            let view = self.inner.cluster.read().unwrap_or_else(|e| e.into_inner());
            view.pods.clone()
        };

        lock(&kube.sandbox_deleted).retain(|key| view_pods.contains_key(key));
        lock(&kube.discover_after).retain(|key, _| view_pods.contains_key(key));

        // Pods gone from the API server (deleted, or missing from a relist).
        let records: Vec<PodRecord> = lock(&self.inner.pods).values().cloned().collect();
        for record in &records {
            let key = (record.namespace.clone(), record.name.clone());
            if view_pods.contains_key(&key) {
                continue;
            }
            if record.captured {
                self.release(record).await;
            }
            lock(&self.inner.pods).remove(&record.container_id);
            tracing::info!(pod = %format!("{}/{}", key.0, key.1), "pod no longer on this node in the API server; released and forgotten");
        }

        // Known pods follow their labels; a discovered pod that is released is forgotten (it is
        // looked up again if it comes back).
        let ids: Vec<String> = lock(&self.inner.pods).keys().cloned().collect();
        for id in ids {
            let verdict = self.apply(&id).await;
            if let Some(e) = verdict.error {
                tracing::warn!(container = %id, error = %e, "reconciling a pod failed");
            }
            let mut pods = lock(&self.inner.pods);
            if pods
                .get(&id)
                .is_some_and(|r| r.netns_inode.is_some() && !r.captured)
            {
                pods.remove(&id);
                lock(&self.inner.netns).remove(&id);
            }
        }

        // Ambient pods the plugin never told us about.
        let known: BTreeSet<(String, String)> = lock(&self.inner.pods)
            .values()
            .map(|r| (r.namespace.clone(), r.name.clone()))
            .collect();
        for (key, pod) in &view_pods {
            if known.contains(key)
                || matches!(pod.status.phase.as_str(), "Succeeded" | "Failed")
                || lock(&kube.sandbox_deleted).contains(key)
            {
                continue;
            }
            let namespace = {
                let view = self.inner.cluster.read().unwrap_or_else(|e| e.into_inner());
                view.namespaces.get(&key.0).cloned()
            };
            if !enrollment(pod, namespace.as_ref()).is_ambient() {
                lock(&kube.discover_after).remove(key);
                continue;
            }
            let ips = pod_ips(pod);
            if ips.is_empty() {
                continue;
            }
            if lock(&kube.discover_after)
                .get(key)
                .is_some_and(|at| Instant::now() < *at)
            {
                continue;
            }
            let pod_name = format!("{}/{}", key.0, key.1);
            let Some(found) = self.find(ips.clone()).await else {
                tracing::info!(pod = %pod_name, ?ips, "ambient pod's network namespace not found under /proc yet; will look again");
                lock(&kube.discover_after).insert(key.clone(), Instant::now() + DISCOVERY_BACKOFF);
                continue;
            };
            lock(&kube.discover_after).remove(key);
            let id = if pod.metadata.uid.is_empty() {
                format!("pod:{}/{}", key.0, key.1)
            } else {
                format!("pod:{}", pod.metadata.uid)
            };
            let record = PodRecord {
                container_id: id.clone(),
                uid: pod.metadata.uid.clone(),
                namespace: key.0.clone(),
                name: key.1.clone(),
                netns: found.path.display().to_string(),
                ips: ips.iter().map(IpAddr::to_string).collect(),
                captured: false,
                netns_inode: Some(found.inode),
            };
            tracing::info!(pod = %pod_name, netns = %record.netns, "found a running ambient pod's network namespace");
            lock(&self.inner.netns).insert(id.clone(), Arc::new(found.fd));
            lock(&self.inner.pods).insert(id.clone(), record);
            let verdict = self.apply(&id).await;
            tracing::info!(pod = %pod_name, captured = verdict.captured, reason = %verdict.reason, error = ?verdict.error, "existing pod reconciled");
            if !verdict.captured {
                lock(&self.inner.pods).remove(&id);
                lock(&self.inner.netns).remove(&id);
            }
        }
        if labels_changed || self.pods() != before {
            self.persist();
        }
        drop(_serial);
        self.annotate(&view_pods).await;
    }

    /// Patches `ambient.istio.io/redirection` to match what is captured.
    async fn annotate(&self, view_pods: &BTreeMap<(String, String), Pod>) {
        let Some(kube) = self.kube() else { return };
        let captured: BTreeSet<(String, String)> = lock(&self.inner.pods)
            .values()
            .filter(|r| r.captured)
            .map(|r| (r.namespace.clone(), r.name.clone()))
            .collect();
        for (key, pod) in view_pods {
            let want = captured.contains(key);
            let has = pod
                .metadata
                .annotations
                .get(REDIRECTION_ANNOTATION)
                .is_some_and(|v| v == "enabled");
            if want == has {
                lock(&kube.annotation_sent).remove(key);
                continue;
            }
            if lock(&kube.annotation_sent).get(key) == Some(&want) {
                continue;
            }
            let patch = serde_json::json!({
                "metadata": {"annotations": {REDIRECTION_ANNOTATION: if want { serde_json::Value::from("enabled") } else { serde_json::Value::Null }}}
            });
            let api: kube::Api<k8s_openapi::api::core::v1::Pod> =
                kube::Api::namespaced(kube.client.clone(), &key.0);
            let result = tokio::time::timeout(
                API_TIMEOUT,
                api.patch(
                    &key.1,
                    &kube::api::PatchParams::default(),
                    &kube::api::Patch::Merge(&patch),
                ),
            )
            .await;
            let pod_name = format!("{}/{}", key.0, key.1);
            match result {
                Ok(Ok(_)) => {
                    tracing::info!(pod = %pod_name, annotation = REDIRECTION_ANNOTATION, set = want, "pod annotated");
                    lock(&kube.annotation_sent).insert(key.clone(), want);
                }
                Ok(Err(e)) => {
                    tracing::warn!(pod = %pod_name, error = %e, "annotating the pod failed; will retry")
                }
                Err(_) => {
                    tracing::warn!(pod = %pod_name, "annotating the pod timed out; will retry")
                }
            }
        }
    }
}
