//! Builders for workload-API resources shared by the index's tests.
#![allow(dead_code, unreachable_pub)]

use std::collections::HashMap;
use std::net::IpAddr;

use ambit_proto::workload as pb;

pub fn ip_bytes(ip: &str) -> Vec<u8> {
    match ip.parse::<IpAddr>().unwrap() {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

/// A captured pod backing `services` (key -> [(service port, target port)]).
pub fn workload(
    ns: &str,
    name: &str,
    ip: &str,
    node: &str,
    services: &[(&str, &[(u32, u32)])],
) -> pb::Workload {
    pb::Workload {
        uid: format!("Kubernetes//Pod/{ns}/{name}"),
        name: name.into(),
        namespace: ns.into(),
        addresses: vec![ip_bytes(ip)],
        tunnel_protocol: pb::TunnelProtocol::Hbone as i32,
        service_account: "default".into(),
        node: node.into(),
        canonical_name: name.split('-').next().unwrap().into(),
        canonical_revision: "v1".into(),
        workload_name: name.split('-').next().unwrap().into(),
        cluster_id: "Kubernetes".into(),
        services: services
            .iter()
            .map(|(k, ports)| {
                (
                    k.to_string(),
                    pb::PortList {
                        ports: ports
                            .iter()
                            .map(|(s, t)| pb::Port {
                                service_port: *s,
                                target_port: *t,
                                app_protocol: 0,
                            })
                            .collect(),
                    },
                )
            })
            .collect::<HashMap<_, _>>(),
        ..Default::default()
    }
}

/// A service with one VIP on the default network.
pub fn service(ns: &str, name: &str, vip: &str, ports: &[(u32, u32)]) -> pb::Service {
    pb::Service {
        name: name.into(),
        namespace: ns.into(),
        hostname: format!("{name}.{ns}.svc.cluster.local"),
        addresses: vec![pb::NetworkAddress {
            network: String::new(),
            address: ip_bytes(vip),
            length: None,
        }],
        ports: ports
            .iter()
            .map(|(s, t)| pb::Port {
                service_port: *s,
                target_port: *t,
                app_protocol: 0,
            })
            .collect(),
        ..Default::default()
    }
}
