//! The node agent's side of ZDS: one active ztunnel connection (a newer one replaces it), a
//! snapshot replayed on every connect, then one request at a time, each waiting for its ack.

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ambit_proto::zds::{
    AddWorkload, DelWorkload, KeepWorkload, SnapshotSent, Version, WorkloadInfo, WorkloadRequest,
    WorkloadResponse, ZdsHello, workload_request, workload_response,
};
use prost::Message;
use tokio::sync::Mutex;
use tokio_seqpacket::{UnixSeqpacket, UnixSeqpacketListener};

use crate::{REPLY_TIMEOUT, ZdsError, receive, send};

/// One pod in the agent's snapshot.
#[derive(Debug, Clone)]
pub struct SnapshotEntry {
    /// Kubernetes pod uid.
    pub uid: String,
    /// Name, namespace, service account.
    pub info: WorkloadInfo,
    /// Its network namespace; `None` sends `Keep` (the agent could not reopen it).
    pub netns: Option<Arc<OwnedFd>>,
}

/// Where the server gets the pods to replay when ztunnel (re)connects.
pub trait SnapshotSource: Send + Sync + 'static {
    /// The pods ztunnel should serve right now.
    fn snapshot(&self) -> Vec<SnapshotEntry>;
}

impl<F> SnapshotSource for F
where
    F: Fn() -> Vec<SnapshotEntry> + Send + Sync + 'static,
{
    fn snapshot(&self) -> Vec<SnapshotEntry> {
        self()
    }
}

/// The agent's ZDS endpoint. Cheap to clone.
#[derive(Clone)]
pub struct ZdsServer {
    path: PathBuf,
    current: Arc<Mutex<Option<UnixSeqpacket>>>,
    snapshot: Arc<dyn SnapshotSource>,
}

