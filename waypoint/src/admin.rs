//! The admin endpoint on localhost:15000: `/config_dump` (what the waypoint serves: its Gateway,
//! routes, policies, the services and workloads it knows, its certificate, its settings, with
//! ztunnel's names for what both hold) and `/logging`.

use std::sync::Arc;

use ambit_core::http::{Handler, json, text};
use ambit_core::logging::LogHandle;
use ambit_identity::store::CertStore;
use ambit_state::Addresses;
use http::{Method, StatusCode};
use serde_json::{Value, json};

use crate::proxy::Proxy;

/// What the admin endpoint shows and changes.
#[derive(Clone)]
pub struct AdminState {
    /// The data path (routes and policies in force).
    pub proxy: Arc<Proxy>,
    /// Services and workloads.
    pub state: Addresses,
    /// The waypoint's certificate (shown without keys).
    pub certs: CertStore,
    /// Runtime log level.
    pub log: Option<LogHandle>,
    /// The effective settings.
    pub config: Vec<(String, String)>,
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
                    "waypoint admin\n  GET /config_dump\n  GET|POST /logging[?level=<filter>|reset]\n",
                ),
                _ => text(StatusCode::NOT_FOUND, "not found; try GET /\n"),
            }
        }
    })
}

/// Everything the waypoint holds, as JSON (no private keys). What ztunnel's dump also has uses
/// its names and shapes (upstream ztunnel's): `workloads`, `services` (each with the waypoint's
/// own `hasRoutes`), `policies`, `certificates`, `version`, `config`; the rest is the waypoint's
/// (`gateway`, `gatewayClass`, `routes`, `ejectedEndpoints`, and `connections`: the TCP
/// connections it proxies at L4 right now, each as ztunnel lists its own; HTTP is accounted per
/// request, in the metrics and access log).
pub fn config_dump(state: &AdminState) -> Value {
    let l7 = state.proxy.l7();
    let settings = state.proxy.settings();
    let (workloads, mut services) = {
        let index = state.state.index();
        ambit_state::dump::workloads_and_services(&index)
    };
    for service in &mut services {
        let key = format!(
            "{}/{}",
            service["namespace"].as_str().unwrap_or_default(),
            service["hostname"].as_str().unwrap_or_default()
        );
        service["hasRoutes"] = Value::Bool(l7.routes.has_routes(&key));
    }
    let policies = ambit_authz::dump::policies(l7.policies.iter().map(|p| &**p));
    let certificates = ambit_identity::dump::certificates(&state.certs.snapshot());
    let config: serde_json::Map<String, Value> = state
        .config
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    let ejected: Vec<Value> = state
        .proxy
        .traffic()
        .ejected()
        .into_iter()
        .map(|(service, workload, left)| {
            json!({"service": service, "workload": workload, "ejectedForSeconds": left})
        })
        .collect();
    let now = std::time::SystemTime::now();
    let connections: Vec<Value> = state
        .proxy
        .connections()
        .snapshot()
        .iter()
        .map(|c| ambit_telemetry::dump::connection(c, now))
        .collect();
    json!({
        "gateway": settings.gateway,
        "gatewayClass": settings.gateway_class,
        "routes": l7.route_names,
        "ejectedEndpoints": ejected,
        "connections": connections,
        "workloads": workloads,
        "services": services,
        "policies": policies,
        "certificates": certificates,
        "version": {
            "version": env!("CARGO_PKG_VERSION"),
            "buildProfile": if cfg!(debug_assertions) { "debug" } else { "release" },
        },
        "config": config,
    })
}
