//! Gateway, GatewayClass, HTTPRoute, DestinationRule, EndpointSlice and Node: typed as Kubernetes
//! writes them (defaults applied, unknown fields ignored), refused with the object and field named.

use std::time::Duration;

use ambit_mesh::destination_rule::parse_istio_duration;
use ambit_mesh::gateway_api::{FilterType, MatchType, PathModifierType, parse_gateway_duration};
use ambit_mesh::translate::Cluster;
use ambit_mesh::{Object, parse_documents, parse_object};

/// Parses `text`, expecting no errors.
fn parse_ok(text: &str) -> Vec<Object> {
    let (objects, errors) = parse_documents(text, "k.yaml");
    assert!(errors.is_empty(), "{errors:?}");
    objects
}

/// Parses one document, expecting exactly one error, and returns its message.
fn refused(text: &str) -> String {
    let (objects, errors) = parse_documents(text, "k.yaml");
    assert!(objects.is_empty(), "accepted: {objects:?}");
    assert_eq!(errors.len(), 1, "{errors:?}");
    errors[0].to_string()
}

const WAYPOINT: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  name: waypoint
  namespace: shop
  labels: {istio.io/waypoint-for: all}
  annotations: {note: x}
spec:
  gatewayClassName: istio-waypoint
  listeners:
  - name: mesh
    port: 15008
    protocol: HBONE
    allowedRoutes: {namespaces: {from: All}, kinds: [{kind: HTTPRoute}]}
  - {name: web, port: 80, protocol: HTTP, hostname: "*.shop.example"}
  infrastructure: {labels: {team: a}, annotations: {b: c}}
  someFutureField: 1
status:
  addresses:
  - {type: Hostname, value: waypoint.shop.svc.cluster.local}
  - {value: 10.96.5.5}
  conditions: [{type: Programmed, status: "True"}]
"#;

#[test]
fn gateway_and_gateway_class_are_typed() {
    let objects = parse_ok(&format!(
        "{WAYPOINT}---\napiVersion: gateway.networking.k8s.io/v1\nkind: GatewayClass\nmetadata: {{name: istio-waypoint, labels: {{istio.io/waypoint-for: workload}}}}\nspec: {{controllerName: istio.io/mesh-controller}}\n"
    ));
    let keys: Vec<String> = objects.iter().map(|o| o.key().to_string()).collect();
    assert_eq!(
        keys,
        ["Gateway shop/waypoint", "GatewayClass istio-waypoint"]
    );
    let Object::Gateway(gateway) = &objects[0] else {
        panic!("{:?}", objects[0])
    };
    assert_eq!(gateway.spec.gateway_class_name, "istio-waypoint");
    assert_eq!(gateway.metadata.labels["istio.io/waypoint-for"], "all");
    assert_eq!(gateway.spec.listeners[0].port, 15008);
    assert_eq!(gateway.spec.listeners[0].protocol, "HBONE");
    let allowed = gateway.spec.listeners[0].allowed_routes.as_ref().unwrap();
    assert_eq!(allowed.namespaces.as_ref().unwrap().from, "All");
    assert_eq!(allowed.kinds[0].kind, "HTTPRoute");
    assert_eq!(
        gateway.spec.listeners[1].hostname.as_deref(),
        Some("*.shop.example")
    );
    assert_eq!(
        gateway.spec.infrastructure.as_ref().unwrap().labels["team"],
        "a"
    );
    assert!(gateway.status.addresses[0].is_hostname());
    assert!(
        !gateway.status.addresses[1].is_hostname(),
        "IPAddress by default"
    );
    let Object::GatewayClass(class) = &objects[1] else {
        panic!()
    };
    assert_eq!(class.spec.controller_name, "istio.io/mesh-controller");
    assert_eq!(objects[1].key().namespace, "", "cluster-scoped");

    // Round trip through the document form keeps the kind and apiVersion.
    let value = objects[0].to_value();
    assert_eq!(value["apiVersion"], "gateway.networking.k8s.io/v1");
    let (again, errors) = parse_object(value, "Kubernetes");
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(again, vec![objects[0].clone()]);
}

