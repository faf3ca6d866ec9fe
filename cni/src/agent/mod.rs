//! The node agent: learns pods from the plugin, decides enrollment from namespace and pod labels,
//! installs or removes the in-pod redirection, and keeps ztunnel informed over ZDS. Its state is
//! persisted so a restart loses no pod, and pods queued by the plugin while it was down are
//! captured when it returns.
//!
//! Labels come from a directory of cluster YAML (the lab) or, in Kubernetes mode, from watching
//! the API server (pods on this node and all namespaces); there the agent also captures pods
//! that never passed through the plugin (their network namespace found under `/proc`) and
//! annotates captured pods `ambient.istio.io/redirection=enabled`.
//!
//! In the node's own network namespace the agent keeps the probe SNAT table
//! (`ambit_redirect::host`): a captured pod's IPs are in it while it is captured, so the kubelet's
//! probes reach the application instead of ztunnel.

pub mod discover;
mod kubernetes;
mod state;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use ambit_mesh::enrollment::{Enrollment, enrollment};
use ambit_mesh::{Namespace, Object, Pod};
use ambit_redirect::RedirectConfig;
use ambit_zds::server::{SnapshotEntry, ZdsServer};
use ambit_zds::{WorkloadInfo, ZdsError};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;

use crate::protocol::{EnrollmentHint, PodEvent, Verdict};
pub use kubernetes::{KubernetesSource, REDIRECTION_ANNOTATION};
pub use state::PodRecord;

/// Agent settings.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// This node's name (pods of other nodes in the config are ignored).
    pub node_name: String,
    /// Where the plugin reaches the agent.
    pub plugin_socket: PathBuf,
    /// The ZDS socket ztunnel connects to.
    pub zds_socket: PathBuf,
    /// Persistent state (pods, enrollment hint, the plugin's pending queue).
    pub state_dir: PathBuf,
    /// Lab mode: the directory of cluster YAML to read labels from.
    pub config_dir: Option<PathBuf>,
    /// Kubernetes mode: watch this node's pods and all namespaces through the API server.
    /// Exclusive with `config_dir`.
    pub kubernetes: Option<KubernetesSource>,
    /// The node's network namespace, where the probe SNAT table lives (`None`: the agent's own,
    /// as when it runs with `hostNetwork`).
    pub host_netns: Option<PathBuf>,
    /// The rule set.
    pub redirect: RedirectConfig,
    /// How often the config directory is re-read.
    pub reconcile_every: Duration,
}

#[derive(Default)]
struct ClusterView {
    namespaces: BTreeMap<String, Namespace>,
    pods: BTreeMap<(String, String), Pod>,
}

struct Inner {
    config: AgentConfig,
    pods: Mutex<BTreeMap<String, PodRecord>>,
    /// Open namespace handles of captured pods, by container id.
    netns: Mutex<BTreeMap<String, Arc<OwnedFd>>>,
    cluster: RwLock<ClusterView>,
    zds: ZdsServer,
    /// Serializes capture changes so a pod is never captured and released at once.
    changes: tokio::sync::Mutex<()>,
    /// The node's network namespace (probe SNAT), and its name for messages.
    host: (OwnedFd, String),
    /// Kubernetes mode.
    kube: Option<kubernetes::KubeState>,
}

