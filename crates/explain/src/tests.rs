//! Flows through the lab's demo objects (and Istio's canary example), explained.

use ambit_mesh::translate::{Cluster, MeshSettings};

use super::*;

const DEMO: &str = include_str!("../tests/fixtures/demo.yaml");
const CANARY: &str = include_str!("../../../tests/fixtures/istio-canary.yaml");

fn cluster(extra: &str) -> Cluster {
    let text = format!("{DEMO}\n---\n{extra}");
    let (objects, errors) = ambit_mesh::parse_documents(&text, "demo");
    assert!(errors.is_empty(), "{errors:?}");
    Cluster::from_objects(objects)
}

fn flow(from: &str, to: &str) -> Flow {
    Flow {
        from: from.into(),
        to: to.into(),
        ..Flow::default()
    }
}

fn run(cluster: &Cluster, flow: &Flow) -> Explanation {
    explain(cluster, &MeshSettings::default(), flow).unwrap_or_else(|e| panic!("{e}"))
}

fn json(e: &Explanation) -> serde_json::Value {
    serde_json::to_value(e).unwrap()
}

const DENY_CLIENT: &str = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny-client, namespace: demo}\nspec:\n  action: DENY\n  rules: [{from: [{source: {principals: [cluster.local/ns/demo/sa/client]}}]}]\n";
const STRICT: &str = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: demo}\nspec: {mtls: {mode: STRICT}}\n";

#[test]
fn a_service_call_goes_through_the_waypoint_and_its_route_splits_between_v1_and_v2() {
    let e = run(
        &cluster(""),
        &flow("demo/client", "echo.demo.svc.cluster.local:80"),
    );
    let j = json(&e);
    assert_eq!(
        j["source"]["identity"],
        "spiffe://cluster.local/ns/demo/sa/client"
    );
    assert_eq!(j["source"]["captured"], true);
    assert_eq!(j["source"]["node"], "node-1");
    assert_eq!(j["destination"]["service"]["service"], "demo/echo");
    assert_eq!(j["destination"]["service"]["targetPort"], 8080);
    assert_eq!(j["destination"]["service"]["appProtocol"], "http");
    assert_eq!(j["destination"]["ip"], "10.96.0.10");
    assert_eq!(j["destination"]["endpoints"].as_array().unwrap().len(), 2);

    assert_eq!(j["waypoint"]["inPath"], true);
    assert_eq!(j["waypoint"]["gateway"], "demo/waypoint");
    assert_eq!(j["waypoint"]["addressedAs"], "service");
    assert_eq!(j["waypoint"]["pod"], "demo/waypoint-waypoint");
    assert_eq!(
        j["waypoint"]["identity"],
        "spiffe://cluster.local/ns/demo/sa/waypoint"
    );
    assert_eq!(j["waypoint"]["waypointFor"], "service");
    assert_eq!(
        j["waypoint"]["label"],
        serde_json::json!({"object": "Service demo/echo", "key": "istio.io/use-waypoint", "value": "waypoint"})
    );

    assert_eq!(j["route"]["protocol"], "http");
    assert_eq!(j["route"]["decision"], "matched");
    assert_eq!(j["route"]["route"], "HTTPRoute/demo/echo");
    assert_eq!(j["route"]["rule"], 1);
    let backends: Vec<(String, u64, String)> = j["route"]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["service"].as_str().unwrap().to_string(),
                b["weight"].as_u64().unwrap(),
                b["endpoints"][0]["pod"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        backends,
        vec![
            (
                "demo/echo-v1.demo.svc.cluster.local".to_string(),
                90,
                "demo/echo-1".to_string()
            ),
            (
                "demo/echo-v2.demo.svc.cluster.local".to_string(),
                10,
                "demo/echo-2".to_string()
            ),
        ]
    );

    // The waypoint checks L7 with the client's identity; the pods' ztunnels see the waypoint's.
    let hops = j["hops"].as_array().unwrap();
    assert_eq!(hops.len(), 3, "{hops:?}");
    assert_eq!(hops[0]["kind"], "waypoint");
    assert_eq!(hops[0]["l7"], true);
    assert_eq!(hops[0]["peer"], "spiffe://cluster.local/ns/demo/sa/client");
    assert_eq!(hops[0]["destination"], "10.96.0.10:80");
    assert_eq!(
        hops[0]["policies"],
        serde_json::json!([{"policy": "demo/echo-no-admin", "action": "DENY", "dryRun": false, "matched": false, "rule": null, "decides": false}])
    );
    for hop in &hops[1..] {
        assert_eq!(hop["kind"], "destination");
        assert_eq!(hop["peer"], "spiffe://cluster.local/ns/demo/sa/waypoint");
        assert_eq!(hop["sourceIp"], "10.0.1.5");
        assert_eq!(
            hop["decidedBy"],
            serde_json::json!({"policy": "demo/echo-allow-client", "action": "ALLOW", "rule": 0})
        );
    }
    assert_eq!(j["verdict"]["outcome"], "allowed");
    assert_eq!(j["verdict"]["path"], "hbone-via-waypoint");
    assert_eq!(
        j["verdict"]["backends"],
        serde_json::json!(["demo/echo-1", "demo/echo-2"])
    );
    assert_eq!(j["flow"]["method"], "GET");
    assert_eq!(j["flow"]["path"], "/");

    let text = e.to_text();
    for line in [
        "3. Waypoint   in the path: Gateway demo/waypoint (pod demo/waypoint-waypoint, 10.0.1.5)",
        "istio.io/use-waypoint=waypoint on Service demo/echo names Gateway demo/waypoint, which takes service traffic",
        "4. Route      [http] HTTPRoute/demo/echo rule 1 matches",
        "backend demo/echo-v1.demo.svc.cluster.local:80 weight 90 -> demo/echo-1",
        "ALLOW demo/echo-allow-client: rule 0 matches   <- decides",
        "Verdict      ALLOWED",
    ] {
        assert!(text.contains(line), "{line:?} missing from:\n{text}");
    }
}

