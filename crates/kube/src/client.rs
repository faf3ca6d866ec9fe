//! Building a Kubernetes client.

use std::path::PathBuf;

use anyhow::Context as _;
use kube::config::{KubeConfigOptions, Kubeconfig};

/// Where to find the API server and its credentials.
#[derive(Clone, Debug, Default)]
pub struct ConnectOptions {
    /// A kubeconfig file to use (its current context) instead of the in-cluster service account
    /// or `KUBECONFIG`.
    pub kubeconfig: Option<PathBuf>,
    /// Overrides the server address. Given alone (no `kubeconfig`), the client talks to this URL
    /// with no credentials at all: for tests against a local plain-HTTP server or `kubectl proxy`.
    pub url: Option<String>,
}

/// In-cluster service account when in a pod, else KUBECONFIG / the given file; `url` overrides
/// the server address (tests: the fake server's plain-HTTP URL).
///
/// Precedence: `kubeconfig` if given; else `url` alone if given; else the in-cluster service
/// account when `KUBERNETES_SERVICE_HOST` is set; else `KUBECONFIG` or `~/.kube/config`.
pub async fn connect(options: &ConnectOptions) -> anyhow::Result<kube::Client> {
    let url = options
        .url
        .as_deref()
        .map(|u| {
            u.parse::<http::Uri>()
                .with_context(|| format!("--kube-url {u:?} is not a valid URL"))
        })
        .transpose()?;
    let mut config = if let Some(path) = &options.kubeconfig {
        let file = Kubeconfig::read_from(path)
            .with_context(|| format!("reading kubeconfig {}", path.display()))?;
        kube::Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
            .await
            .with_context(|| format!("loading kubeconfig {}", path.display()))?
    } else if let Some(url) = &url {
        kube::Config::new(url.clone())
    } else if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() {
        kube::Config::incluster()
            .context("loading the in-cluster service account (KUBERNETES_SERVICE_HOST is set)")?
    } else {
        kube::Config::from_kubeconfig(&KubeConfigOptions::default())
            .await
            .context(
                "no Kubernetes configuration: not in a pod (KUBERNETES_SERVICE_HOST unset) and no \
                 usable KUBECONFIG or ~/.kube/config; pass --kubeconfig",
            )?
    };
    if let Some(url) = url {
        config.cluster_url = url;
    }
    let server = config.cluster_url.to_string();
    kube::Client::try_from(config)
        .with_context(|| format!("building a Kubernetes client for {server}"))
}
