//! Real mutual-TLS handshakes over loopback TCP, asserting what each side reports.

mod common;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ambit_identity::ca::CertificateAuthority;
use ambit_identity::tls::{self, TlsError, VerifiedPeer};
use ambit_identity::{Identity, WorkloadCertificate, csr};
use rustls::client::ResolvesClientCert;
use rustls::sign::CertifiedKey;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const HOUR: Duration = Duration::from_secs(3600);
const LIMIT: Duration = Duration::from_secs(20);

type ServerSide = Result<(tokio_rustls::server::TlsStream<TcpStream>, VerifiedPeer), TlsError>;
type ClientSide = Result<(tokio_rustls::client::TlsStream<TcpStream>, VerifiedPeer), TlsError>;

fn id(s: &str) -> Identity {
    s.parse().unwrap()
}

fn ca(trust_domain: &str) -> CertificateAuthority {
    CertificateAuthority::generate_root(trust_domain, 24 * HOUR).unwrap()
}

fn expired(ca: &CertificateAuthority, identity: &Identity) -> WorkloadCertificate {
    let now = SystemTime::now();
    ca.issue_with_validity(identity, now - 2 * HOUR, now - HOUR)
        .unwrap()
}

fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_seconds(time).to_string()
}

/// Runs one handshake over loopback TCP: `server_config` accepts, `client_config` connects.
async fn handshake(
    server_config: Arc<rustls::ServerConfig>,
    client_config: Arc<rustls::ClientConfig>,
) -> (ServerSide, ClientSide) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (socket, _) = listener.accept().await.unwrap();
        tls::accept(server_config, socket).await
    });
    let socket = TcpStream::connect(address).await.unwrap();
    let client = tokio::time::timeout(LIMIT, tls::connect(client_config, socket))
        .await
        .expect("client handshake finished in time");
    let server = tokio::time::timeout(LIMIT, server)
        .await
        .expect("server handshake finished in time")
        .unwrap();
    (server, client)
}

/// Mutual TLS between two workload certificates, the client expecting `expected`.
async fn mtls(
    server_cert: &WorkloadCertificate,
    client_cert: &WorkloadCertificate,
    expected: &[Identity],
) -> (ServerSide, ClientSide) {
    handshake(
        tls::server_config(server_cert).unwrap(),
        tls::client_config(client_cert, expected).unwrap(),
    )
    .await
}

/// After the server rejected the client's certificate (TLS 1.3: the client has already
/// finished), the client learns it on its first read.
async fn client_read_error(client: ClientSide) -> String {
    let (mut stream, _) = client.expect("TLS 1.3 client finishes before the server verifies it");
    let mut buf = [0u8; 16];
    let result = tokio::time::timeout(LIMIT, stream.read(&mut buf))
        .await
        .expect("read finished in time");
    result.expect_err("the server rejected us").to_string()
}

#[tokio::test]
async fn right_identities_are_accepted_both_ways() {
    let ca = ca("cluster.local");
    let server_id = id("spiffe://cluster.local/ns/shop/sa/backend");
    let client_id = id("spiffe://cluster.local/ns/shop/sa/frontend");
    let server_cert = ca.issue(&server_id, HOUR).unwrap();
    let client_cert = ca.issue(&client_id, HOUR).unwrap();
    let other = id("spiffe://cluster.local/ns/shop/sa/other");

    let (server, client) = mtls(&server_cert, &client_cert, &[other, server_id.clone()]).await;
    let (mut server_stream, client_seen_by_server) = server.unwrap();
    let (mut client_stream, server_seen_by_client) = client.unwrap();
    assert_eq!(client_seen_by_server.identity(), &client_id);
    assert_eq!(server_seen_by_client.identity(), &server_id);

    client_stream.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    server_stream.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");
    server_stream.write_all(b"pong").await.unwrap();
    client_stream.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"pong");
}