#[test]
fn the_canary_header_takes_rule_0_to_v2_only() {
    let mut f = flow("demo/client", "echo.demo:80");
    f.headers = vec![parse_header("x-canary=true").unwrap()];
    let j = json(&run(&cluster(""), &f));
    assert_eq!(j["route"]["rule"], 0);
    assert_eq!(j["verdict"]["backends"], serde_json::json!(["demo/echo-2"]));
    assert_eq!(j["hops"].as_array().unwrap().len(), 2);
    assert_eq!(
        j["destination"]["resolved"],
        "<service>.<namespace>: Service demo/echo, VIP 10.96.0.10"
    );
}

#[test]
fn admin_is_refused_at_the_waypoint_with_403_by_the_services_deny_policy() {
    let mut f = flow("demo/client", "echo:80");
    f.path = Some("/admin/users".into());
    let e = run(&cluster(""), &f);
    let j = json(&e);
    assert_eq!(j["verdict"]["outcome"], "denied");
    assert_eq!(j["verdict"]["status"], 403);
    assert_eq!(j["verdict"]["hop"], "waypoint demo/waypoint");
    assert_eq!(j["verdict"]["policy"], "demo/echo-no-admin");
    assert_eq!(
        j["hops"][0]["decidedBy"],
        serde_json::json!({"policy": "demo/echo-no-admin", "action": "DENY", "rule": 0})
    );
    // Refused before routing.
    assert!(j["route"].is_null());
    assert!(
        e.to_text().contains("Verdict      DENIED [403]"),
        "{}",
        e.to_text()
    );
}

#[test]
fn the_tcp_port_goes_through_the_waypoint_at_l4_and_the_http_deny_does_not_cover_it() {
    let j = json(&run(&cluster(""), &flow("demo/client", "echo:9000")));
    assert_eq!(j["waypoint"]["inPath"], true);
    assert_eq!(j["route"]["protocol"], "tcp");
    assert_eq!(j["route"]["decision"], "service-default");
    assert_eq!(j["hops"][0]["l7"], false);
    assert_eq!(j["hops"][0]["policies"][0]["matched"], false);
    assert_eq!(j["verdict"]["outcome"], "allowed");
    assert!(j["flow"]["method"].is_null());
    for hop in j["hops"].as_array().unwrap()[1..].iter() {
        assert!(hop["destination"].as_str().unwrap().ends_with(":9000"));
    }
}

