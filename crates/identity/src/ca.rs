//! A signing certificate authority: istiod-lite's CA, and the mint for tests and the lab.
//!
//! Owns the issuance policy for workload certificates: the CSR must be validly signed, use an
//! acceptable key, and ask for exactly the identity the caller is authorized for; the leaf gets
//! that URI SAN only, `digitalSignature`+`keyEncipherment`, EKU serverAuth+clientAuth, is not a CA,
//! and has a random serial.

use std::fmt;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber, SubjectPublicKeyInfo,
};
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION,
};
use x509_parser::prelude::{FromDer, X509Certificate};
use x509_parser::public_key::PublicKey;

use crate::certificate::{
    CertificateError, WorkloadCertificate, spiffe_identity, unix_to_system_time,
};
use crate::csr::{self, CsrError};
use crate::identity::{Identity, IdentityError};

/// Minimum RSA modulus size accepted in CSRs.
const MIN_RSA_BITS: usize = 2048;

/// Why the CA refused or failed. Messages name the input at fault.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// The trust domain given for a new root is not a valid SPIFFE trust domain.
    #[error("cannot create a root CA: {0}")]
    TrustDomain(#[source] IdentityError),
    /// rcgen failed to generate or self-sign the root.
    #[error("could not create the self-signed root for trust domain {trust_domain}: {source}")]
    GenerateRoot {
        /// The requested trust domain.
        trust_domain: String,
        /// What rcgen reported.
        source: rcgen::Error,
    },
    /// The CA certificate PEM does not hold a usable certificate.
    #[error("the CA certificate is not a valid PEM X.509 certificate: {reason}")]
    CertPem {
        /// What the decoder reported.
        reason: String,
    },
    /// The CA key could not be loaded.
    #[error(
        "the CA private key cannot be loaded: {reason} (it must be an unencrypted PKCS#8 \
         \"PRIVATE KEY\"; convert with `openssl pkcs8 -topk8 -nocrypt`)"
    )]
    KeyPem {
        /// What rcgen reported.
        reason: String,
    },
    /// The CA key does not belong to the CA certificate.
    #[error("the CA private key does not match the public key of the CA certificate {subject}")]
    KeyMismatch {
        /// Subject of the CA certificate.
        subject: String,
    },
    /// The CA certificate may not sign certificates.
    #[error(
        "the certificate {subject} cannot act as a CA: it needs basicConstraints CA:TRUE and, \
         if it has a keyUsage extension, keyCertSign"
    )]
    NotACa {
        /// Subject of the offending certificate.
        subject: String,
    },
    /// An entry of the CA's own chain is not a certificate.
    #[error("CA chain entry {index} (after the CA certificate) is not a PEM certificate: {reason}")]
    ChainPem {
        /// Position in the chain given to `from_pem`.
        index: usize,
        /// What the decoder reported.
        reason: String,
    },
    /// The CSR is not PEM or not a `CERTIFICATE REQUEST` block.
    #[error("the CSR is not a PEM \"CERTIFICATE REQUEST\": {reason}")]
    CsrPem {
        /// What was wrong.
        reason: String,
    },
    /// The CSR's DER does not parse.
    #[error("the CSR does not parse as PKCS#10: {reason}")]
    CsrParse {
        /// What the parser reported.
        reason: String,
    },
    /// The CSR's signature does not verify with its own public key.
    #[error(
        "the CSR signature does not verify: the request was altered after signing or was not \
         signed by the key it carries"
    )]
    CsrSignature,
    /// The CSR's key is of a type or size we do not issue for.
    #[error(
        "the CSR carries an unsupported key ({found}); allowed are ECDSA P-256, ECDSA P-384 \
         and RSA with at least {MIN_RSA_BITS} bits"
    )]
    UnsupportedKey {
        /// Description of the key found, e.g. "RSA 1024 bits".
        found: String,
    },
    /// The CSR asks for no subject alternative name.
    #[error("the CSR asks for no subject alternative name; it must ask for exactly {authorized}")]
    MissingSan {
        /// The identity the caller is authorized for.
        authorized: Identity,
    },
    /// The CSR asks for something other than the authorized identity.
    #[error("CSR asks for {requested} but the caller is authorized for {authorized}")]
    SanMismatch {
        /// The names in the CSR, comma-separated.
        requested: String,
        /// The identity the caller is authorized for.
        authorized: Identity,
    },
    /// The requested validity window is empty.
    #[error(
        "the requested validity is empty: not_after {not_after} is not after not_before {not_before}"
    )]
    EmptyValidity {
        /// RFC 3339.
        not_before: String,
        /// RFC 3339.
        not_after: String,
    },
    /// rcgen failed to sign.
    #[error("could not sign the certificate for {identity}: {source}")]
    Sign {
        /// The identity being issued.
        identity: Identity,
        /// What rcgen reported.
        source: rcgen::Error,
    },
    /// Making the CSR for `issue` failed.
    #[error(transparent)]
    Csr(#[from] CsrError),
    /// The issued chain did not read back (a bug in this CA).
    #[error("the certificate this CA issued cannot be used: {0}")]
    Issued(#[from] CertificateError),
}

/// A signing CA. Used by istiod-lite for real and by tests/lab to mint certificates.
pub struct CertificateAuthority {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    key_pem: String,
    /// Intermediates above this CA, then the root; empty when this CA is the root.
    chain_pem: Vec<String>,
    not_after: SystemTime,
    trust_domain: Option<String>,
}

impl fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("trust_domain", &self.trust_domain)
            .field(
                "not_after",
                &humantime::format_rfc3339_seconds(self.not_after),
            )
            .field("chain_len", &self.chain_pem.len())
            .finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// A self-signed ECDSA P-256 root with subject `O=<trust domain>`, valid from now for
    /// `validity`.
    pub fn generate_root(trust_domain: &str, validity: Duration) -> Result<Self, CaError> {
        Identity::new(trust_domain, "istio-system", "istiod").map_err(CaError::TrustDomain)?;
        let wrap = |source| CaError::GenerateRoot {
            trust_domain: trust_domain.to_owned(),
            source,
        };
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(wrap)?;
        let now = SystemTime::now();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::OrganizationName, trust_domain);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = now.into();
        params.not_after = (now + validity).into();
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key).map_err(wrap)?;
        let key_pem = key.serialize_pem();
        Ok(CertificateAuthority {
            issuer: Issuer::new(params, key),
            cert_pem: cert.pem(),
            key_pem,
            chain_pem: Vec::new(),
            not_after: now + validity,
            trust_domain: Some(trust_domain.to_owned()),
        })
    }

    /// An operator-provided CA: its certificate, its PKCS#8 key, and the chain above it
    /// (intermediates..root; empty when `cert_pem` is the root).
    pub fn from_pem(cert_pem: &str, key_pem: &str, chain_pem: &[String]) -> Result<Self, CaError> {
        let cert_der = pem::parse(cert_pem).map_err(|e| CaError::CertPem {
            reason: e.to_string(),
        })?;
        let (_, cert) =
            X509Certificate::from_der(cert_der.contents()).map_err(|e| CaError::CertPem {
                reason: e.to_string(),
            })?;
        let subject = match cert.subject().to_string() {
            empty if empty.is_empty() => "(empty subject)".to_owned(),
            subject => subject,
        };
        let may_sign = cert
            .key_usage()
            .ok()
            .flatten()
            .is_none_or(|ku| ku.value.key_cert_sign());
        if !cert.is_ca() || !may_sign {
            return Err(CaError::NotACa { subject });
        }
        let key = KeyPair::from_pem(key_pem).map_err(|e| CaError::KeyPem {
            reason: e.to_string(),
        })?;
        if key.public_key_raw() != cert.public_key().subject_public_key.data.as_ref() {
            return Err(CaError::KeyMismatch { subject });
        }
        for (index, entry) in chain_pem.iter().enumerate() {
            let parsed = pem::parse(entry).map_err(|e| e.to_string()).and_then(|p| {
                X509Certificate::from_der(p.contents())
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            });
            parsed.map_err(|reason| CaError::ChainPem { index, reason })?;
        }
        let trust_domain = spiffe_identity(&cert)
            .map(|id| id.trust_domain().to_owned())
            .ok()
            .or_else(|| {
                cert.subject()
                    .iter_organization()
                    .next()
                    .and_then(|o| o.as_str().ok())
                    .map(str::to_owned)
            });
        let not_after = unix_to_system_time(cert.validity().not_after.timestamp());
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key).map_err(|e| CaError::CertPem {
            reason: e.to_string(),
        })?;
        Ok(CertificateAuthority {
            issuer,
            cert_pem: cert_pem.to_owned(),
            key_pem: key_pem.to_owned(),
            chain_pem: chain_pem.to_vec(),
            not_after,
            trust_domain,
        })
    }

    /// This CA's certificate (PEM).
    pub fn cert_pem(&self) -> String {
        self.cert_pem.clone()
    }

    /// This CA's private key (PKCS#8 PEM). Handle as a secret.
    pub fn key_pem(&self) -> String {
        self.key_pem.clone()
    }

    /// The root at the top of this CA's chain (PEM): what workloads must trust.
    pub fn root_pem(&self) -> String {
        self.chain_pem.last().unwrap_or(&self.cert_pem).clone()
    }

    /// The trust domain: from `generate_root`, or for an operator CA the trust domain of its
    /// spiffe URI SAN, else its subject's O attribute.
    pub fn trust_domain(&self) -> Option<&str> {
        self.trust_domain.as_deref()
    }

    /// Verifies the CSR's signature, key type (ECDSA P-256/P-384, RSA >= 2048) and that its only
    /// SAN equals `identity`; returns `[leaf, intermediates..., root]`, valid from now for `ttl`.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        identity: &Identity,
        ttl: Duration,
    ) -> Result<Vec<String>, CaError> {
        let now = SystemTime::now();
        self.sign_csr_with_validity(csr_pem, identity, now, now + ttl)
    }

    /// As [`Self::sign_csr`] with an explicit validity window. A window reaching past this CA's
    /// own expiry is cut at that expiry.
    pub fn sign_csr_with_validity(
        &self,
        csr_pem: &str,
        identity: &Identity,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<Vec<String>, CaError> {
        if not_after <= not_before {
            return Err(CaError::EmptyValidity {
                not_before: humantime::format_rfc3339_seconds(not_before).to_string(),
                not_after: humantime::format_rfc3339_seconds(not_after).to_string(),
            });
        }
        let public_key = checked_csr_key(csr_pem, identity)?;
        let not_after = if not_after > self.not_after {
            tracing::warn!(
                %identity,
                ca_not_after = %humantime::format_rfc3339_seconds(self.not_after),
                "requested validity ends after the CA certificate expires; cutting it short",
            );
            self.not_after
        } else {
            not_after
        };
        let params =
            leaf_params(identity, not_before, not_after).map_err(|source| CaError::Sign {
                identity: identity.clone(),
                source,
            })?;
        let leaf = params
            .signed_by(&public_key, &self.issuer)
            .map_err(|source| CaError::Sign {
                identity: identity.clone(),
                source,
            })?;
        let mut chain = Vec::with_capacity(self.chain_pem.len() + 2);
        chain.push(leaf.pem());
        chain.push(self.cert_pem.clone());
        chain.extend(self.chain_pem.iter().cloned());
        Ok(chain)
    }

    /// Key + CSR + signature in one step (tests, the lab).
    pub fn issue(
        &self,
        identity: &Identity,
        ttl: Duration,
    ) -> Result<WorkloadCertificate, CaError> {
        let now = SystemTime::now();
        self.issue_with_validity(identity, now, now + ttl)
    }

    /// As [`Self::issue`] with an explicit validity window (e.g. already expired, for tests).
    pub fn issue_with_validity(
        &self,
        identity: &Identity,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<WorkloadCertificate, CaError> {
        let request = csr::generate(identity)?;
        let chain =
            self.sign_csr_with_validity(&request.csr_pem, identity, not_before, not_after)?;
        Ok(WorkloadCertificate::new(&request.private_key_pem, &chain)?)
    }
}

/// A TLS serving certificate for a control-plane endpoint (istiod-lite's :15012): the leaf
/// carries the control plane's SPIFFE identity plus the DNS names and IPs clients dial.
#[derive(Clone)]
pub struct ServingCertificate {
    /// Leaf, this CA, any intermediates, root.
    pub chain_pem: Vec<String>,
    /// The leaf's PKCS#8 private key.
    pub key_pem: String,
}

impl fmt::Debug for ServingCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServingCertificate")
            .field("chain_len", &self.chain_pem.len())
            .finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// Issues a serving certificate for `identity` that also names `dns_names` and `ips`, so clients
    /// doing ordinary hostname verification (ztunnel's xDS and CA clients) accept it.
    pub fn issue_serving_certificate(
        &self,
        identity: &Identity,
        dns_names: &[String],
        ips: &[std::net::IpAddr],
        ttl: Duration,
    ) -> Result<ServingCertificate, CaError> {
        let sign_error = |source| CaError::Sign {
            identity: identity.clone(),
            source,
        };
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(sign_error)?;
        let now = SystemTime::now();
        let not_after = (now + ttl).min(self.not_after);
        let mut params = leaf_params(identity, now, not_after).map_err(sign_error)?;
        for name in dns_names {
            params.subject_alt_names.push(SanType::DnsName(
                name.clone().try_into().map_err(sign_error)?,
            ));
        }
        params
            .subject_alt_names
            .extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        let leaf = params.signed_by(&key, &self.issuer).map_err(sign_error)?;
        let mut chain_pem = Vec::with_capacity(self.chain_pem.len() + 2);
        chain_pem.push(leaf.pem());
        chain_pem.push(self.cert_pem.clone());
        chain_pem.extend(self.chain_pem.iter().cloned());
        Ok(ServingCertificate {
            chain_pem,
            key_pem: key.serialize_pem(),
        })
    }
}

