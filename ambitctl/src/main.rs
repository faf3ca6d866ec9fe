//! `ambitctl`: the operator CLI: `lab` (the whole mesh on one Linux host), `analyze`, `explain`
//! and `ztunnel-config`.

mod analyze;
mod explain;
mod lab;
mod source;
mod ztunnel_config;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "ambitctl", about = "Ambit's command-line tool")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// A whole ambient mesh on this host: nodes and pods in network namespaces, the real
    /// istiod-lite, ztunnel, cni-agent and CNI plugin.
    Lab {
        #[command(subcommand)]
        command: LabCommand,
    },
    /// Find problems in mesh configuration: every problem as a line with a stable code, its
    /// severity, the object and field at fault and a fix hint. Reads files (`-f`), the running
    /// lab (the default when no file is given) or a cluster (`--cluster`).
    Analyze(analyze::Args),
    /// Explain one flow: identities, capture, waypoint, route and every authorization policy at
    /// each hop, then the verdict, decided by the same code the proxies run.
    Explain(explain::Args),
    /// What a node's ztunnel holds, with istioctl's columns: workloads, services, policies,
    /// certificates and live connections.
    ZtunnelConfig(ztunnel_config::Args),
}

#[derive(Subcommand)]
enum LabCommand {
    /// Build the lab and start every component; returns once every ztunnel is ready and every
    /// ambient pod is captured. The lab keeps running.
    Up {
        /// Number of nodes.
        #[arg(long, default_value_t = 2)]
        nodes: usize,
        /// A directory of cluster YAML (namespaces, pods, services, policies) to start from.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Start the demo: namespace demo (ambient) with client and two echo pods (v1, v2),
        /// service echo behind a waypoint that routes `x-canary: true` to v2 and splits the rest
        /// 90/10, policies at L4 and L7; namespace legacy (not enrolled) with a client.
        #[arg(long)]
        demo: bool,
    },
    /// Nodes, pods, services, waypoints and component health.
    Status {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Run a command inside a pod: `ambitctl lab exec demo/client -- curl http://echo.demo/`.
    Exec {
        /// `namespace/pod`.
        pod: String,
        /// The command.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Add or change objects (file or directory of YAML). Invalid input changes nothing.
    Apply {
        /// File or directory.
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
    },
    /// Remove objects named in a file or directory.
    Delete {
        /// File or directory.
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
    },
    /// Restart one component (istiod-lite, ztunnel / cni-agent on a node, or a waypoint), as a
    /// rollout would.
    Restart {
        /// istiod-lite, ztunnel, cni-agent or waypoint.
        component: String,
        /// The node (ztunnel, cni-agent).
        #[arg(long)]
        node: Option<String>,
        /// The waypoint's Gateway as `namespace/name` (waypoint).
        #[arg(long)]
        name: Option<String>,
    },
    /// Serve a live node-level dashboard (charts from the lab's Prometheus) on localhost.
    Dashboard(lab::dashboard::Args),
    /// Remove everything the lab made (also after a crash or a half-finished `up`).
    Down,
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Lab { command } => match command {
            LabCommand::Up {
                nodes,
                config,
                demo,
            } => lab::up(nodes, config, demo),
            LabCommand::Status { json } => lab::status(json),
            LabCommand::Exec { pod, command } => lab::exec(&pod, &command),
            LabCommand::Apply { file } => lab::apply(&file),
            LabCommand::Delete { file } => lab::delete(&file),
            LabCommand::Restart {
                component,
                node,
                name,
            } => lab::restart(&component, node.as_deref(), name.as_deref()),
            LabCommand::Dashboard(args) => lab::dashboard::run(args),
            LabCommand::Down => lab::down(),
        },
        Command::Analyze(args) => analyze::run(args),
        Command::Explain(args) => explain::run(args),
        Command::ZtunnelConfig(args) => ztunnel_config::run(args),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("ambitctl: {e:#}");
            std::process::exit(1);
        }
    }
}
