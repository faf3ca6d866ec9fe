//! Istio's `response_flags`: why a connection or request ended badly, and the trait that lets a
//! path's error type say which flag it stands for.

use std::borrow::Cow;
use std::fmt;
use std::ops::{BitOr, BitOrAssign};

/// A set of response flags, rendered as Istio does: `-` when empty, else the flags joined with
/// `,` in a fixed order (`UF,URX`).
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct ResponseFlags(u32);

impl ResponseFlags {
    /// No failure.
    pub const NONE: Self = Self(0);
    /// L4: refused by authorization policy (`DENY`).
    pub const DENY: Self = Self(1);
    /// L4: the upstream connection or tunnel could not be made or broke (`CONNECT`).
    pub const CONNECT: Self = Self(1 << 1);
    /// L4: TLS failed: bad identity, untrusted chain, expired certificate (`TLS_FAILURE`).
    pub const TLS_FAILURE: Self = Self(1 << 2);
    /// L4: the HTTP/2 handshake of a tunnel failed (`H2_HANDSHAKE_FAILURE`).
    pub const H2_HANDSHAKE_FAILURE: Self = Self(1 << 3);
    /// L4: refused by a network policy (`NETWORK_POLICY`).
    pub const NETWORK_POLICY: Self = Self(1 << 4);
    /// L4: no certificate for our side (`IDENTITY_ERROR`).
    pub const IDENTITY_ERROR: Self = Self(1 << 5);
    /// L4: the peer's certificate is revoked (`CERT_REVOKED`).
    pub const CERT_REVOKED: Self = Self(1 << 6);
    /// Downstream disconnected before a response was sent (`DC`).
    pub const DOWNSTREAM_DISCONNECT: Self = Self(1 << 7);
    /// No route matched the request (`NR`).
    pub const NO_ROUTE: Self = Self(1 << 8);
    /// Upstream connection terminated (`UC`).
    pub const UPSTREAM_CONNECTION_TERMINATION: Self = Self(1 << 9);
    /// Upstream connection failed (`UF`).
    pub const UPSTREAM_CONNECT_FAILURE: Self = Self(1 << 10);
    /// No healthy upstream (`UH`).
    pub const NO_HEALTHY_UPSTREAM: Self = Self(1 << 11);
    /// Upstream reset the stream (`UR`).
    pub const UPSTREAM_RESET: Self = Self(1 << 12);
    /// Retries exhausted (`URX`).
    pub const UPSTREAM_RETRY_LIMIT_EXCEEDED: Self = Self(1 << 13);
    /// Upstream request timeout (`UT`).
    pub const UPSTREAM_TIMEOUT: Self = Self(1 << 14);
    /// Refused because a connection-pool limit was reached (`UO`).
    pub const UPSTREAM_OVERFLOW: Self = Self(1 << 15);
    /// Aborted by fault injection (`FI`).
    pub const FAULT_INJECTED: Self = Self(1 << 16);
    /// Delayed by fault injection (`DI`).
    pub const DELAY_INJECTED: Self = Self(1 << 17);

    /// Rendering order and names.
    const NAMES: [(ResponseFlags, &'static str); 18] = [
        (Self::DENY, "DENY"),
        (Self::CONNECT, "CONNECT"),
        (Self::TLS_FAILURE, "TLS_FAILURE"),
        (Self::H2_HANDSHAKE_FAILURE, "H2_HANDSHAKE_FAILURE"),
        (Self::NETWORK_POLICY, "NETWORK_POLICY"),
        (Self::IDENTITY_ERROR, "IDENTITY_ERROR"),
        (Self::CERT_REVOKED, "CERT_REVOKED"),
        (Self::DOWNSTREAM_DISCONNECT, "DC"),
        (Self::NO_ROUTE, "NR"),
        (Self::UPSTREAM_CONNECTION_TERMINATION, "UC"),
        (Self::UPSTREAM_CONNECT_FAILURE, "UF"),
        (Self::NO_HEALTHY_UPSTREAM, "UH"),
        (Self::UPSTREAM_RESET, "UR"),
        (Self::UPSTREAM_RETRY_LIMIT_EXCEEDED, "URX"),
        (Self::UPSTREAM_TIMEOUT, "UT"),
        (Self::UPSTREAM_OVERFLOW, "UO"),
        (Self::FAULT_INJECTED, "FI"),
        (Self::DELAY_INJECTED, "DI"),
    ];

    /// True when no flag is set.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// True when every flag of `other` is set here.
    pub fn contains(self, other: ResponseFlags) -> bool {
        self.0 & other.0 == other.0
    }

    /// The label value: `-`, one name, or names joined with `,`.
    pub fn as_label(self) -> Cow<'static, str> {
        let mut set = Self::NAMES.iter().filter(|(f, _)| self.contains(*f));
        match (set.next(), set.next()) {
            (None, _) => Cow::Borrowed("-"),
            (Some((_, only)), None) => Cow::Borrowed(only),
            (Some((_, first)), Some((_, second))) => {
                let mut out = format!("{first},{second}");
                for (_, name) in set {
                    out.push(',');
                    out.push_str(name);
                }
                Cow::Owned(out)
            }
        }
    }
}

impl BitOr for ResponseFlags {
    type Output = Self;
    fn bitor(self, rhs: Self) -> Self {
        Self(self.0 | rhs.0)
    }
}

impl BitOrAssign for ResponseFlags {
    fn bitor_assign(&mut self, rhs: Self) {
        self.0 |= rhs.0;
    }
}

impl fmt::Display for ResponseFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.as_label())
    }
}

impl fmt::Debug for ResponseFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ResponseFlags({})", self.as_label())
    }
}

/// Implemented by each data path's error type, so the accounting guard takes the flag from the
/// error itself: `guard.fail(&err)` and the metric label and access log agree with the error.
pub trait ResponseFlag {
    /// The flags this failure is counted under.
    fn response_flag(&self) -> ResponseFlags;
}

impl<T: ResponseFlag + ?Sized> ResponseFlag for &T {
    fn response_flag(&self) -> ResponseFlags {
        (**self).response_flag()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_render_like_istio() {
        assert_eq!(ResponseFlags::NONE.to_string(), "-");
        assert_eq!(ResponseFlags::DENY.to_string(), "DENY");
        assert_eq!(ResponseFlags::NO_HEALTHY_UPSTREAM.to_string(), "UH");
        let both =
            ResponseFlags::UPSTREAM_RETRY_LIMIT_EXCEEDED | ResponseFlags::UPSTREAM_CONNECT_FAILURE;
        assert_eq!(both.to_string(), "UF,URX");
        assert!(both.contains(ResponseFlags::UPSTREAM_CONNECT_FAILURE));
        assert!(!both.contains(ResponseFlags::UPSTREAM_TIMEOUT));
        let all = ResponseFlags::NAMES
            .iter()
            .fold(ResponseFlags::NONE, |acc, (f, _)| acc | *f);
        assert_eq!(
            all.to_string(),
            "DENY,CONNECT,TLS_FAILURE,H2_HANDSHAKE_FAILURE,NETWORK_POLICY,IDENTITY_ERROR,\
             CERT_REVOKED,DC,NR,UC,UF,UH,UR,URX,UT,UO,FI,DI"
        );
    }
}
