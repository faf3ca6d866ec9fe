//! The shared handle: Address resources applied one by one (bad ones refused by name while the
//! rest apply, the last good version kept), removals by xDS name, replace-all, and the generation
//! watchers see.

mod support;

use ambit_proto::workload as pb;
use ambit_state::{Address, Addresses};
use support::{service, workload};

const ECHO: &str = "demo/echo.demo.svc.cluster.local";

fn named_workload(w: pb::Workload) -> (String, pb::Address) {
    (
        w.uid.clone(),
        pb::Address {
            r#type: Some(pb::address::Type::Workload(w)),
        },
    )
}

fn named_service(s: pb::Service) -> (String, pb::Address) {
    (
        s.resource_name(),
        pb::Address {
            r#type: Some(pb::address::Type::Service(s)),
        },
    )
}

fn echo(ip: &str) -> pb::Workload {
    workload("demo", "echo-1", ip, "node-1", &[(ECHO, &[(80, 8080)])])
}

#[test]
fn bad_resources_are_refused_by_name_while_the_rest_apply_and_the_last_good_version_serves() {
    let addresses = Addresses::new("node-1");
    let mut changes = addresses.subscribe();
    assert!(
        addresses
            .apply(
                &[
                    named_workload(echo("10.244.1.5")),
                    named_service(service("demo", "echo", "10.96.0.10", &[(80, 8080)])),
                ],
                &[],
            )
            .is_empty()
    );
    assert!(changes.has_changed().unwrap(), "watchers see the change");
    changes.mark_unchanged();

    let mut broken = echo("10.244.1.6");
    broken.addresses.push(vec![1, 2, 3]);
    let (_, mut misnamed) = named_service(service("demo", "other", "10.96.0.11", &[(80, 80)]));
    if let Some(pb::address::Type::Service(s)) = &mut misnamed.r#type {
        s.hostname = "renamed.demo.svc.cluster.local".into();
    }
    let rejected = addresses.apply(
        &[
            named_workload(broken),
            ("demo/other.demo.svc.cluster.local".into(), misnamed),
            (
                "Kubernetes//Pod/demo/empty".into(),
                pb::Address { r#type: None },
            ),
            named_workload(workload("demo", "echo-2", "10.244.2.5", "node-2", &[])),
        ],
        &[],
    );
    let lines: Vec<String> = rejected.iter().map(ToString::to_string).collect();
    assert_eq!(
        lines,
        vec![
            "Kubernetes//Pod/demo/echo-1: workload Kubernetes//Pod/demo/echo-1: addresses[1]: has 3 bytes, expected 4 or 16",
            "demo/other.demo.svc.cluster.local: resource name does not match the service's namespace/hostname \"demo/renamed.demo.svc.cluster.local\"",
            "Kubernetes//Pod/demo/empty: Address holds neither a workload nor a service",
        ]
    );
    assert!(changes.has_changed().unwrap());
    let index = addresses.index();
    assert_eq!(
        index.len(),
        (2, 1),
        "echo-2 applied beside the refused ones"
    );
    match index.find_address("", "10.244.1.5".parse().unwrap()) {
        Some(Address::Workload(w)) => assert_eq!(&*w.name, "echo-1", "the last good version"),
        other => panic!("echo-1's old address should still resolve: {other:?}"),
    }
}

#[test]
fn removals_and_replace_all_leave_exactly_the_new_set() {
    let addresses = Addresses::new("node-1");
    let clone = addresses.clone();
    addresses.apply(
        &[
            named_workload(echo("10.244.1.5")),
            named_workload(workload("demo", "echo-2", "10.244.2.5", "node-2", &[])),
            named_service(service("demo", "echo", "10.96.0.10", &[(80, 8080)])),
        ],
        &[],
    );
    assert_eq!(clone.index().len(), (2, 1), "clones share one index");
    addresses.apply(&[], &["Kubernetes//Pod/demo/echo-2".into(), ECHO.into()]);
    assert_eq!(addresses.index().len(), (1, 0));

    let rejected = addresses.replace_all(&[
        named_service(service("demo", "echo", "10.96.0.10", &[(80, 8080)])),
        named_workload(workload("demo", "echo-3", "10.244.3.5", "node-1", &[])),
    ]);
    assert!(rejected.is_empty());
    let index = addresses.index();
    assert!(
        index.workload("Kubernetes//Pod/demo/echo-1").is_none(),
        "not in the new set"
    );
    assert!(index.workload("Kubernetes//Pod/demo/echo-3").is_some());
    assert!(index.service(ECHO).is_some());
}
