//! The waypoint controller (Kubernetes mode): what istiod's deployment and status controllers do
//! for ambient waypoints.
//!
//! For every Gateway of class `istio-waypoint` (or of a class whose GatewayClass names the
//! controller `istio.io/mesh-controller`) it applies, with server-side apply as field manager
//! `istiod-lite` and owned by the Gateway (so deleting the Gateway garbage-collects them), a
//! ServiceAccount, a Service (ports `mesh` 15008 and `status-port` 15021) and a one-replica
//! Deployment running the waypoint binary, all named like the Gateway. It writes the Gateway's
//! `status.addresses` (the Service's host name, once the Service exists) and its `Accepted` and
//! `Programmed` conditions; the `Accepted` and `ResolvedRefs` conditions of HTTPRoutes and
//! GRPCRoutes towards their Service parents; and `istio.io/WaypointBound` on every Service bound
//! to a waypoint.
//!
//! [`plan`] decides, purely, from the objects the controller watches; [`Controller::reconcile`]
//! performs what it planned. Nothing is written when nothing changed: an applied object carries
//! the hash of what was applied ([`APPLIED_HASH`]) and is applied again only when that differs;
//! a status is patched only when its content (times aside) differs.

use std::collections::BTreeMap;
use std::time::Duration;

use ambit_kube::cache::Cache;
use ambit_kube::watch::{
    AUTHORIZATION_POLICY, GATEWAY, GATEWAY_CLASS, HTTP_ROUTE, KindSpec, NAMESPACE, SERVICE, Watch,
};
use ambit_mesh::gateway_api::{GATEWAY_GROUP, GATEWAY_NAME_LABEL, WAYPOINT_CLASS};
use ambit_mesh::status::{Fact, ParentFacts, PolicyFacts};
use ambit_mesh::translate::{Cluster, MeshSettings, translate};
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use serde_json::{Value, json};

use crate::source::GRPC_ROUTE;

/// The field manager of every write.
pub const FIELD_MANAGER: &str = "istiod-lite";
/// The GatewayClass controller name of waypoints: a Gateway whose class names it is a waypoint.
pub const MESH_CONTROLLER: &str = "istio.io/mesh-controller";
/// The `controllerName` of the route parent statuses written (what Istio writes).
pub const ROUTE_CONTROLLER: &str = "istio.io/gateway-controller";
/// The label marking what the controller manages, and its value.
pub const MANAGED_LABEL: (&str, &str) = ("gateway.istio.io/managed", "istio.io-mesh-controller");
/// The label naming the Gateway's class on generated objects.
pub const GATEWAY_CLASS_LABEL: &str = "gateway.networking.k8s.io/gateway-class-name";
/// The Service condition saying whether its waypoint binding holds.
pub const WAYPOINT_BOUND: &str = "istio.io/WaypointBound";
/// The AuthorizationPolicy condition saying whether (and how much of it) ztunnel enforces it.
pub const ZTUNNEL_ACCEPTED: &str = "ZtunnelAccepted";
/// The AuthorizationPolicy condition saying whether its `targetRefs` reach a waypoint.
pub const WAYPOINT_ACCEPTED: &str = "WaypointAccepted";
/// The annotation on generated objects holding a hash of what was applied.
pub const APPLIED_HASH: &str = "ambit.dev/applied-hash";
/// The ConfigMap holding the mesh root in every namespace (mounted for XDS_ROOT_CA).
const ROOT_CONFIGMAP: &str = crate::kube_ca::ROOT_CONFIGMAP;
/// Where the waypoint finds its token and the root.
const TOKEN_DIR: &str = "/var/run/secrets/tokens";
const ROOT_DIR: &str = "/var/run/secrets/istio";

/// `apps/v1` Deployment.
pub const DEPLOYMENT: KindSpec = KindSpec {
    api_version: "apps/v1",
    kind: "Deployment",
    plural: "deployments",
    namespaced: true,
};
/// `v1` ServiceAccount.
pub const SERVICE_ACCOUNT: KindSpec = KindSpec {
    api_version: "v1",
    kind: "ServiceAccount",
    plural: "serviceaccounts",
    namespaced: true,
};