#[test]
fn gateways_are_refused_by_field() {
    let gateway = |spec: &str| {
        refused(&format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: g, namespace: shop}}\n{spec}\n"
        ))
    };
    assert_eq!(
        gateway("spec: {listeners: []}"),
        "k.yaml doc 1: Gateway shop/g: spec.gatewayClassName: required"
    );
    assert_eq!(
        gateway("spec: {gatewayClassName: c, listeners: [{name: a, port: 70000, protocol: HTTP}]}"),
        "k.yaml doc 1: Gateway shop/g: spec.listeners[0].port: 70000 is not a port number (1-65535)"
    );
    assert_eq!(
        gateway(
            "spec: {gatewayClassName: c, listeners: [{name: a, port: 1, protocol: HTTP}, {name: a, port: 2, protocol: HTTP}]}"
        ),
        "k.yaml doc 1: Gateway shop/g: spec.listeners[1].name: \"a\" is used by another listener"
    );
    assert_eq!(
        gateway(
            "spec: {gatewayClassName: c}\nstatus: {addresses: [{type: IPAddress, value: 10.0.0.300}]}"
        ),
        "k.yaml doc 1: Gateway shop/g: status.addresses[0].value: \"10.0.0.300\" is not an IP address"
    );
    assert_eq!(
        gateway(
            "spec: {gatewayClassName: c}\nstatus: {addresses: [{type: NamedAddress, value: x}]}"
        ),
        "k.yaml doc 1: Gateway shop/g: status.addresses[0].type: \"NamedAddress\" is not Hostname or IPAddress"
    );
    assert_eq!(
        refused(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: g, namespace: shop, labels: {istio.io/waypoint-for: everything}}\nspec: {gatewayClassName: istio-waypoint}\n"
        ),
        "k.yaml doc 1: Gateway shop/g: metadata.labels[istio.io/waypoint-for]: \"everything\" is not service, workload, all or none"
    );
    assert_eq!(
        refused(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: GatewayClass\nmetadata: {name: c}\nspec: {}\n"
        ),
        "k.yaml doc 1: GatewayClass c: spec.controllerName: required"
    );
    // allowedRoutes.namespaces: from, and a selector's expressions, by field.
    let allowed = |namespaces: &str| {
        gateway(&format!(
            "spec: {{gatewayClassName: istio-waypoint, listeners: [{{name: mesh, port: 15008, protocol: HBONE, allowedRoutes: {{namespaces: {namespaces}}}}}]}}"
        ))
    };
    let at = "k.yaml doc 1: Gateway shop/g: spec.listeners[0].allowedRoutes.namespaces";
    assert_eq!(
        allowed("{from: Everywhere}"),
        format!("{at}.from: \"Everywhere\" is not Same, All or Selector")
    );
    assert_eq!(
        allowed("{from: Selector}"),
        format!("{at}.selector: required when from is Selector")
    );
    assert_eq!(
        allowed("{from: Selector, selector: {matchExpressions: [{key: team, operator: In}]}}"),
        format!("{at}.selector.matchExpressions[0].values: required with operator In")
    );
    assert_eq!(
        allowed(
            "{from: Selector, selector: {matchExpressions: [{key: team, operator: Exists}, {key: env, operator: Exists, values: [a]}]}}"
        ),
        format!("{at}.selector.matchExpressions[1].values: must be empty with operator Exists")
    );
    assert_eq!(
        allowed(
            "{from: Selector, selector: {matchExpressions: [{key: team, operator: Gt, values: [\"1\"]}]}}"
        ),
        format!(
            "{at}.selector.matchExpressions[0].operator: \"Gt\" is not In, NotIn, Exists or DoesNotExist"
        )
    );
    assert_eq!(
        allowed("{from: Selector, selector: {matchExpressions: [{operator: Exists}]}}"),
        format!("{at}.selector.matchExpressions[0].key: required")
    );
    // Istio's own networking.istio.io Gateway is a different kind: not read as a Gateway API one.
    let objects = parse_ok(
        "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: g, namespace: shop}\nspec: {selector: {istio: ingressgateway}}\n",
    );
    assert!(matches!(objects[0], Object::Other { .. }), "{objects:?}");
}

const ROUTE: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r, namespace: shop}
spec:
  parentRefs:
  - {group: "", kind: Service, name: cart, port: 80}
  - {name: ingress, namespace: gw, sectionName: web}
  hostnames: [cart.shop.example]
  rules:
  - matches:
    - path: {type: Exact, value: /checkout}
      headers: [{name: x-user, value: vip}, {type: RegularExpression, name: x-b, value: "a.*"}]
      queryParams: [{name: debug, value: "1"}]
      method: POST
    - path: {value: /cart}
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier: {set: [{name: x-a, value: "1"}], add: [{name: x-b, value: "2"}], remove: [x-c]}
    - type: ResponseHeaderModifier
      responseHeaderModifier: {remove: [server]}
    - type: URLRewrite
      urlRewrite: {hostname: cart.internal, path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2}}
    - type: RequestMirror
      requestMirror: {backendRef: {name: shadow, port: 80}, percent: 10}
    backendRefs:
    - {name: cart-v1, port: 8080, weight: 90}
    - {name: cart-v2, namespace: canary, port: 8080, weight: 10, filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x-canary, value: "1"}]}}]}
    - {group: example.com, kind: Bucket, name: static}
    timeouts: {request: 10s, backendRequest: 2s}
    retry: {codes: [503], attempts: 3, backoff: 100ms}
  - filters:
    - type: RequestRedirect
      requestRedirect: {scheme: https, statusCode: 301, path: {type: ReplaceFullPath, replaceFullPath: /}}
