//! In-pod mode: the node agent hands pods over ZDS; for each, ztunnel starts the pod's proxies
//! inside its network namespace, and drains them when the pod leaves. A malformed or refused
//! message is answered with a NACK naming the problem and never disturbs other pods.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ambit_core::drain::DrainWatcher;
use ambit_core::metrics::Registry;
use ambit_core::readiness::{BlockReady, Readiness};
use ambit_identity::Identity;
use ambit_zds::client::{ZdsClient, ZdsEvent};

use crate::proxy::{ListenAddrs, PodSpec, ProxyInputs, RunningPod};
use crate::socket::{NetnsSockets, SocketFactory};

/// Builds the sockets for a pod from the namespace ZDS handed over. In production every pod gets
/// [`NetnsSockets`]; tests may substitute another factory.
pub type SocketsFor = Arc<dyn Fn(OwnedFd) -> Arc<dyn SocketFactory> + Send + Sync>;

struct PodEntry {
    running: RunningPod,
    /// (device, inode) of the namespace: a new inode means the sandbox was recreated.
    netns_id: (u64, u64),
}

struct Inner {
    path: PathBuf,
    inputs: ProxyInputs,
    trust_domain: String,
    drain_deadline: Duration,
    metrics: Registry,
    sockets_for: SocketsFor,
    pods: tokio::sync::Mutex<HashMap<String, PodEntry>>,
    /// uid → what `/config_dump` shows.
    status: Mutex<BTreeMap<String, PodState>>,
}

/// A pod the node agent handed over, as `/config_dump`'s `workloadState` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodState {
    /// Pod name.
    pub name: String,
    /// Pod namespace.
    pub namespace: String,
    /// The identity its proxies present.
    pub identity: Identity,
    /// `Up` (its proxies run) or `Draining` (removed; open connections finish).
    pub state: &'static str,
}

/// Receives pods over ZDS and runs their proxies. Cheap to clone.
#[derive(Clone)]
pub struct InPodManager {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for InPodManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InPodManager")
            .field("path", &self.inner.path)
            .finish_non_exhaustive()
    }
}

fn netns_id(fd: &OwnedFd) -> (u64, u64) {
    nix::sys::stat::fstat(fd.as_fd())
        .map(|s| (s.st_dev, s.st_ino))
        .unwrap_or((0, 0))
}

impl InPodManager {
    /// A manager for the ZDS socket at `path`.
    pub fn new(
        path: PathBuf,
        inputs: ProxyInputs,
        trust_domain: String,
        drain_deadline: Duration,
        metrics: Registry,
    ) -> Self {
        Self::with_sockets(
            path,
            inputs,
            trust_domain,
            drain_deadline,
            metrics,
            Arc::new(|netns| Arc::new(NetnsSockets::new(netns)) as Arc<dyn SocketFactory>),
        )
    }

    /// As [`InPodManager::new`], choosing how a pod's sockets are made.
    pub fn with_sockets(
        path: PathBuf,
        inputs: ProxyInputs,
        trust_domain: String,
        drain_deadline: Duration,
        metrics: Registry,
        sockets_for: SocketsFor,
    ) -> Self {
        metrics.describe_gauge(
            "workload_manager_active_proxy_count",
            "Pods whose proxies are running",
        );
        metrics.describe_counter(
            "workload_manager_proxies_started_total",
            "Pod proxies started",
        );
        metrics.describe_counter(
            "workload_manager_proxies_stopped_total",
            "Pod proxies stopped",
        );
        metrics.describe_counter(
            "ambit_zds_refused_messages_total",
            "ZDS messages answered with an error",
        );
        Self {
            inner: Arc::new(Inner {
                path,
                inputs,
                trust_domain,
                drain_deadline,
                metrics,
                sockets_for,
                pods: tokio::sync::Mutex::new(HashMap::new()),
                status: Mutex::new(BTreeMap::new()),
            }),
        }
    }

