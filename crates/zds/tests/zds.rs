//! ZDS end to end over real SOCK_SEQPACKET sockets in a temp dir, with real network namespace
//! fds (this process's and one made with `unshare(CLONE_NEWNET)`, which needs root): hello,
//! snapshot, live add/del with acks, malformed datagrams NACKed without dropping the connection,
//! reconnects replaying the snapshot, NACKs and timeouts surfacing in the agent's results.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ambit_proto::zds::{
    AddWorkload, DelWorkload, WorkloadInfo, WorkloadRequest, WorkloadResponse, ZdsHello,
    workload_request, workload_response,
};
use ambit_zds::ZdsError;
use ambit_zds::client::{ZdsClient, ZdsEvent};
use ambit_zds::server::{SnapshotEntry, SnapshotSource, ZdsServer};
use nix::sched::CloneFlags;
use nix::sys::stat::fstat;
use prost::Message;
use tokio::time::timeout;
use tokio_seqpacket::ancillary::AncillaryMessageWriter;
use tokio_seqpacket::{UnixSeqpacket, UnixSeqpacketListener};

/// Bound on every single wait; never reached when things work.
const WAIT: Duration = Duration::from_secs(10);

fn info(name: &str) -> WorkloadInfo {
    WorkloadInfo {
        name: name.into(),
        namespace: "demo".into(),
        service_account: "default".into(),
    }
}

/// This process's network namespace.
fn own_netns() -> OwnedFd {
    std::fs::File::open("/proc/self/ns/net").unwrap().into()
}

/// A fresh network namespace, kept alive by the returned fd only.
fn new_netns() -> OwnedFd {
    std::thread::spawn(|| {
        nix::sched::unshare(CloneFlags::CLONE_NEWNET).expect(
            "unshare(CLONE_NEWNET) failed: the ZDS tests need root (CAP_SYS_ADMIN) to create a \
             second network namespace",
        );
        OwnedFd::from(std::fs::File::open("/proc/thread-self/ns/net").unwrap())
    })
    .join()
    .unwrap()
}

fn same_file(a: &OwnedFd, b: &OwnedFd) -> bool {
    let (a, b) = (fstat(a.as_fd()).unwrap(), fstat(b.as_fd()).unwrap());
    a.st_ino == b.st_ino && a.st_dev == b.st_dev
}

type Pods = Arc<Mutex<Vec<SnapshotEntry>>>;

fn pod(uid: &str, netns: Option<&Arc<OwnedFd>>) -> SnapshotEntry {
    SnapshotEntry {
        uid: uid.into(),
        info: info(uid),
        netns: netns.cloned(),
    }
}

fn start_server(path: &Path, source: Arc<dyn SnapshotSource>) -> ZdsServer {
    let (server, listener) = ZdsServer::bind(path, source).unwrap();
    let serving = server.clone();
    tokio::spawn(async move { serving.serve(listener).await });
    server
}

fn start_with_pods(dir: &tempfile::TempDir, pods: &Pods) -> (ZdsServer, PathBuf) {
    let path = dir.path().join("run/ztunnel/ztunnel.sock");
    let pods = pods.clone();
    let source = move || pods.lock().unwrap().clone();
    (start_server(&path, Arc::new(source)), path)
}

async fn next(client: &mut ZdsClient) -> ZdsEvent {
    timeout(WAIT, client.next_event())
        .await
        .expect("no ZDS event within 10s")
        .expect("receiving failed")
        .expect("the agent closed the connection")
}

async fn expect_add(client: &mut ZdsClient, want_uid: &str) -> OwnedFd {
    match next(client).await {
        ZdsEvent::Add { uid, info, netns } => {
            assert_eq!(uid, want_uid);
            assert_eq!(info.name, want_uid, "workload info travels with the uid");
            assert_eq!(info.namespace, "demo");
            netns
        }
        other => panic!("expected Add {want_uid}, got {other:?}"),
    }
}

