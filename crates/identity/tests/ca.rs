//! The CA's issuance policy and the parsing of what it returns, through the public API.

mod common;

use std::time::{Duration, SystemTime};

use ambit_identity::ca::CertificateAuthority;
use ambit_identity::{Identity, WorkloadCertificate, csr};
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::{FromDer, X509Certificate};

const HOUR: Duration = Duration::from_secs(3600);

fn id(s: &str) -> Identity {
    s.parse().unwrap()
}

fn root() -> CertificateAuthority {
    CertificateAuthority::generate_root("cluster.local", 24 * HOUR).unwrap()
}

fn der(pem_text: &str) -> Vec<u8> {
    pem::parse(pem_text).unwrap().into_contents()
}

#[test]
fn issued_chain_is_leaf_then_root_with_istio_leaf_properties() {
    let ca = root();
    let identity = id("spiffe://cluster.local/ns/default/sa/web");
    let request = csr::generate(&identity).unwrap();
    let chain = ca.sign_csr(&request.csr_pem, &identity, HOUR).unwrap();

    assert_eq!(chain.len(), 2);
    assert_eq!(chain[1], ca.root_pem(), "the chain must end with the root");
    assert_eq!(ca.cert_pem(), ca.root_pem());
    assert_eq!(ca.trust_domain(), Some("cluster.local"));

    let leaf_der = der(&chain[0]);
    let (_, leaf) = X509Certificate::from_der(&leaf_der).unwrap();
    let root_der = der(&chain[1]);
    let (_, root_cert) = X509Certificate::from_der(&root_der).unwrap();

    assert_eq!(
        leaf.subject().iter().count(),
        0,
        "leaf subject must be empty"
    );
    assert_eq!(leaf.issuer(), root_cert.subject());
    assert!(!leaf.is_ca());
    let basic = leaf.basic_constraints().unwrap().unwrap();
    assert!(!basic.value.ca, "leaf must say CA:FALSE explicitly");
    let ku = leaf.key_usage().unwrap().unwrap().value;
    assert!(ku.digital_signature() && ku.key_encipherment());
    assert!(!ku.key_cert_sign());
    let eku = leaf.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth);
    let san = leaf.subject_alternative_name().unwrap().unwrap();
    assert!(
        san.critical,
        "SAN must be critical when the subject is empty"
    );
    assert_eq!(
        san.value.general_names,
        [GeneralName::URI("spiffe://cluster.local/ns/default/sa/web")]
    );
    let serial = leaf.raw_serial();
    assert_eq!(serial.len(), 16);
    assert!(serial[0] & 0x80 == 0, "serial must be positive");
    leaf.verify_signature(Some(root_cert.public_key())).unwrap();

    assert!(root_cert.is_ca());
    let root_ku = root_cert.key_usage().unwrap().unwrap().value;
    assert!(root_ku.key_cert_sign() && root_ku.crl_sign());
    let orgs: Vec<&str> = root_cert
        .subject()
        .iter_organization()
        .map(|o| o.as_str().unwrap())
        .collect();
    assert_eq!(orgs, ["cluster.local"]);
    assert!(root_cert.extensions().iter().all(|e| !matches!(
        e.parsed_extension(),
        ParsedExtension::SubjectAlternativeName(_)
    )));
}

#[test]
fn workload_certificate_reads_identity_validity_and_half_life() {
    let ca = root();
    let identity = id("spiffe://cluster.local/ns/default/sa/web");
    // Whole seconds (X.509 precision), inside the CA's own validity.
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap();
    let not_before = SystemTime::UNIX_EPOCH + Duration::from_secs(now.as_secs());
    let not_after = not_before + 10 * HOUR;
    let cert = ca
        .issue_with_validity(&identity, not_before, not_after)
        .unwrap();
    assert_eq!(cert.identity(), &identity);
    assert_eq!(cert.not_before(), not_before);
    assert_eq!(cert.not_after(), not_after);
    assert_eq!(cert.refresh_at(), not_before + 5 * HOUR);
    assert!(!cert.is_expired_at(not_after));
    assert!(cert.is_expired_at(not_after + Duration::from_secs(1)));
    assert_eq!(
        cert.chain_pem().len(),
        1,
        "root is not part of the presented chain"
    );
    assert_eq!(cert.roots_pem(), [ca.root_pem()]);
    let debug = format!("{cert:?}");
    assert!(debug.contains("spiffe://cluster.local/ns/default/sa/web"));
    assert!(
        !debug.contains("PRIVATE"),
        "Debug must not print the key: {debug}"
    );
}