/// The running agent. Cheap to clone.
#[derive(Clone)]
pub struct Agent {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("node", &self.inner.config.node_name)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Agent {
    /// Loads state, binds both sockets, re-applies captures that survived a restart and
    /// processes the plugin's queue. Spawn [`Agent::run`] next.
    pub async fn start(
        config: AgentConfig,
    ) -> anyhow::Result<(Self, UnixListener, tokio_seqpacket::UnixSeqpacketListener)> {
        if config.config_dir.is_some() && config.kubernetes.is_some() {
            anyhow::bail!(
                "the agent reads labels either from a config directory (lab) or from Kubernetes, not both"
            );
        }
        let kube = match &config.kubernetes {
            Some(source) => Some(kubernetes::KubeState::connect(source, &config.node_name).await?),
            None => None,
        };
        std::fs::create_dir_all(&config.state_dir)?;
        let records = state::load(&config.state_dir)?;
        let host_name = config.host_netns.as_ref().map_or_else(
            || "the node's network namespace".to_string(),
            |p| p.display().to_string(),
        );
        let host_path = config
            .host_netns
            .clone()
            .unwrap_or_else(|| PathBuf::from("/proc/self/ns/net"));
        let host_fd = OwnedFd::from(std::fs::File::open(&host_path).map_err(|e| {
            anyhow::anyhow!("cannot open {host_name} ({}): {e}", host_path.display())
        })?);
        ambit_redirect::host::install(host_fd.as_fd(), &host_name, &config.redirect)
            .map_err(|e| anyhow::anyhow!("probe SNAT: {e}"))?;
        let snapshot_inner: Arc<Mutex<Option<std::sync::Weak<Inner>>>> = Arc::new(Mutex::new(None));
        let weak = snapshot_inner.clone();
        let source = move || -> Vec<SnapshotEntry> {
            let inner = lock(&weak).as_ref().and_then(std::sync::Weak::upgrade);
            inner.map(|inner| snapshot(&inner)).unwrap_or_default()
        };
        let (zds, zds_listener) = ZdsServer::bind(&config.zds_socket, Arc::new(source))?;
        if let Some(parent) = config.plugin_socket.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let _ = std::fs::remove_file(&config.plugin_socket);
        let plugin_listener = UnixListener::bind(&config.plugin_socket)?;
        let inner = Arc::new(Inner {
            config,
            pods: Mutex::new(
                records
                    .into_iter()
                    .map(|r| (r.container_id.clone(), r))
                    .collect(),
            ),
            netns: Mutex::new(BTreeMap::new()),
            cluster: RwLock::new(ClusterView::default()),
            zds,
            changes: tokio::sync::Mutex::new(()),
            host: (host_fd, host_name),
            kube,
        });
        *lock(&snapshot_inner) = Some(Arc::downgrade(&inner));
        let agent = Agent { inner };
        agent.reload_cluster();
        agent.initial_kube_sync().await;
        agent.restore().await;
        agent.sync_host();
        agent.drain_pending().await;
        agent.reconcile().await;
        Ok((agent, plugin_listener, zds_listener))
    }

