//! ZDS, the protocol by which a node's CNI agent hands pods to ztunnel: a `SOCK_SEQPACKET` Unix
//! socket carrying one protobuf message per datagram (at most 1 KiB, no length prefix), with the
//! pod's network-namespace file descriptor attached to `AddWorkload` as `SCM_RIGHTS`.
//!
//! ztunnel is the [`client`]: it connects, says hello, receives a snapshot (`Add`/`Keep` per pod,
//! then `SnapshotSent`) followed by live `Add`/`Del`, and acknowledges every message. The agent is
//! the [`server`]: it replays its pods on every new connection and sends one request at a time,
//! waiting for each acknowledgement.
//!
//! This crate owns the framing, the fd passing and the request/ack discipline of both ends; what
//! a pod *means* (starting proxies, redirection) belongs to ztunnel and the agent.

use std::path::PathBuf;
use std::time::Duration;

use thiserror::Error;

pub mod client;
pub mod server;
mod wire;

pub use ambit_proto::zds::WorkloadInfo;

/// Largest datagram either side accepts (upstream reads into a 1024-byte buffer).
pub const MAX_MESSAGE: usize = 1024;

/// How long one side waits for the other's reply by default (upstream: 5 s).
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// ZDS failures on either end. Each message names the socket, message or pod involved and the
/// likely cause, so that it can be logged as is.
#[derive(Debug, Error)]
pub enum ZdsError {
    /// The node agent could not create its listening socket.
    #[error(
        "cannot bind the ZDS socket {path}: {source}; the node agent needs write access to \
         the socket's directory and a path under 100 bytes"
    )]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// What the OS reported.
        #[source]
        source: std::io::Error,
    },
    /// Something other than a socket sits where the agent must bind; it is left alone.
    #[error(
        "{path} exists and is not a socket; refusing to delete it to bind the ZDS socket \
         (is the ZDS socket path pointing at the wrong file?)"
    )]
    NotASocket {
        /// The socket path.
        path: PathBuf,
    },
    /// ztunnel could not reach the node agent's socket.
    #[error(
        "cannot connect to the node agent's ZDS socket {path}: {source}; is the node agent \
         running, and is its socket directory shared with ztunnel?"
    )]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// What the OS reported.
        #[source]
        source: std::io::Error,
    },
    /// Writing a datagram failed; the connection is no longer usable.
    #[error("sending {message} over ZDS failed: {source}; the peer has probably gone away")]
    Send {
        /// The message, e.g. `AddWorkload for pod 1234-abcd`.
        message: String,
        /// What the OS reported.
        #[source]
        source: std::io::Error,
    },
    /// Reading a datagram failed; the connection is no longer usable.
    #[error("receiving {expected} over ZDS failed: {source}; the peer has probably gone away")]
    Receive {
        /// What was being waited for, e.g. `ztunnel's ack`.
        expected: &'static str,
        /// What the OS reported.
        #[source]
        source: std::io::Error,
    },
    /// A message of ours does not fit in one datagram. Nothing was sent; the connection is fine.
    #[error(
        "{message} encodes to {size} bytes, over the {MAX_MESSAGE}-byte ZDS datagram limit; \
         the pod's uid, name, namespace or service account is unusually long"
    )]
    TooLarge {
        /// The message, e.g. `AddWorkload for pod 1234-abcd`.
        message: String,
        /// Its encoded size.
        size: usize,
    },
    /// The peer broke the protocol; the connection is no longer usable.
    #[error("ZDS protocol error: {0}")]
    Protocol(String),
    /// The peer did not answer in time; the connection is dropped because a late answer could
    /// no longer be matched to its request.
    #[error(
        "the ZDS peer did not send {expected} within {after:?}; it is stuck or overloaded, \
         so the connection was dropped"
    )]
    Timeout {
        /// What was being waited for, e.g. `ztunnel's ack`.
        expected: &'static str,
        /// How long we waited.
        after: Duration,
    },
    /// The peer closed the connection while an answer was due.
    #[error("the ZDS peer closed the connection")]
    Closed,
    /// No ztunnel is connected to the agent; it receives the pod in the next snapshot.
    #[error(
        "no ztunnel is connected to the ZDS socket; the pod is handed over in the snapshot \
         when ztunnel connects"
    )]
    NotConnected,
    /// ztunnel answered with a NACK; the text is ztunnel's reason.
    #[error("ztunnel refused the request: {0}")]
    Refused(String),
    /// [`client::ZdsClient::ack`] was called with no request waiting for an answer. Sending it
    /// would make the agent match it to a later request, so it was not sent.
    #[error(
        "ack() called with no ZDS request awaiting an answer; every event from next_event() \
         takes exactly one ack"
    )]
    NothingToAck,
}