"#;

#[test]
fn http_routes_are_typed_completely_enough_to_route() {
    let objects = parse_ok(ROUTE);
    let Object::HttpRoute(route) = &objects[0] else {
        panic!("{:?}", objects[0])
    };
    assert_eq!(objects[0].key().to_string(), "HTTPRoute shop/r");
    let parents = &route.spec.parent_refs;
    assert!(parents[0].is_service());
    assert_eq!(parents[0].port, Some(80));
    assert!(!parents[1].is_service());
    assert_eq!(
        (parents[1].group(), parents[1].kind()),
        ("gateway.networking.k8s.io", "Gateway"),
        "Gateway API defaults"
    );
    assert_eq!(parents[1].section_name.as_deref(), Some("web"));
    assert_eq!(route.spec.hostnames, ["cart.shop.example"]);

    let rule = &route.spec.rules[0];
    let first = &rule.matches[0];
    let path = first.path.as_ref().unwrap();
    assert_eq!(
        (path.kind, path.value.as_str()),
        (MatchType::Exact, "/checkout")
    );
    assert_eq!(first.headers[0].kind, MatchType::Exact, "header default");
    assert_eq!(first.headers[1].kind, MatchType::RegularExpression);
    assert_eq!(first.query_params[0].name, "debug");
    assert_eq!(first.method.as_deref(), Some("POST"));
    assert_eq!(
        rule.matches[1].path.as_ref().unwrap().kind,
        MatchType::PathPrefix,
        "path type default"
    );
    let kinds: Vec<FilterType> = rule.filters.iter().map(|f| f.kind).collect();
    assert_eq!(
        kinds,
        [
            FilterType::RequestHeaderModifier,
            FilterType::ResponseHeaderModifier,
            FilterType::UrlRewrite,
            FilterType::RequestMirror
        ]
    );
    let modifier = rule.filters[0].request_header_modifier.as_ref().unwrap();
    assert_eq!(
        (
            modifier.set[0].name.as_str(),
            modifier.add[0].value.as_str(),
            modifier.remove[0].as_str()
        ),
        ("x-a", "2", "x-c")
    );
    let rewrite = rule.filters[2].url_rewrite.as_ref().unwrap();
    let rewrite_path = rewrite.path.as_ref().unwrap();
    assert_eq!(rewrite_path.kind, PathModifierType::ReplacePrefixMatch);
    assert_eq!(rewrite_path.replace_prefix_match.as_deref(), Some("/v2"));
    let mirror = rule.filters[3].request_mirror.as_ref().unwrap();
    assert_eq!(
        (mirror.backend_ref.name.as_str(), mirror.percent),
        ("shadow", Some(10))
    );

    let backends = &rule.backend_refs;
    assert_eq!(
        (
            backends[0].backend.name.as_str(),
            backends[0].backend.port,
            backends[0].weight()
        ),
        ("cart-v1", Some(8080), 90)
    );
    assert!(backends[0].backend.is_service());
    assert_eq!(backends[1].backend.namespace.as_deref(), Some("canary"));
    assert_eq!(
        backends[1].filters[0].kind,
        FilterType::RequestHeaderModifier
    );
    assert!(
        !backends[2].backend.is_service(),
        "a non-Service backend needs no port"
    );
    assert_eq!(backends[2].weight(), 1, "weight default");
    let timeouts = rule.timeouts.as_ref().unwrap();
    assert_eq!(timeouts.request.as_deref(), Some("10s"));
    assert_eq!(timeouts.backend_request.as_deref(), Some("2s"));
    let retry = rule.retry.as_ref().unwrap();
    assert_eq!(
        (retry.codes.as_slice(), retry.attempts),
        (&[503][..], Some(3))
    );

    let second = &route.spec.rules[1];
    assert_eq!(
        second.effective_matches()[0].path.as_ref().unwrap().value,
        "/",
        "no matches means prefix /"
    );
    let redirect = second.filters[0].request_redirect.as_ref().unwrap();
    assert_eq!(
        (redirect.scheme.as_deref(), redirect.status_code),
        (Some("https"), Some(301))
    );
}

