//! Wiring: builds every part from [`Config`], serves the operator endpoints, starts the config
//! source, then (once configuration is in) the in-pod manager, and drains on SIGTERM.
//!
//! Two runtimes: the caller's (the data path: in-pod listeners and every proxied connection) and
//! a single-threaded control runtime of ztunnel's own for the config source, certificate fetches
//! and refreshes, and the admin, metrics and readiness endpoints, so that traffic saturating the
//! data path's threads cannot delay configuration, certificates or kubelet probes, and a burst of
//! those cannot take threads from traffic.

use std::sync::Arc;
use std::time::Duration;

use ambit_core::drain::{self, DrainMode, DrainWatcher};
use ambit_core::logging::LogHandle;
use ambit_core::metrics::Registry;
use ambit_core::readiness::Readiness;
use ambit_core::runtime::{ControlRuntime, bind};
use ambit_identity::ca::CertificateAuthority;
use ambit_identity::store::{CertStore, CertificateSource, StoreConfig};
use ambit_proto::envoy_core::Node;
use ambit_xds::{CaClient, XdsConfig};
use anyhow::Context;

use crate::admin::{AdminState, admin_handler};
use crate::config::{Config, ConfigSource};
use crate::inpod::InPodManager;
use crate::mesh::MeshState;
use crate::proxy::ProxyInputs;
use ambit_core::endpoints::{metrics_handler, readiness_handler};

/// The certificate source: the CA over gRPC, or a local CA directory.
fn certificate_source(config: &Config) -> anyhow::Result<Arc<dyn CertificateSource>> {
    if let Some(ca) = &config.ca {
        return Ok(Arc::new(CaClient::new(ca.clone(), true)));
    }
    let dir = config
        .local_ca_dir
        .as_ref()
        .context("neither CA_ADDRESS nor LOCAL_CA_DIR is set")?;
    let read = |name: &str| {
        std::fs::read_to_string(dir.join(name))
            .with_context(|| format!("reading {} from LOCAL_CA_DIR", dir.join(name).display()))
    };
    let ca = CertificateAuthority::from_pem(&read("ca-cert.pem")?, &read("ca-key.pem")?, &[])
        .with_context(|| format!("loading the CA in {}", dir.display()))?;
    Ok(Arc::new(ca))
}

