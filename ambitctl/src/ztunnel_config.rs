//! `ambitctl ztunnel-config`: a node's ztunnel state from its `/config_dump`, as istioctl shows it.

/// `ambitctl ztunnel-config` arguments.
#[derive(clap::Args)]
pub(crate) struct Args {
    /// workloads, services, policies, certificates, connections or all.
    what: String,
    /// The lab node whose ztunnel to ask (default: every node).
    #[arg(long)]
    node: Option<String>,
    /// Output format: `short` (table) or `json`.
    #[arg(short = 'o', long = "output", default_value = "short")]
    output: String,
}

/// Runs `ambitctl ztunnel-config`.
pub(crate) fn run(_args: Args) -> anyhow::Result<i32> {
    anyhow::bail!("ambitctl ztunnel-config is being built")
}
