//! Objects in, workload-API resources out: one test per translation rule.

use ambit_mesh::translate::{Cluster, MeshSettings, Resources, translate};
use ambit_mesh::{WarningKind, parse_documents};
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
        ("echo", ""),
        "trust domain cluster.local is ztunnel's default: left off the wire"
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
    assert_eq!(
        old.service_account, "",
        "service account default is ztunnel's default: left off the wire"
    );
}

#[test]
fn a_trust_domain_other_than_the_default_is_sent() {
    let (objects, errors) = parse_documents(BASE, "test.yaml");
    assert!(errors.is_empty(), "{errors:?}");
    let settings = MeshSettings {
        trust_domain: "example.org".into(),
        ..MeshSettings::default()
    };
    let r = translate(&Cluster::from_objects(objects), &settings);
    assert_eq!(workload(&r, "demo", "echo-1").trust_domain, "example.org");
}

#[test]
fn protocol_defaults_are_left_off_a_typical_workloads_wire_form() {
    use prost::Message;
    // A Deployment's pod behind one service port, as in the control-plane benchmark.
    let (objects, errors) = parse_documents(
        r#"apiVersion: v1
kind: Namespace
metadata: {name: ns-17, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: svc-1234-7d9f8c6b5-0a1b2, namespace: ns-17, labels: {app: svc-1234, version: v1}}
spec: {nodeName: node-42, serviceAccountName: svc-1234}
status: {podIP: 10.101.4.210}
---
apiVersion: v1
kind: Service
metadata: {name: svc-1234, namespace: ns-17}
spec: {selector: {app: svc-1234}, clusterIP: 10.96.4.210, ports: [{name: http, port: 80, targetPort: 8080}]}
"#,
        "typical.yaml",
    );
    assert!(errors.is_empty(), "{errors:?}");
    let cluster = Cluster::from_objects(objects);
    let size = |settings: &MeshSettings| {
        let r = translate(&cluster, settings);
        r.addresses["Kubernetes//Pod/ns-17/svc-1234-7d9f8c6b5-0a1b2"].encoded_len()
    };
    let default = size(&MeshSettings::default());
    let other = size(&MeshSettings {
        trust_domain: "example.org".into(),
        ..MeshSettings::default()
    });
    assert_eq!(
        other - default,
        2 + "example.org".len(),
        "only a non-default trust domain costs bytes"
    );
    // uid, name, namespace, the service key, identity and telemetry names are what remains: a
    // budget that catches fields creeping back in.
    assert!(default <= 205, "{default} bytes");
}

/// A waypoint Gateway in `ns` named `name`, with `labels` (flow map body) and `status`.
fn gateway(ns: &str, name: &str, labels: &str, status: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: {name}, namespace: {ns}, labels: {{{labels}}}}}\nspec: {{gatewayClassName: istio-waypoint, listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]}}\n{status}\n---\n"
    )
}

/// `status.addresses` with the waypoint service's hostname, as istiod's controller writes it.
fn addressed(ns: &str, name: &str) -> String {
    format!(
        "status: {{addresses: [{{type: IPAddress, value: 10.96.9.9}}, {{type: Hostname, value: {name}.{ns}.svc.cluster.local}}]}}"
    )
}

fn waypoint_host(w: &Option<pb::GatewayAddress>) -> String {
    match w.as_ref() {
        Some(g) => {
            assert_eq!(g.hbone_mtls_port, 15008);
            match &g.destination {
                Some(pb::gateway_address::Destination::Hostname(h)) => {
                    format!("{}:{}", h.namespace, h.hostname)
                }
                Some(pb::gateway_address::Destination::Address(a)) => format!("ip:{:?}", a.address),
                None => "none".into(),
            }
        }
        None => String::new(),
    }
}

const DEMO_BOUND: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: demo, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: wp}}\n---\n";

