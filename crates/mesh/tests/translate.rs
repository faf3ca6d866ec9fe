//! Objects in, workload-API resources out: one test per translation rule.

use ambit_mesh::parse_documents;
use ambit_mesh::translate::{Cluster, MeshSettings, Resources, translate};
use ambit_proto::security as sec;
use ambit_proto::workload as pb;

const BASE: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: demo, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: legacy}
---
apiVersion: v1
kind: Pod
metadata: {name: echo-1, namespace: demo, labels: {app: echo, version: v2}}
spec:
  nodeName: node-1
  serviceAccountName: echo
  containers: [{name: echo, ports: [{name: http, containerPort: 8080}]}]
status: {podIP: 10.244.1.5, conditions: [{type: Ready, status: "True"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: demo, labels: {app: client, istio.io/use-waypoint: none}}
spec: {nodeName: node-2, serviceAccountName: client}
status: {podIP: 10.244.2.7}
---
apiVersion: v1
kind: Pod
metadata: {name: old, namespace: legacy, labels: {app: old}}
spec: {nodeName: node-1}
status: {podIP: 10.244.1.9, conditions: [{type: Ready, status: "False"}]}
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: demo}
spec:
  selector: {app: echo}
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80, targetPort: http}, {name: tcp, port: 9000}]
"#;

fn run(extra: &str) -> Resources {
    let (objects, errors) = parse_documents(&format!("{BASE}---\n{extra}"), "test.yaml");
    assert!(errors.is_empty(), "{errors:?}");
    translate(&Cluster::from_objects(objects), &MeshSettings::default())
}

fn workload<'a>(r: &'a Resources, ns: &str, name: &str) -> &'a pb::Workload {
    match &r.addresses[&format!("Kubernetes//Pod/{ns}/{name}")].r#type {
        Some(pb::address::Type::Workload(w)) => w,
        other => panic!("not a workload: {other:?}"),
    }
}

fn service<'a>(r: &'a Resources, key: &str) -> &'a pb::Service {
    match &r.addresses[key].r#type {
        Some(pb::address::Type::Service(s)) => s,
        other => panic!("not a service: {other:?}"),
    }
}

#[test]
fn workloads_carry_identity_enrollment_names_and_service_ports() {
    let r = run("");
    let echo = workload(&r, "demo", "echo-1");
    assert_eq!(echo.addresses, vec![vec![10, 244, 1, 5]]);
    assert_eq!(
        echo.tunnel_protocol,
        pb::TunnelProtocol::Hbone as i32,
        "ambient namespace"
    );
    assert_eq!(
        (echo.service_account.as_str(), echo.trust_domain.as_str()),
        ("echo", "cluster.local")
    );
    assert_eq!(
        (
            echo.canonical_name.as_str(),
            echo.canonical_revision.as_str()
        ),
        ("echo", "v2")
    );
    assert_eq!(echo.node, "node-1");
    let ports = &echo.services["demo/echo.demo.svc.cluster.local"].ports;
    let pairs: Vec<(u32, u32)> = ports
        .iter()
        .map(|p| (p.service_port, p.target_port))
        .collect();
    assert_eq!(
        pairs,
        vec![(80, 8080), (9000, 9000)],
        "named target port resolved from the pod"
    );
    assert_eq!(echo.status, pb::WorkloadStatus::Healthy as i32);

    let old = workload(&r, "legacy", "old");
    assert_eq!(
        old.tunnel_protocol,
        pb::TunnelProtocol::None as i32,
        "not enrolled"
    );
    assert_eq!(
        old.status,
        pb::WorkloadStatus::Unhealthy as i32,
        "Ready=False"
    );
    assert_eq!(old.canonical_revision, "latest");
    assert_eq!(old.service_account, "default");
}

#[test]
fn services_get_hostname_vip_ports_and_preferences() {
    let r = run(
        "apiVersion: v1\nkind: Service\nmetadata: {name: near, namespace: demo}\nspec: {selector: {app: x}, clusterIP: 10.96.0.11, trafficDistribution: PreferClose, ports: [{port: 80, targetPort: 8080}]}\n",
    );
    let echo = service(&r, "demo/echo.demo.svc.cluster.local");
    assert_eq!(echo.addresses[0].address, vec![10, 96, 0, 10]);
    assert_eq!(echo.ports[0].service_port, 80);
    assert_eq!(
        echo.ports[0].target_port, 0,
        "named target port: resolved per endpoint"
    );
    assert!(echo.load_balancing.is_none());
    let near = service(&r, "demo/near.demo.svc.cluster.local");
    let lb = near.load_balancing.as_ref().unwrap();
    assert_eq!(lb.mode, pb::load_balancing::Mode::Failover as i32);
    assert_eq!(near.ports[0].target_port, 8080);
}

#[test]
fn waypoints_bind_from_pod_service_or_namespace_and_none_opts_out() {
    let extra = "apiVersion: v1\nkind: Namespace\nmetadata: {name: demo, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: wp}}\n";
    let r = run(extra);
    let hostname =
        |w: &Option<pb::GatewayAddress>| match w.as_ref().and_then(|g| g.destination.clone()) {
            Some(pb::gateway_address::Destination::Hostname(h)) => h.hostname,
            _ => String::new(),
        };
    assert_eq!(
        hostname(&workload(&r, "demo", "echo-1").waypoint),
        "wp.demo.svc.cluster.local"
    );
    assert_eq!(
        hostname(&service(&r, "demo/echo.demo.svc.cluster.local").waypoint),
        "wp.demo.svc.cluster.local"
    );
    assert!(
        workload(&r, "demo", "client").waypoint.is_none(),
        "use-waypoint: none opts out"
    );
}