#[test]
fn a_pod_ip_call_skips_the_services_waypoint_and_is_checked_with_the_clients_identity() {
    let e = run(&cluster(""), &flow("demo/client", "10.0.1.3:8080"));
    let j = json(&e);
    assert_eq!(j["destination"]["addressed"], "workload");
    assert_eq!(j["destination"]["workload"]["pod"], "demo/echo-1");
    assert_eq!(j["waypoint"]["inPath"], false);
    let reason = j["waypoint"]["reason"].as_str().unwrap();
    assert!(
        reason.contains("neither Pod demo/echo-1 nor Namespace demo has istio.io/use-waypoint")
            && reason.contains(
                "the waypoint of Service demo/echo takes only traffic addressed to the Service"
            ),
        "{reason}"
    );
    assert!(j["route"].is_null());
    assert_eq!(
        j["hops"][0]["peer"],
        "spiffe://cluster.local/ns/demo/sa/client"
    );
    assert_eq!(j["hops"][0]["sourceIp"], "10.0.1.2");
    assert_eq!(j["hops"][0]["at"], "ztunnel on node-1 for demo/echo-1");
    assert_eq!(j["verdict"]["outcome"], "allowed");
    assert_eq!(j["verdict"]["path"], "hbone");
    assert_eq!(j["verdict"]["backends"], serde_json::json!(["demo/echo-1"]));

    // The lab test's namespace-wide DENY for the client's identity refuses it at L4...
    let denied = cluster(DENY_CLIENT);
    let j = json(&run(&denied, &flow("demo/client", "10.0.1.3:8080")));
    assert_eq!(j["verdict"]["outcome"], "denied");
    assert_eq!(j["verdict"]["policy"], "demo/deny-client");
    assert_eq!(j["verdict"]["hop"], "ztunnel on node-1 for demo/echo-1");
    assert!(j["verdict"]["status"].is_null());
    let policies: Vec<(&str, bool, bool)> = j["hops"][0]["policies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["policy"].as_str().unwrap(),
                p["matched"].as_bool().unwrap(),
                p["decides"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        policies,
        vec![
            ("demo/deny-client", true, true),
            ("demo/echo-allow-client", true, false)
        ]
    );
    // ...but not through the waypoint, where the pods see the waypoint's identity.
    let j = json(&run(&denied, &flow("demo/client", "echo:80")));
    assert_eq!(j["verdict"]["outcome"], "allowed");
}

#[test]
fn a_service_without_a_waypoint_goes_straight_to_its_endpoints() {
    let j = json(&run(&cluster(""), &flow("demo/client", "echo-v1:80")));
    assert_eq!(j["waypoint"]["inPath"], false);
    assert_eq!(
        j["waypoint"]["reason"],
        "neither Service demo/echo-v1 nor Namespace demo has istio.io/use-waypoint; no waypoint for this Service"
    );
    assert_eq!(j["hops"][0]["destination"], "10.0.1.3:8080");
    assert_eq!(j["verdict"]["backends"], serde_json::json!(["demo/echo-1"]));
    assert_eq!(j["verdict"]["path"], "hbone");
}

#[test]
fn a_client_outside_the_mesh_connects_in_plaintext_and_has_no_identity() {
    let c = cluster("");
    let e = run(&c, &flow("legacy/client", "10.0.1.3:8080"));
    let j = json(&e);
    assert_eq!(j["source"]["captured"], false);
    assert_eq!(
        j["source"]["enrollment"],
        "neither the pod nor its namespace is labelled istio.io/dataplane-mode=ambient"
    );
    assert_eq!(j["waypoint"]["inPath"], false);
    assert!(j["hops"][0]["peer"].is_null());
    assert_eq!(j["verdict"]["outcome"], "denied");
    assert_eq!(j["verdict"]["path"], "plaintext-direct");
    assert!(
        j["verdict"]["summary"]
            .as_str()
            .unwrap()
            .starts_with("not captured (plaintext direct): denied: no ALLOW policy matched"),
        "{}",
        j["verdict"]["summary"]
    );
    // demo/client has no ALLOW policy of its own: PERMISSIVE admits plaintext, STRICT refuses it.
    let j = json(&run(&c, &flow("legacy/client", "10.0.1.2:8080")));
    assert_eq!(j["verdict"]["outcome"], "allowed");
    assert_eq!(j["verdict"]["backends"], serde_json::json!(["demo/client"]));
    let e = run(&cluster(STRICT), &flow("legacy/client", "10.0.1.2:8080"));
    let j = json(&e);
    assert_eq!(j["verdict"]["outcome"], "refused-strict");
    assert_eq!(j["verdict"]["policy"], "demo/istio_converted_static_strict");
    assert!(e.to_text().contains("REFUSED (STRICT)"), "{}", e.to_text());
    // A mesh client still gets through STRICT.
    let j = json(&run(
        &cluster(STRICT),
        &flow("demo/echo-1", "10.0.1.2:8080"),
    ));
    assert_eq!(j["verdict"]["outcome"], "allowed");
}

#[test]
fn routes_that_match_nothing_answer_404_and_an_empty_backend_503() {
    let only_api = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: echo, namespace: demo}\nspec:\n  parentRefs: [{group: \"\", kind: Service, name: echo, port: 80}]\n  rules:\n  - matches: [{path: {type: PathPrefix, value: /api}}]\n    backendRefs: [{name: echo-v1, port: 80}]\n";
    let mut f = flow("demo/client", "echo:80");
    f.path = Some("/other".into());
    let j = json(&run(&cluster(only_api), &f));
    assert_eq!(j["route"]["decision"], "no-match");
    assert_eq!(j["verdict"]["outcome"], "no-route");
    assert_eq!(j["verdict"]["status"], 404);

    let echo_2_not_ready = "apiVersion: v1\nkind: Pod\nmetadata: {name: echo-2, namespace: demo, labels: {app: echo, version: v2}}\nspec: {nodeName: node-2, serviceAccountName: echo}\nstatus: {podIP: 10.0.2.2, phase: Running, conditions: [{type: Ready, status: \"False\"}]}\n";
    let mut f = flow("demo/client", "echo:80");
    f.headers = vec![("x-canary".into(), "true".into())];
    let j = json(&run(&cluster(echo_2_not_ready), &f));
    assert_eq!(j["verdict"]["outcome"], "no-healthy-endpoint");
    assert_eq!(j["verdict"]["status"], 503);
    assert!(
        j["route"]["backends"][0]["problem"]
            .as_str()
            .unwrap()
            .starts_with(
                "no healthy endpoint of demo/echo-v2.demo.svc.cluster.local serves port 80"
            )
    );
    let endpoints = &j["destination"]["endpoints"];
    assert_eq!(endpoints[1]["pod"], "demo/echo-2");
    assert_eq!(endpoints[1]["healthy"], false);
    assert_eq!(endpoints[1]["eligible"], false);
}

#[test]
fn istios_canary_example_sends_the_header_to_the_canary_subset() {
    let setup = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}}\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: waypoint, namespace: shop}\nspec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}\nstatus: {addresses: [{type: Hostname, value: waypoint.shop.svc.cluster.local}]}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: waypoint, namespace: shop, labels: {gateway.networking.k8s.io/gateway-name: waypoint}}\nspec: {clusterIP: 10.96.1.9, selector: {gateway.networking.k8s.io/gateway-name: waypoint}, ports: [{name: mesh, port: 15008}]}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: waypoint-0, namespace: shop, labels: {gateway.networking.k8s.io/gateway-name: waypoint, istio.io/dataplane-mode: none}}\nspec: {nodeName: node-1, serviceAccountName: waypoint}\nstatus: {podIP: 10.0.3.9}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: product-service, namespace: shop}\nspec: {clusterIP: 10.96.1.1, selector: {app: product}, ports: [{name: http, port: 80, targetPort: 8080}]}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: product-v1, namespace: shop, labels: {app: product, version: v1}}\nspec: {nodeName: node-1}\nstatus: {podIP: 10.0.3.1}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: product-v2, namespace: shop, labels: {app: product, version: v2}}\nspec: {nodeName: node-2}\nstatus: {podIP: 10.0.3.2}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: shopper, namespace: shop}\nspec: {nodeName: node-1}\nstatus: {podIP: 10.0.3.3}\n";
    let text = format!("{}\n---\n{setup}", CANARY.replace("NAMESPACE", "shop"));
    let (objects, errors) = ambit_mesh::parse_documents(&text, "canary");
    assert!(errors.is_empty(), "{errors:?}");
    let c = Cluster::from_objects(objects);
    let mut f = flow("shop/shopper", "product-service:80");
    f.headers = vec![("x-canary".into(), "true".into())];
    let j = json(&run(&c, &f));
    assert_eq!(
        j["waypoint"]["label"]["object"], "Namespace shop",
        "{}",
        j["waypoint"]
    );
    assert_eq!(j["route"]["route"], "VirtualService/shop/product-service");
    assert_eq!(j["route"]["rule"], 0);
    assert_eq!(j["route"]["backends"][0]["subset"], "canary");
    assert_eq!(
        j["verdict"]["backends"],
        serde_json::json!(["shop/product-v2"])
    );
    let j = json(&run(&c, &flow("shop/shopper", "product-service:80")));
    assert_eq!(j["route"]["rule"], 1);
    assert_eq!(
        j["verdict"]["backends"],
        serde_json::json!(["shop/product-v1", "shop/product-v2"])
    );
}

