//! A workload's private key plus the chain its CA issued, parsed once and ready for rustls.
//!
//! Owns the rules for reading what the Istio CA API returns (`[leaf, intermediates..., root(s)]`)
//! and for finding the SPIFFE identity in a certificate (the first `spiffe://` URI SAN that parses,
//! as ztunnel does).

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::identity::{Identity, IdentityError};

/// Why a key and chain cannot be used as a workload certificate.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CertificateError {
    /// The chain has only a leaf (or nothing): ztunnel's rule, and ours.
    #[error(
        "certificate chain has {entries} entries but needs at least 2 (leaf, then root): \
         no root certificate present"
    )]
    NoRoot {
        /// How many entries the chain had.
        entries: usize,
    },
    /// A chain entry is not PEM, or holds no certificate.
    #[error("certificate chain entry {index} is not a PEM certificate: {reason}")]
    ChainPem {
        /// Position in the chain (0 = leaf).
        index: usize,
        /// What the PEM decoder reported.
        reason: String,
    },
    /// The leaf entry holds more than one certificate.
    #[error(
        "certificate chain entry 0 (the leaf) holds {count} certificates; \
         the CA must return the leaf alone"
    )]
    LeafBundle {
        /// How many certificates the entry held.
        count: usize,
    },
    /// A certificate does not parse as X.509.
    #[error("certificate chain entry {index} is not a valid X.509 certificate: {reason}")]
    X509 {
        /// Position in the chain (0 = leaf).
        index: usize,
        /// What the X.509 parser reported.
        reason: String,
    },
    /// The leaf has no `spiffe://` URI SAN at all.
    #[error(
        "the leaf certificate has no spiffe:// URI SAN (its URI SANs: {uris:?}); \
         was it issued by an Istio-compatible CA?"
    )]
    NoSpiffeSan {
        /// The URI SANs the leaf does carry.
        uris: Vec<String>,
    },
    /// The leaf's `spiffe://` URI SANs are all malformed.
    #[error("the leaf certificate's spiffe:// URI SAN is not an Istio identity: {0}")]
    BadSpiffeSan(#[source] IdentityError),
    /// The private key is not PEM, or not a key rustls can use.
    #[error(
        "the workload private key cannot be loaded: {reason} \
         (expected an unencrypted PKCS#8, SEC1 or PKCS#1 PEM key)"
    )]
    PrivateKey {
        /// What the decoder or rustls reported.
        reason: String,
    },
    /// The private key belongs to another certificate.
    #[error(
        "the workload private key does not match the leaf certificate's public key: \
         {reason}; was the chain issued for another CSR?"
    )]
    KeyMismatch {
        /// What rustls reported.
        reason: String,
    },
}

/// A private key plus the chain the CA returned: leaf, intermediates, root(s).
///
/// Immutable; rotation replaces the whole value. `Debug` never prints the key.
pub struct WorkloadCertificate {
    identity: Identity,
    not_before: SystemTime,
    not_after: SystemTime,
    /// Leaf then intermediates, with the key: what we present in handshakes.
    certified_key: Arc<CertifiedKey>,
    roots: Vec<CertificateDer<'static>>,
    chain_pem: Vec<String>,
    roots_pem: Vec<String>,
}

impl WorkloadCertificate {
    /// `chain` is exactly what the Istio CA API returns: `[leaf, intermediates..., root(s)]`;
    /// it needs at least 2 entries. The last entry may hold several concatenated roots.
    pub fn new(private_key_pem: &str, chain: &[String]) -> Result<Self, CertificateError> {
        let [leaf_entry, middle @ .., roots_entry] = chain else {
            return Err(CertificateError::NoRoot {
                entries: chain.len(),
            });
        };
        let leaf = parse_pem_entry(0, leaf_entry)?;
        if leaf.len() != 1 {
            return Err(CertificateError::LeafBundle { count: leaf.len() });
        }
        let mut presented = leaf;
        for (offset, entry) in middle.iter().enumerate() {
            presented.extend(parse_pem_entry(offset + 1, entry)?);
        }
        let roots = parse_pem_entry(chain.len() - 1, roots_entry)?;

        let (identity, not_before, not_after) = read_leaf(&presented[0])?;
        for (index, der) in presented.iter().chain(&roots).enumerate().skip(1) {
            X509Certificate::from_der(der).map_err(|e| CertificateError::X509 {
                index,
                reason: e.to_string(),
            })?;
        }

        let key = PrivateKeyDer::from_pem_slice(private_key_pem.as_bytes()).map_err(|e| {
            CertificateError::PrivateKey {
                reason: e.to_string(),
            }
        })?;
        let certified_key =
            CertifiedKey::from_der(presented.clone(), key, &crate::tls::crypto_provider())
                .map_err(|e| match e {
                    rustls::Error::InconsistentKeys(_) => CertificateError::KeyMismatch {
                        reason: e.to_string(),
                    },
                    other => CertificateError::PrivateKey {
                        reason: other.to_string(),
                    },
                })?;

        Ok(WorkloadCertificate {
            identity,
            not_before,
            not_after,
            certified_key: Arc::new(certified_key),
            chain_pem: presented.iter().map(to_pem).collect(),
            roots_pem: roots.iter().map(to_pem).collect(),
            roots,
        })
    }