fn policy(r: &Resources, key: &str) -> sec::Authorization {
    r.authorizations[key].clone()
}

#[test]
fn authorization_policies_become_l4_rules_with_scope_and_deny_on_doubt() {
    let extra = r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-client, namespace: demo}
spec:
  selector: {matchLabels: {app: echo}}
  rules:
  - from: [{source: {principals: [cluster.local/ns/demo/sa/client], ipBlocks: [10.244.0.0/16]}}]
    to: [{operation: {ports: ["8080"]}}]
  - to: [{operation: {methods: [GET]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-legacy, namespace: istio-system, annotations: {istio.io/dry-run: "true"}}
spec:
  action: DENY
  rules:
  - from: [{source: {namespaces: [legacy]}}]
    to: [{operation: {paths: [/admin]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: waypoint-only, namespace: demo}
spec:
  targetRefs: [{kind: Service, group: "", name: echo}]
  rules: [{to: [{operation: {methods: [GET]}}]}]
"#;
    let r = run(extra);
    let allow = policy(&r, "demo/allow-client");
    assert_eq!(allow.scope, sec::Scope::WorkloadSelector as i32);
    assert_eq!(allow.action, sec::Action::Allow as i32);
    assert_eq!(
        allow.rules.len(),
        1,
        "the L7-only ALLOW rule is dropped (deny on doubt)"
    );
    let m = &allow.rules[0].clauses[0].matches[0];
    assert_eq!(m.principals.len(), 1);
    assert_eq!(m.source_ips[0].length, 16);
    assert_eq!(
        allow.rules[0].clauses[1].matches[0].destination_ports,
        vec![8080]
    );
    assert_eq!(
        workload(&r, "demo", "echo-1").authorization_policies,
        vec!["demo/allow-client".to_string()]
    );

    let deny = policy(&r, "istio-system/deny-legacy");
    assert_eq!(
        deny.scope,
        sec::Scope::Global as i32,
        "root namespace without selector"
    );
    assert!(deny.dry_run);
    assert_eq!(deny.rules.len(), 1, "DENY keeps the rule on its L4 parts");
    assert_eq!(deny.rules[0].clauses.len(), 2);
    assert!(
        r.warnings.iter().any(|w| w.contains(
            "AuthorizationPolicy istio-system/deny-legacy: rules[0] uses L7 fields (paths)"
        )),
        "{:?}",
        r.warnings
    );
    assert_eq!(r.waypoint_policies, vec!["demo/waypoint-only".to_string()]);
    assert!(!r.authorizations.contains_key("demo/waypoint-only"));
}

#[test]
fn peer_authentication_strict_follows_workload_namespace_mesh_precedence() {
    let extra = r#"apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: legacy-open, namespace: legacy}
spec: {mtls: {mode: PERMISSIVE}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: client-open, namespace: demo}
spec: {selector: {matchLabels: {app: client}}, mtls: {mode: PERMISSIVE}}
"#;
    let r = run(extra);
    let strict = policy(&r, "demo/istio_converted_static_strict");
    assert_eq!(strict.action, sec::Action::Deny as i32);
    assert!(matches!(
        strict.rules[0].clauses[0].matches[0].not_principals[0].match_type,
        Some(sec::string_match::MatchType::Presence(()))
    ));
    assert_eq!(
        workload(&r, "demo", "echo-1").authorization_policies,
        vec!["demo/istio_converted_static_strict".to_string()]
    );
    assert!(
        workload(&r, "demo", "client")
            .authorization_policies
            .is_empty(),
        "workload PERMISSIVE wins"
    );
    assert!(
        workload(&r, "legacy", "old")
            .authorization_policies
            .is_empty(),
        "namespace PERMISSIVE wins"
    );
    assert!(
        !r.authorizations
            .contains_key("legacy/istio_converted_static_strict")
    );
}

#[test]
fn invalid_objects_are_refused_by_name_and_field_while_the_rest_translate() {
    let bad = r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: bad-ports, namespace: demo}
spec: {rules: [{to: [{operation: {ports: ["http"]}}]}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: bad-action, namespace: demo}
spec: {action: PERMIT}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: bad-mode, namespace: demo}
spec: {mtls: {mode: STRICTEST}}
---
apiVersion: v1
kind: Service
metadata: {name: bad-vip, namespace: demo}
spec: {clusterIP: 10.96.0.999}
"#;
    let (objects, errors) = parse_documents(&format!("{BASE}---\n{bad}"), "bad.yaml");
    let messages: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
    assert_eq!(
        messages,
        [
            "bad.yaml doc 7: AuthorizationPolicy demo/bad-ports: spec.rules[0].to[0].operation.ports: \"http\" is not a port number",
            "bad.yaml doc 8: AuthorizationPolicy demo/bad-action: spec.action: \"PERMIT\" is not ALLOW, DENY, AUDIT or CUSTOM",
            "bad.yaml doc 9: PeerAuthentication demo/bad-mode: spec.mtls.mode: \"STRICTEST\" is not STRICT, PERMISSIVE, DISABLE or UNSET",
            "bad.yaml doc 10: Service demo/bad-vip: spec.clusterIP: \"10.96.0.999\" is not an IP address",
        ]
    );
    let r = translate(&Cluster::from_objects(objects), &MeshSettings::default());
    assert_eq!(r.addresses.len(), 4, "3 pods and the good service");
}
