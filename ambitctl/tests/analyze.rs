//! `ambitctl analyze` as a user runs it: on files (text and JSON, the exit code for each
//! threshold) and against a cluster (the scripted API server, through a kubeconfig).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use ambit_fake_apiserver::{FakeApiServer, KindInfo};
use serde_json::{Value, json};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/analyze")
}

fn ambitctl(args: &[&str], kubeconfig: Option<&Path>) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_ambitctl"));
    command.arg("analyze").args(args);
    command.env_remove("KUBERNETES_SERVICE_HOST");
    if let Some(path) = kubeconfig {
        command.env("KUBECONFIG", path);
    }
    command.output().expect("running ambitctl")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).to_string()
}

#[test]
fn files_give_json_findings_and_the_exit_code_follows_the_threshold() {
    let dir = fixtures();
    let routes = dir.join("routes-unknown-refs.yaml");
    let routes = routes.to_str().unwrap();
    let output = ambitctl(&["-f", routes, "-o", "json"], None);
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let findings: Vec<Value> = serde_json::from_str(&stdout(&output)).unwrap();
    let subset = findings
        .iter()
        .find(|f| f["code"] == "AMB0308")
        .expect("the missing subset is reported");
    assert_eq!(subset["severity"], "Error");
    assert_eq!(subset["object"], "VirtualService demo/reviews");
    assert_eq!(subset["field"], "spec.http[0].route[1].destination.subset");
    assert_eq!(subset["istioCode"], "IST0101");
    assert!(subset["fix"].as_str().unwrap().contains("DestinationRule"));
    // The same lines as the corpus expects, in text.
    let text = ambitctl(&["-f", routes], None);
    let expected = std::fs::read_to_string(dir.join("routes-unknown-refs.expected")).unwrap();
    assert_eq!(stdout(&text), expected);
    assert!(
        String::from_utf8_lossy(&text.stderr).contains("12 errors, 3 warnings, 0 info"),
        "{text:?}"
    );

    // Only Info findings: fails at Info, passes at Warning and Error.
    let namespaces = dir.join("namespaces.yaml");
    let namespaces = namespaces.to_str().unwrap();
    for (threshold, code) in [("Info", 1), ("warning", 0), ("Error", 0)] {
        let output = ambitctl(&["-f", namespaces, "--failure-threshold", threshold], None);
        assert_eq!(output.status.code(), Some(code), "{threshold}: {output:?}");
        assert!(stdout(&output).contains("Info [AMB0601] Namespace plain"));
    }

    // A directory of good configuration: an empty array, exit 0.
    let good = dir.join("good");
    let output = ambitctl(&["-f", good.to_str().unwrap(), "-o", "json"], None);
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    assert_eq!(
        serde_json::from_str::<Vec<Value>>(&stdout(&output)).unwrap(),
        Vec::<Value>::new()
    );

    // Nothing analysed: exit 2, with the reason.
    for args in [
        vec!["-f", "/nonexistent/analyze"],
        vec!["-f", namespaces, "--failure-threshold", "fatal"],
        vec!["-f", namespaces, "-o", "yaml"],
    ] {
        let output = ambitctl(&args, None);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {output:?}");
        assert!(
            String::from_utf8_lossy(&output.stderr).starts_with("ambitctl analyze: "),
            "{output:?}"
        );
    }
}

fn kubeconfig(dir: &Path, server: &str) -> PathBuf {
    let path = dir.join("kubeconfig");
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: fake, cluster: {{server: \"{server}\"}}}}]\nusers: [{{name: nobody, user: {{}}}}]\ncontexts: [{{name: fake, context: {{cluster: fake, user: nobody}}}}]\ncurrent-context: fake\n"
        ),
    )
    .unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_is_listed_once_and_analysed_as_a_running_mesh() {
    let server = FakeApiServer::start().await;
    server.register(KindInfo::new(
        "networking.istio.io/v1",
        "VirtualService",
        "virtualservices",
        true,
    ));
    for object in [
        json!({"apiVersion": "v1", "kind": "Namespace",
               "metadata": {"name": "demo", "labels": {"istio.io/dataplane-mode": "ambient"}}}),
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": "web-0", "namespace": "demo", "labels": {"app": "web"}},
               "status": {"podIP": "10.0.0.7"}}),
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": "broken", "namespace": "demo"},
               "status": {"podIP": "10.0.0.300"}}),
        json!({"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": "web", "namespace": "demo",
                            "labels": {"istio.io/use-waypoint": "missing"}},
               "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80}]}}),
        json!({"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": "api", "namespace": "demo",
                            "labels": {"istio.io/use-waypoint": "pending"}},
               "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80}]}}),
        // Not yet given an address by its controller: in a running mesh that is reported.
        json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
               "metadata": {"name": "pending", "namespace": "demo"},
               "spec": {"gatewayClassName": "istio-waypoint"}}),
        json!({"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
               "metadata": {"name": "web", "namespace": "demo"},
               "spec": {"hosts": ["web"], "http": [{"route": [{"destination": {"host": "web", "subset": "v9"}}]}]}}),
    ] {
        server.apply(object);
    }
    let dir = tempfile::tempdir().unwrap();
    let config = kubeconfig(dir.path(), &server.url());
    let output =
        tokio::task::spawn_blocking(move || ambitctl(&["--cluster", "-o", "json"], Some(&config)))
            .await
            .unwrap();
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let findings: Vec<Value> = serde_json::from_str(&stdout(&output)).unwrap();
    let seen: Vec<(String, String)> = findings
        .iter()
        .map(|f| {
            (
                f["code"].as_str().unwrap().to_string(),
                f["object"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    for expected in [
        ("AMB0001", "Pod demo/broken"),
        ("AMB0101", "Service demo/web"),
        ("AMB0104", "Service demo/api"),
        ("AMB0308", "VirtualService demo/web"),
    ] {
        assert!(
            seen.contains(&(expected.0.to_string(), expected.1.to_string())),
            "{expected:?} missing from {seen:?}"
        );
    }
    let schema = findings.iter().find(|f| f["code"] == "AMB0001").unwrap();
    assert_eq!(schema["field"], "status.podIP");
    assert!(
        schema["message"]
            .as_str()
            .unwrap()
            .starts_with("Kubernetes: "),
        "{schema}"
    );
    // One list per kind, no more: the read is a snapshot.
    let lists = server
        .requests()
        .iter()
        .filter(|r| r.method == "GET" && r.path.ends_with("/pods") && !r.watch)
        .count();
    assert_eq!(lists, 1, "{:?}", server.requests());
}

#[test]
fn a_cluster_without_configuration_is_reported_as_not_analysed() {
    let output = ambitctl(&["--cluster"], Some(Path::new("/nonexistent/kubeconfig")));
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.starts_with("ambitctl analyze: "), "{stderr}");
    assert!(stderr.contains("Kubernetes configuration"), "{stderr}");
}
