//! `ambitctl lab` end to end: the demo comes up with every component as its own process, does
//! what its hints say (an allowed call answered across nodes, a refused one, metrics naming both
//! workloads, the waypoint's canary route and its L7 refusal), refuses invalid objects without
//! changing anything, applies a policy to new connections, and `down` leaves nothing behind.
//! Needs root.

use std::process::Command;

use ambit_e2e::{ambitctl_lab_with, binary, long_connection};

// The operator tools' checks, one file each, run against the demo lab below.
#[path = "lab/analyze.rs"]
mod analyze;
#[path = "lab/dashboard.rs"]
mod dashboard;
#[path = "lab/explain.rs"]
mod explain;
#[path = "../../support/otlp_python.rs"]
mod otlp_python;
#[path = "lab/tracing.rs"]
mod tracing;
#[path = "lab/ztunnel_config.rs"]
mod ztunnel_config;

fn ambitctl(args: &[&str]) -> (i32, String, String) {
    // Its own lab, so a developer's running lab is never touched; its trace collector runs on a
    // Python with the OTLP message types (made once).
    static OTLP_PYTHON: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    let python = OTLP_PYTHON.get_or_init(tracing::python);
    ambitctl_lab_with(
        "ambit-lt-",
        "/run/ambit-lab-test",
        &[("AMBIT_LAB_OTLP_PYTHON", python.as_os_str())],
        args,
    )
}

fn curl(pod: &str, url: &str) -> String {
    let (_, out, _) = ambitctl(&["lab", "exec", pod, "--", "curl", "-s", "-m", "3", url]);
    out
}

fn curl_with(pod: &str, extra: &[&str], url: &str) -> String {
    let mut args = vec!["lab", "exec", pod, "--", "curl", "-s", "-m", "5"];
    args.extend_from_slice(extra);
    args.push(url);
    let (_, out, _) = ambitctl(&args);
    out
}

