//! Datagram framing shared by both ends: encoding under the size limit, sending with an optional
//! namespace fd, receiving with the fds and truncation flags the kernel reported.

use std::os::fd::{BorrowedFd, OwnedFd};

use prost::Message;
use tokio_seqpacket::UnixSeqpacket;
use tokio_seqpacket::ancillary::{AncillaryMessageWriter, OwnedAncillaryMessage};

use crate::{MAX_MESSAGE, ZdsError};

/// Room for the control messages of one datagram: one `SCM_RIGHTS` with a few dozen fds. More
/// than that is reported as truncated (the kernel closes the fds that did not fit).
const ANCILLARY_SPACE: usize = 128;

/// One received datagram.
#[derive(Debug)]
pub(crate) struct Datagram {
    pub(crate) bytes: Vec<u8>,
    pub(crate) fds: Vec<OwnedFd>,
    /// The payload was longer than [`MAX_MESSAGE`]; its tail is lost.
    pub(crate) bytes_truncated: bool,
    /// Control data did not fit; the kernel dropped some of the fds.
    pub(crate) fds_truncated: bool,
}

/// Encodes `message`, refusing anything that would not fit in one datagram. `describe` names
/// the message in the error.
pub(crate) fn encode(
    message: &impl Message,
    describe: impl FnOnce() -> String,
) -> Result<Vec<u8>, ZdsError> {
    let bytes = message.encode_to_vec();
    if bytes.len() > MAX_MESSAGE {
        return Err(ZdsError::TooLarge {
            message: describe(),
            size: bytes.len(),
        });
    }
    Ok(bytes)
}

/// Receives one datagram; `None` means the peer closed the connection (on `SOCK_SEQPACKET` an
/// empty datagram reads the same as end-of-stream, and neither side ever sends one).
pub(crate) async fn receive(
    socket: &UnixSeqpacket,
    expected: &'static str,
) -> Result<Option<Datagram>, ZdsError> {
    let mut buffer = [0u8; MAX_MESSAGE];
    let mut ancillary = [0u8; ANCILLARY_SPACE];
    let (info, reader) = socket
        .recv_with_ancillary(&mut buffer, &mut ancillary)
        .await
        .map_err(|source| ZdsError::Receive { expected, source })?;
    let fds_truncated = info.ancillary_truncated() || reader.is_truncated();
    let mut fds = Vec::new();
    for message in reader.into_messages() {
        if let OwnedAncillaryMessage::FileDescriptors(received) = message {
            fds.extend(received);
        }
    }
    let bytes_read = info.bytes_read().min(MAX_MESSAGE);
    if bytes_read == 0 && fds.is_empty() && !info.truncated() && !fds_truncated {
        return Ok(None);
    }
    Ok(Some(Datagram {
        bytes: buffer[..bytes_read].to_vec(),
        fds,
        bytes_truncated: info.truncated(),
        fds_truncated,
    }))
}

/// Sends one datagram, with `fd` attached as `SCM_RIGHTS` when given. `describe` names the
/// message in errors.
pub(crate) async fn send(
    socket: &UnixSeqpacket,
    bytes: &[u8],
    fd: Option<BorrowedFd<'_>>,
    describe: impl Fn() -> String,
) -> Result<(), ZdsError> {
    let sent = match fd {
        Some(fd) => {
            // One fd takes CMSG_SPACE(4) = 24 bytes on 64-bit Linux.
            let mut space = [0u8; 64];
            let mut ancillary = AncillaryMessageWriter::new(&mut space);
            ancillary.add_fds([fd]).map_err(|e| {
                ZdsError::Protocol(format!(
                    "cannot attach the network namespace fd to {}: {e}",
                    describe()
                ))
            })?;
            socket.send_with_ancillary(bytes, &mut ancillary).await
        }
        None => socket.send(bytes).await,
    };
    sent.map(drop).map_err(|source| ZdsError::Send {
        message: describe(),
        source,
    })
}