async fn expect_snapshot_sent(client: &mut ZdsClient) {
    let event = next(client).await;
    assert!(matches!(event, ZdsEvent::SnapshotSent), "got {event:?}");
    client.ack(Ok(())).await.unwrap();
}

async fn wait_until(server: &ZdsServer, connected: bool) {
    for _ in 0..1000 {
        if server.connected().await == connected {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("server.connected() never became {connected}");
}

#[tokio::test]
async fn handshake_snapshot_then_live_add_and_del_carry_the_right_namespaces() {
    let dir = tempfile::tempdir().unwrap();
    let (ns_own, ns_new) = (Arc::new(own_netns()), Arc::new(new_netns()));
    assert!(
        !same_file(&ns_own, &ns_new),
        "the test needs two namespaces"
    );
    let pods: Pods = Arc::new(Mutex::new(vec![
        pod("uid-a", Some(&ns_own)),
        pod("uid-b", Some(&ns_new)),
        pod("uid-k", None),
    ]));
    let (server, path) = start_with_pods(&dir, &pods);
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the socket is owner-only");
    let files: Vec<_> = std::fs::read_dir(path.parent().unwrap()).unwrap().collect();
    assert_eq!(files.len(), 1, "no temporary socket left behind: {files:?}");

    let mut client = ZdsClient::connect(&path).await.unwrap();
    let got_a = expect_add(&mut client, "uid-a").await;
    client.ack(Ok(())).await.unwrap();
    let got_b = expect_add(&mut client, "uid-b").await;
    client.ack(Ok(())).await.unwrap();
    assert!(
        same_file(&got_a, &ns_own),
        "uid-a arrives with its namespace"
    );
    assert!(
        same_file(&got_b, &ns_new),
        "uid-b arrives with its namespace"
    );
    let event = next(&mut client).await;
    assert!(
        matches!(&event, ZdsEvent::Keep { uid } if uid == "uid-k"),
        "got {event:?}"
    );
    client.ack(Ok(())).await.unwrap();
    expect_snapshot_sent(&mut client).await;
    wait_until(&server, true).await;

    let live_ns = new_netns();
    let add = {
        let (server, fd) = (
            server.clone(),
            live_ns.as_fd().try_clone_to_owned().unwrap(),
        );
        tokio::spawn(async move { server.add("uid-c", info("uid-c"), fd.as_fd()).await })
    };
    let got_c = expect_add(&mut client, "uid-c").await;
    assert!(
        same_file(&got_c, &live_ns),
        "the live Add carries the namespace sent"
    );
    assert_ne!(
        got_c.as_raw_fd(),
        live_ns.as_raw_fd(),
        "a new fd, not a shared number"
    );
    client.ack(Ok(())).await.unwrap();
    timeout(WAIT, add).await.unwrap().unwrap().unwrap();

    let del = {
        let server = server.clone();
        tokio::spawn(async move { server.del("uid-a").await })
    };
    let event = next(&mut client).await;
    assert!(
        matches!(&event, ZdsEvent::Del { uid } if uid == "uid-a"),
        "got {event:?}"
    );
    client.ack(Ok(())).await.unwrap();
    timeout(WAIT, del).await.unwrap().unwrap().unwrap();
}

/// The agent end of a raw connection, for sending what a real agent never would.
struct RawAgent {
    socket: UnixSeqpacket,
}

impl RawAgent {
    async fn send(&self, bytes: &[u8], fds: &[&OwnedFd]) {
        if fds.is_empty() {
            self.socket.send(bytes).await.unwrap();
            return;
        }
        let mut space = [0u8; 512];
        let mut ancillary = AncillaryMessageWriter::new(&mut space);
        ancillary.add_fds(fds.iter().map(|fd| fd.as_fd())).unwrap();
        self.socket
            .send_with_ancillary(bytes, &mut ancillary)
            .await
            .unwrap();
    }

    async fn ack_text(&self) -> String {
        let mut reply = [0u8; 1024];
        let received = timeout(WAIT, self.socket.recv(&mut reply)).await.unwrap();
        let n = received.unwrap().bytes_read();
        let response = WorkloadResponse::decode(&reply[..n]).unwrap();
        let Some(workload_response::Payload::Ack(ack)) = response.payload else {
            panic!("ztunnel answered without an ack: {response:?}");
        };
        ack.error
    }
}

async fn raw_pair(dir: &tempfile::TempDir) -> (RawAgent, ZdsClient) {
    let path = dir.path().join("raw.sock");
    let mut listener = UnixSeqpacketListener::bind(&path).unwrap();
    let connect = tokio::spawn(async move { ZdsClient::connect(&path).await.unwrap() });
    let socket = timeout(WAIT, listener.accept()).await.unwrap().unwrap();
    let client = timeout(WAIT, connect).await.unwrap().unwrap();
    let mut hello = [0u8; 64];
    let n = socket.recv(&mut hello).await.unwrap().bytes_read();
    assert_eq!(
        ZdsHello::decode(&hello[..n]).unwrap().version,
        1,
        "hello V1"
    );
    (RawAgent { socket }, client)
}

fn request(payload: workload_request::Payload) -> Vec<u8> {
    WorkloadRequest {
        payload: Some(payload),
    }
    .encode_to_vec()
}

fn add_request(uid: &str, with_info: bool) -> Vec<u8> {
    request(workload_request::Payload::Add(AddWorkload {
        uid: uid.into(),
        workload_info: with_info.then(|| info(uid)),
    }))
}

#[tokio::test]
async fn malformed_datagrams_are_nacked_and_the_next_add_still_works() {
    let dir = tempfile::tempdir().unwrap();
    let (agent, mut client) = raw_pair(&dir).await;
    let ns = own_netns();
    let many: Vec<OwnedFd> = (0..40).map(|_| own_netns()).collect();
    let del = request(workload_request::Payload::Del(DelWorkload {
        uid: "x".into(),
    }));
    let cases: Vec<(Vec<u8>, Vec<&OwnedFd>, &str)> = vec![
        (
            vec![0xff, 0xff, 0xff],
            vec![],
            "undecodable WorkloadRequest",
        ),
        // Field 9 is no payload this ztunnel knows (a newer agent's message type).
        (vec![9 << 3, 1], vec![], "WorkloadRequest without a payload"),
        (
            add_request("", true),
            vec![&ns],
            "AddWorkload without a uid",
        ),
        (
            add_request("uid-x", true),
            vec![],
            "AddWorkload uid-x carries 0 file descriptors",
        ),
        (
            add_request("uid-x", true),
            vec![&ns, &ns],
            "uid-x carries 2 file descriptors",
        ),
        (
            add_request("uid-x", false),
            vec![&ns],
            "AddWorkload uid-x without workload_info",
        ),
        (
            del,
            vec![&ns],
            "DelWorkload carries a file descriptor; only AddWorkload may",
        ),
        (
            vec![0u8; 2000],
            vec![],
            "ZDS message larger than 1024 bytes",
        ),
        (
            add_request("uid-x", true),
            many.iter().collect(),
            "more file descriptors than fit",
        ),
    ];
    for (bytes, fds, expected) in cases {
        agent.send(&bytes, &fds).await;
        let reason = match next(&mut client).await {
            ZdsEvent::Invalid { reason } => reason,
            other => panic!("expected Invalid for {expected:?}, got {other:?}"),
        };
        assert!(reason.contains(expected), "{reason:?} lacks {expected:?}");
        client.ack(Err(reason.clone())).await.unwrap();
        assert_eq!(
            agent.ack_text().await,
            reason,
            "the NACK carries the reason"
        );
    }

    let good = new_netns();
    agent.send(&add_request("uid-y", true), &[&good]).await;
    let got = expect_add(&mut client, "uid-y").await;
    assert!(
        same_file(&got, &good),
        "the valid Add after the bad ones has its namespace"
    );
    client.ack(Ok(())).await.unwrap();
    assert_eq!(agent.ack_text().await, "", "an empty error is an ACK");
}

#[tokio::test]
async fn a_new_ztunnel_replaces_the_old_one_and_each_connect_replays_the_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let ns = Arc::new(own_netns());
    let pods: Pods = Arc::new(Mutex::new(vec![pod("uid-a", Some(&ns))]));
    let (server, path) = start_with_pods(&dir, &pods);

    let mut old = ZdsClient::connect(&path).await.unwrap();
    expect_add(&mut old, "uid-a").await;
    old.ack(Ok(())).await.unwrap();
    expect_snapshot_sent(&mut old).await;
    wait_until(&server, true).await;

    // The agent learned of another pod meanwhile; a second ztunnel (an upgrade) connects while
    // the first is still attached.
    pods.lock().unwrap().push(pod("uid-b", Some(&ns)));
    let mut new = ZdsClient::connect(&path).await.unwrap();
    for uid in ["uid-a", "uid-b"] {
        expect_add(&mut new, uid).await;
        new.ack(Ok(())).await.unwrap();
    }
    expect_snapshot_sent(&mut new).await;
    let closed = timeout(WAIT, old.next_event()).await.unwrap().unwrap();
    assert!(closed.is_none(), "the replaced ztunnel is disconnected");

    let add = {
        let (server, fd) = (server.clone(), own_netns());
        tokio::spawn(async move { server.add("uid-c", info("uid-c"), fd.as_fd()).await })
    };
    expect_add(&mut new, "uid-c").await;
    new.ack(Ok(())).await.unwrap();
    timeout(WAIT, add).await.unwrap().unwrap().unwrap();

    // ztunnel restarts: the agent notices, then replays everything to the next one.
    drop(new);
    wait_until(&server, false).await;
    let mut again = ZdsClient::connect(&path).await.unwrap();
    for uid in ["uid-a", "uid-b"] {
        expect_add(&mut again, uid).await;
        again.ack(Ok(())).await.unwrap();
    }
    expect_snapshot_sent(&mut again).await;
    wait_until(&server, true).await;
}

#[tokio::test]
async fn a_nack_from_ztunnel_surfaces_in_the_agents_result_and_the_connection_stays() {
    let dir = tempfile::tempdir().unwrap();
    let pods: Pods = Arc::default();
    let (server, path) = start_with_pods(&dir, &pods);
    let mut client = ZdsClient::connect(&path).await.unwrap();
    expect_snapshot_sent(&mut client).await;
    wait_until(&server, true).await;

    let add = {
        let (server, fd) = (server.clone(), own_netns());
        tokio::spawn(async move { server.add("uid-a", info("uid-a"), fd.as_fd()).await })
    };
    expect_add(&mut client, "uid-a").await;
    client
        .ack(Err("pod uid-a: port 15008 already in use in the pod".into()))
        .await
        .unwrap();
    match timeout(WAIT, add).await.unwrap().unwrap() {
        Err(ZdsError::Refused(reason)) => {
            assert_eq!(reason, "pod uid-a: port 15008 already in use in the pod")
        }
        other => panic!("expected ztunnel's reason, got {other:?}"),
    }

    // A reason too long for one datagram is cut, not lost; the connection is still in use.
    let del = {
        let server = server.clone();
        tokio::spawn(async move { server.del("uid-a").await })
    };
    assert!(matches!(next(&mut client).await, ZdsEvent::Del { .. }));
    client.ack(Err("é".repeat(3000))).await.unwrap();
    match timeout(WAIT, del).await.unwrap().unwrap() {
        Err(ZdsError::Refused(reason)) => {
            assert!(
                reason.len() <= 1024 && reason.len() > 900,
                "{} bytes",
                reason.len()
            );
            assert!(
                reason.chars().all(|c| c == 'é'),
                "cut at a character boundary"
            );
        }
        other => panic!("expected a long NACK, got {other:?}"),
    }
    assert!(server.connected().await, "NACKs keep the connection");
}

#[tokio::test]
async fn add_and_del_without_ztunnel_fail_at_once_with_not_connected() {
    let dir = tempfile::tempdir().unwrap();
    let pods: Pods = Arc::default();
    let (server, _path) = start_with_pods(&dir, &pods);
    let ns = own_netns();
    let added = timeout(WAIT, server.add("uid-z", info("uid-z"), ns.as_fd())).await;
    let error = added.expect("add() returns promptly").unwrap_err();
    assert!(matches!(error, ZdsError::NotConnected), "{error:?}");
    assert!(
        error.to_string().contains("no ztunnel is connected"),
        "{error}"
    );
    let deleted = timeout(WAIT, server.del("uid-z"))
        .await
        .expect("del() returns promptly");
    assert!(
        matches!(deleted, Err(ZdsError::NotConnected)),
        "{deleted:?}"
    );
    assert!(!server.connected().await);
}

#[tokio::test]
async fn an_unanswered_request_times_out_and_drops_the_connection() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("zds.sock");
    let source = || Vec::<SnapshotEntry>::new();
    let (server, listener) = ZdsServer::bind(&path, Arc::new(source)).unwrap();
    let server = server.with_reply_timeout(Duration::from_millis(200));
    tokio::spawn({
        let server = server.clone();
        async move { server.serve(listener).await }
    });
    let mut client = ZdsClient::connect(&path).await.unwrap();
    expect_snapshot_sent(&mut client).await;
    wait_until(&server, true).await;

    let ns = own_netns();
    let add = {
        let server = server.clone();
        tokio::spawn(async move { server.add("uid-slow", info("uid-slow"), ns.as_fd()).await })
    };
    expect_add(&mut client, "uid-slow").await;
    let error = timeout(WAIT, add).await.unwrap().unwrap().unwrap_err();
    assert!(
        matches!(
            error,
            ZdsError::Timeout {
                expected: "ztunnel's ack",
                ..
            }
        ),
        "{error:?}"
    );
    assert!(
        !server.connected().await,
        "a late ack could no longer be matched"
    );
    let late = client.ack(Ok(())).await;
    assert!(matches!(late, Err(ZdsError::Send { .. })), "{late:?}");
}

