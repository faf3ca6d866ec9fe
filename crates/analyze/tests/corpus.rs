//! The analyzer against a corpus of broken and good configuration.
//!
//! - `tests/fixtures/analyze/<case>.yaml`: each broken case, read as `ambitctl analyze -f` reads
//!   it, must produce exactly the lines of `<case>.expected`. After a deliberate change, rewrite
//!   them with `AMBIT_BLESS=1 cargo test -p ambit-analyze --test corpus` and read the diff line
//!   by line before committing it.
//! - `tests/fixtures/analyze/good/*.yaml`, the lab's demo (`ambitctl/src/lab/demo.rs`) and Istio's
//!   canary example (`tests/fixtures/istio-canary.yaml`, with its Services and pods) must produce
//!   no Error and no Warning.

use std::path::{Path, PathBuf};

use ambit_analyze::{CODES, Finding, Options, Severity, analyze};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn analyze_text(text: &str, source: &str) -> Vec<Finding> {
    let (objects, errors) = ambit_mesh::parse_documents(text, source);
    analyze(&objects, &errors, &Options::default())
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

fn render(findings: &[Finding]) -> String {
    findings.iter().map(|f| format!("{f}\n")).collect()
}

#[test]
fn each_broken_case_reports_exactly_its_expected_lines() {
    let dir = fixtures().join("analyze");
    let bless = std::env::var_os("AMBIT_BLESS").is_some_and(|v| v == "1");
    let cases = yaml_files(&dir);
    assert!(cases.len() >= 8, "the corpus is in {}", dir.display());
    let mut failures = Vec::new();
    for case in cases {
        let name = case.file_name().unwrap().to_string_lossy().to_string();
        let text = std::fs::read_to_string(&case).unwrap();
        let got = render(&analyze_text(&text, &name));
        let expected_path = case.with_extension("expected");
        if bless {
            std::fs::write(&expected_path, &got).unwrap();
            continue;
        }
        let expected = std::fs::read_to_string(&expected_path).unwrap_or_else(|e| {
            panic!(
                "{}: {e} (write it with AMBIT_BLESS=1, then check it by eye)",
                expected_path.display()
            )
        });
        assert!(
            !expected.trim().is_empty(),
            "{name}: a broken case must find something"
        );
        if got != expected {
            failures.push(format!("{name}:\n--- expected\n{expected}--- got\n{got}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Every code but these has a corpus case: the catch-all (no warning of the corpus may fall to it,
/// checked below) and the one reported only for a running mesh (see the unit tests).
const NOT_IN_CORPUS: [&str; 2] = ["AMB0002", "AMB0104"];

#[test]
fn every_code_has_a_corpus_case_and_a_documented_entry() {
    let dir = fixtures().join("analyze");
    let mut expected = String::new();
    for case in yaml_files(&dir) {
        expected += &std::fs::read_to_string(case.with_extension("expected")).unwrap_or_default();
    }
    let docs = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/reference/analyze.md"),
    )
    .unwrap();
    for code in CODES {
        if !NOT_IN_CORPUS.contains(&code.code) {
            assert!(
                expected.contains(&format!("[{}]", code.code)),
                "{} ({}) has no corpus case",
                code.code,
                code.name
            );
        }
        assert!(
            docs.contains(&format!("### {} {}", code.code, code.name)),
            "{} ({}) is not documented in docs/reference/analyze.md",
            code.code,
            code.name
        );
        if let Some(istio) = code.istio {
            assert!(docs.contains(istio), "{}: the docs name {istio}", code.code);
        }
    }
    assert!(
        !expected.contains("[AMB0002]"),
        "a warning of the mesh falls to the catch-all: give it a code"
    );
}

fn assert_clean(findings: &[Finding], what: &str) {
    let bad: Vec<String> = findings
        .iter()
        .filter(|f| f.severity >= Severity::Warning)
        .map(|f| f.to_string())
        .collect();
    assert!(bad.is_empty(), "{what}:\n{}", bad.join("\n"));
}

#[test]
fn good_configuration_has_no_errors_or_warnings() {
    let dir = fixtures().join("analyze/good");
    let files = yaml_files(&dir);
    assert!(!files.is_empty());
    for file in files {
        let name = file.file_name().unwrap().to_string_lossy().to_string();
        let text = std::fs::read_to_string(&file).unwrap();
        assert_clean(&analyze_text(&text, &name), &name);
    }
}

#[test]
fn istios_canary_example_with_its_services_and_pods_is_clean() {
    let world = std::fs::read_to_string(fixtures().join("analyze/good/canary-world.yaml")).unwrap();
    let canary = std::fs::read_to_string(fixtures().join("istio-canary.yaml"))
        .unwrap()
        .replace("NAMESPACE", "shop");
    let findings = analyze_text(&format!("{world}\n---\n{canary}"), "canary.yaml");
    assert_clean(&findings, "canary");
    assert!(findings.is_empty(), "{}", render(&findings));

    // Without the canary pods, the subset the VirtualService sends 10% to is empty: the one
    // finding is that (and it is an error).
    let without: String = world
        .split("\n---\n")
        .filter(|doc| !doc.contains("name: product-v2"))
        .collect::<Vec<_>>()
        .join("\n---\n");
    let findings = analyze_text(&format!("{without}\n---\n{canary}"), "canary.yaml");
    let codes: Vec<&str> = findings.iter().map(|f| f.code).collect();
    assert_eq!(codes, ["AMB0402"], "{}", render(&findings));
    assert_eq!(findings[0].field, "spec.subsets[1].labels");
}

/// The demo `ambitctl lab up --demo` starts, as written in `ambitctl/src/lab/demo.rs` (the text
/// of its `OBJECTS` constant, read from the source so that this test follows the demo).
#[test]
fn the_labs_demo_is_clean_but_for_its_legacy_namespace() {
    let source = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../ambitctl/src/lab/demo.rs"),
    )
    .unwrap();
    let start = source
        .find("OBJECTS: &str = r#\"")
        .expect("demo.rs defines OBJECTS as a raw string");
    let rest = &source[start + "OBJECTS: &str = r#\"".len()..];
    let end = rest.find("\"#;").expect("the raw string ends");
    let findings = analyze_text(&rest[..end], "demo");
    assert_clean(&findings, "demo");
    let lines: Vec<String> = findings.iter().map(|f| f.to_string()).collect();
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert!(
        lines[0].starts_with("Info [AMB0601] Namespace legacy "),
        "{}",
        lines[0]
    );
}
