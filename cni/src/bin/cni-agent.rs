//! The node agent binary: `run` the agent, or `install`/`uninstall` the plugin on the node.

use std::path::PathBuf;
use std::time::Duration;

use ambit_cni::agent::{Agent, AgentConfig, KubernetesSource};
use ambit_cni::install::{InstallConfig, install, uninstall};
use ambit_cni::protocol::DEFAULT_AGENT_SOCKET;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cni-agent",
    version,
    about = "Ambit's node agent: enrollment, in-pod redirection, ZDS"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent.
    Run {
        /// This node's name.
        #[arg(long, env = "NODE_NAME")]
        node: String,
        /// Socket the plugin talks to.
        #[arg(long, default_value = DEFAULT_AGENT_SOCKET)]
        plugin_socket: PathBuf,
        /// ZDS socket ztunnel connects to.
        #[arg(long, default_value = "/var/run/ztunnel/ztunnel.sock")]
        zds_socket: PathBuf,
        /// State directory (also holds the enrollment hint and the plugin's queue).
        #[arg(long, default_value = "/var/run/ambit")]
        state_dir: PathBuf,
        /// Lab mode: read namespace and pod labels from this directory of cluster YAML.
        #[arg(long, conflicts_with = "kubernetes")]
        config_dir: Option<PathBuf>,
        /// Kubernetes mode: watch this node's pods and all namespaces through the API server.
        #[arg(long)]
        kubernetes: bool,
        /// Kubernetes mode: kubeconfig file (default: in-cluster service account, `$KUBECONFIG`).
        #[arg(long, requires = "kubernetes")]
        kubeconfig: Option<PathBuf>,
        /// Kubernetes mode: API server URL (overrides the kubeconfig's).
        #[arg(long, requires = "kubernetes")]
        kube_url: Option<String>,
        /// Output format of logs: text or json.
        #[arg(long, default_value = "text")]
        log_format: String,
    },
    /// Copy the plugin into the CNI binary directory and join the node's network configuration.
    Install(InstallArgs),
    /// Undo `install` (and remove the node's probe SNAT table when no pod is captured).
    Uninstall(InstallArgs),
}

#[derive(clap::Args)]
struct InstallArgs {
    /// CNI binary directory.
    #[arg(long, default_value = "/opt/cni/bin")]
    bin_dir: PathBuf,
    /// CNI configuration directory.
    #[arg(long, default_value = "/etc/cni/net.d")]
    conf_dir: PathBuf,
    /// The plugin binary to install (default: `ambit-cni` next to this program).
    #[arg(long)]
    plugin: Option<PathBuf>,
    /// A specific .conflist file name.
    #[arg(long)]
    conflist: Option<String>,
    /// Agent socket the plugin should use.
    #[arg(long, default_value = DEFAULT_AGENT_SOCKET)]
    agent_socket: String,
    /// Start ambient pods even when the agent is down (they are captured when it returns).
    #[arg(long)]
    fail_open: bool,
}

fn install_config(args: &InstallArgs) -> anyhow::Result<InstallConfig> {
    let plugin = match &args.plugin {
        Some(p) => p.clone(),
        None => std::env::current_exe()?.with_file_name("ambit-cni"),
    };
    Ok(InstallConfig {
        bin_dir: args.bin_dir.clone(),
        conf_dir: args.conf_dir.clone(),
        plugin_binary: plugin,
        entry: serde_json::json!({
            "type": "ambit-cni",
            "agentSocket": args.agent_socket,
            "failClosed": !args.fail_open,
        }),
        conflist: args.conflist.clone(),
    })
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Install(args) => {
            let report = install(&install_config(&args)?)?;
            println!(
                "{} {}",
                if report.changed {
                    "installed into"
                } else {
                    "already installed in"
                },
                report.conflist.display()
            );
            Ok(())
        }
        Command::Uninstall(args) => {
            let removed = uninstall(&install_config(&args)?)?;
            println!(
                "{}",
                if removed {
                    "uninstalled"
                } else {
                    "nothing to uninstall"
                }
            );
            let netns = std::fs::File::open("/proc/self/ns/net")?;
            use ambit_redirect::host::{HostRemoval, TABLE, remove_if_empty};
            // The CNI configuration is restored either way; the table is a separate report.
            match remove_if_empty(
                std::os::fd::AsFd::as_fd(&netns),
                "the node's network namespace",
            ) {
                Ok(HostRemoval::Absent) => {}
                Ok(HostRemoval::Removed) => println!("probe SNAT table inet {TABLE} removed"),
                Ok(HostRemoval::Kept(ips)) => println!(
                    "probe SNAT table inet {TABLE} kept: {} captured pod address(es) still need it",
                    ips.len()
                ),
                Err(e) => eprintln!("probe SNAT table inet {TABLE} not checked: {e}"),
            }
            Ok(())
        }
        Command::Run {
            node,
            plugin_socket,
            zds_socket,
            state_dir,
            config_dir,
            kubernetes,
            kubeconfig,
            kube_url,
            log_format,
        } => {
            let format = log_format.parse().map_err(anyhow::Error::msg)?;
            let _log = ambit_core::logging::init(format, "info")?;
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            runtime.block_on(async move {
                let (agent, plugin, zds) = Agent::start(AgentConfig {
                    node_name: node,
                    plugin_socket,
                    zds_socket,
                    state_dir,
                    config_dir,
                    kubernetes: kubernetes.then_some(KubernetesSource {
                        kubeconfig,
                        url: kube_url,
                    }),
                    host_netns: None,
                    redirect: ambit_redirect::RedirectConfig::default(),
                    reconcile_every: Duration::from_secs(1),
                })
                .await?;
                tracing::info!("cni-agent started");
                tokio::select! {
                    () = agent.run(plugin, zds) => {}
                    () = ztunnel_free_shutdown() => tracing::info!("cni-agent stopping; captured pods stay captured"),
                }
                agent.shutdown();
                anyhow::Ok(())
            })
        }
    }
}

async fn ztunnel_free_shutdown() {
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
}
