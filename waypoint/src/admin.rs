//! The admin endpoint on localhost:15000: `/config_dump` (what the waypoint serves: its Gateway,
//! routes, policies, the services and workloads it knows, its certificate, its settings) and
//! `/logging`.

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

/// Everything the waypoint holds, as JSON (no private keys).
pub fn config_dump(state: &AdminState) -> Value {
    let l7 = state.proxy.l7();
    let settings = state.proxy.settings();
    let (workloads, services) = {
        let index = state.state.index();
        let services: Vec<Value> = index
            .services()
            .map(|s| {
                json!({
                    "name": s.key.to_string(),
                    "hostname": s.hostname.to_string(),
                    "vips": s.vips.iter().map(|(n, ip)| format!("{n}/{ip}")).collect::<Vec<_>>(),
                    "hasRoutes": l7.routes.has_routes(&s.key),
                })
            })
            .collect();
        (index.workloads().count(), services)
    };
    let policies: Vec<Value> = l7
        .policies
        .iter()
        .map(|p| json!({"name": p.key(), "action": p.action.to_string(), "dryRun": p.dry_run}))
        .collect();
    let certificates: Vec<Value> = state
        .certs
        .snapshot()
        .into_iter()
        .map(|c| {
            json!({
                "identity": c.identity.to_string(),
                "state": format!("{:?}", c.state),
                "expiresInSeconds": c.not_after.and_then(|t| t.duration_since(std::time::SystemTime::now()).ok()).map(|d| d.as_secs()),
            })
        })
        .collect();
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
    json!({
        "gateway": settings.gateway,
        "ejectedEndpoints": ejected,
        "gatewayClass": settings.gateway_class,
        "routes": l7.route_names,
        "policies": policies,
        "services": services,
        "workloadCount": workloads,
        "certificates": certificates,
        "config": config,
    })
}
