//! The per-pod proxies: for every pod ztunnel serves, an outbound listener (15001), an inbound
//! plaintext listener (15006) and an inbound HBONE listener (15008), all created through the
//! pod's [`SocketFactory`] (inside its network namespace in in-pod mode), sharing one HBONE
//! connection pool per pod, and drained together when the pod leaves.

pub mod inbound;
pub mod metrics;
pub mod outbound;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ambit_core::drain::{self, DrainMode, DrainOutcome, DrainTrigger, DrainWatcher};
use ambit_core::metrics::Registry;
use ambit_hbone::{Pool, PoolConfig, TlsDialer};
use ambit_identity::store::CertStore;
use ambit_identity::{Identity, WorkloadCertificate};
use ambit_state::Workload;
use ambit_telemetry::LiveConnections;
use tokio::task::JoinSet;

use crate::mesh::MeshState;
use crate::socket::SocketFactory;

/// Proxy settings shared by every pod.
#[derive(Clone, Debug)]
pub struct ProxyConfig {
    /// The network this node is on (empty = default).
    pub network: String,
    /// This cluster's id (metrics, baggage).
    pub cluster_id: String,
    /// TCP connect limit for upstream connections (and HBONE dial + handshake).
    pub connect_timeout: Duration,
    /// How long a TLS handshake on 15008 may take.
    pub handshake_timeout: Duration,
    /// Outbound capture port.
    pub outbound_port: u16,
    /// Inbound plaintext capture port.
    pub inbound_plaintext_port: u16,
    /// Inbound HBONE port.
    pub hbone_port: u16,
    /// HBONE pool settings.
    pub pool: PoolConfig,
    /// Bind the application-side socket to the client's address so the app sees the real peer.
    pub preserve_source: bool,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            network: String::new(),
            cluster_id: "Kubernetes".to_string(),
            connect_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            outbound_port: 15001,
            inbound_plaintext_port: 15006,
            hbone_port: 15008,
            pool: PoolConfig::default(),
            preserve_source: true,
        }
    }
}

impl ProxyConfig {
    /// True when `port` is one of ztunnel's own; tunnels to them are refused (loops).
    pub fn is_reserved_port(&self, port: u16) -> bool {
        port == self.outbound_port || port == self.inbound_plaintext_port || port == self.hbone_port
    }
}

/// What every pod's proxies share.
#[derive(Clone, Debug)]
pub struct ProxyInputs {
    /// Settings.
    pub config: Arc<ProxyConfig>,
    /// Workloads, services and policies.
    pub mesh: MeshState,
    /// Per-identity certificates.
    pub certs: CertStore,
    /// Metrics registry.
    pub metrics: Registry,
    /// Every connection open right now, for `/config_dump`.
    pub connections: LiveConnections,
}

/// The pod a set of proxies serves, as the node agent described it.
#[derive(Clone, Debug)]
pub struct PodSpec {
    /// The Kubernetes pod uid (ZDS's key).
    pub uid: String,
    /// Pod namespace.
    pub namespace: String,
    /// Pod name.
    pub name: String,
    /// The pod's identity (its service account in the mesh trust domain).
    pub identity: Identity,
}

/// Why a pod cannot serve HBONE yet.
#[derive(Debug, thiserror::Error)]
pub enum ServerTlsError {
    /// No certificate for the pod's identity (the CA is unreachable or refuses).
    #[error("no certificate for the pod: {0}")]
    Certificate(#[from] ambit_identity::store::StoreError),
    /// The certificate cannot make a TLS server configuration.
    #[error("TLS server configuration: {0}")]
    Config(#[from] ambit_identity::tls::TlsError),
}

/// Per-pod state the proxy tasks share.
pub struct PodContext {
    /// What the pod is.
    pub spec: PodSpec,
    /// Where its sockets are created.
    pub sockets: Arc<dyn SocketFactory>,
    /// HBONE connections opened on its behalf (presenting its certificate).
    pub pool: Pool,
    /// The pod uid its connections are listed under in the live-connections table.
    owner: Arc<str>,
    /// Label sets of its connections, by the workloads at their ends.
    pub labels: metrics::LabelCache,
    /// The inbound TLS config, rebuilt when the certificate rotates.
    server_tls: Mutex<Option<(Arc<WorkloadCertificate>, Arc<rustls::ServerConfig>)>>,
    /// The pod's `baggage` header, sent with its CONNECTs and its 200s.
    pub baggage: outbound::BaggageCache,
}

impl std::fmt::Debug for PodContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodContext")
            .field("spec", &self.spec)
            .finish_non_exhaustive()
    }
}

impl PodContext {
    /// The pod uid, shared by its connections' rows in the live-connections table.
    pub fn owner(&self) -> Arc<str> {
        self.owner.clone()
    }

    /// The pod's workload as xDS describes it (metrics labels, inbound checks).
    pub fn workload(&self, mesh: &MeshState) -> Option<Arc<Workload>> {
        mesh.index()
            .local_workload(&self.spec.namespace, &self.spec.name)
            .cloned()
    }

    /// The TLS server config presenting the pod's current certificate.
    async fn server_tls(
        &self,
        certs: &CertStore,
    ) -> Result<Arc<rustls::ServerConfig>, ServerTlsError> {
        let cert = certs.get(&self.spec.identity).await?;
        let mut cached = self
            .server_tls
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some((current, config)) = cached.as_ref()
            && Arc::ptr_eq(current, &cert)
        {
            return Ok(config.clone());
        }
        let config = ambit_identity::tls::server_config(&cert)?;
        *cached = Some((cert, config.clone()));
        Ok(config)
    }
}

