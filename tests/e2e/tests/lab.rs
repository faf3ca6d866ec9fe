//! `ambitctl lab` end to end: the demo comes up with every component as its own process, does
//! what its hints say (an allowed call answered across nodes, a refused one, metrics naming both
//! workloads), refuses invalid objects without changing anything, applies a policy to new
//! connections, and `down` leaves nothing behind. Needs root.

use std::process::Command;

use ambit_e2e::{binary, long_connection};

fn ambitctl(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(binary("ambitctl"))
        .args(args)
        .env("AMBIT_BIN_DIR", binary("ztunnel").parent().unwrap())
        // Its own lab, so a developer's running lab is never touched.
        .env("AMBIT_LAB_PREFIX", "ambit-lt-")
        .env("AMBIT_LAB_DIR", "/run/ambit-lab-test")
        .output()
        .expect("ambitctl runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

fn curl(pod: &str, url: &str) -> String {
    let (_, out, _) = ambitctl(&["lab", "exec", pod, "--", "curl", "-s", "-m", "3", url]);
    out
}

fn status() -> serde_json::Value {
    let (_, out, _) = ambitctl(&["lab", "status", "--json"]);
    serde_json::from_str(&out).unwrap_or_default()
}

fn pod_ip(pod: &str) -> String {
    status()["pods"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["pod"] == pod)
        .unwrap()["ip"]
        .as_str()
        .unwrap()
        .to_string()
}

fn wait_captured(pod: &str, want: bool) {
    for _ in 0..50 {
        let s = status();
        if s["pods"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["pod"] == pod && p["captured"] == want)
        {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    panic!("{pod} never became captured={want}: {}", status());
}

struct Down;
impl Drop for Down {
    fn drop(&mut self) {
        let _ = ambitctl(&["lab", "down"]);
    }
}

#[test]
fn demo_up_behaves_as_documented_and_down_removes_everything() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the lab needs root; run sudo scripts/test"
    );
    let _ = ambitctl(&["lab", "down"]);
    let _down = Down;
    let (code, out, err) = ambitctl(&["lab", "up", "--demo"]);
    assert_eq!(code, 0, "lab up failed:\n{out}\n{err}");
    assert!(out.contains("The demo is up. Try:"), "{out}");

    let (code, status, _) = ambitctl(&["lab", "status", "--json"]);
    assert_eq!(code, 0);
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    let pods = status["pods"].as_array().unwrap();
    assert_eq!(pods.len(), 4);
    assert!(
        pods.iter()
            .filter(|p| p["pod"].as_str().unwrap().starts_with("demo/"))
            .all(|p| p["captured"] == true)
    );
    assert!(
        status["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|n| n["ztunnel"]["ready"] == true)
    );
    let echo_1 = pods.iter().find(|p| p["pod"] == "demo/echo-1").unwrap()["ip"]
        .as_str()
        .unwrap()
        .to_string();

    // 1. Allowed: the client reaches echo by name; over a few calls both nodes answer.
    let mut answered = std::collections::BTreeSet::new();
    for _ in 0..12 {
        let body: serde_json::Value =
            serde_json::from_str(&curl("demo/client", "http://echo.demo.svc.cluster.local/"))
                .unwrap_or_default();
        if let Some(pod) = body["pod"].as_str() {
            answered.insert(pod.to_string());
        }
    }
    assert!(
        answered.contains("echo-1") && answered.contains("echo-2"),
        "answered by {answered:?}"
    );

    // 2. Refused: legacy/client has no identity, the ALLOW policy names only demo/client.
    assert_eq!(curl("legacy/client", &format!("http://{echo_1}:8080/")), "");

    // 3. Metrics name both workloads.
    let node_1 = status["nodes"][0]["ip"].as_str().unwrap().to_string();
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            "ambit-lt-node-1",
            "curl",
            "-s",
            &format!("http://{node_1}:15020/metrics"),
        ])
        .output()
        .unwrap();
    let metrics = String::from_utf8_lossy(&out.stdout);
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("istio_tcp_connections_opened_total")
                && l.contains("source_workload=\"client\"")
                && l.contains("destination_service=\"echo.demo.svc.cluster.local\"")),
        "{metrics}"
    );

    // Cross-node mesh traffic is encrypted: a capture on node 2's link never sees the marker;
    // a marker in the non-mesh client's plaintext request is visible (control).
    let capture_dir = tempfile::tempdir().unwrap();
    let echo_2 = pod_ip("demo/echo-2");
    let capture = capture_dir.path().join("capture.txt");
    let mut tcpdump = Command::new("ip")
        .args([
            "netns",
            "exec",
            "ambit-lt-node-2",
            "tcpdump",
            "-i",
            "eth0",
            "-l",
            "-A",
            "-n",
            "-U",
            "tcp",
        ])
        .stdout(std::fs::File::create(&capture).unwrap())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("tcpdump");
    std::thread::sleep(std::time::Duration::from_millis(700));
    let echo_bin = binary("ambit-echo");
    let (code, _, err) = ambitctl(&[
        "lab",
        "exec",
        "demo/client",
        "--",
        echo_bin.to_str().unwrap(),
        "tcp",
        &format!("{echo_2}:9000"),
        "--send",
        "LAB-SECRET-MARKER",
    ]);
    assert_eq!(code, 0, "{err}");
    // curl sends its request as soon as it connects, before the destination's policy answers.
    let _ = curl(
        "legacy/client",
        &format!("http://{echo_2}:8080/LAB-PLAIN-MARKER"),
    );
    std::thread::sleep(std::time::Duration::from_millis(700));
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(tcpdump.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    );
    let _ = tcpdump.wait();
    let captured = std::fs::read_to_string(&capture).unwrap_or_default();
    assert!(
        captured.contains("LAB-PLAIN-MARKER"),
        "the capture sees plaintext (control)"
    );
    assert!(
        !captured.contains("LAB-SECRET-MARKER"),
        "mesh traffic between nodes is encrypted"
    );

    // A real Prometheus scrapes every ztunnel; a query returns the demo's connection counter.
    let nodes: Vec<String> = status["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| format!("'{}:15020'", n["ip"].as_str().unwrap()))
        .collect();
    let prom_dir = tempfile::tempdir().unwrap();
    let config = prom_dir.path().join("prometheus.yml");
    std::fs::write(&config, format!("global: {{scrape_interval: 1s}}\nscrape_configs:\n- job_name: ztunnel\n  static_configs:\n  - targets: [{}]\n", nodes.join(", "))).unwrap();
    let mut prometheus = Command::new("ip")
        .args(["netns", "exec", "ambit-lt-fabric", "prometheus"])
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            prom_dir.path().join("data").display()
        ))
        .arg("--web.listen-address=127.0.0.1:19090")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(prom_dir.path().join("prometheus.log")).unwrap())
        .spawn()
        .expect("prometheus (apt-get install prometheus)");
    let query = "http://127.0.0.1:19090/api/v1/query?query=istio_tcp_connections_opened_total%7Bsource_workload%3D%22client%22%2Cdestination_service%3D%22echo.demo.svc.cluster.local%22%7D";
    let mut found = String::new();
    for _ in 0..60 {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                "ambit-lt-fabric",
                "curl",
                "-s",
                "-m",
                "2",
                query,
            ])
            .output()
            .unwrap();
        let body: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        if body["data"]["result"]
            .as_array()
            .is_some_and(|r| !r.is_empty())
        {
            found = body["data"]["result"].to_string();
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    let _ = prometheus.kill();
    let _ = prometheus.wait();
    assert!(
        found.contains("destination_workload"),
        "Prometheus never returned the demo's series: {}",
        std::fs::read_to_string(prom_dir.path().join("prometheus.log")).unwrap_or_default()
    );

    // Restarts in turn: ztunnel on node 2, cni-agent on node 1, istiod-lite. A connection
    // between two pods on node 1 does not pass through any of them and stays up; captured pods
    // stay captured; new connections work afterwards.
    let client_netns = status["pods"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["pod"] == "demo/client")
        .unwrap()["netns"]
        .as_str()
        .unwrap()
        .to_string();
    let target = format!("{echo_1}:9000");
    let long = std::thread::spawn(move || {
        long_connection(&client_netns, &target, std::time::Duration::from_secs(10))
    });
    std::thread::sleep(std::time::Duration::from_secs(1));
    for args in [
        ["ztunnel", "--node", "node-2"],
        ["cni-agent", "--node", "node-1"],
    ] {
        let (code, out, err) = ambitctl(&["lab", "restart", args[0], args[1], args[2]]);
        assert_eq!(code, 0, "{out}{err}");
    }
    let (code, out, err) = ambitctl(&["lab", "restart", "istiod-lite"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(
        long.join().unwrap(),
        Ok(()),
        "the node-1 connection survived the restarts"
    );
    let after = self::status();
    assert!(
        after["pods"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["pod"].as_str().unwrap().starts_with("demo/"))
            .all(|p| p["captured"] == true),
        "{after}"
    );
    let mut served = std::collections::BTreeSet::new();
    for _ in 0..20 {
        let body: serde_json::Value =
            serde_json::from_str(&curl("demo/client", "http://echo.demo.svc.cluster.local/"))
                .unwrap_or_default();
        if let Some(pod) = body["pod"].as_str() {
            served.insert(pod.to_string());
        }
        if served.len() == 2 {
            break;
        }
    }
    assert_eq!(
        served.len(),
        2,
        "both echo pods serve again after the restarts: {served:?}"
    );

    // Invalid objects change nothing; a valid DENY applies to new connections.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: x, namespace: demo}\nspec: {action: PERMIT}\n").unwrap();
    let (code, _, err) = ambitctl(&["lab", "apply", "-f", bad.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("AuthorizationPolicy demo/x: spec.action: \"PERMIT\" is not ALLOW, DENY, AUDIT or CUSTOM"), "{err}");
    let deny = dir.path().join("deny.yaml");
    std::fs::write(&deny, "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny-client, namespace: demo}\nspec:\n  action: DENY\n  rules: [{from: [{source: {principals: [cluster.local/ns/demo/sa/client]}}]}]\n").unwrap();
    assert_eq!(
        ambitctl(&["lab", "apply", "-f", deny.to_str().unwrap()]).0,
        0
    );
    let mut denied = false;
    for _ in 0..30 {
        if curl("demo/client", "http://echo.demo.svc.cluster.local/").is_empty() {
            denied = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert!(denied, "the DENY policy took effect on new connections");

    // Labelling a namespace enrolls its running pods; removing the label releases them.
    let legacy = dir.path().join("legacy.yaml");
    std::fs::write(&legacy, "apiVersion: v1\nkind: Namespace\nmetadata: {name: legacy, labels: {istio.io/dataplane-mode: ambient}}\n").unwrap();
    assert_eq!(
        ambitctl(&["lab", "apply", "-f", legacy.to_str().unwrap()]).0,
        0
    );
    wait_captured("legacy/client", true);
    std::fs::write(
        &legacy,
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: legacy}\n",
    )
    .unwrap();
    assert_eq!(
        ambitctl(&["lab", "apply", "-f", legacy.to_str().unwrap()]).0,
        0
    );
    wait_captured("legacy/client", false);

    // A pod in an ambient namespace that opts out is not captured.
    let optout = dir.path().join("optout.yaml");
    std::fs::write(&optout, "apiVersion: v1\nkind: Pod\nmetadata: {name: tool, namespace: demo, labels: {istio.io/dataplane-mode: none}}\n").unwrap();
    assert_eq!(
        ambitctl(&["lab", "apply", "-f", optout.to_str().unwrap()]).0,
        0
    );
    let tool = self::status()["pods"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["pod"] == "demo/tool")
        .cloned()
        .unwrap();
    assert_eq!(
        (tool["ambient"].clone(), tool["captured"].clone()),
        (serde_json::json!(false), serde_json::json!(false))
    );

    // A Deployment becomes its replicas, captured like any pod; deleting it removes them.
    let deployment = dir.path().join("web.yaml");
    std::fs::write(&deployment, "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web, namespace: demo}\nspec:\n  replicas: 2\n  selector: {matchLabels: {app: web}}\n  template:\n    metadata: {labels: {app: web}}\n    spec: {serviceAccountName: web}\n").unwrap();
    assert_eq!(
        ambitctl(&["lab", "apply", "-f", deployment.to_str().unwrap()]).0,
        0
    );
    wait_captured("demo/web-0", true);
    wait_captured("demo/web-1", true);
    assert_eq!(
        ambitctl(&["lab", "delete", "-f", deployment.to_str().unwrap()]).0,
        0
    );
    assert!(
        !self::status()["pods"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["pod"].as_str().unwrap().starts_with("demo/web-"))
    );

    // PERMISSIVE admits the non-mesh client (demo/client has no policy of its own); STRICT
    // refuses it.
    let client_ip = pod_ip("demo/client");
    let direct = format!("http://{client_ip}:8080/");
    assert!(
        curl("legacy/client", &direct).contains("\"pod\":\"client\""),
        "PERMISSIVE admits plaintext"
    );
    let strict = dir.path().join("strict.yaml");
    std::fs::write(&strict, "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: demo}\nspec: {mtls: {mode: STRICT}}\n").unwrap();
    assert_eq!(
        ambitctl(&["lab", "apply", "-f", strict.to_str().unwrap()]).0,
        0
    );
    let mut refused = false;
    for _ in 0..30 {
        if curl("legacy/client", &direct).is_empty() {
            refused = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert!(refused, "STRICT refuses the non-mesh client");

    let (code, out, _) = ambitctl(&["lab", "down"]);
    assert_eq!(code, 0, "{out}");
    let namespaces = String::from_utf8_lossy(
        &Command::new("ip")
            .args(["netns", "list"])
            .output()
            .unwrap()
            .stdout,
    )
    .to_string();
    assert!(
        !namespaces.contains("ambit-lt-"),
        "namespaces left: {namespaces}"
    );
    assert!(!std::path::Path::new("/run/ambit-lab-test").exists());
}
