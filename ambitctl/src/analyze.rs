//! `ambitctl analyze`: see [`ambit_analyze`].

use std::path::PathBuf;

/// `ambitctl analyze` arguments.
#[derive(clap::Args)]
pub(crate) struct Args {
    /// YAML files or directories to analyze offline (repeatable). Without it: the running lab.
    #[arg(short = 'f', long = "filename")]
    files: Vec<PathBuf>,
    /// Analyze a Kubernetes cluster (KUBECONFIG or ~/.kube/config) instead.
    #[arg(long, conflicts_with = "files")]
    cluster: bool,
    /// Output format: `text` or `json`.
    #[arg(short = 'o', long = "output", default_value = "text")]
    output: String,
    /// Exit non-zero when a problem at or above this severity is found: Info, Warning, Error.
    #[arg(long = "failure-threshold", default_value = "Error")]
    failure_threshold: String,
}

/// Runs `ambitctl analyze`.
pub(crate) fn run(_args: Args) -> anyhow::Result<i32> {
    anyhow::bail!("ambitctl analyze is being built")
}