#[tokio::test]
async fn the_client_keeps_one_ack_per_event() {
    let dir = tempfile::tempdir().unwrap();
    let pods: Pods = Arc::default();
    let (server, path) = start_with_pods(&dir, &pods);
    let mut client = ZdsClient::connect(&path).await.unwrap();
    let early = client.ack(Ok(())).await;
    assert!(matches!(early, Err(ZdsError::NothingToAck)), "{early:?}");
    expect_snapshot_sent(&mut client).await;
    let twice = client.ack(Ok(())).await;
    assert!(matches!(twice, Err(ZdsError::NothingToAck)), "{twice:?}");
    wait_until(&server, true).await;

    // An event left unanswered is NACKed when the caller moves on, so acks stay in order.
    let ns = own_netns();
    let add = {
        let server = server.clone();
        tokio::spawn(async move { server.add("uid-a", info("uid-a"), ns.as_fd()).await })
    };
    expect_add(&mut client, "uid-a").await;
    let del = {
        let server = server.clone();
        // Queued behind the add, which holds the connection until it has an answer.
        tokio::spawn(async move { server.del("uid-a").await })
    };
    let event = next(&mut client).await;
    assert!(
        matches!(&event, ZdsEvent::Del { uid } if uid == "uid-a"),
        "got {event:?}"
    );
    client.ack(Ok(())).await.unwrap();
    match timeout(WAIT, add).await.unwrap().unwrap() {
        Err(ZdsError::Refused(reason)) => assert!(reason.contains("did not answer"), "{reason}"),
        other => panic!("expected the automatic NACK, got {other:?}"),
    }
    timeout(WAIT, del).await.unwrap().unwrap().unwrap();
}

