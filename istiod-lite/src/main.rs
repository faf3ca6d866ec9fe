//! istiod-lite: `istiod-lite --config-dir DIR --ca-dir DIR --tokens FILE`, or
//! `istiod-lite --kubernetes [--kubeconfig PATH | --kube-url URL]`.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use ambit_core::http::{Handler, text};
use ambit_core::metrics::Registry;
use ambit_core::readiness::Readiness;
use ambit_identity::Identity;
use ambit_mesh::translate::MeshSettings;
use ambit_proto::ca::istio_certificate_service_server::IstioCertificateServiceServer;
use anyhow::Context;
use clap::Parser;
use http::StatusCode;
use istiod_lite::ca::CaService;
use istiod_lite::kube_ca::CaOptions;
use istiod_lite::store::Store;
use istiod_lite::xds::{XdsServer, describe_metrics};
use tonic::transport::{Server, ServerTlsConfig};

#[derive(Parser)]
#[command(
    name = "istiod-lite",
    version,
    about = "Ambit's control plane: CA and delta xDS"
)]
struct Args {
    /// Directory of cluster objects (multi-document YAML), re-read on change. Exactly one of
    /// --config-dir and --kubernetes is required.
    #[arg(long)]
    config_dir: Option<PathBuf>,
    /// Read cluster objects from the Kubernetes API server (watching every kind translated).
    #[arg(long)]
    kubernetes: bool,
    /// Kubeconfig file for --kubernetes (default: the in-cluster service account, else
    /// KUBECONFIG or ~/.kube/config).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// The API server's URL for --kubernetes, overriding the kubeconfig's (alone: plain, no
    /// credentials; for tests).
    #[arg(long)]
    kube_url: Option<String>,
    /// Where the CA lives (generated on first start; ca-cert.pem, ca-key.pem, root-cert.pem).
    /// Required outside Kubernetes mode; in Kubernetes mode the CA is kept in Secrets of
    /// --system-namespace unless this is given.
    #[arg(long)]
    ca_dir: Option<PathBuf>,
    /// Tokens file: {"tokens": [{"token": "...", "node": "node-1"}]}. Required outside
    /// Kubernetes mode; in Kubernetes mode callers are checked with TokenReview unless given.
    #[arg(long)]
    tokens: Option<PathBuf>,
    /// gRPC (CA and xDS) over TLS.
    #[arg(long, default_value = "0.0.0.0:15012")]
    listen: SocketAddr,
    /// Metrics (/metrics) and readiness (/ready).
    #[arg(long, default_value = "0.0.0.0:15014")]
    monitoring: SocketAddr,
    /// Trust domain.
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// Cluster id.
    #[arg(long, default_value = "Kubernetes")]
    cluster_id: String,
    /// Extra DNS names on the serving certificate.
    #[arg(long = "dns-name")]
    dns_names: Vec<String>,
    /// IP addresses on the serving certificate.
    #[arg(long = "ip")]
    ips: Vec<IpAddr>,
    /// Lifetime of workload certificates when none is asked for.
    #[arg(long, default_value = "24h", value_parser = ambit_core::config::parse_duration_arg)]
    default_ttl: Duration,
    /// Longest lifetime granted.
    #[arg(long, default_value = "2160h", value_parser = ambit_core::config::parse_duration_arg)]
    max_ttl: Duration,
    /// The control plane's namespace (Kubernetes mode keeps the CA's Secrets there).
    #[arg(long, default_value = "istio-system")]
    system_namespace: String,
    /// Accounts (`namespace/name`, comma-separated) that may obtain identities of pods on their
    /// own node (ImpersonatedIdentity); everyone else gets only its own identity.
    #[arg(
        long,
        default_value = "istio-system/ztunnel",
        value_delimiter = ',',
        value_parser = istiod_lite::ca::parse_node_account
    )]
    trusted_node_accounts: Vec<String>,
    /// Log format: text or json.
    #[arg(long, default_value = "text")]
    log_format: String,
    /// Kubernetes mode: the image of the waypoint Deployments created for Gateways of class
    /// istio-waypoint (default ambit/waypoint:<version>).
    #[arg(long)]
    waypoint_image: Option<String>,
    /// Kubernetes mode: where waypoints reach istiod-lite's xDS and CA (default
    /// https://istiod.<system-namespace>.svc:15012).
    #[arg(long)]
    waypoint_xds_address: Option<String>,
    /// Kubernetes mode: the OTLP/HTTP collector generated waypoints send trace spans to (e.g.
    /// http://otel-collector.observability:4318); none: no export.
    #[arg(long, value_parser = parse_endpoint)]
    waypoint_tracing_endpoint: Option<String>,
    /// Kubernetes mode: percent of new traces generated waypoints sample (0-100; with
    /// --waypoint-tracing-endpoint).
    #[arg(long, default_value_t = 1.0, value_parser = parse_percent)]
    waypoint_trace_sampling: f64,
    /// Kubernetes mode: do not create waypoint Deployments, Services and ServiceAccounts or write
    /// Gateway, route and Service status (another controller does).
    #[arg(long)]
    no_waypoint_controller: bool,
    /// On SIGTERM, how long in-flight calls get to finish before istiod-lite exits anyway (xDS
    /// streams are closed at once; their clients reconnect).
    #[arg(long, default_value = "5s", value_parser = ambit_core::config::parse_duration_arg)]
    drain_deadline: Duration,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _log =
        ambit_core::logging::init(args.log_format.parse().map_err(anyhow::Error::msg)?, "info")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    // Both ports first: a port already taken stops the process before it touches the CA or the
    // cluster.
    let monitoring = tokio::net::TcpListener::bind(args.monitoring)
        .await
        .with_context(|| format!("--monitoring {}", args.monitoring))?;
    let listener = tonic::transport::server::TcpIncoming::bind(args.listen)
        .with_context(|| format!("--listen {}", args.listen))?
        .with_nodelay(Some(true));
    let metrics = Registry::new();
    describe_metrics(&metrics);
    istiod_lite::ca::describe_metrics(&metrics);
    let readiness = Readiness::new();
    let store = Store::new();
    let ca_options = CaOptions {
        ca_dir: args.ca_dir.clone(),
        tokens: args.tokens.clone(),
        system_namespace: args.system_namespace.clone(),
        trust_domain: args.trust_domain.clone(),
    };
    let source = config_source(&args)?;
    // Kubernetes mode: one client for the config watch, the CA's Secrets, TokenReview and root
    // ConfigMaps.
    let kube_client: Option<kube::Client> = match &source {
        ConfigSource::Kubernetes(options) => Some(
            ambit_kube::client::connect(options)
                .await
                .map_err(|e| anyhow::anyhow!("connecting to the Kubernetes API server: {e:#}"))?,
        ),
        ConfigSource::Directory(_) => None,
    };
    let ca_setup = istiod_lite::kube_ca::setup(kube_client.as_ref(), &ca_options, &store).await?;
    let (ca, auth) = (ca_setup.ca.clone(), ca_setup.auth.clone());

    let settings = MeshSettings {
        trust_domain: args.trust_domain.clone(),
        cluster_id: args.cluster_id.clone(),
        ..MeshSettings::default()
    };
    match (&source, &kube_client) {
        (ConfigSource::Kubernetes(_), Some(client)) => {
            if !args.no_waypoint_controller {
                let waypoints = istiod_lite::waypoint_controller::WaypointSettings {
                    image: args.waypoint_image.clone().unwrap_or_else(
                        istiod_lite::waypoint_controller::WaypointSettings::default_image,
                    ),
                    xds_address: args.waypoint_xds_address.clone().unwrap_or_else(|| {
                        istiod_lite::waypoint_controller::WaypointSettings::default_xds_address(
                            &args.system_namespace,
                        )
                    }),
                    mesh: settings.clone(),
                    tracing: args.waypoint_tracing_endpoint.clone().map(|endpoint| {
                        istiod_lite::waypoint_controller::WaypointTracing {
                            endpoint,
                            sampling: args.waypoint_trace_sampling,
                        }
                    }),
                };
                tracing::info!(
                    image = %waypoints.image,
                    xds = %waypoints.xds_address,
                    "waypoint controller on"
                );
                let (controller, feed) =
                    istiod_lite::waypoint_controller::Controller::new(client.clone(), waypoints);
                tokio::spawn(feed);
                tokio::spawn(controller.run(Duration::from_millis(100)));
            }
            tokio::spawn(istiod_lite::source::watch_kubernetes(
                client.clone(),
                settings,
                store.clone(),
                metrics.clone(),
                Duration::from_millis(100),
                Some(readiness.register("config")),
            ));
        }
        (ConfigSource::Directory(dir), _) => {
            tokio::spawn(istiod_lite::source::watch_directory(
                dir.clone(),
                settings,
                store.clone(),
                metrics.clone(),
                Duration::from_millis(500),
                Some(readiness.register("config")),
            ));
        }
        (ConfigSource::Kubernetes(_), None) => unreachable!("Kubernetes mode has a client"),
    }

    let identity = Identity::new(&args.trust_domain, "istio-system", "istiod")?;
    let mut dns = vec![
        "istiod.istio-system.svc".to_string(),
        "istiod".to_string(),
        "localhost".to_string(),
    ];
    dns.extend(args.dns_names.clone());
    let serving =
        ca.issue_serving_certificate(&identity, &dns, &args.ips, Duration::from_secs(365 * 86400))?;
    let tls = ServerTlsConfig::new().identity(tonic::transport::Identity::from_pem(
        serving.chain_pem.join(""),
        &serving.key_pem,
    ));

    let (_drain_trigger, drain) = ambit_core::drain::new();
    let handler = {
        let metrics = metrics.clone();
        let readiness = readiness.clone();
        Handler::new(move |request| {
            let metrics = metrics.clone();
            let readiness = readiness.clone();
            async move {
                match request.uri().path() {
                    "/metrics" => text(StatusCode::OK, metrics.render()),
                    "/ready" => {
                        let (status, body) = readiness.report();
                        text(
                            StatusCode::from_u16(status)
                                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                            body,
                        )
                    }
                    _ => text(StatusCode::NOT_FOUND, "try /metrics or /ready\n"),
                }
            }
        })
    };
    tokio::spawn(ambit_core::http::serve(monitoring, handler, drain));

    let ca_service = CaService {
        ca,
        store: store.clone(),
        auth: auth.clone(),
        trusted_node_accounts: args.trusted_node_accounts.clone(),
        trust_domain: args.trust_domain.clone(),
        default_ttl: args.default_ttl,
        max_ttl: args.max_ttl,
        metrics: metrics.clone(),
    };
    let shutdown = tokio_util::sync::CancellationToken::new();
    let xds = XdsServer {
        store,
        auth,
        metrics,
        debounce: Duration::from_millis(100),
        shutdown: shutdown.clone(),
    };
    tracing::info!(listen = %args.listen, monitoring = %args.monitoring, "istiod-lite serving");
    let signalled = shutdown.clone();
    let serving = Server::builder()
        .tls_config(tls)?
        .add_service(IstioCertificateServiceServer::new(ca_service))
        .add_service(istiod_lite::xds::service(xds))
        .serve_with_incoming_shutdown(listener, async move {
            shutdown_signal().await;
            // Ends every xDS stream; tonic then stops accepting and waits for in-flight calls.
            signalled.cancel();
        });
    tokio::pin!(serving);
    let deadline = args.drain_deadline;
    tokio::select! {
        served = &mut serving => served?,
        () = async {
            shutdown.cancelled().await;
            tokio::time::sleep(deadline).await;
        } => tracing::warn!(?deadline, "calls still open at the drain deadline; stopping anyway"),
    }
    tracing::info!("istiod-lite stopped");
    Ok(())
}