/// Where a pod's three listeners bind.
#[derive(Clone, Copy, Debug)]
pub struct ListenAddrs {
    /// Outbound capture.
    pub outbound: SocketAddr,
    /// Inbound plaintext capture.
    pub inbound_plaintext: SocketAddr,
    /// Inbound HBONE.
    pub hbone: SocketAddr,
}

impl ListenAddrs {
    /// Every address of the pod's namespace (in-pod mode).
    pub fn unspecified(config: &ProxyConfig) -> Self {
        Self::on(IpAddr::V4(Ipv4Addr::UNSPECIFIED), config)
    }

    /// One IP (host mode, tests).
    pub fn on(ip: IpAddr, config: &ProxyConfig) -> Self {
        Self {
            outbound: SocketAddr::new(ip, config.outbound_port),
            inbound_plaintext: SocketAddr::new(ip, config.inbound_plaintext_port),
            hbone: SocketAddr::new(ip, config.hbone_port),
        }
    }
}

/// A pod's running proxies.
#[derive(Debug)]
pub struct RunningPod {
    /// The pod.
    pub context: Arc<PodContext>,
    /// Where the listeners bound (port 0 resolved).
    pub addrs: ListenAddrs,
    drain: DrainTrigger,
    tasks: JoinSet<()>,
}

impl RunningPod {
    /// Starts the pod's listeners. Fails (nothing left running) if any cannot bind.
    pub fn start(
        inputs: &ProxyInputs,
        spec: PodSpec,
        sockets: Arc<dyn SocketFactory>,
        addrs: ListenAddrs,
    ) -> std::io::Result<Self> {
        let outbound = sockets.listener(addrs.outbound)?;
        let plaintext = sockets.listener(addrs.inbound_plaintext)?;
        let hbone = sockets.listener(addrs.hbone)?;
        let bound = ListenAddrs {
            outbound: outbound.local_addr()?,
            inbound_plaintext: plaintext.local_addr()?,
            hbone: hbone.local_addr()?,
        };
        let dial_sockets = sockets.clone();
        let connect_timeout = inputs.config.connect_timeout;
        let dialer = TlsDialer::from_store(inputs.certs.clone()).with_tcp_connector(move |key| {
            let sockets = dial_sockets.clone();
            let dst = key.dst;
            async move { crate::socket::connect(&*sockets, dst, None, connect_timeout).await }
        });
        let context = Arc::new(PodContext {
            owner: Arc::from(spec.uid.as_str()),
            labels: metrics::LabelCache::default(),
            spec,
            sockets,
            pool: Pool::new(inputs.config.pool.clone(), Arc::new(dialer)),
            server_tls: Mutex::new(None),
            baggage: outbound::BaggageCache::default(),
        });
        // Fetch the pod's certificate now so the first connection does not wait for the CA.
        let certs = inputs.certs.clone();
        let identity = context.spec.identity.clone();
        tokio::spawn(async move {
            if let Err(e) = certs.get(&identity).await {
                tracing::warn!(%identity, error = %e, "certificate prefetch failed; will retry on demand");
            }
        });
        let (drain, watcher) = drain::new();
        let mut tasks = JoinSet::new();
        tasks.spawn(outbound::serve(
            inputs.clone(),
            context.clone(),
            outbound,
            watcher.clone(),
        ));
        tasks.spawn(inbound::serve_plaintext(
            inputs.clone(),
            context.clone(),
            plaintext,
            watcher.clone(),
        ));
        tasks.spawn(inbound::serve_hbone(
            inputs.clone(),
            context.clone(),
            hbone,
            watcher,
        ));
        tracing::info!(pod = %format!("{}/{}", context.spec.namespace, context.spec.name), uid = %context.spec.uid, outbound = %bound.outbound, inbound = %bound.inbound_plaintext, hbone = %bound.hbone, "pod proxies started");
        Ok(Self {
            context,
            addrs: bound,
            drain,
            tasks,
        })
    }

    /// Stops accepting, lets open connections finish until `deadline`, then closes the rest.
    pub async fn shutdown(mut self, deadline: Duration) -> DrainOutcome {
        let outcome = self
            .drain
            .start_drain_and_wait(DrainMode::Graceful, deadline)
            .await;
        self.tasks.shutdown().await;
        tracing::info!(pod = %format!("{}/{}", self.context.spec.namespace, self.context.spec.name), graceful = outcome.graceful, "pod proxies stopped");
        outcome
    }
}

/// Runs `accept_one` for each connection on `listener` until drain starts. Each connection task
/// holds a watcher clone so the drain waits for it.
pub(crate) async fn accept_loop<F, Fut>(
    listener: tokio::net::TcpListener,
    drain: DrainWatcher,
    name: &'static str,
    mut accept_one: F,
) where
    F: FnMut(tokio::net::TcpStream, SocketAddr, DrainWatcher) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                // `TCP_NODELAY` comes from the listener (`socket::SocketFactory::listener`).
                Ok((stream, peer)) => {
                    tokio::spawn(accept_one(stream, peer, drain.clone()));
                }
                Err(e) => {
                    tracing::warn!(listener = name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = drain.signaled() => return,
        }
    }
}