    /// Serves the plugin and ztunnel and follows label changes, until the task is dropped.
    pub async fn run(&self, plugin: UnixListener, zds: tokio_seqpacket::UnixSeqpacketListener) {
        // Owned here so that stopping `run` stops everything it started.
        let mut tasks = tokio::task::JoinSet::new();
        let zds_server = self.inner.zds.clone();
        tasks.spawn(async move { zds_server.serve(zds).await });
        let watcher = self.clone();
        if self.inner.kube.is_some() {
            tasks.spawn(async move { watcher.follow_kubernetes().await });
        } else {
            tasks.spawn(async move { watcher.follow_config().await });
        }
        loop {
            match plugin.accept().await {
                Ok((stream, _)) => {
                    let agent = self.clone();
                    tokio::spawn(async move { agent.serve_plugin(stream).await });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "plugin socket accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    async fn serve_plugin(&self, stream: tokio::net::UnixStream) {
        let (read, mut write) = stream.into_split();
        let mut line = String::new();
        let mut reader = BufReader::new(read);
        let Ok(n) = tokio::time::timeout(Duration::from_secs(5), reader.read_line(&mut line)).await
        else {
            return;
        };
        if !matches!(n, Ok(n) if n > 0) {
            return;
        }
        let verdict = match serde_json::from_str::<PodEvent>(&line) {
            Ok(event) => self.handle(event).await,
            Err(e) => Verdict {
                error: Some(format!("unreadable request from the plugin: {e}")),
                ..Verdict::default()
            },
        };
        let mut reply = serde_json::to_vec(&verdict).unwrap_or_default();
        reply.push(b'\n');
        let _ = write.write_all(&reply).await;
    }

    /// Handles one plugin event.
    pub async fn handle(&self, event: PodEvent) -> Verdict {
        let _serial = self.inner.changes.lock().await;
        let pod = format!("{}/{}", event.pod_namespace, event.pod_name);
        match event.command.as_str() {
            "ADD" => {
                // The pod object (labels, service account) may have been written just before
                // the runtime called us: read the latest view first.
                self.reload_cluster();
                self.refresh_pod(&event.pod_namespace, &event.pod_name)
                    .await;
                self.plugin_added(&event.pod_namespace, &event.pod_name);
                let mut record = PodRecord::from_event(&event);
                // A pod found earlier through /proc becomes this record (same namespace).
                if let Some(old) = self.take_discovered(&event.pod_namespace, &event.pod_name) {
                    record.captured = old.captured;
                }
                lock(&self.inner.pods).insert(record.container_id.clone(), record.clone());
                let verdict = self.apply(&record.container_id).await;
                tracing::info!(%pod, container = %event.container_id, ambient = verdict.ambient, captured = verdict.captured, reason = %verdict.reason, error = ?verdict.error, "pod added");
                self.persist();
                verdict
            }
            "DEL" => {
                let record = lock(&self.inner.pods).get(&event.container_id).cloned();
                // Kubernetes mode: the sandbox goes away; do not look for it under /proc again
                // (a new sandbox comes with its own ADD). A pod found under /proc has no
                // container id of ours: it is released by name.
                self.plugin_deleted(&event.pod_namespace, &event.pod_name);
                let record = record.or_else(|| {
                    let found = self.take_discovered(&event.pod_namespace, &event.pod_name)?;
                    lock(&self.inner.pods).insert(found.container_id.clone(), found.clone());
                    Some(found)
                });
                if let Some(record) = record {
                    if record.captured {
                        self.release(&record).await;
                    }
                    lock(&self.inner.pods).remove(&record.container_id);
                    lock(&self.inner.netns).remove(&record.container_id);
                    self.persist();
                    tracing::info!(%pod, container = %event.container_id, "pod deleted");
                }
                Verdict {
                    reason: "deleted".into(),
                    ..Verdict::default()
                }
            }
            "CHECK" => self.check(&event).await,
            other => Verdict {
                error: Some(format!("unknown command {other:?}")),
                ..Verdict::default()
            },
        }
    }

    async fn check(&self, event: &PodEvent) -> Verdict {
        let Some(record) = lock(&self.inner.pods).get(&event.container_id).cloned() else {
            return Verdict {
                error: Some(format!(
                    "pod {}/{} (container {}) is unknown to the agent",
                    event.pod_namespace, event.pod_name, event.container_id
                )),
                ..Verdict::default()
            };
        };
        let decision = self.decide(&record);
        let mut verdict = Verdict {
            ambient: decision.is_ambient(),
            captured: record.captured,
            reason: decision.reason().into(),
            error: None,
        };
        if decision.is_ambient() {
            let installed = self.netns_fd(&record).and_then(|fd| {
                ambit_redirect::is_installed(fd.as_fd(), &record.netns).map_err(|e| e.to_string())
            });
            match installed {
                Ok(true) if record.captured => {}
                Ok(_) => {
                    verdict.error =
                        Some("pod is ambient but its redirection rules are missing".into())
                }
                Err(e) => verdict.error = Some(e),
            }
        }
        verdict
    }

    fn decide(&self, record: &PodRecord) -> Enrollment {
        let cluster = self.inner.cluster.read().unwrap_or_else(|e| e.into_inner());
        let pod = cluster
            .pods
            .get(&(record.namespace.clone(), record.name.clone()))
            .cloned()
            .unwrap_or_else(|| {
                let mut pod = Pod::default();
                pod.metadata.name = record.name.clone();
                pod.metadata.namespace = record.namespace.clone();
                pod
            });
        enrollment(&pod, cluster.namespaces.get(&record.namespace))
    }

    fn service_account(&self, record: &PodRecord) -> String {
        let cluster = self.inner.cluster.read().unwrap_or_else(|e| e.into_inner());
        cluster
            .pods
            .get(&(record.namespace.clone(), record.name.clone()))
            .map(|p| p.service_account().to_string())
            .unwrap_or_else(|| "default".to_string())
    }

    fn netns_fd(&self, record: &PodRecord) -> Result<Arc<OwnedFd>, String> {
        if let Some(fd) = lock(&self.inner.netns).get(&record.container_id) {
            return Ok(fd.clone());
        }
        let file = std::fs::File::open(&record.netns).map_err(|e| {
            format!(
                "cannot open the pod's network namespace {}: {e}",
                record.netns
            )
        })?;
        if let Some(expected) = record.netns_inode {
            let inode = file
                .metadata()
                .map(|m| std::os::unix::fs::MetadataExt::ino(&m));
            if inode.ok() != Some(expected) {
                return Err(format!(
                    "{} is no longer the pod's network namespace (its process is gone)",
                    record.netns
                ));
            }
        }
        let fd = Arc::new(OwnedFd::from(file));
        lock(&self.inner.netns).insert(record.container_id.clone(), fd.clone());
        Ok(fd)
    }

    fn record_ips(record: &PodRecord) -> Vec<IpAddr> {
        record.ips.iter().filter_map(|ip| ip.parse().ok()).collect()
    }

    /// Puts a captured pod's IPs into the node's probe SNAT sets.
    async fn host_add(&self, record: &PodRecord) -> Result<(), String> {
        let ips = Self::record_ips(record);
        if ips.is_empty() {
            return Ok(());
        }
        let agent = self.clone();
        let redirect = self.inner.config.redirect.clone();
        tokio::task::spawn_blocking(move || {
            let (fd, name) = &agent.inner.host;
            ambit_redirect::host::add(fd.as_fd(), name, &redirect, &ips)
        })
        .await
        .map_err(|e| format!("probe SNAT task failed: {e}"))?
        .map_err(|e| format!("probe SNAT: {e}"))
    }

    async fn host_remove(&self, record: &PodRecord) {
        let ips = Self::record_ips(record);
        if ips.is_empty() {
            return;
        }
        let agent = self.clone();
        let result = tokio::task::spawn_blocking(move || {
            let (fd, name) = &agent.inner.host;
            ambit_redirect::host::remove(fd.as_fd(), name, &ips)
        })
        .await;
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "removing a pod from the probe SNAT set failed")
            }
            Err(e) => tracing::warn!(error = %e, "probe SNAT task failed"),
        }
    }

