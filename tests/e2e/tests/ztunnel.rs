//! ztunnel end to end: two simulated nodes, the real ztunnel, cni-agent, CNI plugin and echo
//! binaries as separate processes, pods captured by the real redirection. Needs root.

use std::net::IpAddr;
use std::process::Command;
use std::time::Duration;

use ambit_e2e::{Cluster, PodSpec, long_connection, summary, wait_until};

const CLIENT: PodSpec = PodSpec {
    namespace: "demo",
    name: "client",
    service_account: "client",
    node: 0,
    app: "client",
};
const OTHER: PodSpec = PodSpec {
    namespace: "demo",
    name: "other",
    service_account: "other",
    node: 0,
    app: "other",
};
const ECHO: PodSpec = PodSpec {
    namespace: "demo",
    name: "echo-2",
    service_account: "echo",
    node: 1,
    app: "echo",
};
const OUTSIDER: PodSpec = PodSpec {
    namespace: "legacy",
    name: "outsider",
    service_account: "default",
    node: 0,
    app: "outsider",
};
const VIP: &str = "10.96.0.10";

fn ztunnel_config(pods: &[(PodSpec, IpAddr)], policies: &str) -> String {
    let mut out = String::from("workloads:\n");
    for (pod, ip) in pods {
        let captured = pod.namespace == "demo";
        out.push_str(&format!(
            "- name: {}\n  namespace: {}\n  serviceAccount: {}\n  addresses: [{ip}]\n  node: node-{}\n  protocol: {}\n  canonicalName: {}\n  canonicalRevision: v1\n",
            pod.name, pod.namespace, pod.service_account, pod.node + 1, if captured { "HBONE" } else { "TCP" }, pod.app
        ));
        if pod.app == "echo" {
            out.push_str(
                "  services:\n    demo/echo.demo.svc.cluster.local: {80: 8080, 9000: 9000}\n",
            );
        }
    }
    out.push_str(&format!("services:\n- name: echo\n  namespace: demo\n  vips: [{VIP}]\n  ports: {{80: 8080, 9000: 9000}}\n"));
    out.push_str(policies);
    out
}

fn call(cluster: &Cluster, from: &PodSpec, url: &str) -> serde_json::Value {
    let (_, out, err) = cluster.echo(
        from.namespace,
        from.name,
        &["call", url, "-n", "2", "--timeout-ms", "3000"],
    );
    let s = summary(&out);
    assert!(!s.is_null(), "echo call printed nothing: {err}");
    s
}

fn ok_from(s: &serde_json::Value, pod: &str) -> bool {
    s["codes"]["200"] == 2 && s["pods"][pod] == 2
}

