//! The lab's waypoint deployment controller, doing what Istio's does in a cluster: for each
//! Gateway of class `istio-waypoint` it makes a pod `<gateway>-waypoint` (never captured, service
//! account `<gateway>`), a Service `<gateway>` in front of it (ports `mesh` 15008 and `status`
//! 15021), and fills in the Gateway's `status.addresses` with that Service's host name, which is
//! what makes the waypoint usable. The lab then runs the `waypoint` binary in the pod.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;

use ambit_mesh::gateway_api::{GATEWAY_NAME_LABEL, GatewayStatusAddress, WAYPOINT_CLASS};
use ambit_mesh::objects::{Gateway, Service};
use ambit_mesh::objects::{ObjectMeta, PodSpec, ServicePort, ServiceSpec};
use ambit_mesh::{Object, Pod};

/// Annotation on a Gateway choosing the lab node its waypoint pod runs on (default `node-1`).
pub(super) const LAB_NODE_ANNOTATION: &str = "ambit.dev/lab-node";
/// Pod label that keeps the waypoint out of the mesh's capture.
const DATAPLANE_MODE: &str = "istio.io/dataplane-mode";
/// The port ztunnels tunnel to.
pub(super) const HBONE_PORT: u16 = 15008;
/// Prometheus metrics.
pub(super) const STATS_PORT: u16 = 15020;
/// `GET /healthz/ready`.
pub(super) const READINESS_PORT: u16 = 15021;

/// A Gateway the lab cannot provision.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(super) enum WaypointError {
    /// The node annotation names no lab node.
    #[error(
        "Gateway {namespace}/{name}: metadata.annotations[{LAB_NODE_ANNOTATION}]: {value:?} is not a lab node (node-1..node-{nodes})"
    )]
    Node {
        /// The Gateway's namespace.
        namespace: String,
        /// Its name.
        name: String,
        /// The annotation's value.
        value: String,
        /// How many nodes the lab has.
        nodes: usize,
    },
}

/// Everything the controller makes for one waypoint Gateway.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Provisioned {
    /// The Gateway with `status.addresses` filled in.
    pub(super) gateway: Gateway,
    /// The Service `<gateway>` selecting the waypoint pod.
    pub(super) service: Service,
    /// The pod `<gateway>-waypoint`.
    pub(super) pod: Pod,
}

/// True for a Gateway the waypoint controller owns.
pub(super) fn is_waypoint(gateway: &Gateway) -> bool {
    gateway.spec.gateway_class_name == WAYPOINT_CLASS
}

/// The waypoint pod's name for Gateway `name`.
pub(super) fn pod_name(gateway: &str) -> String {
    format!("{gateway}-waypoint")
}

/// The owner annotation value of what the controller makes for Gateway `name`.
pub(super) fn owner(gateway: &str) -> String {
    format!("Gateway/{gateway}")
}

/// The pod, Service and Gateway status for a waypoint Gateway; `owner_annotation` is the
/// annotation marking generated objects (deleted with the Gateway).
pub(super) fn provision(
    gateway: &Gateway,
    nodes: usize,
    owner_annotation: &str,
) -> Result<Provisioned, WaypointError> {
    let namespace = gateway.metadata.namespace.clone();
    let name = gateway.metadata.name.clone();
    let node = match gateway.metadata.annotations.get(LAB_NODE_ANNOTATION) {
        None => "node-1".to_string(),
        Some(value) => {
            let valid = value
                .strip_prefix("node-")
                .and_then(|n| n.parse::<usize>().ok())
                .is_some_and(|n| (1..=nodes).contains(&n));
            if !valid {
                return Err(WaypointError::Node {
                    namespace,
                    name,
                    value: value.clone(),
                    nodes,
                });
            }
            value.clone()
        }
    };
    let selector = BTreeMap::from([(GATEWAY_NAME_LABEL.to_string(), name.clone())]);
    let annotations = BTreeMap::from([(owner_annotation.to_string(), owner(&name))]);

    let mut with_status = gateway.clone();
    with_status.status.addresses = vec![GatewayStatusAddress {
        kind: Some("Hostname".into()),
        value: format!("{name}.{namespace}.svc.cluster.local"),
    }];

    let service = Service {
        metadata: ObjectMeta {
            name: name.clone(),
            namespace: namespace.clone(),
            labels: selector.clone(),
            annotations: annotations.clone(),
            ..ObjectMeta::default()
        },
        spec: ServiceSpec {
            selector: selector.clone(),
            ports: vec![
                ServicePort {
                    name: "mesh".into(),
                    port: HBONE_PORT,
                    ..ServicePort::default()
                },
                ServicePort {
                    name: "status".into(),
                    port: READINESS_PORT,
                    ..ServicePort::default()
                },
            ],
            ..ServiceSpec::default()
        },
    };

    let mut labels = selector;
    labels.insert(DATAPLANE_MODE.into(), "none".into());
    let pod = Pod {
        metadata: ObjectMeta {
            name: pod_name(&name),
            namespace,
            labels,
            annotations,
            ..ObjectMeta::default()
        },
        spec: PodSpec {
            node_name: node,
            service_account_name: name,
            ..PodSpec::default()
        },
        ..Pod::default()
    };
    Ok(Provisioned {
        gateway: with_status,
        service,
        pod,
    })
}

