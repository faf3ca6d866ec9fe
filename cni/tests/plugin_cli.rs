//! The plugin binary invoked exactly as a container runtime does: CNI_* environment, network
//! configuration on stdin, result or error JSON on stdout, exit status.

use std::io::Write;
use std::process::{Command, Stdio};

use serde_json::{Value, json};

struct Run {
    status: i32,
    stdout: Value,
    raw: String,
}

fn plugin(env: &[(&str, &str)], stdin: &str) -> Run {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ambit-cni"))
        .env_clear()
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let raw = String::from_utf8(out.stdout).unwrap();
    Run {
        status: out.status.code().unwrap(),
        stdout: if raw.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&raw).unwrap()
        },
        raw,
    }
}

fn conf(dir: &tempfile::TempDir, extra: Value) -> String {
    let mut conf = json!({
        "cniVersion": "1.0.0",
        "name": "podnet",
        "type": "ambit-cni",
        "agentSocket": dir.path().join("agent.sock"),
        "enrollmentFile": dir.path().join("enrollment.json"),
        "pendingDir": dir.path().join("pending"),
        "prevResult": {
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "eth0", "sandbox": "/var/run/netns/x"}],
            "ips": [{"address": "10.22.0.5/24", "interface": 0}]
        }
    });
    for (k, v) in extra.as_object().unwrap() {
        conf[k] = v.clone();
    }
    conf.to_string()
}

fn add_env(args: &str) -> Vec<(&str, &str)> {
    vec![
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "c0ffee"),
        ("CNI_NETNS", "/var/run/netns/x"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/opt/cni/bin"),
        ("CNI_ARGS", args),
    ]
}

#[test]
fn version_lists_the_supported_versions() {
    let run = plugin(&[("CNI_COMMAND", "VERSION")], "{\"cniVersion\":\"1.0.0\"}");
    assert_eq!(run.status, 0);
    assert_eq!(run.stdout["cniVersion"], "1.0.0");
    let versions = run.stdout["supportedVersions"].as_array().unwrap();
    assert!(versions.contains(&json!("1.0.0")) && versions.contains(&json!("0.4.0")));
}

#[test]
fn bad_input_gets_spec_shaped_errors() {
    let dir = tempfile::tempdir().unwrap();
    type Case<'a> = (Vec<(&'a str, &'a str)>, String, u64, &'a str);
    let cases: Vec<Case<'_>> = vec![
        (
            add_env(""),
            "{\"cniVersion\":\"1.0.0\",".into(),
            6,
            "cannot decode the network configuration",
        ),
        (
            add_env(""),
            String::new(),
            6,
            "empty network configuration on stdin",
        ),
        (
            add_env(""),
            conf(&dir, json!({"cniVersion": "9.9.9"})),
            1,
            "unsupported cniVersion \"9.9.9\"",
        ),
        (
            add_env(""),
            conf(&dir, json!({"prevResult": null})),
            7,
            "ambit-cni must be chained after an interface plugin",
        ),
        (
            vec![("CNI_COMMAND", "FROB")],
            conf(&dir, json!({})),
            4,
            "unknown CNI_COMMAND \"FROB\"",
        ),
        (
            vec![("CNI_COMMAND", "ADD")],
            conf(&dir, json!({})),
            4,
            "CNI_CONTAINERID is not set",
        ),
    ];
    for (env, stdin, code, msg) in cases {
        let run = plugin(&env, &stdin);
        assert_eq!(run.status, 1, "{}", run.raw);
        assert_eq!(run.stdout["code"], code, "{}", run.raw);
        assert_eq!(run.stdout["msg"], msg, "{}", run.raw);
        assert!(run.stdout["cniVersion"].is_string());
    }
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "nothing written on errors"
    );
}

#[test]
fn without_the_agent_non_ambient_pods_pass_and_ambient_pods_fail_clearly_or_queue() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("enrollment.json"),
        r#"{"ambientNamespaces":["demo"],"ambientPods":[],"optedOutPods":["demo/tool"]}"#,
    )
    .unwrap();
    let stdin = conf(&dir, json!({}));
    let prev: Value = serde_json::from_str::<Value>(&stdin).unwrap()["prevResult"].clone();

    // Not ambient: prevResult passes through unchanged.
    let run = plugin(
        &add_env("K8S_POD_NAMESPACE=legacy;K8S_POD_NAME=client"),
        &stdin,
    );
    assert_eq!((run.status, &run.stdout), (0, &prev));
    let run = plugin(&add_env("K8S_POD_NAMESPACE=demo;K8S_POD_NAME=tool"), &stdin);
    assert_eq!((run.status, &run.stdout), (0, &prev), "opted-out pod");
    // Not a Kubernetes pod at all.
    let run = plugin(&add_env(""), &stdin);
    assert_eq!((run.status, &run.stdout), (0, &prev));

    // Ambient and fail-closed (the default): a clear, retryable error.
    let run = plugin(
        &add_env("K8S_POD_NAMESPACE=demo;K8S_POD_NAME=client"),
        &stdin,
    );
    assert_eq!(run.status, 1);
    assert_eq!(run.stdout["code"], 11);
    assert_eq!(
        run.stdout["msg"],
        "pod demo/client is ambient but the Ambit node agent is unreachable"
    );
    assert!(
        run.stdout["details"]
            .as_str()
            .unwrap()
            .contains("agent.sock")
    );

    // Ambient and fail-open: starts, queued for the agent.
    let open = conf(&dir, json!({"failClosed": false}));
    let run = plugin(
        &add_env("K8S_POD_NAMESPACE=demo;K8S_POD_NAME=client"),
        &open,
    );
    assert_eq!((run.status, &run.stdout), (0, &prev));
    let queued: Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("pending/c0ffee.json")).unwrap())
            .unwrap();
    assert_eq!(queued["podName"], "client");
    assert_eq!(queued["ips"], json!(["10.22.0.5"]));

    // DEL always succeeds and prints nothing.
    let mut del = add_env("K8S_POD_NAMESPACE=demo;K8S_POD_NAME=client");
    del[0] = ("CNI_COMMAND", "DEL");
    let run = plugin(&del, &stdin);
    assert_eq!((run.status, run.raw.as_str()), (0, ""));

    // STATUS reports the agent as unavailable.
    let run = plugin(&[("CNI_COMMAND", "STATUS")], &stdin);
    assert_eq!(run.status, 1);
    assert_eq!(run.stdout["code"], 50);
}
