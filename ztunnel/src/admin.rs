//! The admin endpoint on localhost:15000 (`/config_dump`, `/logging`). The Prometheus (:15020)
//! and readiness (:15021) handlers are the shared ones of `ambit_core::endpoints`.
//!
//! `/config_dump` has upstream ztunnel's shape, so `istioctl ztunnel-config` and Kiali read it:
//! `workloads`, `services`, `policies`, `stagedServices`, `certificates`, `workloadState` (the
//! pods this node serves, by uid, with their open connections), `staticConfig`, `version` and
//! `config` (Ambit's settings by environment variable name). Inside, the field names and value
//! shapes are upstream's; what only Ambit knows is under keys upstream does not use (`bytesSent`,
//! `peerIdentity`, ... on a connection). Never a private key.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;

use ambit_core::http::{Handler, json, text};
use ambit_core::logging::LogHandle;
use ambit_identity::store::CertStore;
use ambit_telemetry::{LiveConnection, LiveConnections};
use http::{Method, StatusCode};
use serde_json::{Map, Value, json};

use crate::inpod::InPodManager;
use crate::mesh::MeshState;

/// What the admin endpoint shows and changes.
#[derive(Clone)]
pub struct AdminState {
    /// Workloads, services, policies.
    pub mesh: MeshState,
    /// Certificates (shown without keys).
    pub certs: CertStore,
    /// Runtime log level.
    pub log: Option<LogHandle>,
    /// The effective settings.
    pub config: Vec<(String, String)>,
    /// Every open connection.
    pub connections: LiveConnections,
    /// The pods handed over by the node agent (in-pod mode).
    pub inpod: Option<InPodManager>,
}

impl std::fmt::Debug for AdminState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminState").finish_non_exhaustive()
    }
}

/// The admin handler.
pub fn admin_handler(state: AdminState) -> Handler {
    let state = Arc::new(state);
    Handler::new(move |request| {
        let state = state.clone();
        async move {
            match (request.method(), request.uri().path()) {
                (&Method::GET, "/config_dump") => {
                    json(StatusCode::OK, format!("{:#}\n", config_dump(&state)))
                }
                (_, "/logging") => {
                    ambit_core::endpoints::logging(state.log.as_ref(), request.uri().query())
                }
                (&Method::GET, "/") => text(
                    StatusCode::OK,
                    "ztunnel admin\n  GET /config_dump\n  GET|POST /logging[?level=<filter>|reset]\n",
                ),
                _ => text(StatusCode::NOT_FOUND, "not found; try GET /\n"),
            }
        }
    })
}

/// The build, in upstream's `version` shape.
pub fn version() -> Value {
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "gitRevision": option_env!("AMBIT_GIT_REVISION").unwrap_or("unknown"),
        "rustVersion": option_env!("AMBIT_RUST_VERSION").unwrap_or("unknown"),
        "buildProfile": if cfg!(debug_assertions) { "debug" } else { "release" },
        "buildStatus": "Clean",
        "gitTag": env!("CARGO_PKG_VERSION"),
        "istioVersion": "unknown",
    })
}

/// The whole configuration as JSON (no private keys).
pub fn config_dump(state: &AdminState) -> Value {
    let (workloads, services) = {
        let index = state.mesh.index();
        ambit_state::dump::workloads_and_services(&index)
    };
    let policies = ambit_authz::dump::policies(state.mesh.policies().iter().map(|p| &**p));
    let certificates = ambit_identity::dump::certificates(&state.certs.snapshot());
    let config: Map<String, Value> = state
        .config
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    let pods = state
        .inpod
        .as_ref()
        .map(InPodManager::pod_states)
        .unwrap_or_default();
    json!({
        "workloads": workloads,
        "services": services,
        "policies": policies,
        "stagedServices": {},
        "certificates": certificates,
        "workloadState": workload_state(state, &pods, state.connections.snapshot()),
        "staticConfig": {"workloads": [], "services": [], "policies": []},
        "version": version(),
        "config": config,
    })
}

/// `workloadState`: each pod served, by uid, with its `state`, `info` and open `connections`
/// (`inbound` and `outbound`, each `src`, `originalDst`, `actualDst`, `protocol` as upstream, and
/// Ambit's `peerIdentity`, `bytesSent`, `bytesReceived`, `durationSeconds`). Connections of a pod
/// not handed over by the node agent (host mode) are listed under their pod's uid too.
fn workload_state(
    state: &AdminState,
    pods: &BTreeMap<String, crate::inpod::PodState>,
    connections: Vec<LiveConnection>,
) -> Value {
    let mut out: BTreeMap<String, Value> = pods
        .iter()
        .map(|(uid, pod)| {
            (
                uid.clone(),
                json!({
                    "state": pod.state,
                    "connections": {"inbound": [], "outbound": []},
                    "info": {
                        "name": pod.name,
                        "namespace": pod.namespace,
                        "trustDomain": pod.identity.trust_domain(),
                        "serviceAccount": pod.identity.service_account(),
                    },
                }),
            )
        })
        .collect();
    let now = SystemTime::now();
    for c in connections {
        let entry = out.entry(c.owner.clone()).or_insert_with(|| {
            let index = state.mesh.index();
            let w = index.workload(&c.owner);
            json!({
                "state": "Up",
                "connections": {"inbound": [], "outbound": []},
                "info": {
                    "name": w.map(|w| w.name.to_string()).unwrap_or_default(),
                    "namespace": w.map(|w| w.namespace.to_string()).unwrap_or_default(),
                    "trustDomain": w.map(|w| w.trust_domain.to_string()).unwrap_or_default(),
                    "serviceAccount": w.map(|w| w.service_account.to_string()).unwrap_or_default(),
                },
            })
        });
        let direction = if c.direction() == "outbound" {
            "outbound"
        } else {
            "inbound"
        };
        if let Some(list) = entry["connections"][direction].as_array_mut() {
            list.push(ambit_telemetry::dump::connection(&c, now));
        }
    }
    Value::Object(out.into_iter().collect())
}
