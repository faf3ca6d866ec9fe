//! Certificates as JSON in the shape upstream ztunnel's `/config_dump` uses: per identity its
//! `identity`, `state` (`Initializing`, `Available` or `Unavailable: <why>`), `certChain` (leaf
//! first, then intermediates) and `rootCerts`, each certificate as `pem` (the PEM text,
//! base64-encoded), `serialNumber` (decimal), `validFrom` and `expirationTime` (RFC 3339, UTC).
//! Never a private key.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use serde_json::{Value, json};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::store::{CertState, CertStatus};

/// RFC 3339 in seconds, UTC (`2026-12-05T10:00:00Z`).
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

fn unix(seconds: i64) -> SystemTime {
    match u64::try_from(seconds) {
        Ok(s) => UNIX_EPOCH + Duration::from_secs(s),
        Err(_) => UNIX_EPOCH - Duration::from_secs(seconds.unsigned_abs()),
    }
}

/// One certificate (the first in `pem`); a certificate that cannot be read still shows its PEM,
/// with the reason under `error` (an Ambit-only key).
pub fn certificate(pem: &str) -> Value {
    let encoded = base64(pem.as_bytes());
    let der = match CertificateDer::pem_slice_iter(pem.as_bytes()).next() {
        Some(Ok(der)) => der,
        Some(Err(e)) => return json!({"pem": encoded, "error": e.to_string()}),
        None => return json!({"pem": encoded, "error": "no \"BEGIN CERTIFICATE\" block"}),
    };
    match X509Certificate::from_der(der.as_ref()) {
        Ok((_, cert)) => {
            let validity = cert.validity();
            json!({
                "pem": encoded,
                "serialNumber": cert.serial.to_string(),
                "validFrom": rfc3339(unix(validity.not_before.timestamp())),
                "expirationTime": rfc3339(unix(validity.not_after.timestamp())),
            })
        }
        Err(e) => json!({"pem": encoded, "error": e.to_string()}),
    }
}

/// `Initializing`, `Available` or `Unavailable: <last error>`, as upstream names them (a
/// certificate being refreshed is still `Available`).
pub fn state(s: &CertState) -> String {
    match s {
        CertState::Initializing => "Initializing".to_string(),
        CertState::Available | CertState::Refreshing => "Available".to_string(),
        CertState::Failing { last_error, .. } => format!("Unavailable: {last_error}"),
    }
}

/// Every identity's certificates.
pub fn certificates(statuses: &[CertStatus]) -> Value {
    Value::Array(
        statuses
            .iter()
            .map(|c| {
                json!({
                    "identity": c.identity.to_string(),
                    "state": state(&c.state),
                    "certChain": c.chain_pem.iter().map(|p| certificate(p)).collect::<Vec<_>>(),
                    "rootCerts": c.roots_pem.iter().map(|p| certificate(p)).collect::<Vec<_>>(),
                })
            })
            .collect(),
    )
}

/// Standard base64 with padding.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18u32, 12, 6, 0].into_iter().enumerate() {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> shift) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_the_standard_alphabet_and_padding() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
        assert_eq!(base64(b"\xff\xfe"), "//4=");
    }

    #[test]
    fn a_certificate_shows_its_serial_and_validity() {
        let ca = crate::ca::CertificateAuthority::generate_root(
            "cluster.local",
            Duration::from_secs(3600),
        )
        .unwrap();
        let pem = ca.root_pem();
        let dump = certificate(&pem);
        assert!(
            dump["serialNumber"]
                .as_str()
                .is_some_and(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())),
            "{dump}"
        );
        let from = dump["validFrom"].as_str().unwrap();
        let to = dump["expirationTime"].as_str().unwrap();
        assert!(
            from.ends_with('Z') && to.ends_with('Z') && from < to,
            "{dump}"
        );
        assert_eq!(dump["pem"], base64(pem.as_bytes()));
    }
}
