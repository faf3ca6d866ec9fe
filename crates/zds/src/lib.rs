//! ZDS, the protocol by which a node's CNI agent hands pods to ztunnel: a `SOCK_SEQPACKET` Unix
//! socket carrying one protobuf message per datagram (at most 1 KiB, no length prefix), with the
//! pod's network-namespace file descriptor attached to `AddWorkload` as `SCM_RIGHTS`.
//!
//! ztunnel is the [`client`]: it connects, says hello, receives a snapshot (`Add`/`Keep` per pod,
//! then `SnapshotSent`) followed by live `Add`/`Del`, and acknowledges every message. The agent is
//! the [`server`]: it replays its pods on every new connection and sends one request at a time,
//! waiting for each acknowledgement.

use std::os::fd::{BorrowedFd, OwnedFd};
use std::time::Duration;

use prost::Message;
use thiserror::Error;
use tokio_seqpacket::UnixSeqpacket;
use tokio_seqpacket::ancillary::{AncillaryMessageWriter, OwnedAncillaryMessage};

pub mod client;
pub mod server;

pub use ambit_proto::zds::WorkloadInfo;

/// Largest datagram either side accepts.
pub const MAX_MESSAGE: usize = 1024;

/// How long one side waits for the other's reply (upstream: 5 s).
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// ZDS failures. Messages say which side and what to check.
#[derive(Debug, Error)]
pub enum ZdsError {
    /// The socket could not be opened.
    #[error("ZDS socket {path}: {source}")]
    Socket {
        /// The socket path.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Reading or writing failed.
    #[error("ZDS I/O failed: {0}")]
    Io(#[from] std::io::Error),
    /// The peer broke the protocol; the connection is no longer usable.
    #[error("ZDS protocol error: {0}")]
    Protocol(String),
    /// The peer did not answer in time.
    #[error("ZDS peer did not answer within {0:?}")]
    Timeout(Duration),
    /// The peer closed the connection.
    #[error("ZDS peer closed the connection")]
    Closed,
    /// No ztunnel is connected to the agent.
    #[error("no ztunnel is connected to the ZDS socket")]
    NotConnected,
    /// ztunnel answered with an error.
    #[error("ztunnel refused: {0}")]
    Refused(String),
}

/// One received datagram.
pub(crate) struct Datagram {
    pub(crate) bytes: Vec<u8>,
    pub(crate) fds: Vec<OwnedFd>,
    pub(crate) truncated: bool,
}

pub(crate) async fn receive(socket: &UnixSeqpacket) -> Result<Option<Datagram>, ZdsError> {
    let mut buffer = [0u8; MAX_MESSAGE];
    let mut ancillary = [0u8; 128];
    let (info, reader) = socket
        .recv_with_ancillary(&mut buffer, &mut ancillary)
        .await?;
    let truncated = info.truncated() || reader.is_truncated();
    let mut fds = Vec::new();
    for message in reader.into_messages() {
        if let OwnedAncillaryMessage::FileDescriptors(received) = message {
            fds.extend(received);
        }
    }
    if info.bytes_read() == 0 && fds.is_empty() && !truncated {
        return Ok(None);
    }
    Ok(Some(Datagram {
        bytes: buffer[..info.bytes_read()].to_vec(),
        fds,
        truncated,
    }))
}

pub(crate) async fn send(
    socket: &UnixSeqpacket,
    message: &impl Message,
    fd: Option<BorrowedFd<'_>>,
) -> Result<(), ZdsError> {
    let bytes = message.encode_to_vec();
    if bytes.len() > MAX_MESSAGE {
        return Err(ZdsError::Protocol(format!(
            "message of {} bytes exceeds the {MAX_MESSAGE}-byte limit",
            bytes.len()
        )));
    }
    match fd {
        Some(fd) => {
            let mut space = [0u8; 64];
            let mut ancillary = AncillaryMessageWriter::new(&mut space);
            ancillary
                .add_fds([fd])
                .map_err(|e| ZdsError::Protocol(format!("cannot attach the namespace fd: {e}")))?;
            socket.send_with_ancillary(&bytes, &mut ancillary).await?;
        }
        None => {
            socket.send(&bytes).await?;
        }
    }
    Ok(())
}
