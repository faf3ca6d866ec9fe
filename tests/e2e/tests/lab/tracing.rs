//! The lab test's check of tracing (called from the demo test in `lab.rs`): a request from the
//! demo client with a W3C `traceparent` goes through the waypoint; the lab's OTLP collector
//! receives the waypoint's server span in the client's trace, with Istio's attributes, and the
//! client span of the upstream try, which the echo saw as its parent.
//!
//! The lab starts its collector only with a Python that has `opentelemetry-proto`:
//! [`python`] makes one (a venv under the target directory) for the test to pass to
//! `lab up` as `AMBIT_LAB_OTLP_PYTHON`.

use std::path::PathBuf;

use serde_json::Value;

/// A Python with `opentelemetry-proto` (see tests/support/otlp_python.rs, shared with the
/// waypoint's tests) for `AMBIT_LAB_OTLP_PYTHON`.
pub(crate) fn python() -> PathBuf {
    super::otlp_python::otlp_python(&PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("otlp-venv"))
}

fn spans(path: &str) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Checks the waypoint's trace export against the running demo lab.
pub(crate) fn check(status: &Value) {
    let tracing = &status["tracing"];
    assert_eq!(
        tracing["running"], true,
        "the lab's trace collector runs (lab up with AMBIT_LAB_OTLP_PYTHON): {tracing}"
    );
    assert_eq!(tracing["endpoint"], "http://10.240.0.1:4318", "{tracing}");
    let file = tracing["spans"].as_str().expect("spans file").to_string();

    // A trace id of this run (never one an earlier run left in the file).
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let trace = format!("{:032x}", nanos | (1 << 120));
    let client_span = "00f067aa0ba902b7";
    let out = super::curl_with(
        "demo/client",
        &[
            "-H",
            &format!("traceparent: 00-{trace}-{client_span}-01"),
            "-H",
            "x-request-id: lab-trace-check",
        ],
        "http://echo.demo.svc.cluster.local/traced",
    );
    let body: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let seen = body.to_string();
    assert!(
        seen.contains(&format!("00-{trace}-")),
        "the echo saw the client's trace continued: {seen}"
    );

    super::eventually("the waypoint's spans reach the lab's collector", || {
        let all = spans(&file);
        let ours: Vec<&Value> = all.iter().filter(|s| s["trace_id"] == trace).collect();
        let server = ours
            .iter()
            .find(|s| s["kind"] == 2)
            .ok_or_else(|| format!("no server span of trace {trace} in {file}: {ours:?}"))?;
        let client = ours
            .iter()
            .find(|s| s["kind"] == 3)
            .ok_or_else(|| format!("no client span of trace {trace}: {ours:?}"))?;
        let a = &server["attributes"];
        let expect = |what: &str, ok: bool| {
            if ok {
                Ok(())
            } else {
                Err(format!("{what}: {server}"))
            }
        };
        expect("service.name", server["service"] == "waypoint.demo")?;
        expect(
            "the client's span is the parent",
            server["parent_span_id"] == client_span,
        )?;
        expect(
            "span name",
            server["name"] == "echo.demo.svc.cluster.local:80/*",
        )?;
        expect("http.status_code", a["http.status_code"] == 200)?;
        expect("http.method", a["http.method"] == "GET")?;
        expect(
            "http.url",
            a["http.url"] == "http://echo.demo.svc.cluster.local/traced",
        )?;
        expect(
            "guid:x-request-id",
            a["guid:x-request-id"] == "lab-trace-check",
        )?;
        expect("component", a["component"] == "proxy")?;
        expect("istio.namespace", a["istio.namespace"] == "demo")?;
        expect(
            "istio.canonical_service",
            a["istio.canonical_service"] == "waypoint",
        )?;
        expect(
            "node_id",
            a["node_id"]
                .as_str()
                .is_some_and(|n| n.starts_with("waypoint~")),
        )?;
        expect(
            "upstream_cluster",
            a["upstream_cluster"]
                .as_str()
                // The demo's route sends to echo-v1 or echo-v2.
                .is_some_and(|c| {
                    c.starts_with("inbound-vip|80|http|echo-v")
                        && c.ends_with(".demo.svc.cluster.local")
                }),
        )?;
        if client["parent_span_id"] != server["span_id"] {
            return Err(format!("client span's parent: {client} vs {server}"));
        }
        let expected = format!("00-{trace}-{}-01", client["span_id"].as_str().unwrap_or(""));
        if !seen.contains(&expected) {
            return Err(format!(
                "the echo's parent is the client span {expected}: {seen}"
            ));
        }
        Ok(())
    });
}
