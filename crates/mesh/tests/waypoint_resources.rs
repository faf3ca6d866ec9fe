//! Objects in, waypoint resources out: HTTPRoutes and GRPCRoutes with Service parents become
//! `ambit.waypoint.v1.Route`s, waypoint AuthorizationPolicies become `Policy`s, each usable
//! waypoint gets exactly the names it is served, and one bad object never stops the others.

use ambit_mesh::translate::{Cluster, MeshSettings, Resources, translate};
use ambit_mesh::{WarningKind, parse_documents};
use ambit_proto::security as sec;
use ambit_proto::waypoint as wp;

/// Two namespaces, each bound to its own waypoint; `shop` has the services routes point at.
const BASE: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: wp}}
---
apiVersion: v1
kind: Namespace
metadata: {name: pay, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: pay-wp}}
---
apiVersion: v1
kind: Namespace
metadata: {name: plain, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: wp, namespace: shop}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE, allowedRoutes: {namespaces: {from: All}}}]}
status: {addresses: [{type: Hostname, value: wp.shop.svc.cluster.local}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: pay-wp, namespace: pay}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
status: {addresses: [{type: Hostname, value: pay-wp.pay.svc.cluster.local}]}
---
apiVersion: v1
kind: Service
metadata: {name: cart, namespace: shop}
spec: {clusterIP: 10.96.1.1, ports: [{name: http, port: 80}, {name: grpc, port: 9090}]}
---
apiVersion: v1
kind: Service
metadata: {name: cart-v2, namespace: shop}
spec: {clusterIP: 10.96.1.2, ports: [{name: http, port: 80}, {name: grpc, port: 9090}]}
---
apiVersion: v1
kind: Service
metadata: {name: shadow, namespace: shop}
spec: {clusterIP: 10.96.1.3, ports: [{name: http, port: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: pay, namespace: pay}
spec: {clusterIP: 10.96.2.1, ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: lonely, namespace: plain}
spec: {clusterIP: 10.96.3.1, ports: [{name: http, port: 80}]}
"#;

const CART: &str = "shop/cart.shop.svc.cluster.local";
const CART_V2: &str = "shop/cart-v2.shop.svc.cluster.local";

fn run(extra: &str) -> Resources {
    let (objects, errors) = parse_documents(&format!("{BASE}---\n{extra}"), "test.yaml");
    assert!(errors.is_empty(), "{errors:?}");
    translate(&Cluster::from_objects(objects), &MeshSettings::default())
}

fn warned(r: &Resources, text: &str) -> bool {
    r.warnings.iter().any(|w| w.to_string() == text)
}

fn names(set: &std::collections::BTreeSet<String>) -> Vec<&str> {
    set.iter().map(String::as_str).collect()
}

const HTTP_ROUTE: &str = r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: cart, namespace: shop, creationTimestamp: "2026-03-01T10:00:00Z"}
spec:
  parentRefs:
  - {group: "", kind: Service, name: cart, port: 80}
  - {name: some-ingress}
  hostnames: [cart.example.com]
  rules:
  - name: exact-and-headers
    matches:
    - path: {type: Exact, value: /checkout}
      headers: [{name: X-User, value: alice}, {type: RegularExpression, name: X-Trace, value: "[0-9a-f]+"}]
      queryParams: [{name: Debug, value: "1"}]
      method: POST
    - path: {type: PathPrefix, value: /api}
    - path: {type: RegularExpression, value: "/v[0-9]+/.*"}
    - headers: [{name: x-only, value: y}]
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier: {set: [{name: X-Set, value: a}], add: [{name: X-Add, value: b}], remove: [X-Gone]}
    - type: ResponseHeaderModifier
      responseHeaderModifier: {set: [{name: X-Resp, value: c}]}
    - type: RequestMirror
      requestMirror: {backendRef: {name: shadow, port: 8080}, percent: 25}
    backendRefs:
    - {name: cart, port: 80, weight: 90}
    - name: cart-v2
      port: 80
      weight: 10
      filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: X-Version, value: "2"}]}}]
    timeouts: {request: 10s, backendRequest: 1500ms}
  - name: redirect-and-rewrite
    matches: [{path: {type: PathPrefix, value: /old}}]
    filters:
    - type: RequestRedirect
      requestRedirect: {scheme: https, hostname: new.example.com, port: 8443, statusCode: 301, path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}}
    - type: URLRewrite
      urlRewrite: {hostname: rewritten, path: {type: ReplaceFullPath, replaceFullPath: /full}}
  - name: invalid-backends
    backendRefs:
    - {name: missing, port: 80}
    - {name: cart, port: 81}
    - {group: networking.istio.io, kind: Hostname, name: example.com, port: 80}
    - {name: pay, namespace: pay, port: 80}
    - {name: cart, port: 80, weight: 0}
  - name: extension
    filters: [{type: ExtensionRef, extensionRef: {group: example.com, kind: Plugin, name: p}}]
    backendRefs: [{name: cart, port: 80}]