#[tokio::test]
async fn alpn_is_h2_version_is_tls13_and_sni_is_absent() {
    let ca = ca("cluster.local");
    let server_id = id("spiffe://cluster.local/ns/a/sa/server");
    let server_cert = ca.issue(&server_id, HOUR).unwrap();
    let client_cert = ca
        .issue(&id("spiffe://cluster.local/ns/a/sa/client"), HOUR)
        .unwrap();
    let (server, client) = mtls(&server_cert, &client_cert, &[server_id]).await;
    let (server_stream, _) = server.unwrap();
    let (client_stream, _) = client.unwrap();
    let server_conn = server_stream.get_ref().1;
    let client_conn = client_stream.get_ref().1;

    assert_eq!(server_conn.alpn_protocol(), Some(&b"h2"[..]));
    assert_eq!(client_conn.alpn_protocol(), Some(&b"h2"[..]));
    assert_eq!(
        server_conn.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    assert_eq!(
        server_conn.server_name(),
        None,
        "the client must not send SNI"
    );
    let suite = server_conn.negotiated_cipher_suite().unwrap().suite();
    assert!(
        [
            rustls::CipherSuite::TLS13_AES_256_GCM_SHA384,
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
        ]
        .contains(&suite),
        "{suite:?}"
    );
}

#[tokio::test]
async fn server_with_unexpected_identity_is_refused() {
    let ca = ca("cluster.local");
    let server_cert = ca
        .issue(&id("spiffe://cluster.local/ns/a/sa/evil"), HOUR)
        .unwrap();
    let client_cert = ca
        .issue(&id("spiffe://cluster.local/ns/a/sa/client"), HOUR)
        .unwrap();
    let (server, client) = mtls(
        &server_cert,
        &client_cert,
        &[id("spiffe://cluster.local/ns/a/sa/good")],
    )
    .await;
    assert_eq!(
        client.unwrap_err().to_string(),
        "peer identity spiffe://cluster.local/ns/a/sa/evil is not one of the expected \
         identities [spiffe://cluster.local/ns/a/sa/good]"
    );
    assert_eq!(
        server.unwrap_err().to_string(),
        "the client aborted the TLS handshake with alert CertificateUnknown: it rejected our \
         certificate (identity or trust domain not accepted)"
    );
}

#[tokio::test]
async fn client_from_another_trust_domain_is_refused() {
    // Same root, so only the trust-domain rule can refuse it.
    let ca = ca("cluster.local");
    let server_id = id("spiffe://cluster.local/ns/a/sa/server");
    let server_cert = ca.issue(&server_id, HOUR).unwrap();
    let client_cert = ca
        .issue(&id("spiffe://other.org/ns/a/sa/client"), HOUR)
        .unwrap();
    let (server, client) = mtls(&server_cert, &client_cert, &[server_id]).await;
    assert_eq!(
        server.unwrap_err().to_string(),
        "client certificate is from trust domain other.org, expected cluster.local"
    );
    assert_eq!(
        client_read_error(client).await,
        "received fatal alert: CertificateUnknown"
    );
}

#[tokio::test]
async fn expired_server_certificate_is_refused() {
    let ca = ca("cluster.local");
    let server_id = id("spiffe://cluster.local/ns/a/sa/server");
    let server_cert = expired(&ca, &server_id);
    let client_cert = ca
        .issue(&id("spiffe://cluster.local/ns/a/sa/client"), HOUR)
        .unwrap();
    let (server, client) = mtls(&server_cert, &client_cert, &[server_id]).await;
    assert_eq!(
        client.unwrap_err().to_string(),
        format!(
            "server certificate expired at {}; the server has not rotated it \
             (can it reach its CA?)",
            rfc3339(server_cert.not_after())
        )
    );
    assert_eq!(
        server.unwrap_err().to_string(),
        "the client aborted the TLS handshake with alert CertificateExpired: it considers our \
         certificate expired or not yet valid"
    );
}

#[tokio::test]
async fn expired_client_certificate_is_refused() {
    let ca = ca("cluster.local");
    let server_id = id("spiffe://cluster.local/ns/a/sa/server");
    let server_cert = ca.issue(&server_id, HOUR).unwrap();
    let client_cert = expired(&ca, &id("spiffe://cluster.local/ns/a/sa/client"));
    let (server, client) = mtls(&server_cert, &client_cert, &[server_id]).await;
    assert_eq!(
        server.unwrap_err().to_string(),
        format!(
            "client certificate expired at {}; the client has not rotated it \
             (can it reach its CA?)",
            rfc3339(client_cert.not_after())
        )
    );
    assert_eq!(
        client_read_error(client).await,
        "received fatal alert: CertificateExpired"
    );
}

#[tokio::test]
async fn server_from_untrusted_root_with_the_same_name_is_refused() {
    // Both roots are O=cluster.local, like two clusters' self-signed Istio roots.
    let ours = ca("cluster.local");
    let theirs = ca("cluster.local");
    let server_id = id("spiffe://cluster.local/ns/a/sa/server");
    let server_cert = theirs.issue(&server_id, HOUR).unwrap();
    let client_cert = ours
        .issue(&id("spiffe://cluster.local/ns/a/sa/client"), HOUR)
        .unwrap();
    let (server, client) = mtls(&server_cert, &client_cert, &[server_id]).await;
    assert_eq!(
        client.unwrap_err().to_string(),
        "server certificate is not signed by a trusted root (its issuer has the name of one of \
         our roots but another key: the server uses a different CA with the same subject, e.g. \
         another cluster's self-signed root)"
    );
    assert_eq!(
        server.unwrap_err().to_string(),
        "the client aborted the TLS handshake with alert DecryptError: it could not verify a \
         signature on our certificate chain or handshake (does it trust a different CA with the \
         same name?)"
    );
}

#[tokio::test]
async fn client_from_untrusted_root_is_refused() {
    let ours = ca("cluster.local");
    let theirs = ca("other-cluster.local");
    let server_id = id("spiffe://cluster.local/ns/a/sa/server");
    let server_cert = ours.issue(&server_id, HOUR).unwrap();
    // The client's certificate comes from `theirs`; it trusts both roots (so it accepts the
    // server), the server trusts only `ours`.
    let client_id = id("spiffe://cluster.local/ns/a/sa/client");
    let request = csr::generate(&client_id).unwrap();
    let chain = theirs.sign_csr(&request.csr_pem, &client_id, HOUR).unwrap();
    let both_roots = format!("{}{}", theirs.root_pem(), ours.root_pem());
    let client_cert =
        WorkloadCertificate::new(&request.private_key_pem, &[chain[0].clone(), both_roots])
            .unwrap();
    let client_config = tls::client_config(&client_cert, &[server_id]).unwrap();
    let (server, client) =
        handshake(tls::server_config(&server_cert).unwrap(), client_config).await;
    assert_eq!(
        server.unwrap_err().to_string(),
        "client certificate is not signed by a trusted root (the client uses a CA or trust \
         bundle we do not share)"
    );
    assert_eq!(
        client_read_error(client).await,
        "received fatal alert: UnknownCA"
    );
}

#[derive(Debug)]
struct NoClientCertificate;

impl ResolvesClientCert for NoClientCertificate {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        None
    }

    fn has_certs(&self) -> bool {
        false
    }
}