/// Parses and checks a CSR; returns its public key ready for signing.
fn checked_csr_key(csr_pem: &str, authorized: &Identity) -> Result<SubjectPublicKeyInfo, CaError> {
    let block = pem::parse(csr_pem).map_err(|e| CaError::CsrPem {
        reason: e.to_string(),
    })?;
    if !matches!(
        block.tag(),
        "CERTIFICATE REQUEST" | "NEW CERTIFICATE REQUEST"
    ) {
        return Err(CaError::CsrPem {
            reason: format!("found a {:?} block instead", block.tag()),
        });
    }
    let (_, csr) =
        X509CertificationRequest::from_der(block.contents()).map_err(|e| CaError::CsrParse {
            reason: e.to_string(),
        })?;
    check_key_type(&csr)?;
    csr.verify_signature().map_err(|_| CaError::CsrSignature)?;
    check_sans(&csr, authorized)?;
    SubjectPublicKeyInfo::from_der(csr.certification_request_info.subject_pki.raw).map_err(|e| {
        CaError::UnsupportedKey {
            found: e.to_string(),
        }
    })
}

fn check_key_type(csr: &X509CertificationRequest<'_>) -> Result<(), CaError> {
    let spki = &csr.certification_request_info.subject_pki;
    let algorithm = &spki.algorithm.algorithm;
    let found = if *algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok());
        match curve {
            Some(c) if c == OID_EC_P256 || c == OID_NIST_EC_P384 => return Ok(()),
            Some(c) => format!("ECDSA on curve {c}"),
            None => "ECDSA without a named curve".to_owned(),
        }
    } else if *algorithm == OID_PKCS1_RSAENCRYPTION {
        let bits = match spki.parsed() {
            Ok(PublicKey::RSA(rsa)) => rsa.key_size(),
            _ => 0,
        };
        if bits >= MIN_RSA_BITS {
            return Ok(());
        }
        format!("RSA {bits} bits")
    } else {
        format!("key algorithm {algorithm}")
    };
    Err(CaError::UnsupportedKey { found })
}