#[test]
fn chain_without_root_is_rejected() {
    let ca = root();
    let identity = id("spiffe://cluster.local/ns/default/sa/web");
    let request = csr::generate(&identity).unwrap();
    let chain = ca.sign_csr(&request.csr_pem, &identity, HOUR).unwrap();
    let error = WorkloadCertificate::new(&request.private_key_pem, &chain[..1]).unwrap_err();
    assert_eq!(
        error.to_string(),
        "certificate chain has 1 entries but needs at least 2 (leaf, then root): \
         no root certificate present"
    );
}

#[test]
fn leaf_without_spiffe_uri_is_rejected() {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["web.default.svc".to_owned()]).unwrap();
    params.subject_alt_names.push(rcgen::SanType::URI(
        "https://example.com/web".try_into().unwrap(),
    ));
    let cert = params.self_signed(&key).unwrap();
    let error =
        WorkloadCertificate::new(&key.serialize_pem(), &[cert.pem(), cert.pem()]).unwrap_err();
    assert_eq!(
        error.to_string(),
        "the leaf certificate has no spiffe:// URI SAN (its URI SANs: [\"https://example.com/web\"]); \
         was it issued by an Istio-compatible CA?"
    );
}

#[test]
fn key_that_does_not_match_the_leaf_is_rejected() {
    let ca = root();
    let identity = id("spiffe://cluster.local/ns/default/sa/web");
    let request = csr::generate(&identity).unwrap();
    let other = csr::generate(&identity).unwrap();
    let chain = ca.sign_csr(&request.csr_pem, &identity, HOUR).unwrap();
    let error = WorkloadCertificate::new(&other.private_key_pem, &chain).unwrap_err();
    assert!(
        error.to_string().starts_with(
            "the workload private key does not match the leaf certificate's public key"
        ),
        "{error}"
    );
}

#[test]
fn csr_for_another_identity_is_refused() {
    let ca = root();
    let asked = id("spiffe://cluster.local/ns/default/sa/admin");
    let authorized = id("spiffe://cluster.local/ns/default/sa/web");
    let request = csr::generate(&asked).unwrap();
    let error = ca
        .sign_csr(&request.csr_pem, &authorized, HOUR)
        .unwrap_err();
    assert_eq!(
        error.to_string(),
        "CSR asks for spiffe://cluster.local/ns/default/sa/admin but the caller is authorized \
         for spiffe://cluster.local/ns/default/sa/web"
    );
}

#[test]
fn tampered_csr_is_refused() {
    let ca = root();
    let signed_for = id("spiffe://cluster.local/ns/default/sa/good");
    let request = csr::generate(&signed_for).unwrap();
    let mut bytes = der(&request.csr_pem);
    let at = bytes
        .windows(4)
        .position(|w| w == b"good")
        .expect("the SAN is in the DER");
    bytes[at..at + 4].copy_from_slice(b"evil");
    let tampered = pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", bytes));
    let error = ca
        .sign_csr(
            &tampered,
            &id("spiffe://cluster.local/ns/default/sa/evil"),
            HOUR,
        )
        .unwrap_err();
    assert_eq!(
        error.to_string(),
        "the CSR signature does not verify: the request was altered after signing or was not \
         signed by the key it carries"
    );
}

/// Made once with `openssl req -new` (RSA 1024, SAN URI spiffe://cluster.local/ns/default/sa/legacy).
const RSA_1024_CSR: &str = include_str!("fixtures/rsa1024.csr.pem");
/// Same, RSA 2048.
const RSA_2048_CSR: &str = include_str!("fixtures/rsa2048.csr.pem");