/// A snapshot source that records what ztunnel would not take.
#[derive(Default)]
struct RecordingSource {
    pods: Mutex<Vec<SnapshotEntry>>,
    refused: Mutex<Vec<(String, String)>>,
}

impl SnapshotSource for RecordingSource {
    fn snapshot(&self) -> Vec<SnapshotEntry> {
        self.pods.lock().unwrap().clone()
    }

    fn refused(&self, uid: &str, error: &ZdsError) {
        self.refused
            .lock()
            .unwrap()
            .push((uid.into(), error.to_string()));
    }
}

#[tokio::test]
async fn refused_snapshot_pods_are_reported_and_the_snapshot_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let ns = Arc::new(own_netns());
    let mut huge = pod("uid-huge", Some(&ns));
    huge.info.name = "n".repeat(2000);
    let source = Arc::new(RecordingSource::default());
    *source.pods.lock().unwrap() = vec![pod("uid-a", Some(&ns)), huge, pod("uid-b", Some(&ns))];
    let path = dir.path().join("zds.sock");
    let _server = start_server(&path, source.clone());

    let mut client = ZdsClient::connect(&path).await.unwrap();
    expect_add(&mut client, "uid-a").await;
    client.ack(Err("no room for uid-a".into())).await.unwrap();
    expect_add(&mut client, "uid-b").await;
    client.ack(Ok(())).await.unwrap();
    expect_snapshot_sent(&mut client).await;

    let refused = source.refused.lock().unwrap().clone();
    assert_eq!(refused.len(), 2, "{refused:?}");
    assert_eq!(refused[0].0, "uid-a");
    assert!(
        refused[0].1.contains("no room for uid-a"),
        "{:?}",
        refused[0]
    );
    assert_eq!(refused[1].0, "uid-huge");
    assert!(
        refused[1]
            .1
            .contains("AddWorkload for pod uid-huge encodes to"),
        "{:?}",
        refused[1]
    );
}

