//! The node agent's side of ZDS: one active ztunnel connection (a newer one replaces it once its
//! snapshot is delivered), a snapshot replayed on every connect, then one request at a time,
//! each waiting for its ack. Without a connected ztunnel, requests fail at once with
//! [`ZdsError::NotConnected`]: the next snapshot carries the agent's state anyway.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use ambit_proto::zds::{
    AddWorkload, DelWorkload, KeepWorkload, SnapshotSent, Version, WorkloadInfo, WorkloadRequest,
    WorkloadResponse, ZdsHello, workload_request, workload_response,
};
use nix::errno::Errno;
use nix::sys::socket::MsgFlags;
use prost::Message;
use tokio::sync::Mutex;
use tokio_seqpacket::{UnixSeqpacket, UnixSeqpacketListener};

use crate::wire::{self, Datagram};
use crate::{REPLY_TIMEOUT, ZdsError};

/// Pause after a failed `accept` (e.g. out of fds) so that the loop cannot spin.
const ACCEPT_RETRY_DELAY: Duration = Duration::from_millis(200);

/// One pod in the agent's snapshot.
#[derive(Debug, Clone)]
pub struct SnapshotEntry {
    /// Kubernetes pod uid (`metadata.uid`).
    pub uid: String,
    /// Name, namespace, service account.
    pub info: WorkloadInfo,
    /// Its network namespace, sent as `AddWorkload` + fd. `None` sends `KeepWorkload`: the
    /// agent could not reopen the namespace and asks ztunnel to keep what it already runs.
    pub netns: Option<Arc<OwnedFd>>,
}

/// Where the server gets the pods to replay when ztunnel (re)connects. Any
/// `Fn() -> Vec<SnapshotEntry>` closure is one.
pub trait SnapshotSource: Send + Sync + 'static {
    /// The pods ztunnel should serve right now. Called once per new connection, after the
    /// hello, while live `add`/`del` calls wait, so nothing slips between snapshot and stream.
    fn snapshot(&self) -> Vec<SnapshotEntry>;

    /// ztunnel NACKed a pod of the snapshot, or the pod's message could not be built
    /// ([`ZdsError::Refused`] or [`ZdsError::TooLarge`]). The snapshot goes on with the next
    /// pod. Called with the connection lock held: do not call back into the server.
    fn refused(&self, uid: &str, error: &ZdsError) {
        let _ = (uid, error);
    }
}

impl<F> SnapshotSource for F
where
    F: Fn() -> Vec<SnapshotEntry> + Send + Sync + 'static,
{
    fn snapshot(&self) -> Vec<SnapshotEntry> {
        self()
    }
}

/// The agent's ZDS endpoint. Cheap to clone; clones share the connection.
#[derive(Clone)]
pub struct ZdsServer {
    path: PathBuf,
    current: Arc<Mutex<Option<UnixSeqpacket>>>,
    snapshot: Arc<dyn SnapshotSource>,
    reply_timeout: Duration,
}

impl std::fmt::Debug for ZdsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZdsServer")
            .field("path", &self.path)
            .field("reply_timeout", &self.reply_timeout)
            .finish_non_exhaustive()
    }
}

impl ZdsServer {
    /// Binds `path` and returns the server plus its listener for [`ZdsServer::serve`].
    ///
    /// Parent directories are created. The socket is bound under a temporary name, made
    /// owner-only (0600) and then renamed over `path`, so it is never reachable with looser
    /// permissions and a stale socket from an earlier agent is replaced atomically. Anything at
    /// `path` that is not a socket is left alone ([`ZdsError::NotASocket`]).
    pub fn bind(
        path: &Path,
        snapshot: Arc<dyn SnapshotSource>,
    ) -> Result<(Self, UnixSeqpacketListener), ZdsError> {
        let listener = bind_owner_only(path)?;
        let server = Self {
            path: path.to_path_buf(),
            current: Arc::new(Mutex::new(None)),
            snapshot,
            reply_timeout: REPLY_TIMEOUT,
        };
        Ok((server, listener))
    }

    /// Sets how long to wait for each ack (and for the hello); default [`REPLY_TIMEOUT`]. Call
    /// before cloning.
    pub fn with_reply_timeout(mut self, timeout: Duration) -> Self {
        self.reply_timeout = timeout;
        self
    }

    /// The socket path ztunnel connects to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Accepts ztunnel connections until the task is dropped. Each new connection gets the
    /// hello check and the snapshot, and then replaces (closes) the previous one. A connection
    /// whose handshake fails is closed and the previous one stays.
    pub async fn serve(&self, mut listener: UnixSeqpacketListener) {
        loop {
            match listener.accept().await {
                Ok(socket) => self.attach(socket).await,
                Err(error) => {
                    tracing::warn!(path = %self.path.display(), %error, "ZDS accept failed");
                    tokio::time::sleep(ACCEPT_RETRY_DELAY).await;
                }
            }
        }
    }

