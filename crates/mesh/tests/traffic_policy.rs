//! Traffic policy for waypoints: VirtualServices become Routes of kind VIRTUAL_SERVICE (every
//! field, and every refusal naming the object and field), DestinationRules become
//! DestinationPolicies with subsets resolved to the host Service's workloads, HTTPRoute `retry` and
//! `timeouts` reach the Route, and each waypoint is served exactly its own. Istio's canary example
//! from issue 13 translates exactly.

use ambit_mesh::parse_documents;
use ambit_mesh::translate::{Cluster, MeshSettings, Resources, translate};
use ambit_proto::waypoint as wp;

/// `shop` is bound to the waypoint `wp`; `plain` has no waypoint. product-service has v1 and v2
/// pods; cart has two ports.
const BASE: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: wp}}
---
apiVersion: v1
kind: Namespace
metadata: {name: plain, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: wp, namespace: shop}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
status: {addresses: [{type: Hostname, value: wp.shop.svc.cluster.local}]}
---
apiVersion: v1
kind: Service
metadata: {name: product-service, namespace: shop}
spec: {clusterIP: 10.96.1.1, selector: {app: product}, ports: [{name: http, port: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: cart, namespace: shop}
spec: {clusterIP: 10.96.1.2, selector: {app: cart}, ports: [{name: http, port: 80}, {name: tcp-db, port: 5432}]}
---
apiVersion: v1
kind: Service
metadata: {name: shadow, namespace: shop}
spec: {clusterIP: 10.96.1.3, ports: [{name: http, port: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: lonely, namespace: plain}
spec: {clusterIP: 10.96.3.1, ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Pod
metadata: {name: product-v1, namespace: shop, labels: {app: product, version: v1}}
status: {podIP: 10.0.0.11}
---
apiVersion: v1
kind: Pod
metadata: {name: product-v2, namespace: shop, labels: {app: product, version: v2}}
status: {podIP: 10.0.0.12}
---
apiVersion: v1
kind: Pod
metadata: {name: other, namespace: shop, labels: {app: other, version: v1}}
status: {podIP: 10.0.0.13}
"#;

const PRODUCT: &str = "shop/product-service.shop.svc.cluster.local";
const CART: &str = "shop/cart.shop.svc.cluster.local";
const SHADOW: &str = "shop/shadow.shop.svc.cluster.local";
const V1: &str = "Kubernetes//Pod/shop/product-v1";
const V2: &str = "Kubernetes//Pod/shop/product-v2";

fn run(extra: &str) -> Resources {
    let (objects, errors) = parse_documents(&format!("{BASE}---\n{extra}"), "test.yaml");
    assert!(errors.is_empty(), "{errors:?}");
    translate(&Cluster::from_objects(objects), &MeshSettings::default())
}

fn refused(text: &str) -> String {
    let (objects, errors) = parse_documents(text, "bad.yaml");
    assert!(objects.is_empty(), "{objects:?}");
    assert_eq!(errors.len(), 1, "{errors:?}");
    errors[0].to_string()
}

fn secs(s: i64) -> Option<prost_types::Duration> {
    Some(prost_types::Duration {
        seconds: s,
        nanos: 0,
    })
}

fn millis(ms: i32) -> Option<prost_types::Duration> {
    Some(prost_types::Duration {
        seconds: 0,
        nanos: ms * 1_000_000,
    })
}

fn backend(service: &str, port: u32, weight: u32, subset: &str) -> wp::Backend {
    wp::Backend {
        service: service.into(),
        port,
        weight,
        subset: subset.into(),
        ..Default::default()
    }
}

fn string(name: &str, kind: wp::MatchType, value: &str) -> wp::StringMatch {
    wp::StringMatch {
        name: name.into(),
        r#type: kind as i32,
        value: value.into(),
    }
}

/// The VirtualService and DestinationRule of issue 13 item 5, unchanged (the shared fixture,
/// in namespace `shop`).
fn canary() -> String {
    include_str!("../../../tests/fixtures/istio-canary.yaml").replace("NAMESPACE", "shop")
}

#[test]
fn istio_canary_example_translates_exactly() {
    let r = run(&canary());
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
    let route = &r.routes["VirtualService/shop/product-service"];
    let expected = wp::Route {
        namespace: "shop".into(),
        name: "product-service".into(),
        kind: wp::RouteKind::VirtualService as i32,
        parents: vec![wp::ParentRef {
            service: PRODUCT.into(),
            port: 0,
        }],
        rules: vec![
            wp::Rule {
                matches: vec![wp::RouteMatch {
                    headers: vec![string("x-canary", wp::MatchType::Exact, "true")],
                    ..Default::default()
                }],
                backends: vec![backend(PRODUCT, 8080, 100, "canary")],
                retry: Some(wp::Retry {
                    attempts: 2,
                    ..Default::default()
                }),
                ..Default::default()
            },
            wp::Rule {
                matches: vec![wp::RouteMatch::default()],
                backends: vec![
                    backend(PRODUCT, 8080, 90, "stable"),
                    backend(PRODUCT, 8080, 10, "canary"),
                ],
                timeouts: Some(wp::Timeouts {
                    request: secs(10),
                    backend_request: None,
                }),
                retry: Some(wp::Retry {
                    attempts: 3,
                    per_try_timeout: secs(2),
                    ..Default::default()
                }),
                ..Default::default()
            },
        ],
        creation_timestamp: 0,
        hostnames: vec![],
    };
    assert_eq!(*route, expected);

    let policy = &r.destination_policies["shop/product-service"];
    let expected = wp::DestinationPolicy {
        namespace: "shop".into(),
        name: "product-service".into(),
        service: PRODUCT.into(),
        traffic_policy: Some(wp::TrafficPolicy {
            load_balancer: None,
            connection_pool: Some(wp::ConnectionPool {
                h2_upgrade: true,
                ..Default::default()
            }),
            outlier_detection: Some(wp::OutlierDetection {
                consecutive_5xx_errors: 3,
                consecutive_gateway_errors: 0,
                interval: secs(30),
                base_ejection_time: secs(60),
                max_ejection_percent: 10,
                min_health_percent: 0,
                enabled: true,
            }),
        }),
        port_level: vec![],
        subsets: vec![
            wp::Subset {
                name: "stable".into(),
                workloads: vec![V1.into()],
                traffic_policy: None,
            },
            wp::Subset {
                name: "canary".into(),
                workloads: vec![V2.into()],
                traffic_policy: None,
            },
        ],
    };
    assert_eq!(*policy, expected);

    let scope = &r.waypoint_scopes["shop/wp"];
    assert!(scope.routes.contains("VirtualService/shop/product-service"));
    assert_eq!(
        scope.destination_policies.iter().collect::<Vec<_>>(),
        ["shop/product-service"]
    );
}

#[test]
fn subsets_follow_the_pods() {
    // v2 relabelled to v1: both pods are stable, canary is empty; a new v2 pod joins canary.
    let moved = canary()
        + r#"---
apiVersion: v1
kind: Pod
metadata: {name: product-v2, namespace: shop, labels: {app: product, version: v1}}
status: {podIP: 10.0.0.12}
---
apiVersion: v1
kind: Pod
metadata: {name: product-v3, namespace: shop, labels: {app: product, version: v2}}
status: {podIP: 10.0.0.14}
---
apiVersion: v1
kind: Pod
metadata: {name: not-running, namespace: shop, labels: {app: product, version: v2}}
"#;
    let r = run(&moved);
    let subsets = &r.destination_policies["shop/product-service"].subsets;
    assert_eq!(subsets[0].workloads, [V1, V2]);
    assert_eq!(
        subsets[1].workloads,
        ["Kubernetes//Pod/shop/product-v3"],
        "a pod without an IP is no endpoint"
    );
}

const EVERY_FIELD: &str = r#"apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {name: cart, namespace: shop, creationTimestamp: "2026-03-01T10:00:00Z"}
spec:
  hosts: [cart.shop.svc.cluster.local, cart.shop]
  http:
  - name: matches
    match:
    - uri: {exact: /checkout}
      method: {exact: POST}
      headers: {X-User: {exact: alice}, x-trace: {regex: "[0-9a-f]+"}, x-team: {prefix: pay}, x-present: {}}
      queryParams: {debug: {exact: "1"}, q: {prefix: ab}}
      withoutHeaders: {x-block: {exact: "yes"}}
      port: 80
    - uri: {prefix: /api}
      port: 80
    - uri: {regex: "/v[0-9]+/.*"}
      port: 80
    rewrite: {uri: /new, authority: inner.example}
    route:
    - destination: {host: cart, port: {number: 80}, subset: blue}
      weight: 75
      headers: {request: {set: {X-Version: blue}}}
    - destination: {host: shadow.shop.svc.cluster.local}
      weight: 25
    headers:
      request: {set: {X-Set: a}, add: {X-Add: b}, remove: [X-Gone]}
      response: {set: {X-Resp: c}, remove: [server]}
    timeout: 1.5s
    retries: {attempts: 4, perTryTimeout: 500ms, retryOn: "5xx,connect-failure,503,429"}
    fault:
      delay: {fixedDelay: 2s, percentage: {value: 12.5}}
      abort: {httpStatus: 503, percentage: {value: 1}}
    mirror: {host: shadow, port: {number: 8080}}
    mirrorPercentage: {value: 2.5}
    corsPolicy:
      allowOrigins: [{exact: "https://a.example"}, {prefix: "https://b."}, {regex: "https://.*\\.c\\.example"}]
      allowMethods: [GET, POST]
      allowHeaders: [x-a]
      exposeHeaders: [x-b]
      maxAge: 24h
      allowCredentials: true
  - name: prefix-rewrite
    match: [{uri: {prefix: /old}, port: 80}]
    rewrite: {uri: /new}
    route: [{destination: {host: cart, port: {number: 80}}}]
    retries: {attempts: 0}
    fault: {abort: {grpcStatus: UNAVAILABLE}}
  - name: redirect
    match: [{uri: {exact: /moved}, port: 80}]
    redirect: {uri: /there, authority: new.example, port: 8443, scheme: https}
  - name: for-an-ingress-only
    match: [{uri: {exact: /x}, gateways: [istio-system/ingress]}]
    route: [{destination: {host: cart, port: {number: 80}}}]
  tcp:
  - match: [{port: 5432}]
    route: [{destination: {host: cart, port: {number: 5432}}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: cart, namespace: shop}
spec:
  host: cart
  subsets: [{name: blue, labels: {color: blue}}]
"#;

#[test]
fn a_virtual_service_keeps_every_field() {
    use wp::filter::Kind;
    let r = run(EVERY_FIELD);
    let route = &r.routes["VirtualService/shop/cart"];
    assert_eq!(route.kind(), wp::RouteKind::VirtualService);
    assert_eq!(route.creation_timestamp, 1_772_359_200);
    assert!(route.hostnames.is_empty());
    // Both hosts are the same Service; the rules name ports 80 and 5432.
    assert_eq!(
        route.parents,
        [
            wp::ParentRef {
                service: CART.into(),
                port: 80
            },
            wp::ParentRef {
                service: CART.into(),
                port: 5432
            },
        ]
    );
    // The ingress-only rule is not the waypoint's.
    assert_eq!(route.rules.len(), 4, "{:#?}", route.rules);

    let rule = &route.rules[0];
    assert_eq!(rule.name, "matches");
    assert_eq!(
        rule.matches[0],
        wp::RouteMatch {
            path: Some(wp::PathMatch {
                r#type: wp::MatchType::Exact as i32,
                value: "/checkout".into()
            }),
            headers: vec![
                string("x-user", wp::MatchType::Exact, "alice"),
                string("x-present", wp::MatchType::Regex, ".*"),
                string("x-team", wp::MatchType::PrefixString, "pay"),
                string("x-trace", wp::MatchType::Regex, "[0-9a-f]+"),
            ],
            query_params: vec![
                string("debug", wp::MatchType::Exact, "1"),
                string("q", wp::MatchType::PrefixString, "ab"),
            ],
            method: "POST".into(),
            grpc: None,
            without_headers: vec![string("x-block", wp::MatchType::Exact, "yes")],
        }
    );
    assert_eq!(
        rule.matches[1].path,
        Some(wp::PathMatch {
            r#type: wp::MatchType::PrefixString as i32,
            value: "/api".into()
        })
    );
    assert_eq!(
        rule.matches[2].path,
        Some(wp::PathMatch {
            r#type: wp::MatchType::Regex as i32,
            value: "/v[0-9]+/.*".into()
        })
    );
    let mut blue = backend(CART, 80, 75, "blue");
    blue.filters = vec![wp::Filter {
        kind: Some(Kind::RequestHeaderModifier(wp::HeaderModifier {
            set: vec![wp::Header {
                name: "x-version".into(),
                value: "blue".into(),
            }],
            ..Default::default()
        })),
    }];
    assert_eq!(rule.backends, [blue, backend(SHADOW, 8080, 25, "")]);
    let filters: Vec<&Kind> = rule
        .filters
        .iter()
        .filter_map(|f| f.kind.as_ref())
        .collect();
    assert_eq!(
        filters,
        [
            &Kind::RequestHeaderModifier(wp::HeaderModifier {
                set: vec![wp::Header {
                    name: "x-set".into(),
                    value: "a".into()
                }],
                add: vec![wp::Header {
                    name: "x-add".into(),
                    value: "b".into()
                }],
                remove: vec!["x-gone".into()],
            }),
            &Kind::ResponseHeaderModifier(wp::HeaderModifier {
                set: vec![wp::Header {
                    name: "x-resp".into(),
                    value: "c".into()
                }],
                add: vec![],
                remove: vec!["server".into()],
            }),
            // A prefix among the matches: the matched prefix is replaced.
            &Kind::UrlRewrite(wp::UrlRewrite {
                hostname: "inner.example".into(),
                path: Some(wp::PathModifier {
                    r#type: wp::PathModifierType::PrefixMatch as i32,
                    value: "/new".into()
                }),
            }),
            &Kind::RequestMirror(wp::RequestMirror {
                backend: Some(backend(SHADOW, 8080, 1, "")),
                numerator: 25_000,
                denominator: 1_000_000,
            }),
        ]
    );
    assert_eq!(
        rule.timeouts,
        Some(wp::Timeouts {
            request: Some(prost_types::Duration {
                seconds: 1,
                nanos: 500_000_000
            }),
            backend_request: None
        })
    );
    assert_eq!(
        rule.retry,
        Some(wp::Retry {
            attempts: 4,
            per_try_timeout: millis(500),
            codes: vec![503, 429],
            retry_on: vec![
                "5xx".into(),
                "connect-failure".into(),
                "retriable-status-codes".into()
            ],
            backoff: None,
        })
    );
    assert_eq!(
        rule.fault,
        Some(wp::Fault {
            delay: secs(2),
            delay_percent: 12.5,
            abort_http_status: 503,
            abort_grpc: false,
            abort_grpc_status: 0,
            abort_percent: 1.0,
        })
    );
    assert_eq!(
        rule.cors,
        Some(wp::CorsPolicy {
            allow_origins: vec![
                string("", wp::MatchType::Exact, "https://a.example"),
                string("", wp::MatchType::PrefixString, "https://b."),
                string("", wp::MatchType::Regex, "https://.*\\.c\\.example"),
            ],
            allow_methods: vec!["GET".into(), "POST".into()],
            allow_headers: vec!["x-a".into()],
            expose_headers: vec!["x-b".into()],
            max_age: secs(86_400),
            allow_credentials: true,
        })
    );

    let rule = &route.rules[1];
    assert_eq!(
        rule.filters,
        [wp::Filter {
            kind: Some(Kind::UrlRewrite(wp::UrlRewrite {
                hostname: String::new(),
                path: Some(wp::PathModifier {
                    r#type: wp::PathModifierType::PrefixMatch as i32,
                    value: "/new".into()
                }),
            }))
        }]
    );
    assert_eq!(
        rule.retry,
        Some(wp::Retry::default()),
        "attempts 0: no retries"
    );
    assert_eq!(
        rule.fault,
        Some(wp::Fault {
            abort_grpc: true,
            abort_grpc_status: 14,
            abort_percent: 100.0,
            ..Default::default()
        })
    );
    assert_eq!(rule.backends, [backend(CART, 80, 100, "")]);

    let rule = &route.rules[2];
    assert!(rule.backends.is_empty(), "the redirect answers");
    assert_eq!(
        rule.filters,
        [wp::Filter {
            kind: Some(Kind::RequestRedirect(wp::RequestRedirect {
                scheme: "https".into(),
                hostname: "new.example".into(),
                port: 8443,
                path: Some(wp::PathModifier {
                    r#type: wp::PathModifierType::Full as i32,
                    value: "/there".into()
                }),
                status_code: 301,
            }))
        }]
    );

    // The tcp rule: no matches (an http rule always has at least one), its backends.
    let tcp = &route.rules[3];
    assert!(tcp.matches.is_empty());
    assert_eq!(tcp.backends, [backend(CART, 5432, 100, "")]);
    assert_eq!(tcp.retry, None);

    // Rules limited to different ports are applied on all of them: said once per rule.
    assert_eq!(
        r.warning_texts(),
        [
            "VirtualService shop/cart: spec.http[0].match[0].port: the rules of one VirtualService are limited to different ports; the waypoint applies this rule on ports 80, 5432",
            "VirtualService shop/cart: spec.http[1].match[0].port: the rules of one VirtualService are limited to different ports; the waypoint applies this rule on ports 80, 5432",
            "VirtualService shop/cart: spec.http[2].match[0].port: the rules of one VirtualService are limited to different ports; the waypoint applies this rule on ports 80, 5432",
            "VirtualService shop/cart: spec.tcp[0].match[0].port: the rules of one VirtualService are limited to different ports; the waypoint applies this rule on ports 80, 5432",
        ]
    );
    assert!(
        r.waypoint_scopes["shop/wp"]
            .routes
            .contains("VirtualService/shop/cart")
    );
}

#[test]
fn a_match_without_a_uri_prefix_rewrites_the_whole_path_and_mirrors_default_to_all() {
    let r = run(r#"apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata: {name: p, namespace: shop}
spec:
  hosts: [product-service]
  http:
  - match: [{uri: {exact: /a}}, {headers: {x: {exact: "1"}}}]
    rewrite: {uri: /b}
    mirror: {host: shadow}
    mirrors: [{destination: {host: shadow}, percentage: {value: 50}}]
    route: [{destination: {host: product-service}}]
"#);
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
    let rule = &r.routes["VirtualService/shop/p"].rules[0];
    let kinds: Vec<_> = rule.filters.iter().filter_map(|f| f.kind.clone()).collect();
    assert_eq!(
        kinds,
        [
            wp::filter::Kind::UrlRewrite(wp::UrlRewrite {
                hostname: String::new(),
                path: Some(wp::PathModifier {
                    r#type: wp::PathModifierType::Full as i32,
                    value: "/b".into()
                })
            }),
            wp::filter::Kind::RequestMirror(wp::RequestMirror {
                backend: Some(backend(SHADOW, 8080, 1, "")),
                numerator: 0,
                denominator: 0,
            }),
            wp::filter::Kind::RequestMirror(wp::RequestMirror {
                backend: Some(backend(SHADOW, 8080, 1, "")),
                numerator: 500_000,
                denominator: 1_000_000,
            }),
        ]
    );
}

/// A VirtualService naming something that does not exist is refused with the field named, and
/// the canary VirtualService next to it is still served.
#[test]
fn a_virtual_service_naming_an_unknown_host_subset_or_port_is_refused() {
    let cases = [
        (
            "hosts: [nowhere]\n  http: [{route: [{destination: {host: product-service}}]}]",
            "spec.hosts[0]: \"nowhere\" is not a Service (a short name in shop, name.namespace, or name.namespace.svc.cluster.local)",
        ),
        (
            "hosts: [product-service]\n  http: [{route: [{destination: {host: nowhere.shop.svc.cluster.local}}]}]",
            "spec.http[0].route[0].destination.host: \"nowhere.shop.svc.cluster.local\" is not a Service (a short name in shop, name.namespace, or name.namespace.svc.cluster.local)",
        ),
        (
            "hosts: [product-service]\n  http: [{route: [{destination: {host: product-service, subset: blue}}]}]",
            "spec.http[0].route[0].destination.subset: no DestinationRule for Service shop/product-service declares a subset \"blue\"",
        ),
        (
            "hosts: [product-service]\n  http: [{route: [{destination: {host: product-service, port: {number: 9}}}]}]",
            "spec.http[0].route[0].destination.port.number: Service shop/product-service has no port 9",
        ),
        (
            "hosts: [product-service]\n  http: [{route: [{destination: {host: cart}}]}]",
            "spec.http[0].route[0].destination.port: required: Service shop/cart has more than one port",
        ),
        (
            "hosts: [product-service]\n  http: [{match: [{port: 81}], route: [{destination: {host: product-service}}]}]",
            "spec.http[0].match[0].port: no host Service (shop/product-service) has port 81",
        ),
        (
            "hosts: [product-service]\n  http: [{route: [{destination: {host: product-service}}], mirror: {host: shadow, subset: x}}]",
            "spec.http[0].mirror.subset: no DestinationRule for Service shop/shadow declares a subset \"x\"",
        ),
        (
            "hosts: [product-service]\n  tcp: [{route: [{destination: {host: lonely}}]}]",
            "spec.tcp[0].route[0].destination.host: \"lonely\" is not a Service (a short name in shop, name.namespace, or name.namespace.svc.cluster.local)",
        ),
    ];
    for (spec, expected) in cases {
        let r = run(&format!(
            "{}---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: bad, namespace: shop}}\nspec:\n  {spec}\n",
            canary()
        ));
        assert_eq!(
            r.warning_texts(),
            [format!(
                "VirtualService shop/bad: {expected}; the VirtualService is not served"
            )],
            "{spec}"
        );
        assert!(!r.routes.contains_key("VirtualService/shop/bad"));
        assert!(r.routes.contains_key("VirtualService/shop/product-service"));
    }
}

#[test]
fn a_virtual_service_on_a_service_without_waypoint_is_translated_and_served_to_none() {
    let r = run(r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: lonely, namespace: plain}
spec:
  hosts: [lonely]
  http: [{route: [{destination: {host: lonely}}]}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ingress, namespace: shop}
spec:
  hosts: [product-service]
  gateways: [istio-system/ingress]
  http: [{route: [{destination: {host: product-service}}]}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: consumer, namespace: plain}
spec:
  hosts: [product-service.shop]
  http: [{route: [{destination: {host: product-service.shop}}]}]
"#);
    assert_eq!(
        r.warning_texts(),
        [
            "VirtualService plain/consumer: spec.hosts[0]: Service shop/product-service is in another namespace and the VirtualService is not in its waypoint's namespace; the host is ignored",
            "VirtualService plain/consumer: spec.hosts: no host is a Service the VirtualService can apply to; the VirtualService is not served",
            "VirtualService plain/lonely: spec.hosts[0]: Service plain/lonely has no waypoint: the VirtualService has no effect on it",
        ]
    );
    assert!(r.routes.contains_key("VirtualService/plain/lonely"));
    assert!(
        !r.routes.contains_key("VirtualService/shop/ingress"),
        "a VirtualService for other gateways only is not a waypoint's"
    );
    assert!(
        r.waypoint_scopes["shop/wp"].routes.is_empty(),
        "{:?}",
        r.waypoint_scopes
    );
}

#[test]
fn virtual_services_are_refused_by_field() {
    let cases = [
        (
            "hosts: []\n  http: [{route: [{destination: {host: a}}]}]",
            "spec.hosts: at least one host is required",
        ),
        (
            "hosts: [\"a b\"]\n  http: [{route: [{destination: {host: a}}]}]",
            "spec.hosts[0]: \"a b\" is not a valid host name",
        ),
        ("hosts: [a]", "spec.http: http or tcp rules are required"),
        (
            "hosts: [a]\n  tls: [{route: [{destination: {host: a}}]}]",
            "spec.tls: TLS routes is not supported by Ambit's waypoint",
        ),
        (
            "hosts: [a]\n  http: [{}]",
            "spec.http[0].route: route or redirect is required",
        ),
        (
            "hosts: [a]\n  http: [{redirect: {uri: /x}, route: [{destination: {host: a}}]}]",
            "spec.http[0].redirect: cannot be combined with route",
        ),
        (
            "hosts: [a]\n  http: [{directResponse: {status: 200}}]",
            "spec.http[0].directResponse: directResponse is not supported by Ambit's waypoint",
        ),
        (
            "hosts: [a]\n  http: [{match: [{uri: {exact: /a, prefix: /b}}], route: [{destination: {host: a}}]}]",
            "spec.http[0].match[0].uri: only one of exact, prefix and regex",
        ),
        (
            "hosts: [a]\n  http: [{match: [{uri: {}}], route: [{destination: {host: a}}]}]",
            "spec.http[0].match[0].uri: one of exact, prefix or regex is required",
        ),
        (
            "hosts: [a]\n  http: [{match: [{headers: {x: {regex: \"a(\"}}}], route: [{destination: {host: a}}]}]",
            "spec.http[0].match[0].headers[x].regex: \"a(\" is not a regular expression (RE2 syntax)",
        ),
        (
            "hosts: [a]\n  http: [{match: [{method: {prefix: P}}], route: [{destination: {host: a}}]}]",
            "spec.http[0].match[0].method: a method match other than exact is not supported by Ambit's waypoint",
        ),
        (
            "hosts: [a]\n  http: [{match: [{authority: {exact: x}}], route: [{destination: {host: a}}]}]",
            "spec.http[0].match[0].authority: matching on the authority",
        ),
        (
            "hosts: [a]\n  http: [{match: [{sourceLabels: {app: x}}], route: [{destination: {host: a}}]}]",
            "spec.http[0].match[0].sourceLabels: matching on client labels",
        ),
        (
            "hosts: [a]\n  http: [{match: [{ignoreUriCase: true}], route: [{destination: {host: a}}]}]",
            "spec.http[0].match[0].ignoreUriCase: a case-insensitive uri",
        ),
        (
            "hosts: [a]\n  http: [{match: [{port: 0}], route: [{destination: {host: a}}]}]",
            "spec.http[0].match[0].port: 0 is not a port number (1-65535)",
        ),
        (
            "hosts: [a]\n  http: [{route: [{destination: {}}]}]",
            "spec.http[0].route[0].destination.host: required",
        ),
        (
            "hosts: [a]\n  http: [{route: [{destination: {host: a, subset: A_B}}]}]",
            "spec.http[0].route[0].destination.subset: \"A_B\" is not a valid subset name",
        ),
        (
            "hosts: [a]\n  http: [{route: [{destination: {host: a}, weight: -1}]}]",
            "spec.http[0].route[0].weight: -1 is negative or too large",
        ),
        (
            "hosts: [a]\n  http: [{route: [{destination: {host: a}}, {destination: {host: b}}]}]",
            "spec.http[0].route: with more than one destination, at least one needs a weight above 0",
        ),
        (
            "hosts: [a]\n  http: [{redirect: {redirectCode: 200}}]",
            "spec.http[0].redirect.redirectCode: 200 is not 301, 302, 303, 307 or 308",
        ),
        (
            "hosts: [a]\n  http: [{redirect: {scheme: ftp}}]",
            "spec.http[0].redirect.scheme: \"ftp\" is not http or https",
        ),
        (
            "hosts: [a]\n  http: [{route: [{destination: {host: a}}], rewrite: {uriRegexRewrite: {match: a, rewrite: b}}}]",
            "spec.http[0].rewrite.uriRegexRewrite: uriRegexRewrite is not supported",
        ),
        (
            "hosts: [a]\n  http: [{route: [{destination: {host: a}}], timeout: soon}]",
            "spec.http[0].timeout: \"soon\" is not a duration",
        ),
        (
            "hosts: [a]\n  http: [{route: [{destination: {host: a}}], retries: {attempts: 2, retryOn: \"5xx,retriable-headers\"}}]",
            "spec.http[0].retries.retryOn: \"retriable-headers\" is not an HTTP status code or a retry policy the waypoint honours",
        ),
        (
            "hosts: [a]\n  http: [{route: [{destination: {host: a}}], retries: {attempts: 2, perTryTimeout: 0s}}]",
            "spec.http[0].retries.perTryTimeout: must be at least 1ms",
        ),
        (
            "hosts: [a]\n  http: [{route: [{destination: {host: a}}], fault: {}}]",
            "spec.http[0].fault: delay or abort is required",
        ),
        (
            "hosts: [a]\n  http: [{route: [{destination: {host: a}}], fault: {delay: {percentage: {value: 5}}}}]",
            "spec.http[0].fault.delay.fixedDelay: required",
        ),
        (
            "hosts: [a]\n  http: [{route: [{destination: {host: a}}], fault: {abort: {httpStatus: 700}}}]",
            "spec.http[0].fault.abort.httpStatus: 700 is not an HTTP status (200-599)",
        ),
        (
            "hosts: [a]\n  http: [{route: [{destination: {host: a}}], fault: {abort: {grpcStatus: SOMETIMES}}}]",
            "spec.http[0].fault.abort.grpcStatus: \"SOMETIMES\" is not a gRPC status",
        ),
        (
            "hosts: [a]\n  http: [{route: [{destination: {host: a}}], fault: {abort: {httpStatus: 503, percentage: {value: 101}}}}]",
            "spec.http[0].fault.abort.percentage.value: 101 is not a percentage (0-100)",
        ),
        (
            "hosts: [a]\n  http: [{route: [{destination: {host: a}}], mirrorPercentage: {value: -1}}]",
            "spec.http[0].mirrorPercentage.value: -1 is not a percentage (0-100)",
        ),
        (
            "hosts: [a]\n  http: [{route: [{destination: {host: a}}], corsPolicy: {allowOrigins: [{}]}}]",
            "spec.http[0].corsPolicy.allowOrigins[0]: one of exact, prefix or regex is required",
        ),
        (
            "hosts: [a]\n  http: [{route: [{destination: {host: a}}], headers: {request: {set: {\"a b\": c}}}}]",
            "spec.http[0].headers.request.set[a b]: \"a b\" is not a header name",
        ),
        (
            "hosts: [a]\n  tcp: [{match: [{destinationSubnets: [10.0.0.0/8]}], route: [{destination: {host: a}}]}]",
            "spec.tcp[0].match[0].destinationSubnets: destinationSubnets is not supported",
        ),
        ("hosts: [a]\n  tcp: [{}]", "spec.tcp[0].route: required"),
    ];
    for (spec, expected) in cases {
        let error = refused(&format!(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: bad, namespace: shop}}\nspec:\n  {spec}\n"
        ));
        let prefix = format!("bad.yaml doc 1: VirtualService shop/bad: {expected}");
        assert!(error.starts_with(&prefix), "{error}\nexpected: {prefix}");
    }
    // A namespace is required, as for every namespaced kind.
    let error = refused(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: bad}\nspec: {hosts: [a], http: [{route: [{destination: {host: a}}]}]}\n",
    );
    assert!(error.ends_with("metadata.namespace: required"), "{error}");
}

#[test]
fn a_destination_rule_keeps_every_traffic_policy_field() {
    let r = run(r#"apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: cart, namespace: shop}
spec:
  host: cart.shop.svc.cluster.local
  trafficPolicy:
    loadBalancer:
      consistentHash: {httpCookie: {name: session, ttl: 1h, path: /}}
      localityLbSetting:
        distribute: [{from: "eu/*", to: {"eu/*": 80, "us/*": 20}}]
    connectionPool:
      tcp: {maxConnections: 100, connectTimeout: 250ms}
      http: {http1MaxPendingRequests: 10, http2MaxRequests: 1000, maxRequestsPerConnection: 1, maxRetries: 3, idleTimeout: 30s, h2UpgradePolicy: DO_NOT_UPGRADE}
    outlierDetection: {consecutiveGatewayErrors: 2, maxEjectionPercent: 50, minHealthPercent: 30}
    tls: {mode: SIMPLE}
    portLevelSettings:
    - port: {number: 80}
      loadBalancer: {simple: LEAST_CONN}
    - port: {number: 5432}
      loadBalancer: {consistentHash: {useSourceIp: true}}
  subsets:
  - name: hashed
    labels: {app: cart}
    trafficPolicy:
      loadBalancer: {consistentHash: {httpHeaderName: X-User}}
  - name: by-query
    trafficPolicy:
      loadBalancer:
        consistentHash: {httpQueryParameterName: user}
        localityLbSetting: {enabled: false, failover: [{from: eu, to: us}], failoverPriority: [topology.kubernetes.io/zone]}
  - name: round
    trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}, tls: {mode: ISTIO_MUTUAL}}
"#);
    assert_eq!(
        r.warning_texts(),
        [
            "DestinationRule shop/cart: spec.trafficPolicy.tls.mode: SIMPLE is not supported (the waypoint reaches mesh workloads over HBONE, which is mutual TLS); ignored, the rest of the DestinationRule applies"
        ]
    );
    let policy = &r.destination_policies["shop/cart"];
    assert_eq!(policy.service, CART);
    let top = policy.traffic_policy.as_ref().unwrap();
    use wp::consistent_hash::Key;
    assert_eq!(
        top.load_balancer,
        Some(wp::LoadBalancer {
            simple: 0,
            consistent_hash: Some(wp::ConsistentHash {
                key: Some(Key::Cookie("session".into())),
                cookie_ttl: secs(3600),
                cookie_path: "/".into(),
            }),
            locality: Some(wp::LocalityLb {
                failover: vec![],
                distribute: vec![wp::locality_lb::Distribute {
                    from: "eu/*".into(),
                    to: [("eu/*".to_string(), 80), ("us/*".to_string(), 20)].into(),
                }],
                failover_priority: vec![],
                enabled: true,
            }),
        })
    );
    assert_eq!(
        top.connection_pool,
        Some(wp::ConnectionPool {
            max_connections: 100,
            connect_timeout: millis(250),
            http1_max_pending_requests: 10,
            http2_max_requests: 1000,
            max_requests_per_connection: 1,
            max_retries: 3,
            idle_timeout: secs(30),
            h2_upgrade: false,
        })
    );
    assert_eq!(
        top.outlier_detection,
        Some(wp::OutlierDetection {
            consecutive_5xx_errors: 5,
            consecutive_gateway_errors: 2,
            interval: secs(10),
            base_ejection_time: secs(30),
            max_ejection_percent: 50,
            min_health_percent: 30,
            enabled: true,
        }),
        "Istio's defaults written out"
    );
    let ports: Vec<(u32, Option<wp::LoadBalancer>)> = policy
        .port_level
        .iter()
        .map(|p| {
            (
                p.port,
                p.traffic_policy.as_ref().unwrap().load_balancer.clone(),
            )
        })
        .collect();
    assert_eq!(
        ports,
        [
            (
                80,
                Some(wp::LoadBalancer {
                    simple: wp::load_balancer::Simple::LeastRequest as i32,
                    ..Default::default()
                })
            ),
            (
                5432,
                Some(wp::LoadBalancer {
                    consistent_hash: Some(wp::ConsistentHash {
                        key: Some(Key::SourceIp(true)),
                        ..Default::default()
                    }),
                    ..Default::default()
                })
            ),
        ]
    );
    let lb = |i: usize| {
        policy.subsets[i]
            .traffic_policy
            .as_ref()
            .unwrap()
            .load_balancer
            .clone()
            .unwrap()
    };
    assert_eq!(
        lb(0).consistent_hash.unwrap().key,
        Some(Key::Header("x-user".into()))
    );
    let by_query = lb(1);
    assert_eq!(
        by_query.consistent_hash.unwrap().key,
        Some(Key::QueryParameter("user".into()))
    );
    assert_eq!(
        by_query.locality,
        Some(wp::LocalityLb {
            failover: vec![wp::locality_lb::Failover {
                from: "eu".into(),
                to: "us".into()
            }],
            distribute: vec![],
            failover_priority: vec!["topology.kubernetes.io/zone".into()],
            enabled: false,
        })
    );
    assert_eq!(lb(2).simple, wp::load_balancer::Simple::RoundRobin as i32);
    // No cart pods exist: subsets resolve to nothing.
    assert!(policy.subsets.iter().all(|s| s.workloads.is_empty()));
    assert_eq!(
        r.waypoint_scopes["shop/wp"]
            .destination_policies
            .iter()
            .collect::<Vec<_>>(),
        ["shop/cart"]
    );
}

#[test]
fn destination_rule_fields_that_are_not_applied_are_warned_about() {
    let r = run(r#"apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: p, namespace: shop}
spec:
  host: product-service
  workloadSelector: {matchLabels: {app: client}}
  trafficPolicy:
    loadBalancer: {simple: RANDOM, warmupDurationSecs: 10s}
    connectionPool:
      tcp: {maxConnectionDuration: 1h, tcpKeepalive: {time: 10s}}
      http: {maxConcurrentStreams: 10}
    outlierDetection: {consecutiveLocalOriginFailures: 3}
    portLevelSettings: [{port: {number: 8080}, tls: {mode: MUTUAL}}]
  subsets:
  - name: s
    trafficPolicy: {portLevelSettings: [{port: {number: 8080}}]}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: external, namespace: shop}
spec: {host: api.example.com}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: lonely, namespace: plain}
spec: {host: lonely}
"#);
    let applies = "; ignored, the rest of the DestinationRule applies";
    let expected: Vec<String> = [
        "DestinationRule plain/lonely: spec.host: Service plain/lonely has no waypoint: the DestinationRule has no effect on it".to_string(),
        "DestinationRule shop/external: spec.host: \"api.example.com\" is not a Service; the DestinationRule is not served to waypoints".to_string(),
        format!("DestinationRule shop/p: spec.workloadSelector: waypoints apply a DestinationRule to every client of the Service{applies}"),
        format!("DestinationRule shop/p: spec.trafficPolicy.loadBalancer.warmupDurationSecs: slow start is not supported by Ambit's waypoint{applies}"),
        format!("DestinationRule shop/p: spec.trafficPolicy.connectionPool.tcp.maxConnectionDuration: not supported by Ambit's waypoint{applies}"),
        format!("DestinationRule shop/p: spec.trafficPolicy.connectionPool.tcp.tcpKeepalive: not supported by Ambit's waypoint{applies}"),
        format!("DestinationRule shop/p: spec.trafficPolicy.connectionPool.http.maxConcurrentStreams: not supported by Ambit's waypoint{applies}"),
        format!("DestinationRule shop/p: spec.trafficPolicy.outlierDetection.consecutiveLocalOriginFailures: not supported by Ambit's waypoint (connection failures count as gateway errors){applies}"),
        format!("DestinationRule shop/p: spec.trafficPolicy.portLevelSettings[0].tls.mode: MUTUAL is not supported (the waypoint reaches mesh workloads over HBONE, which is mutual TLS){applies}"),
        format!("DestinationRule shop/p: spec.subsets[0].trafficPolicy.portLevelSettings: per-port settings of a subset are not supported{applies}"),
    ]
    .into();
    assert_eq!(r.warning_texts(), expected);
    let policy = &r.destination_policies["shop/p"];
    assert_eq!(
        policy
            .traffic_policy
            .as_ref()
            .unwrap()
            .load_balancer
            .as_ref()
            .unwrap()
            .simple,
        wp::load_balancer::Simple::Random as i32,
        "the rest applies"
    );
    assert_eq!(
        policy.subsets[0].workloads,
        [V1, V2],
        "a subset without labels is every endpoint"
    );
    assert!(!r.destination_policies.contains_key("shop/external"));
    assert!(r.destination_policies.contains_key("plain/lonely"));
    assert_eq!(
        r.waypoint_scopes["shop/wp"]
            .destination_policies
            .iter()
            .collect::<Vec<_>>(),
        ["shop/p"]
    );
}

#[test]
fn http_route_retry_and_timeouts_reach_the_rule() {
    let r = run(r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: product, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: product-service}]
  rules:
  - backendRefs: [{name: product-service, port: 8080}]
    timeouts: {request: 10s, backendRequest: 2s}
    retry: {attempts: 3, backoff: 100ms, codes: [502, 503]}
  - backendRefs: [{name: product-service, port: 8080}]
    retry: {}
  - backendRefs: [{name: product-service, port: 8080}]
"#);
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
    let rules = &r.routes["HTTPRoute/shop/product"].rules;
    assert_eq!(
        rules[0].timeouts,
        Some(wp::Timeouts {
            request: secs(10),
            backend_request: secs(2),
        })
    );
    assert_eq!(
        rules[0].retry,
        Some(wp::Retry {
            attempts: 3,
            per_try_timeout: None,
            codes: vec![502, 503],
            retry_on: [
                "connect-failure",
                "refused-stream",
                "unavailable",
                "cancelled",
                "retriable-status-codes"
            ]
            .map(String::from)
            .into(),
            backoff: millis(100),
        })
    );
    assert_eq!(
        rules[1].retry,
        Some(wp::Retry {
            attempts: 2,
            ..Default::default()
        }),
        "attempts default to 2; no codes: the waypoint's default conditions"
    );
    assert_eq!(rules[2].retry, None, "no retry field: no retries");
}

#[test]
fn localities_are_refused_by_field() {
    let rule = |lb: &str| {
        refused(&format!(
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: bad, namespace: shop}}\nspec:\n  host: a\n  trafficPolicy: {{loadBalancer: {{localityLbSetting: {lb}}}}}\n"
        ))
    };
    assert!(
        rule("{distribute: [{from: eu, to: {eu: 50}}]}").ends_with(
            "spec.trafficPolicy.loadBalancer.localityLbSetting.distribute[0].to: the percentages add up to 50, not 100"
        )
    );
    assert!(
        rule("{failover: [{from: eu, to: eu}]}").ends_with(
            "spec.trafficPolicy.loadBalancer.localityLbSetting.failover[0].to: \"eu\" is the region it fails over from"
        )
    );
    assert!(
        rule("{distribute: [{from: eu, to: {eu: 100}}], failover: [{from: eu, to: us}]}")
            .ends_with(
                "spec.trafficPolicy.loadBalancer.localityLbSetting.failover: cannot be combined with distribute"
            )
    );
}

#[test]
fn a_virtual_service_is_written_back_with_its_kind_and_removed_from_a_cluster() {
    let (objects, errors) = parse_documents(&canary(), "canary.yaml");
    assert!(errors.is_empty(), "{errors:?}");
    let value = objects[0].to_value();
    assert_eq!(value["kind"], "VirtualService");
    assert_eq!(value["apiVersion"], "networking.istio.io/v1");
    assert_eq!(value["spec"]["http"][1]["retries"]["perTryTimeout"], "2s");
    let (again, errors) = ambit_mesh::parse_object(value, "Kubernetes");
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(again, objects[..1]);
    let mut cluster = Cluster::from_objects(objects.clone());
    assert_eq!(cluster.virtual_services.len(), 1);
    assert!(cluster.remove(&objects[0].key()));
    assert!(cluster.virtual_services.is_empty());
}
