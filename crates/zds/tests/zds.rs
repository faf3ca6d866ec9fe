//! ZDS end to end over a real SOCK_SEQPACKET socket: hello, snapshot with namespace fds, live
//! add/del with acks, malformed datagrams refused without dropping the connection, reconnects
//! replaying the snapshot, and the agent never blocking when ztunnel is away.

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ambit_proto::zds::{WorkloadInfo, WorkloadRequest, ZdsHello};
use ambit_zds::ZdsError;
use ambit_zds::client::{ZdsClient, ZdsEvent};
use ambit_zds::server::{SnapshotEntry, ZdsServer};
use nix::sys::stat::fstat;
use prost::Message;
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(10);

fn info(name: &str) -> WorkloadInfo {
    WorkloadInfo {
        name: name.into(),
        namespace: "demo".into(),
        service_account: "default".into(),
    }
}

fn netns() -> OwnedFd {
    std::fs::File::open("/proc/self/ns/net").unwrap().into()
}

fn same_file(a: &OwnedFd, b: &OwnedFd) -> bool {
    let (a, b) = (fstat(a.as_fd()).unwrap(), fstat(b.as_fd()).unwrap());
    a.st_ino == b.st_ino && a.st_dev == b.st_dev
}

type Pods = Arc<Mutex<Vec<SnapshotEntry>>>;

fn start_server(dir: &tempfile::TempDir, pods: Pods) -> (ZdsServer, std::path::PathBuf) {
    let path = dir.path().join("run/ztunnel.sock");
    let source = move || pods.lock().unwrap().clone();
    let (server, listener) = ZdsServer::bind(&path, Arc::new(source)).unwrap();
    let serving = server.clone();
    tokio::spawn(async move { serving.serve(listener).await });
    (server, path)
}

async fn next(client: &mut ZdsClient) -> ZdsEvent {
    timeout(WAIT, client.next_event())
        .await
        .expect("no event within 10s")
        .expect("receive failed")
        .expect("agent closed the connection")
}

