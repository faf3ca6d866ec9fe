//! The lab's trace collector: an OTLP/HTTP receiver (`otlp_collector.py`, decoding with the
//! OpenTelemetry project's `opentelemetry-proto` message types) run in the fabric namespace on
//! `10.240.0.1:4318`, which every waypoint pod reaches, writing each span it receives as a JSON
//! line to `<lab dir>/tracing/spans.jsonl`. Waypoints started while it runs export their spans to
//! it (`OTEL_EXPORTER_OTLP_ENDPOINT`, every trace sampled; see [`super::waypoints::environment`]).
//!
//! It needs a Python with `opentelemetry-proto`: `AMBIT_LAB_OTLP_PYTHON` names one (e.g. a venv:
//! `python3 -m venv ~/.ambit-otlp && ~/.ambit-otlp/bin/pip install opentelemetry-proto`), else
//! `python3` is used when it has the package. Without one the lab runs without a collector and
//! says so. `AMBIT_LAB_OTLP_ENDPOINT` sends the waypoints' spans to another collector instead
//! (Jaeger, an OpenTelemetry Collector) and no collector is started.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ambit_netlab::{Process, Topology};
use serde_json::json;

use super::{FABRIC_IP, dir, http, waypoints};

/// The key of the collector's pid in the lab's state.
pub(super) const KEY: &str = "otlp-collector";
/// Where the collector listens, in the fabric namespace (OTLP/HTTP's port).
pub(crate) const LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(FABRIC_IP), 4318);
/// The collector, written into the lab directory when it starts.
const SCRIPT: &str = include_str!("otlp_collector.py");

fn home() -> PathBuf {
    dir().join("tracing")
}

/// The spans the collector received, one JSON object a line.
pub(crate) fn spans_file() -> PathBuf {
    home().join("spans.jsonl")
}

/// Whether `python` can import the OTLP message types.
fn has_otlp(python: &Path) -> bool {
    std::process::Command::new(python)
        .args([
            "-c",
            "import opentelemetry.proto.collector.trace.v1.trace_service_pb2",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The Python that runs the collector.
fn python() -> Option<PathBuf> {
    if let Some(named) = std::env::var_os("AMBIT_LAB_OTLP_PYTHON") {
        let named = PathBuf::from(named);
        return has_otlp(&named).then_some(named);
    }
    let default = PathBuf::from("python3");
    has_otlp(&default).then_some(default)
}

/// Whether the collector answers (any HTTP status) from the fabric.
fn ready(fabric: &str) -> bool {
    http::get(fabric, LISTEN, "/").is_some()
}

/// Starts the collector in the fabric namespace, unless spans go to an outside collector or no
/// Python can run it (a line on stderr says which); waypoints started afterwards export to it.
/// Like Prometheus it is an aid, not part of the mesh: the lab runs without it.
pub(super) fn start(topology: &Topology) -> Option<Process> {
    let marker = dir().join(waypoints::TRACING_ENDPOINT_FILE);
    let _ = std::fs::remove_file(&marker);
    if let Ok(outside) = std::env::var("AMBIT_LAB_OTLP_ENDPOINT") {
        super::progress(&format!(
            "waypoints export trace spans to {outside} (AMBIT_LAB_OTLP_ENDPOINT); no lab collector"
        ));
        return None;
    }
    let Some(python) = python() else {
        super::progress(
            "no trace collector: it needs a Python with opentelemetry-proto (AMBIT_LAB_OTLP_PYTHON, or python3 with `pip install opentelemetry-proto`); waypoints run without tracing",
        );
        return None;
    };
    match spawn(topology, &python) {
        Ok(process) => {
            let endpoint = format!("http://{LISTEN}");
            if let Err(e) = std::fs::write(&marker, &endpoint) {
                super::progress(&format!(
                    "could not record the collector's endpoint in {}: {e}; waypoints run without tracing",
                    marker.display()
                ));
            }
            Some(process)
        }
        Err(e) => {
            super::progress(&format!(
                "the trace collector did not start, waypoints run without tracing: {e:#}"
            ));
            None
        }
    }
}

fn spawn(topology: &Topology, python: &Path) -> anyhow::Result<Process> {
    let home = home();
    std::fs::create_dir_all(&home)?;
    let script = home.join("otlp_collector.py");
    std::fs::write(&script, SCRIPT)?;
    super::progress(&format!(
        "starting the trace collector (OTLP/HTTP) on {LISTEN} in netns {}, spans in {}",
        topology.fabric,
        spans_file().display()
    ));
    let (listen, out) = (LISTEN.to_string(), spans_file().display().to_string());
    let script = script.display().to_string();
    let args = [
        script.as_str(),
        "--listen",
        listen.as_str(),
        "--out",
        out.as_str(),
    ];
    let process = topology.spawn(
        KEY,
        &topology.fabric,
        python,
        &args,
        &[],
        &home.join("collector.log"),
    )?;
    let fabric = topology.fabric.clone();
    super::wait(
        "the trace collector to listen",
        Duration::from_secs(20),
        || ready(&fabric),
    )?;
    Ok(process)
}

/// The `tracing` entry of `lab status --json`.
pub(super) fn status(running: bool, fabric: &str) -> serde_json::Value {
    let outside = std::env::var("AMBIT_LAB_OTLP_ENDPOINT").ok();
    json!({
        "running": running,
        "ready": running && ready(fabric),
        "endpoint": outside.unwrap_or_else(|| format!("http://{LISTEN}")),
        "netns": fabric,
        "spans": spans_file(),
    })
}

/// The `tracing` row of `lab status`.
pub(super) fn status_line(running: bool, fabric: &str) -> String {
    if let Ok(outside) = std::env::var("AMBIT_LAB_OTLP_ENDPOINT") {
        return format!("tracing      waypoints export to {outside}");
    }
    let state = match (running, running && ready(fabric)) {
        (true, true) => format!("running, spans in {}", spans_file().display()),
        (true, false) => "NOT READY".to_string(),
        (false, _) => "not running (needs a Python with opentelemetry-proto)".to_string(),
    };
    format!("tracing      {LISTEN} in netns {fabric}  {state}")
}
