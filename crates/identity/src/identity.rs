//! The SPIFFE identity of an Istio workload: `spiffe://<trust-domain>/ns/<namespace>/sa/<sa>`.
//!
//! Parsing is strict on purpose: this is the only form ztunnel accepts, and an identity that is
//! almost right (an extra segment, an empty namespace) must never match a policy by accident.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

const SCHEME: &str = "spiffe://";

/// A workload identity, `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
///
/// Obtained by parsing a string, from [`Identity::new`], or (as proof of a peer) from a verified
/// TLS handshake via [`crate::tls::VerifiedPeer`].
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    trust_domain: Arc<str>,
    namespace: Arc<str>,
    service_account: Arc<str>,
}

/// Why a string is not an Istio SPIFFE identity. Each message quotes the offending input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// The string does not start with `spiffe://`.
    #[error("{input:?} is not a SPIFFE ID: it must start with \"spiffe://\"")]
    MissingScheme {
        /// The rejected string.
        input: String,
    },
    /// The path is not exactly `/ns/<namespace>/sa/<service-account>`.
    #[error(
        "{input:?} is not an Istio SPIFFE ID: the path after the trust domain must be exactly \
         /ns/<namespace>/sa/<service-account>, found {path:?}"
    )]
    BadPath {
        /// The rejected string.
        input: String,
        /// The part after the trust domain.
        path: String,
    },
    /// One of the three parts is empty.
    #[error("{input:?} is not a valid SPIFFE ID: the {field} is empty")]
    EmptyField {
        /// The rejected string.
        input: String,
        /// "trust domain", "namespace" or "service account".
        field: &'static str,
    },
    /// A part contains a character SPIFFE IDs do not allow.
    #[error(
        "{input:?} is not a valid SPIFFE ID: the {field} {value:?} contains {character:?}; \
         allowed are {allowed}"
    )]
    InvalidCharacter {
        /// The rejected string.
        input: String,
        /// "trust domain", "namespace" or "service account".
        field: &'static str,
        /// The part at fault.
        value: String,
        /// The first character not allowed.
        character: char,
        /// The allowed character set, for the operator.
        allowed: &'static str,
    },
}

const TRUST_DOMAIN_CHARS: &str = "lowercase letters, digits, '.', '-' and '_'";
const SEGMENT_CHARS: &str = "letters, digits, '.', '-' and '_'";