fn check_sans(csr: &X509CertificationRequest<'_>, authorized: &Identity) -> Result<(), CaError> {
    let requested: Vec<String> = csr
        .requested_extensions()
        .into_iter()
        .flatten()
        .filter_map(|ext| match ext {
            ParsedExtension::SubjectAlternativeName(san) => Some(san),
            _ => None,
        })
        .flat_map(|san| san.general_names.iter().map(describe_name))
        .collect();
    match requested.as_slice() {
        [] => Err(CaError::MissingSan {
            authorized: authorized.clone(),
        }),
        [only] if *only == authorized.to_string() => Ok(()),
        _ => Err(CaError::SanMismatch {
            requested: requested.join(", "),
            authorized: authorized.clone(),
        }),
    }
}

fn describe_name(name: &GeneralName<'_>) -> String {
    match name {
        GeneralName::URI(uri) => (*uri).to_owned(),
        GeneralName::DNSName(dns) => format!("DNS:{dns}"),
        GeneralName::RFC822Name(email) => format!("email:{email}"),
        other => format!("{other}"),
    }
}

fn leaf_params(
    identity: &Identity,
    not_before: SystemTime,
    not_after: SystemTime,
) -> Result<CertificateParams, rcgen::Error> {
    let mut params = CertificateParams::default();
    // Empty subject, like Istio's leaves; rcgen then marks the SAN extension critical.
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(identity.to_string().try_into()?)];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    params.not_before = not_before.into();
    params.not_after = not_after.into();
    params.serial_number = Some(random_serial());
    Ok(params)
}

/// 128 random bits, positive and without a leading zero byte (minimal DER).
fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}