#[test]
fn rsa_1024_csr_is_refused_and_rsa_2048_is_signed() {
    let ca = root();
    let legacy = id("spiffe://cluster.local/ns/default/sa/legacy");
    let error = ca.sign_csr(RSA_1024_CSR, &legacy, HOUR).unwrap_err();
    assert_eq!(
        error.to_string(),
        "the CSR carries an unsupported key (RSA 1024 bits); allowed are ECDSA P-256, \
         ECDSA P-384 and RSA with at least 2048 bits"
    );
    let chain = ca.sign_csr(RSA_2048_CSR, &legacy, HOUR).unwrap();
    let leaf_der = der(&chain[0]);
    let (_, leaf) = X509Certificate::from_der(&leaf_der).unwrap();
    assert_eq!(leaf.public_key().parsed().unwrap().key_size(), 2048);
}

#[test]
fn garbage_and_empty_validity_are_refused_with_the_reason() {
    let ca = root();
    let web = id("spiffe://cluster.local/ns/default/sa/web");
    let error = ca.sign_csr("not a csr", &web, HOUR).unwrap_err();
    assert!(
        error
            .to_string()
            .starts_with("the CSR is not a PEM \"CERTIFICATE REQUEST\": "),
        "{error}"
    );
    let error = ca.sign_csr(&ca.root_pem(), &web, HOUR).unwrap_err();
    assert_eq!(
        error.to_string(),
        "the CSR is not a PEM \"CERTIFICATE REQUEST\": found a \"CERTIFICATE\" block instead"
    );
    let request = csr::generate(&web).unwrap();
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(2_000_000_000);
    let error = ca
        .sign_csr_with_validity(&request.csr_pem, &web, now, now)
        .unwrap_err();
    assert_eq!(
        error.to_string(),
        "the requested validity is empty: not_after 2033-05-18T03:33:20Z is not after \
         not_before 2033-05-18T03:33:20Z"
    );
}

/// An operator CA that is an intermediate below a root: the chain carries both.
#[test]
fn intermediate_ca_from_pem_returns_leaf_intermediate_root() {
    let root_ca = root();
    let (intermediate_pem, intermediate_key) = common::make_intermediate(&root_ca);
    let ca =
        CertificateAuthority::from_pem(&intermediate_pem, &intermediate_key, &[root_ca.root_pem()])
            .unwrap();
    assert_eq!(ca.root_pem(), root_ca.root_pem());
    assert_eq!(ca.trust_domain(), Some("cluster.local"));
    let cert = ca
        .issue(&id("spiffe://cluster.local/ns/default/sa/web"), HOUR)
        .unwrap();
    assert_eq!(
        cert.chain_pem().len(),
        2,
        "leaf + intermediate are presented"
    );
    assert_eq!(cert.roots_pem(), [root_ca.root_pem()]);
}

#[test]
fn operator_ca_errors_name_the_problem() {
    let root_ca = root();
    let other = root();
    let error =
        CertificateAuthority::from_pem(&root_ca.cert_pem(), &other.key_pem(), &[]).unwrap_err();
    assert_eq!(
        error.to_string(),
        "the CA private key does not match the public key of the CA certificate O=cluster.local"
    );
    let leaf = root_ca
        .issue(&id("spiffe://cluster.local/ns/default/sa/web"), HOUR)
        .unwrap();
    let error =
        CertificateAuthority::from_pem(&leaf.chain_pem()[0], &root_ca.key_pem(), &[]).unwrap_err();
    assert_eq!(
        error.to_string(),
        "the certificate (empty subject) cannot act as a CA: it needs basicConstraints CA:TRUE and, if it has a \
         keyUsage extension, keyCertSign"
    );
}

#[test]
fn validity_is_cut_at_the_ca_expiry() {
    let ca = CertificateAuthority::generate_root("cluster.local", HOUR).unwrap();
    let cert = ca
        .issue(&id("spiffe://cluster.local/ns/default/sa/web"), 24 * HOUR)
        .unwrap();
    let root_der = der(&ca.root_pem());
    let (_, root_cert) = X509Certificate::from_der(&root_der).unwrap();
    let root_not_after = root_cert.validity().not_after.timestamp();
    let leaf_not_after = cert
        .not_after()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert_eq!(i64::try_from(leaf_not_after).unwrap(), root_not_after);
}

