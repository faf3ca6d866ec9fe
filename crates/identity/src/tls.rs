//! Mutual TLS between workloads, with ztunnel's parameters and identity checks.
//!
//! Owns the rustls configurations (TLS 1.3 only, the two AES-GCM suites, ALPN `h2`, no SNI, no
//! resumption), the two peer verifiers (client: chain to our roots and a SPIFFE SAN in the
//! expected set; server: mandatory client certificate from our trust domain), and the
//! [`VerifiedPeer`] proof that authorization code takes.
//!
//! Rejections made by our verifiers travel through rustls inside `CertificateError::Other` and are
//! recovered on the side that detected them, so the operator sees the actual reason; the other
//! side sees the TLS alert.

use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, OnceLock};

use rustls::client::Resumption;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::sign::SingleCertAndKey;
use rustls::{
    AlertDescription, CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName,
    OtherError, RootCertStore, ServerConfig, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::certificate::{WorkloadCertificate, identity_of_der, unix_to_system_time};
use crate::identity::Identity;

/// The ALPN protocol HBONE speaks.
const ALPN_H2: &[u8] = b"h2";

/// Which side of the handshake a certificate or alert came from, for messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerRole {
    /// The peer is the TLS client (we accepted).
    Client,
    /// The peer is the TLS server (we connected).
    Server,
}

impl fmt::Display for PeerRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PeerRole::Client => "client",
            PeerRole::Server => "server",
        })
    }
}

/// Why a TLS configuration could not be built or a handshake failed. One variant per cause an
/// operator would act on differently.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The server's identity is not one we were told to expect.
    #[error(
        "peer identity {presented} is not one of the expected identities [{}]",
        join(expected)
    )]
    UnexpectedIdentity {
        /// The identity in the server's certificate.
        presented: Identity,
        /// The identities we would have accepted.
        expected: Vec<Identity>,
    },
    /// The client's certificate belongs to another trust domain.
    #[error("{peer} certificate is from trust domain {presented}, expected {expected}")]
    WrongTrustDomain {
        /// Whose certificate.
        peer: PeerRole,
        /// The trust domain in the peer certificate.
        presented: String,
        /// Our trust domain.
        expected: String,
    },
    /// The peer certificate has no usable SPIFFE identity.
    #[error("{peer} certificate carries no usable SPIFFE identity: {reason}")]
    NoIdentity {
        /// Whose certificate.
        peer: PeerRole,
        /// What was wrong with its SANs.
        reason: String,
    },
    /// The peer certificate is past its `not_after`.
    #[error(
        "{peer} certificate expired at {not_after}; the {peer} has not rotated it \
         (can it reach its CA?)"
    )]
    CertificateExpired {
        /// Whose certificate.
        peer: PeerRole,
        /// RFC 3339 expiry.
        not_after: String,
    },
    /// The peer certificate is not valid yet.
    #[error(
        "{peer} certificate is not valid before {not_before} (local time {now}); \
         is a clock out of sync?"
    )]
    CertificateNotYetValid {
        /// Whose certificate.
        peer: PeerRole,
        /// RFC 3339 start of validity.
        not_before: String,
        /// RFC 3339 local time at verification.
        now: String,
    },
    /// The peer chain does not lead to one of our roots.
    #[error(
        "{peer} certificate is not signed by a trusted root ({})",
        untrusted_detail(*peer, *same_name_issuer)
    )]
    UntrustedRoot {
        /// Whose certificate.
        peer: PeerRole,
        /// An issuer with the name of one of our roots exists but its key did not sign the
        /// chain: two CAs share a subject (e.g. two clusters' self-signed `O=cluster.local`).
        same_name_issuer: bool,
    },
    /// Some other certificate problem (bad encoding, wrong key usage, bad signature...).
    #[error("{peer} certificate is invalid: {reason}")]
    InvalidCertificate {
        /// Whose certificate.
        peer: PeerRole,
        /// What the verifier reported.
        reason: String,
    },
    /// The client sent no certificate although we require one.
    #[error("client presented no certificate")]
    NoClientCertificate,
    /// The peer ended the handshake with an alert: it rejected us, see its logs.
    #[error("the {peer} aborted the TLS handshake with alert {alert:?}: {}", alert_hint(*alert))]
    PeerAlert {
        /// Who sent the alert.
        peer: PeerRole,
        /// The alert it sent.
        alert: AlertDescription,
    },
    /// Any other handshake failure reported by rustls.
    #[error("TLS handshake with the {peer} failed: {source}")]
    Handshake {
        /// The other side.
        peer: PeerRole,
        /// What rustls reported.
        source: rustls::Error,
    },
    /// The transport failed during the handshake.
    #[error("I/O error during the TLS handshake with the {peer}: {source}")]
    Io {
        /// The other side.
        peer: PeerRole,
        /// The socket error.
        source: io::Error,
    },
    /// A TLS configuration could not be built from the certificate.
    #[error("cannot build the TLS configuration for {identity}: {reason}")]
    Config {
        /// Our identity.
        identity: Identity,
        /// What rustls reported.
        reason: String,
    },
    /// A client configuration was requested that could accept no server at all.
    #[error(
        "cannot build a client TLS configuration for {identity}: the list of expected server identities is empty"
    )]
    NoExpectedIdentities {
        /// Our identity.
        identity: Identity,
    },
}

