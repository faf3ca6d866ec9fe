//! Wiring: the certificate, the xDS subscriptions (addresses, routes, policies), the HBONE
//! listener, and the operator endpoints; drains on SIGTERM.
//!
//! Two runtimes, as in ztunnel: the caller's runs the data path; a single-threaded control
//! runtime runs xDS, certificate fetches and the admin, metrics and readiness endpoints, so a
//! saturated data path cannot delay configuration or probes.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ambit_core::drain::{self, DrainMode};
use ambit_core::endpoints::{metrics_handler, readiness_handler};
use ambit_core::logging::LogHandle;
use ambit_core::metrics::Registry;
use ambit_core::readiness::Readiness;
use ambit_core::runtime::{ControlRuntime, bind};
use ambit_hbone::{Pool, PoolConfig, TlsDialer};
use ambit_identity::Identity;
use ambit_identity::store::{CertStore, StoreConfig};
use ambit_proto::envoy_core::Node;
use ambit_proto::waypoint as wp;
use ambit_proto::workload as pb;
use ambit_state::Addresses;
use ambit_xds::{CaClient, Rejection, XdsClient, XdsConfig};
use anyhow::Context;

use crate::admin::{AdminState, admin_handler};
use crate::config::Config;
use crate::hbone::HboneDial;
use crate::proxy::{L7Config, Proxy, ProxySettings};
use crate::routes::RouteTable;
use crate::telemetry::Telemetry;

/// The routes and policies received so far, by resource name; every change recompiles the
/// proxy's [`L7Config`] from them.
#[derive(Debug, Default)]
pub struct L7Resources {
    routes: BTreeMap<String, wp::Route>,
    policies: BTreeMap<String, wp::Policy>,
    destinations: BTreeMap<String, wp::DestinationPolicy>,
}

impl L7Resources {
    /// Applies route upserts and removals; routes that do not compile are rejected (and the
    /// previous version of that route, if any, is kept).
    fn apply_routes(
        &mut self,
        upserts: &[(String, wp::Route)],
        removals: &[String],
    ) -> Vec<Rejection> {
        for name in removals {
            self.routes.remove(name);
        }
        let mut rejected = Vec::new();
        for (name, route) in upserts {
            let (_, errors) = RouteTable::build([route]);
            match errors.into_iter().next() {
                Some(error) => rejected.push(Rejection {
                    name: name.clone(),
                    reason: error.reason,
                }),
                None => {
                    self.routes.insert(name.clone(), route.clone());
                }
            }
        }
        rejected
    }

    /// Applies policy upserts and removals; invalid policies are rejected (and the previous
    /// version kept).
    fn apply_policies(
        &mut self,
        upserts: &[(String, wp::Policy)],
        removals: &[String],
    ) -> Vec<Rejection> {
        for name in removals {
            self.policies.remove(name);
        }
        let mut rejected = Vec::new();
        for (name, policy) in upserts {
            match ambit_authz::Policy::from_waypoint(policy) {
                Ok(_) => {
                    self.policies.insert(name.clone(), policy.clone());
                }
                Err(error) => rejected.push(Rejection {
                    name: name.clone(),
                    reason: error.to_string(),
                }),
            }
        }
        rejected
    }

    /// Applies destination policy upserts and removals (nothing in them can fail to compile).
    fn apply_destinations(
        &mut self,
        upserts: &[(String, wp::DestinationPolicy)],
        removals: &[String],
    ) -> Vec<Rejection> {
        for name in removals {
            self.destinations.remove(name);
        }
        for (name, policy) in upserts {
            self.destinations.insert(name.clone(), policy.clone());
        }
        Vec::new()
    }

    /// Compiles everything held.
    fn compile(&self) -> L7Config {
        let (routes, _) = RouteTable::build(self.routes.values());
        let mut policies = ambit_authz::PolicyStore::new();
        for policy in self.policies.values() {
            if let Ok(policy) = ambit_authz::Policy::from_waypoint(policy) {
                policies.insert(policy);
            }
        }
        L7Config {
            routes,
            policies,
            route_names: self.routes.keys().cloned().collect(),
            destinations: crate::traffic::Destinations::build(self.destinations.values()),
        }
    }
}