#[test]
fn http_routes_are_refused_by_field() {
    let rule = |rule: &str| {
        refused(&format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: r, namespace: shop}}\nspec:\n  parentRefs: [{{group: \"\", kind: Service, name: cart}}]\n  rules:\n  - {rule}\n"
        ))
    };
    let prefix = "k.yaml doc 1: HTTPRoute shop/r: ";
    let cases = [
        (
            "{backendRefs: [{name: a, port: 80}, {name: b}]}",
            "spec.rules[0].backendRefs[1].port: required for a Service backend",
        ),
        (
            "{backendRefs: [{name: a, port: 80, weight: 1000001}]}",
            "spec.rules[0].backendRefs[0].weight: 1000001 is not 0-1000000",
        ),
        (
            "{backendRefs: [{name: a, port: 0}]}",
            "spec.rules[0].backendRefs[0].port: 0 is not a port number (1-65535)",
        ),
        (
            "{timeouts: {request: 10 seconds}}",
            "spec.rules[0].timeouts.request: \"10 seconds\" is not a duration (such as 10s, 1m30s or 500ms)",
        ),
        (
            "{timeouts: {request: 1s, backendRequest: 5s}}",
            "spec.rules[0].timeouts.backendRequest: \"5s\" is longer than timeouts.request (\"1s\")",
        ),
        (
            "{matches: [{path: {type: Glob, value: /a}}]}",
            "spec.rules[0].matches[0].path.type: must be Exact, PathPrefix or RegularExpression",
        ),
        (
            "{matches: [{path: {type: PathPrefix, value: a}}]}",
            "spec.rules[0].matches[0].path.value: \"a\" does not start with '/'",
        ),
        (
            "{matches: [{headers: [{type: PathPrefix, name: x, value: y}]}]}",
            "spec.rules[0].matches[0].headers[0].type: must be Exact or RegularExpression",
        ),
        (
            "{matches: [{method: FETCH}]}",
            "spec.rules[0].matches[0].method: \"FETCH\" is not an HTTP method (GET, HEAD, POST, PUT, DELETE, CONNECT, OPTIONS, TRACE, PATCH)",
        ),
        (
            "{filters: [{type: RequestRedirect}]}",
            "spec.rules[0].filters[0].requestRedirect: required for type RequestRedirect",
        ),
        (
            "{filters: [{type: Teleport}]}",
            "spec.rules[0].filters[0].type: must be RequestHeaderModifier, ResponseHeaderModifier, RequestRedirect, URLRewrite, RequestMirror or ExtensionRef",
        ),
        (
            "{filters: [{type: RequestRedirect, requestRedirect: {statusCode: 404}}]}",
            "spec.rules[0].filters[0].requestRedirect.statusCode: 404 is not 301, 302, 303, 307 or 308",
        ),
        (
            "{filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplaceFullPath}}}]}",
            "spec.rules[0].filters[0].urlRewrite.path.replaceFullPath: required for type ReplaceFullPath",
        ),
        (
            "{filters: [{type: RequestMirror, requestMirror: {backendRef: {name: shadow}}}]}",
            "spec.rules[0].filters[0].requestMirror.backendRef.port: required for a Service backend",
        ),
        (
            "{retry: {codes: [200]}}",
            "spec.rules[0].retry.codes: 200 is not an HTTP error status (400-599)",
        ),
    ];
    for (input, field) in cases {
        assert_eq!(rule(input), format!("{prefix}{field}"), "for {input}");
    }
    assert_eq!(
        refused(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r, namespace: shop}\nspec: {hostnames: [10.0.0.1]}\n"
        ),
        format!("{prefix}spec.hostnames[0]: \"10.0.0.1\" is not a valid hostname")
    );
    assert_eq!(
        refused(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r, namespace: shop}\nspec: {parentRefs: [{kind: Service, group: \"\"}]}\n"
        ),
        format!("{prefix}spec.parentRefs[0].name: required")
    );
}

#[test]
fn gateway_and_istio_durations() {
    assert_eq!(
        parse_gateway_duration("1h30m"),
        Some(Duration::from_secs(5400))
    );
    assert_eq!(
        parse_gateway_duration("500ms"),
        Some(Duration::from_millis(500))
    );
    assert_eq!(parse_gateway_duration("0s"), Some(Duration::ZERO));
    for bad in ["", "10", "1.5s", "123456s", "1h1h1h1h1h", "1d", "s"] {
        assert_eq!(parse_gateway_duration(bad), None, "{bad}");
    }
    assert_eq!(
        parse_istio_duration("1.5s"),
        Some(Duration::from_millis(1500))
    );
    assert_eq!(
        parse_istio_duration("30ms"),
        Some(Duration::from_millis(30))
    );
    assert_eq!(
        parse_istio_duration("1h30m"),
        Some(Duration::from_secs(5400))
    );
    for bad in ["", "10", "fast", "1x"] {
        assert_eq!(parse_istio_duration(bad), None, "{bad}");
    }
}

const RULE: &str = r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: cart, namespace: shop}
spec:
  host: cart.shop.svc.cluster.local
  exportTo: [".", other]
  trafficPolicy:
    loadBalancer: {simple: LEAST_REQUEST, warmupDurationSecs: 30s}
    connectionPool:
      tcp: {maxConnections: 100, connectTimeout: 30ms, tcpKeepalive: {time: 7200s, interval: 75s, probes: 9}}
      http: {http1MaxPendingRequests: 10, http2MaxRequests: 1000, maxRequestsPerConnection: 1, maxRetries: 3, idleTimeout: 1h, h2UpgradePolicy: UPGRADE}
    outlierDetection: {consecutive5xxErrors: 7, consecutiveGatewayErrors: 5, interval: 5m, baseEjectionTime: 15m, maxEjectionPercent: 50}
    tls: {mode: ISTIO_MUTUAL, sni: cart.shop}
    portLevelSettings:
    - port: {number: 8080}
      loadBalancer: {consistentHash: {httpCookie: {name: user, ttl: 0s}}}
  subsets:
  - {name: v1, labels: {version: v1}}
  - name: v2
    labels: {version: v2}
    trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}