#[test]
fn waypoints_bind_from_namespace_to_an_addressed_gateway_and_none_opts_out() {
    let r = run(&format!(
        "{DEMO_BOUND}{}",
        gateway(
            "demo",
            "wp",
            "istio.io/waypoint-for: all",
            &addressed("demo", "wp")
        )
    ));
    let expected = "demo:wp.demo.svc.cluster.local";
    assert_eq!(
        waypoint_host(&workload(&r, "demo", "echo-1").waypoint),
        expected
    );
    assert_eq!(
        waypoint_host(&service(&r, "demo/echo.demo.svc.cluster.local").waypoint),
        expected,
        "hostname form preferred over the IP"
    );
    assert!(
        workload(&r, "demo", "client").waypoint.is_none(),
        "use-waypoint: none opts out"
    );
    assert!(
        workload(&r, "legacy", "old").waypoint.is_none(),
        "not captured, not bound"
    );
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
}

#[test]
fn waypoint_for_decides_service_workload_both_or_neither() {
    let cases = [
        ("", true, false, "default is service"),
        ("istio.io/waypoint-for: service", true, false, "service"),
        ("istio.io/waypoint-for: workload", false, true, "workload"),
        ("istio.io/waypoint-for: all", true, true, "all"),
        ("istio.io/waypoint-for: none", false, false, "none"),
    ];
    for (labels, to_service, to_workload, why) in cases {
        let r = run(&format!(
            "{DEMO_BOUND}{}",
            gateway("demo", "wp", labels, &addressed("demo", "wp"))
        ));
        assert_eq!(
            service(&r, "demo/echo.demo.svc.cluster.local")
                .waypoint
                .is_some(),
            to_service,
            "{why}: Service.waypoint"
        );
        assert_eq!(
            workload(&r, "demo", "echo-1").waypoint.is_some(),
            to_workload,
            "{why}: Workload.waypoint"
        );
        assert!(
            r.warnings.is_empty(),
            "a namespace binding the waypoint does not take is silently ignored: {:?}",
            r.warnings
        );
    }

    // Without the label on the Gateway, its GatewayClass decides.
    let class = "apiVersion: gateway.networking.k8s.io/v1\nkind: GatewayClass\nmetadata: {name: istio-waypoint, labels: {istio.io/waypoint-for: workload}}\nspec: {controllerName: istio.io/mesh-controller}\n---\n";
    let r = run(&format!(
        "{DEMO_BOUND}{class}{}",
        gateway("demo", "wp", "", &addressed("demo", "wp"))
    ));
    assert!(
        workload(&r, "demo", "echo-1").waypoint.is_some(),
        "class says workload"
    );
    assert!(
        service(&r, "demo/echo.demo.svc.cluster.local")
            .waypoint
            .is_none()
    );
    // ... and the Gateway's own label overrides the class.
    let r = run(&format!(
        "{DEMO_BOUND}{class}{}",
        gateway(
            "demo",
            "wp",
            "istio.io/waypoint-for: service",
            &addressed("demo", "wp")
        )
    ));
    assert!(workload(&r, "demo", "echo-1").waypoint.is_none());
    assert!(
        service(&r, "demo/echo.demo.svc.cluster.local")
            .waypoint
            .is_some()
    );
}