/// Runs the waypoint until `stop` resolves, then drains.
pub async fn run(
    config: Config,
    log: Option<LogHandle>,
    stop: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let metrics = Registry::new();
    ambit_xds::describe_metrics(&metrics);
    // Istio's waypoints are Envoy proxies and report `component="proxy"`.
    ambit_core::process::register(&metrics, "proxy", env!("CARGO_PKG_VERSION"));
    let telemetry = Telemetry::new(metrics.clone());
    let readiness = Readiness::new();
    let (trigger, drain) = drain::new();
    let control = ControlRuntime::start("waypoint-control")?;
    let identity = Identity::new(
        &config.trust_domain,
        &config.pod_namespace,
        &config.service_account,
    )
    .with_context(|| {
        format!(
            "the waypoint's identity from TRUST_DOMAIN={:?}, POD_NAMESPACE={:?}, SERVICE_ACCOUNT={:?}",
            config.trust_domain, config.pod_namespace, config.service_account
        )
    })?;
    let certs = CertStore::new(
        Arc::new(CaClient::new(config.ca.clone(), false)),
        StoreConfig {
            ttl: config.secret_ttl,
            runtime: Some(control.handle().clone()),
            ..StoreConfig::default()
        },
    );
    let state = Addresses::new(&config.node_name);
    let pool_config = PoolConfig {
        connect_timeout: config.connect_timeout,
        ..PoolConfig::default()
    };
    // A pool per data-path worker: an HBONE connection is driven by the worker that opened it
    // and used only by that worker's requests ([`crate::worker`]).
    let pools = (0..config.worker_threads)
        .map(|_| {
            Pool::new(
                pool_config.clone(),
                Arc::new(TlsDialer::from_store(certs.clone())),
            )
        })
        .collect();
    let dial = Arc::new(
        HboneDial::per_worker(pools, identity.clone(), config.instance_ip, 15008)
            .context("WAYPOINT_WORKER_THREADS is at least 1")?,
    );
    let (tracer, exporter) = crate::tracing::Tracer::new(&config.tracing, &metrics);
    if let Some(exporter) = exporter {
        tracing::info!(
            endpoint = ?config.tracing.endpoint,
            sampling = config.tracing.sampling,
            service = %config.tracing.service_name,
            "exporting trace spans over OTLP/HTTP"
        );
        control.handle().spawn(exporter.run());
    }
    let proxy = Proxy::with_tracer(
        ProxySettings {
            gateway: format!("{}/{}", config.gateway_namespace, config.gateway_name),
            gateway_class: config.gateway_class.clone(),
            network: config.network.clone(),
            sniff_timeout: config.sniff_timeout,
            instance_ip: Some(config.instance_ip),
        },
        state.clone(),
        dial,
        telemetry,
        tracer,
    );

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
    let hbone = bind(config.hbone_addr, "HBONE").await?;

    // The certificate: fetched at start so the first connection does not wait for it.
    let cert_ready = readiness.register("certificate");
    {
        let certs = certs.clone();
        let identity = identity.clone();
        control.handle().spawn(async move {
            let mut delay = Duration::from_millis(200);
            loop {
                match certs.get(&identity).await {
                    Ok(_) => {
                        cert_ready.ready();
                        return;
                    }
                    Err(error) => {
                        tracing::warn!(%identity, %error, "waypoint certificate not available yet");
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(15));
                    }
                }
            }
        });
    }

    let config_ready = readiness.register("config");
    let resources = Arc::new(Mutex::new(L7Resources::default()));
    let node = node(&config);
    let client = {
        let addresses = state.clone();
        let (routes_in, routes_proxy) = (resources.clone(), proxy.clone());
        let (policies_in, policies_proxy) = (resources.clone(), proxy.clone());
        let (destinations_in, destinations_proxy) = (resources.clone(), proxy.clone());
        XdsClient::builder(
            XdsConfig {
                control_plane: config.xds.clone(),
                node,
                backoff_initial: Duration::from_millis(10),
                backoff_max: Duration::from_secs(15),
            },
            metrics.clone(),
        )
        .subscribe::<pb::Address>(
            move |upserts: &[(String, pb::Address)], removals: &[String]| {
                addresses.apply(upserts, removals)
            },
        )
        .subscribe::<wp::Route>(
            move |upserts: &[(String, wp::Route)], removals: &[String]| {
                let mut held = routes_in.lock().unwrap_or_else(|p| p.into_inner());
                let rejected = held.apply_routes(upserts, removals);
                routes_proxy.set_l7(held.compile());
                rejected
            },
        )
        .subscribe::<wp::Policy>(
            move |upserts: &[(String, wp::Policy)], removals: &[String]| {
                let mut held = policies_in.lock().unwrap_or_else(|p| p.into_inner());
                let rejected = held.apply_policies(upserts, removals);
                policies_proxy.set_l7(held.compile());
                rejected
            },
        )
        .subscribe::<wp::DestinationPolicy>(
            move |upserts: &[(String, wp::DestinationPolicy)], removals: &[String]| {
                let mut held = destinations_in.lock().unwrap_or_else(|p| p.into_inner());
                let rejected = held.apply_destinations(upserts, removals);
                destinations_proxy.set_l7(held.compile());
                rejected
            },
        )
        .ready(Some(config_ready))
        .build()
    };
    control.handle().spawn(client.run(drain.clone()));

    let admin = AdminState {
        proxy: proxy.clone(),
        state: state.clone(),
        certs: certs.clone(),
        log,
        config: config.effective.clone(),
    };
    let scrape_certs = certs.clone();
    let scrape_proxy = proxy.clone();
    let before_scrape = Arc::new(move |registry: &Registry| {
        ambit_xds::certificate_gauges(registry, &scrape_certs);
        // Refreshes the ejected-endpoints gauge.
        scrape_proxy.traffic().ejected();
    });
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
    // The data path: one single-threaded runtime per worker thread, all accepting from the
    // HBONE listener ([`crate::worker`]). They keep serving the connections they hold until
    // this function returns (`stopped` dropped), after the drain.
    let hbone = Arc::new(
        hbone
            .into_std()
            .context("the HBONE listener for the worker threads")?,
    );
    let (stopped_tx, stopped) = tokio::sync::watch::channel(());
    let serve = {
        let (proxy, certs, identity, drain) = (proxy, certs, identity.clone(), drain.clone());
        move |index: usize| async move {
            let listener = match hbone
                .try_clone()
                .and_then(tokio::net::TcpListener::from_std)
            {
                Ok(listener) => listener,
                Err(error) => {
                    tracing::error!(worker = index, %error, "worker cannot accept HBONE connections");
                    return;
                }
            };
            crate::hbone::serve(listener, proxy, certs, identity, drain).await;
        }
    };
    let linger = move || async move {
        let mut stopped = stopped;
        // Ends when the sender is dropped.
        while stopped.changed().await.is_ok() {}
    };
    let _workers = crate::worker::start(config.worker_threads, serve, linger)
        .context("starting the data-path worker threads")?;
    tracing::info!(
        gateway = %format!("{}/{}", config.gateway_namespace, config.gateway_name),
        %identity,
        hbone = %config.hbone_addr,
        stats = %config.stats_addr,
        readiness = %config.readiness_addr,
        "waypoint started"
    );
    drop(drain);

    stop.await;
    tracing::info!(deadline = ?config.drain_deadline, "draining");
    let outcome = trigger
        .start_drain_and_wait(DrainMode::Graceful, config.drain_deadline)
        .await;
    tracing::info!(graceful = outcome.graceful, "waypoint stopped");
    drop(stopped_tx);
    Ok(())
}

/// How the waypoint introduces itself to the control plane: the id names it a waypoint, the
/// metadata names its Gateway (istiod-lite sends it only that Gateway's routes and policies).
fn node(config: &Config) -> Node {
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
        ("GATEWAY_NAME", string(&config.gateway_name)),
        ("GATEWAY_NAMESPACE", string(&config.gateway_namespace)),
    ];
    Node {
        id: crate::config::node_id(config.instance_ip, &config.pod_name, &config.pod_namespace),
        cluster: config.cluster_id.clone(),
        metadata: Some(prost_types::Struct {
            fields: fields
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
        }),
        ..Node::default()
    }
}

pub use ambit_core::runtime::shutdown_signal;
