//! `ambitctl explain`: see [`ambit_explain`].

/// `ambitctl explain` arguments.
#[derive(clap::Args)]
pub(crate) struct Args {
    /// The source pod, `namespace/pod`.
    #[arg(long)]
    from: String,
    /// The destination, `host:port` or `ip:port` (a Service name as a pod would dial it, a
    /// VIP, or a pod IP).
    #[arg(long)]
    to: String,
    /// The HTTP method, for L7 routes and policy.
    #[arg(long)]
    method: Option<String>,
    /// The HTTP path.
    #[arg(long)]
    path: Option<String>,
    /// A request header `K=V` (repeatable).
    #[arg(long = "header")]
    headers: Vec<String>,
    /// Explain against a Kubernetes cluster's state instead of the lab's.
    #[arg(long)]
    cluster: bool,
    /// Output format: `text` or `json`.
    #[arg(short = 'o', long = "output", default_value = "text")]
    output: String,
}

/// Runs `ambitctl explain`.
pub(crate) fn run(_args: Args) -> anyhow::Result<i32> {
    anyhow::bail!("ambitctl explain is being built")
}