"#;

#[test]
fn destination_rules_are_typed_and_refused_by_field() {
    let objects = parse_ok(RULE);
    let Object::DestinationRule(rule) = &objects[0] else {
        panic!("{:?}", objects[0])
    };
    let spec = &rule.spec;
    assert_eq!(spec.host, "cart.shop.svc.cluster.local");
    assert_eq!(spec.export_to, [".", "other"]);
    let policy = spec.traffic_policy.as_ref().unwrap();
    assert_eq!(
        policy.load_balancer.as_ref().unwrap().simple.as_deref(),
        Some("LEAST_REQUEST")
    );
    let pool = policy.connection_pool.as_ref().unwrap();
    assert_eq!(pool.tcp.as_ref().unwrap().max_connections, Some(100));
    assert_eq!(
        pool.tcp
            .as_ref()
            .unwrap()
            .tcp_keepalive
            .as_ref()
            .unwrap()
            .probes,
        Some(9)
    );
    let http = pool.http.as_ref().unwrap();
    assert_eq!(
        (
            http.http1_max_pending_requests,
            http.http2_max_requests,
            http.max_requests_per_connection
        ),
        (Some(10), Some(1000), Some(1))
    );
    let outlier = policy.outlier_detection.as_ref().unwrap();
    assert_eq!(outlier.consecutive_5xx_errors, Some(7));
    assert_eq!(outlier.base_ejection_time.as_deref(), Some("15m"));
    assert_eq!(policy.tls.as_ref().unwrap().mode, "ISTIO_MUTUAL");
    let port = &policy.port_level_settings[0];
    assert_eq!(port.port.as_ref().unwrap().number, 8080);
    let hash = port
        .load_balancer
        .as_ref()
        .unwrap()
        .consistent_hash
        .as_ref()
        .unwrap();
    assert_eq!(hash.http_cookie.as_ref().unwrap().name, "user");
    assert_eq!(spec.subsets[1].labels["version"], "v2");
    assert!(spec.subsets[1].traffic_policy.is_some());

    let dr = |spec: &str| {
        refused(&format!(
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: d, namespace: shop}}\nspec: {spec}\n"
        ))
    };
    let prefix = "k.yaml doc 1: DestinationRule shop/d: ";
    let cases = [
        ("{subsets: [{name: v1}]}", "spec.host: required"),
        (
            "{host: \"cart svc\"}",
            "spec.host: \"cart svc\" is not a valid host name",
        ),
        (
            "{host: cart, trafficPolicy: {loadBalancer: {simple: FASTEST}}}",
            "spec.trafficPolicy.loadBalancer.simple: \"FASTEST\" is not UNSPECIFIED, RANDOM, PASSTHROUGH, ROUND_ROBIN, LEAST_REQUEST or LEAST_CONN",
        ),
        (
            "{host: cart, trafficPolicy: {connectionPool: {tcp: {connectTimeout: soon}}}}",
            "spec.trafficPolicy.connectionPool.tcp.connectTimeout: \"soon\" is not a duration (such as 30ms, 1.5s or 1h30m)",
        ),
        (
            "{host: cart, trafficPolicy: {outlierDetection: {maxEjectionPercent: 150}}}",
            "spec.trafficPolicy.outlierDetection.maxEjectionPercent: 150 is not 0-100",
        ),
        (
            "{host: cart, trafficPolicy: {tls: {mode: STRICT}}}",
            "spec.trafficPolicy.tls.mode: \"STRICT\" is not DISABLE, SIMPLE, MUTUAL or ISTIO_MUTUAL",
        ),
        (
            "{host: cart, trafficPolicy: {portLevelSettings: [{port: {number: 0}}]}}",
            "spec.trafficPolicy.portLevelSettings[0].port.number: 0 is not a port number (1-65535)",
        ),
        (
            "{host: cart, subsets: [{name: v1}, {name: v1}]}",
            "spec.subsets[1].name: \"v1\" is used by another subset",
        ),
        (
            "{host: cart, subsets: [{labels: {a: b}}]}",
            "spec.subsets[0].name: required",
        ),
        (
            "{host: cart, subsets: [{name: v1, trafficPolicy: {tls: {mode: BOGUS}}}]}",
            "spec.subsets[0].trafficPolicy.tls.mode: \"BOGUS\" is not DISABLE, SIMPLE, MUTUAL or ISTIO_MUTUAL",
        ),
        (
            "{host: cart, exportTo: [\"Other NS\"]}",
            "spec.exportTo[0]: \"Other NS\" is not '.', '*' or a namespace name",
        ),
    ];
    for (input, field) in cases {
        assert_eq!(dr(input), format!("{prefix}{field}"), "for {input}");
    }
}