async fn wait_connected(server: &ZdsServer) {
    for _ in 0..500 {
        if server.connected().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("ztunnel never became the active connection");
}

#[tokio::test]
async fn snapshot_then_live_add_and_del_each_acked_with_the_namespace_fd() {
    let dir = tempfile::tempdir().unwrap();
    let sent_ns = Arc::new(netns());
    let pods: Pods = Arc::new(Mutex::new(vec![
        SnapshotEntry {
            uid: "uid-a".into(),
            info: info("a"),
            netns: Some(sent_ns.clone()),
        },
        SnapshotEntry {
            uid: "uid-b".into(),
            info: info("b"),
            netns: None,
        },
    ]));
    let (server, path) = start_server(&dir, pods);
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the socket is owner-only");

    let mut client = ZdsClient::connect(&path).await.unwrap();
    match next(&mut client).await {
        ZdsEvent::Add { uid, info, netns } => {
            assert_eq!(uid, "uid-a");
            assert_eq!(info.name, "a");
            assert!(
                same_file(&netns, &sent_ns),
                "the fd is the namespace the agent sent"
            );
        }
        other => panic!("expected Add, got {other:?}"),
    }
    client.ack(Ok(())).await.unwrap();
    assert!(matches!(next(&mut client).await, ZdsEvent::Keep { uid } if uid == "uid-b"));
    client.ack(Ok(())).await.unwrap();
    assert!(matches!(next(&mut client).await, ZdsEvent::SnapshotSent));
    client.ack(Ok(())).await.unwrap();
    wait_connected(&server).await;

    let ns = netns();
    let add = {
        let server = server.clone();
        tokio::spawn(async move { server.add("uid-c", info("c"), ns.as_fd()).await })
    };
    assert!(matches!(next(&mut client).await, ZdsEvent::Add { uid, .. } if uid == "uid-c"));
    client.ack(Ok(())).await.unwrap();
    timeout(WAIT, add).await.unwrap().unwrap().unwrap();

    let del = {
        let server = server.clone();
        tokio::spawn(async move { server.del("uid-a").await })
    };
    assert!(matches!(next(&mut client).await, ZdsEvent::Del { uid } if uid == "uid-a"));
    client.ack(Err("pod still draining".into())).await.unwrap();
    match timeout(WAIT, del).await.unwrap().unwrap() {
        Err(ZdsError::Refused(reason)) => assert_eq!(reason, "pod still draining"),
        other => panic!("expected the NACK reason, got {other:?}"),
    }
}

#[tokio::test]
async fn malformed_datagrams_are_reported_and_the_next_message_still_works() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("zds.sock");
    let mut listener = tokio_seqpacket::UnixSeqpacketListener::bind(&path).unwrap();
    let connect = tokio::spawn({
        let path = path.clone();
        async move { ZdsClient::connect(&path).await.unwrap() }
    });
    let agent = listener.accept().await.unwrap();
    let mut client = connect.await.unwrap();
    let mut hello = [0u8; 64];
    let n = agent.recv(&mut hello).await.unwrap().bytes_read();
    assert_eq!(ZdsHello::decode(&hello[..n]).unwrap().version, 1);

    let cases: Vec<(Vec<u8>, &str)> = vec![
        (vec![0xff, 0xff, 0xff], "undecodable WorkloadRequest"),
        // Field 9 is no payload ztunnel knows (a newer agent's message type).
        (vec![9 << 3, 1], "WorkloadRequest without a payload"),
        (
            WorkloadRequest {
                payload: Some(ambit_proto::zds::workload_request::Payload::Add(
                    ambit_proto::zds::AddWorkload {
                        uid: "uid-x".into(),
                        workload_info: Some(info("x")),
                    },
                )),
            }
            .encode_to_vec(),
            "AddWorkload uid-x carries 0 file descriptors",
        ),
        (vec![0u8; 2000], "message larger than 1024 bytes"),
    ];
    for (bytes, expected) in cases {
        agent.send(&bytes).await.unwrap();
        match next(&mut client).await {
            ZdsEvent::Invalid { reason } => {
                assert!(reason.contains(expected), "{reason:?} lacks {expected:?}");
                client.ack(Err(reason)).await.unwrap();
            }
            other => panic!("expected Invalid, got {other:?}"),
        }
        let mut reply = [0u8; 1024];
        let n = agent.recv(&mut reply).await.unwrap().bytes_read();
        let response = ambit_proto::zds::WorkloadResponse::decode(&reply[..n]).unwrap();
        let Some(ambit_proto::zds::workload_response::Payload::Ack(ack)) = response.payload else {
            panic!("no ack");
        };
        assert!(ack.error.contains(expected));
    }
    // A valid message after all that still goes through.
    let del = WorkloadRequest {
        payload: Some(ambit_proto::zds::workload_request::Payload::Del(
            ambit_proto::zds::DelWorkload {
                uid: "uid-y".into(),
            },
        )),
    };
    agent.send(&del.encode_to_vec()).await.unwrap();
    assert!(matches!(next(&mut client).await, ZdsEvent::Del { uid } if uid == "uid-y"));
}

#[tokio::test]
async fn a_new_ztunnel_gets_the_snapshot_again_and_replaces_the_old_one() {
    let dir = tempfile::tempdir().unwrap();
    let pods: Pods = Arc::new(Mutex::new(vec![SnapshotEntry {
        uid: "uid-a".into(),
        info: info("a"),
        netns: Some(Arc::new(netns())),
    }]));
    let (server, path) = start_server(&dir, pods.clone());

    // Nobody connected: the agent is told at once, it does not wait.
    let ns = netns();
    let result = timeout(
        Duration::from_secs(1),
        server.add("uid-z", info("z"), ns.as_fd()),
    )
    .await
    .expect("add returns promptly");
    assert!(matches!(result, Err(ZdsError::NotConnected)));

    for round in 0..2 {
        let mut client = ZdsClient::connect(&path).await.unwrap();
        assert!(
            matches!(next(&mut client).await, ZdsEvent::Add { uid, .. } if uid == "uid-a"),
            "round {round}"
        );
        client.ack(Ok(())).await.unwrap();
        assert!(matches!(next(&mut client).await, ZdsEvent::SnapshotSent));
        client.ack(Ok(())).await.unwrap();
        wait_connected(&server).await;
        // Dropping the client is a ztunnel restart; the next round reconnects.
    }
    for _ in 0..500 {
        if !server.connected().await {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!server.connected().await, "a closed ztunnel is noticed");
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
    let pods: Pods = Arc::new(Mutex::new(Vec::new()));
    let source = move || pods.lock().unwrap().clone();
    let (server, listener) = ZdsServer::bind(&path, Arc::new(source)).unwrap();
    tokio::spawn({
        let server = server.clone();
        async move { server.serve(listener).await }
    });
    let mut client = timeout(WAIT, connecting).await.unwrap().unwrap().unwrap();
    assert!(matches!(next(&mut client).await, ZdsEvent::SnapshotSent));
}