#[tokio::test]
async fn missing_client_certificate_is_refused() {
    let ca = ca("cluster.local");
    let server_id = id("spiffe://cluster.local/ns/a/sa/server");
    let server_cert = ca.issue(&server_id, HOUR).unwrap();
    let client_cert = ca
        .issue(&id("spiffe://cluster.local/ns/a/sa/client"), HOUR)
        .unwrap();
    // Our client settings and server verification, but no client authentication.
    let mut client_config = (*tls::client_config(&client_cert, &[server_id]).unwrap()).clone();
    client_config.client_auth_cert_resolver = Arc::new(NoClientCertificate);
    let (server, client) = handshake(
        tls::server_config(&server_cert).unwrap(),
        Arc::new(client_config),
    )
    .await;
    assert_eq!(
        server.unwrap_err().to_string(),
        "client presented no certificate"
    );
    assert_eq!(
        client_read_error(client).await,
        "received fatal alert: CertificateRequired"
    );
}

#[test]
fn client_config_without_expected_identities_is_an_error() {
    let ca = ca("cluster.local");
    let cert = ca
        .issue(&id("spiffe://cluster.local/ns/a/sa/client"), HOUR)
        .unwrap();
    assert_eq!(
        tls::client_config(&cert, &[]).unwrap_err().to_string(),
        "cannot build a client TLS configuration for spiffe://cluster.local/ns/a/sa/client: \
         the list of expected server identities is empty"
    );
}

#[tokio::test]
async fn chains_through_an_intermediate_verify_both_ways() {
    let root_ca = ca("cluster.local");
    let (intermediate_pem, intermediate_key) = common::make_intermediate(&root_ca);
    let intermediate =
        CertificateAuthority::from_pem(&intermediate_pem, &intermediate_key, &[root_ca.root_pem()])
            .unwrap();
    let server_id = id("spiffe://cluster.local/ns/a/sa/server");
    let client_id = id("spiffe://cluster.local/ns/a/sa/client");
    // The server's leaf comes from the intermediate, the client's straight from the root.
    let server_cert = intermediate.issue(&server_id, HOUR).unwrap();
    let client_cert = root_ca.issue(&client_id, HOUR).unwrap();
    let (server, client) = mtls(&server_cert, &client_cert, std::slice::from_ref(&server_id)).await;
    assert_eq!(server.unwrap().1.identity(), &client_id);
    assert_eq!(client.unwrap().1.identity(), &server_id);

    // And the other way round.
    let (server, client) = mtls(&client_cert, &server_cert, std::slice::from_ref(&client_id)).await;
    assert_eq!(server.unwrap().1.identity(), &server_id);
    assert_eq!(client.unwrap().1.identity(), &client_id);
}