/// `count` HTTP requests from `pod` with the echo client; its JSON summary (codes, pods).
fn echo_call(pod: &str, url: &str, count: u32) -> serde_json::Value {
    let echo = binary("ambit-echo");
    let (code, out, err) = ambitctl(&[
        "lab",
        "exec",
        pod,
        "--",
        echo.to_str().unwrap(),
        "call",
        url,
        "-n",
        &count.to_string(),
    ]);
    assert_eq!(code, 0, "echo call failed: {err}");
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"))
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
    assert_eq!(pods.len(), 5, "{status}");
    // Every demo pod is captured except the waypoint's own (istio.io/dataplane-mode: none).
    for pod in pods {
        let name = pod["pod"].as_str().unwrap();
        if name.starts_with("demo/") {
            assert_eq!(
                pod["captured"],
                name != "demo/waypoint-waypoint",
                "{name}: {pod}"
            );
        }
    }
    let waypoints = status["waypoints"].as_array().unwrap();
    assert_eq!(waypoints.len(), 1, "{status}");
    let waypoint_ip = waypoints[0]["ip"].as_str().unwrap().to_string();
    assert_eq!(
        (
            &waypoints[0]["namespace"],
            &waypoints[0]["name"],
            &waypoints[0]["ready"]
        ),
        (
            &serde_json::json!("demo"),
            &serde_json::json!("waypoint"),
            &serde_json::json!(true)
        )
    );
    assert_eq!(
        waypoints[0]["metrics"],
        format!("http://{waypoint_ip}:15020/metrics")
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

    // 1. Allowed: the client reaches echo by name through the waypoint, which splits 90/10
    //    between v1 (node 1) and v2 (node 2); the canary header always reaches v2.
    let split = echo_call("demo/client", "http://echo.demo.svc.cluster.local/", 200);
    assert_eq!(split["codes"]["200"], 200, "{split}");
    let v2 = split["pods"]["echo-2"].as_u64().unwrap_or(0);
    // Binomial(200, 0.1): outside [6, 40] with probability below 1e-4.
    assert!((6..=40).contains(&v2), "v2 answered {v2} of 200: {split}");
    for _ in 0..3 {
        let body: serde_json::Value = serde_json::from_str(&curl_with(
            "demo/client",
            &["-H", "x-canary: true"],
            "http://echo.demo.svc.cluster.local/",
        ))
        .unwrap_or_default();
        assert_eq!(body["pod"], "echo-2", "{body}");
        // The waypoint forwarded it: the pod saw the waypoint's address, and a request id.
        assert!(
            body["peer"]
                .as_str()
                .is_some_and(|p| p.starts_with(&format!("{waypoint_ip}:"))),
            "{body}"
        );
        assert!(body["headers"]["x-request-id"].is_string(), "{body}");
    }
    // The demo's L7 policy refuses /admin with Istio's answer.
    let admin = curl_with(
        "demo/client",
        &["-i"],
        "http://echo.demo.svc.cluster.local/admin",
    );
    assert!(
        admin.starts_with("HTTP/1.1 403") && admin.trim_end().ends_with("RBAC: access denied"),
        "{admin}"
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

    waypoint_behaves_like_istios(&status, &waypoint_ip);
    istio_canary_example_works_unchanged();

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
            .filter(|p| p["pod"].as_str().unwrap().starts_with("demo/")
                && p["pod"] != "demo/waypoint-waypoint")
            .all(|p| p["captured"] == true),
        "{after}"
    );
    let served = echo_call("demo/client", "http://echo.demo.svc.cluster.local/", 60);
    assert_eq!(served["codes"]["200"], 60, "{served}");
    let canary = curl_with(
        "demo/client",
        &["-H", "x-canary: true"],
        "http://echo.demo.svc.cluster.local/",
    );
    assert!(
        canary.contains("\"pod\":\"echo-2\""),
        "both nodes serve again after the restarts: {canary}"
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
    // With the waypoint in the path the destination ztunnel sees the waypoint's identity, so
    // the client's own identity is checked on pod-addressed connections (which go direct).
    let mut denied = false;
    for _ in 0..30 {
        if curl("demo/client", &format!("http://{echo_1}:8080/")).is_empty() {
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

    // The operator tools against the running demo (before STRICT below changes what is allowed).
    analyze::check(&status);
    explain::check(&status);
    ztunnel_config::check(&status);
    dashboard::check(&status);
    tracing::check(&status);

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

fn waypoint_metrics(waypoint_ip: &str) -> String {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            "ambit-lt-node-1",
            "curl",
            "-s",
            "-m",
            "3",
            &format!("http://{waypoint_ip}:15020/metrics"),
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn apply_yaml(dir: &std::path::Path, name: &str, yaml: &str) -> (i32, String, String) {
    let path = dir.join(name);
    std::fs::write(&path, yaml).unwrap();
    ambitctl(&["lab", "apply", "-f", path.to_str().unwrap()])
}

/// Polls `check` (bounded) until it holds.
fn eventually(what: &str, mut check: impl FnMut() -> Result<(), String>) {
    let mut last = String::new();
    for _ in 0..50 {
        match check() {
            Ok(()) => return,
            Err(why) => last = why,
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    panic!("{what}: {last}");
}

/// The demo's waypoint with real clients: HTTP/2 prior knowledge, a real gRPC client, a
/// server-first TCP port, Istio's request metrics, a refused route that disturbs nothing, an L7
/// ALLOW policy, a restart, and `istio.io/use-waypoint` taking effect live.
fn waypoint_behaves_like_istios(status: &serde_json::Value, waypoint_ip: &str) {
    let url = "http://echo.demo.svc.cluster.local/";
    let dir = tempfile::tempdir().unwrap();

    // HTTP/2 with prior knowledge to a port named `http`: the waypoint takes it (Envoy's AUTO).
    let h2 = curl_with(
        "demo/client",
        &["--http2-prior-knowledge", "-H", "x-canary: true"],
        url,
    );
    assert!(h2.contains("\"pod\":\"echo-2\""), "{h2}");

    // A real gRPC client (grpcio's C core) through the waypoint; a status it asks for is counted.
    let client = concat!(env!("CARGO_MANIFEST_DIR"), "/../echo/tests/grpc_client.py");
    let (code, out, err) = ambitctl(&[
        "lab",
        "exec",
        "demo/client",
        "--",
        "env",
        "GRPC_DNS_RESOLVER=native",
        "/usr/bin/python3",
        client,
        "echo.demo.svc.cluster.local:80",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let grpc: serde_json::Value = serde_json::from_str(out.trim()).unwrap_or_default();
    assert_eq!(grpc["health_status"], 1, "{out}");
    assert_eq!(grpc["echo"]["message"], "hello from python", "{out}");
    assert_eq!(grpc["asked_status"], "NOT_FOUND", "{out}");
    assert!(
        grpc["echo"]["peer"]
            .as_str()
            .is_some_and(|p| p.starts_with(&format!("{waypoint_ip}:"))),
        "{out}"
    );

    // A GRPCRoute on the same Service sends Echo/Echo to v2 (gRPC requests are matched against
    // GRPCRoutes first); removing it restores the HTTPRoute's split.
    let grpc_route = "apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {name: echo-grpc, namespace: demo}\nspec:\n  parentRefs: [{group: \"\", kind: Service, name: echo, port: 80}]\n  rules: [{matches: [{method: {service: ambit.echo.v1.Echo, method: Echo}}], backendRefs: [{name: echo-v2, port: 80}]}]\n";
    assert_eq!(apply_yaml(dir.path(), "grpc-route.yaml", grpc_route).0, 0);
    eventually("the GRPCRoute sends Echo/Echo to v2", || {
        let (_, out, err) = ambitctl(&[
            "lab",
            "exec",
            "demo/client",
            "--",
            "env",
            "GRPC_DNS_RESOLVER=native",
            "/usr/bin/python3",
            client,
            "echo.demo.svc.cluster.local:80",
        ]);
        let seen: serde_json::Value = serde_json::from_str(out.trim()).unwrap_or_default();
        (seen["echo"]["pod"] == "echo-2" && seen["health_status"] == 1)
            .then_some(())
            .ok_or(format!("{out}{err}"))
    });
    let path = dir.path().join("grpc-route.yaml");
    assert_eq!(
        ambitctl(&["lab", "delete", "-f", path.to_str().unwrap()]).0,
        0
    );

    // A declared TCP port (`tcp`, 9000) is never sniffed: echo's greeting comes first.
    let vip = status["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["service"] == "demo/echo" || s["name"] == "echo")
        .and_then(|s| s["vip"].as_str())
        .unwrap()
        .to_string();
    let echo_bin = binary("ambit-echo");
    let (code, out, err) = ambitctl(&[
        "lab",
        "exec",
        "demo/client",
        "--",
        echo_bin.to_str().unwrap(),
        "tcp",
        &format!("{vip}:9000"),
        "--send",
        "server-first",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("server-first"), "{out}");

    // Istio's request metrics, reported by the waypoint with the full label set.
    let metrics = waypoint_metrics(waypoint_ip);
    let has = |labels: &[&str]| {
        metrics
            .lines()
            .any(|l| l.starts_with("istio_requests_total{") && labels.iter().all(|x| l.contains(x)))
    };
    assert!(
        has(&[
            "reporter=\"waypoint\"",
            "source_workload=\"client\"",
            "source_principal=\"spiffe://cluster.local/ns/demo/sa/client\"",
            "destination_service=\"echo-v2.demo.svc.cluster.local\"",
            "response_code=\"200\"",
        ]),
        "{metrics}"
    );
    assert!(
        has(&[
            "response_code=\"403\"",
            "destination_service=\"echo.demo.svc.cluster.local\""
        ]),
        "{metrics}"
    );
    assert!(
        has(&["request_protocol=\"grpc\"", "grpc_response_status=\"5\""]),
        "{metrics}"
    );
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("istio_tcp_connections_opened_total{")
                && l.contains("reporter=\"waypoint\"")),
        "{metrics}"
    );

    // A route that does not validate is refused by name and field; the demo's keeps serving.
    let (code, _, err) = apply_yaml(
        dir.path(),
        "bad-route.yaml",
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: bad, namespace: demo}\nspec:\n  parentRefs: [{group: \"\", kind: Service, name: echo}]\n  rules: [{matches: [{path: {type: RegularExpression, value: \"(unclosed\"}}], backendRefs: [{name: echo-v1, port: 80}]}]\n",
    );
    assert_eq!(code, 1);
    assert!(
        err.contains("HTTPRoute demo/bad") && err.contains("spec.rules[0].matches[0].path"),
        "{err}"
    );
    let canary = curl_with("demo/client", &["-H", "x-canary: true"], url);
    assert!(canary.contains("\"pod\":\"echo-2\""), "{canary}");

    // An L7 ALLOW on the Service: only GET passes; POST gets 403. Then removed.
    let allow = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: get-only, namespace: demo}\nspec:\n  targetRefs: [{group: \"\", kind: Service, name: echo}]\n  action: ALLOW\n  rules: [{to: [{operation: {methods: [GET]}}]}]\n";
    assert_eq!(apply_yaml(dir.path(), "allow.yaml", allow).0, 0);
    eventually("POST refused by the L7 ALLOW", || {
        let post = curl_with("demo/client", &["-i", "-X", "POST"], url);
        post.starts_with("HTTP/1.1 403").then_some(()).ok_or(post)
    });
    assert!(curl("demo/client", url).contains("\"pod\""));
    let path = dir.path().join("allow.yaml");
    assert_eq!(
        ambitctl(&["lab", "delete", "-f", path.to_str().unwrap()]).0,
        0
    );
    eventually("POST allowed again", || {
        let post = curl_with("demo/client", &["-i", "-X", "POST"], url);
        post.starts_with("HTTP/1.1 200").then_some(()).ok_or(post)
    });

    // A waypoint restart: ready again, routing again.
    let (code, out, err) = ambitctl(&["lab", "restart", "waypoint", "--name", "demo/waypoint"]);
    assert_eq!(code, 0, "{out}{err}");
    let canary = curl_with("demo/client", &["-H", "x-canary: true"], url);
    assert!(canary.contains("\"pod\":\"echo-2\""), "{canary}");

    // `istio.io/use-waypoint: none` on the Service takes effect live: connections go straight
    // to the pods (the pod sees the client's own address) and the canary rule no longer applies.
    let service = |label: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: echo, namespace: demo, labels: {{istio.io/use-waypoint: {label}}}}}\nspec:\n  selector: {{app: echo}}\n  ports: [{{name: http, port: 80, targetPort: 8080}}, {{name: tcp, port: 9000, targetPort: 9000}}]\n"
        )
    };
    assert_eq!(apply_yaml(dir.path(), "echo.yaml", &service("none")).0, 0);
    let client_ip = status["pods"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["pod"] == "demo/client")
        .unwrap()["ip"]
        .as_str()
        .unwrap()
        .to_string();
    eventually("traffic bypasses the waypoint", || {
        let body = curl("demo/client", url);
        body.contains(&format!("\"peer\":\"{client_ip}:"))
            .then_some(())
            .ok_or(body)
    });
    assert_eq!(
        apply_yaml(dir.path(), "echo.yaml", &service("waypoint")).0,
        0
    );
    eventually("traffic goes through the waypoint again", || {
        let body = curl_with("demo/client", &["-H", "x-canary: true"], url);
        (body.contains("\"pod\":\"echo-2\"")
            && body.contains(&format!("\"peer\":\"{waypoint_ip}:")))
        .then_some(())
        .ok_or(body)
    });

    // `istio.io/waypoint-for: all` and a pod bound with `istio.io/use-waypoint`: traffic to the
    // pod's own IP goes through the waypoint too, which forwards it to that pod and never
    // routes it (the canary header would send service traffic to v2).
    let echo_1 = status["pods"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["pod"] == "demo/echo-1")
        .unwrap()["ip"]
        .as_str()
        .unwrap()
        .to_string();
    let gateway = |labels: &str| {
        format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: waypoint, namespace: demo, labels: {{{labels}}}}}\nspec:\n  gatewayClassName: istio-waypoint\n  listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]\n"
        )
    };
    let pod = |labels: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: echo-1, namespace: demo, labels: {{app: echo, version: v1{labels}}}}}\nspec: {{nodeName: node-1, serviceAccountName: echo}}\n"
        )
    };
    assert_eq!(
        apply_yaml(
            dir.path(),
            "gw.yaml",
            &gateway("istio.io/waypoint-for: all")
        )
        .0,
        0
    );
    assert_eq!(
        apply_yaml(
            dir.path(),
            "pod.yaml",
            &pod(", istio.io/use-waypoint: waypoint")
        )
        .0,
        0
    );
    let direct = format!("http://{echo_1}:8080/");
    eventually("pod-addressed traffic goes through the waypoint", || {
        let body = curl_with("demo/client", &["-H", "x-canary: true"], &direct);
        (body.contains("\"pod\":\"echo-1\"")
            && body.contains(&format!("\"peer\":\"{waypoint_ip}:")))
        .then_some(())
        .ok_or(body)
    });
    assert_eq!(apply_yaml(dir.path(), "pod.yaml", &pod("")).0, 0);
    assert_eq!(apply_yaml(dir.path(), "gw.yaml", &gateway("")).0, 0);
    eventually("pod-addressed traffic goes direct again", || {
        let body = curl("demo/client", &direct);
        body.contains(&format!("\"peer\":\"{client_ip}:"))
            .then_some(())
            .ok_or(body)
    });
}

