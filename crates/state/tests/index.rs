//! The state index: validation messages, lookups, endpoint choice.

mod support;

use std::collections::HashSet;

use ambit_proto::workload as pb;
use ambit_state::{Address, AppProtocol, ServicePort, StateIndex};
use support::{ip_bytes, service, workload};

const ECHO: &str = "demo/echo.demo.svc.cluster.local";

fn demo() -> StateIndex {
    let mut state = StateIndex::new("node-1");
    state
        .insert_service(&service("demo", "echo", "10.96.0.10", &[(80, 8080)]))
        .unwrap();
    state
        .insert_workload(&workload(
            "demo",
            "echo-a",
            "10.244.1.5",
            "node-1",
            &[(ECHO, &[(80, 8080)])],
        ))
        .unwrap();
    state
        .insert_workload(&workload(
            "demo",
            "echo-b",
            "10.244.2.5",
            "node-2",
            &[(ECHO, &[(80, 8080)])],
        ))
        .unwrap();
    state
        .insert_workload(&workload("demo", "client-x", "10.244.1.9", "node-1", &[]))
        .unwrap();
    state
}

#[test]
fn vip_resolves_to_service_and_pod_ip_to_workload() {
    let state = demo();
    match state.find_address("", "10.96.0.10".parse().unwrap()) {
        Some(Address::Service(s)) => assert_eq!(&*s.key, ECHO),
        other => panic!("expected the echo service, got {other:?}"),
    }
    match state.find_address("", "10.244.2.5".parse().unwrap()) {
        Some(Address::Workload(w)) => {
            assert_eq!(&*w.name, "echo-b");
            assert_eq!(
                w.identity().to_string(),
                "spiffe://cluster.local/ns/demo/sa/default"
            );
        }
        other => panic!("expected echo-b, got {other:?}"),
    }
    assert!(
        state
            .find_address("", "192.0.2.1".parse().unwrap())
            .is_none(),
        "outside the mesh"
    );
    assert!(
        state
            .find_address("other-net", "10.244.2.5".parse().unwrap())
            .is_none(),
        "networks are distinct"
    );
}

#[test]
fn only_this_nodes_pods_are_local() {
    let state = demo();
    assert!(state.local_workload("demo", "echo-a").is_some());
    assert!(
        state.local_workload("demo", "echo-b").is_none(),
        "echo-b runs on node-2"
    );
}

#[test]
fn endpoints_map_service_port_to_target_port_and_spread() {
    let state = demo();
    let echo = state.service(ECHO).unwrap().clone();
    let mut seen = HashSet::new();
    for _ in 0..200 {
        let (w, port) = state.pick_endpoint(&echo, 80, None).unwrap();
        assert_eq!(port, 8080);
        seen.insert(w.name.to_string());
    }
    assert_eq!(
        seen,
        HashSet::from(["echo-a".to_string(), "echo-b".to_string()])
    );
    assert!(
        state.pick_endpoint(&echo, 81, None).is_none(),
        "the service has no port 81"
    );
}

#[test]
fn named_target_ports_resolve_per_endpoint() {
    let mut state = StateIndex::new("node-1");
    state
        .insert_service(&service("demo", "echo", "10.96.0.10", &[(80, 0)]))
        .unwrap();
    state
        .insert_workload(&workload(
            "demo",
            "echo-a",
            "10.244.1.5",
            "node-1",
            &[(ECHO, &[(80, 9090)])],
        ))
        .unwrap();
    let echo = state.service(ECHO).unwrap().clone();
    assert_eq!(
        state.pick_endpoint(&echo, 80, None).map(|(_, p)| p),
        Some(9090)
    );
}

#[test]
fn unhealthy_endpoints_are_skipped_unless_allowed() {
    let mut state = demo();
    let mut sick = workload(
        "demo",
        "echo-b",
        "10.244.2.5",
        "node-2",
        &[(ECHO, &[(80, 8080)])],
    );
    sick.status = pb::WorkloadStatus::Unhealthy as i32;
    state.insert_workload(&sick).unwrap();
    let echo = state.service(ECHO).unwrap().clone();
    for _ in 0..50 {
        assert_eq!(
            &*state.pick_endpoint(&echo, 80, None).unwrap().0.name,
            "echo-a"
        );
    }
}

