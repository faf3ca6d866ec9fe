//! `ambitctl analyze`: see [`ambit_analyze`]. Exit codes: 0 when no finding reaches
//! `--failure-threshold`, 1 when one does, 2 when nothing could be analysed (bad arguments, an
//! unreadable file, no lab, a cluster that could not be listed).

use std::path::PathBuf;

use ambit_analyze::{Finding, Options, Severity};
use anyhow::bail;

use crate::source::{self, Origin};

/// `ambitctl analyze` arguments.
#[derive(clap::Args)]
pub(crate) struct Args {
    /// YAML files or directories to analyze offline (repeatable). Without it: the running lab.
    #[arg(short = 'f', long = "filename")]
    files: Vec<PathBuf>,
    /// Analyze a Kubernetes cluster (KUBECONFIG or ~/.kube/config) instead.
    #[arg(long, conflicts_with = "files")]
    cluster: bool,
    /// Output format: `text` (one line per finding) or `json` (an array).
    #[arg(short = 'o', long = "output", default_value = "text")]
    output: String,
    /// Exit 1 when a problem at or above this severity is found: Info, Warning, Error.
    #[arg(long = "failure-threshold", default_value = "Error")]
    failure_threshold: String,
}

/// The exit code when a finding reaches the threshold.
const FOUND: i32 = 1;
/// The exit code when nothing could be analysed.
const NOT_ANALYSED: i32 = 2;

/// Runs `ambitctl analyze`.
pub(crate) fn run(args: Args) -> anyhow::Result<i32> {
    match analyze(&args) {
        Ok(code) => Ok(code),
        Err(e) => {
            eprintln!("ambitctl analyze: {e:#}");
            Ok(NOT_ANALYSED)
        }
    }
}

fn analyze(args: &Args) -> anyhow::Result<i32> {
    let threshold: Severity = args.failure_threshold.parse()?;
    let json = match args.output.as_str() {
        "text" => false,
        "json" => true,
        other => bail!("--output {other:?} is not text or json"),
    };
    let origin = if !args.files.is_empty() {
        Origin::Files(args.files.clone())
    } else if args.cluster {
        Origin::Cluster
    } else {
        Origin::Lab
    };
    let loaded = source::load(&origin)?;
    let options = Options {
        deployed: !matches!(origin, Origin::Files(_)),
        ..Options::default()
    };
    let findings = ambit_analyze::analyze(&loaded.objects, &loaded.errors, &options);
    if json {
        println!("{}", serde_json::to_string_pretty(&findings)?);
    } else {
        for finding in &findings {
            println!("{finding}");
        }
    }
    eprintln!(
        "{}",
        summary(&findings, loaded.objects.len() + loaded.errors.len())
    );
    Ok(
        if ambit_analyze::worst(&findings).is_some_and(|w| w >= threshold) {
            FOUND
        } else {
            0
        },
    )
}

/// `12 objects: 1 error, 0 warnings, 2 info`.
fn summary(findings: &[Finding], objects: usize) -> String {
    let count = |s: Severity| findings.iter().filter(|f| f.severity == s).count();
    let plural = |n: usize, word: &str| format!("{n} {word}{}", if n == 1 { "" } else { "s" });
    format!(
        "{}: {}, {}, {} info",
        plural(objects, "object"),
        plural(count(Severity::Error), "error"),
        plural(count(Severity::Warning), "warning"),
        count(Severity::Info)
    )
}