    /// Tells ztunnel to serve a pod. Fails with [`ZdsError::NotConnected`] when no ztunnel is
    /// attached (it gets the pod in the next snapshot), [`ZdsError::Refused`] with ztunnel's
    /// reason, or [`ZdsError::Timeout`] when ztunnel did not answer (the connection is then
    /// dropped).
    pub async fn add(
        &self,
        uid: &str,
        info: WorkloadInfo,
        netns: BorrowedFd<'_>,
    ) -> Result<(), ZdsError> {
        let payload = workload_request::Payload::Add(AddWorkload {
            uid: uid.to_string(),
            workload_info: Some(info),
        });
        self.request_current(payload, Some(netns)).await
    }

    /// Tells ztunnel a pod is gone. Errors as for [`ZdsServer::add`].
    pub async fn del(&self, uid: &str) -> Result<(), ZdsError> {
        let payload = workload_request::Payload::Del(DelWorkload {
            uid: uid.to_string(),
        });
        self.request_current(payload, None).await
    }

    /// True while a ztunnel is attached and has not hung up. Waits while a request or a new
    /// connection's snapshot is in flight.
    pub async fn connected(&self) -> bool {
        let mut current = self.current.lock().await;
        let alive = current.as_ref().is_some_and(peer_alive);
        if !alive {
            *current = None;
        }
        alive
    }

    async fn attach(&self, socket: UnixSeqpacket) {
        // The hello is awaited without the lock: a slow newcomer must not hold up requests to
        // the ztunnel already attached.
        if let Err(error) = self.receive_hello(&socket).await {
            tracing::warn!(%error, "ZDS connection from ztunnel closed before its snapshot");
            return;
        }
        let mut current = self.current.lock().await;
        match self.deliver_snapshot(&socket).await {
            Ok(pods) => {
                tracing::info!(pods, "ztunnel connected over ZDS; snapshot delivered");
                *current = Some(socket);
            }
            Err(error) => tracing::warn!(%error, "delivering the ZDS snapshot to ztunnel failed"),
        }
    }

    async fn receive_hello(&self, socket: &UnixSeqpacket) -> Result<(), ZdsError> {
        let expected = "ztunnel's ZdsHello";
        let datagram = tokio::time::timeout(self.reply_timeout, wire::receive(socket, expected))
            .await
            .map_err(|_| ZdsError::Timeout {
                expected,
                after: self.reply_timeout,
            })??
            .ok_or(ZdsError::Closed)?;
        let bytes = checked_bytes(&datagram, "ZdsHello")?;
        let hello = ZdsHello::decode(bytes)
            .map_err(|e| ZdsError::Protocol(format!("undecodable ZdsHello from ztunnel: {e}")))?;
        if hello.version != Version::V1 as i32 {
            tracing::warn!(
                version = hello.version,
                "ztunnel announced an unknown ZDS version; continuing with V1"
            );
        }
        Ok(())
    }

    /// Sends every pod then `SnapshotSent`; returns the number of pods ztunnel accepted.
    async fn deliver_snapshot(&self, socket: &UnixSeqpacket) -> Result<usize, ZdsError> {
        let pods = self.snapshot.snapshot();
        let mut accepted = 0;
        for pod in &pods {
            let (payload, fd) = snapshot_request(pod);
            match self.request(socket, payload, fd).await {
                Ok(()) => accepted += 1,
                Err(error @ (ZdsError::Refused(_) | ZdsError::TooLarge { .. })) => {
                    tracing::warn!(uid = %pod.uid, %error, "pod of the ZDS snapshot not taken");
                    self.snapshot.refused(&pod.uid, &error);
                }
                Err(other) => return Err(other),
            }
        }
        let done = workload_request::Payload::SnapshotSent(SnapshotSent {});
        self.request(socket, done, None).await?;
        Ok(accepted)
    }