/// Where cluster objects come from.
enum ConfigSource {
    /// `--config-dir`.
    Directory(PathBuf),
    /// `--kubernetes` (with `--kubeconfig`/`--kube-url`).
    Kubernetes(ambit_kube::client::ConnectOptions),
}

/// Exactly one of `--config-dir` and `--kubernetes`; the connection flags only with the latter.
/// A percentage, 0 to 100.
fn parse_percent(value: &str) -> Result<f64, String> {
    match value.parse::<f64>() {
        Ok(p) if (0.0..=100.0).contains(&p) => Ok(p),
        _ => Err(format!("{value:?} is not a percentage from 0 to 100")),
    }
}

/// An http:// URL (the waypoint's OTLP export is plaintext).
fn parse_endpoint(value: &str) -> Result<String, String> {
    if value.starts_with("http://") {
        Ok(value.trim_end_matches('/').to_string())
    } else {
        Err(format!(
            "{value:?} is not an http:// URL (waypoints export OTLP/HTTP in plaintext)"
        ))
    }
}

fn config_source(args: &Args) -> anyhow::Result<ConfigSource> {
    match (&args.config_dir, args.kubernetes) {
        (Some(_), true) => anyhow::bail!(
            "--config-dir and --kubernetes are exclusive: read cluster objects either from a \
             directory or from the API server"
        ),
        (None, false) => anyhow::bail!(
            "no config source: pass --config-dir DIR (objects as YAML files) or --kubernetes \
             (watch the API server)"
        ),
        (Some(dir), false) => {
            let reach = "it says how to reach the API server";
            let waypoints = "waypoints are deployed only in Kubernetes mode";
            for (flag, given, why) in [
                ("--kubeconfig", args.kubeconfig.is_some(), reach),
                ("--kube-url", args.kube_url.is_some(), reach),
                ("--waypoint-image", args.waypoint_image.is_some(), waypoints),
                (
                    "--waypoint-xds-address",
                    args.waypoint_xds_address.is_some(),
                    waypoints,
                ),
                (
                    "--waypoint-tracing-endpoint",
                    args.waypoint_tracing_endpoint.is_some(),
                    waypoints,
                ),
            ] {
                if given {
                    anyhow::bail!("{flag} needs --kubernetes ({why})");
                }
            }
            Ok(ConfigSource::Directory(dir.clone()))
        }
        (None, true) => Ok(ConfigSource::Kubernetes(
            ambit_kube::client::ConnectOptions {
                kubeconfig: args.kubeconfig.clone(),
                url: args.kube_url.clone(),
            },
        )),
    }
}

/// SIGTERM or SIGINT: stop accepting, let in-flight calls finish (tonic's graceful shutdown).
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    tracing::info!("shutting down: closing xDS streams, finishing in-flight calls");
}