#[test]
fn a_waypoint_for_workloads_takes_pod_addressed_traffic_from_a_namespace_label() {
    let setup = "apiVersion: v1\nkind: Namespace\nmetadata: {name: demo, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}}\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: waypoint, namespace: demo, labels: {istio.io/waypoint-for: all}}\nspec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}\nstatus: {addresses: [{type: Hostname, value: waypoint.demo.svc.cluster.local}]}\n";
    let c = cluster(setup);
    let j = json(&run(&c, &flow("demo/client", "10.0.2.2:8080")));
    assert_eq!(j["waypoint"]["inPath"], true);
    assert_eq!(j["waypoint"]["addressedAs"], "workload");
    assert_eq!(j["waypoint"]["label"]["object"], "Namespace demo");
    assert_eq!(j["waypoint"]["waypointFor"], "all");
    assert_eq!(j["route"]["decision"], "pod-addressed");
    assert_eq!(j["verdict"]["backends"], serde_json::json!(["demo/echo-2"]));
    // The waypoint's own traffic does not loop back to it.
    let j = json(&run(&c, &flow("demo/waypoint-waypoint", "10.0.2.2:8080")));
    assert_eq!(j["source"]["captured"], false);
    assert_eq!(j["waypoint"]["inPath"], false);
}

#[test]
fn a_service_port_that_does_not_exist_and_bad_arguments_are_named() {
    let c = cluster("");
    let j = json(&run(&c, &flow("demo/client", "echo-v1:81")));
    assert_eq!(j["verdict"]["outcome"], "unknown-port");
    let err = |from: &str, to: &str| {
        explain(&c, &MeshSettings::default(), &flow(from, to))
            .unwrap_err()
            .to_string()
    };
    assert_eq!(
        err("client", "echo:80"),
        "--from \"client\": expected <namespace>/<pod>"
    );
    assert_eq!(
        err("demo/nobody", "echo:80"),
        "--from demo/nobody: there is no Pod demo/nobody"
    );
    assert!(err("demo/client", "nothing:80").starts_with("--to nothing: no Service demo/nothing"));
    assert!(
        err("demo/client", "echo.other:80").starts_with("--to echo.other: no Service other/echo")
    );
    assert_eq!(
        err("demo/client", "echo"),
        "--to \"echo\": expected <host>:<port> or <ip>:<port>"
    );
    assert!(parse_header("no-separator").is_err());
    assert_eq!(
        parse_header("X-Canary: true").unwrap(),
        ("x-canary".to_string(), "true".to_string())
    );
}

