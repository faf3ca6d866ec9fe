//! Local-file configuration: the documented format loads into the state, reloads on change, and
//! bad input is refused with a message naming the object and field while the last good state
//! keeps serving.

use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use ambit_core::drain;
use ambit_core::readiness::Readiness;
use ztunnel::localconfig;
use ztunnel::mesh::MeshState;

const GOOD: &str = r#"
workloads:
- name: echo-1
  namespace: demo
  serviceAccount: echo
  addresses: [10.1.0.5]
  node: node-1
  services:
    demo/echo.demo.svc.cluster.local: {80: 8080}
- name: db
  namespace: legacy
  addresses: [10.1.0.9]
  protocol: TCP
services:
- name: echo
  namespace: demo
  vips: [10.96.0.10]
  ports: {80: 8080}
policies:
- name: allow-client
  namespace: demo
  rules:
  - - - principals: [cluster.local/ns/demo/sa/client]
        destinationPorts: [8080]
- name: strict
  namespace: demo
  action: Deny
  rules:
  - - - notPrincipals: ["*"]
"#;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn the_documented_format_loads_workloads_services_and_policies() {
    let state = MeshState::new("node-1");
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), GOOD).unwrap();
    let rejected = localconfig::load(file.path(), &state, "Kubernetes").unwrap();
    assert!(rejected.is_empty(), "{rejected:?}");
    let index = state.index();
    assert_eq!(index.len(), (2, 1));
    let echo = index.workload_by_ip("", ip("10.1.0.5")).unwrap();
    assert_eq!(&*echo.uid, "Kubernetes//Pod/demo/echo-1");
    assert_eq!(
        echo.identity().to_string(),
        "spiffe://cluster.local/ns/demo/sa/echo"
    );
    assert!(index.local_workload("demo", "echo-1").is_some());
    assert!(index.find_address("", ip("10.96.0.10")).is_some());
    let policies = state.policies();
    assert!(policies.get("demo/allow-client").is_some());
    assert!(policies.get("demo/strict").is_some());
}

#[test]
fn bad_input_names_the_object_and_field_and_changes_nothing() {
    let state = MeshState::new("node-1");
    let path = Path::new("/etc/ztunnel/local.yaml");
    let cases = [
        (
            GOOD.replace("addresses: [10.1.0.9]", "addresses: [10.1.0.999]"),
            "local config /etc/ztunnel/local.yaml: workload legacy/db: addresses: \"10.1.0.999\" is not an IP address",
        ),
        (
            GOOD.replace("action: Deny", "action: Audit"),
            "local config /etc/ztunnel/local.yaml: policy demo/strict: action: \"Audit\" is not Allow or Deny",
        ),
        (
            GOOD.replace("destinationPorts: [8080]", "sourceIps: [10.0.0.0/40]"),
            "local config /etc/ztunnel/local.yaml: policy demo/allow-client: rules[0][0][0].sourceIps: \"10.0.0.0/40\" is not an IP or CIDR",
        ),
    ];
    for (text, expected) in cases {
        let err = localconfig::parse(path, &text, "Kubernetes").unwrap_err();
        assert_eq!(err.to_string(), expected);
    }
    let err = localconfig::parse(path, &GOOD.replace("serviceAccount", "serviceAcount"), "K")
        .unwrap_err()
        .to_string();
    assert!(err.contains("unknown field `serviceAcount`"), "{err}");
    assert!(err.contains("workloads[0]"), "{err}");
    assert_eq!(state.index().len(), (0, 0));
}

#[tokio::test]
async fn the_file_is_reloaded_on_change_and_a_broken_edit_keeps_the_last_good_state() {
    let state = MeshState::new("node-1");
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), GOOD).unwrap();
    let readiness = Readiness::new();
    let (_trigger, watcher) = drain::new();
    tokio::spawn(localconfig::watch(
        file.path().to_path_buf(),
        state.clone(),
        "Kubernetes".into(),
        Duration::from_millis(20),
        Some(readiness.register("local-config")),
        watcher,
    ));
    let mut changes = state.subscribe();
    let wait_for = |want: (usize, usize)| {
        let state = state.clone();
        async move {
            for _ in 0..500 {
                if state.index().len() == want {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            panic!("state never reached {want:?}: {:?}", state.index().len());
        }
    };
    wait_for((2, 1)).await;
    assert!(readiness.is_ready());

    // A broken edit: nothing changes.
    std::fs::write(file.path(), "workloads: [ {name: broken").unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(state.index().len(), (2, 1));

    // A good edit removing the legacy workload and the policies applies.
    let edited = GOOD.split("- name: db").next().unwrap().to_string()
        + "services:\n- name: echo\n  namespace: demo\n  vips: [10.96.0.10]\n  ports: {80: 8080}\n";
    std::fs::write(file.path(), edited).unwrap();
    wait_for((1, 1)).await;
    assert!(state.policies().is_empty());
    assert!(changes.has_changed().unwrap());
    let _ = changes.borrow_and_update();
}
