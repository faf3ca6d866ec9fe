//! What the robustness property tests share: the configuration corpus they start from and a
//! proptest runner that runs the same cases every time. Included with `#[path]` by
//! `crates/analyze/tests/robustness.rs` and `waypoint/tests/wire_robustness.rs`.

use std::path::{Path, PathBuf};

use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};

/// `tests/fixtures` of the repository, from a crate's manifest directory.
pub(crate) fn fixtures(manifest_dir: &str) -> PathBuf {
    Path::new(manifest_dir)
        .ancestors()
        .map(|d| d.join("tests/fixtures"))
        .find(|f| f.join("analyze").is_dir())
        .expect("tests/fixtures/analyze above the crate")
}

/// Every corpus file, sorted: `tests/fixtures/analyze/**.yaml` and Istio's canary example.
pub(crate) fn corpus(manifest_dir: &str) -> Vec<PathBuf> {
    let fixtures = fixtures(manifest_dir);
    let mut files = vec![fixtures.join("istio-canary.yaml")];
    for dir in [fixtures.join("analyze"), fixtures.join("analyze/good")] {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "yaml") {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

/// A runner of `PROPTEST_CASES` cases (else `default_cases`) from a fixed seed unless
/// `PROPTEST_RNG_SEED` gives another, so CI runs the same cases every time. Failures are not
/// persisted to files: the message names the input.
pub(crate) fn runner(default_cases: u32) -> TestRunner {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(default_cases);
    let seed: u64 = std::env::var("PROPTEST_RNG_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x0061_6d62_6974); // "ambit"
    let mut seed_bytes = [0u8; 32];
    seed_bytes[..8].copy_from_slice(&seed.to_le_bytes());
    TestRunner::new_with_rng(
        Config {
            cases,
            failure_persistence: None,
            ..Config::default()
        },
        TestRng::from_seed(RngAlgorithm::ChaCha, &seed_bytes),
    )
}