/// How generated waypoints are configured.
#[derive(Clone, Debug)]
pub struct WaypointSettings {
    /// The waypoint container image.
    pub image: String,
    /// Where waypoints reach istiod-lite's xDS and CA (`https://host:port`).
    pub xds_address: String,
    /// Trust domain, cluster id, DNS suffix (for `status.addresses`).
    pub mesh: MeshSettings,
    /// Where waypoints send their trace spans (OTLP/HTTP), and the percent of new traces they
    /// sample; `None`: no export.
    pub tracing: Option<WaypointTracing>,
}

/// The trace export every generated waypoint gets.
#[derive(Clone, Debug, PartialEq)]
pub struct WaypointTracing {
    /// The OTLP/HTTP collector (`OTEL_EXPORTER_OTLP_ENDPOINT`), e.g.
    /// `http://otel-collector.observability:4318`.
    pub endpoint: String,
    /// Percent of new traces sampled (`TRACE_SAMPLING`), 0 to 100.
    pub sampling: f64,
}

impl WaypointSettings {
    /// The default image: `ambit/waypoint:<this version>`.
    pub fn default_image() -> String {
        format!("ambit/waypoint:{}", env!("CARGO_PKG_VERSION"))
    }

    /// istiod-lite's in-cluster address in `system_namespace`.
    pub fn default_xds_address(system_namespace: &str) -> String {
        format!("https://istiod.{system_namespace}.svc:15012")
    }
}

/// What the controller watches: the mesh kinds it reports on and the objects it generated.
pub fn watches() -> Vec<Watch> {
    let mut watches: Vec<Watch> = [
        NAMESPACE,
        SERVICE,
        GATEWAY,
        GATEWAY_CLASS,
        HTTP_ROUTE,
        GRPC_ROUTE,
        AUTHORIZATION_POLICY,
    ]
    .into_iter()
    .map(Watch::all)
    .collect();
    watches.push(Watch {
        kind: DEPLOYMENT,
        field_selector: None,
        label_selector: Some(format!("{}={}", MANAGED_LABEL.0, MANAGED_LABEL.1)),
    });
    watches.push(Watch {
        kind: SERVICE_ACCOUNT,
        field_selector: None,
        label_selector: Some(GATEWAY_NAME_LABEL.to_string()),
    });
    watches
}

/// One write.
#[derive(Clone, Debug, PartialEq)]
pub enum Write {
    /// Server-side apply of a whole generated object.
    Apply {
        /// Its kind.
        kind: KindSpec,
        /// The object (apiVersion, kind, metadata with namespace and name, ...).
        object: Value,
    },
    /// A JSON merge patch of the status subresource (with a resourceVersion precondition).
    Status {
        /// The kind.
        kind: KindSpec,
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// The patch.
        patch: Value,
    },
}

impl Write {
    /// `Kind namespace/name`, for logs and errors.
    pub fn target(&self) -> String {
        match self {
            Write::Apply { kind, object } => format!(
                "{} {}/{}",
                kind.kind,
                str_at(object, &["metadata", "namespace"]),
                str_at(object, &["metadata", "name"])
            ),
            Write::Status {
                kind,
                namespace,
                name,
                ..
            } => format!("{} {namespace}/{name} status", kind.kind),
        }
    }
}

/// A write the API server refused.
#[derive(Debug, thiserror::Error)]
#[error("writing {target}: {source}")]
pub struct WriteError {
    /// What was written.
    pub target: String,
    /// The API server's answer.
    #[source]
    pub source: kube::Error,
}

fn str_at<'a>(value: &'a Value, path: &[&str]) -> &'a str {
    path.iter()
        .try_fold(value, |v, k| v.get(*k))
        .and_then(Value::as_str)
        .unwrap_or("")
}

/// The objects the controller decides from, as the API server holds them.
#[derive(Clone, Debug, Default)]
pub struct World {
    /// Every object by kind (`Gateway`, `Service`, ...).
    pub objects: BTreeMap<&'static str, Vec<Value>>,
}

impl World {
    /// What `cache` holds now.
    pub fn from_cache(cache: &Cache) -> Self {
        let objects = watches()
            .into_iter()
            .map(|w| (w.kind.kind, cache.objects(w.kind.kind)))
            .collect();
        World { objects }
    }

    fn of(&self, kind: &str) -> &[Value] {
        self.objects.get(kind).map(Vec::as_slice).unwrap_or(&[])
    }