"#;

#[test]
fn an_http_route_keeps_every_match_filter_and_weight_and_marks_invalid_backends() {
    let r = run(HTTP_ROUTE);
    let route = &r.routes["HTTPRoute/shop/cart"];
    assert_eq!(route.kind(), wp::RouteKind::Http);
    assert_eq!(
        route.parents,
        [wp::ParentRef {
            service: CART.into(),
            port: 80
        }],
        "only the Service parent; the Gateway parent is not a waypoint's"
    );
    assert_eq!(route.hostnames, ["cart.example.com"]);
    assert_eq!(route.creation_timestamp, 1_772_359_200);
    assert_eq!(route.rules.len(), 4);

    let rule = &route.rules[0];
    assert_eq!(rule.name, "exact-and-headers");
    let first = &rule.matches[0];
    let path = first.path.as_ref().unwrap();
    assert_eq!(
        (path.r#type(), path.value.as_str()),
        (wp::MatchType::Exact, "/checkout")
    );
    assert_eq!(
        first
            .headers
            .iter()
            .map(|h| (h.name.as_str(), h.r#type(), h.value.as_str()))
            .collect::<Vec<_>>(),
        [
            ("x-user", wp::MatchType::Exact, "alice"),
            ("x-trace", wp::MatchType::Regex, "[0-9a-f]+")
        ],
        "header names lower-cased"
    );
    assert_eq!(
        first.query_params[0].name, "Debug",
        "query names stay exact"
    );
    assert_eq!(first.method, "POST");
    assert_eq!(
        rule.matches[1].path.as_ref().unwrap().r#type(),
        wp::MatchType::Prefix
    );
    assert_eq!(
        rule.matches[2].path.as_ref().unwrap().r#type(),
        wp::MatchType::Regex
    );
    assert!(rule.matches[3].path.is_none(), "absent path left unset");

    use wp::filter::Kind;
    let Some(Kind::RequestHeaderModifier(set)) = &rule.filters[0].kind else {
        panic!("{:?}", rule.filters[0]);
    };
    assert_eq!(
        (
            set.set[0].name.as_str(),
            set.add[0].name.as_str(),
            set.remove[0].as_str()
        ),
        ("x-set", "x-add", "x-gone")
    );
    assert!(
        matches!(&rule.filters[1].kind, Some(Kind::ResponseHeaderModifier(m)) if m.set[0].value == "c")
    );
    let Some(Kind::RequestMirror(mirror)) = &rule.filters[2].kind else {
        panic!("{:?}", rule.filters[2]);
    };
    let shadow = mirror.backend.as_ref().unwrap();
    assert_eq!(
        (
            shadow.service.as_str(),
            shadow.port,
            mirror.numerator,
            mirror.denominator
        ),
        ("shop/shadow.shop.svc.cluster.local", 8080, 25, 100)
    );
    assert_eq!(
        rule.backends
            .iter()
            .map(|b| (b.service.as_str(), b.port, b.weight, b.filters.len()))
            .collect::<Vec<_>>(),
        [(CART, 80, 90, 0), (CART_V2, 80, 10, 1)]
    );
    let timeouts = rule.timeouts.as_ref().unwrap();
    assert_eq!(
        timeouts.request.as_ref().map(|d| (d.seconds, d.nanos)),
        Some((10, 0))
    );
    assert_eq!(
        timeouts
            .backend_request
            .as_ref()
            .map(|d| (d.seconds, d.nanos)),
        Some((1, 500_000_000))
    );

    let redirect_rule = &route.rules[1];
    let Some(Kind::RequestRedirect(redirect)) = &redirect_rule.filters[0].kind else {
        panic!("{:?}", redirect_rule.filters);
    };
    assert_eq!(
        (
            redirect.scheme.as_str(),
            redirect.hostname.as_str(),
            redirect.port,
            redirect.status_code
        ),
        ("https", "new.example.com", 8443, 301)
    );
    let path = redirect.path.as_ref().unwrap();
    assert_eq!(
        (path.r#type(), path.value.as_str()),
        (wp::PathModifierType::PrefixMatch, "/new")
    );
    let Some(Kind::UrlRewrite(rewrite)) = &redirect_rule.filters[1].kind else {
        panic!("{:?}", redirect_rule.filters);
    };
    assert_eq!(rewrite.hostname, "rewritten");
    assert_eq!(
        rewrite.path.as_ref().unwrap().r#type(),
        wp::PathModifierType::Full
    );
    assert!(
        redirect_rule.backends.is_empty(),
        "no backendRefs: nothing to forward to"
    );

    let invalid: Vec<(&str, &str, u32)> = route.rules[2]
        .backends
        .iter()
        .map(|b| (b.service.as_str(), b.invalid.as_str(), b.weight))
        .collect();
    assert_eq!(
        invalid,
        [
            ("", "Service shop/missing does not exist", 1),
            ("", "Service shop/cart has no port 81", 1),
            (
                "",
                "backend kind networking.istio.io/Hostname is not supported (only core Services)",
                1
            ),
            (
                "",
                "Service pay/pay is in another namespace, which needs a ReferenceGrant (not read by Ambit)",
                1
            ),
            (CART, "", 0),
        ]
    );
    assert!(
        warned(
            &r,
            "HTTPRoute shop/cart: spec.rules[2].backendRefs[0]: Service shop/missing does not exist; requests routed to it get 500"
        ),
        "{:#?}",
        r.warnings
    );

    let extension = &route.rules[3];
    assert_eq!(extension.backends.len(), 1);
    assert_eq!(
        extension.backends[0].invalid,
        "spec.rules[3].filters[0]: ExtensionRef filters are not supported",
        "a filter that cannot run is never skipped: the rule answers 500"
    );

    assert_eq!(
        names(&r.waypoint_scopes["shop/wp"].routes),
        ["HTTPRoute/shop/cart"]
    );
    assert!(r.waypoint_scopes["pay/pay-wp"].routes.is_empty());
}

#[test]
fn rules_without_matches_keep_them_empty_and_parents_without_port_take_every_port() {
    let r = run(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: all, namespace: shop}\nspec:\n  parentRefs: [{group: \"\", kind: Service, name: cart}]\n  rules: [{backendRefs: [{name: cart, port: 80}]}]\n",
    );
    let route = &r.routes["HTTPRoute/shop/all"];
    assert_eq!(route.parents[0].port, 0);
    assert!(route.rules[0].matches.is_empty());
    assert_eq!(route.creation_timestamp, 0, "no creationTimestamp");
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
}

#[test]
fn parents_are_refused_by_field_and_a_route_without_one_is_not_served() {
    let r = run(r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: consumer, namespace: plain}
spec:
  parentRefs: [{group: "", kind: Service, name: cart, namespace: shop}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: from-waypoint-ns, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: cart, namespace: shop}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: wrong-port, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: cart, port: 443}, {group: "", kind: Service, name: nothing}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: no-waypoint, namespace: plain}
spec:
  parentRefs: [{group: "", kind: Service, name: lonely}]
"#);
    assert!(!r.routes.contains_key("HTTPRoute/plain/consumer"));
    assert!(
        warned(
            &r,
            "HTTPRoute plain/consumer: spec.parentRefs[0].namespace: Service shop/cart is in another namespace and the route is not in its waypoint's namespace (ambient has no consumer routes); the parent is ignored"
        ),
        "{:#?}",
        r.warnings
    );
    assert!(warned(
        &r,
        "HTTPRoute plain/consumer: spec.parentRefs: no Service parent can take the route; it is not served"
    ));
    assert!(r.routes.contains_key("HTTPRoute/shop/from-waypoint-ns"));
    assert!(!r.routes.contains_key("HTTPRoute/shop/wrong-port"));
    assert!(warned(
        &r,
        "HTTPRoute shop/wrong-port: spec.parentRefs[0].port: Service shop/cart has no port 443; the parent is ignored"
    ));
    assert!(warned(
        &r,
        "HTTPRoute shop/wrong-port: spec.parentRefs[1]: Service shop/nothing does not exist; the parent is ignored"
    ));
    // Still translated (a waypoint may be bound later), but served to no waypoint.
    assert!(r.routes.contains_key("HTTPRoute/plain/no-waypoint"));
    assert!(warned(
        &r,
        "HTTPRoute plain/no-waypoint: spec.parentRefs[0]: Service plain/lonely has no waypoint: the route has no effect on it"
    ));
    assert!(
        r.waypoint_scopes
            .values()
            .all(|s| !s.routes.contains("HTTPRoute/plain/no-waypoint"))
    );
}

#[test]
fn a_route_in_the_waypoints_namespace_may_attach_to_a_service_elsewhere() {
    // `plain/lonely` opts into the shop waypoint; a route in `shop` may then attach to it.
    let r = run(r#"apiVersion: v1
kind: Service
metadata: {name: bound, namespace: plain, labels: {istio.io/use-waypoint: wp, istio.io/use-waypoint-namespace: shop}}
spec: {clusterIP: 10.96.3.2, ports: [{port: 80}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: producer-elsewhere, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: bound, namespace: plain}]
"#);
    assert_eq!(
        r.routes["HTTPRoute/shop/producer-elsewhere"].parents[0].service,
        "plain/bound.plain.svc.cluster.local"
    );
    assert_eq!(
        names(&r.waypoint_scopes["shop/wp"].routes),
        ["HTTPRoute/shop/producer-elsewhere"]
    );
}

#[test]
fn grpc_routes_carry_method_matches_filters_and_weighted_backends() {
    let r = run(r#"apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: cart, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: cart, port: 9090}]
  rules:
  - matches:
    - method: {service: shop.v1.Cart, method: Add}
      headers: [{name: X-Tenant, value: a}]
    - method: {type: RegularExpression, service: "shop\\.v1\\..*"}
    filters:
    - {type: RequestMirror, requestMirror: {backendRef: {name: cart-v2, port: 9090}, fraction: {numerator: 1, denominator: 3}}}
    backendRefs:
    - {name: cart, port: 9090, weight: 3}
    - {name: cart-v2, port: 9090, weight: 1}
  - backendRefs: [{name: cart, port: 9091}]
"#);
    let route = &r.routes["GRPCRoute/shop/cart"];
    assert_eq!(route.kind(), wp::RouteKind::Grpc);
    let rule = &route.rules[0];
    let exact = rule.matches[0].grpc.as_ref().unwrap();
    assert_eq!(
        (
            exact.r#type(),
            exact.service.as_str(),
            exact.method.as_str()
        ),
        (wp::MatchType::Exact, "shop.v1.Cart", "Add")
    );
    assert_eq!(rule.matches[0].headers[0].name, "x-tenant");
    assert!(rule.matches[0].path.is_none() && rule.matches[0].method.is_empty());
    let regex = rule.matches[1].grpc.as_ref().unwrap();
    assert_eq!(
        (regex.r#type(), regex.method.as_str()),
        (wp::MatchType::Regex, ""),
        "empty method: any"
    );
    let Some(wp::filter::Kind::RequestMirror(mirror)) = &rule.filters[0].kind else {
        panic!("{:?}", rule.filters);
    };
    assert_eq!((mirror.numerator, mirror.denominator), (1, 3));
    assert_eq!(
        rule.backends
            .iter()
            .map(|b| (b.service.as_str(), b.weight))
            .collect::<Vec<_>>(),
        [(CART, 3), (CART_V2, 1)]
    );
    assert_eq!(
        route.rules[1].backends[0].invalid,
        "Service shop/cart has no port 9091"
    );
    assert_eq!(
        names(&r.waypoint_scopes["shop/wp"].routes),
        ["GRPCRoute/shop/cart"]
    );
}

#[test]
fn a_bad_regular_expression_refuses_only_its_route() {
    let (objects, errors) = parse_documents(
        &format!(
            "{BASE}---\n{HTTP_ROUTE}---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: bad, namespace: shop}}\nspec:\n  parentRefs: [{{group: \"\", kind: Service, name: cart}}]\n  rules: [{{matches: [{{headers: [{{type: RegularExpression, name: x, value: ok}}]}}]}}]\n"
        ),
        "test.yaml",
    );
    assert!(errors.is_empty(), "{errors:?}");
    let mut cluster = Cluster::from_objects(objects);
    // Objects put into a Cluster without validation are checked again by the translation.
    let bad = cluster
        .http_routes
        .get_mut(&("shop".to_string(), "bad".to_string()))
        .unwrap();
    bad.spec.rules[0].matches[0].headers[0].value = "(unclosed".into();
    let r = translate(&cluster, &MeshSettings::default());
    assert!(!r.routes.contains_key("HTTPRoute/shop/bad"));
    assert!(
        r.warnings.iter().any(|w| {
            let text = w.to_string();
            w.kind == WarningKind::RouteNotServed
                && text.starts_with(
                    "HTTPRoute shop/bad: spec.rules[0].matches[0].headers[0].value: \"(unclosed\" is not a regular expression (RE2 syntax)",
                )
                && text.ends_with("; the route is not served")
        }),
        "{:#?}",
        r.warnings
    );
    assert!(
        r.routes.contains_key("HTTPRoute/shop/cart"),
        "the others still translate"
    );
}

const POLICIES: &str = r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: gateway-rules, namespace: shop, annotations: {istio.io/dry-run: "true"}}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: wp}]
  action: DENY
  rules:
  - from:
    - source:
        principals: [spiffe://cluster.local/ns/shop/sa/client, "*/sa/admin", "cluster.local/*"]
        notPrincipals: ["*"]
        namespaces: [shop]
        notNamespaces: [kube-system]
        ipBlocks: [10.0.0.0/8]
        remoteIpBlocks: [192.168.1.1]
        notIpBlocks: ["fd00::/8"]
    to:
    - operation:
        hosts: ["*.example.com"]
        notHosts: [admin.example.com]
        ports: ["80", "8080"]
        notPorts: ["9000"]
        methods: [GET, HEAD]
        notMethods: [DELETE]
        paths: [/api/*, /exact]
        notPaths: [/api/private*]
    when:
    - {key: "request.headers[X-Tenant]", values: [a, b]}
    - {key: source.ip, notValues: [10.1.0.0/16]}
    - {key: source.namespace, values: [shop]}
    - {key: source.principal, values: [spiffe://cluster.local/ns/shop/sa/client]}
    - {key: destination.port, values: ["80"]}
    - {key: request.method, values: [GET]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: service-rules, namespace: shop}
spec:
  targetRefs: [{group: "", kind: Service, name: cart}]
  action: AUDIT
  rules: [{}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: class-wide, namespace: istio-system}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: GatewayClass, name: istio-waypoint}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: selected, namespace: pay}
spec:
  selector: {matchLabels: {gateway.networking.k8s.io/gateway-name: pay-wp}}
  rules: [{to: [{operation: {methods: [POST]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: pods-only, namespace: pay}
spec:
  selector: {matchLabels: {app: pay}}
  rules: [{to: [{operation: {ports: ["80"]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: bad-key, namespace: shop}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: wp}]
  rules: [{when: [{key: source.ip, values: [10.0.0.1]}, {key: "request.auth.claims[iss]", values: [x]}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: custom, namespace: shop}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: wp}]
  action: CUSTOM
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: jwt, namespace: shop}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: wp}]
  rules: [{from: [{source: {requestPrincipals: ["*"]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: odd-targets, namespace: shop}
spec:
  targetRefs:
  - {group: networking.istio.io, kind: ServiceEntry, name: external}
  - {group: gateway.networking.k8s.io, kind: GatewayClass, name: istio-waypoint}
  - {group: "", kind: Service, name: cart-v2}
"#;

fn exact(v: &str) -> sec::StringMatch {
    sec::StringMatch {
        match_type: Some(sec::string_match::MatchType::Exact(v.into())),
    }
}

fn prefix(v: &str) -> sec::StringMatch {
    sec::StringMatch {
        match_type: Some(sec::string_match::MatchType::Prefix(v.into())),
    }
}

fn suffix(v: &str) -> sec::StringMatch {
    sec::StringMatch {
        match_type: Some(sec::string_match::MatchType::Suffix(v.into())),
    }
}

fn presence() -> sec::StringMatch {
    sec::StringMatch {
        match_type: Some(sec::string_match::MatchType::Presence(())),
    }
}

#[test]
fn policies_translate_istio_forms_and_resolve_their_targets() {
    let r = run(POLICIES);
    let p = &r.l7_policies["shop/gateway-rules"];
    assert_eq!(p.action(), wp::Action::Deny);
    assert!(p.dry_run);
    use wp::policy_target::Kind;
    assert_eq!(
        p.targets,
        [wp::PolicyTarget {
            kind: Some(Kind::Gateway("shop/wp".into()))
        }]
    );
    let rule = &p.rules[0];
    let from = &rule.from[0];
    assert_eq!(
        from.principals,
        [
            exact("cluster.local/ns/shop/sa/client"),
            suffix("/sa/admin"),
            prefix("cluster.local/")
        ]
    );
    assert_eq!(from.not_principals, [presence()]);
    assert_eq!(from.namespaces, [exact("shop")]);
    assert_eq!(from.not_namespaces, [exact("kube-system")]);
    assert_eq!(
        from.ip_blocks,
        [
            sec::Address {
                address: vec![10, 0, 0, 0],
                length: 8
            },
            sec::Address {
                address: vec![192, 168, 1, 1],
                length: 32
            }
        ]
    );
    assert_eq!(from.not_ip_blocks[0].length, 8);
    assert_eq!(from.not_ip_blocks[0].address.len(), 16);
    let to = &rule.to[0];
    assert_eq!(to.hosts, [suffix(".example.com")]);
    assert_eq!(to.not_hosts, [exact("admin.example.com")]);
    assert_eq!(
        (to.ports.as_slice(), to.not_ports.as_slice()),
        (&[80, 8080][..], &[9000][..])
    );
    assert_eq!(to.methods, [exact("GET"), exact("HEAD")]);
    assert_eq!(to.not_methods, [exact("DELETE")]);
    assert_eq!(to.paths, [prefix("/api/"), exact("/exact")]);
    assert_eq!(to.not_paths, [prefix("/api/private")]);
    let when: Vec<(&str, usize, usize)> = rule
        .when
        .iter()
        .map(|c| (c.key.as_str(), c.values.len(), c.not_values.len()))
        .collect();
    assert_eq!(
        when,
        [
            ("request.headers[x-tenant]", 2, 0),
            ("source.ip", 0, 1),
            ("source.namespace", 1, 0),
            ("source.principal", 1, 0),
            ("destination.port", 1, 0),
            ("request.method", 1, 0),
        ]
    );
    assert_eq!(
        rule.when[3].values,
        [exact("cluster.local/ns/shop/sa/client")]
    );

    let audit = &r.l7_policies["shop/service-rules"];
    assert_eq!(audit.action(), wp::Action::Audit);
    assert_eq!(
        audit.rules,
        [wp::PolicyRule::default()],
        "rules: [{{}}] matches everything"
    );
    assert_eq!(
        audit.targets,
        [wp::PolicyTarget {
            kind: Some(Kind::Service(CART.into()))
        }]
    );
    let class = &r.l7_policies["istio-system/class-wide"];
    assert_eq!(
        class.targets,
        [wp::PolicyTarget {
            kind: Some(Kind::GatewayClass("istio-waypoint".into()))
        }]
    );
    assert!(class.rules.is_empty(), "no rules: ALLOW matches nothing");
    assert_eq!(
        r.l7_policies["pay/selected"].targets,
        [wp::PolicyTarget {
            kind: Some(Kind::Gateway("pay/pay-wp".into()))
        }],
        "a selector matching the waypoint's pods targets its Gateway"
    );
    assert!(
        !r.l7_policies.contains_key("pay/pods-only"),
        "a selector of application pods is ztunnel's"
    );
    assert!(r.authorizations.contains_key("pay/pods-only"));

    for (name, field) in [
        (
            "shop/bad-key",
            "AuthorizationPolicy shop/bad-key: spec.rules[0].when[1].key: \"request.auth.claims[iss]\" is not a key waypoints evaluate (request.headers[<name>], source.ip, source.namespace, source.principal, destination.port, request.method); the policy is not served to waypoints",
        ),
        (
            "shop/custom",
            "AuthorizationPolicy shop/custom: spec.action: CUSTOM (external authorization) is not supported; the policy is not served to waypoints",
        ),
        (
            "shop/jwt",
            "AuthorizationPolicy shop/jwt: spec.rules[0].from[0].source.requestPrincipals: JWT request principals are not supported (no RequestAuthentication); the policy is not served to waypoints",
        ),
    ] {
        assert!(!r.l7_policies.contains_key(name), "{name} refused");
        assert!(warned(&r, field), "{field}\n{:#?}", r.warnings);
    }
    let odd = &r.l7_policies["shop/odd-targets"];
    assert_eq!(
        odd.targets,
        [wp::PolicyTarget {
            kind: Some(Kind::Service(CART_V2.into()))
        }]
    );
    assert!(warned(
        &r,
        "AuthorizationPolicy shop/odd-targets: spec.targetRefs[0].kind: networking.istio.io/ServiceEntry is not a target waypoints enforce (gateway.networking.k8s.io/Gateway, /Service or gateway.networking.k8s.io/GatewayClass); the target is ignored"
    ));
    assert!(warned(
        &r,
        "AuthorizationPolicy shop/odd-targets: spec.targetRefs[1]: a GatewayClass can be targeted only from the root namespace istio-system; the target is ignored"
    ));
}

#[test]
fn each_waypoint_is_served_its_own_routes_and_the_policies_that_reach_it() {
    let r = run(&format!(
        "{HTTP_ROUTE}---\n{POLICIES}---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: pay, namespace: pay}}\nspec:\n  parentRefs: [{{group: \"\", kind: Service, name: pay}}]\n"
    ));
    let shop = &r.waypoint_scopes["shop/wp"];
    assert_eq!(names(&shop.routes), ["HTTPRoute/shop/cart"]);
    assert_eq!(
        names(&shop.policies),
        [
            "istio-system/class-wide",
            "shop/gateway-rules",
            "shop/odd-targets",
            "shop/service-rules"
        ]
    );
    let pay = &r.waypoint_scopes["pay/pay-wp"];
    assert_eq!(names(&pay.routes), ["HTTPRoute/pay/pay"]);
    assert_eq!(
        names(&pay.policies),
        ["istio-system/class-wide", "pay/selected"]
    );
    assert_eq!(
        r.waypoint_scopes.len(),
        2,
        "only usable waypoints have a scope"
    );
}

#[test]
fn a_policy_that_reaches_no_usable_waypoint_is_kept_and_warned_about() {
    let r = run(r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: nowhere, namespace: plain}
spec:
  targetRefs: [{group: "", kind: Service, name: lonely}]
"#);
    assert!(r.l7_policies.contains_key("plain/nowhere"));
    assert!(
        warned(
            &r,
            "AuthorizationPolicy plain/nowhere: spec.targetRefs: no target has a usable waypoint; the policy is not enforced"
        ),
        "{:#?}",
        r.warnings
    );
    assert!(r.waypoint_scopes.values().all(|s| s.policies.is_empty()));
}
