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

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The binary serving: xDS and the CA on `listen`, `/metrics` and `/ready` on `monitoring`; its
/// stderr is kept (read on a thread so a chatty binary never blocks on a full pipe) for failure
/// messages. Killed when dropped.
pub(crate) struct Serving {
    pub(crate) binary: Binary,
    pub(crate) listen: SocketAddr,
    pub(crate) monitoring: SocketAddr,
    stderr: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Serving {
    /// Starts `istiod-lite <args> --listen .. --monitoring ..` on two free loopback ports and
    /// waits until both answer. Ports are chosen before the binary binds them, so another process
    /// can take one in between: a start that fails with "address in use" is retried on new ports
    /// (up to 5 times); any other early exit fails the test with what the binary printed.
    pub(crate) async fn start(args: &[&str]) -> Serving {
        for _ in 0..5 {
            let listen = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
            let monitoring = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
            let mut child = istiod_lite()
                .args(args)
                .args(["--listen", &listen.to_string()])
                .args(["--monitoring", &monitoring.to_string()])
                .stdout(std::process::Stdio::null())
                .spawn()
                .unwrap();
            let mut pipe = child.stderr.take().unwrap();
            let stderr = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
            let reader = {
                let stderr = stderr.clone();
                std::thread::spawn(move || {
                    let mut chunk = [0u8; 4096];
                    while let Ok(n @ 1..) = std::io::Read::read(&mut pipe, &mut chunk) {
                        stderr.lock().unwrap().extend_from_slice(&chunk[..n]);
                    }
                })
            };
            let mut serving = Serving {
                binary: Binary(child),
                listen,
                monitoring,
                stderr,
                reader: Some(reader),
            };
            let deadline = tokio::time::Instant::now() + STARTUP;
            loop {
                if let Some(status) = serving.binary.0.try_wait().unwrap() {
                    let printed = serving.stderr_after_exit();
                    if printed.contains("Address already in use") {
                        break;
                    }
                    panic!("istiod-lite {args:?} exited with {status} while starting: {printed}");
                }
                if http_status(monitoring, "/ready").await.is_some()
                    && tokio::net::TcpStream::connect(listen).await.is_ok()
                {
                    return serving;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "istiod-lite {args:?} not serving on {listen} and {monitoring} within \
                     {STARTUP:?}: {}",
                    serving.stderr()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        panic!("istiod-lite {args:?}: every try found a chosen port taken");
    }

    /// What the binary printed on stderr so far.
    pub(crate) fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }

    /// Everything the binary printed on stderr; call once it has exited.
    pub(crate) fn stderr_after_exit(&mut self) -> String {
        if let Some(reader) = self.reader.take() {
            reader.join().unwrap();
        }
        self.stderr()
    }

    /// Panics with what the binary printed if it is no longer running.
    pub(crate) fn assert_running(&mut self) {
        if let Some(status) = self.binary.0.try_wait().unwrap() {
            panic!(
                "istiod-lite exited with {status}: {}",
                self.stderr_after_exit()
            );
        }
    }
}

/// Bound on the binary's start (it generates a CA and, in Kubernetes mode, lists the cluster).
const STARTUP: Duration = Duration::from_secs(30);

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