fn join(identities: &[Identity]) -> String {
    identities
        .iter()
        .map(Identity::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

fn untrusted_detail(peer: PeerRole, same_name_issuer: bool) -> String {
    if same_name_issuer {
        format!(
            "its issuer has the name of one of our roots but another key: the {peer} uses a \
             different CA with the same subject, e.g. another cluster's self-signed root"
        )
    } else {
        format!("the {peer} uses a CA or trust bundle we do not share")
    }
}

fn alert_hint(alert: AlertDescription) -> &'static str {
    match alert {
        AlertDescription::CertificateExpired => {
            "it considers our certificate expired or not yet valid"
        }
        AlertDescription::UnknownCA => "it does not trust the root that signed our certificate",
        AlertDescription::CertificateRequired => "it requires a client certificate",
        AlertDescription::BadCertificate | AlertDescription::CertificateUnknown => {
            "it rejected our certificate (identity or trust domain not accepted)"
        }
        AlertDescription::DecryptError => {
            "it could not verify a signature on our certificate chain or handshake \
             (does it trust a different CA with the same name?)"
        }
        AlertDescription::NoApplicationProtocol => "it does not speak ALPN h2",
        AlertDescription::ProtocolVersion | AlertDescription::HandshakeFailure => {
            "no common TLS version or cipher suite (we offer TLS 1.3 AES-GCM only)"
        }
        _ => "see the peer's logs for the reason",
    }
}

/// The peer's identity as proven by our verifier. Only this crate can construct it, and only
/// from a certificate chain that passed verification.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedPeer {
    identity: Identity,
}

impl VerifiedPeer {
    /// The verified SPIFFE identity of the peer.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }
}

/// Our rustls crypto: ring, with cipher suites cut to TLS 1.3 AES-256-GCM and AES-128-GCM.
pub(crate) fn crypto_provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            use rustls::crypto::ring::{cipher_suite, default_provider};
            let mut provider = default_provider();
            provider.cipher_suites = vec![
                cipher_suite::TLS13_AES_256_GCM_SHA384,
                cipher_suite::TLS13_AES_128_GCM_SHA256,
            ];
            Arc::new(provider)
        })
        .clone()
}

fn root_store(cert: &WorkloadCertificate) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for root in cert.roots() {
        roots.add(root.clone()).map_err(|e| config_error(cert, e))?;
    }
    Ok(roots)
}

fn config_error(cert: &WorkloadCertificate, reason: impl fmt::Display) -> TlsError {
    TlsError::Config {
        identity: cert.identity().clone(),
        reason: reason.to_string(),
    }
}

/// TLS 1.3 only, TLS13_AES_256_GCM_SHA384 + TLS13_AES_128_GCM_SHA256, ALPN h2, mandatory client
/// certificate whose SPIFFE trust domain equals ours, presenting `cert`.
pub fn server_config(cert: &WorkloadCertificate) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = crypto_provider();
    let roots = Arc::new(root_store(cert)?);
    let inner = WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
        .build()
        .map_err(|e| config_error(cert, e))?;
    let verifier = Arc::new(TrustDomainVerifier {
        inner,
        trust_domain: cert.identity().trust_domain().to_owned(),
    });
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| config_error(cert, e))?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(SingleCertAndKey::from(cert.certified_key())));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    // Clients never resume (ztunnel disables it), so keep no session state and send no tickets.
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// Same suites, ALPN h2, no SNI, no resumption, presents `cert`; accepts the server only if its
/// chain verifies against cert's roots AND its SPIFFE identity (the first `spiffe://` URI SAN that
/// parses, which is what [`VerifiedPeer`] reports) is in `expected`.
pub fn client_config(
    cert: &WorkloadCertificate,
    expected: &[Identity],
) -> Result<Arc<ClientConfig>, TlsError> {
    if expected.is_empty() {
        return Err(TlsError::NoExpectedIdentities {
            identity: cert.identity().clone(),
        });
    }
    let provider = crypto_provider();
    let verifier = Arc::new(IdentityVerifier {
        roots: root_store(cert)?,
        expected: expected.to_vec(),
        provider: provider.clone(),
    });
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| config_error(cert, e))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(Arc::new(SingleCertAndKey::from(cert.certified_key())));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.enable_sni = false;
    config.resumption = Resumption::disabled();
    Ok(Arc::new(config))
}

