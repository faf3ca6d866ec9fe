//! `ambitctl lab dashboard`: a live node-level dashboard page served on localhost.

/// `ambitctl lab dashboard` arguments.
#[derive(clap::Args)]
pub(crate) struct Args {
    /// The local address to serve the page on.
    #[arg(long, default_value = "127.0.0.1:3000")]
    listen: String,
}

/// Runs `ambitctl lab dashboard`.
pub(crate) fn run(_args: Args) -> anyhow::Result<i32> {
    anyhow::bail!("ambitctl lab dashboard is being built")
}
