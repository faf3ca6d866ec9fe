//! ztunnel's operator endpoints and configuration run on a runtime of their own: with the data
//! path's only thread blocked, readiness, metrics and the admin API still answer, and a change to
//! the configuration still applies.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ambit_identity::ca::CertificateAuthority;

/// Bound on every wait.
const WAIT: Duration = Duration::from_secs(10);

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// A plain HTTP/1.1 GET that gives up after `timeout`: the status code and the body.
fn get(addr: SocketAddr, path: &str, timeout: Duration) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    Ok((status, body.to_string()))
}

/// Polls `path` until `check` holds for the answer; panics naming `what` after [`WAIT`].
fn until(addr: SocketAddr, path: &str, what: &str, check: impl Fn(u16, &str) -> bool) {
    let deadline = Instant::now() + WAIT;
    let mut last = None;
    while Instant::now() < deadline {
        match get(addr, path, Duration::from_secs(1)) {
            Ok((status, body)) if check(status, &body) => return,
            other => last = Some(other),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{what}: GET {path} never answered as expected; last: {last:?}");
}

const WORKLOAD: &str = "workloads:
- name: echo-1
  namespace: demo
  serviceAccount: echo
  addresses: [10.244.2.5]
  node: node-1
  protocol: HBONE
";

#[test]
fn operator_endpoints_and_config_work_while_the_data_path_is_blocked() {
    let dir = tempfile::tempdir().unwrap();
    let ca =
        CertificateAuthority::generate_root("cluster.local", Duration::from_secs(86400)).unwrap();
    std::fs::write(dir.path().join("ca-cert.pem"), ca.cert_pem()).unwrap();
    std::fs::write(dir.path().join("ca-key.pem"), ca.key_pem()).unwrap();
    let local = dir.path().join("local.yaml");
    std::fs::write(&local, "workloads: []\n").unwrap();
    let (stats, admin, ready) = (free_addr(), free_addr(), free_addr());
    let env: BTreeMap<String, String> = [
        ("NODE_NAME", "node-1".to_string()),
        ("LOCAL_XDS_PATH", local.display().to_string()),
        ("LOCAL_CA_DIR", dir.path().display().to_string()),
        ("INPOD_ENABLED", "false".to_string()),
        ("STATS_ADDR", stats.to_string()),
        ("ADMIN_ADDR", admin.to_string()),
        ("READINESS_ADDR", ready.to_string()),
        ("DRAIN_DEADLINE", "1s".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let config = ztunnel::config::from_env(&env, &BTreeMap::new()).expect("configuration");

    // The data path: one thread, like a node whose workers are all busy with traffic. The stop
    // future first blocks that thread when told to, until released, then waits for the stop.
    let (block_tx, block_rx) = tokio::sync::oneshot::channel::<()>();
    let (blocked_tx, blocked_rx) = mpsc::channel::<()>();
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let data_path = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(ztunnel::app::run(config, None, async move {
            if block_rx.await.is_ok() {
                blocked_tx.send(()).unwrap();
                // Deliberately blocking: nothing else on this runtime can run meanwhile.
                let _ = release_rx.recv_timeout(WAIT * 3);
            }
            let _ = stop_rx.await;
        }))
    });

    until(
        ready,
        "/healthz/ready",
        "ztunnel becomes ready",
        |status, _| status == 200,
    );
    block_tx.send(()).unwrap();
    blocked_rx
        .recv_timeout(WAIT)
        .expect("the data path thread is blocked");

    // Probes, scrapes and the admin API are not on the blocked thread.
    let (status, _) = get(ready, "/healthz/ready", Duration::from_secs(2)).expect("readiness");
    assert_eq!(status, 200);
    let (status, body) = get(stats, "/metrics", Duration::from_secs(2)).expect("metrics");
    assert_eq!(status, 200);
    assert!(
        body.contains("ambit_certificates{state=\"available\"}"),
        "{body}"
    );
    // Configuration keeps applying.
    std::fs::write(&local, WORKLOAD).unwrap();
    until(
        admin,
        "/config_dump",
        "a changed local config applies",
        |status, body| status == 200 && body.contains("echo-1"),
    );
    release_tx.send(()).unwrap();

    stop_tx.send(()).unwrap();
    let outcome = data_path.join().expect("the data path thread");
    outcome.expect("ztunnel stops cleanly");
}