#[test]
fn a_redirect_filter_answers_instead_of_forwarding() {
    let redirect = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: old, namespace: demo}\nspec:\n  parentRefs: [{group: \"\", kind: Service, name: echo, port: 80}]\n  rules:\n  - matches: [{path: {type: PathPrefix, value: /old}}]\n    filters:\n    - type: RequestRedirect\n      requestRedirect: {statusCode: 301, path: {type: ReplaceFullPath, replaceFullPath: /new}}\n";
    let mut f = flow("demo/client", "echo:80");
    f.path = Some("/old/page".into());
    let e = run(&cluster(redirect), &f);
    let j = json(&e);
    assert_eq!(j["route"]["route"], "HTTPRoute/demo/old");
    assert_eq!(
        j["route"]["filters"],
        serde_json::json!(["requestRedirect"])
    );
    assert_eq!(j["verdict"]["outcome"], "redirected");
    assert_eq!(j["verdict"]["status"], 301);
    let location = j["route"]["redirect"].as_str().unwrap();
    assert!(
        location.starts_with("301 ") && location.ends_with("/new"),
        "{location}"
    );
    assert!(
        e.to_text().contains("Verdict      REDIRECTED [301]"),
        "{}",
        e.to_text()
    );
    // Other paths still take the demo's route.
    let j = json(&run(&cluster(redirect), &flow("demo/client", "echo:80")));
    assert_eq!(j["route"]["route"], "HTTPRoute/demo/echo");
}
