//! ztunnel's side of ZDS.

use std::os::fd::OwnedFd;
use std::path::Path;
use std::time::Duration;

use ambit_proto::zds::{
    Ack, Version, WorkloadInfo, WorkloadRequest, WorkloadResponse, ZdsHello, workload_request,
    workload_response,
};
use prost::Message;
use tokio_seqpacket::UnixSeqpacket;

use crate::{ZdsError, receive, send};

/// What the node agent asked for. Every event must be answered with [`ZdsClient::ack`].
#[derive(Debug)]
pub enum ZdsEvent {
    /// Serve this pod; `netns` is its network namespace.
    Add {
        /// Kubernetes pod uid.
        uid: String,
        /// Name, namespace and service account.
        info: WorkloadInfo,
        /// The pod's network namespace.
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
    /// A message that could not be understood; answer it with an error, the connection stays.
    Invalid {
        /// What was wrong, for the NACK and the log.
        reason: String,
    },
}

/// A connection to the node agent.
#[derive(Debug)]
pub struct ZdsClient {
    socket: UnixSeqpacket,
}

impl ZdsClient {
    /// Connects to `path` and says hello.
    pub async fn connect(path: &Path) -> Result<Self, ZdsError> {
        let socket = UnixSeqpacket::connect(path)
            .await
            .map_err(|source| ZdsError::Socket {
                path: path.display().to_string(),
                source,
            })?;
        send(
            &socket,
            &ZdsHello {
                version: Version::V1 as i32,
            },
            None,
        )
        .await?;
        Ok(Self { socket })
    }

    /// Connects, retrying with doubling delays from 10 ms up to `max_delay` until `deadline`.
    pub async fn connect_with_retry(
        path: &Path,
        max_delay: Duration,
        deadline: tokio::time::Instant,
    ) -> Result<Self, ZdsError> {
        let mut delay = Duration::from_millis(10);
        loop {
            match Self::connect(path).await {
                Ok(client) => return Ok(client),
                Err(e) if tokio::time::Instant::now() + delay >= deadline => return Err(e),
                Err(e) => {
                    tracing::debug!(error = %e, retry_in = ?delay, "ZDS connect failed");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(max_delay);
                }
            }
        }
    }

    /// The next request, or `None` when the agent closed the connection.
    pub async fn next_event(&mut self) -> Result<Option<ZdsEvent>, ZdsError> {
        let Some(datagram) = receive(&self.socket).await? else {
            return Ok(None);
        };
        if datagram.truncated {
            return Ok(Some(ZdsEvent::Invalid {
                reason: format!(
                    "message larger than {} bytes (or with too many file descriptors)",
                    crate::MAX_MESSAGE
                ),
            }));
        }
        let request = match WorkloadRequest::decode(datagram.bytes.as_slice()) {
            Ok(request) => request,
            Err(e) => {
                return Ok(Some(ZdsEvent::Invalid {
                    reason: format!("undecodable WorkloadRequest: {e}"),
                }));
            }
        };
        Ok(Some(classify(request, datagram.fds)))
    }

    /// Acknowledges the last event: `Ok` is an ACK, `Err(reason)` a NACK carrying the reason.
    pub async fn ack(&mut self, result: Result<(), String>) -> Result<(), ZdsError> {
        let error = result.err().unwrap_or_default();
        send(
            &self.socket,
            &WorkloadResponse {
                payload: Some(workload_response::Payload::Ack(Ack { error })),
            },
            None,
        )
        .await
    }
}

fn classify(request: WorkloadRequest, mut fds: Vec<OwnedFd>) -> ZdsEvent {
    let invalid = |reason: String| ZdsEvent::Invalid { reason };
    match request.payload {
        Some(workload_request::Payload::Add(add)) => {
            if add.uid.is_empty() {
                return invalid("AddWorkload without a uid".into());
            }
            let Some(info) = add.workload_info else {
                return invalid(format!("AddWorkload {} without workload_info", add.uid));
            };
            if fds.len() != 1 {
                return invalid(format!(
                    "AddWorkload {} carries {} file descriptors; exactly one network namespace is required",
                    add.uid,
                    fds.len()
                ));
            }
            let netns = fds.remove(0);
            ZdsEvent::Add {
                uid: add.uid,
                info,
                netns,
            }
        }
        _ if !fds.is_empty() => {
            invalid("file descriptor attached to a message other than AddWorkload".into())
        }
        Some(workload_request::Payload::Keep(keep)) if !keep.uid.is_empty() => {
            ZdsEvent::Keep { uid: keep.uid }
        }
        Some(workload_request::Payload::Del(del)) if !del.uid.is_empty() => {
            ZdsEvent::Del { uid: del.uid }
        }
        Some(workload_request::Payload::SnapshotSent(_)) => ZdsEvent::SnapshotSent,
        Some(workload_request::Payload::Keep(_)) => invalid("KeepWorkload without a uid".into()),
        Some(workload_request::Payload::Del(_)) => invalid("DelWorkload without a uid".into()),
        None => invalid("WorkloadRequest without a payload (unknown message type?)".into()),
    }
}
