//! A TLS gRPC server fixture on loopback with a certificate from a test CA, as istiod-lite serves.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use ambit_identity::Identity;
use ambit_identity::ca::CertificateAuthority;
use ambit_xds::{ControlPlane, TokenSource};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::server::Router;
use tonic::transport::{Server, ServerTlsConfig};

pub struct TlsFixture {
    pub ca: CertificateAuthority,
    pub root_file: tempfile::NamedTempFile,
}

impl TlsFixture {
    pub fn new() -> Self {
        let ca = CertificateAuthority::generate_root(
            "cluster.local",
            Duration::from_secs(10 * 24 * 3600),
        )
        .unwrap();
        let root_file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(root_file.path(), ca.root_pem()).unwrap();
        Self { ca, root_file }
    }

    pub fn server(&self) -> Server {
        let id = Identity::new("cluster.local", "istio-system", "istiod").unwrap();
        let serving = self
            .ca
            .issue_serving_certificate(
                &id,
                &["istiod.istio-system.svc".to_string()],
                &[IpAddr::V4(Ipv4Addr::LOCALHOST)],
                Duration::from_secs(3600),
            )
            .unwrap();
        let tls = ServerTlsConfig::new().identity(tonic::transport::Identity::from_pem(
            serving.chain_pem.join(""),
            &serving.key_pem,
        ));
        Server::builder().tls_config(tls).unwrap()
    }

    /// Serves `router` on a fresh loopback port.
    pub async fn spawn(router: Router) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(router.serve_with_incoming(TcpListenerStream::new(listener)));
        addr
    }

    pub fn control_plane(&self, addr: SocketAddr, token: TokenSource) -> ControlPlane {
        ControlPlane {
            address: format!("https://127.0.0.1:{}", addr.port()),
            root_ca: Some(self.root_file.path().to_path_buf()),
            server_name: None,
            token,
            cluster_id: "lab-cluster".into(),
            headers: vec![("X-Extra".into(), "yes".into())],
            connect_timeout: Duration::from_secs(5),
        }
    }
}