/// Runs the server side of the handshake and returns the stream with the client's proven
/// identity.
pub async fn accept<IO: AsyncRead + AsyncWrite + Unpin>(
    config: Arc<ServerConfig>,
    io: IO,
) -> Result<(tokio_rustls::server::TlsStream<IO>, VerifiedPeer), TlsError> {
    let stream = tokio_rustls::TlsAcceptor::from(config)
        .accept(io)
        .await
        .map_err(|e| handshake_error(e, PeerRole::Client))?;
    let peer = verified_peer(stream.get_ref().1.peer_certificates(), PeerRole::Client)?;
    Ok((stream, peer))
}

/// Runs the client side of the handshake (no SNI; the name given to rustls is the unused
/// `0.0.0.0`) and returns the stream with the server's proven identity.
pub async fn connect<IO: AsyncRead + AsyncWrite + Unpin>(
    config: Arc<ClientConfig>,
    io: IO,
) -> Result<(tokio_rustls::client::TlsStream<IO>, VerifiedPeer), TlsError> {
    let ignored_name = ServerName::IpAddress(IpAddr::V4(Ipv4Addr::UNSPECIFIED).into());
    let stream = tokio_rustls::TlsConnector::from(config)
        .connect(ignored_name, io)
        .await
        .map_err(|e| handshake_error(e, PeerRole::Server))?;
    let peer = verified_peer(stream.get_ref().1.peer_certificates(), PeerRole::Server)?;
    Ok((stream, peer))
}

/// Reads the identity from a leaf our verifier already accepted.
fn verified_peer(
    certificates: Option<&[CertificateDer<'static>]>,
    peer: PeerRole,
) -> Result<VerifiedPeer, TlsError> {
    let leaf = certificates
        .and_then(<[_]>::first)
        .ok_or_else(|| TlsError::NoIdentity {
            peer,
            reason: "the handshake completed without a peer certificate".to_owned(),
        })?;
    let identity = identity_of_der(leaf).map_err(|e| TlsError::NoIdentity {
        peer,
        reason: e.to_string(),
    })?;
    Ok(VerifiedPeer { identity })
}

/// A rejection decided by our verifiers, carried through rustls in `CertificateError::Other`.
#[derive(Debug, Clone, thiserror::Error)]
enum Rejection {
    #[error("peer identity {presented} is not expected")]
    UnexpectedIdentity {
        presented: Identity,
        expected: Vec<Identity>,
    },
    #[error("trust domain {presented} is not {expected}")]
    WrongTrustDomain { presented: String, expected: String },
    #[error("no usable SPIFFE identity: {0}")]
    NoIdentity(String),
}

impl Rejection {
    fn into_rustls(self) -> rustls::Error {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(self))))
    }

    fn into_tls_error(self, peer: PeerRole) -> TlsError {
        match self {
            Rejection::UnexpectedIdentity {
                presented,
                expected,
            } => TlsError::UnexpectedIdentity {
                presented,
                expected,
            },
            Rejection::WrongTrustDomain {
                presented,
                expected,
            } => TlsError::WrongTrustDomain {
                peer,
                presented,
                expected,
            },
            Rejection::NoIdentity(reason) => TlsError::NoIdentity { peer, reason },
        }
    }
}

