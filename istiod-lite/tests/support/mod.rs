//! What the istiod-lite integration tests share: bounded waits, the serving certificate of a test
//! control plane, and ztunnel's view of where that control plane is.

#![allow(dead_code)] // each test file uses a part

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::Duration;

use ambit_identity::Identity;
use ambit_identity::ca::CertificateAuthority;
use tonic::transport::ServerTlsConfig;
use ztunnel::control::{ControlPlane, TokenSource};

/// Bound on every wait.
pub(crate) const WAIT: Duration = Duration::from_secs(10);

/// Polls `check` every 10 ms until it holds; panics naming `what` after [`WAIT`].
pub(crate) async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while tokio::time::Instant::now() < deadline {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("never happened within {WAIT:?}: {what}");
}

/// TLS for a test control plane on 127.0.0.1: istiod's identity, signed by `ca`.
pub(crate) fn serving_tls(ca: &CertificateAuthority) -> ServerTlsConfig {
    let serving = ca
        .issue_serving_certificate(
            &Identity::new("cluster.local", "istio-system", "istiod").unwrap(),
            &[],
            &[IpAddr::V4(Ipv4Addr::LOCALHOST)],
            Duration::from_secs(3600),
        )
        .unwrap();
    ServerTlsConfig::new().identity(tonic::transport::Identity::from_pem(
        serving.chain_pem.join(""),
        &serving.key_pem,
    ))
}

/// ztunnel's settings for the control plane on 127.0.0.1:`port`, trusting `root`, sending
/// `token` (none when `None`).
pub(crate) fn control_plane(port: u16, root: PathBuf, token: Option<&str>) -> ControlPlane {
    ControlPlane {
        address: format!("https://127.0.0.1:{port}"),
        root_ca: Some(root),
        server_name: None,
        token: token.map_or(TokenSource::None, |t| TokenSource::Static(t.into())),
        cluster_id: "Kubernetes".into(),
        headers: Vec::new(),
        connect_timeout: Duration::from_secs(5),
    }
}
