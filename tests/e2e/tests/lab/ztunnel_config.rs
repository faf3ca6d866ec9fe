//! The lab test's checks of `ambitctl ztunnel-config` (called from the demo test in `lab.rs`):
//! istioctl's tables read from every node's ztunnel, and a long connection opened here listed
//! with its peer identity while it is open.

use std::time::Duration;

use serde_json::Value;

/// Runs `ambitctl ztunnel-config <args>`, asserting it succeeds; returns the rows, each split on
/// whitespace (no cell the checks read contains a space).
fn table(args: &[&str]) -> Vec<Vec<String>> {
    let mut full = vec!["ztunnel-config"];
    full.extend_from_slice(args);
    let (code, out, err) = super::ambitctl(&full);
    assert_eq!(code, 0, "ambitctl {}: {out}{err}", full.join(" "));
    out.lines()
        .map(|l| l.split_whitespace().map(str::to_string).collect())
        .collect()
}

fn text(v: &Value) -> String {
    v.as_str().unwrap_or_default().to_string()
}

/// Checks `ambitctl ztunnel-config` against the running demo lab.
pub(crate) fn check(_status: &Value) {
    // Pods come and go earlier in the test: read what the lab runs now.
    let status = &super::status();
    let pods: Vec<&Value> = status["pods"].as_array().unwrap().iter().collect();
    let nodes: Vec<String> = status["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| text(&n["name"]))
        .collect();

    // Workloads: every demo pod once, with its address, node and protocol, and the WAYPOINT column.
    let rows = table(&["workloads"]);
    assert_eq!(
        rows[0].join(" "),
        "NAMESPACE POD NAME ADDRESS NODE WAYPOINT PROTOCOL",
        "{rows:?}"
    );
    for pod in &pods {
        let name = text(&pod["pod"]);
        let (ns, pod_name) = name.split_once('/').unwrap();
        let found: Vec<&Vec<String>> = rows
            .iter()
            .filter(|r| r[0] == ns && r[1] == pod_name)
            .collect();
        assert_eq!(found.len(), 1, "{name} listed once: {rows:?}");
        let row = found[0];
        assert_eq!(row.len(), 6, "{row:?}");
        assert_eq!(row[2], text(&pod["ip"]), "{name}'s address: {row:?}");
        assert_eq!(row[3], text(&pod["node"]), "{name}'s node: {row:?}");
        let protocol = if pod["ambient"] == true {
            "HBONE"
        } else {
            "TCP"
        };
        assert_eq!(row[5], protocol, "{name}'s protocol: {row:?}");
    }

    // Services: echo with its VIP, behind the demo's waypoint, with its two endpoints.
    let rows = table(&["services"]);
    assert_eq!(
        rows[0].join(" "),
        "NAMESPACE SERVICE NAME SERVICE VIP WAYPOINT ENDPOINTS",
        "{rows:?}"
    );
    let echo_vip = status["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["service"] == "demo/echo")
        .map(|s| text(&s["vip"]))
        .unwrap();
    let echo = rows
        .iter()
        .find(|r| r[0] == "demo" && r[1] == "echo")
        .unwrap_or_else(|| panic!("no demo/echo service: {rows:?}"));
    assert_eq!(echo[2], echo_vip, "{echo:?}");
    assert!(echo[3].contains("waypoint"), "echo's waypoint: {echo:?}");
    assert_eq!(echo[4], "2/2", "echo's endpoints: {echo:?}");
    let v1 = rows
        .iter()
        .find(|r| r[0] == "demo" && r[1] == "echo-v1")
        .unwrap_or_else(|| panic!("no demo/echo-v1 service: {rows:?}"));
    assert_eq!(v1[3], "None", "echo-v1 has no waypoint: {v1:?}");

    // Policies: the demo's L4 policy on echo's pods.
    let rows = table(&["policies"]);
    assert_eq!(
        rows[0].join(" "),
        "NAMESPACE POLICY NAME ACTION SCOPE",
        "{rows:?}"
    );
    assert!(
        rows.iter()
            .any(|r| r.join(" ") == "demo echo-allow-client Allow WorkloadSelector"),
        "{rows:?}"
    );

    // Certificates: on each node, a valid SPIFFE leaf for every captured pod it runs.
    let rows = table(&["certificates"]);
    assert_eq!(
        rows[0][0], "NODE",
        "several nodes add a NODE column: {rows:?}"
    );
    for pod in pods.iter().filter(|p| p["captured"] == true) {
        let (node, identity) = (text(&pod["node"]), text(&pod["identity"]));
        assert!(
            identity.starts_with("spiffe://cluster.local/ns/"),
            "{identity}"
        );
        assert!(
            rows.iter().any(|r| r.len() == 8
                && r[0] == node
                && r[1] == identity
                && r[2] == "Leaf"
                && r[3] == "Available"
                && r[4] == "true"),
            "{}: no valid leaf for {identity} on {node}: {rows:?}",
            text(&pod["pod"])
        );
    }
    assert!(
        rows.iter().any(|r| r.get(2).is_some_and(|t| t == "Root")),
        "the trust roots are listed: {rows:?}"
    );

    // Connections: a long connection from demo/client to echo's TCP port (server-first) on the
    // service VIP, through the demo's waypoint (the test's DENY on the client's identity stops
    // pod-addressed connections from it by now): the client's outbound leg to the waypoint and an
    // echo pod's inbound leg from it, each with the peer's identity.
    let pod = |name: &str| *pods.iter().find(|p| p["pod"] == name).unwrap();
    let client = pod("demo/client");
    let waypoint = pods
        .iter()
        .find(|p| text(&p["pod"]).starts_with("demo/waypoint"))
        .unwrap_or_else(|| panic!("no waypoint pod in {pods:?}"));
    let client_node = text(&client["node"]);
    assert!(nodes.contains(&client_node), "{nodes:?}");
    let target = format!("{echo_vip}:9000");
    let long = {
        let netns = text(&client["netns"]);
        let target = target.clone();
        std::thread::spawn(move || {
            ambit_e2e::long_connection(&netns, &target, Duration::from_secs(8))
        })
    };
    let head =
        "NODE WORKLOAD DIRECTION LOCAL REMOTE REMOTE TARGET PROTOCOL PEER IDENTITY SENT RECEIVED";
    let waypoint_identity = text(&waypoint["identity"]);
    super::eventually(
        "ambitctl ztunnel-config connections lists the connection",
        || {
            let rows = table(&["connections"]);
            if rows.first().map(|r| r.join(" ")).as_deref() != Some(head) {
                return Err(format!("header: {rows:?}"));
            }
            let outbound = rows.iter().find(|r| {
                r[0] == client_node
                    && r[1] == "client.demo"
                    && r[2] == "Outbound"
                    && r.get(5) == Some(&target)
            });
            let Some(outbound) = outbound else {
                return Err(format!("no outbound row to {target}: {rows:?}"));
            };
            if outbound.get(6).map(String::as_str) != Some("HBONE")
                || outbound.get(7) != Some(&waypoint_identity)
            {
                return Err(format!("outbound row: {outbound:?}"));
            }
            if outbound
                .get(8)
                .and_then(|b| b.parse::<u64>().ok())
                .unwrap_or(0)
                == 0
            {
                return Err(format!("no bytes sent yet: {outbound:?}"));
            }
            // The inbound leg: echo's port on one of its pods, from the waypoint (its REMOTE
            // TARGET may be empty, so the row is matched by its cells, not their positions).
            let inbound = rows.iter().any(|r| {
                r[1].starts_with("echo-")
                    && r[2] == "Inbound"
                    && r[3].ends_with(":9000")
                    && r.contains(&waypoint_identity)
            });
            if !inbound {
                return Err(format!(
                    "no inbound row on an echo pod from the waypoint: {rows:?}"
                ));
            }
            Ok(())
        },
    );
    assert_eq!(long.join().unwrap(), Ok(()), "the long connection");

    // -o json: the section as the dump has it, upstream's field names.
    let (code, out, err) = super::ambitctl(&[
        "ztunnel-config",
        "workloads",
        "--node",
        &client_node,
        "-o",
        "json",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let workloads: Value = serde_json::from_str(&out).expect("-o json prints JSON");
    let listed = workloads
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["namespace"] == "demo" && w["name"] == "client")
        .unwrap_or_else(|| panic!("{workloads:#}"));
    assert_eq!(listed["workloadIps"][0], client["ip"]);
    assert!(listed["uid"].is_string(), "{listed}");

    // A node that does not exist is named in the error.
    let (code, _, err) = super::ambitctl(&["ztunnel-config", "workloads", "--node", "node-9"]);
    assert_ne!(code, 0);
    assert!(err.contains("node-9"), "{err}");
}