/// Replaces every waypoint Gateway in `objects` by its provisioned form and adds its Service and
/// pod (unless `objects` already holds objects of those names, which then win).
pub(super) fn expand(
    objects: &mut Vec<Object>,
    nodes: usize,
    owner_annotation: &str,
) -> Result<(), WaypointError> {
    let mut added = Vec::new();
    for object in objects.iter_mut() {
        let Object::Gateway(gateway) = object else {
            continue;
        };
        if !is_waypoint(gateway) {
            continue;
        }
        let provisioned = provision(gateway, nodes, owner_annotation)?;
        *gateway = provisioned.gateway;
        added.push(Object::Service(provisioned.service));
        added.push(Object::Pod(provisioned.pod));
    }
    for object in added {
        let key = object.key();
        if !objects.iter().any(|o| o.key() == key) {
            objects.push(object);
        }
    }
    Ok(())
}

/// Where the waypoint's control plane and identity come from.
#[derive(Debug, Clone)]
pub(super) struct ControlPlane<'a> {
    /// `https://<istiod>:15012`.
    pub(super) xds_address: String,
    /// The root certificate to trust istiod with.
    pub(super) root_ca: &'a Path,
    /// The bearer token the tokens file maps to `<ns>/<gateway>` on the pod's node.
    pub(super) token: String,
}

/// Where the lab's trace collector records its OTLP endpoint while it runs, under the lab
/// directory (written by `lab::tracing`).
pub(super) const TRACING_ENDPOINT_FILE: &str = "tracing/endpoint";

/// Where the lab's waypoints send trace spans: `AMBIT_LAB_OTLP_ENDPOINT` (an outside collector),
/// else the lab's own collector while it runs; `None`: no tracing.
fn otlp_endpoint() -> Option<String> {
    if let Ok(outside) = std::env::var("AMBIT_LAB_OTLP_ENDPOINT")
        && !outside.is_empty()
    {
        return Some(outside);
    }
    std::fs::read_to_string(super::dir().join(TRACING_ENDPOINT_FILE))
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// The tracing part of a lab waypoint's environment: the collector and the sampling percentage
/// (`AMBIT_LAB_TRACE_SAMPLING`, default 100: a lab's traffic is small and every trace is wanted;
/// Istio's and the waypoint's own default is 1).
fn tracing_environment(endpoint: Option<String>) -> Vec<(&'static str, String)> {
    match endpoint {
        Some(endpoint) => vec![
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint),
            (
                "TRACE_SAMPLING",
                std::env::var("AMBIT_LAB_TRACE_SAMPLING").unwrap_or_else(|_| "100".into()),
            ),
        ],
        None => Vec::new(),
    }
}

/// The `waypoint` binary's environment in the pod of Gateway `<namespace>/<gateway>`, whose
/// address is `ip` on node `node` (service account: the Gateway's name, as the controller sets),
/// with the trace collector when the lab has one.
pub(super) fn environment(
    namespace: &str,
    gateway: &str,
    ip: IpAddr,
    node: &str,
    control: &ControlPlane<'_>,
) -> Vec<(&'static str, String)> {
    let mut env = base_environment(namespace, gateway, ip, node, control);
    env.extend(tracing_environment(otlp_endpoint()));
    env
}