#[test]
fn serving_certificate_names_identity_hosts_and_ips() {
    let ca = root();
    let identity = id("spiffe://cluster.local/ns/istio-system/sa/istiod-lite");
    let serving = ca
        .issue_serving_certificate(
            &identity,
            &[
                "istiod-lite.istio-system.svc".to_string(),
                "localhost".to_string(),
            ],
            &["127.0.0.1".parse().unwrap()],
            HOUR,
        )
        .unwrap();
    assert_eq!(serving.chain_pem.last(), Some(&ca.root_pem()));
    let leaf_der = der(&serving.chain_pem[0]);
    let (_, leaf) = X509Certificate::from_der(&leaf_der).unwrap();
    let sans: Vec<String> = leaf
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .map(|n| match n {
            GeneralName::URI(u) => format!("URI:{u}"),
            GeneralName::DNSName(d) => format!("DNS:{d}"),
            GeneralName::IPAddress(ip) => format!("IP:{ip:?}"),
            other => format!("{other}"),
        })
        .collect();
    assert_eq!(
        sans,
        vec![
            "URI:spiffe://cluster.local/ns/istio-system/sa/istiod-lite",
            "DNS:istiod-lite.istio-system.svc",
            "DNS:localhost",
            "IP:[127, 0, 0, 1]",
        ]
    );
    // The key matches the leaf: it loads as a workload certificate.
    WorkloadCertificate::new(&serving.key_pem, &serving.chain_pem).unwrap();
}

/// The CA reads CSRs from any pod: whatever arrives, mutated or made up, it answers with an error
/// or with a leaf for exactly the identity it authorized, never a panic.
mod hostile_csrs {
    use super::*;
    use proptest::prelude::*;

    fn leaf_sans(chain: &[String]) -> Vec<String> {
        let leaf_der = der(&chain[0]);
        let (_, leaf) = X509Certificate::from_der(&leaf_der).unwrap();
        leaf.extensions()
            .iter()
            .filter_map(|e| match e.parsed_extension() {
                ParsedExtension::SubjectAlternativeName(san) => Some(san),
                _ => None,
            })
            .flat_map(|san| san.general_names.iter())
            .map(|name| match name {
                GeneralName::URI(uri) => uri.to_string(),
                other => format!("{other}"),
            })
            .collect()
    }

    /// One CA and one genuine CSR for the whole run (key generation per case would dominate).
    fn fixture() -> &'static (CertificateAuthority, Identity, Vec<u8>) {
        static FIXTURE: std::sync::OnceLock<(CertificateAuthority, Identity, Vec<u8>)> =
            std::sync::OnceLock::new();
        FIXTURE.get_or_init(|| {
            let identity = id("spiffe://cluster.local/ns/default/sa/web");
            let request = csr::generate(&identity).unwrap();
            (root(), identity, der(&request.csr_pem))
        })
    }

    proptest! {
        #[test]
        fn a_mutated_csr_is_refused_or_signed_only_for_the_authorized_identity(
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..4),
            cut in proptest::option::of(any::<usize>()),
            tag in prop_oneof![
                Just("CERTIFICATE REQUEST"),
                Just("NEW CERTIFICATE REQUEST"),
                Just("CERTIFICATE"),
            ],
        ) {
            let (ca, identity, genuine) = fixture();
            let mut bytes = genuine.clone();
            for (at, mask) in &flips {
                let i = at % bytes.len();
                bytes[i] ^= mask;
            }
            if let Some(cut) = cut {
                bytes.truncate(cut % (bytes.len() + 1));
            }
            let pem_text = pem::encode(&pem::Pem::new(tag, bytes.clone()));
            match ca.sign_csr(&pem_text, identity, HOUR) {
                Ok(chain) => {
                    prop_assert_eq!(tag.contains("REQUEST"), true);
                    prop_assert_eq!(leaf_sans(&chain), vec![identity.to_string()]);
                }
                Err(e) => prop_assert!(!e.to_string().is_empty()),
            }
            // Never for anyone else, however it was changed.
            let other = id("spiffe://cluster.local/ns/default/sa/admin");
            prop_assert!(ca.sign_csr(&pem_text, &other, HOUR).is_err());
        }

        #[test]
        fn arbitrary_text_is_refused_with_a_reason(text in any::<String>()) {
            let (ca, identity, _) = fixture();
            let refused = ca.sign_csr(&text, identity, HOUR);
            prop_assert!(refused.is_err());
        }
    }
}