    /// The identity in the leaf's `spiffe://` URI SAN.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// Start of the leaf's validity.
    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }

    /// End of the leaf's validity.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// When to fetch a replacement: half-way through the leaf's life, as ztunnel does.
    pub fn refresh_at(&self) -> SystemTime {
        let lifetime = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or(Duration::ZERO);
        self.not_before + lifetime / 2
    }

    /// Whether the leaf is past its `not_after` at `now`.
    pub fn is_expired_at(&self, now: SystemTime) -> bool {
        now > self.not_after
    }

    /// Leaf plus intermediates as PEM (no key), for config dumps.
    pub fn chain_pem(&self) -> Vec<String> {
        self.chain_pem.clone()
    }

    /// The trusted roots as PEM, one certificate per entry.
    pub fn roots_pem(&self) -> Vec<String> {
        self.roots_pem.clone()
    }

    /// What we present in a handshake: leaf + intermediates with the key.
    pub(crate) fn certified_key(&self) -> Arc<CertifiedKey> {
        self.certified_key.clone()
    }

    /// The roots peers' chains must lead to.
    pub(crate) fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }
}

impl fmt::Debug for WorkloadCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkloadCertificate")
            .field("identity", &self.identity)
            .field(
                "not_before",
                &humantime::format_rfc3339_seconds(self.not_before),
            )
            .field(
                "not_after",
                &humantime::format_rfc3339_seconds(self.not_after),
            )
            .field("chain_len", &self.chain_pem.len())
            .field("roots", &self.roots_pem.len())
            .finish_non_exhaustive()
    }
}

fn parse_pem_entry(
    index: usize,
    entry: &str,
) -> Result<Vec<CertificateDer<'static>>, CertificateError> {
    let certs = CertificateDer::pem_slice_iter(entry.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CertificateError::ChainPem {
            index,
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(CertificateError::ChainPem {
            index,
            reason: "no \"BEGIN CERTIFICATE\" block found".to_owned(),
        });
    }
    Ok(certs)
}

fn to_pem(der: &CertificateDer<'_>) -> String {
    pem::encode_config(
        &pem::Pem::new("CERTIFICATE", der.as_ref()),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

fn read_leaf(
    der: &CertificateDer<'_>,
) -> Result<(Identity, SystemTime, SystemTime), CertificateError> {
    let (_, leaf) = X509Certificate::from_der(der).map_err(|e| CertificateError::X509 {
        index: 0,
        reason: e.to_string(),
    })?;
    let identity = spiffe_identity(&leaf)?;
    let validity = leaf.validity();
    Ok((
        identity,
        unix_to_system_time(validity.not_before.timestamp()),
        unix_to_system_time(validity.not_after.timestamp()),
    ))
}

/// The identity of a certificate: its first `spiffe://` URI SAN that parses (ztunnel's rule).
pub(crate) fn spiffe_identity(cert: &X509Certificate<'_>) -> Result<Identity, CertificateError> {
    let uris = uri_sans(cert);
    let mut first_error = None;
    for uri in uris.iter().filter(|u| u.starts_with("spiffe://")) {
        match uri.parse::<Identity>() {
            Ok(identity) => return Ok(identity),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    Err(match first_error {
        Some(e) => CertificateError::BadSpiffeSan(e),
        None => CertificateError::NoSpiffeSan { uris },
    })
}

/// Parses DER and returns its identity; used by the TLS verifiers on peer leaves.
pub(crate) fn identity_of_der(der: &[u8]) -> Result<Identity, CertificateError> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| CertificateError::X509 {
        index: 0,
        reason: e.to_string(),
    })?;
    spiffe_identity(&cert)
}

fn uri_sans(cert: &X509Certificate<'_>) -> Vec<String> {
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some((*uri).to_owned()),
            _ => None,
        })
        .collect()
}

/// X.509 times are seconds since the epoch; pre-1970 values clamp to the epoch.
pub(crate) fn unix_to_system_time(seconds: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(u64::try_from(seconds).unwrap_or(0))
}
