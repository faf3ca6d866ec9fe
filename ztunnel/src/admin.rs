//! The operator endpoints: admin on localhost:15000 (`/config_dump`, `/logging`), Prometheus on
//! :15020 (`/metrics`, `/stats/prometheus`) and readiness on :15021 (`/healthz/ready`).

use std::sync::Arc;

use ambit_authz::Policy;
use ambit_core::http::{Handler, json, text};
use ambit_core::logging::LogHandle;
use ambit_core::metrics::Registry;
use ambit_core::readiness::Readiness;
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
                (_, "/logging") => logging(&state, request.uri().query()),
                (&Method::GET, "/") => text(
                    StatusCode::OK,
                    "ztunnel admin\n  GET /config_dump\n  GET|POST /logging[?level=<filter>|reset]\n",
                ),
                _ => text(StatusCode::NOT_FOUND, "not found; try GET /\n"),
            }
        }
    })
}

fn logging(
    state: &AdminState,
    query: Option<&str>,
) -> http::Response<http_body_util::Full<bytes::Bytes>> {
    let Some(log) = &state.log else {
        return text(
            StatusCode::NOT_IMPLEMENTED,
            "logging is not managed by this process\n",
        );
    };
    let level = query.and_then(|q| {
        q.split('&')
            .find_map(|kv| kv.strip_prefix("level="))
            .map(|v| v.replace("%3D", "=").replace("%2C", ","))
    });
    let reset = query.is_some_and(|q| q.split('&').any(|kv| kv == "reset"));
    let result = match (level, reset) {
        (_, true) => log.reset(),
        (Some(level), false) => log.set_level(&level),
        (None, false) => Ok(()),
    };
    match result {
        Ok(()) => text(
            StatusCode::OK,
            format!("current log level: {}\n", log.current()),
        ),
        Err(e) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
    }
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

/// Refreshes the gauges computed from current state (certificates) just before a scrape.
pub fn certificate_gauges(registry: &Registry, certs: &CertStore) {
    registry.describe_gauge(
        "ambit_certificates",
        "Workload certificates managed by this ztunnel, by state",
    );
    registry.describe_gauge(
        "ambit_certificate_expiry_seconds",
        "Seconds until the certificate of each identity expires (negative: expired)",
    );
    let mut by_state: std::collections::BTreeMap<&'static str, f64> = [
        ("initializing", 0.0),
        ("available", 0.0),
        ("refreshing", 0.0),
        ("failing", 0.0),
    ]
    .into_iter()
    .collect();
    let now = std::time::SystemTime::now();
    for status in certs.snapshot() {
        let state = match status.state {
            ambit_identity::store::CertState::Initializing => "initializing",
            ambit_identity::store::CertState::Available => "available",
            ambit_identity::store::CertState::Refreshing => "refreshing",
            ambit_identity::store::CertState::Failing { .. } => "failing",
        };
        *by_state.entry(state).or_default() += 1.0;
        if let Some(not_after) = status.not_after {
            let remaining = match not_after.duration_since(now) {
                Ok(d) => d.as_secs_f64(),
                Err(e) => -e.duration().as_secs_f64(),
            };
            registry
                .gauge(
                    "ambit_certificate_expiry_seconds",
                    &[("identity", status.identity.to_string())],
                )
                .set(remaining);
        }
    }
    for (state, count) in by_state {
        registry
            .gauge("ambit_certificates", &[("state", state.to_string())])
            .set(count);
    }
}

/// The Prometheus handler; `before_scrape` refreshes computed gauges.
pub fn metrics_handler(
    registry: Registry,
    before_scrape: Arc<dyn Fn(&Registry) + Send + Sync>,
) -> Handler {
    Handler::new(move |request| {
        let registry = registry.clone();
        let before_scrape = before_scrape.clone();
        async move {
            match request.uri().path() {
                "/metrics" | "/stats/prometheus" => {
                    before_scrape(&registry);
                    let mut response = text(StatusCode::OK, registry.render());
                    response.headers_mut().insert(
                        http::header::CONTENT_TYPE,
                        http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                    );
                    response
                }
                _ => text(StatusCode::NOT_FOUND, "metrics are at /metrics\n"),
            }
        }
    })
}

/// The readiness handler.
pub fn readiness_handler(readiness: Readiness) -> Handler {
    Handler::new(move |request| {
        let readiness = readiness.clone();
        async move {
            if request.uri().path() != "/healthz/ready" {
                return text(StatusCode::NOT_FOUND, "readiness is at /healthz/ready\n");
            }
            let (status, body) = readiness.report();
            text(
                StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                body,
            )
        }
    })
}