/// The VirtualService and DestinationRule of Istio's canary example, as written (issue 13), on
/// a `product-service` with a v1 and a v2 pod behind the demo's waypoint, plus a second v1 pod
/// that answers every request 503: the canary header always reaches v2, the rest splits 90/10,
/// and the three retries (with outlier detection) keep every answer a 200.
fn istio_canary_example_works_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let objects = r#"
apiVersion: v1
kind: Pod
metadata: {name: product-v1, namespace: demo, labels: {app: product-service, version: v1}}
spec: {nodeName: node-1, serviceAccountName: product}
---
apiVersion: v1
kind: Pod
metadata: {name: product-v1-broken, namespace: demo, labels: {app: product-service, version: v1}}
spec:
  nodeName: node-2
  serviceAccountName: product
  containers: [{name: app, env: [{name: ECHO_STATUS, value: "503"}]}]
---
apiVersion: v1
kind: Pod
metadata: {name: product-v2, namespace: demo, labels: {app: product-service, version: v2}}
spec: {nodeName: node-2, serviceAccountName: product}
---
apiVersion: v1
kind: Service
metadata: {name: product-service, namespace: demo, labels: {istio.io/use-waypoint: waypoint}}
spec:
  selector: {app: product-service}
  ports: [{name: http, port: 80, targetPort: 8080}]
