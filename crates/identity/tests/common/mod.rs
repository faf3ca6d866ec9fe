//! Helpers shared by the integration tests.

use std::time::{Duration, SystemTime};

use ambit_identity::ca::CertificateAuthority;

/// An intermediate CA below `root_ca` as (cert PEM, key PEM), made with rcgen directly: the CA
/// API issues only leaves.
pub(crate) fn make_intermediate(root_ca: &CertificateAuthority) -> (String, String) {
    let root_key = rcgen::KeyPair::from_pem(&root_ca.key_pem()).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(&root_ca.cert_pem(), root_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, "cluster.local");
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "intermediate");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let now = SystemTime::now();
    params.not_before = now.into();
    params.not_after = (now + Duration::from_secs(24 * 3600)).into();
    let cert = params.signed_by(&key, &issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}
