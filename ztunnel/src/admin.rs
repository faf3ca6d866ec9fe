//! The admin endpoint on localhost:15000 (`/config_dump`, `/logging`). The Prometheus (:15020)
//! and readiness (:15021) handlers are the shared ones of `ambit_core::endpoints`.

use std::sync::Arc;

use ambit_authz::Policy;
use ambit_core::http::{Handler, json, text};
use ambit_core::logging::LogHandle;
use ambit_identity::store::CertStore;
use ambit_state::{GatewayAddress, GatewayDestination, Service, Workload};
use http::{Method, StatusCode};
use serde_json::{Value, json};

use crate::mesh::MeshState;

/// A source of extra `/config_dump` sections (the in-pod manager's pods).
pub type DumpSection = Arc<dyn Fn() -> Value + Send + Sync>;

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
    /// Extra sections by name.
    pub sections: Vec<(&'static str, DumpSection)>,
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

/// The whole configuration as JSON (no private keys).
pub fn config_dump(state: &AdminState) -> Value {
    let (workloads, services) = {
        let index = state.mesh.index();
        (
            index
                .workloads()
                .map(|w| workload_json(w))
                .collect::<Vec<_>>(),
            index
                .services()
                .map(|s| service_json(s))
                .collect::<Vec<_>>(),
        )
    };
    let policies: Vec<Value> = state
        .mesh
        .policies()
        .iter()
        .map(|p| policy_json(p))
        .collect();
    let certificates: Vec<Value> = state
        .certs
        .snapshot()
        .into_iter()
        .map(|c| {
            json!({
                "identity": c.identity.to_string(),
                "state": format!("{:?}", c.state),
                "notBefore": c.not_before.map(|t| humantime::format_rfc3339_seconds(t).to_string()),
                "notAfter": c.not_after.map(|t| humantime::format_rfc3339_seconds(t).to_string()),
                "certChain": c.chain_pem,
                "rootCerts": c.roots_pem,
            })
        })
        .collect();
    let mut dump = json!({
        "workloads": workloads,
        "services": services,
        "policies": policies,
        "certificates": certificates,
        "config": state.config.iter().map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect::<serde_json::Map<_, _>>(),
    });
    for (name, section) in &state.sections {
        dump[*name] = section();
    }
    dump
}

fn waypoint_json(w: &Option<Box<GatewayAddress>>) -> Value {
    match w.as_deref() {
        None => Value::Null,
        Some(g) => match &g.destination {
            GatewayDestination::Hostname {
                namespace,
                hostname,
            } => json!({"service": format!("{namespace}/{hostname}"), "port": g.hbone_port}),
            GatewayDestination::Address { network, ip } => {
                json!({"address": format!("{network}/{ip}"), "port": g.hbone_port})
            }
        },
    }
}

fn workload_json(w: &Workload) -> Value {
    json!({
        "uid": &*w.uid,
        "name": &*w.name,
        "namespace": &*w.namespace,
        "serviceAccount": &*w.service_account,
        "trustDomain": &*w.trust_domain,
        "node": &*w.node,
        "network": &*w.network,
        "clusterId": &*w.cluster_id,
        "addresses": w.addresses.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
        "protocol": format!("{:?}", w.protocol).to_uppercase(),
        "waypoint": waypoint_json(&w.waypoint),
        "canonicalName": &*w.canonical_name,
        "canonicalRevision": &*w.canonical_revision,
        "workloadName": &*w.workload_name,
        "services": w.services.iter().map(|(k, ports)| {
            (k.to_string(), ports.iter().map(|(s, t)| (s.to_string(), Value::from(*t))).collect::<serde_json::Map<_, _>>().into())
        }).collect::<serde_json::Map<String, Value>>(),
        "authorizationPolicies": w.authorization_policies.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
        "healthy": w.healthy,
    })
}

fn service_json(s: &Service) -> Value {
    json!({
        "name": &*s.name,
        "namespace": &*s.namespace,
        "hostname": &*s.hostname,
        "vips": s.vips.iter().map(|(n, ip)| format!("{n}/{ip}")).collect::<Vec<_>>(),
        "ports": s.ports.iter().map(|p| (p.service_port.to_string(), Value::from(p.target_port))).collect::<serde_json::Map<_, _>>(),
        "waypoint": waypoint_json(&s.waypoint),
        "loadBalancing": s.load_balancing.as_ref().map(|lb| json!({
            "mode": format!("{:?}", lb.mode),
            "routingPreference": lb.preferences.iter().map(|p| format!("{p:?}")).collect::<Vec<_>>(),
        })),
    })
}

fn policy_json(p: &Policy) -> Value {
    json!({
        "name": p.key(),
        "scope": format!("{:?}", p.scope),
        "action": format!("{:?}", p.action),
        "dryRun": p.dry_run,
        "rules": format!("{:?}", p.rules),
    })
}
