//! `ambitctl analyze`: problems in mesh configuration, each with a stable code, a severity, the
//! object and field at fault and a fix hint.
//!
//! Built on the code the mesh runs, never beside it: objects that fail to parse are the
//! [`ambit_mesh::ObjectError`]s the readers report; everything the translation
//! ([`ambit_mesh::translate::translate`]) honours only in part is one of its warnings, classified
//! here into a code; waypoint bindings, enrollment, host and selector resolution and STRICT mTLS
//! are read with `ambit_mesh`'s own functions. What the translation cannot see on its own (a
//! selector matching nothing, a shadowed rule, a subset with no pods, plaintext callers of STRICT
//! pods, a namespace neither in nor out of the mesh) is checked in [`checks`] from the same
//! objects.
//!
//! ```
//! use ambit_analyze::{Options, Severity, analyze};
//! let (objects, errors) = ambit_mesh::parse_documents(
//!     "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop, labels: {istio.io/use-waypoint: wp}}\n",
//!     "shop.yaml",
//! );
//! let findings = analyze(&objects, &errors, &Options::default());
//! assert_eq!(findings[0].code, "AMB0101");
//! assert_eq!(findings[0].severity, Severity::Error);
//! ```

#![forbid(unsafe_code)]

pub mod checks;
pub mod codes;
mod warnings;
pub mod workloads;

use std::fmt;
use std::str::FromStr;

use ambit_mesh::gateway_api::{GatewayStatusAddress, WAYPOINT_CLASS};
use ambit_mesh::translate::{Cluster, MeshSettings, translate};
use ambit_mesh::{Object, ObjectError};
use serde::Serialize;
use thiserror::Error;

pub use codes::{CODES, Code};

/// How bad a finding is; ordered `Info < Warning < Error`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Severity {
    /// Worth knowing; nothing is broken.
    Info,
    /// Likely not what was meant, or honoured only in part.
    Warning,
    /// Traffic will not be handled as written.
    Error,
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Severity::Info => "Info",
            Severity::Warning => "Warning",
            Severity::Error => "Error",
        })
    }
}

/// A severity name that is not `Info`, `Warning` or `Error`.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
#[error("{0:?} is not a severity (Info, Warning or Error)")]
pub struct ParseSeverityError(pub String);

impl FromStr for Severity {
    type Err = ParseSeverityError;

    /// `Info`, `Warning` or `Error`, in any case.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "info" => Ok(Severity::Info),
            "warning" | "warn" => Ok(Severity::Warning),
            "error" => Ok(Severity::Error),
            _ => Err(ParseSeverityError(s.to_string())),
        }
    }
}

/// One problem.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Finding {
    /// The stable code, `AMB0xxx` (see `docs/reference/analyze.md`).
    pub code: &'static str,
    /// The code's name (`WaypointNotFound`).
    pub name: &'static str,
    /// How bad it is.
    pub severity: Severity,
    /// The object at fault: `Kind namespace/name` (`Kind name` when cluster-scoped).
    pub object: String,
    /// The field at fault (`spec.http[0].route[1].destination.subset`), `-` for a whole
    /// document, empty when no single field is.
    pub field: String,
    /// What is wrong, in one line.
    pub message: String,
    /// How to fix it, in one line.
    pub fix: &'static str,
    /// The `istioctl analyze` code for the same problem, if Istio has one.
    pub istio_code: Option<&'static str>,
}

impl fmt::Display for Finding {
    /// `Error [AMB0308] VirtualService demo/reviews spec.http[0]...: message (fix: ...)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} [{}] {}", self.severity, self.code, self.object)?;
        if !self.field.is_empty() {
            write!(f, " {}", self.field)?;
        }
        write!(f, ": {} (fix: {})", self.message, self.fix)
    }
}

/// How to read the objects.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// The mesh settings the translation runs with (trust domain, domain suffix, root namespace).
    pub settings: MeshSettings,
    /// True when the objects come from a running mesh (a cluster or the lab), whose controllers
    /// have written status: a waypoint Gateway without `status.addresses` is then a problem.
    /// False for files, where no Gateway has status yet: each `istio-waypoint` Gateway is taken to
    /// have the address its controller gives it (`<name>.<namespace>.svc.<suffix>`).
    pub deployed: bool,
}

