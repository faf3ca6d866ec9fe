//! ambit-echo's gRPC service answered to a gRPC client nobody here wrote: Debian's
//! `python3-grpcio` (installed by scripts/test), with protobuf bytes encoded by hand.

mod support;

use std::path::Path;
use std::process::Command;

use serde_json::Value;
use support::Echo;

/// Debian's interpreter, which python3-grpcio installs into (a `python3` earlier on PATH, e.g.
/// from pyenv, may not see it).
const PYTHON: &str = "/usr/bin/python3";

#[test]
fn grpcio_calls_health_and_echo() {
    assert!(
        Path::new(PYTHON).exists(),
        "{PYTHON} is missing: install python3-grpcio (apt-get install python3-grpcio; scripts/test does)"
    );
    let echo = Echo::start(&[]);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/grpc_client.py");
    let output = Command::new(PYTHON)
        .arg(script)
        .arg(echo.addr.to_string())
        .env_remove("http_proxy")
        .env_remove("https_proxy")
        .env_remove("grpc_proxy")
        .output()
        .expect("python3 runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !stderr.contains("No module named 'grpc'"),
        "python3-grpcio is missing: apt-get install python3-grpcio (scripts/test does)"
    );
    assert!(output.status.success(), "the gRPC client failed: {stderr}");
    let seen: Value = serde_json::from_slice(&output.stdout).expect("JSON from the client");

    // HealthCheckResponse{status: SERVING}: field 1, varint 1.
    assert_eq!(seen["health_raw"], "0801");
    assert_eq!(seen["health_status"], 1);

    let e = &seen["echo"];
    assert_eq!(e["message"], "hello from python");
    assert_eq!(e["pod"], "echo-test");
    assert_eq!(e["namespace"], "testns");
    assert_eq!(e["version"], "v7");
    assert_eq!(e["node"], "node-test");
    assert!(e["peer"].as_str().unwrap().starts_with("127.0.0.1:"), "{e}");
    assert_eq!(e["metadata"]["x-test-marker"], "m1", "{e}");

    assert_eq!(seen["asked_status"], "NOT_FOUND", "{seen}");
    assert!(
        seen["asked_details"]
            .as_str()
            .unwrap()
            .contains("x-echo-grpc-status"),
        "{seen}"
    );
    assert_eq!(seen["unknown_method"], "UNIMPLEMENTED", "{seen}");
}
