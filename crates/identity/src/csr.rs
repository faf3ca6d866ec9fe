//! Certificate signing requests as ztunnel sends them to the Istio CA: a fresh ECDSA P-256 key,
//! signed with SHA-256, empty subject, and the SPIFFE URI as the only SAN.

use std::fmt;

use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};

use crate::identity::Identity;

/// A CSR and the private key it was made with, both PEM.
pub struct CertificateRequest {
    /// The `CERTIFICATE REQUEST` PEM to send to the CA.
    pub csr_pem: String,
    /// The PKCS#8 `PRIVATE KEY` PEM; keep it to pair with the returned chain.
    pub private_key_pem: String,
}

impl fmt::Debug for CertificateRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateRequest")
            .field("csr_pem", &self.csr_pem)
            .finish_non_exhaustive()
    }
}

/// Why a CSR could not be made.
#[derive(Debug, thiserror::Error)]
pub enum CsrError {
    /// Key generation or CSR encoding failed inside rcgen (a crypto library fault).
    #[error("could not create a certificate signing request for {identity}: {source}")]
    Generate {
        /// The identity the CSR was for.
        identity: Identity,
        /// What rcgen reported.
        source: rcgen::Error,
    },
}

/// Fresh ECDSA P-256 key; CSR signed with SHA-256, empty subject, the only SAN is the SPIFFE URI.
pub fn generate(identity: &Identity) -> Result<CertificateRequest, CsrError> {
    let wrap = |source| CsrError::Generate {
        identity: identity.clone(),
        source,
    };
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(wrap)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    let uri = identity.to_string().try_into().map_err(wrap)?;
    params.subject_alt_names = vec![SanType::URI(uri)];
    let csr = params.serialize_request(&key).map_err(wrap)?;
    Ok(CertificateRequest {
        csr_pem: csr.pem().map_err(wrap)?,
        private_key_pem: key.serialize_pem(),
    })
}

#[cfg(test)]
mod tests {
    use x509_parser::certification_request::X509CertificationRequest;
    use x509_parser::extensions::{GeneralName, ParsedExtension};
    use x509_parser::oid_registry::{
        OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_SIG_ECDSA_WITH_SHA256,
    };
    use x509_parser::prelude::FromDer;

    use super::*;

    #[test]
    fn csr_has_p256_key_empty_subject_and_only_the_spiffe_uri() {
        let identity: Identity = "spiffe://cluster.local/ns/default/sa/web".parse().unwrap();
        let request = generate(&identity).unwrap();
        assert!(
            request
                .private_key_pem
                .starts_with("-----BEGIN PRIVATE KEY-----")
        );
        let der = pem::parse(&request.csr_pem).unwrap();
        assert_eq!(der.tag(), "CERTIFICATE REQUEST");
        let (_, csr) = X509CertificationRequest::from_der(der.contents()).unwrap();
        csr.verify_signature().unwrap();
        let info = &csr.certification_request_info;
        assert_eq!(info.subject.iter().count(), 0, "subject must be empty");
        assert_eq!(csr.signature_algorithm.algorithm, OID_SIG_ECDSA_WITH_SHA256);
        assert_eq!(
            info.subject_pki.algorithm.algorithm,
            OID_KEY_TYPE_EC_PUBLIC_KEY
        );
        let curve = info
            .subject_pki
            .algorithm
            .parameters
            .as_ref()
            .unwrap()
            .as_oid()
            .unwrap();
        assert_eq!(curve, OID_EC_P256);
        let sans: Vec<String> = csr
            .requested_extensions()
            .unwrap()
            .flat_map(|ext| match ext {
                ParsedExtension::SubjectAlternativeName(san) => san
                    .general_names
                    .iter()
                    .map(|n| match n {
                        GeneralName::URI(u) => u.to_string(),
                        other => format!("{other:?}"),
                    })
                    .collect(),
                _ => Vec::new(),
            })
            .collect();
        assert_eq!(sans, ["spiffe://cluster.local/ns/default/sa/web"]);
        assert!(!format!("{request:?}").contains("PRIVATE KEY"));
    }
}