#[test]
fn node_preference_keeps_traffic_local_and_fails_over() {
    let mut state = demo();
    let mut svc = service("demo", "echo", "10.96.0.10", &[(80, 8080)]);
    svc.load_balancing = Some(pb::LoadBalancing {
        routing_preference: vec![pb::load_balancing::Scope::Node as i32],
        mode: pb::load_balancing::Mode::Failover as i32,
        health_policy: 0,
    });
    state.insert_service(&svc).unwrap();
    let echo = state.service(ECHO).unwrap().clone();
    let client = state.local_workload("demo", "client-x").unwrap().clone();
    for _ in 0..50 {
        assert_eq!(
            &*state
                .pick_endpoint(&echo, 80, Some(&client))
                .unwrap()
                .0
                .name,
            "echo-a"
        );
    }
    // Failover: with the local endpoint gone, the remote one serves.
    state
        .remove_workload("Kubernetes//Pod/demo/echo-a")
        .unwrap();
    assert_eq!(
        &*state
            .pick_endpoint(&echo, 80, Some(&client))
            .unwrap()
            .0
            .name,
        "echo-b"
    );
    // Strict: no local endpoint means no endpoint.
    svc.load_balancing.as_mut().unwrap().mode = pb::load_balancing::Mode::Strict as i32;
    state.insert_service(&svc).unwrap();
    let echo = state.service(ECHO).unwrap().clone();
    assert!(state.pick_endpoint(&echo, 80, Some(&client)).is_none());
}

#[test]
fn region_and_zone_preferences_rank_endpoints_and_fail_over_in_order() {
    let mut state = StateIndex::new("node-1");
    let mut svc = service("demo", "echo", "10.96.0.10", &[(80, 8080)]);
    svc.load_balancing = Some(pb::LoadBalancing {
        routing_preference: vec![
            pb::load_balancing::Scope::Region as i32,
            pb::load_balancing::Scope::Zone as i32,
        ],
        mode: pb::load_balancing::Mode::Failover as i32,
        health_policy: 0,
    });
    state.insert_service(&svc).unwrap();
    let located = |name: &str, ip: &str, node: &str, region: &str, zone: &str| {
        let mut w = workload("demo", name, ip, node, &[(ECHO, &[(80, 8080)])]);
        w.locality = Some(pb::Locality {
            region: region.into(),
            zone: zone.into(),
            subzone: String::new(),
        });
        w
    };
    let mut client = located("client", "10.244.1.9", "node-1", "eu", "eu-a");
    client.services.clear();
    for w in [
        client,
        located("same-zone-1", "10.244.1.5", "node-1", "eu", "eu-a"),
        located("same-zone-2", "10.244.2.5", "node-2", "eu", "eu-a"),
        located("same-region", "10.244.3.5", "node-3", "eu", "eu-b"),
        located("elsewhere", "10.244.4.5", "node-4", "us", "us-a"),
    ] {
        state.insert_workload(&w).unwrap();
    }
    let echo = state.service(ECHO).unwrap().clone();
    let client = state.local_workload("demo", "client").unwrap().clone();
    let picks = |state: &StateIndex| -> HashSet<String> {
        (0..200)
            .map(|_| {
                state
                    .pick_endpoint(&echo, 80, Some(&client))
                    .map(|(w, port)| {
                        assert_eq!(port, 8080);
                        w.name.to_string()
                    })
                    .unwrap_or_default()
            })
            .collect()
    };
    assert_eq!(
        picks(&state),
        HashSet::from(["same-zone-1".into(), "same-zone-2".into()]),
        "both endpoints in the client's zone share the load, nothing else gets any"
    );
    state
        .remove_workload("Kubernetes//Pod/demo/same-zone-1")
        .unwrap();
    state
        .remove_workload("Kubernetes//Pod/demo/same-zone-2")
        .unwrap();
    assert_eq!(
        picks(&state),
        HashSet::from(["same-region".into()]),
        "the zone is empty: the region next"
    );
    state
        .remove_workload("Kubernetes//Pod/demo/same-region")
        .unwrap();
    assert_eq!(picks(&state), HashSet::from(["elsewhere".into()]));
}

#[test]
fn removal_by_xds_name_clears_every_index() {
    let mut state = demo();
    assert!(state.remove("Kubernetes//Pod/demo/echo-a"));
    assert!(
        state
            .find_address("", "10.244.1.5".parse().unwrap())
            .is_none()
    );
    assert!(state.local_workload("demo", "echo-a").is_none());
    assert!(state.remove(ECHO));
    assert!(
        state
            .find_address("", "10.96.0.10".parse().unwrap())
            .is_none()
    );
    assert!(!state.remove("demo/nothing.demo.svc.cluster.local"));
    assert_eq!(state.len(), (2, 0));
}

#[test]
fn replacing_a_workload_moves_its_address() {
    let mut state = demo();
    state
        .insert_workload(&workload(
            "demo",
            "echo-a",
            "10.244.1.6",
            "node-1",
            &[(ECHO, &[(80, 8080)])],
        ))
        .unwrap();
    assert!(
        state
            .find_address("", "10.244.1.5".parse().unwrap())
            .is_none()
    );
    assert!(
        state
            .find_address("", "10.244.1.6".parse().unwrap())
            .is_some()
    );
    let echo = state.service(ECHO).unwrap().clone();
    let names: HashSet<String> = (0..100)
        .map(|_| {
            state
                .pick_endpoint(&echo, 80, None)
                .unwrap()
                .0
                .name
                .to_string()
        })
        .collect();
    assert_eq!(names.len(), 2, "no duplicate endpoint left behind");
}