#[test]
fn endpoint_slices_and_nodes_are_typed_and_refused_by_field() {
    let objects = parse_ok(
        r#"apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: db-abc12, namespace: shop, labels: {kubernetes.io/service-name: db}}
addressType: IPv4
endpoints:
- addresses: [10.244.1.5]
  conditions: {ready: true, serving: true, terminating: false}
  nodeName: node-1
  zone: zone-a
  targetRef: {kind: Pod, name: db-0, namespace: shop, uid: u1}
- addresses: [192.168.7.7]
ports: [{name: sql, port: 5432, protocol: TCP, appProtocol: postgresql}, {name: all}]
---
apiVersion: v1
kind: Node
metadata:
  name: node-1
  labels: {topology.kubernetes.io/region: eu, topology.kubernetes.io/zone: eu-a, topology.istio.io/subzone: rack-1}
status:
  addresses: [{type: InternalIP, address: 172.18.0.2}, {type: Hostname, address: node-1}]
"#,
    );
    let Object::EndpointSlice(slice) = &objects[0] else {
        panic!("{:?}", objects[0])
    };
    assert_eq!(objects[0].key().to_string(), "EndpointSlice shop/db-abc12");
    assert_eq!(slice.service_name(), Some("db"));
    assert_eq!(slice.address_type, "IPv4");
    let endpoint = &slice.endpoints[0];
    assert_eq!(endpoint.conditions.ready, Some(true));
    assert_eq!(endpoint.conditions.terminating, Some(false));
    assert_eq!(endpoint.node_name.as_deref(), Some("node-1"));
    assert_eq!(endpoint.zone.as_deref(), Some("zone-a"));
    assert_eq!(endpoint.target_ref.as_ref().unwrap().name, "db-0");
    assert_eq!(
        slice.endpoints[1].conditions.ready, None,
        "absent means ready"
    );
    assert_eq!(slice.ports[0].port, Some(5432));
    assert_eq!(slice.ports[0].app_protocol.as_deref(), Some("postgresql"));
    assert_eq!(slice.ports[1].port, None);
    let Object::Node(node) = &objects[1] else {
        panic!()
    };
    assert_eq!(objects[1].key().to_string(), "Node node-1");
    assert_eq!(node.metadata.labels["topology.istio.io/subzone"], "rack-1");
    assert_eq!(node.status.addresses[0].address, "172.18.0.2");

    let slice = |body: &str| {
        refused(&format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: s, namespace: shop}}\n{body}\n"
        ))
    };
    let prefix = "k.yaml doc 1: EndpointSlice shop/s: ";
    let cases = [
        ("endpoints: []", "addressType: required"),
        (
            "addressType: IPv5",
            "addressType: \"IPv5\" is not IPv4, IPv6 or FQDN",
        ),
        (
            "addressType: IPv4\nendpoints: [{addresses: [10.0.0.1]}, {addresses: [\"fd00::1\"]}]",
            "endpoints[1].addresses[0]: \"fd00::1\" is not an IPv4 address",
        ),
        (
            "addressType: IPv6\nendpoints: [{addresses: []}]",
            "endpoints[0].addresses: at least one address is required",
        ),
        (
            "addressType: IPv4\nports: [{name: a, port: 99999}]",
            "ports[0].port: 99999 is not a port number (1-65535)",
        ),
    ];
    for (input, field) in cases {
        assert_eq!(slice(input), format!("{prefix}{field}"), "for {input}");
    }
    assert_eq!(
        refused(
            "apiVersion: v1\nkind: Node\nmetadata: {name: n}\nstatus: {addresses: [{type: InternalIP, address: not-an-ip}]}\n"
        ),
        "k.yaml doc 1: Node n: status.addresses[0].address: \"not-an-ip\" is not an IP address"
    );
}