#[tokio::test]
async fn bind_replaces_a_stale_socket_but_never_another_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a/b/ztunnel.sock");
    let empty = || Vec::<SnapshotEntry>::new();
    let first = ZdsServer::bind(&path, Arc::new(empty)).unwrap();
    drop(first);
    let server = start_server(&path, Arc::new(empty));
    let mut client = ZdsClient::connect(&path).await.unwrap();
    expect_snapshot_sent(&mut client).await;
    wait_until(&server, true).await;

    let file = dir.path().join("config.yaml");
    std::fs::write(&file, "precious").unwrap();
    let error = ZdsServer::bind(&file, Arc::new(empty)).unwrap_err();
    assert!(matches!(error, ZdsError::NotASocket { .. }), "{error:?}");
    assert!(error.to_string().contains("is not a socket"), "{error}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "precious");
}

#[tokio::test]
async fn connect_with_retry_waits_for_the_agent() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("late.sock");
    let deadline = tokio::time::Instant::now() + WAIT;
    let connecting = tokio::spawn({
        let path = path.clone();
        async move { ZdsClient::connect_with_retry(&path, Duration::from_millis(100), deadline).await }
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    let empty = || Vec::<SnapshotEntry>::new();
    let _server = start_server(&path, Arc::new(empty));
    let mut client = timeout(WAIT, connecting).await.unwrap().unwrap().unwrap();
    expect_snapshot_sent(&mut client).await;
}

#[tokio::test(start_paused = true)]
async fn connect_with_retry_gives_up_at_the_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nobody.sock");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let result = ZdsClient::connect_with_retry(&path, Duration::from_secs(15), deadline).await;
    let error = result.unwrap_err();
    assert!(
        tokio::time::Instant::now() >= deadline,
        "tried until the deadline"
    );
    assert!(matches!(error, ZdsError::Connect { .. }), "{error:?}");
    assert!(
        error.to_string().contains("is the node agent running"),
        "{error}"
    );
}
