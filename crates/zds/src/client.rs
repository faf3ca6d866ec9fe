//! ztunnel's side of ZDS: connect and say hello, then turn each datagram from the node agent into
//! a [`ZdsEvent`] and send back exactly one ack per event.
//!
//! A malformed datagram becomes [`ZdsEvent::Invalid`] rather than an error, so that one bad
//! message is NACKed while the connection, and every other pod, keeps working.

use std::os::fd::OwnedFd;
use std::path::Path;
use std::time::Duration;

use ambit_proto::zds::{
    Ack, Version, WorkloadInfo, WorkloadRequest, WorkloadResponse, ZdsHello, workload_request,
    workload_response,
};
use prost::Message;
use tokio::time::Instant;
use tokio_seqpacket::UnixSeqpacket;

use crate::wire::{self, Datagram};
use crate::{MAX_MESSAGE, ZdsError};

/// First delay of [`ZdsClient::connect_with_retry`] (upstream ztunnel: 10 ms, doubling).
const FIRST_RETRY_DELAY: Duration = Duration::from_millis(10);

/// Room left for the NACK text once the `WorkloadResponse`/`Ack` framing is counted.
const MAX_REASON: usize = MAX_MESSAGE - 16;

/// The reason sent when the caller asked for the next event without answering the previous one.
const UNANSWERED: &str = "ztunnel did not answer this request (bug in ztunnel's ZDS handling)";

/// What the node agent asked for. Every event must be answered with [`ZdsClient::ack`].
#[derive(Debug)]
pub enum ZdsEvent {
    /// Serve this pod; `netns` is its network namespace.
    Add {
        /// Kubernetes pod uid (`metadata.uid`), not the WDS workload uid.
        uid: String,
        /// Name, namespace and service account.
        info: WorkloadInfo,
        /// The pod's network namespace, received close-on-exec. Its type is not checked here:
        /// `setns(fd, CLONE_NEWNET)` refuses anything that is not a network namespace.
        netns: OwnedFd,
    },
    /// (Snapshot only) keep serving this pod, whose namespace the agent could not reopen.
    Keep {
        /// Kubernetes pod uid.
        uid: String,
    },
    /// The snapshot is complete: pods not named since connecting are gone.
    SnapshotSent,
    /// Stop serving this pod.
    Del {
        /// Kubernetes pod uid.
        uid: String,
    },
    /// A datagram that could not be understood (undecodable, unknown payload, missing uid or
    /// workload info, missing or extra fds, oversized). Answer it with `ack(Err(reason))`; the
    /// connection stays usable.
    Invalid {
        /// What was wrong, for the NACK and the log.
        reason: String,
    },
}

/// A connection to the node agent.
#[derive(Debug)]
pub struct ZdsClient {
    socket: UnixSeqpacket,
    /// An event was handed out and not yet acked: the agent is waiting.
    awaiting_ack: bool,
}

impl ZdsClient {
    /// Connects to `path` and says hello (`ZdsHello{version: V1}`).
    pub async fn connect(path: &Path) -> Result<Self, ZdsError> {
        let socket = UnixSeqpacket::connect(path)
            .await
            .map_err(|source| ZdsError::Connect {
                path: path.to_path_buf(),
                source,
            })?;
        let hello = wire::encode(
            &ZdsHello {
                version: Version::V1 as i32,
            },
            || "ZdsHello".into(),
        )?;
        wire::send(&socket, &hello, None, || "ZdsHello".into()).await?;
        Ok(Self {
            socket,
            awaiting_ack: false,
        })
    }

    /// Connects, retrying with delays doubling from 10 ms up to `max_delay`, until it works or
    /// `deadline` passes (the last attempt is made at the deadline; its error is returned).
    /// Drop the future to cancel.
    pub async fn connect_with_retry(
        path: &Path,
        max_delay: Duration,
        deadline: Instant,
    ) -> Result<Self, ZdsError> {
        let mut delay = FIRST_RETRY_DELAY.min(max_delay);
        loop {
            let error = match Self::connect(path).await {
                Ok(client) => return Ok(client),
                Err(error) => error,
            };
            let now = Instant::now();
            if now >= deadline {
                return Err(error);
            }
            tracing::debug!(%error, retry_in = ?delay, "ZDS connect failed");
            tokio::time::sleep(delay.min(deadline - now)).await;
            delay = (delay * 2).min(max_delay);
        }
    }

