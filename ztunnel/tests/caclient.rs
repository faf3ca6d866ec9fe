//! The CA client against a real tonic `IstioCertificateService` over TLS: impersonation metadata,
//! credentials, TTL, the chain handed to the certificate store, and refusals surfacing with the
//! CA's reason while other identities keep working.

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use ambit_identity::Identity;
use ambit_identity::ca::CertificateAuthority;
use ambit_identity::store::{CertStore, StoreConfig};
use ambit_proto::ca::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer,
};
use ambit_proto::ca::{IstioCertificateRequest, IstioCertificateResponse};
use ambit_xds::{CaClient, TokenSource};
use prost_types::value::Kind;
use support::tls_server::TlsFixture;
use tonic::{Request, Response, Status};

#[derive(Debug, Clone)]
struct Seen {
    impersonated: Option<String>,
    authorization: Option<String>,
    clusterid: Option<String>,
    validity: i64,
}

struct FakeCa {
    ca: CertificateAuthority,
    seen: Arc<Mutex<Vec<Seen>>>,
    refuse_namespace: &'static str,
}

#[tonic::async_trait]
impl IstioCertificateService for FakeCa {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let header = |name: &str| {
            request
                .metadata()
                .get(name)
                .map(|v| v.to_str().unwrap().to_string())
        };
        let authorization = header("authorization");
        let clusterid = header("clusterid");
        let body = request.into_inner();
        let impersonated = body
            .metadata
            .as_ref()
            .and_then(|m| m.fields.get("ImpersonatedIdentity"))
            .and_then(|v| match &v.kind {
                Some(Kind::StringValue(s)) => Some(s.clone()),
                _ => None,
            });
        self.seen.lock().unwrap().push(Seen {
            impersonated: impersonated.clone(),
            authorization,
            clusterid,
            validity: body.validity_duration,
        });
        let identity: Identity = impersonated
            .ok_or_else(|| Status::unauthenticated("no identity asked for"))?
            .parse()
            .map_err(|e| Status::invalid_argument(format!("{e}")))?;
        if identity.namespace() == self.refuse_namespace {
            return Err(Status::unauthenticated(
                "no pod with this service account runs on the caller's node",
            ));
        }
        let chain = self
            .ca
            .sign_csr(
                &body.csr,
                &identity,
                Duration::from_secs(body.validity_duration as u64),
            )
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(Response::new(IstioCertificateResponse {
            cert_chain: chain,
        }))
    }
}

#[tokio::test]
async fn fetches_pod_certificates_with_impersonation_and_refusals_name_the_reason() {
    let tls = TlsFixture::new();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let ca_for_server =
        CertificateAuthority::from_pem(&tls.ca.cert_pem(), &tls.ca.key_pem(), &[]).unwrap();
    let addr = TlsFixture::spawn(tls.server().add_service(IstioCertificateServiceServer::new(
        FakeCa {
            ca: ca_for_server,
            seen: seen.clone(),
            refuse_namespace: "other-node",
        },
    )))
    .await;
    let client = CaClient::new(
        tls.control_plane(addr, TokenSource::Static("node-token".into())),
        true,
    );
    let store = CertStore::new(
        Arc::new(client),
        StoreConfig {
            ttl: Duration::from_secs(7200),
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_millis(200),
            ..StoreConfig::default()
        },
    );
    let client_id = Identity::new("cluster.local", "demo", "client").unwrap();
    let cert = tokio::time::timeout(Duration::from_secs(10), store.get(&client_id))
        .await
        .expect("store answered")
        .expect("certificate issued");
    assert_eq!(cert.identity(), &client_id);
    let lifetime = cert.not_after().duration_since(cert.not_before()).unwrap();
    assert!(lifetime <= Duration::from_secs(7200) && lifetime > Duration::from_secs(7000));

    let first = seen.lock().unwrap()[0].clone();
    assert_eq!(
        first.impersonated.as_deref(),
        Some("spiffe://cluster.local/ns/demo/sa/client")
    );
    assert_eq!(first.authorization.as_deref(), Some("Bearer node-token"));
    assert_eq!(first.clusterid.as_deref(), Some("lab-cluster"));
    assert_eq!(first.validity, 7200);

    let refused = Identity::new("cluster.local", "other-node", "x").unwrap();
    let error = tokio::time::timeout(Duration::from_secs(10), store.get(&refused))
        .await
        .expect("store answered")
        .expect_err("CA refuses");
    let text = error.to_string();
    assert!(
        text.contains("no pod with this service account runs on the caller's node"),
        "{text}"
    );
    assert!(
        text.contains("spiffe://cluster.local/ns/other-node/sa/x"),
        "{text}"
    );

    // A failing identity does not stall another one.
    let echo = Identity::new("cluster.local", "demo", "echo").unwrap();
    let cert = tokio::time::timeout(Duration::from_secs(10), store.get(&echo))
        .await
        .expect("store answered")
        .expect("certificate issued");
    assert_eq!(cert.identity(), &echo);
}

#[tokio::test]
async fn an_unreachable_ca_is_reported_as_unavailable() {
    let tls = TlsFixture::new();
    // Bind and drop to get a port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let client = CaClient::new(tls.control_plane(port, TokenSource::None), true);
    let store = CertStore::new(Arc::new(client), StoreConfig::default());
    let id = Identity::new("cluster.local", "demo", "client").unwrap();
    let error = tokio::time::timeout(Duration::from_secs(10), store.get(&id))
        .await
        .expect("store answered")
        .expect_err("nobody listens");
    let text = error.to_string();
    assert!(text.contains("unreachable"), "{text}");
    assert!(
        text.contains(&format!("127.0.0.1:{}", port.port())),
        "{text}"
    );
}
