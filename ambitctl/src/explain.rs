//! `ambitctl explain`: see [`ambit_explain`].

use std::path::PathBuf;

use ambit_explain::{Flow, parse_header};
use ambit_mesh::translate::{Cluster, MeshSettings};
use anyhow::bail;

use crate::source::{self, Origin};

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
    /// The HTTP method, for L7 routes and policy (default GET when the port speaks HTTP).
    #[arg(long)]
    method: Option<String>,
    /// The HTTP path (default /).
    #[arg(long)]
    path: Option<String>,
    /// A request header `K=V` (repeatable).
    #[arg(long = "header")]
    headers: Vec<String>,
    /// Explain against a Kubernetes cluster's state instead of the lab's.
    #[arg(long, conflicts_with = "files")]
    cluster: bool,
    /// Explain against YAML files or directories instead of the lab (offline; pods need their
    /// IPs in status.podIP and Services their clusterIP).
    #[arg(short = 'f', long = "filename", value_name = "PATH")]
    files: Vec<PathBuf>,
    /// The mesh's trust domain (istiod-lite's --trust-domain).
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// The root namespace (mesh-wide policies).
    #[arg(long, default_value = "istio-system")]
    root_namespace: String,
    /// Output format: `text` or `json`.
    #[arg(short = 'o', long = "output", default_value = "text")]
    output: String,
}

/// Runs `ambitctl explain`: exit 0 when the flow reaches an application, 1 when the mesh
/// refuses or cannot deliver it, 2 when it cannot be explained (bad arguments, no objects).
pub(crate) fn run(args: Args) -> anyhow::Result<i32> {
    let json = match args.output.as_str() {
        "json" => true,
        "text" => false,
        other => bail!("-o {other:?}: expected text or json"),
    };
    let origin = if args.cluster {
        Origin::Cluster
    } else if !args.files.is_empty() {
        Origin::Files(args.files.clone())
    } else {
        Origin::Lab
    };
    let loaded = match source::load(&origin) {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("error: {e:#}");
            return Ok(2);
        }
    };
    for error in &loaded.errors {
        eprintln!("warning: skipped an object that does not parse: {error}");
    }
    let headers = args
        .headers
        .iter()
        .map(|h| parse_header(h))
        .collect::<Result<Vec<_>, _>>();
    let headers = match headers {
        Ok(headers) => headers,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(2);
        }
    };
    let flow = Flow {
        from: args.from,
        to: args.to,
        method: args.method,
        path: args.path,
        headers,
    };
    let settings = MeshSettings {
        trust_domain: args.trust_domain,
        root_namespace: args.root_namespace,
        ..MeshSettings::default()
    };
    let cluster = Cluster::from_objects(loaded.objects);
    let explained = match ambit_explain::explain(&cluster, &settings, &flow) {
        Ok(explained) => explained,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(2);
        }
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&explained)?);
    } else {
        print!("{}", explained.to_text());
    }
    Ok(if explained.verdict.allowed { 0 } else { 1 })
}
