//! The agent binary's command line: Kubernetes mode and the lab's config directory exclude each
//! other, Kubernetes-only flags need `--kubernetes`, and a bad API server URL is named. None of
//! these reach the point of touching the node.

use std::process::Command;

fn agent(args: &[&str]) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let out = Command::new(env!("CARGO_BIN_EXE_cni-agent"))
        .env_remove("NODE_NAME")
        .args(["run", "--node", "node-1", "--state-dir"])
        .arg(&state)
        .args(args)
        .output()
        .unwrap();
    assert!(!state.exists(), "a refused command line touches nothing");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[test]
fn kubernetes_mode_and_the_config_directory_exclude_each_other() {
    let (status, stderr) = agent(&["--kubernetes", "--config-dir", "/nonexistent"]);
    assert_eq!(status, 2, "{stderr}");
    assert!(
        stderr.contains("--kubernetes") && stderr.contains("--config-dir"),
        "{stderr}"
    );
    assert!(stderr.contains("cannot be used with"), "{stderr}");
}

#[test]
fn kubernetes_flags_need_kubernetes_mode() {
    for flag in ["--kubeconfig", "--kube-url"] {
        let (status, stderr) = agent(&[flag, "x"]);
        assert_eq!(status, 2, "{stderr}");
        assert!(stderr.contains("--kubernetes"), "{flag}: {stderr}");
    }
}

#[test]
fn a_bad_api_server_url_is_named() {
    let (status, stderr) = agent(&["--kubernetes", "--kube-url", "not a url"]);
    assert_eq!(status, 1, "{stderr}");
    assert!(stderr.contains("--kube-url \"not a url\""), "{stderr}");
}
