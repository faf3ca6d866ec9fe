//! Workloads and services as JSON in the shape upstream ztunnel's `/config_dump` uses (camelCase
//! names, `network/ip` addresses, `namespace/hostname` references, port maps keyed by the service
//! port), so `istioctl ztunnel-config` and Kiali can read an Ambit proxy. Both proxies' admin
//! endpoints use these. Ambit-only facts go under keys upstream does not use.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::{Map, Value, json};

use crate::index::{
    GatewayAddress, GatewayDestination, LoadBalancingMode, PreferenceScope, Protocol, Service,
    StateIndex, Workload,
};

/// A waypoint or gateway reference: `{"destination": "<ns>/<hostname>" | "<network>/<ip>",
/// "hboneMtlsPort": 15008}`.
pub fn gateway(g: &GatewayAddress) -> Value {
    let destination = match &g.destination {
        GatewayDestination::Hostname {
            namespace,
            hostname,
        } => format!("{namespace}/{hostname}"),
        GatewayDestination::Address { network, ip } => format!("{network}/{ip}"),
    };
    json!({"destination": destination, "hboneMtlsPort": g.hbone_port})
}

/// `TCP` or `HBONE`, as upstream spells the inbound protocol.
pub fn protocol(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "TCP",
        Protocol::Hbone => "HBONE",
    }
}

fn health(healthy: bool) -> &'static str {
    if healthy { "Healthy" } else { "Unhealthy" }
}

fn port_map(ports: impl Iterator<Item = (u16, u16)>) -> Value {
    Value::Object(
        ports
            .map(|(service, target)| (service.to_string(), Value::from(target)))
            .collect::<Map<String, Value>>(),
    )
}

/// One workload.
pub fn workload(w: &Workload) -> Value {
    let mut out = json!({
        "uid": &*w.uid,
        "workloadIps": w.addresses.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
        "protocol": protocol(w.protocol),
        "networkMode": "Standard",
        "name": &*w.name,
        "namespace": &*w.namespace,
        "trustDomain": &*w.trust_domain,
        "serviceAccount": &*w.service_account,
        "network": &*w.network,
        "workloadName": &*w.workload_name,
        "workloadType": "pod",
        "canonicalName": &*w.canonical_name,
        "canonicalRevision": &*w.canonical_revision,
        "node": &*w.node,
        "authorizationPolicies": w.authorization_policies.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
        "status": health(w.healthy),
        "clusterId": &*w.cluster_id,
        "services": w.services.iter().map(|(key, _)| key.to_string()).collect::<Vec<_>>(),
        "capacity": 1,
    });
    if let Some(g) = &w.waypoint {
        out["waypoint"] = gateway(g);
    }
    if let Some(l) = &w.locality {
        out["locality"] = json!({"region": &*l.region, "zone": &*l.zone, "subzone": &*l.subzone});
    }
    out
}

fn scope_name(s: PreferenceScope) -> &'static str {
    match s {
        PreferenceScope::Region => "Region",
        PreferenceScope::Zone => "Zone",
        PreferenceScope::Subzone => "Subzone",
        PreferenceScope::Node => "Node",
        PreferenceScope::Cluster => "Cluster",
        PreferenceScope::Network => "Network",
    }
}

/// One service with its endpoints (`endpoints` maps a workload uid to `{"workloadUid", "port",
/// "status"}`, `port` mapping the service port to the workload's target port).
pub fn service(s: &Service, endpoints: &[Arc<Workload>]) -> Value {
    let endpoints: Map<String, Value> = endpoints
        .iter()
        .map(|w| {
            let ports = s.ports.iter().filter_map(|p| {
                let target = if p.target_port == 0 {
                    w.named_target_port(&s.key, p.service_port)?
                } else {
                    p.target_port
                };
                Some((p.service_port, target))
            });
            (
                w.uid.to_string(),
                json!({
                    "workloadUid": &*w.uid,
                    "port": port_map(ports),
                    "status": health(w.healthy),
                }),
            )
        })
        .collect();
    let mut out = json!({
        "name": &*s.name,
        "namespace": &*s.namespace,
        "hostname": &*s.hostname,
        "vips": s.vips.iter().map(|(n, ip)| format!("{n}/{ip}")).collect::<Vec<_>>(),
        "ports": port_map(s.ports.iter().map(|p| (p.service_port, p.target_port))),
        "endpoints": endpoints,
        "subjectAltNames": s.subject_alt_names.iter().map(|n| n.to_string()).collect::<Vec<_>>(),
    });
    if let Some(g) = &s.waypoint {
        out["waypoint"] = gateway(g);
    }
    if let Some(lb) = &s.load_balancing {
        let mode = match lb.mode {
            LoadBalancingMode::Strict => "Strict",
            LoadBalancingMode::Failover => "Failover",
            LoadBalancingMode::Passthrough => "Passthrough",
        };
        out["loadBalancer"] = json!({
            "routingPreferences": lb.preferences.iter().map(|p| scope_name(*p)).collect::<Vec<_>>(),
            "mode": mode,
            "healthPolicy": if lb.allow_unhealthy { "AllowAll" } else { "OnlyHealthy" },
        });
    }
    out
}

/// Every workload (sorted by uid) and service (sorted by hostname, then namespace) the index
/// holds.
pub fn workloads_and_services(index: &StateIndex) -> (Vec<Value>, Vec<Value>) {
    let mut workloads: Vec<&Arc<Workload>> = index.workloads().collect();
    workloads.sort_by(|a, b| a.uid.cmp(&b.uid));
    let mut backing: HashMap<&str, Vec<Arc<Workload>>> = HashMap::new();
    for w in &workloads {
        for (key, _) in w.services.iter() {
            backing.entry(&**key).or_default().push((*w).clone());
        }
    }
    let mut services: Vec<&Arc<Service>> = index.services().collect();
    services.sort_by(|a, b| (&a.hostname, &a.namespace).cmp(&(&b.hostname, &b.namespace)));
    (
        workloads.iter().map(|w| workload(w)).collect(),
        services
            .iter()
            .map(|s| service(s, backing.get(&*s.key).map_or(&[][..], Vec::as_slice)))
            .collect(),
    )
}