/// Runs ztunnel until SIGTERM/SIGINT (or `stop`), then drains.
pub async fn run(
    config: Config,
    log: Option<LogHandle>,
    stop: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let metrics = Registry::new();
    crate::proxy::metrics::describe(&metrics);
    ambit_xds::describe_metrics(&metrics);
    ambit_core::process::register(&metrics, "ztunnel", env!("CARGO_PKG_VERSION"));
    let readiness = Readiness::new();
    let (trigger, drain) = drain::new();
    let mesh = MeshState::new(&config.node_name);
    let control = ControlRuntime::start("ztunnel-control")?;
    let certs = CertStore::new(
        certificate_source(&config)?,
        StoreConfig {
            ttl: config.secret_ttl,
            runtime: Some(control.handle().clone()),
            ..StoreConfig::default()
        },
    );
    let inputs = ProxyInputs {
        config: Arc::new(config.proxy.clone()),
        mesh: mesh.clone(),
        certs: certs.clone(),
        metrics: metrics.clone(),
        connections: ambit_telemetry::LiveConnections::new(),
    };

    // Bound on the control runtime, whose reactor then serves them.
    let (stats, ready_listener, admin_listener) = {
        let (stats, ready, admin) = (config.stats_addr, config.readiness_addr, config.admin_addr);
        control
            .handle()
            .spawn(async move {
                anyhow::Ok((
                    bind(stats, "metrics").await?,
                    bind(ready, "readiness").await?,
                    bind(admin, "admin").await?,
                ))
            })
            .await
            .context("the control runtime stopped")??
    };

    let config_ready = readiness.register("config");
    match &config.source {
        ConfigSource::Xds(control_plane) => {
            let node = Node {
                id: format!(
                    "ztunnel~{}~{}.{}~{}.svc.cluster.local",
                    config.instance_ip, config.pod_name, config.pod_namespace, config.pod_namespace
                ),
                cluster: config.cluster_id.clone(),
                ..Node::default()
            };
            let client = crate::xds::client(
                XdsConfig {
                    control_plane: control_plane.clone(),
                    node: node_with_metadata(node, &config),
                    backoff_initial: Duration::from_millis(10),
                    backoff_max: Duration::from_secs(15),
                },
                &mesh,
                metrics.clone(),
                Some(config_ready),
            );
            control.handle().spawn(client.run(drain.clone()));
        }
        ConfigSource::File(path) => {
            control.handle().spawn(crate::localconfig::watch(
                path.clone(),
                mesh.clone(),
                config.cluster_id.clone(),
                Duration::from_secs(1),
                Some(config_ready),
                drain.clone(),
            ));
        }
    }

    if config.zds_path.is_some() {
        // Istio's ztunnel dashboard plots both from the start; a proxy is never left pending
        // here (a pod whose listeners cannot start is refused over ZDS, not retried).
        metrics
            .gauge("workload_manager_active_proxy_count", &())
            .set(0.0);
        metrics.describe_gauge(
            "workload_manager_pending_proxy_count",
            "Pods announced over ZDS whose proxies are not started yet",
        );
        metrics
            .gauge("workload_manager_pending_proxy_count", &())
            .set(0.0);
    }
    let inpod = config.zds_path.as_ref().map(|path| {
        InPodManager::new(
            path.clone(),
            inputs.clone(),
            config.trust_domain.clone(),
            config.drain_deadline,
            metrics.clone(),
        )
    });
    if let Some(manager) = &inpod {
        let manager = manager.clone();
        let pending = readiness.register("zds-snapshot");
        let readiness = readiness.clone();
        let drain = drain.clone();
        tokio::spawn(async move {
            // Like upstream: take pods only once configuration has arrived.
            if !wait_for_config(&readiness, &drain).await {
                return;
            }
            manager.run(pending, readiness, drain).await;
        });
    }
    let admin = AdminState {
        mesh: mesh.clone(),
        certs: certs.clone(),
        log,
        config: config.effective.clone(),
        connections: inputs.connections.clone(),
        inpod: inpod.clone(),
    };
    let scrape_certs = certs.clone();
    let before_scrape =
        Arc::new(move |registry: &Registry| ambit_xds::certificate_gauges(registry, &scrape_certs));
    control.handle().spawn(ambit_core::http::serve(
        stats,
        metrics_handler(metrics.clone(), before_scrape),
        drain.clone(),
    ));
    control.handle().spawn(ambit_core::http::serve(
        ready_listener,
        readiness_handler(readiness.clone()),
        drain.clone(),
    ));
    control.handle().spawn(ambit_core::http::serve(
        admin_listener,
        admin_handler(admin),
        drain.clone(),
    ));
    tracing::info!(node = %config.node_name, stats = %config.stats_addr, admin = %config.admin_addr, readiness = %config.readiness_addr, "ztunnel started");
    drop(drain);

    stop.await;
    tracing::info!(deadline = ?config.drain_deadline, "draining");
    let outcome = trigger
        .start_drain_and_wait(DrainMode::Graceful, config.drain_deadline)
        .await;
    if let Some(manager) = &inpod {
        manager.shutdown_all(config.drain_deadline).await;
    }
    tracing::info!(graceful = outcome.graceful, "ztunnel stopped");
    Ok(())
}

async fn wait_for_config(readiness: &Readiness, drain: &DrainWatcher) -> bool {
    loop {
        if !readiness.pending().iter().any(|p| p == "config") {
            return true;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            _ = drain.signaled() => return false,
        }
    }
}

fn node_with_metadata(mut node: Node, config: &Config) -> Node {
    use prost_types::value::Kind;
    let string = |s: &str| prost_types::Value {
        kind: Some(Kind::StringValue(s.to_string())),
    };
    let fields = [
        ("NAME", string(&config.pod_name)),
        ("NAMESPACE", string(&config.pod_namespace)),
        ("INSTANCE_IPS", string(&config.instance_ip.to_string())),
        ("NODE_NAME", string(&config.node_name)),
        ("CLUSTER_ID", string(&config.cluster_id)),
    ];
    node.metadata = Some(prost_types::Struct {
        fields: fields
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
    });
    node
}

pub use ambit_core::runtime::shutdown_signal;