    /// Every pod handed over and not yet gone, by uid, for `/config_dump`.
    pub fn pod_states(&self) -> BTreeMap<String, PodState> {
        self.inner
            .status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Uids of the pods being served.
    pub async fn pods(&self) -> Vec<String> {
        let mut uids: Vec<String> = self.inner.pods.lock().await.keys().cloned().collect();
        uids.sort();
        uids
    }

    /// Connects to the agent and serves pods until `drain`, reconnecting when the agent goes
    /// away. `first` is the readiness guard released by the first complete snapshot; later
    /// disconnects register a new one until the next snapshot.
    pub async fn run(&self, first: BlockReady, readiness: Readiness, drain: DrainWatcher) {
        let mut pending = Some(first);
        loop {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(24 * 3600);
            let connect =
                ZdsClient::connect_with_retry(&self.inner.path, Duration::from_secs(15), deadline);
            let client = tokio::select! {
                client = connect => client,
                _ = drain.signaled() => return,
            };
            let mut client = match client {
                Ok(client) => client,
                Err(e) => {
                    tracing::error!(error = %e, "cannot reach the node agent over ZDS");
                    continue;
                }
            };
            tracing::info!(path = %self.inner.path.display(), "connected to the node agent over ZDS");
            let ended = tokio::select! {
                ended = self.session(&mut client, &mut pending) => ended,
                _ = drain.signaled() => return,
            };
            match ended {
                Ok(()) => tracing::warn!("the node agent closed the ZDS connection; reconnecting"),
                Err(e) => tracing::warn!(error = %e, "ZDS session failed; reconnecting"),
            }
            if pending.is_none() {
                pending = Some(readiness.register("zds-snapshot"));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn session(
        &self,
        client: &mut ZdsClient,
        pending: &mut Option<BlockReady>,
    ) -> Result<(), ambit_zds::ZdsError> {
        let mut named: HashSet<String> = HashSet::new();
        let mut snapshot_done = false;
        while let Some(event) = client.next_event().await? {
            let result = match event {
                ZdsEvent::Add { uid, info, netns } => {
                    named.insert(uid.clone());
                    self.add(uid, info, netns).await
                }
                ZdsEvent::Keep { uid } if !snapshot_done => {
                    named.insert(uid);
                    Ok(())
                }
                ZdsEvent::Keep { uid } => Err(format!(
                    "KeepWorkload {uid} after SnapshotSent: Keep is only valid in a snapshot"
                )),
                ZdsEvent::SnapshotSent if snapshot_done => {
                    Err("a second SnapshotSent on one connection".to_string())
                }
                ZdsEvent::SnapshotSent => {
                    snapshot_done = true;
                    self.reconcile(&named).await;
                    if let Some(guard) = pending.take() {
                        guard.ready();
                    }
                    Ok(())
                }
                ZdsEvent::Del { uid } => {
                    named.remove(&uid);
                    if snapshot_done {
                        self.remove(&uid).await;
                    }
                    Ok(())
                }
                ZdsEvent::Invalid { reason } => Err(reason),
            };
            if let Err(reason) = &result {
                tracing::warn!(%reason, "ZDS message refused");
                self.inner
                    .metrics
                    .counter("ambit_zds_refused_messages_total", &())
                    .increment(1);
            }
            client.ack(result).await?;
        }
        Ok(())
    }

    async fn add(
        &self,
        uid: String,
        info: ambit_zds::WorkloadInfo,
        netns: OwnedFd,
    ) -> Result<(), String> {
        let service_account = if info.service_account.is_empty() {
            "default"
        } else {
            &info.service_account
        };
        let identity = Identity::new(&self.inner.trust_domain, &info.namespace, service_account)
            .map_err(|e| format!("pod {uid} ({}/{}): {e}", info.namespace, info.name))?;
        let id = netns_id(&netns);
        let mut pods = self.inner.pods.lock().await;
        if let Some(existing) = pods.get(&uid) {
            if existing.netns_id == id {
                return Ok(());
            }
            tracing::info!(%uid, "pod sandbox recreated; restarting its proxies");
            if let Some(old) = pods.remove(&uid) {
                self.stop_in_background(uid.clone(), old);
            }
        }
        let spec = PodSpec {
            uid: uid.clone(),
            namespace: info.namespace.clone(),
            name: info.name.clone(),
            identity: identity.clone(),
        };
        let sockets = (self.inner.sockets_for)(netns);
        let addrs = ListenAddrs::unspecified(&self.inner.inputs.config);
        let running = RunningPod::start(&self.inner.inputs, spec, sockets, addrs).map_err(|e| {
            format!(
                "pod {}/{} ({uid}): cannot start its listeners: {e}",
                info.namespace, info.name
            )
        })?;
        self.inner
            .metrics
            .counter("workload_manager_proxies_started_total", &())
            .increment(1);
        pods.insert(
            uid.clone(),
            PodEntry {
                running,
                netns_id: id,
            },
        );
        self.inner
            .metrics
            .gauge("workload_manager_active_proxy_count", &())
            .set(pods.len() as f64);
        self.inner
            .status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                uid.clone(),
                PodState {
                    name: info.name.clone(),
                    namespace: info.namespace.clone(),
                    identity,
                    state: "Up",
                },
            );
        Ok(())
    }

    /// Drops every pod not named in the snapshot.
    async fn reconcile(&self, named: &HashSet<String>) {
        let stale: Vec<String> = self
            .inner
            .pods
            .lock()
            .await
            .keys()
            .filter(|uid| !named.contains(*uid))
            .cloned()
            .collect();
        for uid in stale {
            tracing::info!(%uid, "pod not in the agent's snapshot; stopping its proxies");
            self.remove(&uid).await;
        }
    }

    async fn remove(&self, uid: &str) {
        let mut pods = self.inner.pods.lock().await;
        if let Some(entry) = pods.remove(uid) {
            self.inner
                .metrics
                .gauge("workload_manager_active_proxy_count", &())
                .set(pods.len() as f64);
            drop(pods);
            self.stop_in_background(uid.to_string(), entry);
        }
    }

    fn stop_in_background(&self, uid: String, entry: PodEntry) {
        let inner = self.inner.clone();
        if let Some(status) = inner
            .status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(&uid)
        {
            status.state = "Draining";
        }
        tokio::spawn(async move {
            let identity = entry.running.context.spec.identity.clone();
            entry.running.shutdown(inner.drain_deadline).await;
            inner
                .metrics
                .counter("workload_manager_proxies_stopped_total", &())
                .increment(1);
            inner
                .status
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&uid);
            let still_used = inner
                .pods
                .lock()
                .await
                .values()
                .any(|p| p.running.context.spec.identity == identity);
            if !still_used {
                inner.inputs.certs.forget(&identity);
            }
        });
    }

    /// Drains every pod (process shutdown).
    pub async fn shutdown_all(&self, deadline: Duration) {
        let pods: Vec<PodEntry> = self
            .inner
            .pods
            .lock()
            .await
            .drain()
            .map(|(_, p)| p)
            .collect();
        let stops = pods.into_iter().map(|p| p.running.shutdown(deadline));
        futures::future::join_all(stops).await;
    }
}