/// Every problem in `objects` (and every object in `errors` that could not be read), sorted:
/// errors first, then by object, field, code and message. Equal findings are reported once.
pub fn analyze(objects: &[Object], errors: &[ObjectError], options: &Options) -> Vec<Finding> {
    let mut findings: Vec<Finding> = errors.iter().map(schema_finding).collect();
    let mut objects = objects.to_vec();
    if !options.deployed {
        assume_waypoints_deployed(&mut objects, &options.settings);
    }
    let workloads = workloads::collect(&objects);
    let cluster = Cluster::from_objects(objects);
    let resources = translate(&cluster, &options.settings);
    let context = checks::Context {
        cluster: &cluster,
        settings: &options.settings,
        resources: &resources,
        workloads: &workloads,
    };
    let missing_targets = checks::target_refs(&context, &mut findings);
    findings.extend(
        warnings::classify(&resources.warnings)
            .into_iter()
            // A policy whose every target is missing is reported as such (AMB0204), not again
            // as one without a waypoint.
            .filter(|f| {
                f.code != codes::POLICY_TARGET_NO_WAYPOINT.code
                    || !missing_targets.contains(&f.object)
            }),
    );
    checks::run(&context, &mut findings);
    sort(&mut findings);
    findings
}

/// Sorts findings (errors first, then object, field, code, message) and drops repeats.
pub fn sort(findings: &mut Vec<Finding>) {
    findings.sort_by(|a, b| {
        b.severity
            .cmp(&a.severity)
            .then_with(|| a.object.cmp(&b.object))
            .then_with(|| a.field.cmp(&b.field))
            .then_with(|| a.code.cmp(b.code))
            .then_with(|| a.message.cmp(&b.message))
    });
    findings.dedup();
}

/// The highest severity among `findings`, if any.
pub fn worst(findings: &[Finding]) -> Option<Severity> {
    findings.iter().map(|f| f.severity).max()
}

fn schema_finding(error: &ObjectError) -> Finding {
    let at = if error.document == 0 {
        error.source_name.clone()
    } else {
        format!("{} doc {}", error.source_name, error.document)
    };
    codes::SCHEMA.finding(
        error.object.clone(),
        error.field.clone(),
        format!("{}: {}", at, error.reason),
    )
}

/// Gives every `istio-waypoint` Gateway without `status.addresses` the host name address the
/// waypoint controller would write, so that files are analysed as they will run once applied.
fn assume_waypoints_deployed(objects: &mut [Object], settings: &MeshSettings) {
    for object in objects {
        if let Object::Gateway(gateway) = object
            && gateway.spec.gateway_class_name == WAYPOINT_CLASS
            && gateway.status.addresses.is_empty()
        {
            let meta = &gateway.metadata;
            let value = format!(
                "{}.{}.svc.{}",
                meta.name, meta.namespace, settings.domain_suffix
            );
            gateway.status.addresses.push(GatewayStatusAddress {
                kind: Some("Hostname".into()),
                value,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn severities_parse_in_any_case_and_order_by_gravity() {
        assert_eq!("error".parse::<Severity>(), Ok(Severity::Error));
        assert_eq!("Warning".parse::<Severity>(), Ok(Severity::Warning));
        assert_eq!("INFO".parse::<Severity>(), Ok(Severity::Info));
        assert!("fatal".parse::<Severity>().is_err());
        assert!(Severity::Info < Severity::Warning && Severity::Warning < Severity::Error);
    }

    #[test]
    fn a_finding_is_one_line_with_its_code_object_field_and_fix() {
        let f = codes::SUBSET_NOT_FOUND.finding(
            "VirtualService demo/reviews",
            "spec.http[0].route[0].destination.subset",
            "no subset v3",
        );
        assert_eq!(
            f.to_string(),
            format!(
                "Error [AMB0308] VirtualService demo/reviews spec.http[0].route[0].destination.subset: no subset v3 (fix: {})",
                codes::SUBSET_NOT_FOUND.fix
            )
        );
        let json = serde_json::to_value(&f).unwrap();
        assert_eq!(json["istioCode"], "IST0101");
        assert_eq!(json["severity"], "Error");
        assert_eq!(json["name"], "SubsetNotFound");
    }

    #[test]
    fn files_assume_waypoints_get_their_address_but_a_running_mesh_does_not() {
        let yaml = "apiVersion: v1\nkind: Namespace\nmetadata: {name: demo, labels: {istio.io/dataplane-mode: ambient}}\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: wp, namespace: demo}\nspec: {gatewayClassName: istio-waypoint}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: demo, labels: {istio.io/use-waypoint: wp}}\nspec: {ports: [{name: http, port: 80}]}\n";
        let (objects, errors) = ambit_mesh::parse_documents(yaml, "t.yaml");
        assert!(analyze(&objects, &errors, &Options::default()).is_empty());
        let live = Options {
            deployed: true,
            ..Options::default()
        };
        let findings = analyze(&objects, &errors, &live);
        assert_eq!(findings.len(), 1, "{findings:?}");
        assert_eq!(findings[0].code, "AMB0104");
        assert_eq!(findings[0].object, "Service demo/web");
    }
}