    fn find(&self, kind: &str, namespace: &str, name: &str) -> Option<&Value> {
        self.of(kind).iter().find(|o| {
            str_at(o, &["metadata", "namespace"]) == namespace
                && str_at(o, &["metadata", "name"]) == name
        })
    }

    /// The typed objects the translation reads (invalid ones are left out: the config source
    /// reports them).
    fn cluster(&self) -> Cluster {
        let kinds = [
            NAMESPACE,
            SERVICE,
            GATEWAY,
            GATEWAY_CLASS,
            HTTP_ROUTE,
            GRPC_ROUTE,
            AUTHORIZATION_POLICY,
        ];
        Cluster::from_objects(kinds.iter().flat_map(|k| {
            self.of(k.kind)
                .iter()
                .flat_map(|v| ambit_mesh::parse_object(v.clone(), "Kubernetes").0)
        }))
    }
}

/// Every write that brings the cluster to what it should be, given `world`. Empty when nothing
/// needs to change. `now` stamps the conditions that change status.
pub fn plan(world: &World, settings: &WaypointSettings, now: &str) -> Vec<Write> {
    let mut writes = Vec::new();
    let classes: BTreeMap<&str, &Value> = world
        .of("GatewayClass")
        .iter()
        .map(|c| (str_at(c, &["metadata", "name"]), c))
        .collect();
    for gateway in world.of("Gateway") {
        let class = str_at(gateway, &["spec", "gatewayClassName"]);
        let is_waypoint = class == WAYPOINT_CLASS
            || classes
                .get(class)
                .is_some_and(|c| str_at(c, &["spec", "controllerName"]) == MESH_CONTROLLER);
        if is_waypoint {
            waypoint_writes(world, gateway, settings, now, &mut writes);
        }
    }

    let cluster = world.cluster();
    let resources = translate(&cluster, &settings.mesh);
    let route_facts = ambit_mesh::status::route_parents(&cluster, &resources);
    for (kind, spec) in [("HTTPRoute", HTTP_ROUTE), ("GRPCRoute", GRPC_ROUTE)] {
        for route in world.of(kind) {
            let key = (
                kind.to_string(),
                str_at(route, &["metadata", "namespace"]).to_string(),
                str_at(route, &["metadata", "name"]).to_string(),
            );
            let facts = route_facts.get(&key).map(Vec::as_slice).unwrap_or(&[]);
            if let Some(write) = route_status(route, spec, facts, now) {
                writes.push(write);
            }
        }
    }
    let bindings = ambit_mesh::status::service_bindings(&cluster);
    for service in world.of("Service") {
        let key = (
            str_at(service, &["metadata", "namespace"]).to_string(),
            str_at(service, &["metadata", "name"]).to_string(),
        );
        let wanted = bindings
            .get(&key)
            .map(|fact| condition(WAYPOINT_BOUND, fact, None));
        if let Some(write) = service_status(service, wanted, now) {
            writes.push(write);
        }
    }
    for policy in world.of("AuthorizationPolicy") {
        let key = format!(
            "{}/{}",
            str_at(policy, &["metadata", "namespace"]),
            str_at(policy, &["metadata", "name"])
        );
        let facts = resources
            .policy_status
            .get(&key)
            .cloned()
            .unwrap_or_default();
        if let Some(write) = policy_status(policy, &facts, now) {
            writes.push(write);
        }
    }
    writes
}

// ---------------------------------------------------------------------------------------------
// Generated objects
// ---------------------------------------------------------------------------------------------

/// The Gateway's `spec.infrastructure` labels and annotations (sorted).
fn infrastructure(gateway: &Value) -> (BTreeMap<String, Value>, BTreeMap<String, Value>) {
    let read = |field: &str| -> BTreeMap<String, Value> {
        gateway["spec"]["infrastructure"][field]
            .as_object()
            .map(|m| {
                m.iter()
                    .filter(|(k, _)| {
                        k.as_str() != "kubectl.kubernetes.io/last-applied-configuration"
                    })
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect()
            })
            .unwrap_or_default()
    };
    (read("labels"), read("annotations"))
}

fn map(entries: BTreeMap<String, Value>) -> Value {
    Value::Object(entries.into_iter().collect())
}