#[test]
fn every_new_kind_is_inserted_into_and_removed_from_a_cluster() {
    let text = format!(
        "{WAYPOINT}---\n{ROUTE}---\n{RULE}---\napiVersion: gateway.networking.k8s.io/v1\nkind: GatewayClass\nmetadata: {{name: istio-waypoint}}\nspec: {{controllerName: istio.io/mesh-controller}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: s, namespace: shop}}\naddressType: IPv4\n---\napiVersion: v1\nkind: Node\nmetadata: {{name: node-1}}\n"
    );
    let objects = parse_ok(&text);
    let keys: Vec<_> = objects.iter().map(Object::key).collect();
    let mut cluster = Cluster::from_objects(objects);
    assert_eq!(
        (
            cluster.gateways.len(),
            cluster.http_routes.len(),
            cluster.destination_rules.len(),
            cluster.gateway_classes.len(),
            cluster.endpoint_slices.len(),
            cluster.nodes.len()
        ),
        (1, 1, 1, 1, 1, 1)
    );
    for key in &keys {
        assert!(cluster.remove(key), "{key}");
        assert!(!cluster.remove(key), "{key} twice");
    }
    assert!(cluster.gateways.is_empty() && cluster.http_routes.is_empty());
    assert!(cluster.destination_rules.is_empty() && cluster.gateway_classes.is_empty());
    assert!(cluster.endpoint_slices.is_empty() && cluster.nodes.is_empty());
}

const GRPC_ROUTE: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: g, namespace: shop, creationTimestamp: "2026-01-02T03:04:05Z"}
spec:
  parentRefs: [{group: "", kind: Service, name: cart, port: 9090}]
  hostnames: [cart.shop.svc.cluster.local]
  rules:
  - matches:
    - method: {service: shop.v1.Cart, method: Add}
      headers: [{name: X-Tenant, value: a}]
    - method: {type: RegularExpression, service: "shop\\.v1\\..*"}
    filters:
    - {type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x-a, value: "1"}]}}
    - {type: ResponseHeaderModifier, responseHeaderModifier: {remove: [x-b]}}
    - {type: RequestMirror, requestMirror: {backendRef: {name: shadow, port: 9090}, percent: 10}}
    backendRefs:
    - {name: cart-v1, port: 9090, weight: 90}
    - name: cart-v2
      port: 9090
      weight: 10
      filters: [{type: RequestHeaderModifier, requestHeaderModifier: {add: [{name: x-v, value: "2"}]}}]
  - backendRefs: [{name: cart-v1, port: 9090}]
"#;

#[test]
fn grpc_routes_are_typed_and_written_back_with_their_kind() {
    let objects = parse_ok(GRPC_ROUTE);
    assert_eq!(objects[0].key().to_string(), "GRPCRoute shop/g");
    let Object::GrpcRoute(route) = &objects[0] else {
        panic!("not a GRPCRoute: {:?}", objects[0]);
    };
    assert_eq!(
        route.metadata.creation_timestamp.as_deref(),
        Some("2026-01-02T03:04:05Z")
    );
    assert!(route.spec.parent_refs[0].is_service());
    assert_eq!(route.spec.parent_refs[0].port, Some(9090));
    let rule = &route.spec.rules[0];
    let exact = rule.matches[0].method.as_ref().unwrap();
    assert_eq!(exact.kind, MatchType::Exact, "default type");
    assert_eq!(
        (exact.service.as_deref(), exact.method.as_deref()),
        (Some("shop.v1.Cart"), Some("Add"))
    );
    assert_eq!(rule.matches[0].headers[0].name, "X-Tenant");
    let regex = rule.matches[1].method.as_ref().unwrap();
    assert_eq!(regex.kind, MatchType::RegularExpression);
    assert_eq!(regex.method, None, "any method");
    assert_eq!(
        rule.filters.iter().map(|f| f.kind).collect::<Vec<_>>(),
        [
            FilterType::RequestHeaderModifier,
            FilterType::ResponseHeaderModifier,
            FilterType::RequestMirror
        ]
    );
    assert_eq!(
        rule.backend_refs
            .iter()
            .map(|b| (b.backend.name.as_str(), b.weight()))
            .collect::<Vec<_>>(),
        [("cart-v1", 90), ("cart-v2", 10)]
    );
    assert_eq!(rule.backend_refs[1].filters.len(), 1);
    assert_eq!(route.spec.rules[1].backend_refs[0].weight(), 1);

    let value = objects[0].to_value();
    assert_eq!(value["apiVersion"], "gateway.networking.k8s.io/v1");
    assert_eq!(value["kind"], "GRPCRoute");
    assert_eq!(
        value["metadata"]["creationTimestamp"],
        "2026-01-02T03:04:05Z"
    );
    let (again, errors) = parse_object(value, "Kubernetes");
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(again, objects, "to_value round-trips");

    let mut cluster = Cluster::from_objects(objects.clone());
    assert_eq!(cluster.grpc_routes.len(), 1);
    assert!(cluster.remove(&objects[0].key()));
    assert!(cluster.grpc_routes.is_empty());
}

