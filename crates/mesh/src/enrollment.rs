//! Whether a pod is in the ambient mesh, by Istio's rules: the pod is labelled
//! `istio.io/dataplane-mode=ambient`, or its namespace is and the pod does not opt out with
//! `istio.io/dataplane-mode=none`. Host-network pods and pods with a sidecar never are.

use crate::objects::{Namespace, Pod};

/// The enrollment label.
pub const DATAPLANE_MODE: &str = "istio.io/dataplane-mode";

/// Why a pod is or is not captured, for logs and `ambitctl explain`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Enrollment {
    /// Pod label `istio.io/dataplane-mode=ambient`.
    PodLabel,
    /// Namespace label, no pod opt-out.
    NamespaceLabel,
    /// Pod label `istio.io/dataplane-mode=none`.
    PodOptOut,
    /// Neither the pod nor its namespace is labelled.
    NotLabelled,
    /// `hostNetwork: true`.
    HostNetwork,
    /// The pod has an Istio sidecar.
    Sidecar,
}

impl Enrollment {
    /// True when the pod is captured.
    pub fn is_ambient(self) -> bool {
        matches!(self, Enrollment::PodLabel | Enrollment::NamespaceLabel)
    }

    /// A sentence for logs.
    pub fn reason(self) -> &'static str {
        match self {
            Enrollment::PodLabel => "pod is labelled istio.io/dataplane-mode=ambient",
            Enrollment::NamespaceLabel => "namespace is labelled istio.io/dataplane-mode=ambient",
            Enrollment::PodOptOut => "pod opts out with istio.io/dataplane-mode=none",
            Enrollment::NotLabelled => {
                "neither the pod nor its namespace is labelled istio.io/dataplane-mode=ambient"
            }
            Enrollment::HostNetwork => "pod uses the host network",
            Enrollment::Sidecar => "pod has an Istio sidecar",
        }
    }
}

/// Decides enrollment for `pod` in `namespace` (None when the namespace object is unknown).
pub fn enrollment(pod: &Pod, namespace: Option<&Namespace>) -> Enrollment {
    if pod.spec.host_network {
        return Enrollment::HostNetwork;
    }
    if pod
        .metadata
        .annotations
        .contains_key("sidecar.istio.io/status")
    {
        return Enrollment::Sidecar;
    }
    match pod.metadata.labels.get(DATAPLANE_MODE).map(String::as_str) {
        Some("ambient") => return Enrollment::PodLabel,
        Some("none") => return Enrollment::PodOptOut,
        _ => {}
    }
    let namespace_ambient = namespace.is_some_and(|ns| {
        ns.metadata.labels.get(DATAPLANE_MODE).map(String::as_str) == Some("ambient")
    });
    if namespace_ambient {
        Enrollment::NamespaceLabel
    } else {
        Enrollment::NotLabelled
    }
}