#[test]
fn invalid_resources_name_the_resource_and_field() {
    let mut state = StateIndex::new("node-1");
    let mut bad = workload("demo", "echo-1", "10.244.1.5", "node-1", &[]);
    bad.addresses.push(vec![1, 2, 3, 4, 5]);
    assert_eq!(
        state.insert_workload(&bad).unwrap_err().to_string(),
        "workload Kubernetes//Pod/demo/echo-1: addresses[1]: has 5 bytes, expected 4 or 16"
    );
    let mut legacy = workload("demo", "echo-2", "10.244.1.6", "node-1", &[]);
    legacy.tunnel_protocol = pb::TunnelProtocol::LegacyIstioMtls as i32;
    assert_eq!(
        state.insert_workload(&legacy).unwrap_err().to_string(),
        "workload Kubernetes//Pod/demo/echo-2: tunnel_protocol: LEGACY_ISTIO_MTLS is not supported"
    );
    let mut bad_port = service("demo", "echo", "10.96.0.10", &[(80, 8080)]);
    bad_port.ports.push(pb::Port {
        service_port: 0,
        target_port: 80,
        app_protocol: 0,
    });
    assert_eq!(
        state.insert_service(&bad_port).unwrap_err().to_string(),
        "service demo/echo.demo.svc.cluster.local: ports[1]: ports 0 -> 80 are outside 1-65535"
    );
    let mut bad_vip = service("demo", "echo", "10.96.0.10", &[(80, 8080)]);
    bad_vip.addresses[0].address = ip_bytes("::1")[..3].to_vec();
    assert!(
        state
            .insert_service(&bad_vip)
            .unwrap_err()
            .to_string()
            .contains("addresses[0]: has 3 bytes")
    );
    assert_eq!(state.len(), (0, 0), "nothing bad was stored");
}

#[test]
fn service_ports_keep_their_target_and_app_protocol() {
    let mut state = StateIndex::new("node-1");
    let mut svc = service(
        "demo",
        "echo",
        "10.96.0.10",
        &[(80, 8080), (9000, 0), (5432, 5432)],
    );
    svc.ports[0].app_protocol = pb::AppProtocol::Http11 as i32;
    svc.ports[1].app_protocol = pb::AppProtocol::Grpc as i32;
    svc.ports[2].app_protocol = pb::AppProtocol::Tcp as i32;
    let mut newer = svc.ports[2];
    newer.service_port = 7000;
    // A value from a newer control plane: the port still works, its protocol is not known.
    newer.app_protocol = 42;
    svc.ports.push(newer);
    state.insert_service(&svc).unwrap();
    let echo = state.service(ECHO).unwrap();
    assert_eq!(
        echo.port(80),
        Some(&ServicePort {
            service_port: 80,
            target_port: 8080,
            app_protocol: AppProtocol::Http11,
        })
    );
    assert_eq!(
        echo.port(9000),
        Some(&ServicePort {
            service_port: 9000,
            target_port: 0,
            app_protocol: AppProtocol::Grpc,
        }),
        "a named target port is resolved per endpoint"
    );
    assert_eq!(echo.port(5432).unwrap().app_protocol, AppProtocol::Tcp);
    assert_eq!(echo.port(7000).unwrap().app_protocol, AppProtocol::Unknown);
    assert_eq!(echo.port(81), None);
    let order: Vec<u16> = echo.ports.iter().map(|p| p.service_port).collect();
    assert_eq!(order, vec![80, 9000, 5432, 7000], "in the order listed");
}

#[test]
fn a_workload_carries_what_a_waypoint_labels_and_routes_by() {
    let mut state = StateIndex::new("node-9");
    let mut w = workload(
        "demo",
        "echo-a",
        "10.244.1.5",
        "node-1",
        &[(ECHO, &[(80, 8080)])],
    );
    w.addresses.push(ip_bytes("fd00::5"));
    w.trust_domain = "example.org".into();
    w.service_account = "echo".into();
    w.canonical_revision = "v2".into();
    w.locality = Some(pb::Locality {
        region: "eu".into(),
        zone: "eu-a".into(),
        subzone: String::new(),
    });
    state.insert_workload(&w).unwrap();
    let Some(Address::Workload(found)) = state.find_address("", "fd00::5".parse().unwrap()) else {
        panic!("the workload's second address resolves to it");
    };
    assert_eq!(
        found.identity().to_string(),
        "spiffe://example.org/ns/demo/sa/echo"
    );
    assert_eq!((&*found.namespace, &*found.workload_name), ("demo", "echo"));
    assert_eq!(
        (&*found.canonical_name, &*found.canonical_revision),
        ("echo", "v2")
    );
    assert_eq!(&*found.cluster_id, "Kubernetes");
    assert_eq!(&*found.locality.as_ref().unwrap().zone, "eu-a");
    assert_eq!(found.addresses.len(), 2);
    assert!(
        state.local_workload("demo", "echo-a").is_none(),
        "only node-9's pods are local"
    );
}