impl std::fmt::Debug for ZdsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZdsServer")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl ZdsServer {
    /// Binds `path` (replacing a stale socket, creating parent directories, owner-only access)
    /// and returns the server plus its listener for [`ZdsServer::serve`].
    pub fn bind(
        path: &Path,
        snapshot: Arc<dyn SnapshotSource>,
    ) -> Result<(Self, UnixSeqpacketListener), ZdsError> {
        let socket_error = |source| ZdsError::Socket {
            path: path.display().to_string(),
            source,
        };
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(socket_error)?;
        }
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(socket_error(e)),
        }
        let listener = UnixSeqpacketListener::bind(path).map_err(socket_error)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(socket_error)?;
        Ok((
            Self {
                path: path.to_path_buf(),
                current: Arc::new(Mutex::new(None)),
                snapshot,
            },
            listener,
        ))
    }

    /// Accepts ztunnel connections until the listener fails or the task is dropped. Each new
    /// connection gets the snapshot and then replaces the previous one.
    pub async fn serve(&self, mut listener: UnixSeqpacketListener) {
        loop {
            let socket = match listener.accept().await {
                Ok(socket) => socket,
                Err(e) => {
                    tracing::warn!(path = %self.path.display(), error = %e, "ZDS accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                    continue;
                }
            };
            // Holding the lock keeps add/del from interleaving with the snapshot.
            let mut current = self.current.lock().await;
            match self.handshake(&socket).await {
                Ok(pods) => {
                    tracing::info!(pods, "ztunnel connected over ZDS; snapshot delivered");
                    *current = Some(socket);
                }
                Err(e) => tracing::warn!(error = %e, "ZDS handshake with ztunnel failed"),
            }
        }
    }

    async fn handshake(&self, socket: &UnixSeqpacket) -> Result<usize, ZdsError> {
        let hello = tokio::time::timeout(REPLY_TIMEOUT, receive(socket))
            .await
            .map_err(|_| ZdsError::Timeout(REPLY_TIMEOUT))??
            .ok_or(ZdsError::Closed)?;
        let hello = ZdsHello::decode(hello.bytes.as_slice())
            .map_err(|e| ZdsError::Protocol(format!("undecodable hello: {e}")))?;
        if hello.version != Version::V1 as i32 {
            tracing::warn!(
                version = hello.version,
                "ztunnel announced an unknown ZDS version; continuing with V1"
            );
        }
        let pods = self.snapshot.snapshot();
        for pod in &pods {
            let (payload, fd) = match &pod.netns {
                Some(netns) => (
                    workload_request::Payload::Add(AddWorkload {
                        uid: pod.uid.clone(),
                        workload_info: Some(pod.info.clone()),
                    }),
                    Some(netns.as_fd()),
                ),
                None => (
                    workload_request::Payload::Keep(KeepWorkload {
                        uid: pod.uid.clone(),
                    }),
                    None,
                ),
            };
            if let Err(e) = request(socket, payload, fd).await {
                match e {
                    ZdsError::Refused(reason) => {
                        tracing::warn!(uid = %pod.uid, %reason, "ztunnel refused a pod in the snapshot")
                    }
                    other => return Err(other),
                }
            }
        }
        request(
            socket,
            workload_request::Payload::SnapshotSent(SnapshotSent {}),
            None,
        )
        .await?;
        Ok(pods.len())
    }

    /// Tells ztunnel to serve a pod. Fails with `NotConnected` when no ztunnel is attached (it
    /// gets the pod in the next snapshot), or with ztunnel's reason.
    pub async fn add(
        &self,
        uid: &str,
        info: WorkloadInfo,
        netns: std::os::fd::BorrowedFd<'_>,
    ) -> Result<(), ZdsError> {
        self.send_current(
            workload_request::Payload::Add(AddWorkload {
                uid: uid.to_string(),
                workload_info: Some(info),
            }),
            Some(netns),
        )
        .await
    }

    /// Tells ztunnel a pod is gone.
    pub async fn del(&self, uid: &str) -> Result<(), ZdsError> {
        self.send_current(
            workload_request::Payload::Del(DelWorkload {
                uid: uid.to_string(),
            }),
            None,
        )
        .await
    }

    /// True while a ztunnel is attached (a closed peer is noticed here).
    pub async fn connected(&self) -> bool {
        let mut current = self.current.lock().await;
        let Some(socket) = current.as_ref() else {
            return false;
        };
        let mut probe = [0u8; 1];
        // Between requests ztunnel sends nothing: readable means EOF (or garbage), either way gone.
        match tokio::time::timeout(std::time::Duration::ZERO, socket.peek(&mut probe)).await {
            Err(_) => true,
            Ok(_) => {
                *current = None;
                false
            }
        }
    }

    async fn send_current(
        &self,
        payload: workload_request::Payload,
        fd: Option<std::os::fd::BorrowedFd<'_>>,
    ) -> Result<(), ZdsError> {
        let mut current = self.current.lock().await;
        let Some(socket) = current.as_ref() else {
            return Err(ZdsError::NotConnected);
        };
        match request(socket, payload, fd).await {
            Err(
                e @ (ZdsError::Io(_)
                | ZdsError::Closed
                | ZdsError::Timeout(_)
                | ZdsError::Protocol(_)),
            ) => {
                tracing::warn!(error = %e, "ZDS connection to ztunnel lost");
                *current = None;
                Err(match e {
                    ZdsError::Io(_) | ZdsError::Closed => ZdsError::NotConnected,
                    other => other,
                })
            }
            other => other,
        }
    }
}

/// Sends one request and waits for its ack.
async fn request(
    socket: &UnixSeqpacket,
    payload: workload_request::Payload,
    fd: Option<std::os::fd::BorrowedFd<'_>>,
) -> Result<(), ZdsError> {
    let message = WorkloadRequest {
        payload: Some(payload),
    };
    tokio::time::timeout(REPLY_TIMEOUT, send(socket, &message, fd))
        .await
        .map_err(|_| ZdsError::Timeout(REPLY_TIMEOUT))??;
    let reply = tokio::time::timeout(REPLY_TIMEOUT, receive(socket))
        .await
        .map_err(|_| ZdsError::Timeout(REPLY_TIMEOUT))??
        .ok_or(ZdsError::Closed)?;
    let response = WorkloadResponse::decode(reply.bytes.as_slice())
        .map_err(|e| ZdsError::Protocol(format!("undecodable WorkloadResponse: {e}")))?;
    match response.payload {
        Some(workload_response::Payload::Ack(ack)) if ack.error.is_empty() => Ok(()),
        Some(workload_response::Payload::Ack(ack)) => Err(ZdsError::Refused(ack.error)),
        None => Err(ZdsError::Protocol("WorkloadResponse without an ack".into())),
    }
}