fn base_environment(
    namespace: &str,
    gateway: &str,
    ip: IpAddr,
    node: &str,
    control: &ControlPlane<'_>,
) -> Vec<(&'static str, String)> {
    vec![
        ("XDS_ADDRESS", control.xds_address.clone()),
        ("XDS_ROOT_CA", control.root_ca.display().to_string()),
        ("AUTH_TOKEN", control.token.clone()),
        ("CLUSTER_ID", "Kubernetes".into()),
        ("TRUST_DOMAIN", "cluster.local".into()),
        ("POD_NAME", pod_name(gateway)),
        ("POD_NAMESPACE", namespace.to_string()),
        ("SERVICE_ACCOUNT", gateway.to_string()),
        ("INSTANCE_IP", ip.to_string()),
        ("NODE_NAME", node.to_string()),
        ("GATEWAY_NAME", gateway.to_string()),
        ("GATEWAY_NAMESPACE", namespace.to_string()),
        ("HBONE_ADDR", format!("{ip}:{HBONE_PORT}")),
        ("STATS_ADDR", format!("{ip}:{STATS_PORT}")),
        ("READINESS_ADDR", format!("{ip}:{READINESS_PORT}")),
        ("ADMIN_ADDR", "127.0.0.1:15000".into()),
        (
            "RUST_LOG",
            std::env::var("AMBIT_LAB_WAYPOINT_LOG").unwrap_or_else(|_| "info,access=warn".into()),
        ),
    ]
}