#[test]
fn object_bindings_override_the_namespace_and_may_name_another_namespace() {
    let extra = format!(
        "{DEMO_BOUND}{}{}{}{}",
        gateway(
            "demo",
            "wp",
            "istio.io/waypoint-for: all",
            &addressed("demo", "wp")
        ),
        gateway(
            "demo",
            "pod-wp",
            "istio.io/waypoint-for: workload",
            &addressed("demo", "pod-wp")
        ),
        shared_gateway("svc-wp", "{from: All}", "10.96.7.7"),
        r#"apiVersion: v1
kind: Pod
metadata: {name: echo-2, namespace: demo, labels: {app: echo, istio.io/use-waypoint: pod-wp}}
spec: {nodeName: node-1}
status: {podIP: 10.244.1.6}
---
apiVersion: v1
kind: Service
metadata: {name: other, namespace: demo, labels: {istio.io/use-waypoint: svc-wp, istio.io/use-waypoint-namespace: shared}}
spec: {selector: {app: nothing}, clusterIP: 10.96.0.20, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: direct, namespace: demo, labels: {istio.io/use-waypoint: none}}
spec: {selector: {app: nothing}, clusterIP: 10.96.0.21, ports: [{port: 80}]}
"#
    );
    let r = run(&extra);
    assert_eq!(
        waypoint_host(&workload(&r, "demo", "echo-2").waypoint),
        "demo:pod-wp.demo.svc.cluster.local",
        "pod label beats namespace label"
    );
    assert_eq!(
        waypoint_host(&workload(&r, "demo", "echo-1").waypoint),
        "demo:wp.demo.svc.cluster.local"
    );
    assert_eq!(
        waypoint_host(&service(&r, "demo/other.demo.svc.cluster.local").waypoint),
        "ip:[10, 96, 7, 7]",
        "service label with use-waypoint-namespace; IP form when the Gateway has no hostname"
    );
    assert!(
        service(&r, "demo/direct.demo.svc.cluster.local")
            .waypoint
            .is_none(),
        "service opts out of the namespace waypoint"
    );
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
}

/// A waypoint in namespace `shared` whose HBONE listener lets `namespaces` bind to it (an
/// `allowedRoutes.namespaces` value, or empty for none said).
fn shared_gateway(name: &str, namespaces: &str, ip: &str) -> String {
    let allowed = if namespaces.is_empty() {
        String::new()
    } else {
        format!(", allowedRoutes: {{namespaces: {namespaces}}}")
    };
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: {name}, namespace: shared}}\nspec: {{gatewayClassName: istio-waypoint, listeners: [{{name: mesh, port: 15008, protocol: HBONE{allowed}}}]}}\nstatus: {{addresses: [{{value: {ip}}}]}}\n---\n"
    )
}

/// As in Istio, a waypoint's owner decides which other namespaces may bind to it: its HBONE
/// listener's `allowedRoutes.namespaces` (`Same` when absent, `All`, or `Selector` on the
/// namespace's labels). A refused binding leaves the object without a waypoint, with a warning.
#[test]
fn binding_to_a_waypoint_in_another_namespace_needs_its_listener_to_allow_it() {
    let bound = |name: &str, waypoint: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: demo, labels: {{istio.io/use-waypoint: {waypoint}, istio.io/use-waypoint-namespace: shared}}}}\nspec: {{selector: {{app: nothing}}, ports: [{{port: 80}}]}}\n---\n"
        )
    };
    let yaml = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: demo, labels: {{istio.io/dataplane-mode: ambient, team: pay}}}}\n---\n{}{}{}{}{}{}{}{}{}{}{}{}",
        shared_gateway("open", "{from: All}", "10.96.7.1"),
        shared_gateway(
            "teams",
            "{from: Selector, selector: {matchExpressions: [{key: team, operator: In, values: [pay, ops]}]}}",
            "10.96.7.6"
        ),
        shared_gateway("closed", "", "10.96.7.2"),
        shared_gateway("same", "{from: Same}", "10.96.7.3"),
        shared_gateway(
            "pay-only",
            "{from: Selector, selector: {matchLabels: {team: pay}}}",
            "10.96.7.4"
        ),
        shared_gateway(
            "ops-only",
            "{from: Selector, selector: {matchLabels: {team: ops}}}",
            "10.96.7.5"
        ),
        bound("a", "open"),
        bound("b", "closed"),
        bound("c", "same"),
        bound("d", "pay-only"),
        bound("e", "ops-only"),
        bound("f", "teams"),
    );
    let r = run(&yaml);
    let has_waypoint = |name: &str| {
        service(&r, &format!("demo/{name}.demo.svc.cluster.local"))
            .waypoint
            .is_some()
    };
    assert!(has_waypoint("a"), "from: All");
    assert!(!has_waypoint("b"), "no allowedRoutes: Same");
    assert!(!has_waypoint("c"), "from: Same");
    assert!(has_waypoint("d"), "selector matching the namespace");
    assert!(!has_waypoint("e"), "selector not matching it");
    assert!(has_waypoint("f"), "matchExpressions matching it");
    let denied: Vec<(String, WarningKind)> =
        r.warnings.iter().map(|w| (w.to_string(), w.kind)).collect();
    assert_eq!(
        denied,
        [
            (
                "Service demo/b: istio.io/use-waypoint: Gateway shared/closed does not let namespace demo bind to it (its HBONE listener's allowedRoutes.namespaces.from is Same); no waypoint".to_string(),
                WarningKind::WaypointAttachmentDenied
            ),
            (
                "Service demo/c: istio.io/use-waypoint: Gateway shared/same does not let namespace demo bind to it (its HBONE listener's allowedRoutes.namespaces.from is Same); no waypoint".to_string(),
                WarningKind::WaypointAttachmentDenied
            ),
            (
                "Service demo/e: istio.io/use-waypoint: Gateway shared/ops-only does not let namespace demo bind to it (its HBONE listener's allowedRoutes.namespaces.from is Selector); no waypoint".to_string(),
                WarningKind::WaypointAttachmentDenied
            ),
        ]
    );
    // WaypointBound says the same, with Istio's reasons.
    let cluster = {
        let (objects, errors) = ambit_mesh::parse_documents(&yaml, "test.yaml");
        assert!(errors.is_empty(), "{errors:?}");
        Cluster::from_objects(objects)
    };
    let bindings = ambit_mesh::status::service_bindings(&cluster);
    let reason = |name: &str| {
        bindings[&("demo".to_string(), name.to_string())]
            .reason
            .clone()
    };
    assert_eq!(reason("a"), "WaypointAccepted");
    assert_eq!(reason("b"), "AttachmentDenied");
    assert_eq!(reason("e"), "AttachmentDenied");
}