    /// Makes the probe SNAT sets hold exactly the captured pods' IPs (after a restart).
    fn sync_host(&self) {
        let ips: Vec<IpAddr> = lock(&self.inner.pods)
            .values()
            .filter(|r| r.captured)
            .flat_map(Self::record_ips)
            .collect();
        let (fd, name) = &self.inner.host;
        if let Err(e) =
            ambit_redirect::host::sync(fd.as_fd(), name, &self.inner.config.redirect, &ips)
        {
            tracing::error!(error = %e, "synchronizing the probe SNAT set failed");
        }
    }

    /// On shutdown: the node's probe SNAT table goes when no pod is captured any more (captured
    /// pods keep their entries so their probes keep working while the agent is away).
    pub fn shutdown(&self) {
        let (fd, name) = &self.inner.host;
        match ambit_redirect::host::remove_if_empty(fd.as_fd(), name) {
            Ok(ambit_redirect::host::HostRemoval::Kept(ips)) => tracing::info!(
                pods = ips.len(),
                "probe SNAT table kept: captured pods still need it"
            ),
            Ok(_) => tracing::info!("probe SNAT table removed"),
            Err(e) => tracing::warn!(error = %e, "removing the probe SNAT table failed"),
        }
    }

    /// Brings one pod to the state its labels ask for.
    async fn apply(&self, container_id: &str) -> Verdict {
        let Some(record) = lock(&self.inner.pods).get(container_id).cloned() else {
            return Verdict::default();
        };
        let decision = self.decide(&record);
        let mut verdict = Verdict {
            ambient: decision.is_ambient(),
            captured: record.captured,
            reason: decision.reason().into(),
            error: None,
        };
        match (decision.is_ambient(), record.captured) {
            (true, false) => match self.capture(&record).await {
                Ok(()) => verdict.captured = true,
                Err(e) => verdict.error = Some(e),
            },
            (false, true) => {
                self.release(&record).await;
                verdict.captured = false;
            }
            _ => {}
        }
        verdict
    }

    async fn capture(&self, record: &PodRecord) -> Result<(), String> {
        let fd = self.netns_fd(record)?;
        let redirect = self.inner.config.redirect.clone();
        let (install_fd, name) = (fd.clone(), record.netns.clone());
        tokio::task::spawn_blocking(move || {
            ambit_redirect::install(install_fd.as_fd(), &name, &redirect)
        })
        .await
        .map_err(|e| format!("redirection task failed: {e}"))?
        .map_err(|e| e.to_string())?;
        if let Err(e) = self.host_add(record).await {
            let _ = self.remove_rules(record, &fd).await;
            return Err(e);
        }
        let info = WorkloadInfo {
            name: record.name.clone(),
            namespace: record.namespace.clone(),
            service_account: self.service_account(record),
        };
        match self
            .inner
            .zds
            .add(&record.zds_uid(), info, fd.as_fd())
            .await
        {
            Ok(()) => {}
            Err(ZdsError::NotConnected) => {
                tracing::warn!(pod = %format!("{}/{}", record.namespace, record.name), "captured, but ztunnel is not connected; it gets the pod when it connects");
            }
            Err(e) => {
                let _ = self.remove_rules(record, &fd).await;
                self.host_remove(record).await;
                return Err(format!("ztunnel did not take the pod: {e}"));
            }
        }
        if let Some(r) = lock(&self.inner.pods).get_mut(&record.container_id) {
            r.captured = true;
        }
        Ok(())
    }