/// The Gateway a lab pod runs the waypoint of, if it is a waypoint pod the controller made.
pub(super) fn gateway_of(pod: &Pod, owner_annotation: &str) -> Option<String> {
    let gateway = pod.metadata.labels.get(GATEWAY_NAME_LABEL)?;
    let owned = pod.metadata.annotations.get(owner_annotation) == Some(&owner(gateway));
    (owned && pod.metadata.name == pod_name(gateway)).then(|| gateway.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    const OWNER: &str = "lab.ambit.io/owner";

    fn gateway(annotations: &[(&str, &str)]) -> Gateway {
        let (objects, errors) = ambit_mesh::parse_documents(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: waypoint, namespace: demo}\nspec:\n  gatewayClassName: istio-waypoint\n  listeners: [{name: mesh, port: 15008, protocol: HBONE}]\n",
            "test",
        );
        assert!(errors.is_empty(), "{errors:?}");
        let Some(Object::Gateway(mut g)) = objects.into_iter().next() else {
            panic!("no gateway");
        };
        for (k, v) in annotations {
            g.metadata.annotations.insert(k.to_string(), v.to_string());
        }
        g
    }

    #[test]
    fn a_waypoint_gateway_gets_a_pod_a_service_and_an_address() {
        let p = provision(&gateway(&[]), 2, OWNER).unwrap();
        assert_eq!(
            serde_json::to_value(&p.gateway.status).unwrap(),
            serde_json::json!({"addresses": [{"type": "Hostname", "value": "waypoint.demo.svc.cluster.local"}]})
        );
        let service = Object::Service(p.service).to_value();
        assert_eq!(service["metadata"]["name"], "waypoint");
        assert_eq!(service["metadata"]["namespace"], "demo");
        assert_eq!(
            service["spec"]["selector"],
            serde_json::json!({"gateway.networking.k8s.io/gateway-name": "waypoint"})
        );
        let ports: Vec<(String, u64)> = service["spec"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                (
                    p["name"].as_str().unwrap().to_string(),
                    p["port"].as_u64().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            ports,
            vec![("mesh".to_string(), 15008), ("status".to_string(), 15021)]
        );
        assert_eq!(p.pod.metadata.name, "waypoint-waypoint");
        assert_eq!(p.pod.metadata.labels["istio.io/dataplane-mode"], "none");
        assert_eq!(
            p.pod.metadata.labels["gateway.networking.k8s.io/gateway-name"],
            "waypoint"
        );
        assert_eq!(p.pod.service_account(), "waypoint");
        assert_eq!(p.pod.spec.node_name, "node-1");
        assert_eq!(gateway_of(&p.pod, OWNER).as_deref(), Some("waypoint"));
        // Never captured, whatever the namespace says.
        let ambient: ambit_mesh::Namespace = serde_json::from_value(serde_json::json!(
            {"metadata": {"name": "demo", "labels": {"istio.io/dataplane-mode": "ambient"}}}
        ))
        .unwrap();
        assert!(!ambit_mesh::enrollment::enrollment(&p.pod, Some(&ambient)).is_ambient());
    }

    #[test]
    fn the_node_annotation_places_the_pod_and_is_checked() {
        let p = provision(&gateway(&[(LAB_NODE_ANNOTATION, "node-2")]), 2, OWNER).unwrap();
        assert_eq!(p.pod.spec.node_name, "node-2");
        let e = provision(&gateway(&[(LAB_NODE_ANNOTATION, "node-3")]), 2, OWNER).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Gateway demo/waypoint: metadata.annotations[ambit.dev/lab-node]: \"node-3\" is not a lab node (node-1..node-2)"
        );
    }

    #[test]
    fn expand_adds_objects_once_and_leaves_other_gateways_alone() {
        let mut other = gateway(&[]);
        other.metadata.name = "ingress".into();
        other.spec.gateway_class_name = "istio".into();
        let mut objects = vec![Object::Gateway(gateway(&[])), Object::Gateway(other)];
        expand(&mut objects, 1, OWNER).unwrap();
        let keys: Vec<String> = objects.iter().map(|o| o.key().to_string()).collect();
        assert_eq!(
            keys,
            vec![
                "Gateway demo/waypoint",
                "Gateway demo/ingress",
                "Service demo/waypoint",
                "Pod demo/waypoint-waypoint"
            ]
        );
        let Object::Gateway(ingress) = &objects[1] else {
            panic!()
        };
        assert!(ingress.status.addresses.is_empty());
        // Applying the same Gateway again adds nothing twice.
        expand(&mut objects, 1, OWNER).unwrap();
        assert_eq!(objects.len(), 4);
    }

    #[test]
    fn a_collector_gets_every_trace_unless_told_otherwise() {
        let env: BTreeMap<&str, String> =
            tracing_environment(Some("http://10.240.0.1:4318".into()))
                .into_iter()
                .collect();
        assert_eq!(env["OTEL_EXPORTER_OTLP_ENDPOINT"], "http://10.240.0.1:4318");
        if std::env::var("AMBIT_LAB_TRACE_SAMPLING").is_err() {
            assert_eq!(env["TRACE_SAMPLING"], "100");
        }
        assert!(tracing_environment(None).is_empty());
    }

    #[test]
    fn the_environment_names_the_gateway_identity_and_addresses() {
        let root = Path::new("/run/lab/ca/root-cert.pem");
        let env = environment(
            "demo",
            "waypoint",
            "10.1.0.5".parse().unwrap(),
            "node-1",
            &ControlPlane {
                xds_address: "https://10.240.0.1:15012".into(),
                root_ca: root,
                token: "t0k".into(),
            },
        );
        let env: BTreeMap<&str, String> = env.into_iter().collect();
        assert_eq!(env["XDS_ADDRESS"], "https://10.240.0.1:15012");
        assert_eq!(env["XDS_ROOT_CA"], "/run/lab/ca/root-cert.pem");
        assert_eq!(env["AUTH_TOKEN"], "t0k");
        assert_eq!(env["SERVICE_ACCOUNT"], "waypoint");
        assert_eq!(env["POD_NAME"], "waypoint-waypoint");
        assert_eq!(env["POD_NAMESPACE"], "demo");
        assert_eq!(env["GATEWAY_NAME"], "waypoint");
        assert_eq!(env["GATEWAY_NAMESPACE"], "demo");
        assert_eq!(env["INSTANCE_IP"], "10.1.0.5");
        assert_eq!(env["NODE_NAME"], "node-1");
        assert_eq!(env["HBONE_ADDR"], "10.1.0.5:15008");
        assert_eq!(env["STATS_ADDR"], "10.1.0.5:15020");
        assert_eq!(env["READINESS_ADDR"], "10.1.0.5:15021");
    }
}