    async fn request_current(
        &self,
        payload: workload_request::Payload,
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<(), ZdsError> {
        let mut current = self.current.lock().await;
        let Some(socket) = current.as_ref() else {
            return Err(ZdsError::NotConnected);
        };
        if !peer_alive(socket) {
            *current = None;
            return Err(ZdsError::NotConnected);
        }
        let result = self.request(socket, payload, fd).await;
        match result {
            Ok(()) | Err(ZdsError::Refused(_) | ZdsError::TooLarge { .. }) => result,
            Err(error) => {
                tracing::warn!(%error, "ZDS connection to ztunnel lost");
                *current = None;
                match error {
                    ZdsError::Send { .. } | ZdsError::Receive { .. } | ZdsError::Closed => {
                        Err(ZdsError::NotConnected)
                    }
                    other => Err(other),
                }
            }
        }
    }

    /// Sends one request and waits for its ack.
    async fn request(
        &self,
        socket: &UnixSeqpacket,
        payload: workload_request::Payload,
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<(), ZdsError> {
        let what = describe(&payload);
        let request = WorkloadRequest {
            payload: Some(payload),
        };
        let bytes = wire::encode(&request, || what.clone())?;
        let after = self.reply_timeout;
        tokio::time::timeout(after, wire::send(socket, &bytes, fd, || what.clone()))
            .await
            .map_err(|_| ZdsError::Timeout {
                expected: "room in its receive queue",
                after,
            })??;
        let expected = "ztunnel's ack";
        let reply = tokio::time::timeout(after, wire::receive(socket, expected))
            .await
            .map_err(|_| ZdsError::Timeout { expected, after })??
            .ok_or(ZdsError::Closed)?;
        parse_ack(&reply)
    }
}

fn snapshot_request(pod: &SnapshotEntry) -> (workload_request::Payload, Option<BorrowedFd<'_>>) {
    match &pod.netns {
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
    }
}

fn describe(payload: &workload_request::Payload) -> String {
    match payload {
        workload_request::Payload::Add(add) => format!("AddWorkload for pod {}", add.uid),
        workload_request::Payload::Keep(keep) => format!("KeepWorkload for pod {}", keep.uid),
        workload_request::Payload::Del(del) => format!("DelWorkload for pod {}", del.uid),
        workload_request::Payload::SnapshotSent(_) => "SnapshotSent".into(),
    }
}

/// The payload of a datagram from ztunnel, which never attaches fds nor exceeds the limit.
fn checked_bytes<'d>(datagram: &'d Datagram, what: &str) -> Result<&'d [u8], ZdsError> {
    if datagram.bytes_truncated || datagram.fds_truncated {
        return Err(ZdsError::Protocol(format!(
            "ztunnel's {what} exceeds the {}-byte datagram limit",
            crate::MAX_MESSAGE
        )));
    }
    if !datagram.fds.is_empty() {
        return Err(ZdsError::Protocol(format!(
            "ztunnel attached {} file descriptor(s) to its {what}",
            datagram.fds.len()
        )));
    }
    Ok(&datagram.bytes)
}

fn parse_ack(reply: &Datagram) -> Result<(), ZdsError> {
    let bytes = checked_bytes(reply, "ack")?;
    let response = WorkloadResponse::decode(bytes).map_err(|e| {
        ZdsError::Protocol(format!("undecodable WorkloadResponse from ztunnel: {e}"))
    })?;
    match response.payload {
        Some(workload_response::Payload::Ack(ack)) if ack.error.is_empty() => Ok(()),
        Some(workload_response::Payload::Ack(ack)) => Err(ZdsError::Refused(ack.error)),
        None => Err(ZdsError::Protocol(
            "WorkloadResponse from ztunnel without an ack (a message type this agent does not \
             know?)"
                .into(),
        )),
    }
}

/// Whether the idle peer is still there. Between requests ztunnel sends nothing, so a readable
/// socket means it hung up (or sent something unsolicited, which breaks ack ordering); either
/// way the connection is unusable. Asks the kernel directly rather than tokio's cached
/// readiness, which may not have seen the hang-up yet.
fn peer_alive(socket: &UnixSeqpacket) -> bool {
    let mut probe = [0u8; 1];
    let flags = MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT;
    match nix::sys::socket::recv(socket.as_raw_fd(), &mut probe, flags) {
        Err(Errno::EAGAIN | Errno::EINTR) => true,
        Ok(0) => false,
        Ok(_) => {
            tracing::warn!("ztunnel sent an unsolicited ZDS message; dropping the connection");
            false
        }
        Err(error) => {
            tracing::warn!(%error, "ZDS connection to ztunnel failed");
            false
        }
    }
}

/// Binds a listener at `path` that is owner-only from the first moment it is reachable.
fn bind_owner_only(path: &Path) -> Result<UnixSeqpacketListener, ZdsError> {
    static NEXT_TEMPORARY: AtomicU64 = AtomicU64::new(0);
    let error = |source| ZdsError::Bind {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {}
        Ok(_) => {
            return Err(ZdsError::NotASocket {
                path: path.to_path_buf(),
            });
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(error(e)),
    }
    let parent = path.parent().unwrap_or(Path::new(""));
    std::fs::create_dir_all(parent).map_err(error)?;
    let serial = NEXT_TEMPORARY.fetch_add(1, Ordering::Relaxed);
    let temporary = parent.join(format!(".zds-{}-{serial}", std::process::id()));
    remove_if_present(&temporary).map_err(error)?;
    let bound = UnixSeqpacketListener::bind(&temporary).and_then(|listener| {
        std::fs::set_permissions(&temporary, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&temporary, path)?;
        Ok(listener)
    });
    if bound.is_err() {
        let _ = remove_if_present(&temporary);
    }
    bound.map_err(error)
}

fn remove_if_present(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}
