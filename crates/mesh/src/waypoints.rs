//! Waypoint bindings: `istio.io/use-waypoint` on a pod, service or namespace resolves to a Gateway
//! of class `istio-waypoint` that has `status.addresses`; `istio.io/waypoint-for` on the Gateway
//! (else its GatewayClass, default `service`) says which traffic it takes. Public so that
//! `ambitctl explain` can say which label put a waypoint in a flow's path, with the translation's
//! own reading of it.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use ambit_proto::workload as pb;

use crate::gateway_api::{Gateway, NamespaceSelector, WAYPOINT_CLASS, WAYPOINT_FOR};
use crate::translate::{Cluster, USE_WAYPOINT, USE_WAYPOINT_NAMESPACE};
use crate::warning::WarningKind;

/// A usable waypoint.
#[derive(Debug)]
pub struct Waypoint {
    /// Where ztunnel sends traffic for it.
    pub address: pb::GatewayAddress,
    /// `istio.io/waypoint-for` is `service` or `all`.
    pub for_services: bool,
    /// `istio.io/waypoint-for` is `workload` or `all`.
    pub for_workloads: bool,
    /// The effective `istio.io/waypoint-for` value.
    pub waypoint_for: String,
    /// Which namespaces' objects may bind to it.
    pub attachable_from: AttachableFrom,
}

/// Which namespaces' objects may bind to a waypoint, as Istio reads it: `allowedRoutes.namespaces`
/// of the Gateway's HBONE listener on port 15008, `Same` when it says nothing (or there is no such
/// listener). Binding from another namespace needs `All`, or `Selector` matching that namespace's
/// labels.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AttachableFrom {
    /// Only objects in the waypoint's own namespace.
    Same,
    /// Objects in any namespace.
    All,
    /// Objects in namespaces whose labels match (no selector: none).
    Selector(Option<NamespaceSelector>),
}

impl AttachableFrom {
    fn of(gateway: &Gateway) -> Self {
        let namespaces = gateway
            .spec
            .listeners
            .iter()
            .find(|l| l.protocol == "HBONE" && l.port == 15008)
            .and_then(|l| l.allowed_routes.as_ref())
            .and_then(|a| a.namespaces.as_ref());
        match namespaces.map(|n| (n.from.as_str(), &n.selector)) {
            Some(("All", _)) => Self::All,
            Some(("Selector", selector)) => Self::Selector(selector.clone()),
            _ => Self::Same,
        }
    }

    /// `allowedRoutes.namespaces.from` as written.
    fn name(&self) -> &'static str {
        match self {
            Self::Same => "Same",
            Self::All => "All",
            Self::Selector(_) => "Selector",
        }
    }
}

/// Why a binding names no usable waypoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unusable {
    /// [`WarningKind::WaypointNotFound`], [`WarningKind::WaypointWrongClass`],
    /// [`WarningKind::WaypointNotReady`] or [`WarningKind::WaypointAttachmentDenied`].
    pub kind: WarningKind,
    /// What a person reads: `Gateway demo/wp does not exist`.
    pub message: String,
}

impl std::fmt::Display for Unusable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// A binding found on an object or its namespace.
#[derive(Debug)]
pub struct Binding<'a> {
    /// Namespace of the Gateway.
    pub namespace: &'a str,
    /// Name of the Gateway.
    pub name: &'a str,
    /// True when the label came from the namespace.
    pub from_namespace: bool,
    /// The namespace of the object bound (the one the waypoint must let bind to it).
    pub object_namespace: &'a str,
}

/// Every Gateway that can act as a waypoint, by namespace then name, and why the others cannot.
/// Nested maps so that per-pod lookups borrow instead of building keys.
#[derive(Debug)]
pub struct Waypoints {
    usable: HashMap<String, HashMap<String, Waypoint>>,
    unusable: HashMap<String, HashMap<String, Unusable>>,
    /// Labels of each namespace, for waypoints that let namespaces bind by selector.
    namespace_labels: HashMap<String, BTreeMap<String, String>>,
}

impl Waypoints {
    /// Indexes the Gateways of `cluster` once.
    pub fn index(cluster: &Cluster) -> Self {
        let mut usable: HashMap<String, HashMap<String, Waypoint>> = HashMap::new();
        let mut unusable: HashMap<String, HashMap<String, Unusable>> = HashMap::new();
        for ((ns, name), gateway) in &cluster.gateways {
            match waypoint(gateway, cluster) {
                Ok(w) => {
                    usable
                        .entry(ns.clone())
                        .or_default()
                        .insert(name.clone(), w);
                }
                Err(why) => {
                    unusable
                        .entry(ns.clone())
                        .or_default()
                        .insert(name.clone(), why);
                }
            }
        }
        let namespace_labels = cluster
            .namespaces
            .iter()
            .map(|(name, ns)| (name.clone(), ns.metadata.labels.clone()))
            .collect();
        Self {
            usable,
            unusable,
            namespace_labels,
        }
    }