fn waypoint_writes(
    world: &World,
    gateway: &Value,
    settings: &WaypointSettings,
    now: &str,
    writes: &mut Vec<Write>,
) {
    let ns = str_at(gateway, &["metadata", "namespace"]);
    let name = str_at(gateway, &["metadata", "name"]);
    let class = str_at(gateway, &["spec", "gatewayClassName"]);
    let owner = json!([{
        "apiVersion": format!("{GATEWAY_GROUP}/v1"),
        "kind": "Gateway",
        "name": name,
        "uid": str_at(gateway, &["metadata", "uid"]),
    }]);
    let (infra_labels, infra_annotations) = infrastructure(gateway);
    let mut labels = infra_labels.clone();
    labels.insert(GATEWAY_NAME_LABEL.into(), name.into());
    labels.insert(GATEWAY_CLASS_LABEL.into(), class.into());
    let meta = |labels: &BTreeMap<String, Value>| {
        json!({
            "name": name,
            "namespace": ns,
            "labels": map(labels.clone()),
            "annotations": map(infra_annotations.clone()),
            "ownerReferences": owner.clone(),
        })
    };

    let account = json!({
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": meta(&labels),
    });
    let service = json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta(&labels),
        "spec": {
            "type": "ClusterIP",
            "selector": {GATEWAY_NAME_LABEL: name},
            "ports": [
                {"name": "mesh", "port": 15008, "protocol": "TCP", "targetPort": 15008},
                {"name": "status-port", "port": 15021, "protocol": "TCP", "targetPort": 15021},
            ],
        },
    });
    let mut managed = labels.clone();
    managed.insert(MANAGED_LABEL.0.into(), MANAGED_LABEL.1.into());
    let mut pod_labels: BTreeMap<String, Value> = [
        ("sidecar.istio.io/inject", "false"),
        ("istio.io/dataplane-mode", "none"),
        ("service.istio.io/canonical-name", name),
        ("service.istio.io/canonical-revision", "latest"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), Value::from(v)))
    .collect();
    pod_labels.extend(managed.clone());
    let mut pod_annotations = infra_annotations.clone();
    for (k, v) in [
        ("prometheus.io/scrape", "true"),
        ("prometheus.io/port", "15020"),
        ("prometheus.io/path", "/stats/prometheus"),
    ] {
        pod_annotations.insert(k.into(), v.into());
    }
    let deployment = json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta(&managed),
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {GATEWAY_NAME_LABEL: name}},
            "template": {
                "metadata": {"labels": map(pod_labels), "annotations": map(pod_annotations)},
                "spec": {
                    "serviceAccountName": name,
                    "containers": [container(ns, name, class, settings)],
                    "volumes": [
                        {"name": "istio-token", "projected": {"sources": [{"serviceAccountToken": {
                            "audience": crate::auth::ISTIO_CA_AUDIENCE,
                            "expirationSeconds": 43200,
                            "path": "istio-token",
                        }}]}},
                        {"name": "istiod-ca-cert", "configMap": {"name": ROOT_CONFIGMAP}},
                    ],
                },
            },
        },
    });
    for (kind, object) in [
        (SERVICE_ACCOUNT, account),
        (SERVICE, service),
        (DEPLOYMENT, deployment),
    ] {
        let object = with_hash(object);
        let live_hash = world
            .find(kind.kind, ns, name)
            .map(|live| str_at(live, &["metadata", "annotations", APPLIED_HASH]));
        if live_hash != Some(str_at(&object, &["metadata", "annotations", APPLIED_HASH])) {
            writes.push(Write::Apply { kind, object });
        }
    }
    if let Some(write) = gateway_status(world, gateway, settings, now) {
        writes.push(write);
    }
}