"#;
    let objects = format!(
        "{objects}---\n{}",
        include_str!("../../fixtures/istio-canary.yaml").replace("NAMESPACE", "demo")
    );
    let (code, out, err) = apply_yaml(dir.path(), "canary.yaml", &objects);
    assert_eq!(code, 0, "{out}{err}");
    let url = "http://product-service.demo.svc.cluster.local/";
    eventually("the canary header reaches v2 through the waypoint", || {
        let body = curl_with("demo/client", &["-H", "x-canary: true"], url);
        body.contains("\"pod\":\"product-v2\"")
            .then_some(())
            .ok_or(body)
    });
    for _ in 0..5 {
        let body = curl_with("demo/client", &["-H", "x-canary: true"], url);
        assert!(body.contains("\"pod\":\"product-v2\""), "{body}");
    }
    // 90/10 between the subsets; the broken v1 pod's 503s are retried on the other one.
    let split = echo_call("demo/client", url, 200);
    assert_eq!(split["codes"]["200"], 200, "every answer is a 200: {split}");
    let v2 = split["pods"]["product-v2"].as_u64().unwrap_or(0);
    assert!((6..=40).contains(&v2), "v2 answered {v2} of 200: {split}");
    assert!(split["pods"].get("product-v1-broken").is_none(), "{split}");
}