#[test]
fn missing_or_unaddressed_gateways_yield_no_waypoint_and_a_warning() {
    // Namespace bound to a Gateway that does not exist.
    let r = run(DEMO_BOUND);
    assert!(workload(&r, "demo", "echo-1").waypoint.is_none());
    assert!(
        service(&r, "demo/echo.demo.svc.cluster.local")
            .waypoint
            .is_none()
    );
    assert_eq!(
        r.warning_texts(),
        [
            "Namespace demo: istio.io/use-waypoint: Gateway demo/wp does not exist; its pods and services get no waypoint from it"
        ]
    );
    assert_eq!(r.warnings[0].kind, WarningKind::WaypointNotFound);

    // Object bindings to a Gateway without addresses yet, or of another class, or not taking
    // that traffic: each warned about naming the object and the Gateway.
    let extra = format!(
        "{}{}{}{}",
        gateway(
            "demo",
            "pending",
            "istio.io/waypoint-for: all",
            "status: {}"
        ),
        gateway("demo", "svc-only", "", &addressed("demo", "svc-only")),
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: ingress, namespace: demo}\nspec: {gatewayClassName: istio}\nstatus: {addresses: [{value: 10.96.8.8}]}\n---\n",
        r#"apiVersion: v1
kind: Pod
metadata: {name: echo-2, namespace: demo, labels: {app: echo, istio.io/use-waypoint: pending}}
spec: {nodeName: node-1}
status: {podIP: 10.244.1.6}
---
apiVersion: v1
kind: Pod
metadata: {name: echo-3, namespace: demo, labels: {app: echo, istio.io/use-waypoint: svc-only}}
spec: {nodeName: node-1}
status: {podIP: 10.244.1.7}
---
apiVersion: v1
kind: Service
metadata: {name: other, namespace: demo, labels: {istio.io/use-waypoint: ingress}}
spec: {selector: {app: nothing}, clusterIP: 10.96.0.20, ports: [{port: 80}]}
"#
    );
    let r = run(&extra);
    for pod in ["echo-2", "echo-3"] {
        assert!(workload(&r, "demo", pod).waypoint.is_none(), "{pod}");
    }
    assert!(
        service(&r, "demo/other.demo.svc.cluster.local")
            .waypoint
            .is_none()
    );
    let mut warnings: Vec<(String, WarningKind)> =
        r.warnings.iter().map(|w| (w.to_string(), w.kind)).collect();
    warnings.sort();
    assert_eq!(
        warnings,
        [
            (
                "Pod demo/echo-2: istio.io/use-waypoint: Gateway demo/pending has no status.addresses yet; no waypoint".to_string(),
                WarningKind::WaypointNotReady
            ),
            (
                "Pod demo/echo-3: istio.io/use-waypoint: Gateway demo/svc-only does not take workload traffic (istio.io/waypoint-for: service); no waypoint".to_string(),
                WarningKind::WaypointWrongTraffic
            ),
            (
                "Service demo/other: istio.io/use-waypoint: Gateway demo/ingress is of class istio, not istio-waypoint; no waypoint".to_string(),
                WarningKind::WaypointWrongClass
            ),
        ]
    );

    // Once the controller writes the address, the same binding resolves.
    let r = run(&format!(
        "{DEMO_BOUND}{}",
        gateway(
            "demo",
            "wp",
            "istio.io/waypoint-for: all",
            "status: {addresses: [{type: Hostname, value: wp.demo.svc.cluster.local}]}"
        )
    ));
    assert!(workload(&r, "demo", "echo-1").waypoint.is_some());
}