#[test]
fn grpc_routes_are_refused_by_field() {
    let rule = |rule: &str| {
        refused(&format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {{name: g, namespace: shop}}\nspec:\n  parentRefs: [{{group: \"\", kind: Service, name: cart}}]\n  rules:\n  - {rule}\n"
        ))
    };
    let prefix = "k.yaml doc 1: GRPCRoute shop/g: ";
    let cases = [
        (
            "{matches: [{method: {type: Exact}}]}",
            "spec.rules[0].matches[0].method.service: service or method is required (a match of any method leaves method out)",
        ),
        (
            "{matches: [{method: {service: shop/Cart}}]}",
            "spec.rules[0].matches[0].method.service: \"shop/Cart\" is not a gRPC service name (such as pkg.Service)",
        ),
        (
            "{matches: [{method: {method: Add.Item}}]}",
            "spec.rules[0].matches[0].method.method: \"Add.Item\" is not a gRPC method name",
        ),
        (
            "{matches: [{method: {type: RegularExpression, method: \"Add(\"}}]}",
            "spec.rules[0].matches[0].method.method: \"Add(\" is not a regular expression (RE2 syntax): ",
        ),
        (
            "{matches: [{method: {type: PathPrefix, method: Add}}]}",
            "spec.rules[0].matches[0].method.type: must be Exact or RegularExpression",
        ),
        (
            "{matches: [{headers: [{type: RegularExpression, name: x, value: \"[\"}]}]}",
            "spec.rules[0].matches[0].headers[0].value: \"[\" is not a regular expression (RE2 syntax): ",
        ),
        (
            "{filters: [{type: URLRewrite, urlRewrite: {hostname: a}}]}",
            "spec.rules[0].filters[0].type: must be RequestHeaderModifier, ResponseHeaderModifier, RequestMirror or ExtensionRef",
        ),
        (
            "{backendRefs: [{name: a, port: 1, filters: [{type: RequestRedirect, requestRedirect: {}}]}]}",
            "spec.rules[0].backendRefs[0].filters[0].type: must be RequestHeaderModifier, ResponseHeaderModifier, RequestMirror or ExtensionRef",
        ),
        (
            "{backendRefs: [{name: a}]}",
            "spec.rules[0].backendRefs[0].port: required for a Service backend",
        ),
    ];
    for (input, expected) in cases {
        let message = rule(input);
        assert!(
            message.starts_with(&format!("{prefix}{expected}")),
            "for {input}: {message}"
        );
    }
    assert_eq!(
        refused(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {name: g, namespace: shop, creationTimestamp: yesterday}\n"
        ),
        format!("{prefix}metadata.creationTimestamp: \"yesterday\" is not an RFC 3339 time")
    );
}

#[test]
fn http_route_regular_expressions_must_compile() {
    let (objects, errors) = parse_documents(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r, namespace: shop}\nspec:\n  rules:\n  - matches: [{path: {type: RegularExpression, value: \"/a(\"}}]\n",
        "k.yaml",
    );
    assert!(objects.is_empty());
    assert!(
        errors[0].to_string().starts_with(
            "k.yaml doc 1: HTTPRoute shop/r: spec.rules[0].matches[0].path.value: \"/a(\" is not a regular expression (RE2 syntax): "
        ),
        "{errors:?}"
    );
    parse_ok(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r, namespace: shop}\nspec:\n  rules:\n  - matches: [{path: {type: RegularExpression, value: \"/v[0-9]+/.*\"}, queryParams: [{type: RegularExpression, name: q, value: \"a|b\"}]}]\n",
    );
}