fn handshake_error(error: io::Error, peer: PeerRole) -> TlsError {
    let is_tls = error
        .get_ref()
        .is_some_and(|inner| inner.is::<rustls::Error>());
    if !is_tls {
        return TlsError::Io {
            peer,
            source: error,
        };
    }
    match error
        .into_inner()
        .map(|inner| inner.downcast::<rustls::Error>())
    {
        Some(Ok(tls)) => classify(*tls, peer),
        // Unreachable given the `is` check above; keep the message rather than panic.
        _ => TlsError::Io {
            peer,
            source: io::Error::other("TLS error lost while unwrapping"),
        },
    }
}

fn rfc3339(time: UnixTime) -> String {
    let seconds = i64::try_from(time.as_secs()).unwrap_or(i64::MAX);
    humantime::format_rfc3339_seconds(unix_to_system_time(seconds)).to_string()
}

/// Maps what rustls reports on the detecting side to the operator-facing error.
fn classify(error: rustls::Error, peer: PeerRole) -> TlsError {
    use rustls::Error as E;
    match error {
        E::InvalidCertificate(CertificateError::ExpiredContext { not_after, .. }) => {
            TlsError::CertificateExpired {
                peer,
                not_after: rfc3339(not_after),
            }
        }
        E::InvalidCertificate(CertificateError::NotValidYetContext { time, not_before }) => {
            TlsError::CertificateNotYetValid {
                peer,
                not_before: rfc3339(not_before),
                now: rfc3339(time),
            }
        }
        E::InvalidCertificate(CertificateError::UnknownIssuer) => TlsError::UntrustedRoot {
            peer,
            same_name_issuer: false,
        },
        E::InvalidCertificate(CertificateError::BadSignature) => TlsError::UntrustedRoot {
            peer,
            same_name_issuer: true,
        },
        E::InvalidCertificate(CertificateError::Other(other)) => {
            match other.0.downcast_ref::<Rejection>() {
                Some(rejection) => rejection.clone().into_tls_error(peer),
                None => TlsError::InvalidCertificate {
                    peer,
                    reason: other.to_string(),
                },
            }
        }
        E::InvalidCertificate(other) => TlsError::InvalidCertificate {
            peer,
            reason: other.to_string(),
        },
        E::NoCertificatesPresented => TlsError::NoClientCertificate,
        E::AlertReceived(alert) => TlsError::PeerAlert { peer, alert },
        source => TlsError::Handshake { peer, source },
    }
}

/// Maps webpki's verdict to rustls errors that carry the context we print and the right alert.
fn pki_error(error: webpki::Error) -> rustls::Error {
    use webpki::Error as E;
    let certificate_error = match error {
        E::CertExpired { time, not_after } => CertificateError::ExpiredContext { time, not_after },
        E::CertNotValidYet { time, not_before } => {
            CertificateError::NotValidYetContext { time, not_before }
        }
        E::UnknownIssuer => CertificateError::UnknownIssuer,
        E::BadDer | E::BadDerTime => CertificateError::BadEncoding,
        E::InvalidSignatureForPublicKey => CertificateError::BadSignature,
        other => CertificateError::Other(OtherError(Arc::new(other))),
    };
    rustls::Error::InvalidCertificate(certificate_error)
}

/// Client-side verifier: webpki chain validation to our roots (serverAuth), then the server's
/// SPIFFE identity must be one of `expected`. The rustls server name is ignored.
#[derive(Debug)]
struct IdentityVerifier {
    roots: RootCertStore,
    expected: Vec<Identity>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for IdentityVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = webpki::EndEntityCert::try_from(end_entity).map_err(pki_error)?;
        cert.verify_for_usage(
            self.provider.signature_verification_algorithms.all,
            &self.roots.roots,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map_err(pki_error)?;
        let presented = identity_of_der(end_entity)
            .map_err(|e| Rejection::NoIdentity(e.to_string()).into_rustls())?;
        if !self.expected.contains(&presented) {
            return Err(Rejection::UnexpectedIdentity {
                presented,
                expected: self.expected.clone(),
            }
            .into_rustls());
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Server-side verifier: webpki's client verifier (certificate mandatory, chain to our roots),
/// then the client's SPIFFE trust domain must equal ours.
#[derive(Debug)]
struct TrustDomainVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
}

impl ClientCertVerifier for TrustDomainVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let presented = identity_of_der(end_entity)
            .map_err(|e| Rejection::NoIdentity(e.to_string()).into_rustls())?;
        if presented.trust_domain() != self.trust_domain {
            return Err(Rejection::WrongTrustDomain {
                presented: presented.trust_domain().to_owned(),
                expected: self.trust_domain.clone(),
            }
            .into_rustls());
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
