//! The errors an HBONE caller sees, with messages written for the operator reading a log line.

use std::net::SocketAddr;
use std::time::Duration;

use http::StatusCode;

use crate::dialer::DialError;

/// Why opening, serving or using an HBONE tunnel failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HboneError {
    /// The dialer could not produce a verified TLS connection to the next hop.
    #[error("HBONE connection to {dst} failed: {source}")]
    Dial {
        /// The next hop (normally `<ip>:15008`).
        dst: SocketAddr,
        /// What the dialer reported.
        #[source]
        source: DialError,
    },
    /// Dialing plus the HTTP/2 handshake took longer than `PoolConfig::connect_timeout`.
    #[error(
        "HBONE connection to {dst} not established within {timeout:?} (is the peer's ztunnel \
         up, or is a NetworkPolicy or firewall silently dropping port {port}?)",
        port = dst.port()
    )]
    ConnectTimeout {
        /// The next hop.
        dst: SocketAddr,
        /// The configured deadline.
        timeout: Duration,
    },
    /// TLS succeeded but the peer did not speak HTTP/2 as expected.
    #[error("HTTP/2 handshake with {peer} failed (is the peer an HBONE endpoint?): {source}")]
    Handshake {
        /// The other end of the connection.
        peer: SocketAddr,
        /// The h2 error.
        #[source]
        source: h2::Error,
    },
    /// The CONNECT authority is not a valid `host:port`.
    #[error("invalid HBONE :authority {authority:?}: expected host:port or [ipv6]:port")]
    InvalidAuthority {
        /// The rejected value.
        authority: String,
    },
    /// The CONNECT request could not be sent or its response did not arrive.
    #[error("CONNECT {authority} via {dst} failed before a response arrived: {source}")]
    Request {
        /// The target the tunnel was for.
        authority: String,
        /// The next hop the request went to.
        dst: SocketAddr,
        /// The h2 error.
        #[source]
        source: h2::Error,
    },
    /// Reading the client's first bytes, to send with the CONNECT before its answer, failed (the
    /// client reset or broke its connection while the tunnel was opening).
    #[error("reading the client's bytes to send with CONNECT {authority} failed: {source}")]
    EarlyData {
        /// The target the tunnel was for.
        authority: String,
        /// The read error.
        #[source]
        source: std::io::Error,
    },
    /// The server answered the CONNECT with a status other than 200.
    #[error("HBONE server answered {} to CONNECT ({})", .0, status_hint(*.0))]
    Status(StatusCode),
    /// An established stream failed.
    #[error("HBONE stream failed: {0}")]
    Stream(#[source] h2::Error),
    /// Sending the response to a CONNECT failed (the client went away).
    #[error(
        "answering CONNECT {authority} failed (the client reset the stream or closed the connection): {source}"
    )]
    Respond {
        /// The requested target.
        authority: String,
        /// The h2 error.
        #[source]
        source: h2::Error,
    },
    /// The HTTP/2 connection failed while serving or carrying streams.
    #[error("HBONE connection with {peer} failed: {source}")]
    Connection {
        /// The other end of the connection.
        peer: SocketAddr,
        /// The h2 error.
        #[source]
        source: h2::Error,
    },
    /// No PONG arrived in time: the peer or the path to it is gone.
    #[error(
        "HBONE connection with {peer} did not answer a keepalive PING within {timeout:?} (peer \
         down, or the network path dropped the connection)"
    )]
    KeepaliveTimeout {
        /// The other end of the connection.
        peer: SocketAddr,
        /// The configured keepalive timeout.
        timeout: Duration,
    },
}

/// The likely cause behind a non-200 CONNECT status, as upstream servers use them.
fn status_hint(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 => {
            "request rejected as malformed: the :authority may not be an address of the \
             destination pod, or the target port is reserved"
        }
        401 | 403 => "denied by an authorization policy at the destination",
        503 => {
            "the destination could not reach the target: workload unknown there, or nothing \
             listening on the target port"
        }
        _ => "unexpected status from the HBONE server",
    }
}
