//! A Python for the tests that need OpenTelemetry's OTLP message types: a venv with
//! `opentelemetry-proto` (the OpenTelemetry project's protobuf types, from PyPI) and `oteltap` (a
//! third-party OTLP/HTTP receiver), made the first time. Included with `#[path]` by the test
//! crates that use it (the waypoint's proxy tests, the lab test's collector), which share the venv.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The venv's `python` under `venv` (a directory of the target dir), made and filled if needed.
pub(crate) fn otlp_python(venv: &Path) -> PathBuf {
    let python = venv.join("bin/python");
    let ready = |python: &Path| {
        Command::new(python)
            .args([
                "-c",
                "import opentelemetry.proto.collector.trace.v1.trace_service_pb2, oteltap",
            ])
            .status()
            .is_ok_and(|s| s.success())
    };
    if !ready(&python) {
        let made = Command::new("python3")
            .args(["-m", "venv"])
            .arg(venv)
            .status()
            .expect("python3 runs");
        assert!(made.success(), "python3 -m venv {}", venv.display());
        let installed = Command::new(venv.join("bin/pip"))
            .args([
                "install",
                "-q",
                "--disable-pip-version-check",
                "opentelemetry-proto==1.45.2",
                "oteltap==1.0.0",
            ])
            .status()
            .expect("pip runs");
        assert!(
            installed.success(),
            "pip install opentelemetry-proto oteltap"
        );
        assert!(
            ready(&python),
            "opentelemetry-proto and oteltap importable after install"
        );
    }
    python
}
