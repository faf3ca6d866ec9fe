//! What is known about the traffic being authorized: the connection (built only from a verified
//! peer, or explicitly plaintext) and, for HTTP at a waypoint, the request on it.

use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};

use ambit_identity::Identity;
use ambit_identity::tls::VerifiedPeer;
use http::HeaderMap;

/// What is known about a connection at the destination (or at the waypoint).
///
/// The source identity can only come from a [`VerifiedPeer`], the proof the certificate
/// verifier hands out, so a caller cannot be authorized on a name it merely claimed.
#[derive(Clone, Debug)]
pub struct ConnectionContext {
    src_ip: IpAddr,
    src_identity: Option<Identity>,
    dst: SocketAddr,
}

impl ConnectionContext {
    /// A connection that arrived over mutual TLS from a verified peer. `dst` is the address and
    /// port the connection is for (the destination workload's, or at a waypoint the service's).
    pub fn verified(src_ip: IpAddr, peer: &VerifiedPeer, dst: SocketAddr) -> Self {
        ConnectionContext {
            src_ip,
            src_identity: Some(peer.identity().clone()),
            dst,
        }
    }

    /// A plaintext connection: no identity.
    pub fn plaintext(src_ip: IpAddr, dst: SocketAddr) -> Self {
        ConnectionContext {
            src_ip,
            src_identity: None,
            dst,
        }
    }

    /// A connection whose source identity is taken on trust, for explaining or simulating a
    /// verdict ("what would policy say about this identity?") and for tests. Never use it on the
    /// data path: there the identity must come from [`ConnectionContext::verified`].
    pub fn danger_assumed_identity(
        src_ip: IpAddr,
        identity: Option<Identity>,
        dst: SocketAddr,
    ) -> Self {
        ConnectionContext {
            src_ip,
            src_identity: identity,
            dst,
        }
    }

    /// The client's address as the destination sees it.
    pub fn src_ip(&self) -> IpAddr {
        self.src_ip
    }

    /// The client's identity, present only when mutual TLS proved it.
    pub fn src_identity(&self) -> Option<&Identity> {
        self.src_identity.as_ref()
    }

    /// The destination address and port.
    pub fn dst(&self) -> SocketAddr {
        self.dst
    }

    /// An HTTP request on this connection. `path` may carry a query (it is ignored), `authority`
    /// a port (it is ignored); header names are matched ignoring case.
    pub fn with_request<'a>(
        &'a self,
        method: &'a str,
        path: &'a str,
        authority: &'a str,
        headers: &'a HeaderMap,
    ) -> RequestContext<'a> {
        RequestContext {
            conn: self,
            method,
            path: strip_query(path),
            host: strip_port(authority),
            headers,
        }
    }
}

/// An HTTP request and the connection it came on.
#[derive(Clone, Copy, Debug)]
pub struct RequestContext<'a> {
    conn: &'a ConnectionContext,
    method: &'a str,
    path: &'a str,
    host: &'a str,
    headers: &'a HeaderMap,
}

impl<'a> RequestContext<'a> {
    /// The connection the request came on.
    pub fn connection(&self) -> &'a ConnectionContext {
        self.conn
    }

    /// The request method (`GET`).
    pub fn method(&self) -> &'a str {
        self.method
    }

    /// The path without query or fragment.
    pub fn path(&self) -> &'a str {
        self.path
    }

    /// The authority (or `Host`) without port.
    pub fn host(&self) -> &'a str {
        self.host
    }

    /// A header's value; several values of one header are joined with `,` (as HTTP allows).
    pub fn header(&self, name: &str) -> Option<Cow<'a, str>> {
        let mut values = self.headers.get_all(name).iter();
        let first = String::from_utf8_lossy(values.next()?.as_bytes());
        let Some(second) = values.next() else {
            return Some(first);
        };
        let mut joined = first.into_owned();
        for value in std::iter::once(second).chain(values) {
            joined.push(',');
            joined.push_str(&String::from_utf8_lossy(value.as_bytes()));
        }
        Some(Cow::Owned(joined))
    }
}

fn strip_query(path: &str) -> &str {
    path.find(['?', '#']).map_or(path, |end| &path[..end])
}

fn strip_port(authority: &str) -> &str {
    if authority.starts_with('[') {
        // `[v6]` or `[v6]:port`: keep the brackets.
        return authority
            .find(']')
            .map_or(authority, |end| &authority[..=end]);
    }
    match authority.rsplit_once(':') {
        Some((host, port))
            if !host.contains(':')
                && !port.is_empty()
                && port.bytes().all(|b| b.is_ascii_digit()) =>
        {
            host
        }
        _ => authority,
    }
}

/// What a policy is evaluated against: a connection (L4, no request fields) or a request.
#[derive(Clone, Copy, Debug)]
pub enum Subject<'a> {
    /// A TCP connection.
    Connection(&'a ConnectionContext),
    /// An HTTP request.
    Request(&'a RequestContext<'a>),
}

impl<'a> From<&'a ConnectionContext> for Subject<'a> {
    fn from(conn: &'a ConnectionContext) -> Self {
        Subject::Connection(conn)
    }
}

impl<'a> From<&'a RequestContext<'a>> for Subject<'a> {
    fn from(request: &'a RequestContext<'a>) -> Self {
        Subject::Request(request)
    }
}

impl<'a> Subject<'a> {
    pub(crate) fn facts(self) -> Facts<'a> {
        let (conn, request) = match self {
            Subject::Connection(conn) => (conn, None),
            Subject::Request(request) => (request.conn, Some(request)),
        };
        Facts {
            conn,
            principal: conn.src_identity.as_ref().map(Identity::principal),
            request,
        }
    }
}

/// A subject prepared for evaluation: the principal rendered once for every policy.
#[derive(Debug)]
pub(crate) struct Facts<'a> {
    pub(crate) conn: &'a ConnectionContext,
    pub(crate) principal: Option<String>,
    pub(crate) request: Option<&'a RequestContext<'a>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_context_strips_query_and_port() {
        let conn = ConnectionContext::plaintext(
            "10.0.0.1".parse().unwrap(),
            "10.0.1.1:80".parse().unwrap(),
        );
        let mut headers = HeaderMap::new();
        headers.append("x-tag", "a".parse().unwrap());
        headers.append("x-tag", "b".parse().unwrap());
        headers.insert("x-one", "1".parse().unwrap());
        let r = conn.with_request("GET", "/api/v1?x=1#frag", "Echo.demo:8080", &headers);
        assert_eq!(r.path(), "/api/v1");
        assert_eq!(r.host(), "Echo.demo");
        assert_eq!(r.method(), "GET");
        assert_eq!(r.header("X-Tag").as_deref(), Some("a,b"));
        assert_eq!(r.header("x-one").as_deref(), Some("1"));
        assert_eq!(r.header("x-none"), None);
        assert_eq!(strip_port("[fd00::1]:80"), "[fd00::1]");
        assert_eq!(strip_port("[fd00::1]"), "[fd00::1]");
        assert_eq!(strip_port("fd00::1"), "fd00::1");
        assert_eq!(strip_port("echo"), "echo");
        assert_eq!(strip_query("/#x"), "/");
    }
}