#[test]
fn the_waypoints_own_pods_and_service_never_get_a_waypoint() {
    let extra = format!(
        "{DEMO_BOUND}{}{}",
        gateway(
            "demo",
            "wp",
            "istio.io/waypoint-for: all",
            &addressed("demo", "wp")
        ),
        r#"apiVersion: v1
kind: Pod
metadata: {name: wp-abc, namespace: demo, labels: {gateway.networking.k8s.io/gateway-name: wp, istio.io/dataplane-mode: ambient}}
spec: {nodeName: node-1, serviceAccountName: wp}
status: {podIP: 10.244.1.20}
---
apiVersion: v1
kind: Service
metadata: {name: wp, namespace: demo, labels: {gateway.networking.k8s.io/gateway-name: wp}}
spec: {selector: {gateway.networking.k8s.io/gateway-name: wp}, clusterIP: 10.96.9.9, ports: [{name: mesh, port: 15008}]}
"#
    );
    let r = run(&extra);
    let own = workload(&r, "demo", "wp-abc");
    assert_eq!(own.tunnel_protocol, pb::TunnelProtocol::Hbone as i32);
    assert!(own.waypoint.is_none(), "the waypoint's own pod");
    assert!(
        service(&r, "demo/wp.demo.svc.cluster.local")
            .waypoint
            .is_none()
    );
    assert!(
        workload(&r, "demo", "echo-1").waypoint.is_some(),
        "others still bound"
    );
}

#[test]
fn ingress_use_waypoint_comes_from_the_service_or_its_namespace() {
    let extra = r#"apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/ingress-use-waypoint: "true"}}
---
apiVersion: v1
kind: Service
metadata: {name: cart, namespace: shop}
spec: {clusterIP: 10.96.1.1, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: opted-out, namespace: shop, labels: {istio.io/ingress-use-waypoint: "false"}}
spec: {clusterIP: 10.96.1.2, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: front, namespace: demo, labels: {istio.io/ingress-use-waypoint: "true"}}
spec: {clusterIP: 10.96.1.3, ports: [{port: 80}]}
"#;
    let r = run(extra);
    assert!(service(&r, "shop/cart.shop.svc.cluster.local").ingress_use_waypoint);
    assert!(!service(&r, "shop/opted-out.shop.svc.cluster.local").ingress_use_waypoint);
    assert!(service(&r, "demo/front.demo.svc.cluster.local").ingress_use_waypoint);
    assert!(!service(&r, "demo/echo.demo.svc.cluster.local").ingress_use_waypoint);
}

