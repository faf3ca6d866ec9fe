//! What the istiod-lite integration tests share: bounded waits, the serving certificate of a test
//! control plane, ztunnel's view of where that control plane is, and running the binary.

#![allow(dead_code)] // each test file uses a part

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use ambit_core::metrics::Registry;
use ambit_core::readiness::Readiness;
use ambit_identity::Identity;
use ambit_identity::ca::CertificateAuthority;
use ambit_xds::{ControlPlane, TokenSource, XdsConfig};
use tonic::transport::ServerTlsConfig;
use ztunnel::mesh::MeshState;

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

/// The built binary, killed when dropped.
pub(crate) struct Binary(pub(crate) std::process::Child);

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(crate) fn istiod_lite() -> std::process::Command {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_istiod-lite"));
    command
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    command
}

/// Runs the binary expecting it to refuse its command line; returns what it printed.
pub(crate) fn refused(args: &[&str]) -> String {
    let output = istiod_lite().args(args).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(!output.status.success(), "{args:?} was accepted: {text}");
    text
}

pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `GET path` on `addr`: the status code, or None if nothing answers.
pub(crate) async fn http_status(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .ok()?;
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(2), stream.read_to_end(&mut response))
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(&response).to_string();
    let code = text.split(' ').nth(1)?.parse().ok()?;
    Some((code, text))
}

/// Node 1's ztunnel xDS client against `control_plane`, filling `state` and registering `xds` in
/// `readiness`; it runs until the returned task is aborted.
pub(crate) fn start_xds_client(
    control_plane: ControlPlane,
    state: &MeshState,
    readiness: &Readiness,
) -> tokio::task::JoinHandle<()> {
    let client = ztunnel::xds::client(
        XdsConfig {
            control_plane,
            node: ambit_proto::envoy_core::Node {
                id: "ztunnel~10.0.0.1~zt.istio-system~istio-system.svc.cluster.local".into(),
                ..Default::default()
            },
            backoff_initial: Duration::from_millis(10),
            backoff_max: Duration::from_millis(100),
        },
        state,
        Registry::new(),
        Some(readiness.register("xds")),
    );
    let (trigger, drain) = ambit_core::drain::new();
    tokio::spawn(async move {
        // A dropped trigger counts as a drain: keep it as long as the client runs.
        let _trigger = trigger;
        client.run(drain).await;
    })
}

/// A kube-rs client for the scripted API server.
pub(crate) async fn kube_client(server: &ambit_fake_apiserver::FakeApiServer) -> kube::Client {
    ambit_kube::client::connect(&ambit_kube::client::ConnectOptions {
        url: Some(server.url()),
        kubeconfig: None,
    })
    .await
    .expect("client for the fake API server")
}