impl Identity {
    /// Builds an identity from its three parts, with the same checks as parsing.
    pub fn new(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, IdentityError> {
        let input = format!("{SCHEME}{trust_domain}/ns/{namespace}/sa/{service_account}");
        Self::from_parts(&input, trust_domain, namespace, service_account)
    }

    /// The trust domain, e.g. `cluster.local`.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The Kubernetes namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The Kubernetes service account.
    pub fn service_account(&self) -> &str {
        &self.service_account
    }

    /// `td/ns/x/sa/y`: the form Istio AuthorizationPolicy principals use (no scheme).
    pub fn principal(&self) -> String {
        format!(
            "{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }

    fn from_parts(
        input: &str,
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, IdentityError> {
        check_part(
            input,
            "trust domain",
            trust_domain,
            TRUST_DOMAIN_CHARS,
            |c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_'),
        )?;
        for (field, value) in [
            ("namespace", namespace),
            ("service account", service_account),
        ] {
            check_part(input, field, value, SEGMENT_CHARS, |c| {
                c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')
            })?;
        }
        Ok(Identity {
            trust_domain: trust_domain.into(),
            namespace: namespace.into(),
            service_account: service_account.into(),
        })
    }
}

fn check_part(
    input: &str,
    field: &'static str,
    value: &str,
    allowed: &'static str,
    is_allowed: impl Fn(char) -> bool,
) -> Result<(), IdentityError> {
    if value.is_empty() {
        return Err(IdentityError::EmptyField {
            input: input.to_owned(),
            field,
        });
    }
    if let Some(character) = value.chars().find(|c| !is_allowed(*c)) {
        return Err(IdentityError::InvalidCharacter {
            input: input.to_owned(),
            field,
            value: value.to_owned(),
            character,
            allowed,
        });
    }
    Ok(())
}

impl FromStr for Identity {
    type Err = IdentityError;

    /// Parses exactly `spiffe://<td>/ns/<ns>/sa/<sa>`.
    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let rest = input
            .strip_prefix(SCHEME)
            .ok_or_else(|| IdentityError::MissingScheme {
                input: input.to_owned(),
            })?;
        let (trust_domain, path) = rest.split_once('/').unwrap_or((rest, ""));
        let bad_path = || IdentityError::BadPath {
            input: input.to_owned(),
            path: format!("/{path}"),
        };
        let segments: Vec<&str> = path.split('/').collect();
        match segments.as_slice() {
            ["ns", namespace, "sa", service_account] => {
                Self::from_parts(input, trust_domain, namespace, service_account)
            }
            _ if trust_domain.is_empty() => Err(IdentityError::EmptyField {
                input: input.to_owned(),
                field: "trust domain",
            }),
            _ => Err(bad_path()),
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{SCHEME}{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Identity({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_well_formed_id_and_prints_it_back() {
        let id: Identity = "spiffe://cluster.local/ns/default/sa/bookinfo-productpage"
            .parse()
            .unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "default");
        assert_eq!(id.service_account(), "bookinfo-productpage");
        assert_eq!(
            id.to_string(),
            "spiffe://cluster.local/ns/default/sa/bookinfo-productpage"
        );
        assert_eq!(
            id.principal(),
            "cluster.local/ns/default/sa/bookinfo-productpage"
        );
        assert_eq!(
            Identity::new("cluster.local", "default", "bookinfo-productpage").unwrap(),
            id
        );
    }

    fn error(input: &str) -> String {
        input.parse::<Identity>().unwrap_err().to_string()
    }

    #[test]
    fn rejects_a_missing_or_wrong_scheme() {
        assert_eq!(
            error("cluster.local/ns/a/sa/b"),
            r#""cluster.local/ns/a/sa/b" is not a SPIFFE ID: it must start with "spiffe://""#
        );
        assert_eq!(
            error("https://cluster.local/ns/a/sa/b"),
            r#""https://cluster.local/ns/a/sa/b" is not a SPIFFE ID: it must start with "spiffe://""#
        );
    }

    #[test]
    fn rejects_paths_that_are_not_ns_sa() {
        for (input, path) in [
            ("spiffe://cluster.local/ns/a/sa/b/extra", "/ns/a/sa/b/extra"),
            ("spiffe://cluster.local/ns/a", "/ns/a"),
            ("spiffe://cluster.local", "/"),
            ("spiffe://cluster.local/sa/b/ns/a", "/sa/b/ns/a"),
            ("spiffe://cluster.local/ns/a/sa/b/", "/ns/a/sa/b/"),
        ] {
            assert_eq!(
                error(input),
                format!(
                    "{input:?} is not an Istio SPIFFE ID: the path after the trust domain must \
                     be exactly /ns/<namespace>/sa/<service-account>, found {path:?}"
                )
            );
        }
    }

    #[test]
    fn rejects_empty_parts_naming_the_part() {
        assert_eq!(
            error("spiffe:///ns/a/sa/b"),
            r#""spiffe:///ns/a/sa/b" is not a valid SPIFFE ID: the trust domain is empty"#
        );
        assert_eq!(
            error("spiffe://td/ns//sa/b"),
            r#""spiffe://td/ns//sa/b" is not a valid SPIFFE ID: the namespace is empty"#
        );
        assert_eq!(
            error("spiffe://td/ns/a/sa/"),
            r#""spiffe://td/ns/a/sa/" is not a valid SPIFFE ID: the service account is empty"#
        );
        assert_eq!(
            Identity::new("td", "", "sa").unwrap_err().to_string(),
            r#""spiffe://td/ns//sa/sa" is not a valid SPIFFE ID: the namespace is empty"#
        );
    }

    #[test]
    fn rejects_characters_spiffe_forbids() {
        assert_eq!(
            error("spiffe://Cluster.local/ns/a/sa/b"),
            r#""spiffe://Cluster.local/ns/a/sa/b" is not a valid SPIFFE ID: the trust domain "Cluster.local" contains 'C'; allowed are lowercase letters, digits, '.', '-' and '_'"#
        );
        assert_eq!(
            error("spiffe://td/ns/a b/sa/b"),
            r#""spiffe://td/ns/a b/sa/b" is not a valid SPIFFE ID: the namespace "a b" contains ' '; allowed are letters, digits, '.', '-' and '_'"#
        );
        assert_eq!(
            error("spiffe://td:443/ns/a/sa/b"),
            r#""spiffe://td:443/ns/a/sa/b" is not a valid SPIFFE ID: the trust domain "td:443" contains ':'; allowed are lowercase letters, digits, '.', '-' and '_'"#
        );
    }
}