#[test]
fn selectorless_services_take_endpoints_from_their_slices() {
    let extra = r#"apiVersion: v1
kind: Service
metadata: {name: db, namespace: demo}
spec:
  clusterIP: 10.96.2.2
  ports: [{name: sql, port: 5432, targetPort: 15432}, {name: admin, port: 9090}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: db-x1, namespace: demo, labels: {kubernetes.io/service-name: db}}
addressType: IPv4
endpoints:
- addresses: [10.244.1.5]
  targetRef: {kind: Pod, name: echo-1, namespace: demo}
- addresses: [192.168.50.4]
  conditions: {ready: true}
  nodeName: node-1
- addresses: [192.168.50.5]
  conditions: {ready: false}
  zone: zone-b
ports: [{name: sql, port: 6543}, {name: admin, port: 9091}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: echo-abc, namespace: demo, labels: {kubernetes.io/service-name: echo}}
addressType: IPv4
endpoints: [{addresses: [192.168.60.1]}]
ports: [{name: http, port: 8080}]
---
apiVersion: v1
kind: Node
metadata: {name: node-1, labels: {topology.kubernetes.io/region: eu, topology.kubernetes.io/zone: eu-a}}
"#;
    let r = run(extra);
    let echo = workload(&r, "demo", "echo-1");
    let db = &echo.services["demo/db.demo.svc.cluster.local"].ports;
    let pairs: Vec<(u32, u32)> = db.iter().map(|p| (p.service_port, p.target_port)).collect();
    assert_eq!(
        pairs,
        [(5432, 6543), (9090, 9091)],
        "target ports from the slice's ports, by name"
    );
    assert!(
        echo.services
            .contains_key("demo/echo.demo.svc.cluster.local"),
        "selector services kept"
    );

    let external = |ip: &str| match &r.addresses
        [&format!("Kubernetes/discovery.k8s.io/EndpointSlice/demo/db-x1/{ip}")]
        .r#type
    {
        Some(pb::address::Type::Workload(w)) => w.clone(),
        other => panic!("{other:?}"),
    };
    let ready = external("192.168.50.4");
    assert_eq!(ready.addresses, [vec![192, 168, 50, 4]]);
    assert_eq!(ready.tunnel_protocol, pb::TunnelProtocol::None as i32);
    assert_eq!(ready.status, pb::WorkloadStatus::Healthy as i32);
    assert_eq!(ready.namespace, "demo");
    assert_eq!(
        ready.services["demo/db.demo.svc.cluster.local"].ports[0].target_port,
        6543
    );
    assert_eq!(ready.node, "node-1");
    assert_eq!(
        ready
            .locality
            .as_ref()
            .map(|l| (l.region.as_str(), l.zone.as_str())),
        Some(("eu", "eu-a")),
        "locality from the endpoint's node"
    );
    let not_ready = external("192.168.50.5");
    assert_eq!(not_ready.status, pb::WorkloadStatus::Unhealthy as i32);
    assert_eq!(not_ready.locality.as_ref().unwrap().zone, "zone-b");
    assert!(
        !r.addresses
            .keys()
            .any(|k| k.contains("EndpointSlice/demo/echo-abc")),
        "slices of a service with a selector are not read"
    );
    assert!(
        !r.addresses.keys().any(|k| k.ends_with("/10.244.1.5")),
        "a known pod is not duplicated as an address workload"
    );
}

#[test]
fn workload_locality_comes_from_the_node_labels() {
    let extra = r#"apiVersion: v1
kind: Node
metadata:
  name: node-1
  labels: {topology.kubernetes.io/region: eu-west, topology.kubernetes.io/zone: eu-west-1a, topology.istio.io/subzone: rack-7}
---
apiVersion: v1
kind: Node
metadata: {name: node-2}
"#;
    let r = run(extra);
    let locality = workload(&r, "demo", "echo-1").locality.clone().unwrap();
    assert_eq!(
        (
            locality.region.as_str(),
            locality.zone.as_str(),
            locality.subzone.as_str()
        ),
        ("eu-west", "eu-west-1a", "rack-7")
    );
    assert!(
        workload(&r, "demo", "client").locality.is_none(),
        "node without topology labels"
    );
}