    async fn remove_rules(&self, record: &PodRecord, fd: &Arc<OwnedFd>) -> Result<bool, String> {
        let redirect = self.inner.config.redirect.clone();
        let (fd, name) = (fd.clone(), record.netns.clone());
        tokio::task::spawn_blocking(move || ambit_redirect::remove(fd.as_fd(), &name, &redirect))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())
    }

    async fn release(&self, record: &PodRecord) {
        match self.inner.zds.del(&record.zds_uid()).await {
            Ok(()) | Err(ZdsError::NotConnected) => {}
            Err(e) => tracing::warn!(error = %e, "ztunnel did not acknowledge a pod's removal"),
        }
        if let Ok(fd) = self.netns_fd(record)
            && let Err(e) = self.remove_rules(record, &fd).await
        {
            tracing::warn!(error = %e, "removing redirection failed");
        }
        self.host_remove(record).await;
        lock(&self.inner.netns).remove(&record.container_id);
        if let Some(r) = lock(&self.inner.pods).get_mut(&record.container_id) {
            r.captured = false;
        }
    }

    /// After a restart: captured pods whose namespace still exists get their rules re-applied
    /// (idempotent); pods whose namespace is gone are forgotten.
    async fn restore(&self) {
        let records: Vec<PodRecord> = lock(&self.inner.pods).values().cloned().collect();
        for mut record in records {
            if self.inner.kube.is_some() && !self.netns_still_valid(&record) {
                match self.rediscover(&record).await {
                    Some(found) => record = found,
                    None => {
                        tracing::info!(pod = %format!("{}/{}", record.namespace, record.name), "pod's namespace is gone; forgetting it");
                        lock(&self.inner.pods).remove(&record.container_id);
                        continue;
                    }
                }
            }
            if !Path::new(&record.netns).exists() {
                tracing::info!(pod = %format!("{}/{}", record.namespace, record.name), "pod's namespace is gone; forgetting it");
                lock(&self.inner.pods).remove(&record.container_id);
                continue;
            }
            if record.captured
                && let Err(e) = self.reinstall(&record).await
            {
                tracing::warn!(error = %e, "re-applying redirection after restart failed");
            }
        }
        self.persist();
    }

