//! `ambitctl lab` at scale: a Deployment's `spec.replicas` is honoured (200 pods over 4 nodes,
//! every one captured and reachable through its Service), long work shows progress, and what
//! does not fit is refused by name with the limit, changing nothing. Needs root.

use ambit_e2e::{ambitctl_lab, binary};

const PREFIX: &str = "ambit-ls-";
const DIR: &str = "/run/ambit-lab-scale";

fn ambitctl(args: &[&str]) -> (i32, String, String) {
    ambitctl_lab(PREFIX, DIR, args)
}

struct Down;
impl Drop for Down {
    fn drop(&mut self) {
        let _ = ambitctl(&["lab", "down"]);
    }
}

fn deployment(name: &str, replicas: u32) -> String {
    format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: {name}, namespace: scale}}\nspec:\n  replicas: {replicas}\n  selector: {{matchLabels: {{app: {name}}}}}\n  template:\n    metadata: {{labels: {{app: {name}}}}}\n    spec: {{serviceAccountName: {name}}}\n"
    )
}

fn pods(status: &serde_json::Value, prefix: &str) -> Vec<serde_json::Value> {
    status["pods"]
        .as_array()
        .expect("status lists pods")
        .iter()
        .filter(|p| p["pod"].as_str().is_some_and(|n| n.starts_with(prefix)))
        .cloned()
        .collect()
}

fn status() -> serde_json::Value {
    let (code, out, err) = ambitctl(&["lab", "status", "--json"]);
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(&out).expect("status --json is JSON")
}

#[test]
fn two_hundred_replicas_on_four_nodes_are_all_made_captured_and_reachable() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the lab needs root; run sudo scripts/test"
    );
    let _ = ambitctl(&["lab", "down"]);
    let _down = Down;
    let config = tempfile::tempdir().unwrap();
    std::fs::write(
        config.path().join("scale.yaml"),
        format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: scale, labels: {{istio.io/dataplane-mode: ambient}}}}\n---\n{}---\napiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: scale}}\nspec:\n  selector: {{app: web}}\n  ports: [{{name: http, port: 80, targetPort: 8080}}]\n---\napiVersion: v1\nkind: Pod\nmetadata: {{name: client, namespace: scale}}\nspec: {{serviceAccountName: client}}\n",
            deployment("web", 200)
        ),
    )
    .unwrap();
    let (code, out, err) = ambitctl(&[
        "lab",
        "up",
        "--nodes",
        "4",
        "--config",
        config.path().to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "lab up failed:\n{out}\n{err}");
    // 201 pods are too many to list one by one: the count moves instead, and ends complete.
    assert!(err.contains("creating pods: 0/201"), "{err}");
    assert!(err.contains("creating pods: 201/201"), "{err}");
    assert!(!err.contains("creating pod scale/web-"), "{err}");

    let status = status();
    let web = pods(&status, "scale/web-");
    assert_eq!(web.len(), 200, "every replica is made");
    assert!(
        web.iter().all(|p| p["captured"] == true),
        "every replica is captured: {:?}",
        web.iter()
            .filter(|p| p["captured"] != true)
            .map(|p| p["pod"].clone())
            .collect::<Vec<_>>()
    );
    for node in 1..=4 {
        let on_node = web
            .iter()
            .filter(|p| p["node"] == format!("node-{node}"))
            .count();
        assert_eq!(on_node, 50, "node-{node} runs a quarter of them");
    }

    // Calls through the Service reach many different replicas across the nodes.
    let echo = binary("ambit-echo");
    let (code, out, err) = ambitctl(&[
        "lab",
        "exec",
        "scale/client",
        "--",
        echo.to_str().unwrap(),
        "call",
        "http://web.scale.svc.cluster.local/",
        "-n",
        "100",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let summary: serde_json::Value =
        serde_json::from_str(out.trim()).expect("call prints a summary");
    assert_eq!(summary["codes"]["200"], 100, "{summary}");
    let answered = summary["pods"].as_object().map_or(0, |p| p.len());
    assert!(
        answered >= 30,
        "100 calls reached {answered} replicas: {summary}"
    );

    // What does not fit is refused by name with the limit, and nothing is made.
    let too_many = tempfile::tempdir().unwrap();
    let file = too_many.path().join("huge.yaml");
    std::fs::write(&file, deployment("huge", 900)).unwrap();
    let (code, out, err) = ambitctl(&["lab", "apply", "-f", file.to_str().unwrap()]);
    assert_ne!(code, 0, "{out}");
    assert!(
        err.contains("Deployment scale/huge: spec.replicas asks for 900 pods")
            && err.contains("at most 253")
            && err.contains("1012 on 4 nodes"),
        "{err}"
    );
    assert!(pods(&self::status(), "scale/huge-").is_empty());

    // More replicas later: applied with progress, and they join the Service.
    std::fs::write(&file, deployment("more", 30)).unwrap();
    let (code, out, err) = ambitctl(&["lab", "apply", "-f", file.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(err.contains("creating pods: 30/30"), "{err}");
    assert_eq!(pods(&self::status(), "scale/more-").len(), 30);

    let (code, out, _) = ambitctl(&["lab", "down"]);
    assert_eq!(code, 0, "{out}");
    assert!(!std::path::Path::new(DIR).exists());
}