    /// The next request, or `None` when the agent closed the connection. `Err` means the
    /// connection is unusable (reconnect); a bad message is `Ok(Some(ZdsEvent::Invalid))`.
    ///
    /// If the previous event was never acked, it is NACKed first so that acks stay in order.
    /// Cancel-safe: dropping the future loses no request.
    pub async fn next_event(&mut self) -> Result<Option<ZdsEvent>, ZdsError> {
        if self.awaiting_ack {
            tracing::warn!("ZDS request left unanswered; NACKing it before reading the next");
            self.ack(Err(UNANSWERED.into())).await?;
        }
        let Some(datagram) = wire::receive(&self.socket, "the node agent's next request").await?
        else {
            return Ok(None);
        };
        self.awaiting_ack = true;
        Ok(Some(classify(datagram)))
    }

    /// Answers the last event: `Ok` is an ACK, `Err(reason)` a NACK carrying the reason (cut to
    /// fit in one datagram). Fails with [`ZdsError::NothingToAck`], sending nothing, if no event
    /// is waiting for an answer.
    pub async fn ack(&mut self, result: Result<(), String>) -> Result<(), ZdsError> {
        if !self.awaiting_ack {
            return Err(ZdsError::NothingToAck);
        }
        // Cleared first: after a failed send the connection is unusable anyway.
        self.awaiting_ack = false;
        let mut error = result.err().unwrap_or_default();
        truncate_at_char(&mut error, MAX_REASON);
        let response = WorkloadResponse {
            payload: Some(workload_response::Payload::Ack(Ack { error })),
        };
        let bytes = wire::encode(&response, || "the ack".into())?;
        wire::send(&self.socket, &bytes, None, || "the ack".into()).await
    }
}

/// Shortens `text` to at most `max` bytes without splitting a character.
fn truncate_at_char(text: &mut String, max: usize) {
    if text.len() > max {
        let cut = (0..=max)
            .rev()
            .find(|&i| text.is_char_boundary(i))
            .unwrap_or(0);
        text.truncate(cut);
    }
}

fn classify(datagram: Datagram) -> ZdsEvent {
    let invalid = |reason: String| ZdsEvent::Invalid { reason };
    if datagram.bytes_truncated {
        return invalid(format!(
            "ZDS message larger than {MAX_MESSAGE} bytes; the node agent sent an oversized request"
        ));
    }
    if datagram.fds_truncated {
        return invalid(
            "ZDS message carried more file descriptors than fit (exactly one network namespace \
             is expected, on AddWorkload only)"
                .into(),
        );
    }
    let request = match WorkloadRequest::decode(datagram.bytes.as_slice()) {
        Ok(request) => request,
        Err(e) => return invalid(format!("undecodable WorkloadRequest: {e}")),
    };
    classify_request(request, datagram.fds)
}

fn classify_request(request: WorkloadRequest, mut fds: Vec<OwnedFd>) -> ZdsEvent {
    use workload_request::Payload;
    let invalid = |reason: String| ZdsEvent::Invalid { reason };
    match request.payload {
        Some(Payload::Add(add)) => {
            if add.uid.is_empty() {
                return invalid("AddWorkload without a uid; the pod cannot be identified".into());
            }
            let Some(info) = add.workload_info else {
                return invalid(format!("AddWorkload {} without workload_info", add.uid));
            };
            if fds.len() != 1 {
                return invalid(format!(
                    "AddWorkload {} carries {} file descriptors; exactly one network namespace \
                     is required",
                    add.uid,
                    fds.len()
                ));
            }
            ZdsEvent::Add {
                uid: add.uid,
                info,
                netns: fds.remove(0),
            }
        }
        _ if !fds.is_empty() => invalid(format!(
            "{} carries a file descriptor; only AddWorkload may",
            payload_name(request.payload.as_ref())
        )),
        Some(Payload::Keep(keep)) if !keep.uid.is_empty() => ZdsEvent::Keep { uid: keep.uid },
        Some(Payload::Del(del)) if !del.uid.is_empty() => ZdsEvent::Del { uid: del.uid },
        Some(Payload::SnapshotSent(_)) => ZdsEvent::SnapshotSent,
        Some(Payload::Keep(_)) => invalid("KeepWorkload without a uid".into()),
        Some(Payload::Del(_)) => invalid("DelWorkload without a uid".into()),
        None => invalid(
            "WorkloadRequest without a payload (a message type this ztunnel does not know?)".into(),
        ),
    }
}

fn payload_name(payload: Option<&workload_request::Payload>) -> &'static str {
    match payload {
        Some(workload_request::Payload::Add(_)) => "AddWorkload",
        Some(workload_request::Payload::Keep(_)) => "KeepWorkload",
        Some(workload_request::Payload::Del(_)) => "DelWorkload",
        Some(workload_request::Payload::SnapshotSent(_)) => "SnapshotSent",
        None => "a WorkloadRequest without a known payload",
    }
}