    async fn reinstall(&self, record: &PodRecord) -> Result<(), String> {
        let fd = self.netns_fd(record)?;
        let redirect = self.inner.config.redirect.clone();
        let name = record.netns.clone();
        tokio::task::spawn_blocking(move || ambit_redirect::install(fd.as_fd(), &name, &redirect))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())
    }

    /// Pods the plugin queued while the agent was down.
    async fn drain_pending(&self) {
        let dir = self.inner.config.state_dir.join("pending");
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let event = std::fs::read(&path)
                .ok()
                .and_then(|bytes| serde_json::from_slice::<PodEvent>(&bytes).ok());
            if let Some(mut event) = event {
                event.command = "ADD".into();
                if Path::new(&event.netns).exists() {
                    let verdict = self.handle(event).await;
                    tracing::info!(captured = verdict.captured, error = ?verdict.error, "queued pod processed");
                }
            }
            let _ = std::fs::remove_file(&path);
        }
    }

    /// Re-reads the lab's config directory.
    fn reload_cluster(&self) -> bool {
        let Some(dir) = &self.inner.config.config_dir else {
            return false;
        };
        let (objects, errors) = match ambit_mesh::read_dir(dir) {
            Ok(read) => read,
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot read the config directory");
                return false;
            }
        };
        for e in errors {
            tracing::debug!(error = %e, "object ignored");
        }
        let mut view = ClusterView::default();
        for object in objects {
            match object {
                Object::Namespace(ns) => {
                    view.namespaces.insert(ns.metadata.name.clone(), ns);
                }
                Object::Pod(pod) => {
                    view.pods.insert(
                        (pod.metadata.namespace.clone(), pod.metadata.name.clone()),
                        pod,
                    );
                }
                _ => {}
            }
        }
        let mut current = self
            .inner
            .cluster
            .write()
            .unwrap_or_else(|e| e.into_inner());
        let changed = current.namespaces != view.namespaces || current.pods != view.pods;
        *current = view;
        changed
    }

    async fn follow_config(&self) {
        loop {
            tokio::time::sleep(self.inner.config.reconcile_every).await;
            if self.reload_cluster() {
                tracing::info!("cluster labels changed; reconciling captures");
                self.reconcile().await;
            }
        }
    }

    /// Brings every known pod to the state its labels ask for.
    pub async fn reconcile(&self) {
        if self.inner.kube.is_some() {
            self.reconcile_kubernetes(true).await;
            return;
        }
        let _serial = self.inner.changes.lock().await;
        let ids: Vec<String> = lock(&self.inner.pods).keys().cloned().collect();
        for id in ids {
            let verdict = self.apply(&id).await;
            if let Some(e) = verdict.error {
                tracing::warn!(container = %id, error = %e, "reconciling a pod failed");
            }
        }
        self.persist();
    }

    /// The pods the agent knows, for status and tests.
    pub fn pods(&self) -> Vec<PodRecord> {
        lock(&self.inner.pods).values().cloned().collect()
    }

    fn persist(&self) {
        let records: Vec<PodRecord> = lock(&self.inner.pods).values().cloned().collect();
        if let Err(e) = state::save(&self.inner.config.state_dir, &records) {
            tracing::error!(error = %e, "cannot persist the agent's state");
        }
        let hint = {
            let cluster = self.inner.cluster.read().unwrap_or_else(|e| e.into_inner());
            let label = |labels: &BTreeMap<String, String>, value: &str| {
                labels
                    .get(ambit_mesh::enrollment::DATAPLANE_MODE)
                    .map(String::as_str)
                    == Some(value)
            };
            EnrollmentHint {
                ambient_namespaces: cluster
                    .namespaces
                    .values()
                    .filter(|n| label(&n.metadata.labels, "ambient"))
                    .map(|n| n.metadata.name.clone())
                    .collect(),
                ambient_pods: cluster
                    .pods
                    .iter()
                    .filter(|(_, p)| label(&p.metadata.labels, "ambient"))
                    .map(|((ns, n), _)| format!("{ns}/{n}"))
                    .collect(),
                opted_out_pods: cluster
                    .pods
                    .iter()
                    .filter(|(_, p)| label(&p.metadata.labels, "none"))
                    .map(|((ns, n), _)| format!("{ns}/{n}"))
                    .collect(),
            }
        };
        if let Err(e) = state::save_hint(&self.inner.config.state_dir, &hint) {
            tracing::error!(error = %e, "cannot publish the enrollment hint");
        }
    }
}

fn snapshot(inner: &Inner) -> Vec<SnapshotEntry> {
    let records: Vec<PodRecord> = lock(&inner.pods)
        .values()
        .filter(|r| r.captured)
        .cloned()
        .collect();
    let cluster = inner.cluster.read().unwrap_or_else(|e| e.into_inner());
    records
        .into_iter()
        .map(|record| {
            let service_account = cluster
                .pods
                .get(&(record.namespace.clone(), record.name.clone()))
                .map(|p| p.service_account().to_string())
                .unwrap_or_else(|| "default".into());
            let netns = lock(&inner.netns)
                .get(&record.container_id)
                .cloned()
                .or_else(|| {
                    let file = std::fs::File::open(&record.netns).ok()?;
                    // A namespace found under /proc: only if the path still names it.
                    if let Some(expected) = record.netns_inode {
                        let inode = file
                            .metadata()
                            .ok()
                            .map(|m| std::os::unix::fs::MetadataExt::ino(&m));
                        if inode != Some(expected) {
                            return None;
                        }
                    }
                    Some(Arc::new(OwnedFd::from(file)))
                });
            SnapshotEntry {
                uid: record.zds_uid(),
                info: WorkloadInfo {
                    name: record.name.clone(),
                    namespace: record.namespace.clone(),
                    service_account,
                },
                netns,
            }
        })
        .collect()
}