    /// The waypoint a binding names, or why there is none.
    pub fn resolve(&self, binding: &Binding<'_>) -> Result<&Waypoint, Unusable> {
        if let Some(w) = self
            .usable
            .get(binding.namespace)
            .and_then(|m| m.get(binding.name))
        {
            return if self.attachable(w, binding) {
                Ok(w)
            } else {
                Err(Unusable {
                    kind: WarningKind::WaypointAttachmentDenied,
                    message: format!(
                        "Gateway {}/{} does not let namespace {} bind to it (its HBONE listener's allowedRoutes.namespaces.from is {})",
                        binding.namespace,
                        binding.name,
                        binding.object_namespace,
                        w.attachable_from.name()
                    ),
                })
            };
        }
        Err(
            match self
                .unusable
                .get(binding.namespace)
                .and_then(|m| m.get(binding.name))
            {
                Some(why) => why.clone(),
                None => Unusable {
                    kind: WarningKind::WaypointNotFound,
                    message: format!(
                        "Gateway {}/{} does not exist",
                        binding.namespace, binding.name
                    ),
                },
            },
        )
    }

    /// Whether the object `binding` is read from may bind to `w`.
    fn attachable(&self, w: &Waypoint, binding: &Binding<'_>) -> bool {
        match &w.attachable_from {
            AttachableFrom::All => true,
            AttachableFrom::Same => binding.object_namespace == binding.namespace,
            AttachableFrom::Selector(None) => false,
            AttachableFrom::Selector(Some(selector)) => {
                let none = BTreeMap::new();
                let labels = self
                    .namespace_labels
                    .get(binding.object_namespace)
                    .unwrap_or(&none);
                selector.matches(labels)
            }
        }
    }

    /// `<namespace>/<name>` of every usable waypoint.
    pub fn usable_keys(&self) -> impl Iterator<Item = String> + '_ {
        self.usable
            .iter()
            .flat_map(|(ns, names)| names.keys().map(move |name| format!("{ns}/{name}")))
    }
}

fn waypoint(gateway: &Gateway, cluster: &Cluster) -> Result<Waypoint, Unusable> {
    let meta = &gateway.metadata;
    let named = format!("Gateway {}/{}", meta.namespace, meta.name);
    let class = &gateway.spec.gateway_class_name;
    if class != WAYPOINT_CLASS {
        return Err(Unusable {
            kind: WarningKind::WaypointWrongClass,
            message: format!("{named} is of class {class}, not {WAYPOINT_CLASS}"),
        });
    }
    let addresses = &gateway.status.addresses;
    let destination = if let Some(host) = addresses.iter().find(|a| a.is_hostname()) {
        pb::gateway_address::Destination::Hostname(pb::NamespacedHostname {
            namespace: meta.namespace.clone(),
            hostname: host.value.clone(),
        })
    } else if let Some(ip) = addresses
        .iter()
        .find_map(|a| a.value.parse::<IpAddr>().ok())
    {
        pb::gateway_address::Destination::Address(pb::NetworkAddress {
            network: String::new(),
            address: match ip {
                IpAddr::V4(v4) => v4.octets().to_vec(),
                IpAddr::V6(v6) => v6.octets().to_vec(),
            },
            length: None,
        })
    } else {
        return Err(Unusable {
            kind: WarningKind::WaypointNotReady,
            message: format!("{named} has no status.addresses yet"),
        });
    };
    let waypoint_for = meta
        .labels
        .get(WAYPOINT_FOR)
        .or_else(|| {
            cluster
                .gateway_classes
                .get(class)
                .and_then(|c| c.metadata.labels.get(WAYPOINT_FOR))
        })
        .map(String::as_str)
        .unwrap_or("service");
    Ok(Waypoint {
        address: pb::GatewayAddress {
            destination: Some(destination),
            hbone_mtls_port: 15008,
        },
        for_services: matches!(waypoint_for, "service" | "all"),
        for_workloads: matches!(waypoint_for, "workload" | "all"),
        waypoint_for: waypoint_for.to_string(),
        attachable_from: AttachableFrom::of(gateway),
    })
}

/// The binding of an object with `labels` in `namespace`: its own `istio.io/use-waypoint`, else its
/// namespace's. `none` (or an empty value) means no waypoint.
pub fn binding<'a>(
    labels: &'a BTreeMap<String, String>,
    namespace: &'a str,
    cluster: &'a Cluster,
) -> Option<Binding<'a>> {
    let (from, from_namespace) = if labels.contains_key(USE_WAYPOINT) {
        (labels, false)
    } else {
        let ns_labels = &cluster.namespaces.get(namespace)?.metadata.labels;
        (ns_labels, true)
    };
    let name = from.get(USE_WAYPOINT)?.as_str();
    if name.is_empty() || name == "none" {
        return None;
    }
    let waypoint_ns = from
        .get(USE_WAYPOINT_NAMESPACE)
        .map(String::as_str)
        .filter(|n| !n.is_empty())
        .unwrap_or(namespace);
    Some(Binding {
        namespace: waypoint_ns,
        name,
        from_namespace,
        object_namespace: namespace,
    })
}