#[test]
fn routes_and_waypoint_policies_warn_when_their_service_has_no_waypoint() {
    let route = r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: echo-split, namespace: demo}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 80}, {name: some-ingress}]
  rules: [{backendRefs: [{name: echo, port: 80}]}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: echo, namespace: demo}
spec: {host: echo.demo.svc.cluster.local, trafficPolicy: {tls: {mode: ISTIO_MUTUAL}}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: l7, namespace: demo}
spec:
  targetRefs: [{kind: Service, group: "", name: echo}]
  rules: [{to: [{operation: {methods: [GET]}}]}]
"#;
    let r = run(route);
    assert_eq!(
        r.warnings.iter().map(|w| w.kind).collect::<Vec<_>>(),
        [
            WarningKind::RouteHasNoEffect,
            WarningKind::DestinationRuleHasNoEffect,
            WarningKind::PolicyTargetNoWaypoint
        ]
    );
    assert_eq!(
        r.warning_texts(),
        [
            "HTTPRoute demo/echo-split: spec.parentRefs[0]: Service demo/echo has no waypoint: the route has no effect on it",
            "DestinationRule demo/echo: spec.host: Service demo/echo has no waypoint: the DestinationRule has no effect on it",
            "AuthorizationPolicy demo/l7: spec.targetRefs: no target has a usable waypoint; the policy is not enforced",
        ]
    );
    assert_eq!(r.waypoint_policies, ["demo/l7"]);

    let r = run(&format!(
        "{DEMO_BOUND}{}{route}",
        gateway("demo", "wp", "", &addressed("demo", "wp"))
    ));
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
    assert_eq!(
        r.waypoint_policies,
        ["demo/l7"],
        "passed on for the waypoint"
    );
    assert!(
        !r.authorizations.contains_key("demo/l7"),
        "never sent to ztunnel"
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
        r.warnings.iter().any(|w| w.kind == WarningKind::L7PolicyOnZtunnel
            && w.to_string().contains(
                "AuthorizationPolicy istio-system/deny-legacy: spec.rules[0]: uses L7 fields (paths)"
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

#[test]
fn service_ports_carry_their_protocol_from_app_protocol_else_the_name_prefix() {
    let r = run(r#"apiVersion: v1
kind: Service
metadata: {name: protocols, namespace: demo}
spec:
  selector: {app: echo}
  clusterIP: 10.96.0.20
  ports:
  - {name: web, port: 1, appProtocol: http}
  - {name: tcp-but-h2c, port: 2, appProtocol: kubernetes.io/h2c}
  - {name: api, port: 3, appProtocol: GRPC}
  - {name: http2-frontend, port: 4}
  - {name: grpc-web, port: 5}
  - {name: https, port: 6}
  - {name: tls-passthrough, port: 7}
  - {name: mysql, port: 8}
  - {name: redis-cache, port: 9}
  - {name: mongo, port: 10}
  - {name: tcp, port: 11}
  - {name: metrics, port: 12}
  - {port: 13}
  - {name: http-dns, port: 14, protocol: UDP}
  - {name: tcp-x, port: 15, appProtocol: made-up}
  - {name: ws, port: 16, appProtocol: kubernetes.io/ws}
  - {name: webgrpc, port: 17, appProtocol: grpc-web}
"#);
    let ports: Vec<(u32, pb::AppProtocol)> = service(&r, "demo/protocols.demo.svc.cluster.local")
        .ports
        .iter()
        .map(|p| (p.service_port, p.app_protocol()))
        .collect();
    use pb::AppProtocol::*;
    assert_eq!(
        ports,
        [
            (1, Http11),
            (2, Http2),
            (3, Grpc),
            (4, Http2),
            (5, Grpc),
            (6, Tls),
            (7, Tls),
            (8, Tcp),
            (9, Tcp),
            (10, Tcp),
            (11, Tcp),
            (12, Unknown),
            (13, Unknown),
            (14, Unknown),
            (15, Tcp),
            (16, Http11),
            (17, Http11),
        ]
    );
}