/// The waypoint container: the binary's environment, ports, probe, limits and hardening.
fn container(ns: &str, name: &str, class: &str, settings: &WaypointSettings) -> Value {
    let field = |path: &str| json!({"fieldRef": {"fieldPath": path}});
    let token = format!("{TOKEN_DIR}/istio-token");
    let root = format!("{ROOT_DIR}/root-cert.pem");
    let env: Vec<Value> = [
        ("XDS_ADDRESS", json!(settings.xds_address)),
        ("CA_ADDRESS", json!(settings.xds_address)),
        ("XDS_ROOT_CA", json!(root)),
        ("CA_ROOT_CA", json!(root)),
        ("AUTH_TOKEN", json!(token)),
        ("CLUSTER_ID", json!(settings.mesh.cluster_id)),
        ("TRUST_DOMAIN", json!(settings.mesh.trust_domain)),
        ("GATEWAY_NAME", json!(name)),
        ("GATEWAY_NAMESPACE", json!(ns)),
        ("GATEWAY_CLASS", json!(class)),
        ("HBONE_ADDR", json!("[::]:15008")),
        ("STATS_ADDR", json!("[::]:15020")),
        ("READINESS_ADDR", json!("[::]:15021")),
        ("ADMIN_ADDR", json!("127.0.0.1:15000")),
    ]
    .into_iter()
    .chain(settings.tracing.iter().flat_map(|t| {
        [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", json!(t.endpoint)),
            ("TRACE_SAMPLING", json!(t.sampling.to_string())),
        ]
    }))
    .map(|(k, v)| json!({"name": k, "value": v}))
    .chain(
        [
            ("POD_NAME", "metadata.name"),
            ("POD_NAMESPACE", "metadata.namespace"),
            ("SERVICE_ACCOUNT", "spec.serviceAccountName"),
            ("NODE_NAME", "spec.nodeName"),
            ("INSTANCE_IP", "status.podIP"),
        ]
        .into_iter()
        .map(|(k, path)| json!({"name": k, "valueFrom": field(path)})),
    )
    .collect();
    json!({
        "name": "waypoint",
        "image": settings.image,
        "env": env,
        "ports": [
            {"name": "hbone", "containerPort": 15008, "protocol": "TCP"},
            {"name": "metrics", "containerPort": 15020, "protocol": "TCP"},
            {"name": "status-port", "containerPort": 15021, "protocol": "TCP"},
        ],
        "readinessProbe": {
            "httpGet": {"path": "/healthz/ready", "port": 15021, "scheme": "HTTP"},
            "periodSeconds": 5,
            "failureThreshold": 4,
        },
        "resources": {
            "requests": {"cpu": "100m", "memory": "128Mi"},
            "limits": {"cpu": "2", "memory": "1Gi"},
        },
        "securityContext": {
            "privileged": false,
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "runAsNonRoot": true,
            "runAsUser": 1337,
            "runAsGroup": 1337,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [
            {"name": "istio-token", "mountPath": TOKEN_DIR, "readOnly": true},
            {"name": "istiod-ca-cert", "mountPath": ROOT_DIR, "readOnly": true},
        ],
    })
}

/// `object` with [`APPLIED_HASH`]: the first 64 bits of the SHA-256 of its canonical form.
fn with_hash(mut object: Value) -> Value {
    let mut text = String::new();
    canonical(&object, &mut text);
    let digest = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
    let hash: String = digest.as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    if !object["metadata"]["annotations"].is_object() {
        object["metadata"]["annotations"] = json!({});
    }
    object["metadata"]["annotations"][APPLIED_HASH] = Value::String(hash);
    object
}

/// JSON with object keys sorted: the same text for the same content, whatever the key order.
fn canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                canonical(&map[k], out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                canonical(item, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

// ---------------------------------------------------------------------------------------------
// Status
// ---------------------------------------------------------------------------------------------

/// A condition as written (without `lastTransitionTime`, added by [`merge_conditions`]).
fn condition(kind: &str, fact: &Fact, generation: Option<i64>) -> Value {
    let mut c = json!({
        "type": kind,
        "status": if fact.status { "True" } else { "False" },
        "reason": fact.reason,
        "message": fact.message,
    });
    if let Some(generation) = generation {
        c["observedGeneration"] = json!(generation);
    }
    c
}

/// `existing` with the conditions of the types in `owned` replaced by `wanted` (dropped when not
/// wanted); others' conditions are kept. A condition whose status did not change keeps its
/// `lastTransitionTime`; a new or flipped one gets `now`.
fn merge_conditions(existing: &[Value], owned: &[&str], wanted: &[Value], now: &str) -> Vec<Value> {
    let mut out: Vec<Value> = existing
        .iter()
        .filter(|c| !owned.contains(&c["type"].as_str().unwrap_or("")))
        .cloned()
        .collect();
    for want in wanted {
        let mut c = want.clone();
        let before = existing.iter().find(|e| e["type"] == want["type"]);
        c["lastTransitionTime"] = match before {
            Some(b) if b["status"] == want["status"] && b["lastTransitionTime"].is_string() => {
                b["lastTransitionTime"].clone()
            }
            _ => json!(now),
        };
        out.push(c);
    }
    out
}

fn conditions_of(value: &Value) -> &[Value] {
    value.as_array().map(Vec::as_slice).unwrap_or(&[])
}

fn generation(object: &Value) -> Option<i64> {
    object["metadata"]["generation"].as_i64()
}

fn status_patch(kind: KindSpec, object: &Value, status: Value) -> Write {
    Write::Status {
        kind,
        namespace: str_at(object, &["metadata", "namespace"]).to_string(),
        name: str_at(object, &["metadata", "name"]).to_string(),
        patch: json!({
            "metadata": {"resourceVersion": object["metadata"]["resourceVersion"]},
            "status": status,
        }),
    }
}

/// The Gateway's `Accepted`: always, as Istio does, but naming the listeners a waypoint ignores
/// (it serves HBONE on 15008 only).
fn gateway_accepted(gateway: &Value) -> Fact {
    let listeners = gateway["spec"]["listeners"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    let ignored: Vec<String> = listeners
        .iter()
        .filter(|l| !(l["protocol"] == "HBONE" && l["port"] == 15008))
        .map(|l| {
            format!(
                "{} ({} {})",
                l["name"].as_str().unwrap_or("?"),
                l["protocol"].as_str().unwrap_or("?"),
                l["port"]
            )
        })
        .collect();
    let message = if ignored.is_empty() && listeners.len() == 1 {
        "Resource accepted".to_string()
    } else if ignored.is_empty() {
        "Resource accepted; a waypoint needs a single listener, protocol HBONE on port 15008"
            .to_string()
    } else {
        format!(
            "Resource accepted; listeners ignored, a waypoint serves only HBONE on port 15008: {}",
            ignored.join(", ")
        )
    };
    Fact {
        status: true,
        reason: "Accepted".into(),
        message,
    }
}

fn gateway_status(
    world: &World,
    gateway: &Value,
    settings: &WaypointSettings,
    now: &str,
) -> Option<Write> {
    let ns = str_at(gateway, &["metadata", "namespace"]);
    let name = str_at(gateway, &["metadata", "name"]);
    let generation = generation(gateway);
    let service = world.find("Service", ns, name);
    let addresses: Vec<Value> = match service {
        Some(_) => vec![json!({
            "type": "Hostname",
            "value": format!("{name}.{ns}.svc.{}", settings.mesh.domain_suffix),
        })],
        None => Vec::new(),
    };
    let available = world
        .find("Deployment", ns, name)
        .and_then(|d| d["status"]["availableReplicas"].as_i64())
        .unwrap_or(0);
    let programmed = match (service, available) {
        (None, _) => Fact {
            status: false,
            reason: "AddressNotAssigned".into(),
            message: format!("waiting for Service {ns}/{name}"),
        },
        (Some(_), 0) => Fact {
            status: false,
            reason: "Pending".into(),
            message: format!("waiting for Deployment {ns}/{name} to have an available replica"),
        },
        (Some(_), n) => Fact {
            status: true,
            reason: "Programmed".into(),
            message: format!(
                "Resource programmed, {n} available replica(s) of Deployment {ns}/{name}"
            ),
        },
    };
    let wanted = [
        condition("Accepted", &gateway_accepted(gateway), generation),
        condition("Programmed", &programmed, generation),
    ];
    let existing = conditions_of(&gateway["status"]["conditions"]);
    let conditions = merge_conditions(existing, &["Accepted", "Programmed"], &wanted, now);
    let current_addresses = gateway["status"]["addresses"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if conditions == existing && addresses == current_addresses {
        return None;
    }
    Some(status_patch(
        GATEWAY,
        gateway,
        json!({"addresses": addresses, "conditions": conditions}),
    ))
}

fn route_status(route: &Value, kind: KindSpec, facts: &[ParentFacts], now: &str) -> Option<Write> {
    let generation = generation(route);
    let existing = route["status"]["parents"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    let ours = |p: &Value| p["controllerName"] == ROUTE_CONTROLLER;
    let mut parents: Vec<Value> = existing.iter().filter(|p| !ours(p)).cloned().collect();
    for fact in facts {
        let mut parent_ref = json!({"group": "", "kind": "Service", "name": fact.parent.name});
        if let Some(ns) = &fact.parent.namespace {
            parent_ref["namespace"] = json!(ns);
        }
        if let Some(port) = fact.parent.port {
            parent_ref["port"] = json!(port);
        }
        let before = existing
            .iter()
            .find(|p| ours(p) && p["parentRef"] == parent_ref)
            .map(|p| conditions_of(&p["conditions"]))
            .unwrap_or(&[]);
        let wanted = [
            condition("Accepted", &fact.accepted, generation),
            condition("ResolvedRefs", &fact.resolved_refs, generation),
        ];
        parents.push(json!({
            "parentRef": parent_ref,
            "controllerName": ROUTE_CONTROLLER,
            "conditions": merge_conditions(before, &["Accepted", "ResolvedRefs"], &wanted, now),
        }));
    }
    if parents == existing {
        return None;
    }
    Some(status_patch(kind, route, json!({"parents": parents})))
}

fn service_status(service: &Value, wanted: Option<Value>, now: &str) -> Option<Write> {
    let existing = conditions_of(&service["status"]["conditions"]);
    let conditions = merge_conditions(existing, &[WAYPOINT_BOUND], wanted.as_slice(), now);
    if conditions == existing {
        return None;
    }
    Some(status_patch(
        SERVICE,
        service,
        json!({"conditions": conditions}),
    ))
}

/// An AuthorizationPolicy's `ZtunnelAccepted` and `WaypointAccepted` (each only when it
/// applies; a stale one is removed), with the generation they describe.
fn policy_status(policy: &Value, facts: &PolicyFacts, now: &str) -> Option<Write> {
    let existing = conditions_of(&policy["status"]["conditions"]);
    let generation = generation(policy);
    let wanted: Vec<Value> = [
        (ZTUNNEL_ACCEPTED, &facts.ztunnel),
        (WAYPOINT_ACCEPTED, &facts.waypoint),
    ]
    .into_iter()
    .filter_map(|(kind, fact)| fact.as_ref().map(|f| condition(kind, f, generation)))
    .collect();
    let conditions = merge_conditions(
        existing,
        &[ZTUNNEL_ACCEPTED, WAYPOINT_ACCEPTED],
        &wanted,
        now,
    );
    if conditions == existing {
        return None;
    }
    Some(status_patch(
        AUTHORIZATION_POLICY,
        policy,
        json!({"conditions": conditions}),
    ))
}

// ---------------------------------------------------------------------------------------------
// Running
// ---------------------------------------------------------------------------------------------

/// The controller: a cache of what it watches and a client to write with.
#[derive(Clone)]
pub struct Controller {
    client: kube::Client,
    cache: Cache,
    settings: WaypointSettings,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Controller {
    /// A controller and the future that keeps its cache current (run it on a task).
    pub fn new(
        client: kube::Client,
        settings: WaypointSettings,
    ) -> (Controller, impl Future<Output = ()> + Send + 'static) {
        let (cache, feed) = Cache::new(client.clone(), watches());
        (
            Controller {
                client,
                cache,
                settings,
            },
            feed,
        )
    }

    /// The cache the controller decides from.
    pub fn cache(&self) -> &Cache {
        &self.cache
    }

    /// Plans from the cache and performs every write; returns how many were made. Every write
    /// is tried; the errors of those refused (say a 409 after a concurrent change) are returned
    /// together, and the next reconcile plans again from what the API server then holds.
    pub async fn reconcile(&self) -> Result<usize, Vec<WriteError>> {
        // Seconds, as the API server writes times.
        let now = serde_json::to_value(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::now(),
        ))
        .ok()
        .and_then(|t| t.as_str().map(str::to_string))
        .unwrap_or_default();
        let writes = plan(&World::from_cache(&self.cache), &self.settings, &now);
        let mut errors = Vec::new();
        let mut made = 0;
        for write in writes {
            let target = write.target();
            match self.perform(write).await {
                Ok(()) => {
                    tracing::info!(object = %target, "waypoint controller wrote");
                    made += 1;
                }
                Err(source) => errors.push(WriteError { target, source }),
            }
        }
        if errors.is_empty() {
            Ok(made)
        } else {
            Err(errors)
        }
    }

    async fn perform(&self, write: Write) -> Result<(), kube::Error> {
        match write {
            Write::Apply { kind, object } => {
                let ns = str_at(&object, &["metadata", "namespace"]).to_string();
                let name = str_at(&object, &["metadata", "name"]).to_string();
                let api: Api<DynamicObject> =
                    Api::namespaced_with(self.client.clone(), &ns, &kind.api_resource());
                api.patch(
                    &name,
                    &PatchParams::apply(FIELD_MANAGER).force(),
                    &Patch::Apply(&object),
                )
                .await?;
            }
            Write::Status {
                kind,
                namespace,
                name,
                patch,
            } => {
                let api: Api<DynamicObject> =
                    Api::namespaced_with(self.client.clone(), &namespace, &kind.api_resource());
                let params = PatchParams {
                    field_manager: Some(FIELD_MANAGER.to_string()),
                    ..PatchParams::default()
                };
                api.patch_status(&name, &params, &Patch::Merge(&patch))
                    .await?;
            }
        }
        Ok(())
    }

    /// Reconciles whenever the cache changes (at most once per `debounce`), once every kind is
    /// listed; failed writes are retried with backoff (up to 30 s). Runs forever.
    pub async fn run(self, debounce: Duration) {
        let mut changes = self.cache.subscribe();
        let mut retry: Option<Duration> = None;
        loop {
            match retry {
                Some(delay) => {
                    let _ = tokio::time::timeout(delay, changes.changed()).await;
                }
                None => {
                    if changes.changed().await.is_err() {
                        return;
                    }
                }
            }
            tokio::time::sleep(debounce).await;
            changes.borrow_and_update();
            if !self.cache.synced() {
                continue;
            }
            match self.reconcile().await {
                Ok(_) => retry = None,
                Err(errors) => {
                    for error in &errors {
                        tracing::warn!(%error, "waypoint controller write failed; will retry");
                    }
                    let next = retry.map_or(Duration::from_millis(500), |d| d * 2);
                    retry = Some(next.min(Duration::from_secs(30)));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conditions_keep_their_transition_time_unless_their_status_flips() {
        let existing = vec![
            json!({"type": "Other", "status": "True", "lastTransitionTime": "t0"}),
            json!({"type": "Accepted", "status": "True", "reason": "Old", "lastTransitionTime": "t1"}),
            json!({"type": "Programmed", "status": "False", "lastTransitionTime": "t1"}),
        ];
        let wanted = [
            json!({"type": "Accepted", "status": "True", "reason": "New"}),
            json!({"type": "Programmed", "status": "True"}),
        ];
        let merged = merge_conditions(&existing, &["Accepted", "Programmed"], &wanted, "t2");
        assert_eq!(merged[0]["type"], "Other");
        assert_eq!(merged[1]["reason"], "New");
        assert_eq!(merged[1]["lastTransitionTime"], "t1");
        assert_eq!(merged[2]["lastTransitionTime"], "t2");
        let dropped = merge_conditions(&existing, &["Accepted", "Programmed"], &[], "t2");
        assert_eq!(dropped.len(), 1);
    }

    #[test]
    fn the_hash_ignores_key_order() {
        let a = with_hash(
            json!({"metadata": {"name": "x"}, "spec": {"a": 1, "b": [1, {"c": 2, "d": 3}]}}),
        );
        let b = with_hash(
            json!({"spec": {"b": [1, {"d": 3, "c": 2}], "a": 1}, "metadata": {"name": "x"}}),
        );
        let c = with_hash(
            json!({"spec": {"b": [{"d": 3, "c": 2}, 1], "a": 1}, "metadata": {"name": "x"}}),
        );
        let hash = |v: &Value| str_at(v, &["metadata", "annotations", APPLIED_HASH]).to_string();
        assert_eq!(hash(&a), hash(&b));
        assert_ne!(hash(&a), hash(&c));
        assert_eq!(hash(&a).len(), 16);
    }

    #[test]
    fn listeners_other_than_one_hbone_on_15008_are_named_in_acceptance() {
        let ok = gateway_accepted(&json!({"spec": {"listeners": [
            {"name": "mesh", "port": 15008, "protocol": "HBONE"}]}}));
        assert!(ok.status);
        assert_eq!(ok.message, "Resource accepted");
        let extra = gateway_accepted(&json!({"spec": {"listeners": [
            {"name": "mesh", "port": 15008, "protocol": "HBONE"},
            {"name": "web", "port": 80, "protocol": "HTTP"}]}}));
        assert!(extra.status, "Istio accepts with a warning");
        assert!(extra.message.contains("web (HTTP 80)"), "{}", extra.message);
    }
}