#[test]
fn two_nodes_mesh_traffic_policy_strict_drain_and_encryption() {
    let mut cluster = Cluster::start(
        "azt-",
        2,
        &[("DRAIN_DEADLINE", "2s".into()), ("SECRET_TTL", "6s".into())],
    )
    .expect("cluster");
    let pods = [CLIENT, OTHER, ECHO, OUTSIDER];
    cluster.write_objects(&["demo"], &pods);
    let mut addresses = Vec::new();
    for pod in &pods {
        let ip = cluster.add_pod(pod).expect("pod");
        addresses.push((pod.clone(), ip));
    }
    let ip_of = |name: &str| addresses.iter().find(|(p, _)| p.name == name).unwrap().1;
    std::fs::write(&cluster.ztunnel_config, ztunnel_config(&addresses, "")).unwrap();
    cluster.wait_ready();

    // Pod to pod across nodes, via the service VIP and via the pod IP; the app sees the client.
    wait_until("service reachable", Duration::from_secs(20), || {
        ok_from(
            &call(&cluster, &CLIENT, &format!("http://{VIP}/")),
            "echo-2",
        )
    });
    let (_, out, _) = cluster.echo(
        "demo",
        "client",
        &[
            "tcp",
            &format!("{VIP}:9000"),
            "--send",
            "bytes-intact-0123456789",
        ],
    );
    let mut lines = out.lines();
    let greeting: serde_json::Value = serde_json::from_str(lines.next().unwrap_or("null")).unwrap();
    assert_eq!(greeting["pod"], "echo-2");
    assert!(
        greeting["peer"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{}:", ip_of("client"))),
        "server sees the client's own address: {greeting}"
    );
    assert_eq!(lines.next(), Some("bytes-intact-0123456789"));
    assert!(ok_from(
        &call(
            &cluster,
            &CLIENT,
            &format!("http://{}:8080/", ip_of("echo-2"))
        ),
        "echo-2"
    ));

    // Metrics on both nodes name both workloads.
    let src = cluster.metric(
        0,
        "istio_tcp_connections_opened_total",
        &[
            "reporter=\"source\"",
            "source_workload=\"client\"",
            "destination_workload=\"echo-2\"",
        ],
    );
    let dst = cluster.metric(
        1,
        "istio_tcp_connections_opened_total",
        &[
            "reporter=\"destination\"",
            "source_principal=\"spiffe://cluster.local/ns/demo/sa/client\"",
            "connection_security_policy=\"mutual_tls\"",
        ],
    );
    assert!(src >= 1.0 && dst >= 1.0, "source {src}, destination {dst}");

    // The link between the nodes carries no plaintext: capture on node 2's uplink while sending a
    // marker; as a control, the uncaptured outsider's plaintext marker is visible.
    let node2 = cluster.topology.nodes[1].netns.clone();
    let capture =
        std::path::PathBuf::from(format!("{}/capture.txt", cluster.topology.dir.display()));
    let mut tcpdump = Command::new("ip")
        .args([
            "netns", "exec", &node2, "tcpdump", "-i", "eth0", "-l", "-A", "-n", "-U", "tcp",
        ])
        .stdout(std::fs::File::create(&capture).unwrap())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("tcpdump (apt-get install tcpdump)");
    std::thread::sleep(Duration::from_millis(700));
    cluster.echo(
        "demo",
        "client",
        &[
            "tcp",
            &format!("{VIP}:9000"),
            "--send",
            "SECRET-MARKER-MESH",
        ],
    );
    cluster.echo(
        "legacy",
        "outsider",
        &[
            "tcp",
            &format!("{}:9000", ip_of("echo-2")),
            "--send",
            "PLAIN-MARKER-OUTSIDE",
        ],
    );
    std::thread::sleep(Duration::from_millis(700));
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(tcpdump.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    );
    let _ = tcpdump.wait();
    let captured = std::fs::read_to_string(&capture).unwrap_or_default();
    assert!(
        captured.contains("PLAIN-MARKER-OUTSIDE"),
        "the capture works (control marker seen)"
    );
    assert!(
        !captured.contains("SECRET-MARKER-MESH"),
        "mesh traffic is encrypted on the wire"
    );

    // PERMISSIVE admits the non-mesh client; STRICT refuses it.
    assert!(ok_from(
        &call(
            &cluster,
            &OUTSIDER,
            &format!("http://{}:8080/", ip_of("echo-2"))
        ),
        "echo-2"
    ));
    let strict = "policies:\n- name: istio_converted_static_strict\n  namespace: demo\n  action: Deny\n  rules:\n  - - - notPrincipals: [\"*\"]\n";
    std::fs::write(&cluster.ztunnel_config, ztunnel_config(&addresses, strict)).unwrap();
    wait_until("STRICT applied", Duration::from_secs(10), || {
        call(
            &cluster,
            &OUTSIDER,
            &format!("http://{}:8080/", ip_of("echo-2")),
        )["codes"]["200"]
            .is_null()
    });
    assert!(
        ok_from(
            &call(&cluster, &CLIENT, &format!("http://{VIP}/")),
            "echo-2"
        ),
        "mesh traffic still flows under STRICT"
    );

    // ALLOW by principal and port; DENY by namespace.
    let allow = "policies:\n- name: echo-allow\n  namespace: demo\n  rules:\n  - - - principals: [cluster.local/ns/demo/sa/client]\n        destinationPorts: [8080]\n";
    std::fs::write(&cluster.ztunnel_config, ztunnel_config(&addresses, allow)).unwrap();
    wait_until("ALLOW applied", Duration::from_secs(10), || {
        call(&cluster, &OTHER, &format!("http://{VIP}/"))["codes"]["200"].is_null()
    });
    assert!(
        ok_from(
            &call(&cluster, &CLIENT, &format!("http://{VIP}/")),
            "echo-2"
        ),
        "the allowed principal passes"
    );
    let (code, _, _) = cluster.echo(
        "demo",
        "client",
        &["tcp", &format!("{VIP}:9000"), "--timeout-ms", "2000"],
    );
    assert_ne!(code, 0, "port 9000 is not in the ALLOW rule");
    let deny = "policies:\n- name: deny-demo\n  namespace: demo\n  action: Deny\n  rules:\n  - - - namespaces: [demo]\n";
    std::fs::write(&cluster.ztunnel_config, ztunnel_config(&addresses, deny)).unwrap();
    wait_until("DENY applied", Duration::from_secs(10), || {
        call(&cluster, &CLIENT, &format!("http://{VIP}/"))["codes"]["200"].is_null()
    });
    std::fs::write(&cluster.ztunnel_config, ztunnel_config(&addresses, "")).unwrap();
    wait_until("policies cleared", Duration::from_secs(10), || {
        ok_from(
            &call(&cluster, &CLIENT, &format!("http://{VIP}/")),
            "echo-2",
        )
    });

    let (_, dump) = cluster.node_http(1, 15020, "/metrics");
    assert!(
        dump.contains("workload_manager_active_proxy_count 1"),
        "node 2 serves one pod"
    );

    // Certificates rotate (SECRET_TTL=6s refreshes every ~3s) under an open connection.
    let first_dump = admin_dump(&cluster, 1);
    let long = std::thread::spawn({
        let netns = cluster
            .topology
            .pod("demo", "client")
            .unwrap()
            .netns
            .clone();
        let target = format!("{VIP}:9000");
        move || long_connection(&netns, &target, Duration::from_secs(8))
    });
    wait_until("certificate rotated", Duration::from_secs(15), || {
        admin_dump(&cluster, 1) != first_dump
    });
    assert_eq!(
        long.join().unwrap(),
        Ok(()),
        "the connection survived rotation"
    );

    // A pod removed mid-connection drains: the open connection keeps working until the deadline,
    // then is closed.
    let drained = std::thread::spawn({
        let netns = cluster
            .topology
            .pod("demo", "client")
            .unwrap()
            .netns
            .clone();
        let target = format!("{VIP}:9000");
        move || long_connection(&netns, &target, Duration::from_secs(12))
    });
    std::thread::sleep(Duration::from_secs(1));
    cluster.delete_pod("demo", "echo-2");
    let result = drained.join().unwrap();
    assert!(
        result.is_err(),
        "the connection to a removed pod ends (drain deadline): {result:?}"
    );
}

/// The certificate section of node `i`'s config dump (through the node namespace's loopback).
fn admin_dump(cluster: &Cluster, i: usize) -> String {
    let netns = &cluster.topology.nodes[i].netns;
    let (_, out, _) = cluster.topology.exec(
        netns,
        std::path::Path::new("/usr/bin/curl"),
        &["-s", "-m", "3", "http://127.0.0.1:15000/config_dump"],
    );
    let dump: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
    assert!(!out.contains("PRIVATE KEY"), "config dumps never show keys");
    dump["certificates"].to_string()
}
