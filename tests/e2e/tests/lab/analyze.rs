//! The lab test's checks of `ambitctl analyze` (called from the demo test in `lab.rs`): the
//! running demo (with what the test applied so far) has no error; a Service bound to a waypoint
//! that does not exist is reported with its code, object and field, and fails the run (exit 1);
//! once it is deleted the lab is clean again.

use serde_json::Value;

/// `ambitctl analyze -o json` on the running lab: exit code and findings.
fn analyze() -> (i32, Vec<Value>, String) {
    let (code, out, err) = super::ambitctl(&["analyze", "-o", "json"]);
    let findings =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("analyze -o json: {e}: {out}{err}"));
    (code, findings, err)
}

fn errors(findings: &[Value]) -> Vec<&Value> {
    findings
        .iter()
        .filter(|f| f["severity"] == "Error")
        .collect()
}

/// Checks `ambitctl analyze` against the running demo lab.
pub(crate) fn check(_status: &Value) {
    let (code, findings, err) = analyze();
    assert_eq!(code, 0, "{findings:#?}{err}");
    assert!(errors(&findings).is_empty(), "{findings:#?}");

    let dir = tempfile::tempdir().unwrap();
    let probe = dir.path().join("analyze-probe.yaml");
    std::fs::write(
        &probe,
        "apiVersion: v1\nkind: Service\nmetadata: {name: analyze-probe, namespace: demo, labels: {istio.io/use-waypoint: missing}}\nspec:\n  selector: {app: analyze-probe}\n  ports: [{name: http, port: 80}]\n",
    )
    .unwrap();
    let probe = probe.to_str().unwrap();
    let (code, out, err) = super::ambitctl(&["lab", "apply", "-f", probe]);
    assert_eq!(code, 0, "{out}{err}");

    let (code, findings, err) = analyze();
    assert_eq!(code, 1, "{findings:#?}{err}");
    let errors = errors(&findings);
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert_eq!(errors[0]["code"], "AMB0101");
    assert_eq!(errors[0]["object"], "Service demo/analyze-probe");
    assert_eq!(
        errors[0]["field"],
        "metadata.labels[\"istio.io/use-waypoint\"]"
    );
    assert!(
        errors[0]["message"]
            .as_str()
            .unwrap()
            .contains("Gateway demo/missing does not exist"),
        "{}",
        errors[0]
    );
    // The text form names the same, on one line.
    let (code, text, _) = super::ambitctl(&["analyze"]);
    assert_eq!(code, 1);
    assert!(
        text.lines().any(|l| l.starts_with(
            "Error [AMB0101] Service demo/analyze-probe metadata.labels[\"istio.io/use-waypoint\"]: "
        )),
        "{text}"
    );

    let (code, out, err) = super::ambitctl(&["lab", "delete", "-f", probe]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, findings, err) = analyze();
    assert_eq!(code, 0, "{findings:#?}{err}");
}
